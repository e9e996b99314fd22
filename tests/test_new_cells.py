"""MinGRU, MinLSTM, IndRNN and SLSTM: every form against the step-by-step recurrence, gradchecks,
golden values by hand, IndRNN's bound, sLSTM's stabiliser, state carry, configs and diagnostics."""

from __future__ import annotations

import itertools
import math
import re
import warnings
from pathlib import Path

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import gatelab
from gatelab import activations
from gatelab.cells import registry
from gatelab.engines import scan
from gatelab.engines.fused import cpp

F64 = torch.float64
LAYERS = {"MinGRU": gatelab.MinGRU, "MinLSTM": gatelab.MinLSTM, "IndRNN": gatelab.IndRNN, "SLSTM": gatelab.SLSTM}
STATELESS = [n for n in activations.available() if not activations.get(n).learnable]
POSITIVE = ["sigmoid", "hard_sigmoid", "elliott", "exp", "softplus", "min_g", "adaptive_sigmoid"]  # f + i > 0; log σ
# (layer, slot) -> the activations tried there: every registered one where any value fits
SLOT_ACTIVATIONS = {
    ("MinGRU", "gate_activation"): [*STATELESS, "prelu", "adaptive_sigmoid"],
    ("MinGRU", "candidate_activation"): [*STATELESS, "adaptive_tanh"],
    ("MinLSTM", "gate_activation"): POSITIVE,
    ("MinLSTM", "candidate_activation"): [*STATELESS, "prelu"],
    ("IndRNN", "activation"): [*(a for a in STATELESS if a != "exp"), "prelu", "adaptive_tanh"],  # e^(e^(...)) overflows
    ("SLSTM", "gate_activation"): [{"i": a} for a in POSITIVE] + [{"f": a} for a in POSITIVE]
    + [{"o": a} for a in ("hard_sigmoid", "elliott", "tanh", "identity")],
    ("SLSTM", "candidate_activation"): [*STATELESS, "adaptive_tanh"],
}


def needs_cpp():
    if not scan.cpp_ready():
        pytest.skip("the C++ kernels are unavailable here")


def run(layer, x, lengths=None, hx=None):
    """Output, final state and the gradients of a loss reading both, w.r.t. x, h0 and every parameter."""
    xg = x.clone().requires_grad_(True)
    if hx is not None:
        hx = tuple(h.clone().requires_grad_(True) for h in hx) if isinstance(hx, tuple) else hx.clone().requires_grad_(True)
    out, state = layer(xg, hx, lengths=lengths)
    states = state if isinstance(state, tuple) else (state,)
    loss = (out * out.detach().cos()).sum() + sum((s * (1.5 + k)).sum() for k, s in enumerate(states))
    leaves = [xg, *(hx if isinstance(hx, tuple) else (() if hx is None else (hx,))), *layer.parameters()]
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return out.detach(), tuple(s.detach() for s in states), [torch.zeros(()) if g is None else g for g in grads]


def pair(name, options, *, T=6, B=4, I=3, H=4, seed=0, forms=None, bidirectional=True, num_layers=1, x_scale=1.0):
    """The same layer on the reference loop and the fused engine; inputs with random lengths."""
    torch.manual_seed(seed)
    kw = dict(bidirectional=bidirectional, num_layers=num_layers, dtype=F64, **options)
    ref = LAYERS[name](I, H, backend="reference", **kw)
    fus = LAYERS[name](I, H, backend="fused", strict=True, **kw)
    fus.load_state_dict(ref.state_dict())
    x = torch.randn(T, B, I, dtype=F64) * x_scale
    lengths = torch.randint(1, T + 1, (B,))
    lengths[0] = T
    D = 2 if bidirectional else 1
    hx = tuple(torch.randn(num_layers * D, B, H, dtype=F64) for _ in ref.cells[0].state_sizes())
    if name == "SLSTM":
        hx = (hx[0], hx[1], hx[2].abs() + 0.5, hx[3] * 0.1)  # a reachable state: n > 0
    hx = hx[0] if len(hx) == 1 else hx
    return run(ref, x, lengths, hx), run(fus, x, lengths, hx), fus


def assert_same(a, b, tol=1e-10, scaled=False):
    """``scaled``: the absolute tolerance grows with each tensor's largest value (gates past 1 let h grow)."""
    def close(got, want, **kw):
        atol = tol * max(1.0, want.abs().max().item()) if scaled and want.numel() else tol
        torch.testing.assert_close(got, want, rtol=tol, atol=atol, **kw)

    (out_a, st_a, g_a), (out_b, st_b, g_b) = a, b
    close(out_b, out_a)
    for s, t in zip(st_b, st_a):
        close(s, t)
    assert len(g_a) == len(g_b)
    for k, (g, h) in enumerate(zip(g_b, g_a)):
        close(g, h, msg=f"gradient {k}")


# -- every form == the step-by-step recurrence -----------------------------------------------------------------


FORMS = [("MinGRU", {"scan": "sequential"}), ("MinGRU", {"scan": "parallel"}), ("MinLSTM", {"scan": "sequential"}),
         ("MinLSTM", {"scan": "parallel"}), ("IndRNN", {}), ("IndRNN", {"activation": "softsign"}), ("SLSTM", {}),
         ("SLSTM", {"num_heads": 2})]


@pytest.mark.parametrize("loop", ["C++", "PyTorch"])
@pytest.mark.parametrize("name, options", FORMS, ids=[f"{n}-{o}" for n, o in FORMS])
def test_every_form_equals_the_step_recurrence(name, options, loop, monkeypatch):
    if loop == "C++":
        needs_cpp()
    else:
        monkeypatch.setattr(scan, "_use_cpp", lambda t: False)
    for seed in range(3):
        ref, fus, layer = pair(name, options, seed=seed, num_layers=2)
        assert layer.engine_name == "fused"
        assert_same(ref, fus)


@pytest.mark.parametrize("name, slot", list(SLOT_ACTIVATIONS), ids=[f"{n}-{s}" for n, s in SLOT_ACTIVATIONS])
def test_every_activation_in_every_slot(name, slot):
    forms = ["sequential", "parallel"] if name.startswith("Min") else [None]
    for act in SLOT_ACTIVATIONS[name, slot]:
        for form in forms:
            options = {slot: act, **({"scan": form} if form else {})}
            ref, fus, _ = pair(name, options, T=5, B=3)
            try:
                assert_same(ref, fus)
            except AssertionError as e:
                raise AssertionError(f"{options}: {e}") from None


def test_the_cpp_and_pytorch_loops_agree_directly():
    needs_cpp()
    torch.manual_seed(1)
    T, B, H = 9, 3, 5
    a, b, h0 = torch.rand(T, B, H, dtype=F64), torch.randn(T, B, H, dtype=F64), torch.randn(B, H, dtype=F64)
    for reverse in (False, True):
        want = scan.scan_loop(a, b, h0, reverse)
        torch.testing.assert_close(torch.ops.gatelab_scan.linear_scan(a, b, h0, reverse), want, rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(scan.scan_parallel(a, b, h0, reverse), want, rtol=1e-13, atol=1e-13)
        lengths = torch.tensor([T, 4, 1])
        live = (torch.arange(T).unsqueeze(1) < lengths).unsqueeze(2)
        for kind in scan.INDRNN_KINDS:
            act = activations.get(kind)
            got = torch.ops.gatelab_scan.indrnn_forward(b, a[0, 0], h0, lengths, scan.INDRNN_KINDS.index(kind),
                                                        0.01, reverse)
            torch.testing.assert_close(got, scan.indrnn_loop(b, a[0, 0], h0, live, act, reverse), rtol=1e-13, atol=1e-13)


def test_the_cpp_activation_list_matches_the_cpp_enum():
    source = Path(cpp.__file__).with_name("kernels_scan.cpp").read_text()
    body = re.search(r"enum ScanAct : int64_t \{([^}]*)\}", source).group(1)
    names = [n.strip().split("=")[0].strip().removeprefix("S_").lower() for n in body.split(",") if n.strip()]
    assert tuple(names) == scan.INDRNN_KINDS
    assert "kernels_scan.cpp" in cpp.SOURCES


def test_gradcheck_of_the_scans():
    torch.manual_seed(2)
    T, B, H = 5, 2, 3
    a = torch.rand(T, B, H, dtype=F64, requires_grad=True)
    b = torch.randn(T, B, H, dtype=F64, requires_grad=True)
    h0 = torch.randn(B, H, dtype=F64, requires_grad=True)
    for form in ("sequential", "parallel"):
        for reverse in (False, True):
            assert torch.autograd.gradcheck(lambda a, b, h, r=reverse, f=form: scan.LinearScan.apply(a, b, h, r, f), (a, b, h0))
    u = torch.rand(H, dtype=F64, requires_grad=True)
    lengths = torch.tensor([T, 3])
    live = (torch.arange(T).unsqueeze(1) < lengths).unsqueeze(2)
    for act in ("relu", "tanh", "softsign"):
        phi = activations.get(act)
        for reverse in (False, True):
            assert torch.autograd.gradcheck(
                lambda x, u, h, p=phi, r=reverse: scan.IndRNNScan.apply(x, u, h, lengths, live, p, r), (b, u, h0))


# the activations of the fused minGRU / minLSTM pass, every one in each slot (minLSTM's gates: f + i > 0)
MIN_FUSED = [("MinGRU", {"gate_activation": a}) for a in (*scan.SLSTM_KINDS, "hard_sigmoid:0.25", "leaky_relu:0.2")]
MIN_FUSED += [("MinGRU", {"candidate_activation": a}) for a in (*scan.SLSTM_KINDS, "leaky_relu:0.2")]
MIN_FUSED += [("MinLSTM", {"gate_activation": {g: a}}) for g in "fi"
              for a in ("sigmoid", "hard_sigmoid", "hard_sigmoid:0.25", "elliott", "exp")]
MIN_FUSED += [("MinLSTM", {"gate_activation": "exp", "candidate_activation": a})
              for a in (*scan.SLSTM_KINDS, "leaky_relu:0.2")]


@pytest.mark.parametrize("name, options", MIN_FUSED, ids=[f"{n}-{o}" for n, o in MIN_FUSED])
def test_min_fused_pass_equals_the_step_recurrence(name, options):
    needs_cpp()
    for seed in range(2):
        ref, fus, layer = pair(name, options, T=7, B=4, H=5, seed=seed, num_layers=2, x_scale=0.5)
        assert not isinstance(scan.min_kinds(layer.cells[0]), str)
        assert "one fused elementwise pass" in layer.explain()
        assert_same(ref, fus, scaled=True)  # minGRU's 1 − z exceeds 1 for an unbounded σ_z: h grows to ~1e5


def test_min_fused_pass_in_float32_and_its_fallback():
    needs_cpp()
    torch.manual_seed(5)
    for cls in (gatelab.MinGRU, gatelab.MinLSTM):
        ref = cls(3, 8, bidirectional=True, backend="reference")
        fus = cls(3, 8, bidirectional=True, backend="fused", strict=True)
        fus.load_state_dict(ref.state_dict())
        x, lengths = torch.randn(9, 4, 3), torch.tensor([9, 5, 2, 7])
        (a, sa), (b, sb) = ref(x, lengths=lengths), fus(x, lengths=lengths)
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sb, sa, rtol=1e-5, atol=1e-5)
        a.square().sum().backward()
        b.square().sum().backward()
        for p, q in zip(fus.parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5)
    layer = gatelab.MinGRU(3, 4, gate_activation="prelu", candidate_activation="min_g")
    assert scan.min_kinds(layer.cells[0]) == "the fused C++ pass has no sigma_z = prelu, phi = min_g"
    assert "the activations over all steps (the fused C++ pass has no sigma_z = prelu, phi = min_g)" in layer.explain()
    assert "one fused elementwise pass" not in gatelab.MinGRU(3, 4, scan="parallel").explain()


def min_fused_args(G, T=5, B=3, H=4, seed=14):
    torch.manual_seed(seed)
    xw = torch.randn(T, B, G * H, dtype=F64, requires_grad=True)
    h0 = torch.randn(B, H, dtype=F64, requires_grad=True)
    kinds = {2: ([1, 4], [0.0, 0.0]), 3: ([3, 9, 8], [0.0, 0.0, 0.2])}[G]  # (sigmoid, tanh); (elliott, exp, leaky)
    return xw, h0, *kinds


def test_min_fused_ops_gradcheck():
    needs_cpp()
    for G in (2, 3):
        xw, h0, kinds, params = min_fused_args(G)
        for reverse in (False, True):
            for lengths in (None, torch.tensor([5, 2, 0])):
                def f(xw, h0, L=lengths, r=reverse, k=kinds, p=params):
                    return tuple(torch.ops.gatelab_scan.min_rnn_forward(xw, h0, L, k, p, r))
                assert torch.autograd.gradcheck(f, (xw, h0))


SLSTM_CPP = [{}, {"gate_activation": {"i": "sigmoid"}}, {"gate_activation": {"f": "exp", "o": "hard_sigmoid"}},
             {"candidate_activation": "softsign", "gate_activation": {"o": "elliott"}},
             {"candidate_activation": "leaky_relu:0.2", "gate_activation": {"i": "sigmoid", "o": "identity"}},
             {"candidate_activation": "hardtanh"}, {"candidate_activation": "relu", "bias": False}]


@pytest.mark.parametrize("options", SLSTM_CPP, ids=[str(o) for o in SLSTM_CPP])
def test_slstm_cpp_equals_the_step_recurrence(options):
    needs_cpp()
    for seed, heads in ((0, 1), (1, 2), (2, 4)):
        ref, fus, layer = pair("SLSTM", {"num_heads": heads, **options}, T=7, B=5, H=8, seed=seed, num_layers=2)
        assert not isinstance(scan.slstm_kinds(layer.cells[0]), str)
        assert "hand-written backward" in layer.explain()
        assert_same(ref, fus)


def test_slstm_cpp_in_float32():
    needs_cpp()
    torch.manual_seed(5)
    ref = gatelab.SLSTM(3, 8, num_heads=2, bidirectional=True, backend="reference")
    fus = gatelab.SLSTM(3, 8, num_heads=2, bidirectional=True, backend="fused", strict=True)
    fus.load_state_dict(ref.state_dict())
    x, lengths = torch.randn(9, 4, 3), torch.tensor([9, 5, 2, 7])
    (a, sa), (b, sb) = ref(x, lengths=lengths), fus(x, lengths=lengths)
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    for s, t in zip(sb, sa):
        torch.testing.assert_close(s, t, rtol=1e-5, atol=1e-5)
    a.square().sum().backward()
    b.square().sum().backward()
    for p, q in zip(fus.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5)


def test_slstm_cpp_gradcheck_and_fallback():
    needs_cpp()
    torch.manual_seed(4)
    T, B, H, K = 5, 3, 4, 2
    xw = torch.randn(T, B, 4 * H, dtype=F64, requires_grad=True)
    R = (torch.randn(4 * H, H // K, dtype=F64) * 0.5).requires_grad_()
    b_hh = torch.randn(4 * H, dtype=F64, requires_grad=True)
    h0, c0 = torch.randn(B, H, dtype=F64, requires_grad=True), torch.randn(B, H, dtype=F64, requires_grad=True)
    n0 = (torch.rand(B, H, dtype=F64) + 0.5).requires_grad_()
    m0 = (torch.randn(B, H, dtype=F64) * 0.1).requires_grad_()
    lengths = torch.tensor([T, 3, 1])
    for kinds in ([9, 1, 4, 1], [1, 9, 6, 2]):  # (exp, sigmoid, tanh, sigmoid), (sigmoid, exp, softsign, hard_sigmoid)
        params = [0.0, 0.0, 0.0, 1 / 6]
        for reverse in (False, True):
            for lens in (None, lengths):
                def f(*a, r=reverse, L=lens, k=kinds, p=params):
                    return torch.ops.gatelab_scan.slstm_forward(*a, L, K, k, p, r)[:4]
                assert torch.autograd.gradcheck(f, (xw, R, b_hh, h0, c0, n0, m0))
    layer = gatelab.SLSTM(3, 4, gate_activation={"i": "softplus"}, candidate_activation="gelu")
    assert scan.slstm_kinds(layer.cells[0]) == "the C++ step has no sigma_i = softplus, phi = gelu"
    assert "in PyTorch under autograd (the C++ step has no sigma_i = softplus, phi = gelu)" in layer.explain()


def test_the_slstm_activation_list_matches_the_cpp_enum():
    source = Path(cpp.__file__).with_name("kernels_scan.cpp").read_text()
    body = re.search(r"enum SlstmAct : int64_t \{([^}]*)\}", source).group(1)
    names = [n.strip().split("=")[0].strip().removeprefix("L_").lower() for n in body.split(",") if n.strip()]
    assert tuple(names) == scan.SLSTM_KINDS


# -- cells: gradcheck and golden values --------------------------------------------------------------------------

CELLS = {
    "MinGRUCell": {"candidate_activation": "min_g"},
    "MinLSTMCell": {"gate_activation": {"f": "elliott"}},
    "IndRNNCell": {"activation": "tanh"},
    "SLSTMCell": {"num_heads": 2},
}


@pytest.mark.parametrize("name", list(CELLS))
def test_gradcheck_every_cell(name):
    torch.manual_seed(3)
    cell = getattr(gatelab, name)(3, 4, dtype=F64, **CELLS[name]).eval()
    x = torch.randn(2, 3, dtype=F64, requires_grad=True)
    if name == "SLSTMCell":
        state = (torch.randn(2, 4, dtype=F64), torch.randn(2, 4, dtype=F64), torch.rand(2, 4, dtype=F64) + 0.5,
                 torch.randn(2, 4, dtype=F64) * 0.1)
        state = tuple(s.requires_grad_() for s in state)
        params = list(cell.parameters())
        assert torch.autograd.gradcheck(lambda x, *s_p: torch.cat(cell(x, s_p[:4]), 1), (x, *state, *params))
    else:
        h = torch.randn(2, 4, dtype=F64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda x, h, *p: cell(x, h), (x, h, *cell.parameters()))


def _set(cell, **values):
    with torch.no_grad():
        for name, v in values.items():
            getattr(cell, name).copy_(torch.tensor(v, dtype=F64))


def sig(v):
    return 1 / (1 + math.exp(-v))


def test_golden_min_gru():
    cell = gatelab.MinGRUCell(1, 1, dtype=F64)
    _set(cell, weight_ih=[[0.5], [-1.0]], bias_ih=[0.1, 0.2])
    x, h = 2.0, 0.3
    z, ht = sig(0.5 * x + 0.1), -1.0 * x + 0.2
    assert cell(torch.tensor([[x]], dtype=F64), torch.tensor([[h]], dtype=F64)).item() == pytest.approx(
        (1 - z) * h + z * ht, abs=1e-15)
    g = gatelab.MinGRUCell(1, 1, dtype=F64, candidate_activation="min_g")
    _set(g, weight_ih=[[0.5], [-1.0]], bias_ih=[0.1, 0.2])
    assert g(torch.tensor([[x]], dtype=F64), torch.tensor([[h]], dtype=F64)).item() == pytest.approx(
        (1 - z) * h + z * sig(ht), abs=1e-15)  # g(x) = σ(x) for x < 0


def test_golden_min_lstm():
    cell = gatelab.MinLSTMCell(1, 1, dtype=F64)
    _set(cell, weight_ih=[[1.0], [-0.5], [2.0]], bias_ih=[0.0, 0.3, -0.1])
    x, h = 0.7, -0.4
    f, i, ht = sig(0.7), sig(-0.35 + 0.3), 1.4 - 0.1
    want = f / (f + i) * h + i / (f + i) * ht
    assert cell(torch.tensor([[x]], dtype=F64), torch.tensor([[h]], dtype=F64)).item() == pytest.approx(want, abs=1e-15)


def test_golden_indrnn():
    cell = gatelab.IndRNNCell(2, 2, dtype=F64)
    _set(cell, weight_ih=[[1.0, 0.0], [0.5, -1.0]], bias_ih=[0.1, -0.2], weight_hh=[0.9, -0.5])
    out = cell(torch.tensor([1.0, 2.0], dtype=F64), torch.tensor([0.5, 1.0], dtype=F64))
    want = [max(0.0, 1.0 + 0.1 + 0.9 * 0.5), max(0.0, 0.5 - 2.0 - 0.2 - 0.5 * 1.0)]
    assert out.tolist() == pytest.approx(want, abs=1e-15)


def test_golden_slstm():
    cell = gatelab.SLSTMCell(1, 1, dtype=F64)  # i: exp, f: sigmoid, o: sigmoid, z: tanh
    _set(cell, weight_ih=[[0.5], [1.0], [-1.0], [2.0]], bias_ih=[0.0, 0.0, 0.0, 0.0],
         weight_hh=[[0.1], [0.2], [0.3], [0.4]], bias_hh=[0.05, 0.0, 0.0, -0.1])
    x, h, c, n, m = 1.0, 0.5, 0.2, 1.5, 0.3
    pi, pf, pz, po = 0.5 + 0.05 + 0.05, 1.0 + 0.1, -1.0 + 0.15, 2.0 + 0.2 - 0.1
    log_i, log_f = pi, math.log(sig(pf))
    m2 = max(log_f + m, log_i)
    i2, f2 = math.exp(log_i - m2), math.exp(log_f + m - m2)
    c2 = f2 * c + i2 * math.tanh(pz)
    n2 = f2 * n + i2
    h2 = sig(po) * c2 / n2
    got = cell(torch.tensor([x], dtype=F64), tuple(torch.tensor([v], dtype=F64) for v in (h, c, n, m)))
    assert [t.item() for t in got] == pytest.approx([h2, c2, n2, m2], abs=1e-15)


# -- IndRNN's bound -------------------------------------------------------------------------------------------


def test_indrnn_bound_holds_after_optimizer_steps():
    torch.manual_seed(4)
    layer = gatelab.IndRNN(3, 8, num_layers=2, max_length=50)
    u_max = 2 ** (1 / 50)
    assert layer.recurrent_max == pytest.approx(u_max)
    for name in ("weight_hh_l0", "weight_hh_l1"):
        u = getattr(layer, name)
        assert u.shape == (8,) and 0 <= u.min() and u.max() <= u_max  # init U(0, u_max)
    opt = torch.optim.SGD(layer.parameters(), lr=50.0)
    x = torch.randn(20, 4, 3)
    pushed = False
    for _ in range(5):
        out, _ = layer(x)
        for name in ("weight_hh_l0", "weight_hh_l1"):  # what this call computed with
            assert getattr(layer, name).abs().max() <= u_max + 1e-7
        opt.zero_grad()
        (-out.sum()).backward()  # pushes u up
        opt.step()
        pushed |= bool(layer.weight_hh_l1.abs().max() > u_max)
    assert pushed  # the optimiser did leave the bound, and the next call projected back
    layer.constrain_()
    assert layer.weight_hh_l1.abs().max() <= u_max + 1e-7
    with pytest.raises(ValueError, match="recurrent_max or max_length"):
        gatelab.IndRNN(3, 4, recurrent_max=1.0, max_length=10)


def test_indrnn_jacobian_is_the_product_of_u():
    torch.manual_seed(5)
    layer = gatelab.IndRNN(2, 3, activation="identity", recurrent_max=1.0, dtype=F64)
    with torch.no_grad():
        layer.weight_hh_l0.copy_(torch.tensor([0.9, -0.5, 0.3], dtype=F64))
    x = torch.randn(7, 2, 2, dtype=F64)
    norms = gatelab.diagnostics.jacobian_norms(layer, x, method="exact")
    assert norms[7] == pytest.approx(0.9 ** 7, rel=1e-9)


# -- sLSTM's stabiliser ------------------------------------------------------------------------------------------


def unstabilised(cell, xs, state, forget=torch.sigmoid):
    """The sLSTM recurrence without m: i = exp(ĩ), f = σ(f̃) (or exp), c' = f c + i z, n' = f n + i."""
    h, c, n = state
    hs = []
    for x in xs:
        pre_i, pre_f, pre_z, pre_o = (torch.nn.functional.linear(x, cell.weight_ih, cell.bias_ih)
                                      + cell.recurrent(h)).chunk(4, 1)
        i, f = torch.exp(pre_i), forget(pre_f)
        c = f * c + i * torch.tanh(pre_z)
        n = f * n + i
        h = torch.sigmoid(pre_o) * c / n
        hs.append(h)
    return torch.stack(hs)


def test_slstm_stabilised_equals_unstabilised_and_stays_finite():
    torch.manual_seed(6)
    for (dtype, tol), forget in itertools.product(((F64, 1e-12), (torch.float32, 1e-5)), ("sigmoid", "exp")):
        layer = gatelab.SLSTM(3, 4, num_heads=2, dtype=dtype, gate_activation={"f": forget})
        cell, fn = layer.cells[0], getattr(torch, forget)
        x = torch.randn(12, 2, 3, dtype=dtype)
        out, _ = layer(x)
        zeros = torch.zeros(2, 4, dtype=dtype)
        torch.testing.assert_close(out, unstabilised(cell, x, (zeros, zeros, zeros), fn), rtol=tol, atol=tol)
        with torch.no_grad():  # ĩ, f̃ ≈ 70: e^70 is finite in float32, e^(70 t) overflows at t = 2 (f = exp)
            layer.bias_ih_l0[:8].fill_(70.0)
        out, (h, c, n, m) = layer(x)
        assert torch.isfinite(out).all() and torch.isfinite(n).all() and torch.isfinite(m).all()
        want_m = 750 if forget == "exp" else 60  # f = exp: m grows by ≈ 70 a step, past float64's e^709
        assert (m > want_m).all()
        plain = unstabilised(cell, x, (zeros, zeros, zeros), fn)
        if forget == "exp":
            assert not torch.isfinite(plain).all()


# -- layers: state carry, packing, state_dict, options --------------------------------------------------------------

CARRY = [("MinGRU", {}), ("MinLSTM", {"scan": "parallel"}), ("IndRNN", {"residual": True}), ("SLSTM", {"num_heads": 2})]


@pytest.mark.parametrize("backend", ["fused", "reference"])
@pytest.mark.parametrize("name, options", CARRY, ids=[n for n, _ in CARRY])
def test_two_halves_with_the_state_carried_equal_one_pass(name, options, backend):
    torch.manual_seed(7)
    layer = LAYERS[name](3, 4, num_layers=2, batch_first=True, dtype=F64, backend=backend, **options).eval()
    x = torch.randn(2, 10, 3, dtype=F64)
    whole, final = layer(x)
    first, state = layer(x[:, :4])
    second, final2 = layer(x[:, 4:], state)
    torch.testing.assert_close(torch.cat([first, second], 1), whole, rtol=1e-12, atol=1e-12)
    for a, b in zip(final2 if isinstance(final2, tuple) else (final2,), final if isinstance(final, tuple) else (final,)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", list(LAYERS))
def test_packed_sequence_padded_steps_and_state_dict(name, tmp_path):
    torch.manual_seed(8)
    layer = LAYERS[name](3, 4, bidirectional=True, dtype=F64)
    x = torch.randn(5, 3, 3, dtype=F64)
    lengths = torch.tensor([5, 2, 3])
    out, state = layer(x, lengths=lengths)
    assert (out[2:, 1] == 0).all() and (out[3:, 2] == 0).all()
    short, short_state = layer(x[:2, 1:2])  # sequence 1 alone, its own length: the same final state
    for a, b in zip(state if isinstance(state, tuple) else (state,), short_state if isinstance(short_state, tuple)
                    else (short_state,)):
        torch.testing.assert_close(a[:, 1:2], b, rtol=1e-12, atol=1e-12)
    packed_out, packed_state = layer(pack_padded_sequence(x, lengths, enforce_sorted=False))
    torch.testing.assert_close(torch.nn.utils.rnn.pad_packed_sequence(packed_out)[0], out)
    torch.save(layer.state_dict(), tmp_path / "w.pt")
    other = LAYERS[name](3, 4, bidirectional=True, dtype=F64)
    other.load_state_dict(torch.load(tmp_path / "w.pt"))
    assert list(other.state_dict()) == list(layer.state_dict())
    torch.testing.assert_close(other(x, lengths=lengths)[0], out, rtol=0, atol=0)
    assert "weight_ih_l0_reverse" in layer.state_dict()


def test_parameters_and_options():
    assert [n for n, _ in gatelab.MinGRU(3, 4).named_parameters()] == ["weight_ih_l0", "bias_ih_l0"]
    assert gatelab.MinGRU(3, 4).weight_ih_l0.shape == (8, 3) and gatelab.MinLSTM(3, 4).weight_ih_l0.shape == (12, 3)
    s = gatelab.SLSTM(3, 8, num_heads=4)
    assert s.weight_hh_l0.shape == (32, 2) and s.cells[0].state_names == ("h", "c", "n", "m")
    with pytest.raises(ValueError, match="multiple of num_heads"):
        gatelab.SLSTM(3, 6, num_heads=4)
    with pytest.raises(ValueError, match="forget_bias is not supported"):
        gatelab.MinLSTM(3, 4, forget_bias=1.0)
    with pytest.raises(ValueError, match="init='orthogonal' is not supported"):
        gatelab.IndRNN(3, 4, init="orthogonal")
    with pytest.raises(ValueError, match="scan must be one of"):
        gatelab.MinGRU(3, 4, scan="fast")
    fb = gatelab.SLSTM(3, 4, forget_bias=3.0)
    assert (fb.bias_ih_l0[4:8] + fb.bias_hh_l0[4:8]).tolist() == [3.0] * 4
    with pytest.raises(ValueError, match="torch has no MinGRUCell"):
        gatelab.MinGRU(3, 4, backend="native", strict=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert gatelab.IndRNN(3, 4, backend="native").engine_name == "reference"
    explained = gatelab.MinGRU(3, 4).explain()
    assert "engine 'fused'" in explained and "elementwise pass" in explained
    assert "parallel" in gatelab.MinGRU(3, 4, scan="parallel").explain()
    assert activations.get(torch.exp) is activations.get("exp")
    assert activations.get("exp").onnx == "Exp" and activations.get("exp").output_range == (0.0, math.inf)


BLOCKS = [(True, None, True), (False, 6, False), (True, 6, True), (True, 5, False)]


@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("norm, mlp, residual", BLOCKS, ids=[f"norm={n},mlp={m},residual={r}" for n, m, r in BLOCKS])
def test_norm_and_mlp_blocks_are_the_papers_composition(name, norm, mlp, residual):
    """Per layer: x_in = LN(x) (norm), the cells' directions over x_in (the reference loop), the residual
    sum with the un-normed x, then x + W₂ gelu(W₁ LN(x) + b₁) + b₂ (mlp); padded steps zero. The layer
    (fused engine) gives the same outputs, states and every parameter's gradient in float64."""
    import torch.nn.functional as F

    from gatelab.engines import reference

    torch.manual_seed(0)
    layer = LAYERS[name](3, 4, num_layers=2, bidirectional=True, norm=norm, mlp=mlp, residual=residual, dtype=F64)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.2 * torch.randn_like(p))  # LN weights off 1 and 0
    if name == "IndRNN":
        layer.constrain_()  # as the layer's training-mode call does first: the oracle reads the same u
    x, lengths = torch.randn(7, 3, 3, dtype=F64), torch.tensor([7, 2, 5])
    live = (torch.arange(7).unsqueeze(1) < lengths).unsqueeze(2)

    def oracle():
        h, finals = x, []
        for k in range(2):
            inp = h
            if norm:
                h = F.layer_norm(h, h.shape[-1:], getattr(layer, f"norm_weight_l{k}"), getattr(layer, f"norm_bias_l{k}"))
            outs = []
            for d in range(2):
                cell = layer.cells[2 * k + d]
                state = tuple(torch.zeros(3, s, dtype=F64) for s in cell.state_sizes())
                out, st = reference.run_direction(cell, h, state, lengths, d == 1)
                outs.append(out)
                finals.append(st)
            h = torch.cat(outs, 2)
            if residual:
                h = (h + (inp if k or layer.weight_res_l0 is None else F.linear(inp, layer.weight_res_l0))) * live
            if mlp:
                y = h if not norm else F.layer_norm(h, h.shape[-1:], getattr(layer, f"mlp_norm_weight_l{k}"),
                                                    getattr(layer, f"mlp_norm_bias_l{k}"))
                y = F.gelu(F.linear(y, getattr(layer, f"mlp_weight_in_l{k}"), getattr(layer, f"mlp_bias_in_l{k}")))
                h = (h + F.linear(y, getattr(layer, f"mlp_weight_out_l{k}"), getattr(layer, f"mlp_bias_out_l{k}"))) * live
        return h, tuple(torch.stack(parts) for parts in zip(*finals))

    params = list(layer.parameters())
    results = []
    for run_it in (oracle, lambda: layer(x, lengths=lengths)):
        out, state = run_it()
        states = state if isinstance(state, tuple) else (state,)
        loss = (out * out.detach().cos()).sum() + sum((s * (1.5 + j)).sum() for j, s in enumerate(states))
        results.append((out, states, torch.autograd.grad(loss, params)))
    (out_a, st_a, g_a), (out_b, st_b, g_b) = results
    assert layer.engine_name == "fused"
    torch.testing.assert_close(out_b, out_a, rtol=1e-10, atol=1e-10)
    for s, t in zip(st_b, st_a):
        torch.testing.assert_close(s, t, rtol=1e-10, atol=1e-10)
    names = [n for n, _ in layer.named_parameters()]
    for n, g, h in zip(names, g_b, g_a):
        torch.testing.assert_close(g, h, rtol=1e-10, atol=1e-10, msg=n)
    assert (out_b[~live.expand_as(out_b)] == 0).all()
    assert any(n.startswith("norm_weight") for n in names) == norm and any(n.startswith("mlp_") for n in names) == bool(mlp)


def test_blocks_options_are_checked_and_round_trip():
    with pytest.raises(ValueError, match="MinGRU: mlp must be positive, got 0"):
        gatelab.MinGRU(3, 4, mlp=0)
    with pytest.raises(ValueError, match="mlp_activation must be a parameter-free registered activation"):
        gatelab.MinGRU(3, 4, mlp=4, mlp_activation=lambda x: 2 * x)
    with pytest.raises(ValueError, match="LayerNorm of one feature is constant"):
        gatelab.IndRNN(1, 4, norm=True)
    with pytest.warns(UserWarning, match="keeps little of layer 0's input"):
        gatelab.SLSTM(2, 4, norm=True)
    with pytest.raises(ValueError, match="mlp_activation must be a parameter-free registered activation"):
        gatelab.MinGRU(3, 4, mlp=4, mlp_activation="prelu")
    with pytest.raises(TypeError, match="norm"):
        gatelab.MinGRU(3, 4, norm="yes")
    torch.manual_seed(0)
    a = gatelab.MinLSTM(3, 4, num_layers=2, norm=True, mlp=8, mlp_activation="silu")
    b = gatelab.MinLSTM(3, 4, num_layers=2, norm=True, mlp=8, mlp_activation="silu")
    b.load_state_dict(a.state_dict())
    x = torch.randn(5, 2, 3)
    torch.testing.assert_close(b(x)[0], a(x)[0], rtol=0, atol=0)
    assert "norm=True" in repr(a) and "mlp=8, mlp_activation=silu" in repr(a)
    model = gatelab.SequenceModel(3, 2, cell="min_gru", hidden_sizes=(4, 4), head="last",
                                  layer_options={"norm": True, "mlp": 8})
    assert sum(n.endswith("mlp_weight_in_l0") for n, _ in model.named_parameters()) == 2


# -- models, configs, the command line, diagnostics, export ---------------------------------------------------------------


@pytest.mark.parametrize("cell", ["min_gru", "min_lstm", "indrnn", "slstm"])
def test_sequence_model_config_and_listing(cell):
    from gatelab import cli, config

    model = gatelab.SequenceModel(2, 1, cell=cell, hidden_sizes=(4, 4), bidirectional=True)
    x = torch.randn(3, 7, 2)
    out, _ = model(x, lengths=torch.tensor([7, 5, 2]))
    out.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
    conf = config.from_dict({"task": {"name": "adding", "length": 10},
                             "model": {"cell": cell, "hidden_sizes": [4], "options": {}}})
    assert conf.model.cell == cell
    assert f"  {cell} " in cli.listing("cells")


def test_toml_config_names_the_cells(tmp_path):
    from gatelab import config

    path = tmp_path / "c.toml"
    path.write_text('[task]\nname = "adding"\nlength = 10\n\n[model]\ncell = "slstm"\nhidden_sizes = [4]\n'
                    'gate_activation = { f = "exp" }\n[model.options]\nnum_heads = 2\n')
    conf = config.load(path)
    assert conf.model.cell == "slstm" and conf.model.options == {"num_heads": 2}
    with pytest.raises(config.ConfigError, match="min_gru"):
        config.from_dict({"model": {"cell": "mingru"}})


@pytest.mark.parametrize("name", list(LAYERS))
def test_diagnostics_run_on_the_new_cells(name):
    from gatelab import diagnostics

    torch.manual_seed(9)
    model = gatelab.SequenceModel(2, 1, cell=registry.entry_of(LAYERS[name].cell_class).name, hidden_sizes=(4,))
    x, y = torch.randn(3, 6, 2), torch.randn(3, 1)
    flow = diagnostics.gradient_flow(model, (x, y))
    assert flow is not None
    norms = diagnostics.jacobian_norms(LAYERS[name](2, 4), torch.randn(6, 2, 2))
    assert norms.shape == (7,) and norms[0] == pytest.approx(1.0) and (norms >= 0).all()


def test_recurrent_spectra_of_the_new_cells():
    from gatelab.diagnostics import recurrent_spectra, spectral_norm, spectral_radius

    torch.manual_seed(10)
    for name in ("MinGRU", "MinLSTM"):
        spectra = recurrent_spectra(LAYERS[name](2, 4, bidirectional=True))
        assert set(spectra) == {"l0", "l0_reverse"}
        assert "no recurrent weight" in spectra["l0"]["skipped"]
    ind = gatelab.IndRNN(2, 5, recurrent_max=0.9)
    with torch.no_grad():
        ind.cells[0].weight_hh.copy_(torch.tensor([0.1, -0.8, 0.3, 0.5, -0.2]))
    s = recurrent_spectra(ind)["l0"]
    dense = torch.diag(ind.cells[0].weight_hh)
    assert s["h.radius"] == pytest.approx(spectral_radius(dense)) == pytest.approx(0.8)
    assert s["all.norm"] == pytest.approx(spectral_norm(dense))
    assert (s["h.abs_min"], s["h.abs_median"], s["h.bound"]) == pytest.approx((0.1, 0.3, 0.9))
    sl = gatelab.SLSTM(2, 6, num_heads=3)
    cell = sl.cells[0]
    s = recurrent_spectra(sl)["l0"]
    K, d = 3, 2
    R = cell.weight_hh.detach().view(4, K, d, d)
    for g, block in enumerate("ifzo"):  # the dense block-diagonal matrix of each gate: the oracle
        full = torch.block_diag(*R[g])
        assert s[f"{block}.radius"] == pytest.approx(spectral_radius(full))
        assert s[f"{block}.norm"] == pytest.approx(spectral_norm(full))
        assert s[f"{block}.head1.norm"] == pytest.approx(spectral_norm(R[g, 1]))
    dense_R = torch.cat([torch.block_diag(*R[g]) for g in range(4)])  # (4H, H)
    assert s["all.norm"] == pytest.approx(spectral_norm(dense_R))


@pytest.mark.parametrize("name", list(LAYERS))
def test_gatelab_diagnose_runs_on_each_new_cell(name, tmp_path):
    pytest.importorskip("matplotlib")
    import json

    from gatelab.diagnostics import diagnose_main

    cell = registry.entry_of(LAYERS[name].cell_class).name
    extra = "num_heads = 2\n" if name == "SLSTM" else ""
    plan = tmp_path / "plan.toml"
    plan.write_text(
        '[task]\nname = "adding"\nlength = 8\nn_train = 64\nn_val = 8\nn_test = 16\n\n'
        '[diagnose]\ntrain_steps = 4\nbatch_size = 8\nevery = 2\n\n'
        f'[[model]]\nlabel = "{name}"\ncell = "{cell}"\nhidden_size = 4\n{extra}'
    )
    out = tmp_path / "out"
    summary = diagnose_main(str(plan), out, quiet=True)
    written = json.loads((out / "summary.json").read_text())
    assert [c["label"] for c in written["configurations"]] == [name] == [c["label"] for c in summary["configurations"]]
    for name_png in ("gradient_vs_lag.png", "jacobian_vs_lag.png", "gradient_heatmap.png", "gate_saturation.png"):
        assert (out / name_png).read_bytes()[:4] == b"\x89PNG"
    spectra = written["configurations"][0]["trained"]["spectra"]
    (layer_spectra,) = spectra.values()
    if name.startswith("Min"):
        assert "no recurrent weight" in layer_spectra["skipped"]
    else:
        assert math.isfinite(layer_spectra["all.norm"])


# -- torch.compile, torch.export and opcheck of the gatelab_scan ops -------------------------------------------

COMPILED = [("MinGRU", {}), ("MinLSTM", {}), ("MinGRU", {"scan": "parallel"}), ("IndRNN", {}),
            ("IndRNN", {"activation": "softsign"}), ("SLSTM", {"num_heads": 2})]
SCAN_OP = {"MinGRU": "min_rnn_forward", "MinLSTM": "min_rnn_forward", "IndRNN": "indrnn_forward", "SLSTM": "slstm_forward"}


@pytest.mark.parametrize("name, options", COMPILED, ids=[f"{n}-{o}" for n, o in COMPILED])
def test_compile_fullgraph_and_export_run_the_scan_ops(name, options):
    needs_cpp()
    torch._dynamo.reset()
    torch.manual_seed(11)
    layer = LAYERS[name](3, 4, bidirectional=True, num_layers=2, dtype=F64, **options).eval()
    x = torch.randn(7, 2, 3, dtype=F64)
    lengths = torch.tensor([7, 4])
    want, want_state = layer(x, lengths=lengths)
    got, got_state = torch.compile(layer, fullgraph=True, backend="aot_eager")(x, lengths=lengths)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for a, b in zip(got_state if isinstance(got_state, tuple) else (got_state,),
                    want_state if isinstance(want_state, tuple) else (want_state,)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    program = torch.export.export(layer, (x,))
    torch.testing.assert_close(program.module()(x)[0], layer(x)[0], rtol=1e-12, atol=1e-12)
    ops = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    cpp_pass = options.get("scan") != "parallel" and options.get("activation") != "softsign"
    assert any(SCAN_OP[name] in o for o in ops) == cpp_pass, ops


@pytest.mark.parametrize("name, options", COMPILED, ids=[f"{n}-{o}" for n, o in COMPILED])
def test_compiled_gradients_equal_eager(name, options):
    needs_cpp()
    torch._dynamo.reset()
    torch.manual_seed(12)
    layer = LAYERS[name](3, 4, bidirectional=True, num_layers=2, dtype=F64, **options)
    if name == "IndRNN":
        layer.eval()  # training mode clips u first behind a data-dependent test: a graph break (docs/cells.md)
    x = torch.randn(6, 3, 3, dtype=F64)
    lengths = torch.tensor([6, 2, 5])

    def grads(fn):
        out, state = fn(x, lengths=lengths)
        states = state if isinstance(state, tuple) else (state,)
        loss = (out * out.detach().cos()).sum() + sum((s * (1.5 + k)).sum() for k, s in enumerate(states))
        return torch.autograd.grad(loss, list(layer.parameters()))

    for g, h in zip(grads(torch.compile(layer, fullgraph=True, backend="aot_eager")), grads(layer)):
        torch.testing.assert_close(g, h, rtol=1e-10, atol=1e-10)


def test_opcheck_every_scan_op():
    needs_cpp()
    torch.manual_seed(13)
    T, B, H, K = 5, 3, 4, 2
    r = lambda *s: torch.randn(*s, dtype=F64)  # noqa: E731
    a, b, h0 = torch.rand(T, B, H, dtype=F64), r(T, B, H), r(B, H)
    lengths = torch.tensor([T, 3, 1])
    ops = torch.ops.gatelab_scan
    n0, m0 = torch.rand(B, H, dtype=F64) + 0.5, r(B, H) * 0.1
    kinds, params = [9, 1, 4, 1], [0.0, 0.0, 0.0, 0.0]
    xw, R, b_hh = r(T, B, 4 * H), r(4 * H, H // K) * 0.5, r(4 * H)
    Hs, Cs, Ns, Ms, P = ops.slstm_forward(xw, R, b_hh, h0, r(B, H), n0, m0, lengths, K, kinds, params, False)
    grad = lambda *t: tuple(v.clone().requires_grad_() for v in t)  # noqa: E731
    cases = [
        (ops.linear_scan, (*grad(a, b, h0), False)),
        (ops.linear_scan, (*grad(a, b, h0), True)),
        (ops.linear_scan_backward, (a, Hs, h0, r(T, B, H), True)),
        (ops.indrnn_forward, (*grad(b, a[0, 0], h0), lengths, 1, 0.0, False)),
        (ops.indrnn_forward, (*grad(b, a[0, 0], h0), None, 4, 0.2, True)),
        (ops.slstm_forward, (*grad(xw, R, b_hh, h0, Cs[0], n0, m0), lengths, K, kinds, params, False)),
        (ops.slstm_forward, (*grad(xw, R), None, *grad(h0, Cs[0], n0, m0), None, K, [1, 9, 6, 2], [0, 0, 0, 0.2], True)),
        (ops.slstm_backward, (R, P, h0, Cs[0], n0, m0, Hs, Cs, Ns, Ms, r(T, B, H), r(T, B, H), r(T, B, H), r(T, B, H),
                              lengths, K, kinds, params, False)),
    ]
    for G in (2, 3):  # the fused minGRU / minLSTM pass and its backward
        xw, h, kinds, params = (v.detach() if isinstance(v, torch.Tensor) else v for v in min_fused_args(G))
        out, last = ops.min_rnn_forward(xw, h, lengths, kinds, params, False)
        cases += [
            (ops.min_rnn_forward, (*grad(xw, h), lengths, kinds, params, False)),
            (ops.min_rnn_forward, (*grad(xw, h), None, kinds, params, True)),
            (ops.min_rnn_backward, (xw, h, out, r(*out.shape), r(*last.shape), lengths, kinds, params, True)),
            (ops.min_rnn_backward, (xw, h, out, None, r(*last.shape), None, kinds, params, False)),
        ]
    for op, args in cases:
        torch.library.opcheck(op, args)
    for reverse in (False, True):  # the registered autograd of the ops themselves, in float64
        assert torch.autograd.gradcheck(lambda a, b, h, r=reverse: ops.linear_scan(a, b, h, r), grad(a, b, h0))
        assert torch.autograd.gradcheck(
            lambda x, u, h, r=reverse: ops.indrnn_forward(x, u, h, lengths, 2, 0.0, r), grad(b, a[0, 0], h0))


def test_onnx_exports_each_new_cell_as_a_scan():
    """onnxruntime against the layers: tests/test_onnx.py (RECURRENCE_GRID)."""
    for name, cls in LAYERS.items():
        how = gatelab.onnx.form(cls(2, 4, bidirectional=True))
        assert how.startswith("ONNX Scan over time (2): ONNX has no recurrent node"), (name, how)
