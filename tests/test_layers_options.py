"""Layer options beyond torch (SPEC §3; issue 3): dropout masks, zoneout, init schemes, forget bias,
residual connections, lengths, engine choice and explain(), torch conversion and state_dict keys."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import gatelab
from gatelab.cells import VARIANTS as LSTMCell_VARIANTS
from gatelab.cells import GatedStateCell, LSTMCell

F64 = torch.float64
TOL = 1e-9
I, H, T, B = 3, 4, 6, 4
LAYERS = {"RNN": gatelab.RNN, "LSTM": gatelab.LSTM, "GRU": gatelab.GRU, "GatedStateRNN": gatelab.GatedStateRNN}
TORCH = {"RNN": nn.RNN, "LSTM": nn.LSTM, "GRU": nn.GRU}


def _states(hn) -> tuple[Tensor, ...]:
    return tuple(hn) if isinstance(hn, tuple) else (hn,)


def _close(a: Tensor, b: Tensor, tol: float = TOL) -> None:
    torch.testing.assert_close(a, b, atol=tol, rtol=0)


def _step(cell: nn.Module, x: Tensor, state: tuple[Tensor, ...]) -> tuple[Tensor, tuple[Tensor, ...]]:
    """``cell(x_t, state)`` through the cell's public call; returns (output, state tuple)."""
    if isinstance(cell, LSTMCell):
        new = cell(x, state)
        return new[0], tuple(new)
    if isinstance(cell, GatedStateCell):
        y, s = cell(x, state[0])
        return y, (s,)
    h = cell(x, state[0])
    return h, (h,)


def hand_stack(layer, x: Tensor, zoneout: tuple[float, ...] | None = None, residual: bool = False):
    """The layer written out over its cells from zero state: x (T, B, I); eval-mode zoneout
    ``p·old + (1−p)·new`` per state tensor; residual ``out + input`` (layer 0 through weight_res_l0)."""
    D = layer.num_directions
    steps = range(x.shape[0])
    finals = []
    for lay in range(layer.num_layers):
        outs = []
        for d in range(D):
            cell = layer.cells[lay * D + d]
            state = tuple(x.new_zeros(x.shape[1], s) for s in cell.state_sizes())
            ys = [x.new_empty(0)] * x.shape[0]
            for t in (reversed(steps) if d else steps):
                y, new = _step(cell, x[t], state)
                if zoneout is not None:
                    new = tuple(p * old + (1 - p) * s for old, s, p in zip(state, new, zoneout))
                    y = new[0] if cell.state_names[0] == "h" else y
                ys[t], state = y, new
            outs.append(torch.stack(ys))
            finals.append(state)
        out = torch.cat(outs, -1)
        if residual:
            out = out + (x if lay or layer.weight_res_l0 is None else F.linear(x, layer.weight_res_l0))
        x = out
    return x, tuple(torch.stack(s) for s in zip(*finals))


def _recording(layer) -> list[dict]:
    """Wrap every cell's ``step`` (what the reference engine calls) to record its keyword arguments."""
    calls: list[dict] = []
    for k, cell in enumerate(layer.cells):
        def step(x, state, rec_mask=None, weight_hh=None, _inner=cell.step, _k=k):
            calls.append({"cell": _k, "rec_mask": rec_mask, "weight_hh": weight_hh})
            return _inner(x, state, rec_mask=rec_mask, weight_hh=weight_hh)
        cell.step = step
    return calls


def _identity_rnn(w_ih: float, w_hh: float, **kw) -> gatelab.RNN:
    """An RNN with φ = identity, W_ih = w_ih·I, W_hh = w_hh·I and no bias: masks can be read off the output."""
    layer = gatelab.RNN(H, H, activation="identity", bias=False, dtype=F64, **kw)
    with torch.no_grad():
        for cell in layer.cells:
            cell.weight_ih.copy_(w_ih * torch.eye(H, dtype=F64))
            cell.weight_hh.copy_(w_hh * torch.eye(H, dtype=F64))
    return layer


# -- variational dropout, DropConnect ---------------------------------------------------------------


def test_input_dropout_mask_is_one_per_sequence():
    """h_t = m ⊙ x_t with x = 1: every step shows the same mask, values 0 or 1/(1−p), resampled per call."""
    torch.manual_seed(0)
    layer = _identity_rnn(1.0, 0.0, input_dropout=0.5)
    assert layer.engine_name != "native"
    x = torch.ones(T, B, H, dtype=F64)
    out, _ = layer(x)
    mask = out[0]
    assert set(mask.unique().tolist()) == {0.0, 2.0}
    for t in range(T):
        assert torch.equal(out[t], mask), f"step {t} used another input mask"
    assert not all(torch.equal(mask[0], mask[b]) for b in range(B)), "one mask for the whole batch"
    again, _ = layer(x)
    assert not torch.equal(again[0], mask), "the mask was not resampled for the next call"
    layer.eval()
    out, _ = layer(x)
    assert torch.equal(out, x)


def test_input_dropout_mask_per_layer():
    """Two identity layers: out = m1 ⊙ m2, still the same at every step, with values in {0, 2, 4}."""
    torch.manual_seed(1)
    layer = gatelab.RNN(H, H, 2, activation="identity", bias=False, dtype=F64, input_dropout=0.5)
    with torch.no_grad():
        for cell in layer.cells:
            cell.weight_ih.copy_(torch.eye(H, dtype=F64))
            cell.weight_hh.zero_()
    out, _ = layer(torch.ones(T, 8, H, dtype=F64))
    assert (out == out[0]).all()
    assert 4.0 in out.unique().tolist(), "the second layer did not draw its own mask"


def test_recurrent_dropout_mask_is_one_per_sequence():
    """h_t = m ⊙ h_{t−1} from h_0 = 1, x = 0: h_t = m^(t+1) only if the same mask acts at every step."""
    torch.manual_seed(0)
    layer = _identity_rnn(0.0, 1.0, recurrent_dropout=0.5)
    x = torch.zeros(T, B, H, dtype=F64)
    h0 = torch.ones(1, B, H, dtype=F64)
    out, hn = layer(x, h0)
    mask = out[0]
    assert set(mask.unique().tolist()) == {0.0, 2.0}
    for t in range(T):
        _close(out[t], mask ** (t + 1))
    _close(hn[0], mask ** T)
    layer.eval()
    out, _ = layer(x, h0)
    assert torch.equal(out, h0.expand(T, B, H))


@pytest.mark.parametrize("kind", ["RNN", "LSTM", "GRU", "GatedStateRNN"])
def test_recurrent_mask_passed_to_every_step_is_the_same(kind):
    """The reference engine hands cell.step one (B, R) mask per layer and direction, every step; none in eval."""
    torch.manual_seed(0)
    extra = {"proj_size": 2} if kind == "LSTM" else {}
    layer = LAYERS[kind](I, H, 2, bidirectional=True, dtype=F64, backend="reference", recurrent_dropout=0.25, **extra)
    calls = _recording(layer)
    layer(torch.randn(T, B, I, dtype=F64))
    assert len(calls) == 4 * T
    R = layer.cells[0].recurrent_size
    masks = {}
    for c in calls:
        m = c["rec_mask"]
        assert m is not None and m.shape == (B, R)
        assert set(m.unique().tolist()) <= {0.0, 1 / 0.75}
        if c["cell"] in masks:
            assert torch.equal(m, masks[c["cell"]]), f"cell {c['cell']} got a new mask mid-sequence"
        masks[c["cell"]] = m
    assert len({tuple(m.flatten().tolist()) for m in masks.values()}) > 1, "all layers and directions share one mask"
    calls.clear()
    layer.eval()
    layer(torch.randn(T, B, I, dtype=F64))
    assert calls and all(c["rec_mask"] is None and c["weight_hh"] is None for c in calls)


@pytest.mark.parametrize("kind", ["RNN", "LSTM", "GRU", "GatedStateRNN"])
def test_dropout_options_are_off_in_eval(kind):
    """In eval every dropout option is gone: the output equals the same weights without them."""
    torch.manual_seed(0)
    plain = LAYERS[kind](I, H, 2, bidirectional=True, dtype=F64, backend="reference")
    noisy = LAYERS[kind](I, H, 2, bidirectional=True, dtype=F64, dropout=0.4, input_dropout=0.3,
                         recurrent_dropout=0.3, weight_dropout=0.3)
    noisy.load_state_dict(plain.state_dict())
    x = torch.randn(T, B, I, dtype=F64)
    trained, _ = noisy(x)
    assert not torch.allclose(trained, plain(x)[0]), "dropout did nothing in training"
    noisy.eval()
    for got, want in zip((noisy(x)[0], *_states(noisy(x)[1])), (plain(x)[0], *_states(plain(x)[1]))):
        _close(got, want)


@pytest.mark.parametrize("kind", ["RNN", "LSTM", "GRU", "GatedStateRNN"])
def test_weight_dropout_is_dropconnect_resampled_per_forward(kind):
    torch.manual_seed(0)
    p = 0.5
    layer = LAYERS[kind](I, H, dtype=F64, backend="reference", weight_dropout=p)
    calls = _recording(layer)
    x = torch.randn(T, B, I, dtype=F64)
    out1, _ = layer(x)
    W = layer.cells[0].weight_hh.detach()
    first = calls[0]["weight_hh"]
    assert first is not None and first.shape == W.shape
    assert all(c["weight_hh"] is first for c in calls), "one W_hh mask per forward, used at every step"
    dropped = first == 0
    assert dropped.any() and not dropped.all()
    _close(first[~dropped], W[~dropped] / (1 - p))
    assert calls[0]["rec_mask"] is None
    # DropConnect acts on the parameter: dropped entries get no gradient.
    out1.sum().backward()
    grad = layer.cells[0].weight_hh.grad
    assert torch.all(grad[dropped] == 0) and grad[~dropped].abs().sum() > 0
    calls.clear()
    out2, _ = layer(x)
    assert not torch.equal(calls[0]["weight_hh"], first), "W_hh mask not resampled for the next forward"
    assert not torch.allclose(out1, out2)
    calls.clear()
    layer.eval()
    layer(x)
    assert calls[0]["weight_hh"] is None


# -- zoneout ---------------------------------------------------------------------------------------

ZONEOUT = {
    "RNN": (gatelab.RNN, {}, 0.3),
    "GRU": (gatelab.GRU, {}, 0.3),
    "LSTM": (gatelab.LSTM, {}, (0.3, 0.6)),
    "LSTM_proj": (gatelab.LSTM, {"proj_size": 2}, (0.2, 0.5)),
    "LSTM_hard_sigmoid": (gatelab.LSTM, {"gate_activation": "hard_sigmoid"}, 0.4),
    "GatedStateRNN": (gatelab.GatedStateRNN, {}, 0.3),
}


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("name", list(ZONEOUT))
def test_zoneout_in_eval_is_the_expectation(name, backend):
    """Eval: deterministic, and each state is p·old + (1−p)·new (per-state rates for LSTM's h and c)."""
    cls, kw, rate = ZONEOUT[name]
    torch.manual_seed(0)
    layer = cls(I, H, 2, bidirectional=True, dtype=F64, zoneout=rate, backend=backend, **kw).eval()
    assert layer.engine_name == ("fused" if backend == "auto" else "reference")
    assert backend == "reference" or "zoneout" in layer.explain()  # why not native
    rates = rate if isinstance(rate, tuple) else (rate,) * len(layer.state_names)
    x = torch.randn(T, B, I, dtype=F64)
    out, hn = layer(x)
    out2, hn2 = layer(x)
    assert torch.equal(out, out2) and all(torch.equal(a, b) for a, b in zip(_states(hn), _states(hn2)))
    want_out, want_hn = hand_stack(layer, x, zoneout=rates)
    if name != "GatedStateRNN":  # its output y = o ⊙ s is not a state; the state s is checked below
        _close(out, want_out)
    for got, want in zip(_states(hn), want_hn):
        _close(got, want)
    plain, _ = hand_stack(layer, x)
    assert not torch.allclose(out, plain), "zoneout changed nothing in eval"


@pytest.mark.parametrize("backend", ["fused", "reference"])
def test_zoneout_in_training_keeps_each_unit_or_updates_it(backend):
    """Training: every unit is either its previous value or the cell's update, at random, about p of them kept."""
    torch.manual_seed(0)
    p = 0.5
    layer = gatelab.RNN(I, 8, dtype=F64, zoneout=p, backend=backend)
    assert layer.engine_name == backend
    cell = layer.cells[0]
    x = torch.randn(T, B, I, dtype=F64)
    out, _ = layer(x)
    kept = updated = 0
    prev = torch.zeros(B, 8, dtype=F64)
    for t in range(T):
        new = cell(x[t], prev)
        is_old = (out[t] - prev).abs() < 1e-12
        is_new = (out[t] - new).abs() < 1e-12
        assert torch.all(is_old | is_new), f"step {t}: a unit is neither kept nor updated"
        kept += int((is_old & ~is_new).sum())
        updated += int((is_new & ~is_old).sum())
        prev = out[t]
    assert 0.25 < kept / (kept + updated) < 0.75
    again, _ = layer(x)
    assert not torch.equal(out, again), "zoneout in training drew the same units twice"


def test_zoneout_one_rate_per_state():
    layer = gatelab.LSTM(I, H, zoneout=(0.1, 0.2))
    assert layer.zoneout == (0.1, 0.2)
    assert gatelab.LSTM(I, H, zoneout=0.3).zoneout == (0.3, 0.3)
    assert gatelab.GRU(I, H, zoneout=0.3).zoneout == (0.3,)


# -- initialisation and forget bias ----------------------------------------------------------------


def _block(t: Tensor, cell, name: str) -> Tensor:
    return t[cell.blocks.index(name) * cell.hidden_size:(cell.blocks.index(name) + 1) * cell.hidden_size]


@pytest.mark.parametrize("init", ["torch", "orthogonal", "chrono"])
@pytest.mark.parametrize("kind,gate", [("LSTM", "f"), ("GRU", "z"), ("GatedStateRNN", "f")])
def test_forget_bias_sets_the_effective_bias(kind, gate, init):
    torch.manual_seed(0)
    layer = LAYERS[kind](I, H, 2, bidirectional=True, dtype=F64, init=init, forget_bias=1.0, chrono_max_length=10)
    for cell in layer.cells:
        effective = cell.bias_ih + cell.bias_hh
        assert torch.equal(_block(effective, cell, gate), torch.ones(H, dtype=F64))
        others = [b for b in cell.blocks if b != gate]
        assert not any(torch.equal(_block(effective, cell, b), torch.ones(H, dtype=F64)) for b in others)
    sd = layer.state_dict()
    assert torch.equal(_block(sd["bias_ih_l1_reverse"] + sd["bias_hh_l1_reverse"], layer.cells[3], gate),
                       torch.ones(H, dtype=F64))


def test_forget_bias_on_cifg_lstm():
    """CIFG has no input-gate rows; the forget block is found by name, not position."""
    layer = gatelab.LSTM(I, H, variant="CIFG", forget_bias=2.5, dtype=F64, backend="reference")
    cell = layer.cells[0]
    assert cell.blocks == ("f", "g", "o")
    assert torch.equal((cell.bias_ih + cell.bias_hh)[:H], torch.full((H,), 2.5, dtype=F64))


@pytest.mark.parametrize("kind", ["RNN", "LSTM", "GRU", "GatedStateRNN"])
def test_identity_init(kind):
    torch.manual_seed(0)
    layer = LAYERS[kind](I, H, 2, bidirectional=True, dtype=F64, init="identity")
    eye = torch.eye(H, dtype=F64)
    for cell in layer.cells:
        G = len(cell.blocks)
        assert torch.equal(cell.weight_hh, eye.repeat(G, 1)), "every recurrent block must be I"
        assert torch.all(cell.bias_ih == 0) and torch.all(cell.bias_hh == 0)
        assert cell.weight_ih.abs().max() < 0.01 and cell.weight_ih.abs().max() > 0
    if kind == "RNN":
        assert torch.equal(layer.weight_hh_l0, eye)


@pytest.mark.parametrize("kind", ["RNN", "LSTM", "GRU", "GatedStateRNN"])
def test_orthogonal_init_per_gate_block(kind):
    torch.manual_seed(0)
    layer = LAYERS[kind](I, H, 2, bidirectional=True, dtype=F64, init="orthogonal")
    eye = torch.eye(H, dtype=F64)
    for cell in layer.cells:
        blocks = cell.weight_hh.split(H, 0)
        assert len(blocks) == len(cell.blocks)
        for w in blocks:
            _close(w @ w.T, eye, 1e-6)
        assert not torch.allclose(blocks[0], blocks[-1]) or len(blocks) == 1
        fan_in = cell.weight_ih.shape[1]
        bound = math.sqrt(6 / (fan_in + H))  # xavier_uniform per (H, fan_in) block
        assert cell.weight_ih.abs().max() <= bound
        assert torch.all(cell.bias_ih == 0) and torch.all(cell.bias_hh == 0)
    whole = layer.cells[0].weight_hh
    if whole.shape[0] > H:  # orthogonal per block, not as one tall matrix
        assert not torch.allclose(whole.T @ whole, eye)


@pytest.mark.parametrize("kind,gate", [("LSTM", "f"), ("GRU", "z"), ("GatedStateRNN", "f")])
def test_chrono_init(kind, gate):
    """Tallec & Ollivier: forget bias log U(1, T_max − 1), so in [0, log(T_max − 1)]; LSTM input bias its negative."""
    torch.manual_seed(0)
    T_max = 50
    layer = LAYERS[kind](I, H, 2, bidirectional=True, dtype=F64, init="chrono", chrono_max_length=T_max)
    for cell in layer.cells:
        keep = _block(cell.bias_ih + cell.bias_hh, cell, gate)
        assert torch.all(keep >= 0) and torch.all(keep <= math.log(T_max - 1))
        assert keep.std() > 0.1, "chrono biases are spread, not one value"
        assert torch.all(_block(cell.bias_hh, cell, gate) == 0)
        if kind == "LSTM":
            assert torch.equal(_block(cell.bias_ih + cell.bias_hh, cell, "i"), -keep)


def test_torch_init_bounds():
    torch.manual_seed(0)
    layer = gatelab.LSTM(I, 16, dtype=F64)
    for p in layer.parameters():
        assert p.abs().max() <= 1 / 4 and p.abs().max() > 0.2


# -- residual --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["RNN", "LSTM", "GRU", "GatedStateRNN"])
def test_residual_equals_hand_sum(kind):
    """Sizes match (input = D·H): identity shortcuts at every layer, no extra parameter."""
    torch.manual_seed(0)
    layer = LAYERS[kind](2 * H, H, 3, bidirectional=True, dtype=F64, residual=True)
    assert layer.weight_res_l0 is None and "weight_res_l0" not in layer.state_dict()
    x = torch.randn(T, B, 2 * H, dtype=F64)
    out, hn = layer(x)
    want_out, want_hn = hand_stack(layer, x, residual=True)
    _close(out, want_out)
    for got, want in zip(_states(hn), want_hn):
        _close(got, want)
    plain = LAYERS[kind](2 * H, H, 1, bidirectional=True, dtype=F64)
    single = LAYERS[kind](2 * H, H, 1, bidirectional=True, dtype=F64, residual=True)
    single.load_state_dict(plain.state_dict())
    _close(single(x)[0], plain(x)[0] + x)


@pytest.mark.parametrize("kind,extra", [("LSTM", {}), ("LSTM", {"proj_size": 2}), ("GRU", {}), ("RNN", {})])
def test_residual_projection_for_layer_zero(kind, extra):
    torch.manual_seed(0)
    layer = LAYERS[kind](I, H, 2, bidirectional=True, dtype=F64, residual=True, **extra)
    O = extra.get("proj_size", H)
    assert layer.weight_res_l0.shape == (2 * O, I)
    assert "weight_res_l0" in layer.state_dict()
    x = torch.randn(T, B, I, dtype=F64)
    out, _ = layer(x)
    want, _ = hand_stack(layer, x, residual=True)
    _close(out, want)
    out.sum().backward()
    assert layer.weight_res_l0.grad is not None and layer.weight_res_l0.grad.abs().sum() > 0
    copy = LAYERS[kind](I, H, 2, bidirectional=True, dtype=F64, residual=True, **extra)
    copy.load_state_dict(layer.state_dict())  # strict, weight_res_l0 included
    assert torch.equal(copy.weight_res_l0, layer.weight_res_l0)
    _close(copy(x)[0], out)


def test_residual_with_lengths_equals_packed():
    torch.manual_seed(0)
    layer = gatelab.GRU(I, H, 2, bidirectional=True, dtype=F64, residual=True)
    x = torch.randn(T, T, I, dtype=F64)
    lengths = torch.tensor([3, 6, 1, 5, 2, 4])
    out, hn = layer(x, lengths=lengths)
    packed, hn_p = layer(pack_padded_sequence(x, lengths, enforce_sorted=False))
    _close(out, pad_packed_sequence(packed, total_length=T)[0])
    _close(hn, hn_p)
    for b, n in enumerate(lengths.tolist()):
        assert torch.all(out[n:, b] == 0)
        _close(out[:n, b:b + 1], hand_stack(layer, x[:n, b:b + 1], residual=True)[0])


# -- lengths= --------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_first", [False, True], ids=["seq_first", "batch_first"])
@pytest.mark.parametrize("engine", ["native", "reference", "auto"])
@pytest.mark.parametrize("kind,extra", [("RNN", {}), ("LSTM", {"proj_size": 2}), ("GRU", {}),
                                        ("LSTM", {"gate_activation": "hard_sigmoid"})])
def test_lengths_equals_packed_sequence(kind, extra, engine, batch_first):
    torch.manual_seed(0)
    warn = engine == "native" and "gate_activation" in extra
    with pytest.warns(UserWarning, match="falling back") if warn else _nothing():
        layer = LAYERS[kind](I, H, 2, bidirectional=True, batch_first=batch_first, dtype=F64, backend=engine, **extra)
    lengths = torch.tensor([3, 6, 1, 5, 2, 4])
    x = torch.randn(T, T, I, dtype=F64)
    if batch_first:
        x = x.transpose(0, 1).contiguous()
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, hn = layer(x1, lengths=lengths)
    packed, hn_p = layer(pack_padded_sequence(x2, lengths, batch_first=batch_first, enforce_sorted=False))
    _close(out, pad_packed_sequence(packed, batch_first=batch_first, total_length=T)[0])
    for a, b in zip(_states(hn), _states(hn_p)):
        _close(a, b)
    out.sum().backward()
    packed.data.sum().backward()
    _close(x1.grad, x2.grad)
    steps = torch.arange(T).unsqueeze(1) < lengths  # (T, B)
    live = steps.T if batch_first else steps
    assert torch.all(out[~live] == 0) and torch.all(out[live] != 0)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# -- engine choice and explain() -------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["RNN", "LSTM", "GRU"])
def test_explain_names_native_for_torch_defaults(kind):
    layer = LAYERS[kind](I, H, 2, bidirectional=True, batch_first=True, dtype=F64)
    assert layer.engine_name == "native"
    text = layer.explain()
    assert "'native'" in text and kind in text and "training" in text
    assert "eval" in layer.eval().explain()
    relu = gatelab.RNN(I, H, nonlinearity="relu")
    assert relu.engine_name == "native" and "'native'" in relu.explain()
    proj = gatelab.LSTM(I, H, proj_size=2)
    assert proj.engine_name == "native"


@pytest.mark.parametrize("make,blocker", [
    (lambda: gatelab.LSTM(I, H, gate_activation="hard_sigmoid"), "hard_sigmoid"),
    (lambda: gatelab.LSTM(I, H, gate_activation={"f": "elliott"}), "elliott"),
    (lambda: gatelab.LSTM(I, H, cell_activation="softsign"), "softsign"),
    (lambda: gatelab.LSTM(I, H, peephole=True), "peephole"),
    (lambda: gatelab.LSTM(I, H, layer_norm=True), "layer_norm"),
    (lambda: gatelab.LSTM(I, H, variant="CIFG"), "coupled"),
    (lambda: gatelab.LSTM(I, H, zoneout=0.1), "zoneout"),
    (lambda: gatelab.GRU(I, H, reset_after=False), "reset_after"),
    (lambda: gatelab.GRU(I, H, residual=True), "residual"),
    (lambda: gatelab.RNN(I, H, nonlinearity="softsign"), "softsign"),
    (lambda: gatelab.RNN(I, H, input_dropout=0.2), "input_dropout"),
    (lambda: gatelab.GatedStateRNN(I, H), "GatedStateCell"),
])
def test_explain_names_what_keeps_torchs_kernel_out(make, blocker):
    layer = make()
    assert layer.engine_name != "native"
    text = layer.explain()
    assert blocker in text and f"'{layer.engine_name}'" in text


@pytest.mark.parametrize("make,blocker", [
    (lambda **kw: gatelab.LSTM(I, H, gate_activation="hard_sigmoid", **kw), "hard_sigmoid"),
    (lambda **kw: gatelab.LSTM(I, H, peephole=True, **kw), "peephole"),
    (lambda **kw: gatelab.GRU(I, H, zoneout=0.2, **kw), "zoneout"),
    (lambda **kw: gatelab.RNN(I, H, nonlinearity="elliott", **kw), "elliott"),
    (lambda **kw: gatelab.GatedStateRNN(I, H, **kw), "GatedStateCell"),
])
def test_native_backend_falls_back_or_raises(make, blocker):
    with pytest.warns(UserWarning, match=f"backend='native' cannot run this layer: .*{blocker}.*falling back"):
        layer = make(backend="native")
    assert layer.engine_name == "reference"
    assert "fell back" in layer.explain() and blocker in layer.explain()
    x = torch.randn(T, B, I)
    out, _ = layer(x)
    assert out.shape == (T, B, layer.cells[0].output_size)
    with pytest.raises(ValueError, match=f"backend='native' cannot run this layer: .*{blocker}.*strict=True"):
        make(backend="native", strict=True)


def test_reference_backend_runs_reference_for_torch_defaults():
    layer = gatelab.LSTM(I, H, backend="reference")
    assert layer.engine_name == "reference" and "'reference'" in layer.explain()


@pytest.mark.parametrize("option", ["recurrent_dropout", "input_dropout", "weight_dropout"])
def test_dropout_options_switch_to_native_in_eval(option):
    torch.manual_seed(0)
    layer = gatelab.LSTM(I, H, 2, dtype=F64, **{option: 0.3})
    training_engine = layer.engine_name  # reference, or gatelab's fused engine once it exists
    assert training_engine in ("reference", "fused") and option in layer.explain()
    model = nn.Sequential(layer)
    model.eval()  # reaches the layer through nn.Module.train(False)
    assert layer.engine_name == "native"
    assert "'native'" in layer.explain() and "eval" in layer.explain()
    ref = nn.LSTM(I, H, 2, dtype=F64).eval()
    ref.load_state_dict(layer.state_dict())
    x = torch.randn(T, B, I, dtype=F64)
    _close(layer(x)[0], ref(x)[0])
    model.train()
    assert layer.engine_name == training_engine and "training" in layer.explain()


def test_zoneout_stays_off_native_in_eval():
    for layer in (gatelab.GRU(I, H, zoneout=0.2).eval(), gatelab.LSTM(I, H, zoneout=0.2).eval()):
        assert layer.engine_name == "fused" and "zoneout" in layer.explain()


# -- torch conversion and state_dict -----------------------------------------------------------------


@pytest.mark.parametrize("make", [
    lambda: nn.RNN(I, H, 2, nonlinearity="relu", bidirectional=True, dtype=F64),
    lambda: nn.RNN(I, H, batch_first=True, bias=False, dtype=F64),
    lambda: nn.LSTM(I, H, 3, bidirectional=True, proj_size=2, dtype=F64),
    lambda: nn.LSTM(I, H, 2, batch_first=True, dtype=F64),
    lambda: nn.GRU(I, H, 2, bidirectional=True, batch_first=True, dtype=F64),
], ids=["rnn_relu_bi", "rnn_nobias_bf", "lstm_proj_bi", "lstm_bf", "gru_bi_bf"])
def test_from_torch_and_to_torch_round_trip(make):
    torch.manual_seed(0)
    ref = make()
    cls = {nn.RNN: gatelab.RNN, nn.LSTM: gatelab.LSTM, nn.GRU: gatelab.GRU}[type(ref)]
    layer = cls.from_torch(ref)
    for attr in ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "bidirectional"):
        assert getattr(layer, attr) == getattr(ref, attr), attr
    assert layer.engine_name == "native"
    x = torch.randn(B, T, I, dtype=F64) if ref.batch_first else torch.randn(T, B, I, dtype=F64)
    out_t, hn_t = ref(x)
    out_g, hn_g = layer(x)
    _close(out_g, out_t)
    for a, b in zip(_states(hn_g), _states(hn_t)):
        _close(a, b)
    back = layer.to_torch()
    assert type(back) is type(ref)
    assert back.state_dict().keys() == ref.state_dict().keys()
    assert all(torch.equal(back.state_dict()[k], v) for k, v in ref.state_dict().items())
    for attr in ("num_layers", "bias", "batch_first", "bidirectional", "proj_size", "mode"):
        assert getattr(back, attr, None) == getattr(ref, attr, None), attr
    if isinstance(ref, nn.RNN):
        assert back.nonlinearity == ref.nonlinearity
    _close(back(x)[0], out_t)


def test_from_torch_with_extra_options_runs_them():
    ref = nn.LSTM(I, H, dtype=F64)
    layer = gatelab.LSTM.from_torch(ref, gate_activation="hard_sigmoid")
    assert torch.equal(layer.weight_hh_l0, ref.weight_hh_l0)
    assert "hard_sigmoid" in layer.explain()
    x = torch.randn(T, B, I, dtype=F64)
    want, _ = hand_stack(layer, x)
    _close(layer(x)[0], want)


@pytest.mark.parametrize("make,why", [
    (lambda: gatelab.LSTM(I, H, peephole=True), "peephole"),
    (lambda: gatelab.LSTM(I, H, gate_activation="hard_sigmoid"), "hard_sigmoid"),
    (lambda: gatelab.LSTM(I, H, zoneout=0.1), "zoneout"),
    (lambda: gatelab.LSTM(I, H, 2, residual=True), "residual"),
    (lambda: gatelab.GRU(I, H, reset_after=False), "reset_after"),
    (lambda: gatelab.GRU(I, H, recurrent_dropout=0.1), "recurrent_dropout"),
    (lambda: gatelab.RNN(I, H, nonlinearity="softsign"), "softsign"),
])
def test_to_torch_refuses_what_torch_cannot_express(make, why):
    with pytest.raises(ValueError, match=f"to_torch: torch.nn cannot express .*{why}"):
        make().to_torch()


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("num_layers", [1, 3])
@pytest.mark.parametrize("kind,extra", [("RNN", {}), ("RNN", {"nonlinearity": "relu"}), ("LSTM", {}),
                                        ("LSTM", {"proj_size": 2}), ("GRU", {})])
def test_state_dict_keys_are_torchs(kind, extra, num_layers, bidirectional, bias):
    torch.manual_seed(0)
    kw = dict(num_layers=num_layers, bidirectional=bidirectional, bias=bias, **extra)
    ref = TORCH[kind](I, H, **kw)
    layer = LAYERS[kind](I, H, **kw)
    assert list(layer.state_dict().keys()) == list(ref.state_dict().keys())
    for k, v in layer.state_dict().items():
        assert v.shape == ref.state_dict()[k].shape, k
    layer.load_state_dict(ref.state_dict())  # strict both ways
    ref2 = TORCH[kind](I, H, **kw)
    ref2.load_state_dict(layer.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), ref2.state_dict().values()))
    for name, p in ref.named_parameters():  # torch's attribute names read the same tensors
        assert torch.equal(getattr(layer, name), p), name


def test_state_dict_loads_inside_a_parent_module():
    """Keys keep their prefix: a model holding torch.nn.LSTM loads into one holding gatelab.LSTM."""
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(I, I, dtype=F64), nn.LSTM(I, H, 2, bidirectional=True, dtype=F64))
    model = nn.Sequential(nn.Linear(I, I, dtype=F64), gatelab.LSTM(I, H, 2, bidirectional=True, dtype=F64))
    assert list(model.state_dict().keys()) == list(ref.state_dict().keys())
    model.load_state_dict(ref.state_dict())
    x = torch.randn(T, B, I, dtype=F64)
    _close(model(x)[0], ref(x)[0])


def test_torch_parameter_names_read_the_cells():
    layer = gatelab.GRU(I, H, 2, bidirectional=True)
    assert layer.weight_hh_l1_reverse is layer.cells[3].weight_hh
    assert layer.bias_ih_l0 is layer.cells[0].bias_ih
    with pytest.raises(AttributeError):
        _ = layer.weight_ih_l2
    with pytest.raises(AttributeError):
        _ = gatelab.GRU(I, H).weight_ih_l0_reverse


@pytest.mark.parametrize("name,kw", [
    ("GatedStateRNN", {}),
    ("LSTM", {"layer_norm": True}),
    ("LSTM", {"peephole": True}),
    ("LSTM", {"variant": "CIFG"}),
    ("LSTM", {"variant": "FGR"}),
])
def test_extra_configs_keep_parameters_in_state_dict(name, kw):
    """Options beyond torch save their parameters under torch-style names and load back (strict)."""
    torch.manual_seed(0)
    layer = LAYERS[name](I, H, 2, bidirectional=True, dtype=F64, backend="reference", **kw)
    sd = layer.state_dict()
    assert all(not k.startswith("cells.") for k in sd)
    assert all(k.endswith(("_l0", "_l1", "_l0_reverse", "_l1_reverse")) for k in sd)
    assert len(sd) == len(list(layer.parameters()))
    copy = LAYERS[name](I, H, 2, bidirectional=True, dtype=F64, backend="reference", **kw)
    copy.load_state_dict(sd)
    x = torch.randn(T, B, I, dtype=F64)
    _close(copy(x)[0], layer(x)[0])


@pytest.mark.parametrize("variant", list(LSTMCell_VARIANTS))
def test_every_greff_variant_builds_and_runs_under_auto(variant):
    """The default backend builds every named variant (a regression: CIFG and NIG/NFG/NOG once raised
    KeyError in the fused engine's C++ eligibility check), runs it, and agrees with the reference engine.
    NP (no peepholes) is torch's LSTM, so torch's kernel runs it."""
    torch.manual_seed(0)
    layer = gatelab.LSTM(I, H, 2, bidirectional=True, variant=variant, dtype=F64)
    assert (layer.engine_name == "native") == (variant == "NP")
    assert f"'{layer.engine_name}'" in layer.explain()
    x = torch.randn(T, B, I, dtype=F64)
    ref = gatelab.LSTM(I, H, 2, bidirectional=True, variant=variant, dtype=F64, backend="reference")
    ref.load_state_dict(layer.state_dict())
    _close(layer(x)[0], ref(x)[0])


# -- drop-in gaps ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["RNN", "LSTM", "GRU"])
def test_flatten_parameters_is_accepted(kind):
    layer = LAYERS[kind](I, H, 2, dtype=F64)
    x = torch.randn(T, B, I, dtype=F64)
    before, _ = layer(x)
    assert layer.flatten_parameters() is None
    _close(layer(x)[0], before)


@pytest.mark.parametrize("kind", ["LSTM", "GatedStateRNN"])
def test_layer_pickles_like_torchs(kind):
    import io

    layer = LAYERS[kind](I, H, 2, dtype=F64)
    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    copy = torch.load(buf, weights_only=False)
    x = torch.randn(T, B, I, dtype=F64)
    _close(copy(x)[0], layer(x)[0])
    assert copy.cells[0].sigma_f is layer.cells[0].sigma_f  # the registry's object, so dispatch still works
