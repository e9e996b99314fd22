"""The fused engine's Triton loop (gpu.py, triton_kernels.py) under Triton's interpreter on the CPU,
against the reference engine: outputs, states and every gradient, for every cell, every activation
with a Triton form in every slot, per-gate mappings, lengths, bidirectional and stacked layers,
initial states, recurrent dropout, DropConnect and zoneout, both forms, float64/float32 and the
reduced precisions; the operators' opcheck; torch.compile. The CUDA runs of the same are at the end
(skipped without a GPU)."""

from __future__ import annotations

import importlib.util
import sys
import warnings

import pytest
import torch
from test_fused import LAYERS, SLOTS, max_error, run_pair
from test_operators import OPTIONALS, _backward_args, _forward_args

import gatelab
from gatelab.activations import available
from gatelab.activations import get as get_activation
from gatelab.engines.fused import cpp, gpu, ops

triton = pytest.importorskip("triton", reason="triton is not installed (the dev extra brings it)")
tl = pytest.importorskip("triton.language")

TRITON_ACTIVATIONS = [name for name in available() if getattr(get_activation(name), "triton", None) is not None]
TOL = {torch.float64: 1e-10, torch.float32: 2e-5}


@pytest.fixture(autouse=True)
def interpret(monkeypatch):
    """Every test here runs the Triton loop on CPU tensors, under the interpreter."""
    monkeypatch.setenv("GATELAB_TRITON", "interpret")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # for the test's own kernel; gatelab's follow GATELAB_TRITON
    monkeypatch.delenv("GATELAB_TRITON_FORM", raising=False)


@pytest.fixture(params=gpu.FORMS)
def form(request, monkeypatch):
    monkeypatch.setenv("GATELAB_TRITON_FORM", request.param)
    return request.param


def _check_on_triton(result: dict) -> None:
    text = result["layer"].explain()
    assert "Triton loop under Triton's interpreter" in text, text


def test_every_builtin_stateless_activation_has_a_triton_form():
    """Everything the C++ loop fuses, the Triton loop fuses too (the learnable ones are modules)."""
    assert sorted(TRITON_ACTIVATIONS) == sorted(k for k in cpp.KINDS)


def _apply_kernel():
    @triton.jit  # decorated here, under the interpreter the fixture switched on
    def apply(X, Y, DY, N: tl.constexpr, FN: tl.constexpr, DFN: tl.constexpr):
        i = tl.arange(0, N)
        x = tl.load(X + i)
        y = FN(x)
        tl.store(Y + i, y)
        tl.store(DY + i, DFN(x, y))

    return apply


@pytest.mark.parametrize("name", TRITON_ACTIVATIONS)
def test_triton_forms_equal_the_registry_functions(name):
    """Each entry's Triton forward and derivative (compiled into a kernel of their own) against its
    torch ``fn``/``dfn`` in float64, on points either side of every kink."""
    act = get_activation(name)
    f, d = gpu.activation_functions(*cpp._kind(act))
    apply = _apply_kernel()
    x = torch.cat([torch.linspace(-25, 25, 233, dtype=torch.float64),
                   torch.tensor([-800.0, -100.0, 100.0, 800.0, -3.1, -1e-3, 1e-3, 0.7, 2.9])])  # exp overflows
    x = torch.cat([x, torch.zeros(256 - x.numel(), dtype=torch.float64) + 0.3])
    y, dy = torch.empty_like(x), torch.empty_like(x)
    with warnings.catch_warnings():  # the interpreter's numpy warns where exp overflows to inf, as intended
        warnings.simplefilter("ignore", RuntimeWarning)
        apply[(1,)](x, y, dy, 256, f, d)
    torch.testing.assert_close(y, act(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dy, act.derivative(x), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", TRITON_ACTIVATIONS)
def test_a_derivative_reads_the_pre_activation_only_where_the_operators_keep_it(name):
    """The operators keep the pre-activations only for a kind whose derivative reads them
    (cpp._needs_input, which the fake kernels follow too): a Triton derivative must agree."""
    for param in ((0.01, 0.3) if name == "leaky_relu" else (None,)):
        act = get_activation(name if param is None else f"{name}:{param}")
        reads_x = "x" in act.triton[1].replace("tl.exp", "").replace("tl.abs", "").replace("tl.maximum", "")
        assert reads_x == cpp._needs_input(*cpp._kind(act)), (act.key, act.triton[1])


@pytest.mark.parametrize("layer", list(LAYERS))
@pytest.mark.parametrize("activation", TRITON_ACTIVATIONS)
def test_every_activation_in_every_slot(layer, activation):
    for slot in SLOTS[layer]:
        ref, tri = run_pair(LAYERS[layer], {slot: activation, "bidirectional": True}, torch.float64)
        _check_on_triton(tri)
        err = max_error(ref, tri)
        assert err < TOL[torch.float64], (layer, slot, activation, err)


OPTIONS = {  # every option the Triton loop takes, on every cell
    "stacked": {"num_layers": 2, "bidirectional": True, "dropout": 0.0},
    "recurrent_dropout": {"recurrent_dropout": 0.3, "bidirectional": True},
    "dropconnect": {"weight_dropout": 0.3},
    "zoneout": {"zoneout": 0.25, "bidirectional": True},
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("layer", list(LAYERS))
def test_options_in_both_forms(layer, option, dtype, form):
    opts = dict(OPTIONS[option])
    if option == "zoneout" and layer == "RNN":
        opts["zoneout"] = 0.25
    opts.update({SLOTS[layer][0]: "hard_sigmoid" if layer != "RNN" else "softsign"})
    ref, tri = run_pair(LAYERS[layer], opts, dtype)
    _check_on_triton(tri)
    assert form.replace("_", "-") in tri["layer"].explain()
    err = max_error(ref, tri)
    assert err < TOL[dtype], (layer, option, err)


@pytest.mark.parametrize("layer", list(LAYERS))
def test_several_tiles_of_rows_and_units_and_initial_states(layer, form):
    """H 40 (two unit tiles, weights not resident), B 20 (two programs), given initial states."""
    torch.manual_seed(0)
    opts = {SLOTS[layer][0]: "elliott"}
    ref = LAYERS[layer](3, 40, backend="reference", dtype=torch.float64, **opts)
    tri = LAYERS[layer](3, 40, backend="fused", strict=True, dtype=torch.float64, **opts)
    tri.load_state_dict(ref.state_dict())
    x = torch.randn(4, 20, 3, dtype=torch.float64)
    h0 = torch.randn(1, 20, 40, dtype=torch.float64)
    state = (h0, torch.randn_like(h0)) if layer == "LSTM" else h0
    results = []
    for model in (ref, tri):
        xg = x.clone().requires_grad_()
        s = tuple(t.clone().requires_grad_() for t in state) if layer == "LSTM" else state.clone().requires_grad_()
        out, _ = model(xg, s)
        grads = torch.autograd.grad((out * out.detach().cos()).sum(), [xg, *(s if isinstance(s, tuple) else (s,)),
                                                                       *model.parameters()])
        results.append((out, grads))
    assert "Triton loop" in tri.explain()
    torch.testing.assert_close(results[1][0], results[0][0], rtol=0, atol=1e-12)
    for a, b in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


@pytest.mark.parametrize("layer", list(LAYERS))
def test_the_no_grad_forward_keeps_nothing_and_equals_the_reference(layer, form):
    """Without a gradient the loop keeps one slot of each buffer (and two of the recurrent input):
    outputs and states against the reference, packed and bidirectional."""
    torch.manual_seed(0)
    opts = {SLOTS[layer][0]: "hard_sigmoid" if layer != "RNN" else "softsign", "bidirectional": True}
    ref = LAYERS[layer](3, 20, backend="reference", dtype=torch.float64, **opts)
    tri = LAYERS[layer](3, 20, backend="fused", strict=True, dtype=torch.float64, **opts)
    tri.load_state_dict(ref.state_dict())
    x = torch.randn(6, 18, 3, dtype=torch.float64)
    lengths = torch.randint(1, 7, (18,))
    with torch.no_grad():
        (want, hw), (got, hg) = ref(x, lengths=lengths), tri(x, lengths=lengths)
    assert "Triton loop" in tri.explain()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    for a, b in zip(hg if isinstance(hg, tuple) else (hg,), hw if isinstance(hw, tuple) else (hw,)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_per_gate_mappings():
    opts = {"gate_activation": {"i": "hard_sigmoid", "f": "elliott", "o": "gelu"}, "candidate_activation": "relu",
            "cell_activation": "softsign", "bidirectional": True}
    ref, tri = run_pair(gatelab.LSTM, opts, torch.float64)
    _check_on_triton(tri)
    assert max_error(ref, tri) < 1e-10
    ref, tri = run_pair(gatelab.GRU, {"gate_activation": {"r": "silu", "z": "hard_sigmoid"}}, torch.float64)
    _check_on_triton(tri)
    assert max_error(ref, tri) < 1e-10


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("layer", list(LAYERS))
def test_reduced_precision_runs_in_float32_with_float32_state(layer, dtype):
    """A bfloat16/float16 layer against the float32 reference with the same (rounded) weights: within
    the reduced precision's rounding of the inputs, outputs and saved buffers."""
    torch.manual_seed(0)
    opts = {SLOTS[layer][0]: "hard_sigmoid" if layer != "RNN" else "softsign"}
    low = LAYERS[layer](3, 8, backend="fused", strict=True, dtype=dtype, **opts)
    ref = LAYERS[layer](3, 8, backend="reference", **opts)
    ref.load_state_dict({k: v.float() for k, v in low.state_dict().items()})
    x = torch.randn(6, 4, 3).to(dtype)
    out, _ = low(x.requires_grad_())
    want, _ = ref(x.detach().float().requires_grad_())
    assert "Triton loop" in low.explain() and out.dtype == dtype
    torch.testing.assert_close(out.float(), want, rtol=0, atol=3e-2)
    (g_low,) = torch.autograd.grad(out.float().sum(), [low.weight_hh_l0])
    (g_ref,) = torch.autograd.grad(want.sum(), [ref.weight_hh_l0])
    assert g_low.dtype == dtype
    assert (g_low.float() - g_ref).abs().max() <= 5e-2 * g_ref.abs().max().clamp(min=1)


def test_cpu_autocast_runs_the_layer_in_its_own_dtype():
    torch.manual_seed(0)
    layer = gatelab.LSTM(3, 8, backend="fused", strict=True, gate_activation="hard_sigmoid")
    x = torch.randn(5, 2, 3)
    want, _ = layer(x)
    with torch.autocast("cpu", torch.bfloat16):
        got, _ = layer(x)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("op", [op for op in ops.CELL_OPS if not op.layer_norm], ids=lambda op: op.name)
@pytest.mark.parametrize("options", OPTIONALS, ids=lambda o: "".join("TLZMR"[i] for i, v in enumerate(o) if v) or "-")
def test_opcheck_triton_forward(op, options):
    args = list(_forward_args(op, *options))
    if op.peephole:  # the Triton loop has no peepholes
        for name in ("w_ci", "w_cf", "w_co"):
            args[[k for k, _ in ops.forward_arguments(op)].index(name)] = None
    torch.library.opcheck(getattr(torch.ops.gatelab_triton, op.name), tuple(args))


@pytest.mark.parametrize("op", [op for op in ops.CELL_OPS if not op.layer_norm], ids=lambda op: op.name)
@pytest.mark.parametrize("options", [o for o in OPTIONALS if o[0]], ids=lambda o: "".join("TLZMR"[i] for i, v in
                                                                                       enumerate(o) if v))
def test_triton_backward_operator_equals_the_cpp_one(op, options):
    """The Triton backward operator against the C++ one on the same saved buffers (each forward's own),
    and opcheck on it."""
    if not cpp.load():
        pytest.skip("C++ kernels unavailable (no compiler)")
    names = [k for k, _ in ops.forward_arguments(op)]
    args = list(_forward_args(op, *options))
    if op.peephole:
        for name in ("w_ci", "w_cf", "w_co"):
            args[names.index(name)] = None
    k = len(ops.backward_grads(op)) - len(op.states)
    results = []
    for namespace in ("gatelab", "gatelab_triton"):
        forward = getattr(getattr(torch.ops, namespace), op.name)
        with torch.no_grad():
            outs = forward(*args)
        backward_args = _backward_args(op, tuple(args), [True] * k)
        # the saved buffers of this namespace's own forward
        a = dict(zip([n for n, _ in ops.backward_arguments(op)], backward_args))
        a.update(zip(op.saved, outs[1 + len(op.states):]))
        if op is ops.ELMAN and a["S"].numel() == 0:
            a["S"] = outs[0]
        call = tuple(a[n] for n, _ in ops.backward_arguments(op))
        backward = getattr(getattr(torch.ops, namespace), op.backward_name)
        if namespace == "gatelab_triton":
            torch.library.opcheck(backward, call)
        results.append((outs[:1 + len(op.states)], backward(*call)))
    (f_cpp, b_cpp), (f_tri, b_tri) = results
    for a, b in zip((*f_tri, *b_tri), (*f_cpp, *b_cpp)):  # relu and gelu gates on random weights grow large
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-11)


def test_compile_fullgraph_runs_the_triton_operator_and_equals_eager():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = gatelab.GRU(3, 6, 2, bidirectional=True, gate_activation="hard_sigmoid", candidate_activation="relu")
    x = torch.randn(5, 2, 3, requires_grad=True)

    def run(m):
        out, h = m(x)
        return out, torch.autograd.grad((out * out.detach().cos()).sum() + h.sum(), [x, *model.parameters()])

    want = run(model)
    seen = []

    def backend(gm, inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return torch._dynamo.backends.debugging.aot_eager(gm, inputs)

    got = run(torch.compile(model, fullgraph=True, backend=backend, dynamic=False))
    torch._dynamo.reset()
    assert sum("gatelab_triton.gru" in s for s in seen) == 4  # 2 layers x 2 directions, one node each
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-6)
    for a, b in zip(got[1], want[1]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_explain_says_why_a_cell_is_not_on_the_triton_loop():
    peep = gatelab.LSTM(3, 4, backend="fused", peephole=True)
    assert "peephole is not on the Triton loop" in peep.explain() and "C++ loop" in peep.explain()
    name = "twice_tanh_triton_test"
    gatelab.activations.register(name, lambda x: 2 * torch.tanh(x), lambda x, y: 2 * (1 - (y / 2) ** 2), overwrite=True)
    user = gatelab.GRU(3, 4, backend="fused", candidate_activation=name)
    text = user.explain()
    assert f"phi ({name}) has no Triton form" in text and "pure-PyTorch loop" in text
    x = torch.randn(4, 2, 3)
    ref = gatelab.GRU(3, 4, backend="reference", candidate_activation=name)
    ref.load_state_dict(user.state_dict())
    torch.testing.assert_close(user(x)[0], ref(x)[0], rtol=0, atol=1e-6)


def test_forms_by_size_and_the_override(monkeypatch):
    # in registers: 16-bit up to 32 KiB, 32-bit tiles up to 32 (larger ones spill)
    assert gpu.resident(4, 32, torch.float32) and not gpu.resident(4, 64, torch.float32)
    assert gpu.resident(4, 64, torch.bfloat16) and gpu.resident(1, 128, torch.bfloat16)
    assert not gpu.resident(4, 128, torch.bfloat16)
    # persistent while the weights fit L1 (64 KiB), per-step beyond
    assert gpu.form(4, 64, torch.float32) == "persistent" and gpu.form(1, 128, torch.float32) == "persistent"
    assert gpu.form(4, 128, torch.bfloat16) == "per_step" and gpu.form(4, 65, torch.float32) == "per_step"
    assert gpu.form(3, 128, torch.bfloat16) == "per_step" and gpu.form(4, 1024, torch.float32) == "per_step"
    monkeypatch.setenv("GATELAB_TRITON_FORM", "per_step")
    assert gpu.form(4, 16, torch.float32) == "per_step"
    monkeypatch.setenv("GATELAB_TRITON_FORM", "fast")
    with pytest.raises(ValueError, match="GATELAB_TRITON_FORM must be one of persistent, per_step, got 'fast'"):
        gpu.form(4, 16, torch.float32)


def test_the_loop_off_the_cpu_by_default_and_without_triton(monkeypatch):
    monkeypatch.delenv("GATELAB_TRITON")
    layer = gatelab.LSTM(3, 4, backend="fused", gate_activation="hard_sigmoid")
    assert "Triton" not in layer.explain()  # on the CPU without the interpreter switch: not even mentioned
    monkeypatch.setenv("GATELAB_TRITON", "interpret")
    monkeypatch.setitem(sys.modules, "triton", None)  # as if triton were not installed
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else object())
    text = layer.explain()
    assert "the Triton loop needs triton, which is not installed (pip install 'gatelab[triton]'" in text
    assert "C++ loop" in text or "pure-PyTorch loop" in text
    monkeypatch.setenv("GATELAB_TRITON", "sometimes")
    with pytest.raises(ValueError, match="GATELAB_TRITON must be 'interpret', 'off' or unset, got 'sometimes'"):
        gpu.mode()


# -- on a GPU ---------------------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("layer", list(LAYERS))
@pytest.mark.parametrize("cuda_form", gpu.FORMS)
@pytest.mark.parametrize("hidden", [24, 72])  # one tile, resident; three tiles through the cache
def test_on_cuda_the_triton_loop_equals_the_reference(layer, cuda_form, hidden, monkeypatch):
    """Every gradient against the reference in float64 on the GPU (where the programs' threads really
    run at once), 40 rows in three programs, variable lengths, each call twice (the per-step form's
    graph is captured on the second and replayed on the third)."""
    monkeypatch.delenv("GATELAB_TRITON")
    monkeypatch.setenv("GATELAB_TRITON_FORM", cuda_form)
    torch.manual_seed(0)
    opts = {SLOTS[layer][0]: "hard_sigmoid" if layer != "RNN" else "softsign", "bidirectional": True}
    dev = torch.device("cuda")
    ref = LAYERS[layer](3, hidden, backend="reference", dtype=torch.float64, device=dev, **opts)
    tri = LAYERS[layer](3, hidden, backend="fused", strict=True, dtype=torch.float64, device=dev, **opts)
    tri.load_state_dict(ref.state_dict())
    assert "Triton loop on CUDA" in tri.explain()
    x = torch.randn(7, 40, 3, dtype=torch.float64, device=dev)
    lengths = torch.randint(1, 8, (40,))
    results = []
    for model in (ref, tri):
        for _ in range(3):
            xg = x.clone().requires_grad_()
            out, _ = model(xg, lengths=lengths)
            grads = torch.autograd.grad((out * out.detach().cos()).sum(), [xg, *model.parameters()])
        results.append((out, grads))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=0, atol=1e-10)
    for a, b in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-9)


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_on_cuda_a_custom_lstm_trains_in_reduced_precision(dtype, monkeypatch):
    monkeypatch.delenv("GATELAB_TRITON")
    torch.manual_seed(0)
    dev = torch.device("cuda")
    low = gatelab.LSTM(16, 64, backend="fused", strict=True, dtype=dtype, device=dev, gate_activation="hard_sigmoid",
                       candidate_activation="relu")
    ref = gatelab.LSTM(16, 64, backend="reference", device=dev, gate_activation="hard_sigmoid",
                       candidate_activation="relu")
    ref.load_state_dict({k: v.float() for k, v in low.state_dict().items()})
    x = torch.randn(50, 16, 16, device=dev).to(dtype)
    out, _ = low(x)
    want, _ = ref(x.float())
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(out.float(), want, rtol=0, atol=tol)
    (g_low,) = torch.autograd.grad(out.float().square().sum(), [low.weight_hh_l0])
    (g_ref,) = torch.autograd.grad(want.square().sum(), [ref.weight_hh_l0])
    assert (g_low.float() - g_ref).abs().max() <= (1e-3 if dtype == torch.float32 else 5e-2) * g_ref.abs().max()


# -- compiled for a GPU, without one ------------------------------------------------------------------------

_POINTERS = {"forward": ["XW", "W", "BHH", "HS", "CS", "OUT", "A", "C", "K", "HR", "X2", "LEN", "MASK", "ZH", "ZC", "GH"],
             "backward": ["DOUT", "DH", "DC", "Z", "A", "C", "K", "X2", "S0", "W", "DZ", "DGH", "LEN", "MASK", "ZH", "ZC"]}
_COUNTERS = {"forward": ["T", "B", "H", "k_first", "nsteps"], "backward": ["T", "B", "H", "k_last", "nsteps"]}


def _signature(which: str, dtype: str) -> dict[str, str]:
    state = "fp64" if dtype == "fp64" else "fp32"
    sig = {p: "*i64" if p == "LEN" else f"*{state}" if p in ("HS", "CS", "DH", "DC") else f"*{dtype}"
           for p in _POINTERS[which]}
    return sig | {n: "i32" for n in _COUNTERS[which]}


@pytest.mark.parametrize("cell", ["lstm", "gru", "elman", "gated_state"])
def test_the_kernels_compile_for_a_hopper_gpu_without_one(cell, monkeypatch):
    """Triton's compiler and ptxas (both in the triton wheel) build every form of each cell's kernels
    for sm_90: what the interpreter forgives (globals, types across branches) fails here."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    monkeypatch.setenv("GATELAB_TRITON", "cuda")  # the compiled kernels, not the interpreted ones
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")
    kernels = gpu.kernels()
    f, d = gpu.activation_functions(cpp.KINDS.index("hard_sigmoid"), 1 / 6)
    g, dg = gpu.activation_functions(cpp.KINDS.index("gelu"), 0.0)
    code, gates = gpu._CELL[cell], gpu._GATES[cell]
    target = GPUTarget("cuda", 90, 32)
    spills = []
    variants = (("fp32", True, "ieee"), ("bf16", False, "ieee"), ("fp16", True, "ieee"), ("fp64", False, "ieee"),
                ("fp32", False, "tf32"))
    for dtype, train, precision in variants:
        common = dict(CELL=code, NG=gates, REVERSE=train, HAS_LEN=train, HAS_MASK=True, HAS_ZH=True,
                      HAS_ZC=cell == "lstm", HAS_X2=train, BB=16, UPCAST=False, PRECISION=precision)
        torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}[dtype]
        # the largest tile gpu.resident() holds on chip for this dtype and cell
        tile = max(t for t in (16, 32, 64, 128) if gpu.resident(gates, t, torch_dtype))
        for fused, resident in ((True, True), (True, False), (False, False)):
            bh = tile if resident else 32
            c = common | dict(F0=f, F1=g, F2=f, F3=f, F4=g, TRAIN=train, SAVE_Z=train, WRITE_S=True,
                              HAS_BHH=cell == "gru", FUSED=fused, RESIDENT=resident, BH=bh, BK=bh)
            k = triton.compile(ASTSource(fn=kernels.recurrent_forward, signature=_signature("forward", dtype) |
                                         {n: "constexpr" for n in c}, constexprs=c), target=target)
            spills.append((f"forward {dtype} fused={fused} resident={resident} tile={bh}", _stack_bytes(k)))
            if not resident:
                c = common | dict(D0=d, D1=dg, D2=d, D3=d, D4=dg, HAS_Z=train, FUSED=fused, BH=32, BK=32)
                k = triton.compile(ASTSource(fn=kernels.recurrent_backward, signature=_signature("backward", dtype) |
                                             {n: "constexpr" for n in c}, constexprs=c), target=target)
                spills.append((f"backward {dtype} fused={fused}", _stack_bytes(k)))
    # float64 (tests and references, not speed) is allowed its spills: its values take two registers each
    measured = [(what, b) for what, b in spills if b is not None and "fp64" not in what]
    # no tile spills to local memory (a held weight tile that did would take kilobytes per thread; a few
    # dozen bytes are spilled scalars)
    assert not [(what, b) for what, b in measured if b > 128], measured


def _stack_bytes(kernel) -> int | None:
    """Per-thread stack (local memory: spilled registers) of a compiled kernel, read from its cubin with
    the triton wheel's cuobjdump; None where that tool is missing."""
    import re
    import shutil
    import subprocess
    import tempfile
    from pathlib import Path

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists() and shutil.which("cuobjdump") is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        text = subprocess.run([str(tool if tool.exists() else "cuobjdump"), "-res-usage", str(cubin)],
                              capture_output=True, text=True, check=True).stdout
    found = re.findall(r"STACK:(\d+)", text)
    return max(map(int, found)) if found else None
