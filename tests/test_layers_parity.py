"""Layers against oracles (SPEC §3, §4; issue 3): torch.nn.RNN/LSTM/GRU on both engines, and hand loops over the cells.

The torch grid: {RNN tanh, RNN relu, LSTM, LSTM proj_size=2, GRU} x {1, 2, 3 layers} x {uni, bi} x
{batch_first or not} x {padded, PackedSequence with unsorted lengths 1..T} x {zero, random initial
state} x {native, reference}. Each case compares outputs, final states and the gradients of every
parameter, the input and the initial state, float64 to 1e-9. The largest error per (layer, engine)
is printed at the end of the module (visible with ``-s``) and written to
``/tmp/gatelab_layer_parity.json``.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

import gatelab
from gatelab.cells import ElmanCell, GatedStateCell, GRUCell, LSTMCell

F64 = torch.float64
TOL = 1e-9
I, H, P, T, B = 3, 4, 2, 5, 3
LENGTHS = [3, 5, 1, 4, 2]  # a permutation of 1..T, unsorted; the packed batch has B = T
ENGINES = ["native", "reference"]
SUMMARY_FILE = "/tmp/gatelab_layer_parity.json"

# (layer type, engine) -> largest absolute difference to torch over outputs, states and all gradients.
LARGEST: dict[tuple[str, str], float] = {}

# name -> (torch class, gatelab class, extra constructor arguments for both)
KINDS = {
    "RNN_tanh": (nn.RNN, gatelab.RNN, {"nonlinearity": "tanh"}),
    "RNN_relu": (nn.RNN, gatelab.RNN, {"nonlinearity": "relu"}),
    "LSTM": (nn.LSTM, gatelab.LSTM, {}),
    "LSTM_proj": (nn.LSTM, gatelab.LSTM, {"proj_size": P}),
    "GRU": (nn.GRU, gatelab.GRU, {}),
}


@pytest.fixture(scope="module", autouse=True)
def parity_summary(request):
    """At the end of the module, print and save the largest parity error per (layer, engine)."""
    yield
    if not LARGEST:
        return
    lines = [f"{kind:<10} {engine:<10} {err:.3e}" for (kind, engine), err in sorted(LARGEST.items())]
    with open(SUMMARY_FILE, "w") as f:
        json.dump({f"{k}/{e}": v for (k, e), v in sorted(LARGEST.items())}, f, indent=1)
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print("\nlargest layer parity error vs torch.nn (float64):\n" + "\n".join(lines))
    assert max(LARGEST.values()) < TOL


def _record(kind: str, engine: str, err: float) -> None:
    LARGEST[(kind, engine)] = max(LARGEST.get((kind, engine), 0.0), err)


def _diff(a: Tensor, b: Tensor, what: str) -> float:
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} vs torch {tuple(b.shape)}"
    err = (a - b).abs().max().item() if a.numel() else 0.0
    assert err < TOL, f"{what}: largest difference {err:.3e}"
    return err


def _states(hn) -> tuple[Tensor, ...]:
    return tuple(hn) if isinstance(hn, tuple) else (hn,)


def _pair(kind: str, engine: str, num_layers: int, bidirectional: bool, batch_first: bool, **extra):
    """A torch module and a gatelab layer (backend=engine) carrying the torch module's weights."""
    torch_cls, gl_cls, kw = KINDS[kind]
    kw = kw | extra
    ref = torch_cls(I, H, num_layers, batch_first=batch_first, bidirectional=bidirectional, dtype=F64, **kw)
    layer = gl_cls(I, H, num_layers, batch_first=batch_first, bidirectional=bidirectional, dtype=F64,
                   backend=engine, **kw)
    layer.load_state_dict(ref.state_dict())  # strict: torch's keys exactly
    assert layer.engine_name == engine
    return ref, layer


def _initial_state(kind: str, layers_dirs: int, batch: int | None, gen: torch.Generator) -> tuple[Tensor, ...]:
    lead = (layers_dirs,) if batch is None else (layers_dirs, batch)
    out = P if kind == "LSTM_proj" else H
    sizes = (out, H) if kind.startswith("LSTM") else (out,)
    return tuple(torch.randn(*lead, s, generator=gen, dtype=F64) for s in sizes)


def _as_hx(kind: str, leaves: tuple[Tensor, ...] | None):
    if leaves is None:
        return None
    return leaves if kind.startswith("LSTM") else leaves[0]


def _compare_grads(kind: str, ref: nn.Module, layer: nn.Module) -> float:
    """Every parameter gradient, looked up by torch's name on both; gatelab must have no others."""
    err = 0.0
    seen = set()
    for name, p_ref in ref.named_parameters():
        p = getattr(layer, name)
        seen.add(id(p))
        assert torch.equal(p.detach(), p_ref.detach()), f"{name}: weights differ after load_state_dict"
        assert p.grad is not None, f"{name}: no gradient"
        err = max(err, _diff(p.grad, p_ref.grad, f"grad {name}"))
    assert seen == {id(p) for p in layer.parameters()}, "gatelab has parameters torch does not"
    return err


@pytest.mark.parametrize("initial", ["zeros", "random"])
@pytest.mark.parametrize("form", ["padded", "packed"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["seq_first", "batch_first"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("num_layers", [1, 2, 3])
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("kind", list(KINDS))
def test_parity_with_torch(kind, engine, num_layers, bidirectional, batch_first, form, initial, gen):
    torch.manual_seed(0)
    ref, layer = _pair(kind, engine, num_layers, bidirectional, batch_first)
    batch = T if form == "packed" else B
    x = torch.randn(batch, T, I, generator=gen, dtype=F64) if batch_first else torch.randn(T, batch, I, generator=gen, dtype=F64)
    LD = num_layers * (2 if bidirectional else 1)
    h0 = _initial_state(kind, LD, batch, gen) if initial == "random" else None

    results = []
    for module in (layer, ref):
        xl = x.clone().requires_grad_()
        hl = None if h0 is None else tuple(h.clone().requires_grad_() for h in h0)
        inp = pack_padded_sequence(xl, LENGTHS, batch_first=batch_first, enforce_sorted=False) if form == "packed" else xl
        out, hn = module(inp, _as_hx(kind, hl))
        results.append((xl, hl, out, _states(hn)))
    (xg, hg, out_g, hn_g), (xt, ht, out_t, hn_t) = results

    err = 0.0
    if form == "packed":
        assert isinstance(out_g, PackedSequence)
        assert torch.equal(out_g.batch_sizes, out_t.batch_sizes)
        assert torch.equal(out_g.sorted_indices, out_t.sorted_indices)
        assert torch.equal(out_g.unsorted_indices, out_t.unsorted_indices)
        err = max(err, _diff(out_g.data, out_t.data, "packed output data"))
        pad_g, len_g = pad_packed_sequence(out_g, batch_first=batch_first)
        pad_t, len_t = pad_packed_sequence(out_t, batch_first=batch_first)
        assert torch.equal(len_g, len_t)
        err = max(err, _diff(pad_g, pad_t, "padded output"))
        out_g, out_t = out_g.data, out_t.data
    else:
        err = max(err, _diff(out_g, out_t, "output"))
    assert len(hn_g) == len(hn_t)
    for i, (a, b) in enumerate(zip(hn_g, hn_t)):
        err = max(err, _diff(a, b, f"final state {i}"))

    # One random linear functional of every output, so every gradient path is exercised.
    w_out = torch.randn(out_t.shape, generator=gen, dtype=F64)
    w_hn = [torch.randn(h.shape, generator=gen, dtype=F64) for h in hn_t]
    for out, hn in ((out_g, hn_g), (out_t, hn_t)):
        loss = (out * w_out).sum() + sum((h * w).sum() for h, w in zip(hn, w_hn))
        loss.backward()
    err = max(err, _diff(xg.grad, xt.grad, "input gradient"))
    if h0 is not None:
        for i, (a, b) in enumerate(zip(hg, ht)):
            err = max(err, _diff(a.grad, b.grad, f"initial state {i} gradient"))
    err = max(err, _compare_grads(kind, ref, layer))
    _record(kind, engine, err)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("kind", list(KINDS))
def test_parity_with_sorted_packed_sequence(kind, engine, gen):
    """enforce_sorted=True packs carry no sorted_indices; the output is packed the same way."""
    torch.manual_seed(0)
    ref, layer = _pair(kind, engine, 2, True, False)
    x = torch.randn(T, T, I, generator=gen, dtype=F64)
    packed = pack_padded_sequence(x, sorted(LENGTHS, reverse=True))
    (out_g, hn_g), (out_t, hn_t) = layer(packed), ref(packed)
    assert out_g.sorted_indices is None and out_g.unsorted_indices is None
    assert torch.equal(out_g.batch_sizes, out_t.batch_sizes)
    err = _diff(out_g.data, out_t.data, "packed output data")
    for a, b in zip(_states(hn_g), _states(hn_t)):
        err = max(err, _diff(a, b, "final state"))
    _record(kind, engine, err)


@pytest.mark.parametrize("initial", ["zeros", "random"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["seq_first", "batch_first"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("kind", list(KINDS))
def test_unbatched_parity_with_torch(kind, engine, bidirectional, batch_first, initial, gen):
    """Unbatched input (T, I) and state (L·D, H): torch's shapes back, torch's numbers."""
    torch.manual_seed(0)
    ref, layer = _pair(kind, engine, 2, bidirectional, batch_first)
    x = torch.randn(T, I, generator=gen, dtype=F64)
    h0 = _initial_state(kind, 2 * (2 if bidirectional else 1), None, gen) if initial == "random" else None
    results = []
    for module in (layer, ref):
        xl = x.clone().requires_grad_()
        out, hn = module(xl, _as_hx(kind, h0))
        results.append((xl, out, _states(hn)))
    (xg, out_g, hn_g), (xt, out_t, hn_t) = results
    err = _diff(out_g, out_t, "output")
    for i, (a, b) in enumerate(zip(hn_g, hn_t)):
        err = max(err, _diff(a, b, f"final state {i}"))
    (out_g.sum() + sum(h.sum() for h in hn_g)).backward()
    (out_t.sum() + sum(h.sum() for h in hn_t)).backward()
    err = max(err, _diff(xg.grad, xt.grad, "input gradient"))
    err = max(err, _compare_grads(kind, ref, layer))
    _record(kind, engine, err)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("kind", list(KINDS))
def test_parity_without_bias(kind, engine, gen):
    torch.manual_seed(0)
    ref, layer = _pair(kind, engine, 2, True, False, bias=False)
    assert layer.cells[0].bias_ih is None and not hasattr(ref, "bias_ih_l0")
    x = torch.randn(T, B, I, generator=gen, dtype=F64)
    (out_g, hn_g), (out_t, hn_t) = layer(x), ref(x)
    err = _diff(out_g, out_t, "output")
    for a, b in zip(_states(hn_g), _states(hn_t)):
        err = max(err, _diff(a, b, "final state"))
    _record(kind, engine, err)


@pytest.mark.parametrize("kind", list(KINDS))
def test_parity_in_eval_with_dropout_between_layers(kind, gen):
    """dropout acts between layers in training only: in eval both engines equal torch in eval."""
    torch.manual_seed(0)
    for engine in ENGINES:
        ref, layer = _pair(kind, engine, 3, True, False, dropout=0.5)
        ref.eval()
        layer.eval()
        x = torch.randn(T, B, I, generator=gen, dtype=F64)
        (out_g, _), (out_t, _) = layer(x), ref(x)
        _record(kind, engine, _diff(out_g, out_t, "eval output"))


@pytest.mark.parametrize("kind", list(KINDS))
def test_native_training_dropout_is_torchs(kind, gen):
    """The native engine calls torch's kernel with torch's dropout: same seed, same masks, same numbers."""
    torch.manual_seed(0)
    ref, layer = _pair(kind, "native", 3, False, False, dropout=0.5)
    x = torch.randn(T, B, I, generator=gen, dtype=F64)
    torch.manual_seed(7)
    out_g, _ = layer(x)
    torch.manual_seed(7)
    out_t, _ = ref(x)
    torch.manual_seed(8)
    out_other, _ = ref(x)
    assert not torch.allclose(out_t, out_other), "dropout between layers did nothing"
    _record(kind, "native", _diff(out_g, out_t, "training output with dropout"))


@pytest.mark.parametrize("spec", ["leaky_relu", "leaky_relu:0.2"])
def test_leaky_relu_derivative_is_exact_in_float64(spec):
    """The derivative hand-written backward passes use (the fused engine's) must be float64-exact, as
    autograd's is, or layer gradients drift from the reference engine's by ~1e-8. Regression: the slope
    was once built from Python scalars in float32 (0.2 -> 0.2000000030)."""
    act = gatelab.activations.get(spec)
    x = torch.tensor([-2.0, -0.5, 0.5, 2.0], dtype=F64, requires_grad=True)
    (auto,) = torch.autograd.grad(act(x).sum(), x)
    assert torch.equal(act.derivative(x.detach()), auto)


# -- layers against hand-written loops over their own cells -------------------------------------------


def _call_cell(cell: nn.Module, x: Tensor, state: tuple[Tensor, ...] | None) -> tuple[Tensor, tuple[Tensor, ...]]:
    """One step through the cell's public call, ``cell(x_t, state)``; returns (output, state tuple)."""
    if isinstance(cell, LSTMCell):
        new = cell(x, state)
        return new[0], tuple(new)
    if isinstance(cell, GatedStateCell):
        y, s = cell(x, None if state is None else state[0])
        return y, (s,)
    assert isinstance(cell, (ElmanCell, GRUCell))
    h = cell(x, None if state is None else state[0])
    return h, (h,)


def hand_loop(layer: nn.Module, x: Tensor, hx: tuple[Tensor, ...] | None = None) -> tuple[Tensor, tuple[Tensor, ...]]:
    """The stack written out: x (T, B, I) time-major, hx a tuple of (L·D, B, size) or None."""
    D = 2 if layer.bidirectional else 1
    steps = range(x.shape[0])
    finals = []
    for lay in range(layer.num_layers):
        outs = []
        for d in range(D):
            k = lay * D + d
            state = None if hx is None else tuple(h[k] for h in hx)
            ys: list[Tensor] = [x.new_empty(0)] * x.shape[0]
            for t in (reversed(steps) if d else steps):
                ys[t], state = _call_cell(layer.cells[k], x[t], state)
            outs.append(torch.stack(ys))
            finals.append(state)
        x = torch.cat(outs, -1)
    return x, tuple(torch.stack(s) for s in zip(*finals))


# name -> (layer class, options); every one runs on the reference engine under backend="auto".
CUSTOM = {
    "LSTM_hard_sigmoid_relu": (gatelab.LSTM, {"gate_activation": "hard_sigmoid", "candidate_activation": "relu"}),
    "LSTM_per_gate": (gatelab.LSTM, {"gate_activation": {"f": "elliott", "i": "hard_sigmoid:0.2"},
                                     "cell_activation": "softsign"}),
    "LSTM_proj_elliott": (gatelab.LSTM, {"gate_activation": "elliott", "proj_size": P}),
    "LSTM_peephole": (gatelab.LSTM, {"peephole": True}),
    "LSTM_peephole_previous": (gatelab.LSTM, {"peephole": True, "peephole_output": "previous"}),
    "LSTM_layer_norm": (gatelab.LSTM, {"layer_norm": True}),
    "LSTM_CIFG": (gatelab.LSTM, {"variant": "CIFG"}),
    "LSTM_FGR": (gatelab.LSTM, {"variant": "FGR"}),
    "LSTM_NOG": (gatelab.LSTM, {"variant": "NOG"}),
    "LSTM_adaptive_tanh": (gatelab.LSTM, {"candidate_activation": "adaptive_tanh"}),
    "GRU_r_elliott": (gatelab.GRU, {"gate_activation": {"r": "elliott"}}),
    "GRU_reset_before": (gatelab.GRU, {"reset_after": False, "candidate_activation": "softsign"}),
    "RNN_softsign": (gatelab.RNN, {"nonlinearity": "softsign"}),
    "RNN_elu_module": (gatelab.RNN, {"activation": nn.ELU(0.5)}),
    "GatedStateRNN": (gatelab.GatedStateRNN, {}),
    "GatedStateRNN_hard_sigmoid": (gatelab.GatedStateRNN, {"gate_activation": "hard_sigmoid", "candidate_activation": "elliott"}),
}


def _custom(name: str, engine: str = "reference", **kw) -> nn.Module:
    cls, options = CUSTOM[name]
    torch.manual_seed(0)
    layer = cls(I, H, 2, bidirectional=True, dtype=F64, backend=engine, **options, **kw)
    with torch.no_grad():  # move learnable activations and norms off their identity-like initial values
        for pname, p in layer.named_parameters():
            if pname.rsplit(".", 1)[-1] not in ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr"):
                p.add_(0.3 * torch.randn_like(p))
    assert layer.engine_name != "native"
    if engine != "auto":
        assert layer.engine_name == engine
    return layer


def _random_state(layer: nn.Module, batch: int, gen: torch.Generator) -> tuple[Tensor, ...]:
    LD = layer.num_layers * layer.num_directions
    return tuple(torch.randn(LD, batch, s, generator=gen, dtype=F64) for s in layer.cells[0].state_sizes())


@pytest.mark.parametrize("initial", ["zeros", "random"])
@pytest.mark.parametrize("engine", ["reference", "auto"])
@pytest.mark.parametrize("name", list(CUSTOM))
def test_custom_layer_equals_hand_loop(name, engine, initial, gen):
    """Outputs, final states and every gradient (parameters, input, initial state) equal the loop's.
    ``auto`` runs whichever engine gatelab picks for the configuration (never torch's)."""
    layer = _custom(name, engine)
    x = torch.randn(T, B, I, generator=gen, dtype=F64, requires_grad=True)
    h0 = _random_state(layer, B, gen) if initial == "random" else None
    if h0 is not None:
        h0 = tuple(h.requires_grad_() for h in h0)
    hx = None if h0 is None else (h0[0] if len(h0) == 1 else h0)
    out, hn = layer(x, hx)
    want_out, want_hn = hand_loop(layer, x, h0)
    torch.testing.assert_close(out, want_out, atol=TOL, rtol=0)
    assert len(_states(hn)) == len(want_hn)
    for got, want in zip(_states(hn), want_hn):
        torch.testing.assert_close(got, want, atol=TOL, rtol=0)

    leaves = [x, *(h0 or ()), *layer.parameters()]
    w_out = torch.randn(out.shape, generator=gen, dtype=F64)
    w_hn = [torch.randn(h.shape, generator=gen, dtype=F64) for h in want_hn]
    grads = [
        torch.autograd.grad((o * w_out).sum() + sum((h * w).sum() for h, w in zip(_states(s), w_hn)), leaves,
                            allow_unused=True)
        for o, s in ((out, hn), (want_out, want_hn))
    ]
    names = ["input", *(f"initial state {i}" for i in range(len(h0 or ()))), *(n for n, _ in layer.named_parameters())]
    for what, got, want in zip(names, *grads):
        assert want is not None, f"{what}: the hand loop does not reach it"
        assert got is not None, f"{what}: no gradient from the layer"
        torch.testing.assert_close(got, want, atol=TOL, rtol=0, msg=lambda m, what=what: f"grad {what}: {m}")


@pytest.mark.parametrize("name", ["LSTM_hard_sigmoid_relu", "LSTM_FGR", "GRU_r_elliott", "RNN_softsign", "GatedStateRNN"])
def test_custom_layer_batch_first_and_unbatched(name, gen):
    """batch_first and unbatched input only change the layout: the numbers are the time-major loop's."""
    layer = _custom(name)
    x = torch.randn(T, B, I, generator=gen, dtype=F64)
    want_out, want_hn = hand_loop(layer, x)
    layer_bf = _custom(name, batch_first=True)
    layer_bf.load_state_dict(layer.state_dict())
    layer = layer_bf
    out, hn = layer(x.transpose(0, 1))
    torch.testing.assert_close(out, want_out.transpose(0, 1), atol=TOL, rtol=0)
    for got, want in zip(_states(hn), want_hn):
        torch.testing.assert_close(got, want, atol=TOL, rtol=0)
    out1, hn1 = layer(x[:, 1])  # unbatched (T, I): batch_first does not apply
    torch.testing.assert_close(out1, want_out[:, 1], atol=TOL, rtol=0)
    for got, want in zip(_states(hn1), want_hn):
        torch.testing.assert_close(got, want[:, 1], atol=TOL, rtol=0)


@pytest.mark.parametrize("name", ["LSTM_per_gate", "LSTM_proj_elliott", "LSTM_FGR", "GRU_reset_before", "RNN_softsign",
                                  "GatedStateRNN"])
def test_custom_layer_with_lengths_equals_per_sequence_loop(name, gen):
    """Packed and ``lengths=`` input: sequence b is the hand loop over its first lengths[b] steps only
    (the reverse direction starts at its own last step), outputs beyond it are zero."""
    layer = _custom(name)
    x = torch.randn(T, T, I, generator=gen, dtype=F64)
    h0 = _random_state(layer, T, gen)
    hx = h0[0] if len(h0) == 1 else h0
    out, hn = layer(x, hx, lengths=torch.tensor(LENGTHS))
    packed_out, packed_hn = layer(pack_padded_sequence(x, LENGTHS, enforce_sorted=False), hx)
    padded, _ = pad_packed_sequence(packed_out, total_length=T)
    torch.testing.assert_close(padded, out, atol=TOL, rtol=0)
    for a, b in zip(_states(hn), _states(packed_hn)):
        torch.testing.assert_close(a, b, atol=TOL, rtol=0)
    for b, n in enumerate(LENGTHS):
        want_out, want_hn = hand_loop(layer, x[:n, b:b + 1], tuple(h[:, b:b + 1] for h in h0))
        torch.testing.assert_close(out[:n, b:b + 1], want_out, atol=TOL, rtol=0)
        assert torch.all(out[n:, b] == 0), f"sequence {b}: output after its length {n} is not zero"
        for got, want in zip(_states(hn), want_hn):
            torch.testing.assert_close(got[:, b:b + 1], want, atol=TOL, rtol=0)


@pytest.mark.parametrize("name", ["LSTM_per_gate", "LSTM_FGR", "GRU_r_elliott", "RNN_softsign", "GatedStateRNN"])
def test_custom_layer_gradcheck(name):
    """The reference engine's gradients are autograd's through the loop: finite differences agree."""
    layer = _custom(name)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 2, I, generator=gen, dtype=F64, requires_grad=True)
    h0 = tuple(h.requires_grad_() for h in _random_state(layer, 2, gen))

    def run(x, *h):
        out, hn = layer(x, h[0] if len(h) == 1 else h)
        return (out, *_states(hn))

    assert torch.autograd.gradcheck(run, (x, *h0), eps=1e-6, atol=1e-7)


def test_hand_loop_detects_a_wrong_weight(gen):
    """The oracle itself can tell: change one weight of one reverse cell and the layer no longer matches."""
    layer = _custom("GRU_r_elliott")
    x = torch.randn(T, B, I, generator=gen, dtype=F64)
    out, _ = layer(x)
    with torch.no_grad():
        layer.weight_hh_l1_reverse[0, 0] += 1e-3
    want, _ = hand_loop(layer, x)
    assert (out - want).abs().max() > 1e-7

