"""Golden values for the cells where torch has no oracle (SPEC §2), computed by hand.

Every weight matrix is constant inside each gate block (a different constant per block, so a gate
order mistake shows), which makes every unit's pre-activation the same scalar: the expected numbers
below come from SPEC §2's equations in plain Python floats, one unit at a time, never from the cells.
Block layouts follow SPEC §2 too: torch's gate order (LSTM ``i f g o``, GRU ``r z n``), GatedState
``f i o s̃``, and a gate without weights (removed, or CIFG's input gate) has no row block.
"""

from __future__ import annotations

import math

import pytest
import torch

import gatelab

pytestmark = pytest.mark.usefixtures("single_thread")

F64 = torch.float64
I, H = 3, 3
X = [[0.5, -0.3, 0.9], [-0.7, 0.2, 0.4]]  # batch of two, different rows
H0 = [[0.2, -0.4, 0.6], [0.1, 0.3, -0.5]]
C0 = [[0.3, -0.5, 0.1], [-0.2, 0.4, 0.6]]
GATES0 = [[0.6, 0.5, 0.4, 0.7, 0.8, 0.9, 0.3, 0.2, 0.1],  # previous step's i, f, o (FGR)
          [0.1, 0.9, 0.5, 0.2, 0.6, 0.3, 0.8, 0.4, 0.7]]

LSTM_W_IH = {"i": 0.1, "f": 0.2, "g": -0.1, "o": 0.15}
LSTM_W_HH = {"i": -0.2, "f": 0.1, "g": 0.25, "o": -0.15}
LSTM_B_IH = {"i": 0.05, "f": 0.3, "g": -0.05, "o": 0.1}
LSTM_B_HH = {"i": 0.02, "f": 0.2, "g": 0.04, "o": -0.03}
PEEP = {"i": 0.3, "f": -0.2, "o": 0.4}
GR = {  # weight_gr block (row gate, column gate of the previous step)
    "i": {"i": 0.05, "f": -0.1, "o": 0.07},
    "f": {"i": 0.02, "f": 0.08, "o": -0.04},
    "o": {"i": -0.06, "f": 0.03, "o": 0.09},
}
HR = [0.5, -0.3]  # weight_hr rows (proj_size 2)
LN = {"ih": 1.2, "hh": 0.8, "c": 1.1, "c_bias": 0.05}  # LayerNorm gains and the cell-norm bias
EPS = 1e-5


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def hard_sig(x: float) -> float:
    return min(max(x / 6 + 0.5, 0.0), 1.0)


def softsign(x: float) -> float:
    return x / (1 + abs(x))


def elliott(x: float) -> float:
    return 0.5 * x / (1 + abs(x)) + 0.5


def ident(x: float) -> float:
    return x


def layer_norm(v: list[float], gain: float, bias: float = 0.0) -> list[float]:
    m = sum(v) / len(v)
    var = sum((a - m) ** 2 for a in v) / len(v)
    return [(a - m) / math.sqrt(var + EPS) * gain + bias for a in v]


def _fill_blocks(cell, layout, w_ih, w_hh, b_ih, b_hh) -> None:
    n = cell.hidden_size
    assert tuple(cell.weight_ih.shape) == (len(layout) * n, cell.input_size)
    with torch.no_grad():
        for k, b in enumerate(layout):
            rows = slice(k * n, (k + 1) * n)
            cell.weight_ih[rows] = w_ih[b]
            cell.weight_hh[rows] = w_hh[b]
            if cell.bias:
                cell.bias_ih[rows] = b_ih[b]
                cell.bias_hh[rows] = b_hh[b]


def _t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=F64)


def _close(actual: torch.Tensor, expected) -> None:
    torch.testing.assert_close(actual, _t(expected), rtol=1e-12, atol=1e-13)


# -- LSTM -----------------------------------------------------------------------------------------


def lstm_by_hand(x, h, c, *, gates="ifo", coupled=False, peephole=False, current=True, sigma=None,
                 phi=math.tanh, psi=math.tanh, prev=None, proj=False, ln=False, bias=True):
    """SPEC §2's LSTM for one batch row with the constants above; returns (h', c', gates')."""
    sigma = {"i": sig, "f": sig, "o": sig, **(sigma or {})}
    layout = [b for b in "ifgo" if b == "g" or (b in gates and not (coupled and b == "i"))]
    sx, sh = sum(x), sum(h)
    b = {k: (LSTM_B_IH[k] + LSTM_B_HH[k]) if bias else 0.0 for k in "ifgo"}
    if ln:  # LayerNorm over all G·H entries of W_ih x, and of W_hh h, then the biases
        gi = layer_norm([LSTM_W_IH[k] * sx for k in layout for _ in range(H)], LN["ih"])
        gh = layer_norm([LSTM_W_HH[k] * sh for k in layout for _ in range(H)], LN["hh"])
        pre = {k: gi[n * H] + gh[n * H] + b[k] for n, k in enumerate(layout)}
    else:
        pre = {k: LSTM_W_IH[k] * sx + LSTM_W_HH[k] * sh + b[k] for k in layout}
    if prev is not None:
        for row in "ifo":
            if row in pre:
                pre[row] += sum(GR[row][col] * sum(prev[n * H:(n + 1) * H]) for n, col in enumerate("ifo"))

    def peep(k, cj):
        return PEEP[k] * cj if peephole else 0.0

    cs, os_, is_, fs = [], [], [], []
    for j in range(H):
        f = sigma["f"](pre["f"] + peep("f", c[j])) if "f" in gates else 1.0
        i = 1 - f if coupled else (sigma["i"](pre["i"] + peep("i", c[j])) if "i" in gates else 1.0)
        g = phi(pre["g"])
        c_new = f * c[j] + i * g
        o = sigma["o"](pre["o"] + peep("o", c_new if current else c[j])) if "o" in gates else 1.0
        cs.append(c_new)
        os_.append(o)
        is_.append(i)
        fs.append(f)
    c_read = layer_norm(cs, LN["c"], LN["c_bias"]) if ln else cs
    hs = [o * psi(cj) for o, cj in zip(os_, c_read)]
    if proj:
        hs = [w * sum(hs) for w in HR]
    return hs, cs, is_ + fs + os_


def make_lstm(**kwargs) -> gatelab.LSTMCell:
    cell = gatelab.LSTMCell(I, H, dtype=F64, **kwargs)
    gates, coupled, peephole = cell.gates, cell.coupled, cell.peephole  # a variant may set them
    layout = [b for b in "ifgo" if b == "g" or (b in gates and not (coupled and b == "i"))]
    _fill_blocks(cell, layout, LSTM_W_IH, LSTM_W_HH, LSTM_B_IH, LSTM_B_HH)
    with torch.no_grad():
        for k in "ifo":
            p = getattr(cell, f"weight_c{k}")
            has = peephole and k in layout
            assert (p is not None) == has, k
            if has:
                p.fill_(PEEP[k])
        if cell.full_gate_recurrence:
            for r, row in enumerate("ifo"):
                for q, col in enumerate("ifo"):
                    cell.weight_gr[r * H:(r + 1) * H, q * H:(q + 1) * H] = GR[row][col]
        if cell.proj_size:
            for p, w in enumerate(HR):
                cell.weight_hr[p] = w
        if cell.layer_norm:
            cell.ln_ih_weight.fill_(LN["ih"])
            cell.ln_hh_weight.fill_(LN["hh"])
            cell.ln_c_weight.fill_(LN["c"])
            cell.ln_c_bias.fill_(LN["c_bias"])
    return cell


def check_lstm(cell, h0=H0, fgr=False, **hand) -> None:
    state = (_t(h0), _t(C0), _t(GATES0)) if fgr else (_t(h0), _t(C0))
    out = cell(_t(X), state)
    expected = [lstm_by_hand(x, h, c, prev=g if fgr else None, **hand) for x, h, c, g in zip(X, h0, C0, GATES0)]
    assert len(out) == (3 if fgr else 2)
    for k, actual in enumerate(out):
        _close(actual, [e[k] for e in expected])


LSTM_CASES = {
    "plain": ({}, {}),
    "nobias": ({"bias": False}, {"bias": False}),
    "peephole-current": ({"peephole": True}, {"peephole": True}),
    "peephole-previous": ({"peephole": True, "peephole_output": "previous"}, {"peephole": True, "current": False}),
    "coupled": ({"coupled": True}, {"coupled": True}),
    "coupled-peephole-previous": ({"coupled": True, "peephole": True, "peephole_output": "previous"},
                                  {"coupled": True, "peephole": True, "current": False}),
    "gates-o": ({"gates": "o"}, {"gates": "o"}),
    "gates-none": ({"gates": ""}, {"gates": ""}),
    "per-gate-activations": (
        {"gate_activation": {"f": "hard_sigmoid", "o": "elliott"}, "candidate_activation": "softsign",
         "cell_activation": "elliott", "peephole": True},
        {"sigma": {"f": hard_sig, "o": elliott}, "phi": softsign, "psi": elliott, "peephole": True},
    ),
    "layer_norm": ({"layer_norm": True}, {"ln": True}),
    "layer_norm-peephole-nobias": ({"layer_norm": True, "peephole": True, "bias": False},
                                   {"ln": True, "peephole": True, "bias": False}),
}


@pytest.mark.parametrize("options, hand", LSTM_CASES.values(), ids=LSTM_CASES.keys())
def test_lstm_golden(options, hand):
    check_lstm(make_lstm(**options), **hand)


def test_lstm_projection_golden():
    h0 = [[0.2, -0.4], [0.1, 0.3]]  # the recurrent state has proj_size features
    cell = make_lstm(proj_size=2, peephole=True)
    check_lstm(cell, h0=h0, proj=True, peephole=True)


def test_lstm_full_gate_recurrence_golden():
    check_lstm(make_lstm(full_gate_recurrence=True), fgr=True)
    check_lstm(make_lstm(full_gate_recurrence=True, gates="fo"), fgr=True, gates="fo")


GREFF = {  # SPEC §2: each variant is the vanilla LSTM (with peepholes) with one change
    "vanilla": {},
    "NIG": {"gates": "fo"},
    "NFG": {"gates": "io"},
    "NOG": {"gates": "if"},
    "NIAF": {"phi": ident},
    "NOAF": {"psi": ident},
    "NP": {"peephole": False},
    "CIFG": {"coupled": True},
    "FGR": {"fgr": True},
}


@pytest.mark.parametrize("variant", GREFF)
def test_greff_variant_golden(variant):
    hand = {"peephole": True, **GREFF[variant]}
    check_lstm(make_lstm(variant=variant), **hand)


def test_golden_values_are_not_trivial():
    """The hand computation distinguishes what the cases above are meant to distinguish."""
    base = lstm_by_hand(X[0], H0[0], C0[0], peephole=True)
    for other in ({"peephole": True, "current": False}, {"peephole": True, "coupled": True}, {"peephole": False},
                  {"peephole": True, "gates": "fo"}, {"peephole": True, "ln": True}):
        assert abs(lstm_by_hand(X[0], H0[0], C0[0], **other)[0][0] - base[0][0]) > 1e-3, other
    # units differ (per-unit c and peepholes), and the two batch rows differ
    assert len({round(v, 9) for v in base[0]}) == H
    assert abs(lstm_by_hand(X[1], H0[1], C0[1], peephole=True)[0][0] - base[0][0]) > 1e-3


# -- GRU ------------------------------------------------------------------------------------------

GRU_W_IH = {"r": 0.1, "z": -0.2, "n": 0.3}
GRU_W_HH = {"r": 0.2, "z": 0.15, "n": -0.25}
GRU_B_IH = {"r": 0.05, "z": 0.1, "n": -0.1}
GRU_B_HH = {"r": -0.02, "z": 0.03, "n": 0.07}


def gru_by_hand(x, h, *, reset_after=True, sigma_r=sig, sigma_z=sig, phi=math.tanh):
    sx, sh = sum(x), sum(h)
    r = sigma_r(GRU_W_IH["r"] * sx + GRU_B_IH["r"] + GRU_W_HH["r"] * sh + GRU_B_HH["r"])
    z = sigma_z(GRU_W_IH["z"] * sx + GRU_B_IH["z"] + GRU_W_HH["z"] * sh + GRU_B_HH["z"])
    if reset_after:  # n = φ(W_in x + b_in + r ⊙ (W_hn h + b_hn))
        n = phi(GRU_W_IH["n"] * sx + GRU_B_IH["n"] + r * (GRU_W_HH["n"] * sh + GRU_B_HH["n"]))
    else:  # n = φ(W_in x + b_in + W_hn (r ⊙ h) + b_hn)
        n = phi(GRU_W_IH["n"] * sx + GRU_B_IH["n"] + GRU_W_HH["n"] * sum(r * hk for hk in h) + GRU_B_HH["n"])
    return [(1 - z) * n + z * hj for hj in h]


GRU_CASES = {
    "reset-after": ({}, {}),
    "reset-before": ({"reset_after": False}, {"reset_after": False}),
    "reset-before-hard-r": ({"reset_after": False, "gate_activation": {"r": "hard_sigmoid"}},
                            {"reset_after": False, "sigma_r": hard_sig}),
    "elliott-z-softsign-n": ({"gate_activation": {"z": "elliott"}, "candidate_activation": "softsign"},
                             {"sigma_z": elliott, "phi": softsign}),
}


@pytest.mark.parametrize("options, hand", GRU_CASES.values(), ids=GRU_CASES.keys())
def test_gru_golden(options, hand):
    cell = gatelab.GRUCell(I, H, dtype=F64, **options)
    _fill_blocks(cell, "rzn", GRU_W_IH, GRU_W_HH, GRU_B_IH, GRU_B_HH)
    _close(cell(_t(X), _t(H0)), [gru_by_hand(x, h, **hand) for x, h in zip(X, H0)])


def test_gru_reset_before_differs_from_reset_after():
    assert abs(gru_by_hand(X[0], H0[0])[0] - gru_by_hand(X[0], H0[0], reset_after=False)[0]) > 1e-3


# -- GatedState -----------------------------------------------------------------------------------

GS_W_IH = {"f": 0.2, "i": 0.1, "o": 0.15, "n": -0.1}
GS_W_HH = {"f": 0.1, "i": -0.2, "o": -0.15, "n": 0.25}
GS_B_IH = {"f": 0.3, "i": 0.05, "o": 0.1, "n": -0.05}
GS_B_HH = {"f": 0.2, "i": 0.02, "o": -0.03, "n": 0.04}


def gated_state_by_hand(x, s, *, sigma=None, phi=math.tanh):
    sigma = {"f": sig, "i": sig, "o": sig, **(sigma or {})}
    sx, ss = sum(x), sum(s)
    pre = {k: GS_W_IH[k] * sx + GS_B_IH[k] + GS_W_HH[k] * ss + GS_B_HH[k] for k in "fion"}
    f, i, o = (sigma[k](pre[k]) for k in "fio")
    s_new = [f * sj + i * phi(pre["n"]) for sj in s]  # s' = f ⊙ s + i ⊙ s̃
    return [o * v for v in s_new], s_new  # y = o ⊙ s'  (not squashed)


@pytest.mark.parametrize(
    "options, hand",
    [({}, {}), ({"gate_activation": {"i": "hard_sigmoid"}, "candidate_activation": "softsign"},
                {"sigma": {"i": hard_sig}, "phi": softsign})],
    ids=["default", "hard-i-softsign"],
)
def test_gated_state_golden(options, hand):
    cell = gatelab.GatedStateCell(I, H, dtype=F64, **options)
    _fill_blocks(cell, "fion", GS_W_IH, GS_W_HH, GS_B_IH, GS_B_HH)
    y, s = cell(_t(X), _t(C0))
    expected = [gated_state_by_hand(x, s0, **hand) for x, s0 in zip(X, C0)]
    _close(y, [e[0] for e in expected])
    _close(s, [e[1] for e in expected])


# -- Elman ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, phi", [("tanh", math.tanh), ("relu", lambda v: max(v, 0.0)), ("softsign", softsign)])
def test_elman_golden(name, phi):
    cell = gatelab.ElmanCell(I, H, activation=name, dtype=F64)
    _fill_blocks(cell, "h", {"h": 0.3}, {"h": -0.2}, {"h": -0.1}, {"h": 0.05})
    pre = [0.3 * sum(x) - 0.1 - 0.2 * sum(h) + 0.05 for x, h in zip(X, H0)]
    assert pre[0] > 0 > pre[1]  # both sides of relu
    expected = [[phi(p)] * H for p in pre]
    _close(cell(_t(X), _t(H0)), expected)
