"""The fused engine against the reference engine, its own gradcheck, and its C++/PyTorch twins."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import gatelab
from gatelab.activations import available
from gatelab.engines import fused
from gatelab.engines.fused import cpp, ops
from gatelab.engines.fused.function import FusedDirection, PyLoop
from gatelab.engines.fused.steps import STEPS

LAYERS = {"LSTM": gatelab.LSTM, "GRU": gatelab.GRU, "RNN": gatelab.RNN, "GatedStateRNN": gatelab.GatedStateRNN}
SLOTS = {
    "LSTM": ("gate_activation", "candidate_activation", "cell_activation"),
    "GRU": ("gate_activation", "candidate_activation"),
    "RNN": ("activation",),
    "GatedStateRNN": ("gate_activation", "candidate_activation"),
}
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def run_pair(layer_cls, options: dict, dtype=torch.float64, *, packed=True, seed=0, T=5, B=3, I=3, H=4,
             engines=("reference", "fused"), strict=True):
    """Run the same layer on two engines with the same weights, masks and inputs; return both results."""
    torch.manual_seed(seed)
    first = layer_cls(I, H, backend=engines[0], dtype=dtype, **options)
    second = layer_cls(I, H, backend=engines[1], dtype=dtype, strict=strict, **options)
    second.load_state_dict(first.state_dict())
    x = torch.randn(T, B, I, dtype=dtype)
    lengths = torch.tensor([T, 2, 1][:B] + [T] * max(0, B - 3))
    results = []
    for layer in (first, second):
        xg = x.clone().requires_grad_(True)
        inp = pack_padded_sequence(xg, lengths, enforce_sorted=False) if packed else xg
        torch.manual_seed(seed + 1)  # same dropout masks on both engines
        out, state = layer(inp)
        out = out.data if packed else out
        state = state if isinstance(state, tuple) else (state,)
        g = torch.Generator().manual_seed(3)
        loss = (out * torch.randn(out.shape, generator=g, dtype=dtype)).sum()
        loss = loss + sum((s * torch.randn(s.shape, generator=g, dtype=dtype)).sum() for s in state)
        names, params = zip(*layer.named_parameters())
        grads = torch.autograd.grad(loss, [xg, *params])
        results.append({"out": out, "state": state, "grads": dict(zip(("input", *names), grads)), "layer": layer})
    return results


def max_error(a, b) -> float:
    """Largest difference over outputs, states and every gradient, each relative to its tensor's
    scale when that exceeds 1 (unbounded activations in gate slots give large values)."""
    def rel(x, y):
        return ((x - y).abs().max() / x.abs().max().clamp(min=1.0)).item()

    errs = [rel(a["out"], b["out"])]
    errs += [rel(x, y) for x, y in zip(a["state"], b["state"])]
    assert a["grads"].keys() == b["grads"].keys()
    errs += [rel(a["grads"][k], b["grads"][k]) for k in a["grads"]]
    return max(errs)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("layer", list(LAYERS))
@pytest.mark.parametrize("activation", available())
def test_every_activation_in_every_slot(layer, activation, dtype):
    for slot in SLOTS[layer]:
        ref, fus = run_pair(LAYERS[layer], {slot: activation, "bidirectional": True}, dtype)
        assert fus["layer"].engine_name == "fused"
        err = max_error(ref, fus)
        assert err < TOL[dtype], (layer, slot, activation, err)


def test_per_gate_mapping_and_learnable_parameters_get_gradients():
    opts = {"gate_activation": {"i": "prelu", "f": "adaptive_sigmoid", "o": "elliott"}, "candidate_activation": "adaptive_tanh"}
    ref, fus = run_pair(gatelab.LSTM, opts)
    assert max_error(ref, fus) < 1e-10
    for name in ("sigma_i_weight_l0", "sigma_f_weight_l0", "phi_weight_l0"):
        assert fus["grads"][name].abs().sum() > 0


LAYER_OPTIONS = [
    ("LSTM", {"num_layers": 2, "bidirectional": True, "gate_activation": "hard_sigmoid"}),
    ("LSTM", {"num_layers": 2, "batch_first": True, "candidate_activation": "relu"}),
    ("LSTM", {"proj_size": 2, "num_layers": 2, "bidirectional": True, "gate_activation": "hard_sigmoid"}),
    ("LSTM", {"peephole": True, "gate_activation": "elliott"}),
    ("LSTM", {"peephole": True, "peephole_output": "previous", "cell_activation": "softsign"}),
    ("LSTM", {"variant": "CIFG", "gate_activation": "hard_sigmoid"}),
    ("LSTM", {"variant": "NIG"}),
    ("LSTM", {"variant": "NFG"}),
    ("LSTM", {"variant": "NOG"}),
    ("LSTM", {"variant": "NIAF"}),
    ("LSTM", {"variant": "NOAF"}),
    ("LSTM", {"variant": "NP", "gate_activation": "hard_sigmoid"}),
    ("LSTM", {"bias": False, "gate_activation": "hard_sigmoid"}),
    ("LSTM", {"num_layers": 2, "recurrent_dropout": 0.3, "input_dropout": 0.2, "gate_activation": "hard_sigmoid"}),
    ("LSTM", {"weight_dropout": 0.4, "gate_activation": "hard_sigmoid"}),
    ("LSTM", {"num_layers": 3, "dropout": 0.3, "residual": True, "gate_activation": "hard_sigmoid"}),
    ("GRU", {"num_layers": 2, "bidirectional": True, "gate_activation": "hard_sigmoid"}),
    ("GRU", {"reset_after": False, "candidate_activation": "relu"}),
    ("GRU", {"reset_after": False, "weight_dropout": 0.3, "recurrent_dropout": 0.3}),
    ("GRU", {"recurrent_dropout": 0.5, "candidate_activation": "relu", "bidirectional": True}),
    ("RNN", {"nonlinearity": "relu", "num_layers": 2, "bidirectional": True, "recurrent_dropout": 0.2}),
    ("RNN", {"activation": "leaky_relu:0.2", "residual": True, "num_layers": 2}),
    ("GatedStateRNN", {"num_layers": 2, "bidirectional": True, "recurrent_dropout": 0.25}),
    # zoneout (training: 0/1 masks drawn by the layer, the same on both engines)
    ("LSTM", {"zoneout": (0.3, 0.6), "num_layers": 2, "bidirectional": True, "gate_activation": "hard_sigmoid"}),
    ("LSTM", {"zoneout": (0.0, 0.5), "recurrent_dropout": 0.3, "cell_activation": "relu"}),
    ("LSTM", {"zoneout": (0.4, 0.0), "candidate_activation": "gelu"}),
    ("LSTM", {"zoneout": 0.4, "peephole": True}),
    ("LSTM", {"zoneout": 0.3, "proj_size": 2, "bidirectional": True}),
    ("GRU", {"zoneout": 0.3, "num_layers": 2, "bidirectional": True, "gate_activation": "hard_sigmoid"}),
    ("GRU", {"zoneout": 0.4, "reset_after": False}),
    ("RNN", {"zoneout": 0.3, "nonlinearity": "relu", "bidirectional": True, "recurrent_dropout": 0.2}),
    ("RNN", {"zoneout": 0.5, "activation": "elu"}),
    ("GatedStateRNN", {"zoneout": 0.3, "num_layers": 2, "bidirectional": True}),
    # layer-norm LSTM (C++ loop; the input-side norm under autograd)
    ("LSTM", {"layer_norm": True, "num_layers": 2, "bidirectional": True}),
    ("LSTM", {"layer_norm": True, "gate_activation": "hard_sigmoid", "recurrent_dropout": 0.3}),
    ("LSTM", {"layer_norm": True, "bias": False, "cell_activation": "gelu"}),
    ("LSTM", {"layer_norm": True, "weight_dropout": 0.3, "candidate_activation": "relu", "batch_first": True}),
    ("LSTM", {"layer_norm": True, "zoneout": (0.2, 0.5), "bidirectional": True}),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize(("layer", "options"), LAYER_OPTIONS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(LAYER_OPTIONS)])
def test_layer_options(layer, options, packed, dtype):
    ref, fus = run_pair(LAYERS[layer], options, dtype, packed=packed)
    assert fus["layer"].engine_name == "fused"
    err = max_error(ref, fus)
    # LayerNorm over rows of 4 and 16 values divides by small standard deviations: in float32 both
    # engines sit 1e-6 to 4e-5 from the float64 result (measured), so they may differ by that much.
    tol = 1e-4 if options.get("layer_norm") and dtype == torch.float32 else TOL[dtype]
    assert err < tol, err


def test_unbatched_input_and_initial_state():
    torch.manual_seed(0)
    ref = gatelab.LSTM(3, 4, num_layers=2, backend="reference", gate_activation="hard_sigmoid", dtype=torch.float64)
    fus = gatelab.LSTM(3, 4, num_layers=2, backend="fused", strict=True, gate_activation="hard_sigmoid", dtype=torch.float64)
    fus.load_state_dict(ref.state_dict())
    x = torch.randn(6, 3, dtype=torch.float64)
    h0, c0 = torch.randn(2, 4, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    (o1, (h1, c1)), (o2, (h2, c2)) = ref(x, (h0, c0)), fus(x, (h0, c0))
    torch.testing.assert_close(o1, o2, rtol=0, atol=1e-12)
    torch.testing.assert_close(h1, h2, rtol=0, atol=1e-12)
    torch.testing.assert_close(c1, c2, rtol=0, atol=1e-12)


# -- the C++ loop and its pure-PyTorch twin --------------------------------------------------------

CPP_CASES = [
    (gatelab.LSTMCell, {"gate_activation": {"i": "hard_sigmoid", "f": "sigmoid", "o": "elliott"},
                        "candidate_activation": "relu"}),
    (gatelab.LSTMCell, {"cell_activation": "gelu", "candidate_activation": "silu"}),
    (gatelab.GRUCell, {"gate_activation": "hard_sigmoid:0.2", "candidate_activation": "elu:0.5"}),
    (gatelab.ElmanCell, {"activation": "softplus"}),
    (gatelab.GatedStateCell, {"gate_activation": "hardtanh", "candidate_activation": "selu"}),
    (gatelab.LSTMCell, {"peephole": True, "gate_activation": {"i": "gelu", "f": "sigmoid", "o": "hard_sigmoid"}}),
    (gatelab.LSTMCell, {"peephole": True, "peephole_output": "previous", "cell_activation": "softsign"}),
]


def _direction_inputs(cell, T=4, B=3, seed=0, lengths=True, mask=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, B, cell.input_size, generator=g, dtype=torch.float64, requires_grad=True)
    state = tuple(torch.randn(B, s, generator=g, dtype=torch.float64, requires_grad=True) for s in cell.state_sizes())
    lens = torch.tensor([T, 2, 1][:B]) if lengths else None
    rec_mask = (torch.rand(B, cell.recurrent_size, generator=g, dtype=torch.float64) > 0.3).double() / 0.7 if mask else None
    return x, state, lens, rec_mask


def _zoneout_masks(cell, which: str, T=4, B=3, seed=5):
    """Keep shares per state tensor: "train" 0/1 draws, "eval" constant rates, "c" only the LSTM's c,
    "" none."""
    if not which:
        return None
    g = torch.Generator().manual_seed(seed)
    if which == "eval":
        return tuple(torch.full((T, B, s), p, dtype=torch.float64) for s, p in zip(cell.state_sizes(), (0.3, 0.6)))
    draws = tuple((torch.rand(T, B, s, generator=g, dtype=torch.float64) < 0.4).double() for s in cell.state_sizes())
    return (None, draws[1]) if which == "c" else draws


ZONEOUT_CASES = ([(c, o, z) for c, o in CPP_CASES for z in ("train", "eval")]
                 + [(gatelab.LSTMCell, CPP_CASES[0][1], "c")])


@pytest.mark.skipif(not cpp.load(), reason="C++ kernels unavailable (no compiler)")
@pytest.mark.parametrize(("cell_cls", "options", "zoneout"), [(c, o, "") for c, o in CPP_CASES] + ZONEOUT_CASES)
@pytest.mark.parametrize("reverse", [False, True])
def test_cpp_loop_equals_pytorch_loop(cell_cls, options, zoneout, reverse):
    torch.manual_seed(0)
    cell = cell_cls(3, 4, dtype=torch.float64, **options)
    assert cpp.cell_blockers(cell) == []
    x, state, lens, mask = _direction_inputs(cell)
    masks = _zoneout_masks(cell, zoneout)
    step = STEPS[type(cell)](cell)  # its extra parameters: the peepholes
    results = []
    for use_cpp in (False, True):
        if use_cpp:  # the operators (torch.ops.gatelab.*)
            out, final = ops.run(cell, x, state, lens, reverse, mask, cell.weight_hh, masks or None)
        else:
            loop = PyLoop(step, masks) if masks else PyLoop(step)
            out, *final = FusedDirection.apply(loop, reverse, lens, mask, x, cell.weight_ih, cell.weight_hh,
                                               cell.bias_ih, cell.bias_hh, *state, *step.extra_params())
        loss = (out * out.detach().sin()).sum() + sum((f * f.detach().cos()).sum() for f in final)
        params = [x, *state, cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh, *step.extra_params()]
        results.append((out, final, torch.autograd.grad(loss, params)))
    (o1, f1, g1), (o2, f2, g2) = results
    torch.testing.assert_close(o1, o2, rtol=0, atol=1e-12)
    for a, b in zip(f1, f2):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-11)


PY_ONLY_CASES = [
    (gatelab.LSTMCell, {"peephole": True, "proj_size": 2, "gate_activation": {"i": "prelu"}}),
    (gatelab.LSTMCell, {"variant": "CIFG", "peephole_output": "previous"}),
    (gatelab.LSTMCell, {"variant": "NOG", "candidate_activation": "adaptive_tanh"}),
    (gatelab.GRUCell, {"reset_after": False, "gate_activation": "adaptive_sigmoid"}),
]
GRADCHECK_CASES = ([(c, o, False, "") for c, o in CPP_CASES + PY_ONLY_CASES] + [(c, o, True, "") for c, o in CPP_CASES]
                   + [(c, o, cpp_, z) for c, o, z in ZONEOUT_CASES if z != "eval" for cpp_ in (False, True)]
                   + [(gatelab.LSTMCell, PY_ONLY_CASES[0][1], False, "train"),
                      (gatelab.GRUCell, PY_ONLY_CASES[3][1], False, "train")])


@pytest.mark.parametrize(("cell_cls", "options", "use_cpp", "zoneout"), GRADCHECK_CASES)
def test_gradcheck_fused_direction(cell_cls, options, use_cpp, zoneout):
    torch.manual_seed(0)
    cell = cell_cls(2, 3, dtype=torch.float64, **options)
    step = STEPS[type(cell)](cell)
    if use_cpp:
        assert cpp.cell_blockers(cell) == [] and cpp.load(strict=True)
    else:
        assert any(p is cell.weight_hh for p in [step.W_hh])
    x, state, lens, mask = _direction_inputs(cell, T=3, B=3)
    masks = _zoneout_masks(cell, zoneout, T=3, B=3)

    def fn(x, W_ih, W_hh, b_ih, b_hh, *rest):
        if use_cpp:  # the operators, with the weights gradcheck perturbs bound to the cell
            with cell.using({"weight_ih": W_ih, "weight_hh": W_hh, "bias_ih": b_ih, "bias_hh": b_hh}):
                out, final = ops.run(cell, x, tuple(rest[:len(cell.state_sizes())]), lens, True, mask, W_hh,
                                     masks or None)
            return (out, *final)
        loop = PyLoop(step, masks) if masks else PyLoop(step)
        return FusedDirection.apply(loop, True, lens, mask, x, W_ih, W_hh, b_ih, b_hh, *rest)

    # The cell's own parameters (not copies): the step reads peepholes and activation weights from
    # the cell, and gradcheck perturbs its inputs in place.
    inputs = (x, cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh, *state, *step.extra_params())
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7)


# -- dispatch, fallback and errors ------------------------------------------------------------------


def test_auto_picks_native_fused_and_reference():
    assert gatelab.LSTM(3, 4).engine_name == "native"
    assert gatelab.LSTM(3, 4, gate_activation="hard_sigmoid").engine_name == "fused"
    assert gatelab.LSTM(3, 4, layer_norm=True).engine_name == "fused"
    assert gatelab.LSTM(3, 4, layer_norm=True, zoneout=0.1).engine_name == "fused"
    for layer in (gatelab.LSTM(3, 4, variant="FGR"), gatelab.LSTM(3, 4, layer_norm=True, peephole=True)):
        assert layer.engine_name == "reference"
        assert "FGR" in layer.explain() or "layer_norm" in layer.explain()
    assert "zoneout" in gatelab.GRU(3, 4, zoneout=0.1).explain()


def test_explain_names_the_loop():
    text = gatelab.LSTM(3, 4, gate_activation="hard_sigmoid", proj_size=2).explain()
    assert "fused" in text and "proj_size" in text and "pure-PyTorch" in text


def test_fused_backend_strict_raises_for_unfusable_option():
    with pytest.raises(ValueError, match="layer_norm"):
        gatelab.LSTM(3, 4, layer_norm=True, peephole=True, backend="fused", strict=True)
    with pytest.warns(UserWarning, match="falling back to 'reference'"):
        layer = gatelab.LSTM(3, 4, variant="FGR", backend="fused")
    assert layer.engine_name == "reference"


def _perturbed(layer):
    """Move every parameter off its initial value (LayerNorm gains start at 1 and biases at 0, where
    a kernel that ignored them would still agree)."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return layer


@pytest.mark.parametrize("zoneout", [0.0, (0.3, 0.5)])
@pytest.mark.parametrize("training", [True, False])
def test_layer_norm_lstm_with_moved_gains_equals_reference(training, zoneout):
    torch.manual_seed(0)
    D = torch.float64
    kw = {"layer_norm": True, "zoneout": zoneout, "bidirectional": True, "dtype": D}
    ref = _perturbed(gatelab.LSTM(3, 5, 2, backend="reference", **kw))
    fus = gatelab.LSTM(3, 5, 2, backend="fused", strict=True, **kw)
    fus.load_state_dict(ref.state_dict())
    ref.train(training), fus.train(training)
    assert fus.engine_name == "fused" and "layer-norm" in fus.explain()
    x = torch.randn(6, 4, 3, dtype=D, requires_grad=True)
    lengths = torch.tensor([6, 2, 5, 1])
    results = []
    for layer in (ref, fus):
        torch.manual_seed(1)  # the same zoneout draws
        out, (h, c) = layer(pack_padded_sequence(x, lengths, enforce_sorted=False))
        loss = (out.data * out.data.detach().sin()).sum() + (h * 1.7).sum() + (c * c.detach().cos()).sum()
        results.append([out.data, h, c, *torch.autograd.grad(loss, [x, *layer.parameters()])])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert {"ln_ih_weight_l0", "ln_c_bias_l1_reverse"} <= {n for n, _ in fus.named_parameters()}


@pytest.mark.parametrize("zoneout", [0.0, (0.3, 0.5)])
def test_gradcheck_layer_norm_lstm_fused(zoneout):
    torch.manual_seed(0)
    layer = _perturbed(gatelab.LSTM(2, 3, layer_norm=True, backend="fused", strict=True, dtype=torch.float64,
                                    gate_activation="hard_sigmoid", zoneout=zoneout))
    names, params = zip(*layer.named_parameters())
    x = torch.randn(4, 2, 2, dtype=torch.float64, requires_grad=True)

    def fn(x, *ps):
        torch.manual_seed(1)  # a fixed function: the same zoneout draws at every evaluation
        out, (h, c) = torch.func.functional_call(layer, dict(zip(names, ps)), (x,))
        return out, c

    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-7)


def test_layer_norm_lstm_runs_the_reference_loop_without_cpp(monkeypatch):
    monkeypatch.setattr(cpp, "_state", {"loaded": False, "error": "disabled for this test"})
    layer = gatelab.LSTM(3, 4, layer_norm=True, backend="fused", dtype=torch.float64)
    assert "layer_norm on the reference loop" in layer.explain()
    ref, fus = run_pair(gatelab.LSTM, {"layer_norm": True}, strict=False)
    assert max_error(ref, fus) < 1e-12


def test_failed_compile_warns_once_and_falls_back(monkeypatch):
    monkeypatch.setattr(cpp, "_state", {"loaded": False, "error": None})

    def broken(src, out):
        raise RuntimeError("simulated compiler failure")

    monkeypatch.setattr(cpp, "_build", broken)
    monkeypatch.setattr(cpp, "cache_dir", lambda: __import__("pathlib").Path("/nonexistent-gatelab-cache"))
    monkeypatch.setattr(cpp.Path, "exists", lambda self: False)
    with pytest.warns(RuntimeWarning, match="simulated compiler failure"):
        assert cpp.load() is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cpp.load() is False  # warned once only
    with pytest.raises(RuntimeError, match="simulated compiler failure"):
        cpp.load(strict=True)
    assert fused.implementation() == "PyTorch"


def test_pure_pytorch_loop_used_when_cpp_unavailable(monkeypatch):
    monkeypatch.setattr(cpp, "_state", {"loaded": False, "error": "disabled for this test"})
    ref, fus = run_pair(gatelab.GRU, {"gate_activation": "hard_sigmoid"}, strict=False)
    assert max_error(ref, fus) < 1e-10


def test_importing_gatelab_does_not_compile():
    import subprocess
    import sys

    code = "import gatelab, gatelab.engines.fused.cpp as c; assert not c._state['loaded'] and c._state['error'] is None"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(("layer", "options"), [
    ("LSTM", {"gate_activation": "hard_sigmoid", "bidirectional": True, "num_layers": 2}),
    ("LSTM", {"candidate_activation": "gelu"}),
    ("GRU", {"gate_activation": "elliott", "bidirectional": True}),
    ("RNN", {"activation": "softsign", "bidirectional": True}),
    ("GatedStateRNN", {"bidirectional": True}),
    ("LSTM", {"peephole": True}),
    ("LSTM", {"zoneout": (0.3, 0.6), "bidirectional": True}),  # eval: the expectation p·old + (1 − p)·new
    ("LSTM", {"zoneout": 0.2, "peephole": True}),
    ("GRU", {"zoneout": 0.3, "bidirectional": True}),
    ("RNN", {"zoneout": 0.3, "activation": "softsign"}),
    ("GatedStateRNN", {"zoneout": 0.4}),
    ("LSTM", {"layer_norm": True, "bidirectional": True, "gate_activation": "hard_sigmoid"}),
])
@pytest.mark.parametrize("packed", [True, False])
def test_inference_path_without_autograd_equals_reference(layer, options, packed):
    torch.manual_seed(0)
    ref = LAYERS[layer](3, 4, backend="reference", dtype=torch.float64, **options)
    fus = LAYERS[layer](3, 4, backend="fused", strict=True, dtype=torch.float64, **options)
    fus.load_state_dict(ref.state_dict())
    if "zoneout" in options:
        ref.eval(), fus.eval()
        assert fus.engine_name == "fused"
    x = torch.randn(6, 3, 3, dtype=torch.float64)
    inp = pack_padded_sequence(x, torch.tensor([6, 2, 4]), enforce_sorted=False) if packed else x
    with torch.no_grad():
        (o1, s1), (o2, s2) = ref(inp), fus(inp)
    o1, o2 = (o1.data, o2.data) if packed else (o1, o2)
    assert o2.grad_fn is None
    torch.testing.assert_close(o1, o2, rtol=0, atol=1e-12)
    for a, b in zip(s1 if isinstance(s1, tuple) else (s1,), s2 if isinstance(s2, tuple) else (s2,)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_building_a_layer_does_not_compile(monkeypatch):
    monkeypatch.setattr(cpp, "_state", {"loaded": False, "error": None})
    monkeypatch.setattr(cpp, "load", lambda strict=False: pytest.fail("constructing a layer must not build the kernels"))
    layer = gatelab.LSTM(3, 4, gate_activation="hard_sigmoid")
    assert layer.engine_name == "fused"
    assert "compiled at first use" in layer.explain()


def test_loading_the_kernels_keeps_subnormal_numbers():
    """The C++ build must not switch the process to flush-to-zero (as -ffast-math's crtfastmath does)."""
    assert cpp.load(strict=True)
    tiny = torch.tensor(1e-310, dtype=torch.float64)
    assert (tiny * 1).item() != 0.0


def test_layer_norm_gain_gradients_do_not_read_dead_steps():
    """Dead (padded) steps of a packed batch save no statistics; the gain gradients must not pick up
    whatever memory held before. Poison freed blocks of the buffers' size with NaN first."""
    torch.manual_seed(0)
    T, B, H = 6, 4, 5
    D = torch.float64
    fus = _perturbed(gatelab.LSTM(3, H, layer_norm=True, backend="fused", strict=True, dtype=D))
    x = torch.randn(T, B, 3, dtype=D)
    lengths = torch.tensor([6, 1, 2, 1])
    for _ in range(5):
        poison = [torch.full((size,), float("nan"), dtype=D) for size in [T * B * 4 * H] * 6 + [T * B * H] * 12]
        del poison
        out, (h, c) = fus(pack_padded_sequence(x, lengths, enforce_sorted=False))
        grads = torch.autograd.grad(out.data.sum() + c.sum(), list(fus.parameters()))
        assert all(torch.isfinite(g).all() for g in grads)


def test_layer_norm_lstm_on_another_device_runs_the_reference_loop_even_when_strict(monkeypatch):
    """The C++ loop is CPU-only; a layer-norm LSTM whose parameters moved (simulated here) runs the
    reference loop, as the engine choice promised, instead of raising under strict=True."""
    original = cpp.cell_blockers
    monkeypatch.setattr(cpp, "cell_blockers",
                        lambda cell: original(cell) + ["the C++ loop runs on the CPU, parameters are on cuda:0"])
    ref, fus = run_pair(gatelab.LSTM, {"layer_norm": True, "bidirectional": True})
    assert fus["layer"].engine_name == "fused" and "reference loop" in fus["layer"].explain()
    assert max_error(ref, fus) < 1e-12


# -- the per-step products: BLAS or oneDNN ---------------------------------------------------------------

def kernel_built() -> bool:
    """Whether gatelab's AVX-512 per-step kernel is in this build (the library is built per CPU)."""
    if not cpp.load():
        return False
    try:
        previous = torch.ops.gatelab_fused.set_gemm_library(3)
    except RuntimeError:
        return False
    torch.ops.gatelab_fused.set_gemm_library(previous)
    return True


@pytest.fixture
def gemm_library():
    """Force the C++ loops' per-step products onto one library for a test (0 auto, 1 BLAS, 2 oneDNN,
    3 gatelab's AVX-512 kernel: skipped where the build has none)."""
    if not cpp.load():
        pytest.skip("C++ kernels unavailable (no compiler)")
    previous = []

    def use(choice: int) -> None:
        if choice == 3 and not kernel_built():
            pytest.skip("this CPU has no AVX-512: the library is built without gatelab's kernel")
        previous.append(torch.ops.gatelab_fused.set_gemm_library(choice))

    yield use
    if previous:
        torch.ops.gatelab_fused.set_gemm_library(previous[0])


@pytest.mark.parametrize("library", [1, 2, 3], ids=["BLAS", "oneDNN", "kernel"])
@pytest.mark.parametrize(("cell_cls", "options"), CPP_CASES[:4] + [(gatelab.LSTMCell, {"layer_norm": True})])
def test_cpp_loop_on_each_gemm_library_equals_the_pytorch_loop_in_float32(gemm_library, library, cell_cls, options):
    """Each library runs the forward product (with the accumulate into xw) and the backward's product
    with W_hh (plain and under a recurrent mask); float32 to 1e-5 relative to scale."""
    gemm_library(library)
    torch.manual_seed(0)
    layer_cls = {gatelab.LSTMCell: gatelab.LSTM, gatelab.GRUCell: gatelab.GRU, gatelab.ElmanCell: gatelab.RNN,
                 gatelab.GatedStateCell: gatelab.GatedStateRNN}[cell_cls]
    ref, fus = run_pair(layer_cls, {**options, "recurrent_dropout": 0.3, "bidirectional": True}, torch.float32,
                        H=24, engines=("reference", "fused"))
    assert "C++ loop" in fus["layer"].explain()
    assert max_error(ref, fus) < 1e-5


def test_gemm_library_is_chosen_by_size_and_cpu(gemm_library):
    ops = torch.ops.gatelab_fused
    gemm_library(0)
    small, large = ops.gemm_library(32, 256, 64), ops.gemm_library(32, 2048, 512)
    assert small == "BLAS"  # below 2^22 multiply-adds the BLAS call's lower overhead wins
    info = Path("/proc/cpuinfo")
    amd = info.exists() and "AuthenticAMD" in info.read_text()
    assert large == ("oneDNN" if amd else "BLAS")
    assert ops.gemm_library(32, 256, 64, False, "lstm") == ("AVX-512 kernel" if kernel_built() else "BLAS")
    gemm_library(2)
    assert ops.gemm_library(32, 256, 64) == "oneDNN"
    assert ops.gemm_library(32, 256, 64, False, "lstm") == "oneDNN"
    gemm_library(1)
    assert ops.gemm_library(32, 2048, 512) == "BLAS"
    gemm_library(4)  # the choice before gatelab's kernel
    assert ops.gemm_library(32, 256, 64, False, "lstm") == "BLAS"
    with pytest.raises(RuntimeError, match=r"gemm library 0 \(auto\), .* or 4 \(BLAS/oneDNN by size\), got 7"):
        ops.set_gemm_library(7)


LSTM_ACTS = {"gate_activation": "hard_sigmoid", "candidate_activation": "elu", "cell_activation": "softsign"}
KERNEL_CASES = [
    (gatelab.LSTM, LSTM_ACTS, None), (gatelab.LSTM, {**LSTM_ACTS, "peephole": True}, "lengths"),
    (gatelab.LSTM, {**LSTM_ACTS, "peephole": True, "peephole_output": "previous"}, None),
    (gatelab.LSTM, {**LSTM_ACTS, "bidirectional": True, "num_layers": 2}, "lengths"),
    (gatelab.LSTM, {**LSTM_ACTS, "recurrent_dropout": 0.3}, "lengths"), (gatelab.LSTM, {**LSTM_ACTS, "zoneout": 0.2}, None),
    (gatelab.LSTM, {**LSTM_ACTS, "zoneout": 0.2, "recurrent_dropout": 0.2}, "lengths"),
    (gatelab.GRU, {"gate_activation": "hard_sigmoid", "candidate_activation": "silu"}, None),
    (gatelab.GRU, {"recurrent_dropout": 0.3, "zoneout": 0.2, "bidirectional": True}, "lengths"),
    (gatelab.RNN, {"nonlinearity": "gelu"}, None),
    (gatelab.RNN, {"nonlinearity": "relu", "recurrent_dropout": 0.3, "zoneout": 0.2}, "lengths"),
    (gatelab.GatedStateRNN, {"gate_activation": "elliott"}, None),
    (gatelab.GatedStateRNN, {"recurrent_dropout": 0.3, "zoneout": 0.2, "bidirectional": True}, "lengths"),
]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("H", [1, 17, 40, 70])
@pytest.mark.parametrize(("layer_cls", "options", "lengths"), KERNEL_CASES,
                         ids=[f"{c.__name__}-{i}" for i, (c, _, _) in enumerate(KERNEL_CASES)])
def test_kernel_loops_equal_the_blas_loops(gemm_library, threads, H, layer_cls, options, lengths):
    """gatelab's AVX-512 loops (their own packed product, units split among the workers, one barrier per
    step) against the same C++ loops on the BLAS: outputs, states and every gradient, float32, for unit
    counts that leave short blocks (16 units forward, 32 backward), batches that leave short row tiles,
    one and two workers, padding, peepholes, recurrent masks and zoneout; training and no-grad mode (which
    reuses one per-step buffer and two recurrent-input slots). B = 29 gives full row tiles and a short one
    for every tile height (6, 8, 12)."""
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        results = []
        for library in (1, 3):
            gemm_library(library)
            torch.manual_seed(0)
            layer = layer_cls(5, H, backend="fused", strict=True, **options)
            x = torch.randn(9, 29, 5, requires_grad=True)
            lens = torch.tensor([9, 4, 9, 1, 6, 9, 2] * 4 + [3]) if lengths else None
            with torch.no_grad():
                plain = layer(x, lengths=lens)[0]
            out, state = layer(x, lengths=lens)
            states = list(state) if isinstance(state, tuple) else [state]
            loss = (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum() + sum(s.sin().sum() for s in states)
            results.append([plain, out, *states, *torch.autograd.grad(loss, [x, *layer.parameters()])])
        for a, b in zip(*results):
            torch.testing.assert_close(b, a, rtol=0, atol=2e-6 * max(1.0, a.abs().max().item()))
    finally:
        torch.set_num_threads(previous_threads)


@pytest.mark.parametrize("library", [0, 1, 2], ids=["auto", "BLAS", "oneDNN"])
def test_the_engines_large_products_equal_torch_mm(gemm_library, library):
    """cpp.matmul (the input projection, the weight and input gradients): any strides, with and without bias."""
    gemm_library(library)
    g = torch.Generator().manual_seed(0)
    for M, K, N in ((300, 256, 512), (40, 300, 256), (7, 5, 3)):
        a, b, bias = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g).t(), torch.randn(N, generator=g)
        at = torch.randn(K, M, generator=g).t()  # a transposed view, as dXWᵀ x after the loop
        scale = (K ** 0.5) * 1e-5
        torch.testing.assert_close(cpp.matmul(a, b), a @ b, rtol=0, atol=scale)
        torch.testing.assert_close(cpp.matmul(at, b, bias), torch.addmm(bias, at, b), rtol=0, atol=scale)
        d = torch.randn(M, K, generator=g, dtype=torch.float64)
        assert torch.equal(cpp.matmul(d, b.double()), d @ b.double())  # float64: torch.mm itself


# -- higher-order gradients ----------------------------------------------------------------------------

DOUBLE_BACKWARD = [
    (gatelab.LSTM, {"gate_activation": "hard_sigmoid", "candidate_activation": "elliott"}),
    (gatelab.LSTM, {"peephole": True, "proj_size": 2, "gate_activation": {"f": "prelu"}}),
    (gatelab.GRU, {"candidate_activation": "softsign"}), (gatelab.GRU, {"reset_after": False}),
    (gatelab.RNN, {"activation": "softplus"}), (gatelab.GatedStateRNN, {"gate_activation": "elliott"}),
    (gatelab.LSTM, {"gate_activation": "hard_sigmoid", "zoneout": 0.3, "recurrent_dropout": 0.2}),
]


@pytest.mark.parametrize("case", range(len(DOUBLE_BACKWARD)))
def test_double_backward_through_the_fused_engine_is_correct(case):
    """create_graph=True: the fused engine recomputes the direction on the reference loop and
    differentiates it, so gradient penalties and meta-learning get a connected, correct gradient
    (gradgradcheck in float64; C++ and PyTorch loops alike, since the recomputation replaces both)."""
    cls, kw = DOUBLE_BACKWARD[case]
    torch.manual_seed(0)
    layer = cls(2, 3, bidirectional=True, backend="fused", strict=True, dtype=torch.float64, **kw)
    names, params = zip(*layer.named_parameters())
    x = torch.randn(4, 2, 2, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([4, 2])

    def fn(x, *ps):
        torch.manual_seed(3)  # the same dropout and zoneout draws at every call
        out, _ = torch.func.functional_call(layer, dict(zip(names, ps)), (x,), {"lengths": lengths})
        return out

    assert torch.autograd.gradgradcheck(fn, (x, *params), atol=1e-6)
    # and a gradient penalty through it matches the reference engine's
    ref = cls(2, 3, bidirectional=True, backend="reference", dtype=torch.float64, **kw)
    ref.load_state_dict(layer.state_dict())
    penalties = []
    for m in (layer, ref):
        torch.manual_seed(3)
        out = m(x, lengths=lengths)[0]
        (g,) = torch.autograd.grad(out.pow(2).sum(), x, create_graph=True)
        penalties.append(torch.autograd.grad(g.pow(2).sum(), m.weight_hh_l0))
    torch.testing.assert_close(penalties[0][0], penalties[1][0], rtol=0, atol=1e-10)


def test_double_backward_through_the_fused_layer_norm_lstm_is_a_clear_error():
    layer = gatelab.LSTM(2, 3, layer_norm=True, backend="fused", strict=True, dtype=torch.float64)
    x = torch.randn(4, 2, 2, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match="double backward .*layer-norm LSTM is not supported; .*backend='reference'"):
        torch.autograd.grad(layer(x)[0].sum(), x, create_graph=True)


@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("cls", [gatelab.LSTM, gatelab.GRU, gatelab.RNN])
def test_double_backward_on_the_other_engines(backend, cls):
    torch.manual_seed(0)
    layer = cls(2, 3, backend=backend, strict=True, dtype=torch.float64)
    names, params = zip(*layer.named_parameters())
    x = torch.randn(4, 2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(
        lambda x, *ps: torch.func.functional_call(layer, dict(zip(names, ps)), (x,))[0], (x, *params), atol=1e-6)


def test_double_backward_with_one_activation_module_in_every_gate():
    """A learnable activation shared by the gates is one input several times: its gradient is counted once."""
    from gatelab.activations import AdaptiveSigmoid

    torch.manual_seed(0)
    grads = []
    for backend in ("fused", "reference"):
        torch.manual_seed(0)
        layer = gatelab.LSTM(3, 4, gate_activation=AdaptiveSigmoid(4), backend=backend, dtype=torch.float64)
        x = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)
        w = layer.sigma_i_weight_l0
        for create_graph in (False, True):
            (g,) = torch.autograd.grad(layer(x)[0].pow(2).sum(), w, create_graph=create_graph)
            grads.append(g.detach())
    for g in grads[1:]:
        torch.testing.assert_close(g, grads[0], rtol=0, atol=1e-12)


def test_the_fused_engine_runs_on_the_meta_device():
    layer = gatelab.GRU(4, 6, backend="fused", device="meta")
    out, h = layer(torch.randn(5, 2, 4, device="meta"))
    assert out.shape == (5, 2, 6) and out.device.type == "meta"


def test_the_kernel_loops_run_on_every_torch_thread(gemm_library):
    """The library is compiled with OpenMP, so the loops' one parallel region per sequence (and the
    fallback's per-step row pass) really runs on the torch threads: without it at::parallel_for calls its
    function inline and the barrier never has a second worker."""
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert torch.ops.gatelab_fused.region_threads(2) == 2
        assert torch.ops.gatelab_fused.region_threads(1) == 1
    finally:
        torch.set_num_threads(previous)


def test_the_raw_loops_refuse_an_empty_sequence(gemm_library):
    kinds, params = [1, 1, 4, 1, 4], [0.0] * 5
    with pytest.raises(RuntimeError, match="at least one time step"):
        torch.ops.gatelab_fused.lstm_forward(torch.zeros(0, 2, 8), torch.zeros(8, 2), torch.zeros(2, 2),
                                             torch.zeros(2, 2), None, None, None, None, None, False, kinds, params,
                                             False, False, False)


def test_explain_names_the_per_step_product_and_the_onnx_form(gemm_library):
    layer = gatelab.LSTM(3, 20, gate_activation="elliott", backend="fused")
    gemm_library(3)
    assert "per-step products on gatelab's AVX-512 kernel" in layer.explain()
    gemm_library(1)
    assert "per-step products on the BLAS" in layer.explain()
    assert "per-step products on the BLAS (float64)" in layer.double().explain()
    assert "ONNX export: ONNX Scan over time (1): activation elliott" in layer.explain()


@pytest.mark.parametrize("make", [
    lambda: gatelab.LSTM(2, 8, batch_first=True, backend="fused", variant="NIG"),
    lambda: gatelab.LSTM(2, 8, batch_first=True, backend="fused", variant="CIFG", bidirectional=True),
    lambda: gatelab.LSTM(2, 8, batch_first=True, backend="fused", proj_size=4, gate_activation="hard_sigmoid"),
    lambda: gatelab.LSTM(2, 8, batch_first=True, backend="fused", variant="NFG", zoneout=0.2),
    lambda: gatelab.GRU(2, 8, batch_first=True, backend="fused", reset_after=False),
], ids=["NIG", "CIFG-bidirectional", "projection", "NFG-zoneout", "GRU-reset-before"])
def test_training_calls_keep_no_memory_after_backward(make):
    """The PyTorch loop's final states were the saved last-step tensors: returned as they were, each call's
    autograd node and everything it saved stayed alive in a cycle the collector cannot see (a trainer
    grew by 20 MB a step and was killed for memory). Every call must free what it saved at its backward,
    even while its outputs are still referenced."""
    import gc

    def live_tensors() -> int:
        gc.collect()
        with warnings.catch_warnings():  # isinstance on a deprecated torch.distributed object warns
            warnings.simplefilter("ignore")
            return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))

    layer = make()
    assert layer.explain().startswith(f"{type(layer).__name__}: engine 'fused'") and "pure-PyTorch loop" in layer.explain()
    x, lengths = torch.randn(3, 5, 2), torch.tensor([5, 2, 4])

    def call() -> tuple:
        out, state = layer(x, lengths=lengths)
        state = state if isinstance(state, tuple) else (state,)
        (out.sum() + state[-1].sum()).backward()
        return (out, *state)

    kept = [call() for _ in range(2)]
    kept.clear()
    before = live_tensors()
    for _ in range(4):
        call()
    assert live_tensors() <= before  # nothing left behind by four calls
    for _ in range(4):
        kept.append(call())
    outputs = sum(len(k) for k in kept)
    # outputs kept: they stay (with at most a base or view each), not the ~50 tensors each call saved
    assert live_tensors() <= before + 2 * outputs
