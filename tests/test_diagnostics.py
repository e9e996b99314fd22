"""Diagnostics against analytic answers: linear and tanh recurrences at a fixed point, the IRNN, a
latched LSTM, orthogonal matrices, engine independence and a hand-written oracle loop."""

from __future__ import annotations

import json
import math
import re
import warnings

import numpy as np
import pytest
import torch

import gatelab
from gatelab.diagnostics import (
    GradientFlowCallback,
    dead_unit_share,
    diagnose_main,
    gate_statistics,
    gradient_flow,
    jacobian_norms,
    recording,
    recurrent_spectra,
    saturation_share,
    spectral_radius,
    verdict,
)
from gatelab.diagnostics.experiment import LastStepModel
from gatelab.diagnostics.verdict import Verdict, layer_verdicts, memory_state, state_verdicts
from gatelab.tasks import Batch

D = torch.float64
T = 50


@pytest.fixture(autouse=True)
def _threads(single_thread):
    yield


class FromState(torch.nn.Module):
    """A layer run from a given initial state; returns the last step's output."""

    def __init__(self, layer, h0):
        super().__init__()
        self.layer, self.h0 = layer, h0

    def forward(self, x):
        return self.layer(x, self.h0)[0][-1]


def last_sum(out, y):
    return out.sum()


def linear_rnn(alpha: float, hidden: int = 4, activation: str = "identity", W: torch.Tensor | None = None):
    """Elman layer with W_hh = alpha·I (or ``W``), no bias, zero input weights."""
    layer = gatelab.RNN(3, hidden, activation=activation, bias=False, dtype=D)
    with torch.no_grad():
        layer.weight_hh_l0.copy_(alpha * torch.eye(hidden, dtype=D) if W is None else W)
        layer.weight_ih_l0.zero_()
    return layer


# -- analytic Jacobians --------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.5, 1.0, 1.1])
def test_linear_rnn_jacobian_is_alpha_to_the_lag(alpha, gen):
    layer = linear_rnn(alpha)
    x = torch.zeros(T, 2, 3, dtype=D)
    h0 = torch.randn(1, 2, 4, dtype=D, generator=gen)
    norms = jacobian_norms(layer, x, h0, method="exact")
    assert norms.shape == (T + 1,)
    np.testing.assert_allclose(norms[T], alpha**T, rtol=1e-6)  # ‖∂h_T/∂h_0‖ = α^T
    np.testing.assert_allclose(norms, alpha ** np.arange(T + 1), rtol=1e-6)
    v = verdict(norms)
    assert v.slope == pytest.approx(math.log(alpha), abs=1e-9)
    assert v.label == {0.5: "vanishing", 1.0: "healthy", 1.1: "exploding"}[alpha]


@pytest.mark.parametrize("alpha", [0.5, 1.0, 1.1])
def test_tanh_rnn_at_zero_behaves_like_the_linear_one(alpha):
    layer = linear_rnn(alpha, activation="tanh")  # h = 0, zero input, zero bias: tanh'(0) = 1 at every step
    norms = jacobian_norms(layer, torch.zeros(T, 2, 3, dtype=D), method="exact")
    np.testing.assert_allclose(norms, alpha ** np.arange(T + 1), rtol=1e-6)
    assert verdict(norms).slope == pytest.approx(math.log(alpha), abs=1e-9)


@pytest.mark.parametrize("alpha", [0.5, 1.1])
def test_gradient_flow_of_the_linear_rnn_decays_as_alpha(alpha, gen):
    layer = linear_rnn(alpha)
    x = torch.zeros(T, 2, 3, dtype=D)
    h0 = torch.randn(1, 2, 4, dtype=D, generator=gen)
    y = torch.randn(2, 4, dtype=D, generator=gen)
    flow = gradient_flow(FromState(layer, h0), (x, y), loss_fn=lambda out, target: ((out - target) ** 2).sum())
    by_lag = flow.by_lag("layer.l0.h")
    np.testing.assert_allclose(by_lag / by_lag[0], alpha ** np.arange(T), rtol=1e-9)
    assert verdict(flow).slope == pytest.approx(math.log(alpha), abs=1e-9)


def test_irnn_jacobian_is_exactly_the_identity(gen):
    layer = gatelab.RNN(3, 5, nonlinearity="relu", init="identity", dtype=D)
    with torch.no_grad():
        layer.weight_ih_l0.zero_()  # zero input weights; biases are zero after init="identity"
    assert torch.equal(layer.weight_hh_l0, torch.eye(5, dtype=D))
    x = torch.randn(T, 2, 3, dtype=D, generator=gen)
    h0 = torch.rand(1, 2, 5, dtype=D, generator=gen) + 0.1  # h > 0: every ReLU is active
    norms = jacobian_norms(layer, x, h0, method="exact", reduce="none")
    assert np.array_equal(norms, np.ones((T + 1, 2)))
    flow = gradient_flow(FromState(layer, h0), (x, None), loss_fn=last_sum)
    # ∂L/∂h_t = ∂L/∂h_T·I^(T-t): the same vector at every step, so exactly the same norm.
    assert np.all(flow.norms["layer.l0.h"] == flow.norms["layer.l0.h"][-1])
    assert verdict(norms[:, 0]).label == "healthy"


def test_latched_lstm_keeps_its_cell_state(gen):
    layer = gatelab.LSTM(3, 6, forget_bias=20.0, dtype=D)
    with torch.no_grad():
        H = 6
        layer.bias_ih_l0[:H].fill_(-20.0)  # input gate i (first row block) shut
        layer.bias_hh_l0[:H].zero_()
    x = torch.randn(T, 3, 3, dtype=D, generator=gen)
    norms = jacobian_norms(layer, x, state="c", method="exact")
    assert np.abs(norms - 1).max() < 1e-3
    assert verdict(norms).label == "healthy"
    # The control: without the forget bias the same layer forgets.
    layer.cells[0].bias_ih.data[H:2 * H] = 0.0
    assert jacobian_norms(layer, x, state="c", method="exact")[-1] < 1e-3


@pytest.mark.parametrize(("scale", "label"), [(0.5, "vanishing"), (1.5, "exploding")])
def test_scaled_orthogonal_matrix_is_flagged(scale, label, gen):
    Q, _ = torch.linalg.qr(torch.randn(8, 8, dtype=D, generator=gen))
    layer = linear_rnn(1.0, hidden=8, W=scale * Q)
    x = torch.zeros(30, 2, 3, dtype=D)
    h0 = torch.randn(1, 2, 8, dtype=D, generator=gen)
    norms = jacobian_norms(layer, x, h0)
    v = verdict(norms)
    assert v.label == label
    assert v.slope == pytest.approx(math.log(scale), abs=1e-9)
    flow = gradient_flow(FromState(layer, h0), (x, None), loss_fn=last_sum)
    assert verdict(flow).label == label


def test_norms_below_the_float32_range_are_exact(gen):
    layer = gatelab.RNN(3, 4, activation="identity", bias=False)  # float32
    with torch.no_grad():
        layer.weight_hh_l0.copy_(0.1 * torch.eye(4))
    x = torch.zeros(50, 2, 3)
    h0 = torch.randn(1, 2, 4, generator=gen)
    expected = float(np.float32(0.1)) ** np.arange(51.0)  # α = 0.1 as float32 holds it
    for method in ("exact", "power"):
        norms = jacobian_norms(layer, x, h0, method=method)
        assert norms[50] > 0  # 1e-50: no float32 (or its product) holds it
        np.testing.assert_allclose(norms, expected, rtol={"exact": 1e-12, "power": 1e-5}[method])


def test_power_iteration_agrees_with_the_exact_norm(gen):
    torch.manual_seed(0)  # a layer whose c-block has close top singular values (plain power iteration: 0.7 %)
    layer = gatelab.LSTM(3, 5, dtype=D)
    x = torch.randn(12, 2, 3, dtype=D, generator=gen)
    for state in ("h", "c", "all"):
        exact = jacobian_norms(layer, x, state=state, method="exact", reduce="none")
        power = jacobian_norms(layer, x, state=state, method="power", reduce="none", tol=1e-13)
        np.testing.assert_allclose(power, exact, rtol=1e-8)


# -- engines and the recording loop ----------------------------------------------------------------


def _copies(cls, **kwargs):
    torch.manual_seed(0)
    ref = cls(3, 5, backend="reference", dtype=D, **kwargs)
    layers = {"reference": ref}
    for backend in ("native", "fused"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a backend that cannot run the layer falls back
            layer = cls(3, 5, backend=backend, dtype=D, **kwargs)
        layer.load_state_dict(ref.state_dict())
        layers[backend] = layer
    return layers


@pytest.mark.parametrize(("cls", "kwargs"), [
    (gatelab.LSTM, {}), (gatelab.GRU, {}), (gatelab.RNN, {}), (gatelab.LSTM, {"gate_activation": "hard_sigmoid"}),
])
def test_gradient_flow_is_the_same_on_every_engine(cls, kwargs, gen):
    layers = _copies(cls, **kwargs)
    assert {layer.engine_name for layer in layers.values()} >= {"reference", "fused"}
    x = torch.randn(9, 4, 3, dtype=D, generator=gen)
    y = torch.randn(4, 5, dtype=D, generator=gen)
    flows = {name: gradient_flow(layer, (x, y)) for name, layer in layers.items()}
    for name, flow in flows.items():
        assert flow.engines[""] == layers[name].engine_name  # reported, and restored afterwards
        assert "run_stack" not in vars(layers[name])
        assert all(p.grad is None for p in layers[name].parameters())  # .grad untouched
        for key, norms in flow.norms.items():
            np.testing.assert_allclose(norms, flows["reference"].norms[key], rtol=1e-10, atol=1e-14)


def test_gradient_flow_matches_a_hand_written_torch_loop(gen):
    layer = gatelab.LSTM(3, 5, dtype=D)
    torch_cell = torch.nn.LSTMCell(3, 5, dtype=D)
    torch_cell.load_state_dict({k.removesuffix("_l0"): v for k, v in layer.state_dict().items()})
    x = torch.randn(7, 2, 3, dtype=D, generator=gen)
    y = torch.randn(2, 5, dtype=D, generator=gen)
    h = c = torch.zeros(2, 5, dtype=D)
    hs, cs = [], []
    for t in range(7):
        h, c = torch_cell(x[t], (h, c))
        h.retain_grad()
        c.retain_grad()
        hs.append(h)
        cs.append(c)
    ((h - y) ** 2).mean().backward()
    flow = gradient_flow(layer, (x, y))  # default loss: MSE of the last step
    np.testing.assert_allclose(flow.norms["l0.h"], [float(t.grad.norm()) for t in hs], rtol=1e-10)
    np.testing.assert_allclose(flow.norms["l0.c"], [float(t.grad.norm()) for t in cs], rtol=1e-10, atol=1e-15)


def test_recording_reproduces_each_engine_with_lengths_and_directions(gen):
    layers = _copies(gatelab.GRU, num_layers=2, bidirectional=True)
    x = torch.randn(6, 3, 3, dtype=D, generator=gen)
    lengths = torch.tensor([6, 2, 4])
    for layer in layers.values():
        out, hn = layer(x, lengths=lengths)
        with recording(layer) as traces:
            out_r, hn_r = layer(x, lengths=lengths)
        torch.testing.assert_close(out_r, out, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(hn_r, hn, rtol=1e-12, atol=1e-12)
        assert [(tr.layer, tr.direction) for tr in traces] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    flow = gradient_flow(layers["reference"], (x, None, lengths))
    assert set(flow.norms) == {"l0.h", "l0_reverse.h", "l1.h", "l1_reverse.h"}
    # Past its length a sequence's step never happens: its state there gets no gradient.
    assert flow.norms["l1.h"][5] > 0 and flow.by_lag("l1.h")[0] == flow.norms["l1.h"][5]


def test_zoneout_in_eval_is_recorded_like_the_reference_engine(gen):
    layer = gatelab.LSTM(3, 4, zoneout=0.3, dtype=D).eval()
    x = torch.randn(5, 2, 3, dtype=D, generator=gen)
    out, _ = layer(x)
    with recording(layer):
        out_r, _ = layer(x)
    torch.testing.assert_close(out_r, out, rtol=1e-12, atol=1e-12)


# -- gate statistics -------------------------------------------------------------------------------


def test_saturation_and_dead_units_on_hand_made_values():
    assert saturation_share(torch.tensor([0.01, 0.5, 0.97, 0.96, 0.2]), (0.0, 1.0)) == pytest.approx(3 / 5)
    assert saturation_share(torch.tensor([-0.95, 0.0, 0.5, 0.91]), (-1.0, 1.0)) == pytest.approx(2 / 4)
    pre = torch.ones(3, 2, 4)
    pre[:, :, 0] = -1.0  # unit 0 never fires
    pre[:, :, 2] = 0.0  # unit 2: exactly 0 is not firing either
    pre[2, 1, 3] = -5.0  # unit 3 is off once only: alive
    assert dead_unit_share(pre) == pytest.approx(2 / 4)
    live = torch.ones(3, 2, dtype=torch.bool)
    live[:, 0] = False  # only sequence 1 counts...
    pre[:, 1, 1] = -1.0  # ...where unit 1 never fires
    assert dead_unit_share(pre, live) == pytest.approx(3 / 4)


def test_gate_statistics_of_a_latched_lstm_and_a_dead_relu_layer(gen):
    lstm = gatelab.LSTM(3, 6, forget_bias=20.0)
    with torch.no_grad():
        lstm.bias_ih_l0[:6].fill_(-20.0)
    stats = gate_statistics(lstm, torch.randn(8, 4, 3, generator=gen))
    assert stats.saturation["l0.sigma_f"] == 1.0 and stats.saturation["l0.sigma_i"] == 1.0
    assert 0.0 <= stats.saturation["l0.sigma_o"] < 0.5
    assert stats.dead == {} and stats.state_norms["l0.c"].shape == (8,)

    relu = gatelab.RNN(3, 4, nonlinearity="relu", dtype=D)
    with torch.no_grad():
        relu.weight_hh_l0.zero_()
        relu.weight_ih_l0.copy_(torch.tensor([[-1.0] * 3, [-2.0] * 3, [1.0] * 3, [0.5] * 3], dtype=D))
        relu.bias_ih_l0.zero_()
        relu.bias_hh_l0.zero_()
    x = torch.rand(6, 3, 3, dtype=D, generator=gen) + 0.1  # positive input: units 0 and 1 never fire
    stats = gate_statistics(relu, x)
    assert stats.dead == {"l0.phi": 0.5}
    assert "l0.phi" not in stats.saturation  # ReLU is unbounded
    assert "run_stack" not in vars(relu) and isinstance(relu.cells[0].phi, gatelab.activations.Activation)


def test_spectral_radius_of_known_matrices():
    A = torch.tensor([[0.5, 10.0], [0.0, -0.9]])  # triangular: eigenvalues 0.5 and -0.9
    assert spectral_radius(A) == pytest.approx(0.9)
    R = torch.tensor([[0.0, 2.0], [-0.5, 0.0]])  # eigenvalues ±i: radius 1, norm 2
    assert spectral_radius(R) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="square"):
        spectral_radius(torch.ones(4, 2))
    lstm = gatelab.LSTM(2, 3)
    with torch.no_grad():
        lstm.weight_hh_l0.copy_(torch.cat([k * torch.eye(3) for k in (1.0, 2.0, 3.0, 4.0)]))
    spectra = recurrent_spectra(lstm)["l0"]
    assert [spectra[f"{b}.radius"] for b in "ifgo"] == pytest.approx([1.0, 2.0, 3.0, 4.0])
    assert spectra["all.norm"] == pytest.approx(math.sqrt(1 + 4 + 9 + 16))


def test_verdict_definitions():
    v = verdict(0.5 ** np.arange(21))
    assert (v.label, v.horizon) == ("vanishing", 10)  # 0.5^10 = 9.8e-4 < 1e-3
    assert verdict(np.full(30, 2.0)).horizon is None
    assert verdict(1.01 ** np.arange(30)).label == "healthy"  # within the 0.02/step tolerance
    assert verdict(1.03 ** np.arange(30)).label == "exploding"
    overflowed = verdict([1.0, 1e30, np.inf, np.nan])
    assert (overflowed.label, overflowed.slope) == ("exploding", math.inf)
    with pytest.raises(ValueError):
        verdict([1.0])


def test_verdict_says_the_horizon_in_plain_words():
    assert str(verdict(0.5 ** np.arange(21))) == (
        "vanishing (slope -0.6931/step; the gradient falls below 1e-3 of its peak after 10 of 21 steps)")
    flat = verdict(np.full(20, 2.0))
    assert str(flat) == "healthy (slope +0.0000/step; the gradient stays above 1e-3 of its peak over all 20 steps)"
    late_peak = verdict(np.r_[0.1, 1.0, 0.5 ** np.arange(20)])
    assert (late_peak.peak, late_peak.horizon) == (1, 11)
    assert late_peak.horizon_words() == (
        "the gradient peaks at lag 1 and falls below 1e-3 of that peak 11 steps further back (of 22)")
    one_percent = verdict(0.5 ** np.arange(21), floor=0.01)
    assert one_percent.horizon_words() == "the gradient falls below 1e-2 of its peak after 7 of 21 steps"
    assert str(verdict([1.0, 1e30, np.inf, np.nan])).endswith("the norms overflowed to inf or NaN within 4 steps)")
    assert verdict(np.zeros(5)).horizon_words() == "the gradient is zero at all 5 steps"
    assert verdict(np.arange(1.0, 31.0)).horizon_words() == "the gradient is largest at the first of the 30 steps"
    for v in (flat, late_peak, verdict(np.arange(1.0, 31.0))):
        assert "horizon" not in str(v) and "never" not in str(v)
    # the old callers: one series in, a Verdict of the same fields out (peak is new, with a default)
    assert Verdict("healthy", 0.0, None, 20, 0.02, 1e-3).peak == 0
    assert set(flat.to_dict()) == {"label", "slope", "horizon", "lags", "tolerance", "floor", "peak"}


def _memory_lstm(forget_bias: float) -> gatelab.LSTM:
    """An LSTM whose h reaches the loss only at the last step (W_hh = 0) and whose forget gate is the
    constant σ(forget_bias) (no input weights, no recurrent bias in its block): then exactly
    ‖∂L/∂c_{T-k}‖ = ‖∂L/∂c_T‖·σ(b_f)^k, and ∂L/∂h_t = 0 before the last step."""
    H = 8
    layer = gatelab.LSTM(3, H, dtype=D)
    with torch.no_grad():
        layer.weight_hh_l0.zero_()
        layer.weight_ih_l0[H:2 * H].zero_()  # row blocks i f g o: f is the second
        layer.bias_ih_l0[H:2 * H].fill_(forget_bias)
        layer.bias_hh_l0[H:2 * H].zero_()
    return layer


def test_lstm_verdict_is_per_state_with_the_memory_state_leading(gen):
    T_long = 300
    x = torch.randn(T_long, 4, 3, dtype=D, generator=gen)
    y = torch.randn(4, 8, dtype=D, generator=gen)
    flow = gradient_flow(_memory_lstm(5.0), (x, y))
    c = flow.by_lag("l0.c")
    keep = 1 / (1 + math.exp(-5.0))  # σ(5) = 0.9933: loses a factor e^2 in 300 steps
    np.testing.assert_allclose(c / c[0], keep ** np.arange(T_long), rtol=1e-12)
    assert np.all(flow.by_lag("l0.h")[1:] == 0)
    states = state_verdicts(flow)
    assert (states.layer, states.leading, list(states.verdicts)) == ("l0", "c", ["c", "h"])
    assert states.label == "healthy" and states.verdicts["c"].horizon is None
    assert states.verdicts["c"].slope == pytest.approx(math.log(keep), abs=1e-12)
    assert (states.verdicts["h"].label, states.verdicts["h"].horizon) == ("vanishing", 1)
    assert verdict(flow).label == "vanishing"  # the old one-series verdict reads h only: the reported bug
    text = str(states)
    assert text.startswith("c (memory): healthy (slope -0.0067/step; the gradient stays above 1e-3 of its peak over "
                           "all 300 steps); h: vanishing")
    assert states.to_dict()["verdicts"]["c"]["label"] == "healthy" and states.to_dict()["leading"] == "c"
    # The control: forget gate 0.5, the cell state halves its memory every step.
    control = state_verdicts(gradient_flow(_memory_lstm(0.0), (x, y)))
    assert control.label == "vanishing" and control.verdicts["c"].slope == pytest.approx(math.log(0.5), abs=1e-12)


def test_lstm_with_a_large_forget_bias_has_a_healthy_memory_on_a_long_sequence(gen):
    torch.manual_seed(0)
    layer = gatelab.LSTM(3, 8, forget_bias=8.0, dtype=D)  # torch's initialisation otherwise
    x = torch.randn(300, 4, 3, dtype=D, generator=gen)
    states = state_verdicts(gradient_flow(layer, (x, torch.randn(4, 8, dtype=D, generator=gen))))
    assert states.leading == "c" and states.label == states.verdicts["c"].label == "healthy"


def test_the_leading_state_comes_from_the_cells_state_names():
    assert memory_state(gatelab.LSTM(2, 3).cells[0].state_names) == "c"
    assert memory_state(gatelab.LSTM(2, 3, full_gate_recurrence=True).cells[0].state_names) == "c"
    assert memory_state(gatelab.GRU(2, 3).cells[0].state_names) == "h"
    assert memory_state(gatelab.GatedStateRNN(2, 3).cells[0].state_names) == "s"
    layer = gatelab.GRU(3, 4, num_layers=2, bidirectional=True, dtype=D)
    flow = gradient_flow(layer, (torch.randn(6, 2, 3, dtype=D), None))
    by_layer = layer_verdicts(flow)
    assert list(by_layer) == ["l0", "l0_reverse", "l1", "l1_reverse"]
    assert [list(v.verdicts) for v in by_layer.values()] == [["h"]] * 4
    assert state_verdicts(flow).layer == "l1" and not str(state_verdicts(flow)).startswith("h (memory)")
    with pytest.raises(KeyError, match="no gradient norms for layer 'l2'"):
        state_verdicts(flow, "l2")


# -- callback, plots, diagnose ----------------------------------------------------------------------


class _Run:
    def __init__(self, model, run_dir):
        self.model, self.run_dir, self.step, self.task = model, run_dir, 0, None


def test_callback_writes_its_records(tmp_path, gen):
    model = LastStepModel(gatelab.GRU(2, 6, batch_first=True), 1)
    batch = Batch(torch.randn(4, 10, 2, generator=gen), torch.randn(4, 1, generator=gen), None, True)
    cb = GradientFlowCallback(every=2)
    run = _Run(model, tmp_path)
    cb.on_train_start(run)
    for step in range(1, 6):
        cb.on_step_end(run, step, 0.5, batch)
    cb.on_eval(run, 5, "val", {"mse": 0.25})
    cb.on_train_end(run)
    lines = [json.loads(line) for line in (tmp_path / "diagnostics.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in lines] == [("gradient", 1), ("gradient", 2), ("gradient", 4), ("eval", 5)]
    first = lines[0]
    assert len(first["gradient_norms"]["rnn.l0.h"]) == 10
    assert first["verdict"]["rnn.l0.h"]["label"] in ("vanishing", "exploding", "healthy")
    assert "rnn.l0.sigma_z" in first["saturation"] and "rnn.l0" in first["spectra"]
    assert model.training  # the diagnostic ran in eval mode and restored the mode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["diagnostics.jsonl"]  # no temporary left over
    callbacks = pytest.importorskip("gatelab.callbacks")
    assert isinstance(cb, callbacks.Callback)


def test_plots_write_png_files(tmp_path, gen):
    pytest.importorskip("matplotlib")
    from gatelab.diagnostics import plot_gate_histograms, plot_gradient_heatmap, plot_norm_vs_lag

    lstm = gatelab.LSTM(2, 4)
    stats = gate_statistics(lstm, torch.randn(6, 3, 2, generator=gen))
    paths = [
        plot_norm_vs_lag({"a": 0.5 ** np.arange(10), "b": np.ones(10)}, tmp_path / "lag.png"),
        plot_norm_vs_lag({"init": {"a": np.ones(5)}, "trained": {"a": np.arange(5.0)}}, tmp_path / "panels.png"),
        plot_gradient_heatmap({"x": ([1, 2, 3], np.random.rand(3, 8))}, tmp_path / "heat.png"),
        plot_gate_histograms({"LSTM": stats}, tmp_path / "gates.png"),
    ]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_diagnose_main_on_a_tiny_plan(tmp_path):
    pytest.importorskip("matplotlib")
    plan = tmp_path / "tiny.toml"
    plan.write_text(
        '[task]\nname = "adding"\nlength = 8\nn_train = 64\nn_val = 8\nn_test = 16\n\n'
        '[diagnose]\ntrain_steps = 4\nbatch_size = 8\nevery = 2\n\n'
        '[[model]]\nlabel = "tanh"\ncell = "rnn"\nhidden_size = 4\n\n'
        '[[model]]\nlabel = "LSTM relu gates"\ncell = "lstm"\nhidden_size = 4\ngate_activation = "relu"\n'
    )
    out = tmp_path / "out"
    summary = diagnose_main(str(plan), out, quiet=True)
    assert [c["label"] for c in summary["configurations"]] == ["tanh", "LSTM relu gates"]
    assert summary["baseline"]["mse"] > 0
    written = json.loads((out / "summary.json").read_text())
    assert written["configurations"][1]["trained"]["gradient"]["label"] in ("vanishing", "exploding", "healthy")
    for name in ("gradient_vs_lag.png", "jacobian_vs_lag.png", "gradient_heatmap.png", "gate_saturation.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(FileNotFoundError, match="adding-comparison"):
        diagnose_main("no-such-thing", out, quiet=True)
    bad = tmp_path / "bad.toml"
    bad.write_text('[task]\nname = "adding"\n[diagnose]\nsteps = 3\n[[model]]\ncell = "rnn"\n')
    with pytest.raises(ValueError, match="unknown \\[diagnose\\] key"):
        diagnose_main(str(bad), out, quiet=True)


def test_diagnose_prints_per_state_verdicts_in_plain_words(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from gatelab.diagnostics.diagnose import run_single
    from gatelab.diagnostics.experiment import ModelSpec, build_model

    plan = tmp_path / "lstm.toml"
    plan.write_text('[task]\nname = "adding"\nlength = 20\nn_train = 16\nn_val = 4\nn_test = 8\n\n'
                    '[[model]]\nlabel = "LSTM"\ncell = "lstm"\nhidden_size = 4\nforget_bias = 5.0\n')
    summary = diagnose_main(str(plan), tmp_path / "plan", quiet=False)
    printed = capsys.readouterr().err
    line = next(ln for ln in printed.splitlines() if ln.startswith("LSTM "))
    words = r"\w+ \(slope [+-]\d\.\d{4}/step; the gradient (stays above|falls below|peaks at|is largest at) "
    assert re.search(rf"init c \(memory\): {words}.*; h: {words}", line) and "horizon" not in line
    states = summary["configurations"][0]["initial"]["states"]
    assert states["leading"] == "c" and list(states["verdicts"]) == ["c", "h"]
    assert states["label"] == states["verdicts"]["c"]["label"]

    task = gatelab.tasks.get("adding", length=20, n_train=4, n_val=4, n_test=8)
    model = build_model(ModelSpec("LSTM", "lstm", 4, {"forget_bias": 5.0}), task)
    lines: list[str] = []
    single = run_single(model, task, "LSTM", tmp_path / "single", lines.append, moment="checkpoint")
    assert lines[0].startswith("LSTM: c (memory): ") and "the gradient" in lines[0] and "horizon" not in lines[0]
    by_layer = json.loads((tmp_path / "single" / "summary.json").read_text())["state_verdicts"]
    assert by_layer == single["state_verdicts"] and by_layer["rnn.l0"]["leading"] == "c"
