"""Bad and edge input to the library gets a clear error, the same on every engine (issue 15)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gatelab
from gatelab import activations

F64 = torch.float64
ENGINES = ["native", "fused", "reference"]


@pytest.mark.parametrize("spec,pattern", [
    ("hard_sigmoid:0", r"hard_sigmoid takes a slope a > 0 .*got 0.0"),
    ("hard_sigmoid:-1", r"hard_sigmoid takes a slope a > 0"),
    ("elu:-5", r"elu takes a scale a > 0, got -5.0"),
    ("leaky_relu:-1e308", r"leaky_relu takes a negative slope a in \[0, 1\]"),
    ("leaky_relu:2", r"leaky_relu takes a negative slope a in \[0, 1\]"),
])
def test_activation_parameters_outside_their_family_are_refused(spec, pattern):
    with pytest.raises(ValueError, match=pattern):
        activations.get(spec)


def test_torch_modules_with_such_parameters_are_refused_too():
    with pytest.raises(ValueError, match="leaky_relu takes a negative slope"):
        activations.get(nn.LeakyReLU(-1.0))
    assert activations.get(nn.LeakyReLU(0.2)) is activations.get("leaky_relu:0.2")


@pytest.mark.parametrize("spec,pattern", [
    (int, "got the class int"), (type, "got the class type"), (nn.Module, "module class Module; pass an instance"),
    (3, "got int"),
])
def test_classes_and_non_callables_are_not_activations(spec, pattern):
    with pytest.raises(TypeError, match=pattern):
        activations.get(spec)
    assert activations.get(nn.Tanh) is activations.get("tanh")  # a known parameter-free module class is fine


@pytest.mark.parametrize("bad,pattern", [
    (lambda x: x.sum(), r"maps \(2, 8\) torch.float32 to \(\) torch.float32"),
    (lambda x: x[..., :1], r"maps \(2, 8\) torch.float32 to \(2, 1\)"),
    (lambda x: x.double(), r"to \(2, 8\) torch.float64"),
    (lambda x: None, "must return a tensor, returned NoneType"),
    (lambda x: 3.0, "must return a tensor, returned float"),
    (nn.Linear(3, 3), r"Linear failed on a \(2, 8\) torch.float32 tensor"),
])
@pytest.mark.parametrize("backend", ["auto", "fused", "reference"])
def test_an_activation_that_is_not_elementwise_is_refused_at_construction(bad, pattern, backend):
    with pytest.raises(TypeError, match="GRUCell: candidate_activation: activation .*" + pattern):
        gatelab.GRU(4, 8, candidate_activation=bad, backend=backend)
    with pytest.raises(TypeError, match="LSTMCell: gate_activation\\['f'\\]"):
        gatelab.LSTMCell(4, 8, gate_activation={"f": bad})


@pytest.mark.parametrize("kwargs", [{"output_range": "x"}, {"output_range": (1.0, 0.0)}, {"output_range": (0, float("nan"))}])
def test_register_checks_its_output_range(kwargs):
    with pytest.raises(ValueError, match="output_range must be \\(low, high\\) with low <= high"):
        activations.register("hardening_probe", torch.tanh, **kwargs)


def test_rnn_with_two_different_activations_is_an_error():
    with pytest.raises(ValueError, match="pass activation or nonlinearity, not both .*'tanh' and 'relu'"):
        gatelab.RNN(4, 8, nonlinearity="relu", activation="tanh")
    assert gatelab.RNN(4, 8, activation="relu").nonlinearity == "relu"  # overrides the default tanh
    assert gatelab.RNN(4, 8, nonlinearity="relu", activation=torch.relu).nonlinearity == "relu"  # the same one


@pytest.mark.parametrize("make,pattern", [
    (lambda: gatelab.LSTM(4, 8, layer_norm="no"), r"LSTM: layer_norm must be True or False, got 'no' \(str\)"),
    (lambda: gatelab.LSTM(4, 8, peephole="no"), r"LSTM: peephole must be True or False \(or None\), got 'no'"),
    (lambda: gatelab.LSTM(4, 8, coupled=1), r"coupled must be True or False \(or None\), got 1 \(int\)"),
    (lambda: gatelab.GRU(4, 8, reset_after="no"), r"GRU: reset_after must be True or False, got 'no'"),
    (lambda: gatelab.GRU(4, 8, bidirectional="yes"), r"GRU: bidirectional must be True or False, got 'yes'"),
    (lambda: gatelab.RNN(4, 8, batch_first="false"), r"RNN: batch_first must be True or False"),
    (lambda: gatelab.LSTM(4, 8, residual="no"), r"LSTM: residual must be True or False"),
    (lambda: gatelab.LSTM(4, 8, strict="yes"), r"LSTM: strict must be True or False"),
    (lambda: gatelab.LSTM(4, 8, forget_bias="a"), r"LSTM: forget_bias must be a number or None, got 'a' \(str\)"),
    (lambda: gatelab.LSTM(4, 8, forget_bias=True), r"LSTM: forget_bias must be a number or None, got True"),
    (lambda: gatelab.GRU(4, 8, dtype=torch.int64), r"GRU: dtype must be a floating-point torch.dtype, got torch.int64"),
    (lambda: gatelab.GRU(4, 8, dtype="float32"), r"GRU: dtype must be a floating-point torch.dtype, got 'float32'"),
    (lambda: gatelab.LSTM(4, 8, init="chrono", chrono_max_length=2.5), r"chrono_max_length must be an int, got float"),
])
def test_flags_and_numbers_of_the_wrong_type_name_the_argument(make, pattern):
    with pytest.raises((TypeError, ValueError), match=pattern):
        make()


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("lengths,error,pattern", [
    (torch.tensor([True, True, True]), ValueError, "expected lengths as 3 integers .*got torch.bool values"),
    ("532", TypeError, "lengths must be a tensor or list of 3 integers, got str"),
    ([1.5, 2.0, 3.0], ValueError, "expected lengths as 3 integers"),
    ([1, 2], ValueError, "expected lengths as 3 integers"),
    ([0, 2, 3], ValueError, "every length must be in 1..5"),
])
def test_bad_lengths_are_refused_on_every_engine(engine, lengths, error, pattern):
    layer = gatelab.LSTM(4, 8, backend=engine, gate_activation="sigmoid" if engine == "native" else "elliott")
    with pytest.raises(error, match="LSTM: " + pattern):
        layer(torch.randn(5, 3, 4), lengths=lengths)


@pytest.mark.parametrize("engine", ENGINES)
def test_empty_sequences_and_empty_batches_agree_with_torch_on_every_engine(engine):
    layer = gatelab.LSTM(3, 4, backend=engine, gate_activation="sigmoid" if engine == "native" else "hard_sigmoid")
    with pytest.raises(RuntimeError, match="sequence length"):
        nn.LSTM(3, 4)(torch.randn(0, 2, 3))  # torch refuses T = 0 ...
    with pytest.raises(ValueError, match=r"LSTM: expected at least one time step, got an input of shape \(0, 2, 3\)"):
        layer(torch.randn(0, 2, 3))  # ... and so does every engine, with one clear error
    out, (h, c) = layer(torch.randn(3, 0, 3))
    ref_out, (ref_h, _) = nn.LSTM(3, 4)(torch.randn(3, 0, 3))  # torch returns empty results for B = 0
    assert out.shape == ref_out.shape == (3, 0, 4) and h.shape == ref_h.shape == (1, 0, 4)
    with pytest.raises(TypeError, match="LSTM: input must be a floating-point tensor, got torch.int64"):
        layer(torch.zeros(3, 2, 3, dtype=torch.int64))


LOW = [torch.bfloat16, torch.float16]


def cpp_loaded() -> bool:
    return gatelab.engines.fused.cpp.load()
CELLS = [(gatelab.LSTM, {"gate_activation": {"f": "hard_sigmoid", "i": "elliott"}}),
         (gatelab.GRU, {"candidate_activation": "relu"}), (gatelab.RNN, {"activation": "softsign"}),
         (gatelab.GatedStateRNN, {"gate_activation": "hard_sigmoid"}),
         (gatelab.LSTM, {"layer_norm": True}), (gatelab.LSTM, {})]


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("case", range(len(CELLS)))
def test_low_precision_layers_run_on_auto_and_match_float32(dtype, case):
    """bf16/fp16 on auto: the C++ loop computes in float32 (weights, input and state cast up for the call),
    so against a float32 reference with the same rounded weights and input only the rounding of each
    layer's output remains (measured at these sizes: up to 2.3e-3 bf16, 3.5e-4 fp16, but 1.3e-2 bf16 for
    the layer-norm LSTM, whose norm of c' magnifies the rounding of the first layer's output); against
    the original float32 weights, within the dtype's rounding of the weights (measured: up to 3.3e-2
    bf16, 2e-3 fp16, both the layer-norm LSTM)."""
    cls, kw = CELLS[case]
    torch.manual_seed(0)
    ref = cls(3, 8, 2, bidirectional=True, backend="reference", **kw)
    low = cls(3, 8, 2, bidirectional=True, dtype=dtype, **kw)
    low.load_state_dict({k: v.to(dtype) for k, v in ref.state_dict().items()})
    x = torch.randn(6, 2, 3)
    out = low(x.to(dtype))[0]
    assert out.dtype == dtype
    assert low.engine_name != "fused" or not cpp_loaded() or f"in float32: the {str(dtype)[6:]} weights" in low.explain()
    tol = {torch.bfloat16: 6e-2, torch.float16: 5e-3}[dtype]
    torch.testing.assert_close(out.float(), ref(x)[0], rtol=0, atol=tol)
    rounded = cls(3, 8, 2, bidirectional=True, backend="reference", **kw)
    rounded.load_state_dict({k: v.float() for k, v in low.state_dict().items()})
    torch.testing.assert_close(out.float(), rounded(x.to(dtype).float())[0], rtol=0,
                               atol={torch.bfloat16: 2e-2, torch.float16: 1e-3}[dtype])
    out.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == dtype and torch.isfinite(p.grad).all() for p in low.parameters())


@pytest.mark.parametrize("backend", ["auto", "fused", "reference"])
@pytest.mark.parametrize("case", range(len(CELLS)))
def test_cpu_autocast_runs_on_every_engine(backend, case):
    """torch.autocast("cpu", bfloat16) with float32 layers, fed the bf16 output of an autocast op: never an
    error; the fused loops run in the layer's float32 (native: torch's bf16 kernel), near float32."""
    cls, kw = CELLS[case]
    torch.manual_seed(0)
    layer = cls(3, 8, 2, bidirectional=True, backend=backend, **kw)
    x = torch.randn(6, 2, 3)
    want = layer(x)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fed = torch.nn.functional.linear(x, torch.eye(3))  # bf16 under autocast
        assert fed.dtype == torch.bfloat16
        out = layer(fed)[0]
    torch.testing.assert_close(out.float(), want, rtol=0, atol=6e-2)
    out.float().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters())


@pytest.mark.parametrize("backend", ["native", "fused", "reference"])
def test_a_state_carried_out_of_autocast_goes_back_in(backend):
    layer = gatelab.LSTM(3, 8, backend=backend, gate_activation="sigmoid" if backend == "native" else "hard_sigmoid")
    x = torch.randn(6, 2, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, state = layer(x)
        out, _ = layer(x, state)  # truncated BPTT does this: native returns a bf16 state here
    assert torch.isfinite(out.float()).all()
    with pytest.raises(ValueError, match="input is torch.float64"):  # outside reduced precision, still an error
        with torch.autocast("cpu", dtype=torch.bfloat16):
            layer(x.double())


def test_a_bidirectional_language_model_is_refused(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("abcab" * 200)
    task = gatelab.tasks.get(f"charlm:{path}")
    with pytest.raises(gatelab.config.ConfigError, match="model.bidirectional: .*language model"):
        gatelab.build_model(gatelab.ModelConfig(cell="gru", hidden_sizes=(4,), bidirectional=True), task)
