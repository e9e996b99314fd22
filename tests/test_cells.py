"""The one-step cells (SPEC §2): parity with torch.nn, gradcheck for every activation and option, input checks."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.gradcheck import GradcheckError
from torch.func import functional_call

import gatelab
from gatelab import activations

pytestmark = pytest.mark.usefixtures("single_thread")

F64, F32 = torch.float64, torch.float32
I, H, B = 3, 4, 2
TOL = {F64: 1e-10, F32: 1e-5}
GREFF = ["vanilla", "NIG", "NFG", "NOG", "NIAF", "NOAF", "NP", "CIFG", "FGR"]  # SPEC §2


def _randomise(module: nn.Module, gen: torch.Generator, scale: float = 0.5) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.uniform_(-scale, scale, generator=gen)


def _as_tuple(out) -> tuple[torch.Tensor, ...]:
    return out if isinstance(out, tuple) else (out,)


# -- parity with torch.nn -------------------------------------------------------------------------

ORACLES: dict[str, tuple[Callable[..., nn.Module], Callable[..., nn.Module]]] = {
    "RNNCell-tanh": (lambda bias, dtype: nn.RNNCell(I, H, bias, nonlinearity="tanh", dtype=dtype),
                     lambda bias, dtype: gatelab.ElmanCell(I, H, bias, dtype=dtype)),
    "RNNCell-relu": (lambda bias, dtype: nn.RNNCell(I, H, bias, nonlinearity="relu", dtype=dtype),
                     lambda bias, dtype: gatelab.ElmanCell(I, H, bias, nonlinearity="relu", dtype=dtype)),
    "LSTMCell": (lambda bias, dtype: nn.LSTMCell(I, H, bias, dtype=dtype),
                 lambda bias, dtype: gatelab.LSTMCell(I, H, bias, dtype=dtype)),
    "GRUCell": (lambda bias, dtype: nn.GRUCell(I, H, bias, dtype=dtype),
                lambda bias, dtype: gatelab.GRUCell(I, H, bias, dtype=dtype)),
}


def _parity_error(ref: nn.Module, ours: nn.Module, x: torch.Tensor, state, gen: torch.Generator) -> float:
    """Largest |ours − ref| over the outputs and the gradients of a random projection of them with
    respect to the input, the state and every parameter. Asserts the two see the same parameters."""
    ref_params, our_params = dict(ref.named_parameters()), dict(ours.named_parameters())
    assert list(our_params) == list(ref_params)
    assert all(our_params[k].shape == ref_params[k].shape for k in ref_params)

    def run(cell, params):
        xs = x.detach().clone().requires_grad_(True)
        if state is None:
            out, leaves = _as_tuple(cell(xs)), [xs]
        elif isinstance(state, tuple):
            st = tuple(s.detach().clone().requires_grad_(True) for s in state)
            out, leaves = _as_tuple(cell(xs, st)), [xs, *st]
        else:
            st = state.detach().clone().requires_grad_(True)
            out, leaves = _as_tuple(cell(xs, st)), [xs, st]
        return out, leaves + list(params.values())

    out_ref, leaves_ref = run(ref, ref_params)
    out_our, leaves_our = run(ours, our_params)
    assert len(out_ref) == len(out_our)
    weights = [torch.randn(o.shape, generator=gen, dtype=o.dtype) for o in out_ref]
    loss = lambda outs: sum((o * w).sum() for o, w in zip(outs, weights))  # noqa: E731
    grads_ref = torch.autograd.grad(loss(out_ref), leaves_ref)
    grads_our = torch.autograd.grad(loss(out_our), leaves_our)
    err = 0.0
    for a, b in zip((*out_our, *grads_our), (*out_ref, *grads_ref)):
        assert a.shape == b.shape and a.dtype == b.dtype
        err = max(err, (a - b).abs().max().item())
    return err


@pytest.mark.parametrize("with_state", [True, False], ids=["state", "nostate"])
@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("oracle", sorted(ORACLES))
def test_parity_with_torch(oracle, dtype, bias, batched, with_state, gen, parity_log):
    make_ref, make_ours = ORACLES[oracle]
    ref, ours = make_ref(bias, dtype), make_ours(bias, dtype)
    _randomise(ref, gen)
    ours.load_state_dict(ref.state_dict())
    shape = (B,) if batched else ()
    x = torch.randn(*shape, I, generator=gen, dtype=dtype)
    state = None
    if with_state:
        state = torch.randn(*shape, H, generator=gen, dtype=dtype)
        if oracle == "LSTMCell":
            state = (state, torch.randn(*shape, H, generator=gen, dtype=dtype))
    err = _parity_error(ref, ours, x, state, gen)
    parity_log(oracle, dtype, err)
    assert err <= TOL[dtype], err


def test_state_dict_round_trips_both_ways(gen):
    for make_ref, make_ours in ORACLES.values():
        ref, ours = make_ref(True, F64), make_ours(True, F64)
        _randomise(ours, gen)
        ref.load_state_dict(ours.state_dict())  # strict: the same keys
        for k, v in ref.state_dict().items():
            assert torch.equal(v, ours.state_dict()[k])


@pytest.mark.parametrize(
    "make_ours, make_ref, state",
    [
        (lambda: gatelab.ElmanCell(I, H, activation=F.relu, dtype=F64),
         lambda: nn.RNNCell(I, H, nonlinearity="relu", dtype=F64), "h"),
        (lambda: gatelab.ElmanCell(I, H, activation=nn.Tanh(), dtype=F64), lambda: nn.RNNCell(I, H, dtype=F64), "h"),
        (lambda: gatelab.LSTMCell(I, H, gate_activation={"i": nn.Sigmoid(), "f": torch.sigmoid},
                                  candidate_activation=F.tanh, cell_activation="tanh", dtype=F64),
         lambda: nn.LSTMCell(I, H, dtype=F64), "hc"),
        (lambda: gatelab.GRUCell(I, H, gate_activation={"z": "sigmoid"}, candidate_activation=torch.tanh, dtype=F64),
         lambda: nn.GRUCell(I, H, dtype=F64), "h"),
    ],
    ids=["elman-F.relu", "elman-nn.Tanh", "lstm-mixed-specs", "gru-mapping"],
)
def test_equivalent_activation_specs_keep_parity(make_ours, make_ref, state, gen, parity_log):
    ref, ours = make_ref(), make_ours()
    _randomise(ref, gen)
    ours.load_state_dict(ref.state_dict())
    assert all(a.torch_default for a in ours.activation_slots().values())
    x = torch.randn(B, I, generator=gen, dtype=F64)
    st = tuple(torch.randn(B, H, generator=gen, dtype=F64) for _ in state)
    assert _parity_error(ref, ours, x, st if len(st) > 1 else st[0], gen) <= 1e-10


@pytest.mark.parametrize(
    "options",
    [{"peephole": True}, {"peephole": True, "peephole_output": "previous"}, {"full_gate_recurrence": True},
     {"variant": "FGR"}],
    ids=["peephole-current", "peephole-previous", "fgr", "variant-FGR"],
)
def test_zeroed_extras_reduce_to_torch(options, gen):
    """Peepholes and gate recurrence with zero weights are the plain LSTM: the options are wired in
    without disturbing the rest (their effect is checked against golden values elsewhere)."""
    ref = nn.LSTMCell(I, H, dtype=F64)
    _randomise(ref, gen)
    ours = gatelab.LSTMCell(I, H, dtype=F64, **options)
    extra = {k for k in dict(ours.named_parameters())} - set(dict(ref.named_parameters()))
    assert extra
    with torch.no_grad():
        for k in extra:
            getattr(ours, k).zero_()
    ours.load_state_dict(ref.state_dict(), strict=False)
    x = torch.randn(B, I, generator=gen, dtype=F64)
    h, c = torch.randn(B, H, generator=gen, dtype=F64), torch.randn(B, H, generator=gen, dtype=F64)
    state = (h, c, torch.rand(B, 3 * H, generator=gen, dtype=F64)) if ours.full_gate_recurrence else (h, c)
    out = ours(x, state)
    expected = ref(x, (h, c))
    torch.testing.assert_close(out[:2], expected, rtol=0, atol=1e-12)


@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")
@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
def test_projection_matches_torch_lstm(dtype, batched, gen, parity_log):
    P = 2
    ref = nn.LSTM(I, H, proj_size=P, dtype=dtype)
    _randomise(ref, gen)
    ours = gatelab.LSTMCell(I, H, proj_size=P, dtype=dtype)
    ours.load_state_dict({k.removesuffix("_l0"): v for k, v in ref.state_dict().items()})
    shape = (B,) if batched else ()
    x = torch.randn(*shape, I, generator=gen, dtype=dtype, requires_grad=True)
    h = torch.randn(*shape, P, generator=gen, dtype=dtype, requires_grad=True)
    c = torch.randn(*shape, H, generator=gen, dtype=dtype, requires_grad=True)
    h1, c1 = ours(x, (h, c))
    assert h1.shape == (*shape, P) and c1.shape == (*shape, H)
    _, (h_ref, c_ref) = ref(x.unsqueeze(0), (h.unsqueeze(0), c.unsqueeze(0)))  # one step, one layer
    h_ref, c_ref = h_ref.squeeze(0), c_ref.squeeze(0)
    wh, wc = torch.randn(h1.shape, generator=gen, dtype=dtype), torch.randn(c1.shape, generator=gen, dtype=dtype)
    leaves_our = [x, h, c, *ours.parameters()]
    leaves_ref = [x, h, c, *ref.parameters()]
    g_our = torch.autograd.grad((h1 * wh).sum() + (c1 * wc).sum(), leaves_our)
    g_ref = torch.autograd.grad((h_ref * wh).sum() + (c_ref * wc).sum(), leaves_ref)
    err = max((a - b).abs().max().item() for a, b in zip((h1, c1, *g_our), (h_ref, c_ref, *g_ref)))
    parity_log("LSTM-proj", dtype, err)
    assert err <= TOL[dtype]


def test_omitted_state_is_zeros(gen):
    for cell in (gatelab.ElmanCell(I, H), gatelab.GRUCell(I, H), gatelab.GatedStateCell(I, H)):
        x = torch.randn(B, I, generator=gen)
        torch.testing.assert_close(cell(x), cell(x, torch.zeros(B, H)), rtol=0, atol=0)
    lstm = gatelab.LSTMCell(I, H, variant="FGR", proj_size=2)
    x = torch.randn(I, generator=gen)
    zeros = (torch.zeros(2), torch.zeros(H), torch.zeros(3 * H))
    for a, b in zip(lstm(x), lstm(x, zeros)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize(
    "kwargs, shapes",
    [
        ({}, {"weight_ih": (4 * H, I), "weight_hh": (4 * H, H), "bias_ih": (4 * H,), "bias_hh": (4 * H,)}),
        ({"bias": False}, {"weight_ih": (4 * H, I), "weight_hh": (4 * H, H)}),
        ({"peephole": True}, {"weight_ih": (4 * H, I), "weight_hh": (4 * H, H), "bias_ih": (4 * H,),
                              "bias_hh": (4 * H,), "weight_ci": (H,), "weight_cf": (H,), "weight_co": (H,)}),
        ({"coupled": True, "peephole": True}, {"weight_ih": (3 * H, I), "weight_hh": (3 * H, H), "bias_ih": (3 * H,),
                                               "bias_hh": (3 * H,), "weight_cf": (H,), "weight_co": (H,)}),
        ({"gates": "fo", "bias": False}, {"weight_ih": (3 * H, I), "weight_hh": (3 * H, H)}),
        ({"gates": "", "bias": False}, {"weight_ih": (H, I), "weight_hh": (H, H)}),
        ({"proj_size": 2, "bias": False}, {"weight_ih": (4 * H, I), "weight_hh": (4 * H, 2), "weight_hr": (2, H)}),
        ({"full_gate_recurrence": True, "bias": False},
         {"weight_ih": (4 * H, I), "weight_hh": (4 * H, H), "weight_gr": (3 * H, 3 * H)}),
    ],
    ids=["default", "nobias", "peephole", "cifg", "gates-fo", "gates-none", "proj", "fgr"],
)
def test_lstm_extra_parameters_only_with_their_option(kwargs, shapes):
    cell = gatelab.LSTMCell(I, H, **kwargs)
    assert {k: tuple(p.shape) for k, p in cell.named_parameters()} == shapes


def test_gated_state_and_gru_parameter_shapes():
    assert {k: tuple(p.shape) for k, p in gatelab.GatedStateCell(I, H).named_parameters()} == {
        "weight_ih": (4 * H, I), "weight_hh": (4 * H, H), "bias_ih": (4 * H,), "bias_hh": (4 * H,)}
    assert {k: tuple(p.shape) for k, p in gatelab.GRUCell(I, H, reset_after=False).named_parameters()} == {
        "weight_ih": (3 * H, I), "weight_hh": (3 * H, H), "bias_ih": (3 * H,), "bias_hh": (3 * H,)}


# -- gradcheck ------------------------------------------------------------------------------------

_KINKS = {"relu": (0.0,), "leaky_relu": (0.0,), "prelu": (0.0,), "elu": (0.0,), "selu": (0.0,),
          "hardtanh": (-1.0, 1.0), "hard_sigmoid": (-3.0, 3.0)}
_UNKNOWN_KINKS = (0.0, -1.0, 1.0, -3.0, 3.0)  # user callables and modules: stay clear of the usual suspects


def _kinks(act) -> tuple[float, ...]:
    kind = getattr(act, "kind", "")
    if kind == "hard_sigmoid":
        return (-0.5 / act.onnx_alpha, 0.5 / act.onnx_alpha)
    return _KINKS.get(kind, ()) if kind else _UNKNOWN_KINKS


def _recorder(seen: list, kinks: tuple[float, ...]):
    def hook(module, args):
        seen.append((args[0].detach(), kinks))

    return hook


@contextmanager
def _recording(cell: nn.Module):
    """Record ``(input, kinks of the activation)`` for every activation call of ``cell``."""
    seen: list[tuple[torch.Tensor, tuple[float, ...]]] = []
    handles, patched = [], {}
    for name, act in cell.activation_slots().items():
        if isinstance(act, nn.Module):
            handles.append(act.register_forward_pre_hook(_recorder(seen, _kinks(act))))
        else:
            patched[name] = act
            setattr(cell, name, lambda t, act=act: (seen.append((t.detach(), _kinks(act))), act(t))[1])
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()
        for name, act in patched.items():
            setattr(cell, name, act)


def _state_sizes(cell: nn.Module) -> tuple[int, ...]:
    return cell.state_sizes() if isinstance(cell, gatelab.LSTMCell) else (cell.hidden_size,)


def _pack(cell: nn.Module, states: tuple[torch.Tensor, ...]):
    return tuple(states) if isinstance(cell, gatelab.LSTMCell) else states[0]


def _gradcheck_cell(make: Callable[[], nn.Module], fast_mode: bool = False) -> None:
    """gradcheck of ``make()``'s output with respect to input, state and every parameter, in float64,
    with a seed whose activation inputs all keep 1e-3 away from the kinks (gradcheck's eps is 1e-6).

    ``fast_mode`` compares random projections ``vᵀ J u`` instead of the whole Jacobian (torch's fast
    gradcheck): any wrong entry still shows, at a fraction of the cost."""
    for seed in range(20):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            cell = make().to(F64)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():  # move LayerNorm gains, activation slopes... off their round initial values
            for p in cell.parameters():
                p.add_(torch.empty_like(p).uniform_(-0.2, 0.2, generator=gen))
        x = torch.randn(B, cell.input_size, generator=gen, dtype=F64)
        states = tuple(0.5 * torch.randn(B, n, generator=gen, dtype=F64) for n in _state_sizes(cell))
        with torch.no_grad(), _recording(cell) as seen:
            cell(x, _pack(cell, states))
        assert seen, "no activation was called"
        margin = min([(t - k).abs().min().item() for t, kinks in seen for k in kinks], default=1.0)
        if margin > 1e-3:
            break
    else:
        pytest.fail("no seed keeps the activation inputs away from the kinks")

    names, params = zip(*cell.named_parameters())
    n_state = len(states)

    def step(x, *rest):
        st, ps = rest[:n_state], rest[n_state:]
        return _as_tuple(functional_call(cell, dict(zip(names, ps)), (x, _pack(cell, st))))

    inputs = tuple(t.detach().clone().requires_grad_(True) for t in (x, *states, *params))
    assert torch.autograd.gradcheck(step, inputs, eps=1e-6, atol=1e-5, rtol=1e-3, fast_mode=fast_mode)


SLOTS = [
    ("ElmanCell", "activation"),
    ("LSTMCell", "gate_activation"),
    ("LSTMCell", "candidate_activation"),
    ("LSTMCell", "cell_activation"),
    ("GRUCell", "gate_activation"),
    ("GRUCell", "candidate_activation"),
    ("GatedStateCell", "gate_activation"),
    ("GatedStateCell", "candidate_activation"),
]


@pytest.mark.parametrize("act", activations.available())
@pytest.mark.parametrize("cls, slot", SLOTS, ids=[f"{c}-{s}" for c, s in SLOTS])
def test_gradcheck_every_activation_in_every_slot(cls, slot, act):
    _gradcheck_cell(lambda: getattr(gatelab, cls)(I, H, **{slot: act}), fast_mode=True)


LSTM_OPTIONS = {
    "bias=False": {"bias": False},
    "peephole-current": {"peephole": True},
    "peephole-previous": {"peephole": True, "peephole_output": "previous"},
    "layer_norm": {"layer_norm": True},
    "layer_norm-peephole-nobias": {"layer_norm": True, "peephole": True, "bias": False},
    "proj": {"proj_size": 2},
    "proj-peephole-layer_norm": {"proj_size": 2, "peephole": True, "layer_norm": True},
    "coupled": {"coupled": True},
    "coupled-peephole": {"coupled": True, "peephole": True},
    "gates-fo": {"gates": "fo"},
    "gates-io": {"gates": "io"},
    "gates-if": {"gates": "if", "peephole": True},
    "gates-none": {"gates": ""},
    "fgr": {"full_gate_recurrence": True},
    "fgr-gates-fo-proj": {"full_gate_recurrence": True, "gates": "fo", "proj_size": 3},
    "learnable-everything": {
        "gate_activation": {"i": "adaptive_sigmoid", "f": "hard_sigmoid", "o": "prelu"},
        "candidate_activation": "adaptive_tanh", "cell_activation": "softsign",
        "peephole": True, "layer_norm": True, "proj_size": 2,
    },
    "fgr-learnable": {"variant": "FGR", "gate_activation": "adaptive_sigmoid"},
    "prelu-module": {"candidate_activation": nn.PReLU(), "peephole": True},
    **{f"variant-{v}": {"variant": v} for v in GREFF},
}


@pytest.mark.parametrize("options", LSTM_OPTIONS.values(), ids=LSTM_OPTIONS.keys())
def test_gradcheck_lstm_options(options):
    _gradcheck_cell(lambda: gatelab.LSTMCell(I, H, **options))


OTHER_OPTIONS = {
    "gru-reset-before": (gatelab.GRUCell, {"reset_after": False}),
    "gru-reset-before-nobias": (gatelab.GRUCell, {"reset_after": False, "bias": False}),
    "gru-nobias": (gatelab.GRUCell, {"bias": False}),
    "gru-reset-before-learnable": (gatelab.GRUCell, {"reset_after": False, "gate_activation": {"r": "adaptive_sigmoid"},
                                                     "candidate_activation": "prelu"}),
    "elman-nobias": (gatelab.ElmanCell, {"bias": False}),
    "elman-prelu-module": (gatelab.ElmanCell, {"activation": nn.PReLU(H)}),
    "gated-state-nobias": (gatelab.GatedStateCell, {"bias": False}),
    "gated-state-mapping": (gatelab.GatedStateCell, {"gate_activation": {"f": "hard_sigmoid", "o": "adaptive_sigmoid"}}),
}


@pytest.mark.parametrize("cls, options", OTHER_OPTIONS.values(), ids=OTHER_OPTIONS.keys())
def test_gradcheck_other_options(cls, options):
    _gradcheck_cell(lambda: cls(I, H, **options))


def test_gradcheck_sees_a_wrong_gradient():
    """The harness itself can fail: an activation whose backward is off is caught."""

    class Wrong(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return torch.tanh(x)

        @staticmethod
        def backward(ctx, grad):
            (x,) = ctx.saved_tensors
            return grad * (1 - torch.tanh(x) ** 2) * 1.01

    for fast_mode in (False, True):
        with pytest.raises(GradcheckError):
            _gradcheck_cell(lambda: gatelab.LSTMCell(I, H, candidate_activation=Wrong.apply), fast_mode=fast_mode)


# -- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: gatelab.ElmanCell(I, H)(torch.randn(B, 5)), ValueError,
         r"ElmanCell: expected input with 3 features \(input_size\), got shape \(2, 5\)"),
        (lambda: gatelab.LSTMCell(I, H)(torch.randn(5)), ValueError,
         r"LSTMCell: expected input with 3 features \(input_size\), got shape \(5,\)"),
        (lambda: gatelab.GRUCell(I, H)(torch.randn(1, B, I)), ValueError,
         r"GRUCell: expected input of shape \(batch, 3\) or \(3,\), got \(1, 2, 3\)"),
        (lambda: gatelab.GRUCell(I, H)([1.0, 2.0, 3.0]), TypeError, r"GRUCell: input must be a Tensor, got list"),
        (lambda: gatelab.ElmanCell(I, H)(torch.randn(B, I), torch.randn(B, 5)), ValueError,
         r"ElmanCell: expected hx of shape \(2, 4\), got \(2, 5\)"),
        (lambda: gatelab.GRUCell(I, H)(torch.randn(I), torch.randn(1, H)), ValueError,
         r"GRUCell: expected hx of shape \(4,\), got \(1, 4\)"),
        (lambda: gatelab.GatedStateCell(I, H)(torch.randn(B, I), torch.randn(3, H)), ValueError,
         r"GatedStateCell: expected state of shape \(2, 4\), got \(3, 4\)"),
        (lambda: gatelab.LSTMCell(I, H)(torch.randn(B, I), (torch.randn(B, H), torch.randn(B, 5))), ValueError,
         r"LSTMCell: expected c of shape \(2, 4\), got \(2, 5\)"),
        (lambda: gatelab.LSTMCell(I, H, proj_size=2)(torch.randn(B, I), (torch.randn(B, H), torch.randn(B, H))),
         ValueError, r"LSTMCell: expected h of shape \(2, 2\), got \(2, 4\)"),
        (lambda: gatelab.LSTMCell(I, H)(torch.randn(B, I), torch.randn(B, H)), ValueError,
         r"LSTMCell: expected the state as a tuple \(h, c\), got Tensor"),
        (lambda: gatelab.LSTMCell(I, H, variant="FGR")(torch.randn(B, I), (torch.randn(B, H), torch.randn(B, H))),
         ValueError, r"LSTMCell: expected the state as a tuple \(h, c, gates\), got tuple of 2"),
        (lambda: gatelab.ElmanCell(I, H)(torch.randn(B, I, dtype=F64)), ValueError,
         r"ElmanCell: input dtype torch.float64 does not match parameters' torch.float32"),
        (lambda: gatelab.LSTMCell(I, H, dtype=F64)(torch.randn(B, I)), ValueError,
         r"LSTMCell: input dtype torch.float32 does not match parameters' torch.float64"),
        (lambda: gatelab.GRUCell(I, H)(torch.randn(B, I), torch.randn(B, H, dtype=F64)), ValueError,
         r"GRUCell: hx is torch.float64 on cpu, input is torch.float32 on cpu"),
        (lambda: gatelab.LSTMCell(I, H)(torch.randn(B, I), (torch.randn(B, H), torch.randn(B, H, dtype=F64))),
         ValueError, r"LSTMCell: c is torch.float64 on cpu, input is torch.float32 on cpu"),
    ],
    ids=["input-features", "unbatched-features", "input-3d", "input-list", "state-shape", "unbatched-state",
         "gated-state-batch", "lstm-c", "lstm-proj-h", "lstm-not-tuple", "fgr-tuple-len", "input-dtype",
         "input-dtype-f64-cell", "state-dtype", "lstm-c-dtype"],
)
def test_bad_call_raises(call, error, message):
    with pytest.raises(error, match=message):
        call()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_mismatch_raises():
    cell = gatelab.GRUCell(I, H)
    with pytest.raises(ValueError, match=r"GRUCell: input on cuda:0, parameters on cpu"):
        cell(torch.randn(B, I, device="cuda"))
    cell = gatelab.LSTMCell(I, H, device="cuda")
    x = torch.randn(B, I, device="cuda")
    with pytest.raises(ValueError, match=r"LSTMCell: h is torch.float32 on cpu, input is torch.float32 on cuda:0"):
        cell(x, (torch.zeros(B, H), torch.zeros(B, H, device="cuda")))
    h, c = cell(x)
    assert h.device.type == "cuda" and c.device.type == "cuda"


CELLS = [gatelab.ElmanCell, gatelab.LSTMCell, gatelab.GRUCell, gatelab.GatedStateCell]


@pytest.mark.parametrize("cls", CELLS, ids=lambda c: c.__name__)
@pytest.mark.parametrize(
    "args, error, message",
    [
        ((0, H), ValueError, r"input_size must be positive, got 0"),
        ((I, 0), ValueError, r"hidden_size must be positive, got 0"),
        ((I, -2), ValueError, r"hidden_size must be positive, got -2"),
        ((3.0, H), TypeError, r"input_size must be an int, got float"),
        ((I, 4.5), TypeError, r"hidden_size must be an int, got float"),
        ((I, True), TypeError, r"hidden_size must be an int, got bool"),
        ((I, "4"), TypeError, r"hidden_size must be an int, got str"),
        ((I, H, 1), TypeError, r"bias must be True or False, got 1 \(int\)"),
    ],
    ids=["input0", "hidden0", "hidden-neg", "input-float", "hidden-float", "hidden-bool", "hidden-str", "bias-int"],
)
def test_bad_sizes_raise(cls, args, error, message):
    with pytest.raises(error, match=message):
        cls(*args)


@pytest.mark.parametrize(
    "cls, kwargs, error, message",
    [
        (gatelab.ElmanCell, {"activation": 3}, TypeError,
         r"ElmanCell: activation: activation must be a name, an Activation, a callable or an nn\.Module; got int"),
        (gatelab.ElmanCell, {"nonlinearity": "nope"}, ValueError, r"unknown activation 'nope'; valid names: .*tanh"),
        (gatelab.ElmanCell, {"nonlinearity": "tanh", "activation": "relu"}, ValueError,
         r"pass activation or nonlinearity, not both \(got 'relu' and 'tanh'\)"),
        (gatelab.LSTMCell, {"gate_activation": 3}, TypeError, r"LSTMCell: gate_activation\['i'\]: .*got int"),
        (gatelab.LSTMCell, {"gate_activation": {"f": 3}}, TypeError, r"LSTMCell: gate_activation\['f'\]: .*got int"),
        (gatelab.LSTMCell, {"candidate_activation": 3}, TypeError, r"LSTMCell: candidate_activation: .*got int"),
        (gatelab.LSTMCell, {"cell_activation": None, "candidate_activation": [1]}, TypeError,
         r"LSTMCell: candidate_activation: .*got list"),
        (gatelab.LSTMCell, {"cell_activation": 3.5}, TypeError, r"LSTMCell: cell_activation: .*got float"),
        (gatelab.GRUCell, {"candidate_activation": 3}, TypeError, r"GRUCell: candidate_activation: .*got int"),
        (gatelab.GatedStateCell, {"gate_activation": 3}, TypeError, r"GatedStateCell: gate_activation\['f'\]: .*int"),
        (gatelab.LSTMCell, {"gate_activation": {"r": "sigmoid"}}, ValueError,
         r"LSTMCell has gates i, f, o; gate_activation names 'r'"),
        (gatelab.LSTMCell, {"gate_activation": {"g": "sigmoid", "f": "sigmoid"}}, ValueError,
         r"LSTMCell has gates i, f, o; gate_activation names 'g'"),
        (gatelab.GRUCell, {"gate_activation": {"i": "sigmoid", "n": "tanh"}}, ValueError,
         r"GRUCell has gates r, z; gate_activation names 'i', 'n'"),
        (gatelab.GatedStateCell, {"gate_activation": {"z": "sigmoid"}}, ValueError,
         r"GatedStateCell has gates f, i, o; gate_activation names 'z'"),
        (gatelab.LSTMCell, {"variant": "XYZ"}, ValueError,
         r"unknown LSTM variant 'XYZ'; valid: vanilla, NIG, NFG, NOG, NIAF, NOAF, NP, CIFG, FGR"),
        (gatelab.LSTMCell, {"variant": "NP", "peephole": True}, ValueError,
         r"variant='NP' sets peephole=False, but peephole=True was passed"),
        (gatelab.LSTMCell, {"variant": "CIFG", "coupled": False}, ValueError,
         r"variant='CIFG' sets coupled=True, but coupled=False was passed"),
        (gatelab.LSTMCell, {"variant": "NIG", "gates": "ifo"}, ValueError,
         r"variant='NIG' sets gates='fo', but gates='ifo' was passed"),
        (gatelab.LSTMCell, {"variant": "NIAF", "candidate_activation": "tanh"}, ValueError,
         r"variant='NIAF' sets candidate_activation='identity', but candidate_activation='tanh' was passed"),
        (gatelab.LSTMCell, {"variant": "FGR", "full_gate_recurrence": False}, ValueError,
         r"variant='FGR' sets full_gate_recurrence=True, but full_gate_recurrence=False was passed"),
        (gatelab.LSTMCell, {"proj_size": H}, ValueError, r"proj_size must be smaller than hidden_size \(4\), got 4"),
        (gatelab.LSTMCell, {"proj_size": 7}, ValueError, r"proj_size must be smaller than hidden_size \(4\), got 7"),
        (gatelab.LSTMCell, {"proj_size": -1}, ValueError, r"proj_size must be positive, got -1"),
        (gatelab.LSTMCell, {"proj_size": 1.5}, TypeError, r"proj_size must be an int, got float"),
        (gatelab.LSTMCell, {"gates": "xyz"}, ValueError, r"gates must be a subset of 'ifo', got 'xyz'"),
        (gatelab.LSTMCell, {"gates": "iif"}, ValueError, r"gates must be a subset of 'ifo', got 'iif'"),
        (gatelab.LSTMCell, {"coupled": True, "gates": "fo"}, ValueError,
         r"coupled=True \(CIFG\) needs the input and forget gates, got gates='fo'"),
        (gatelab.LSTMCell, {"variant": "CIFG", "gates": "io"}, ValueError,
         r"coupled=True \(CIFG\) needs the input and forget gates, got gates='io'"),
        (gatelab.LSTMCell, {"peephole": True, "peephole_output": "next"}, ValueError,
         r"peephole_output must be 'current' or 'previous', got 'next'"),
    ],
    ids=lambda v: None,
)
def test_bad_options_raise(cls, kwargs, error, message):
    with pytest.raises(error, match=message):
        cls(I, H, **kwargs)


def test_consistent_explicit_options_are_accepted():
    cell = gatelab.LSTMCell(I, H, variant="NP", peephole=False, gates="ifo")
    assert cell.weight_ci is None
    cell = gatelab.LSTMCell(I, H, variant="CIFG", coupled=True, peephole=True)
    assert cell.coupled and cell.weight_ci is None and cell.weight_cf is not None


def test_projection_with_non_int_hidden_size_names_the_problem():
    with pytest.raises(TypeError, match=r"hidden_size must be an int, got str"):
        gatelab.LSTMCell(I, "4", proj_size=2)


def test_gate_activation_for_a_gate_without_activation_is_an_error():
    with pytest.raises(ValueError, match=r"gate_activation names 'i', but in this configuration only f, o"):
        gatelab.LSTMCell(I, H, variant="CIFG", gate_activation={"i": "relu"})
    with pytest.raises(ValueError, match=r"gate_activation names 'o'"):
        gatelab.LSTMCell(I, H, gates="if", gate_activation={"o": "relu"})


def test_variant_accepts_an_equal_gate_set_in_another_order():
    assert gatelab.LSTMCell(I, H, variant="NIG", gates="of").gates == "fo"
