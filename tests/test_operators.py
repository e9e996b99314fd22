"""The fused engine's operators and what they let a layer do outside eager float32: torch.library.opcheck
on every operator, torch.compile (fullgraph), torch.export with dynamic shapes, torch.func, jit.trace
and higher-order gradients on every engine."""

from __future__ import annotations

import warnings

import pytest
import torch

import gatelab
from gatelab.engines.fused import cpp, ops

pytestmark = pytest.mark.skipif(not cpp.load(), reason="C++ kernels unavailable (no compiler)")

T, B, I, H = 4, 3, 3, 5
GATES = ["hard_sigmoid", "gelu", "relu", "sigmoid", "tanh"]  # gelu: a derivative that reads the pre-activation


def _forward_args(op: ops.CellOp, train: bool, lengths: bool, zone: bool, mask: bool, reverse: bool = False):
    """Arguments for ``torch.ops.gatelab.<op>`` (float64), each optional input present or not (the LSTM's
    peepholes with the masks)."""
    g = torch.Generator().manual_seed(0)
    G = op.width * H

    def r(*shape, shift=0.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) + shift).requires_grad_(train)

    kinds = [cpp.KINDS.index(k) for k in GATES[:len(op.cell(1, 1).activation_slots())]]
    a = {"W_hh": r(G, H), **{f"{s}0": r(B, H) for s in op.states},
         "lengths": torch.tensor([4, 2, 3]) if lengths else None,
         "rec_mask": (torch.rand(B, H, generator=g, dtype=torch.float64) > 0.3).double() / 0.7 if mask else None,
         **{f"z{s}": torch.rand(T, B, H, generator=g, dtype=torch.float64) if zone else None for s in op.states},
         "w_ci": r(H) if mask else None, "w_cf": r(H) if mask else None, "w_co": r(H) if mask else None,
         "peep_current": not reverse, "kinds": kinds,
         "params": [1 / 6 if cpp.KINDS[k] == "hard_sigmoid" else 0.0 for k in kinds], "reverse": reverse,
         "train": train, "x": r(T, B, I), "W_ih": r(G, I), "b_ih": r(G), "b_hh": r(G), "xw": r(T, B, G),
         "g_hh": r(G, shift=1.0), "g_c": r(H, shift=1.0), "b_c": r(H), "eps": 1e-5}
    return tuple(a[k] for k, _ in ops.forward_arguments(op))


def _backward_args(op: ops.CellOp, forward_args: tuple, needs: list[bool]):
    """Arguments for ``torch.ops.gatelab.<op>_backward`` from a forward call that kept its buffers."""
    n = len(op.states)
    with torch.no_grad():
        outs = getattr(torch.ops.gatelab, op.name)(*forward_args)
    a = {k: v.detach() if isinstance(v, torch.Tensor) else v
         for (k, _), v in zip(ops.forward_arguments(op), forward_args)}
    a.update(zip(op.saved, outs[1 + n:]))
    if op is ops.ELMAN and a["S"].numel() == 0:
        a["S"] = outs[0]  # what the autograd formula passes: S is the output
    g = torch.Generator().manual_seed(1)
    for name, o in zip(("dout", *(f"d{s}" for s in op.states)), outs):
        a[name] = torch.randn(o.shape, generator=g, dtype=o.dtype)
    a["needs"] = needs
    return tuple(a[k] for k, _ in ops.backward_arguments(op))


OPTIONALS = [  # (train, lengths, zoneout, recurrent mask, reverse)
    (True, False, False, False, False), (True, True, True, True, True), (False, True, False, True, False),
    (True, False, True, False, True), (False, False, True, False, False),
]


@pytest.mark.parametrize("op", ops.CELL_OPS, ids=lambda op: op.name)
@pytest.mark.parametrize("options", OPTIONALS, ids=lambda o: "".join("TLZMR"[i] for i, v in enumerate(o) if v) or "-")
def test_opcheck_forward(op, options):
    torch.library.opcheck(getattr(torch.ops.gatelab, op.name), _forward_args(op, *options))


@pytest.mark.parametrize("op", ops.CELL_OPS, ids=lambda op: op.name)
@pytest.mark.parametrize("options", [o for o in OPTIONALS if o[0]], ids=lambda o: "".join("TLZMR"[i] for i, v in
                                                                                       enumerate(o) if v))
@pytest.mark.parametrize("all_needed", [True, False])
def test_opcheck_backward(op, options, all_needed):
    k = len(ops.backward_grads(op)) - len(op.states)
    needs = [True] * k if all_needed else [False, *([True] * (k - 1))]  # e.g. no dx for a data batch
    torch.library.opcheck(getattr(torch.ops.gatelab, op.backward_name), _backward_args(op, _forward_args(op, *options),
                                                                                       needs))


def test_operator_schemas_name_their_arguments():
    schema = str(torch.ops.gatelab.lstm.default._schema)
    assert schema.startswith("gatelab::lstm(Tensor x, Tensor W_ih, Tensor W_hh, Tensor? b_ih, Tensor? b_hh, Tensor h0, "
                             "Tensor c0, Tensor? lengths, Tensor? rec_mask, Tensor? zh, Tensor? zc, Tensor? w_ci, "
                             "Tensor? w_cf, Tensor? w_co, bool peep_current, int[] kinds")
    assert "-> (Tensor out, Tensor h, Tensor c, Tensor Z" in schema
    assert ("bool[] needs) -> (Tensor dx, Tensor dW_ih, Tensor dW_hh, Tensor db_ih, Tensor dw_ci, Tensor dw_cf, "
            "Tensor dw_co, Tensor dh0, Tensor dc0)") in str(torch.ops.gatelab.lstm_backward.default._schema)


def test_a_forward_that_kept_nothing_refuses_a_backward_clearly():
    args = _forward_args(ops.GRU, True, False, False, False)
    outs = torch.ops.gatelab.gru(*args[:-1], False)  # train=False
    with pytest.raises(RuntimeError, match=r"gatelab.gru ran with train=False"):
        outs[0].sum().backward()


# -- layers: compile, export, torch.func, jit.trace -----------------------------------------------

LAYERS = {  # the cells the issue names, each through the path `auto` gives it
    "lstm_per_gate_peephole_2x_bi": lambda: gatelab.LSTM(3, 6, 2, bidirectional=True, peephole=True,
                                                         gate_activation={"i": "hard_sigmoid", "f": "sigmoid",
                                                                          "o": "elliott"}, candidate_activation="relu"),
    "lstm_per_gate_2x_bi": lambda: gatelab.LSTM(3, 6, 2, bidirectional=True,
                                                gate_activation={"i": "hard_sigmoid", "f": "sigmoid", "o": "gelu"},
                                                candidate_activation="relu"),
    "lstm_default": lambda: gatelab.LSTM(3, 6, 2, bidirectional=True),
    "lstm_projection": lambda: gatelab.LSTM(3, 6, proj_size=2, gate_activation="hard_sigmoid"),  # PyTorch loop
    "lstm_layer_norm": lambda: gatelab.LSTM(3, 6, layer_norm=True, gate_activation="hard_sigmoid"),
    "gru": lambda: gatelab.GRU(3, 6, 2, bidirectional=True, gate_activation="hard_sigmoid", candidate_activation="relu"),
    "gru_default": lambda: gatelab.GRU(3, 6),
    "rnn": lambda: gatelab.RNN(3, 6, 2, activation="softsign"),
    "gated_state": lambda: gatelab.GatedStateRNN(3, 6, 2, bidirectional=True, gate_activation="hard_sigmoid"),
}


@pytest.fixture(autouse=True)
def _fresh_compiler():
    """Each test compiles anew: the layers share one forward, and dynamo's per-code cache fills up."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _layer(name):
    torch.manual_seed(0)
    return LAYERS[name]()


def _loss_and_grads(model, x, lengths=None):
    out, hn = model(x, lengths=lengths)
    hn = hn if isinstance(hn, tuple) else (hn,)
    loss = (out * out.detach().cos()).sum() + sum((h * h.detach().sin()).sum() for h in hn)
    params = [p for p in model.parameters()]
    return out, hn, torch.autograd.grad(loss, [x, *params])


@pytest.mark.parametrize("name", LAYERS)
def test_compile_fullgraph_forward_and_backward_equal_eager(name):
    model = _layer(name)
    x = torch.randn(5, 2, 3, requires_grad=True)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager", dynamic=False)
    want = _loss_and_grads(model, x)
    got = _loss_and_grads(compiled, x)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-5)
    for a, b in zip(got[1], want[1]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    for a, b in zip(got[2], want[2]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # inductor itself calls torch.jit.script_method
def test_compile_with_inductor_runs_the_operator_as_one_node():
    """The default backend (inductor) on a custom LSTM: equal to eager, and its graph holds one operator
    call per direction (never a per-step loop)."""
    model = _layer("lstm_per_gate_2x_bi")
    x = torch.randn(7, 2, 3, requires_grad=True)
    graphs = []

    def counting(gm, inputs):
        graphs.append(gm)
        return gm.forward

    torch.compile(model, fullgraph=True, backend=counting)(x)
    calls = [n for n in graphs[0].graph.nodes if n.op == "call_function" and "gatelab" in str(n.target)]
    assert len(calls) == 4  # 2 layers x 2 directions
    want = _loss_and_grads(model, x)
    got = _loss_and_grads(torch.compile(model, fullgraph=True), x)
    for a, b in zip((got[0], *got[1], *got[2]), (want[0], *want[1], *want[2])):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_explain_says_what_runs_under_compile():
    text = gatelab.LSTM(3, 4).explain()
    assert "Under torch.compile on the CPU (float32, without lengths or dropout between layers) torch's oneDNN" in text
    assert "under torch.export and torch.func, the fused engine, C++ loop" in text
    assert "Under torch.compile, torch.export and torch.func the fused engine, C++ loop" in gatelab.GRU(3, 4).explain()
    assert "under torch.compile, torch.export and torch.func the reference loop" in gatelab.LSTM(3, 4, proj_size=2).explain()
    assert "Under torch.compile" not in gatelab.LSTM(3, 4, gate_activation="hard_sigmoid").explain()


@pytest.mark.parametrize("layers", [1, 2])
def test_a_compiled_default_lstm_runs_torchs_onednn_kernel_and_equals_eager(layers):
    """torch.compile of a default-activation LSTM (eager: torch's kernel) runs torch's own oneDNN LSTM as
    gatelab's operators, one per layer and direction, and gives eager's outputs and every gradient
    exactly (the same kernel); with lengths, under export and in float64 the fused engine runs."""
    torch.manual_seed(0)
    model = gatelab.LSTM(3, 6, layers, bidirectional=True)
    assert model.engine_name == "native"
    x = torch.randn(5, 2, 3, requires_grad=True)
    h0 = tuple(torch.randn(2 * layers, 2, 6, requires_grad=True) for _ in range(2))
    seen = []

    def backend(gm, inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return torch._dynamo.backends.debugging.aot_eager(gm, inputs)

    def run(m, **kw):
        out, (h, c) = m(x, h0, **kw)
        loss = (out * out.detach().cos()).sum() + h.sum() + c.sin().sum()
        return out, torch.autograd.grad(loss, [x, *h0, *model.parameters()])

    compiled = torch.compile(model, fullgraph=True, backend=backend, dynamic=False)
    want, got = run(model), run(compiled)
    assert sum(s.startswith("gatelab.onednn_lstm") for s in seen) == 2 * layers, seen
    for a, b in zip((want[0], *want[1]), (got[0], *got[1])):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, h0)[0], model(x, h0)[0], rtol=0, atol=0)
    seen.clear()
    lengths = torch.tensor([5, 3])
    torch.testing.assert_close(run(compiled, lengths=lengths)[0], run(model, lengths=lengths)[0], rtol=0, atol=1e-5)
    assert any(s.startswith("gatelab.lstm") for s in seen) and not any("onednn" in s for s in seen), seen


@pytest.mark.parametrize("given_state", [True, False])
def test_the_onednn_operator_passes_opcheck(given_state):
    g = torch.Generator().manual_seed(0)
    args = [torch.randn(*s, generator=g, requires_grad=True) for s in ((4, 3, 5), (24, 5), (24, 6), (24,), (24,),
                                                                        (1, 3, 6), (1, 3, 6))]
    if not given_state:  # None: a zero initial state, made inside the operator
        args[5:] = [None, None]
    torch.library.opcheck(torch.ops.gatelab.onednn_lstm, (*args, False, True, True),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@pytest.mark.parametrize("bidirectional", [False, True])
def test_a_compiled_default_lstm_without_initial_state_has_no_fill_in_its_graph(bidirectional):
    """hx=None: the operator makes the zero state itself, so the traced graph makes no zeros before
    it, and its outputs and gradients (and its no-grad outputs) are eager's exactly."""
    torch.manual_seed(0)
    model = gatelab.LSTM(3, 6, 2, bidirectional=bidirectional)
    x = torch.randn(5, 2, 3, requires_grad=True)
    seen = []

    def backend(gm, inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op in ("call_function", "call_method"))
        return torch._dynamo.backends.debugging.aot_eager(gm, inputs)

    def run(m):
        out, (h, c) = m(x)
        return out, torch.autograd.grad(out.square().sum() + h.sum() + c.sin().sum(), [x, *model.parameters()])

    compiled = torch.compile(model, fullgraph=True, backend=backend, dynamic=False)
    want, got = run(model), run(compiled)
    assert sum(s.startswith("gatelab.onednn_lstm") for s in seen) == 2 * (1 + bidirectional), seen
    assert not any("zeros" in s for s in seen), seen
    for a, b in zip((want[0], *want[1]), (got[0], *got[1])):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    seen.clear()
    with torch.no_grad():
        (out, (h, c)), (out2, (h2, c2)) = model(x), compiled(x)
        for a, b in zip((out, h, c), (out2, h2, c2)):
            torch.testing.assert_close(b, a, rtol=0, atol=0)
    assert seen and not any("zeros" in s for s in seen), seen  # the no-grad graph, traced anew


EXPORTED = ["lstm_per_gate_2x_bi", "lstm_default", "lstm_layer_norm", "gru", "rnn", "gated_state",
            "lstm_per_gate_peephole_2x_bi"]


@pytest.mark.parametrize("name", EXPORTED)
@pytest.mark.parametrize("with_lengths", [False, True])
def test_export_with_dynamic_time_and_batch_equals_eager_at_other_shapes(name, with_lengths):
    model = _layer(name)
    x, lengths = torch.randn(5, 3, 3), torch.tensor([5, 2, 4])
    steps, batch = torch.export.Dim("T", min=2, max=512), torch.export.Dim("B", min=2, max=512)
    if with_lengths:
        program = torch.export.export(model, (x,), {"lengths": lengths},
                                      dynamic_shapes={"input": {0: steps, 1: batch}, "lengths": {0: batch}})
    else:
        program = torch.export.export(model, (x,), dynamic_shapes={"input": {0: steps, 1: batch}})
    for shape in ((9, 4, 3), (2, 7, 3)):
        x2 = torch.randn(*shape, requires_grad=True)
        lengths2 = torch.randint(1, shape[0] + 1, (shape[1],)) if with_lengths else None
        kwargs = {"lengths": lengths2} if with_lengths else {}
        got_out, got_h = program.module()(x2, **kwargs)
        want_out, want_h = model(x2, lengths=lengths2)
        torch.testing.assert_close(got_out, want_out, rtol=0, atol=1e-5)
        for a, b in zip(got_h if isinstance(got_h, tuple) else (got_h,), want_h if isinstance(want_h, tuple)
                        else (want_h,)):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
        # the exported program is differentiable: the operators' autograd formula runs in it
        dx = torch.autograd.grad(got_out.sum(), x2)[0]
        torch.testing.assert_close(dx, torch.autograd.grad(model(x2, lengths=lengths2)[0].sum(), x2)[0],
                                   rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["lstm_per_gate_2x_bi", "gru", "rnn", "gated_state", "lstm_default", "lstm_layer_norm",
                                  "lstm_projection", "gru_default"])
def test_torch_func_grad_over_functional_call_equals_autograd(name):
    model = _layer(name)
    x, lengths = torch.randn(5, 2, 3), torch.tensor([5, 3])  # padded: torch's own kernel would pack
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p):
        out = torch.func.functional_call(model, p, (x,), {"lengths": lengths})[0]
        return (out * out.detach().cos()).sum()

    got = torch.func.grad(loss)(params)
    out = model(x, lengths=lengths)[0]
    want = torch.autograd.grad((out * out.detach().cos()).sum(), list(model.parameters()))
    for (k, g), w in zip(got.items(), want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-5, msg=k)


@pytest.mark.parametrize("name", ["lstm_per_gate_2x_bi", "gru", "rnn", "gated_state"])
def test_jit_trace_passes_its_own_check_and_runs_other_inputs(name):
    model = _layer(name)
    x = torch.randn(5, 2, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)  # torch 2.13 deprecates jit.trace; it still works
        traced = torch.jit.trace(model, (x,))  # check_trace=True: re-runs and compares the graphs
    x2 = torch.randn(5, 2, 3)
    torch.testing.assert_close(traced(x2)[0], model(x2)[0], rtol=0, atol=1e-6)


# -- higher-order gradients -------------------------------------------------------------------------

DOUBLE = [  # (layer, options, backend): every engine and loop
    (gatelab.LSTM, {"bidirectional": True, "gate_activation": "hard_sigmoid", "candidate_activation": "gelu"}, "fused"),
    (gatelab.GRU, {"gate_activation": "elliott"}, "fused"),
    (gatelab.RNN, {"activation": "softsign"}, "fused"),
    (gatelab.GatedStateRNN, {}, "fused"),
    (gatelab.LSTM, {"peephole": True, "candidate_activation": "softsign"}, "fused"),
    (gatelab.LSTM, {"proj_size": 2, "candidate_activation": "softsign"}, "fused"),  # the PyTorch loop
    (gatelab.LSTM, {"gate_activation": "hard_sigmoid"}, "reference"),
    (gatelab.GRU, {}, "native"),
    (gatelab.LSTM, {}, "native"),
]


@pytest.mark.parametrize(("cls", "options", "backend"), DOUBLE, ids=lambda v: getattr(v, "__name__", None))
def test_gradgradcheck_on_every_engine(cls, options, backend):
    torch.manual_seed(0)
    model = cls(2, 3, backend=backend, dtype=torch.float64, **options)
    assert model.engine_name == backend
    x = torch.randn(3, 2, 2, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([3, 2])
    names = [k for k, _ in model.named_parameters()]

    def fn(x, *weights):
        return torch.func.functional_call(model, dict(zip(names, weights)), (x,), {"lengths": lengths})[0]

    assert torch.autograd.gradgradcheck(fn, (x, *model.parameters()), eps=1e-6, atol=1e-5)


def test_a_gradient_penalty_through_the_fused_engine_stays_connected():
    torch.manual_seed(0)
    model = gatelab.LSTM(2, 3, gate_activation="hard_sigmoid").double()
    ref = gatelab.LSTM(2, 3, gate_activation="hard_sigmoid", backend="reference").double()
    ref.load_state_dict(model.state_dict())
    x = torch.randn(4, 2, 2, dtype=torch.float64, requires_grad=True)
    got, want = [], []
    for m, into in ((model, got), (ref, want)):
        (dx,) = torch.autograd.grad(m(x)[0].sum(), x, create_graph=True)
        assert dx.requires_grad
        into.extend(torch.autograd.grad(dx.square().sum(), list(m.parameters())))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_double_backward_through_the_layer_norm_operator_raises_naming_the_way_out():
    model = gatelab.LSTM(2, 3, layer_norm=True, gate_activation="hard_sigmoid")
    x = torch.randn(4, 2, 2, requires_grad=True)
    (dx,) = torch.autograd.grad(model(x)[0].sum(), x, create_graph=False)  # a first backward is fine
    with pytest.raises(RuntimeError, match="layer-norm LSTM is not supported; build the layer with backend='reference'"):
        torch.autograd.grad(model(x)[0].sum(), x, create_graph=True)
    assert torch.isfinite(dx).all()


def test_reference_cell_rebuilds_the_activations_of_an_operator_call():
    cell = ops.reference_cell(ops.GRU, 3, 4, True, [cpp.KINDS.index("leaky_relu"), 1, 4], [0.2, 0.0, 0.0])
    assert [a.key for a in cell.activation_slots().values()] == ["leaky_relu:0.2", "sigmoid", "tanh"]
    assert cell.weight_ih.device.type == "meta"


def test_every_cpp_cell_has_its_operators():
    for cell in (gatelab.LSTMCell(2, 3), gatelab.LSTMCell(2, 3, layer_norm=True), gatelab.GRUCell(2, 3),
                 gatelab.ElmanCell(2, 3), gatelab.GatedStateCell(2, 3)):
        op = ops.for_cell(cell)
        assert op.cell is type(cell) and op.layer_norm == getattr(cell, "layer_norm", False)
        assert hasattr(torch.ops.gatelab, op.name) and hasattr(torch.ops.gatelab, op.backward_name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_a_low_precision_layer_compiles_and_exports_on_the_cpp_loop(dtype):
    """bf16/fp16 run the operators in float32 (casts around them), compiled and exported alike."""
    model = gatelab.LSTM(3, 6, 2, bidirectional=True, dtype=dtype, gate_activation="hard_sigmoid", peephole=True)
    assert "C++ loop in float32" in model.explain()
    x = torch.randn(5, 2, 3, dtype=dtype)
    want = model(x)[0]
    got = torch.compile(model, fullgraph=True, backend="aot_eager")(x)[0]
    assert got.dtype == dtype
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    program = torch.export.export(model, (x,), dynamic_shapes={"input": {0: torch.export.Dim("T", min=2, max=64)}})
    x2 = torch.randn(9, 2, 3, dtype=dtype)
    torch.testing.assert_close(program.module()(x2)[0], model(x2)[0], rtol=0, atol=0)


def test_a_layer_on_the_reference_loop_exports_with_a_fixed_length():
    """A projection LSTM runs the PyTorch loop eagerly and the reference loop traced, which unrolls the
    steps: its batch may be dynamic, its length not (torch says so)."""
    model = _layer("lstm_projection")
    x = torch.randn(5, 3, 3)
    program = torch.export.export(model, (x,), dynamic_shapes={"input": {1: torch.export.Dim("B", min=2, max=64)}})
    x2 = torch.randn(5, 6, 3)
    torch.testing.assert_close(program.module()(x2)[0], model(x2)[0], rtol=0, atol=1e-6)
    with pytest.raises(Exception, match=r"Constraints violated \(T\)"):
        torch.export.export(model, (x,), dynamic_shapes={"input": {0: torch.export.Dim("T", min=2, max=64)}})


def test_a_second_torch_func_transform_over_the_operators_raises_instead_of_a_wrong_answer():
    model = _layer("gru")
    x = torch.randn(5, 2, 3)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def inner(x):
        return torch.func.grad(lambda x: torch.func.functional_call(model, params, (x,))[0].square().sum())(x)

    with pytest.raises(RuntimeError, match=r"a derivative of torch.ops.gatelab.gru_backward was asked for"):
        torch.func.grad(lambda x: inner(x).sum())(x)


@pytest.mark.parametrize("name", ["lstm_per_gate_peephole_2x_bi", "gru", "rnn", "gated_state", "lstm_default",
                                  "lstm_layer_norm"])
def test_vmap_and_per_sample_gradients_equal_a_loop(name):
    """torch.vmap runs the operators once per mapped entry (their vmap rule); vmap over torch.func.grad
    gives every sample's own gradient."""
    model = _layer(name).double()
    xs = torch.randn(4, 5, 2, 3, dtype=torch.float64)  # 4 samples of (T, B, I)
    got = torch.vmap(lambda x: model(x)[0])(xs)
    torch.testing.assert_close(got, torch.stack([model(x)[0] for x in xs]), rtol=0, atol=1e-12)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, x):
        return torch.func.functional_call(model, p, (x,))[0].square().sum()

    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, xs)
    for k, p in model.named_parameters():
        want = torch.stack([torch.autograd.grad(model(x)[0].square().sum(), p)[0] for x in xs])
        torch.testing.assert_close(per_sample[k], want, rtol=0, atol=1e-10, msg=k)
