"""ONNX export (gatelab.onnx) in both forms, ONNX's own recurrent nodes and a Scan over time, run in
onnxruntime against PyTorch at a length and batch other than the export's, float32 to 1e-5; the Scan
form not unrolled; and the clear error for what ONNX cannot express."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import gatelab
import gatelab.onnx as gonnx

ort = pytest.importorskip("onnxruntime")  # the onnx extra (make setup installs it)
pytest.importorskip("onnxscript")
pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"), pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]

GRID = [  # (layer, options); each exported once, run with and without lengths where marked
    (gatelab.LSTM, {"gate_activation": "hard_sigmoid", "candidate_activation": "relu"}),
    (gatelab.LSTM, {}),
    (gatelab.LSTM, {"gate_activation": "hard_sigmoid:0.2", "candidate_activation": "softsign",
                    "cell_activation": "softplus"}),
    (gatelab.LSTM, {"candidate_activation": "elu:0.5", "cell_activation": "identity"}),
    (gatelab.LSTM, {"candidate_activation": "leaky_relu:0.2", "num_layers": 2}),
    (gatelab.LSTM, {"peephole": True, "bidirectional": True}),
    (gatelab.LSTM, {"peephole": True, "num_layers": 2, "bidirectional": True, "gate_activation": "hard_sigmoid"}),
    (gatelab.LSTM, {"bias": False, "gate_activation": "tanh"}),
    (gatelab.GRU, {}),
    (gatelab.GRU, {"gate_activation": "hard_sigmoid", "candidate_activation": "relu"}),
    (gatelab.GRU, {"candidate_activation": "softsign", "bidirectional": True, "num_layers": 2}),
    (gatelab.GRU, {"candidate_activation": "identity", "bias": False}),
    (gatelab.RNN, {}),
    (gatelab.RNN, {"nonlinearity": "relu", "num_layers": 2, "bidirectional": True}),
    (gatelab.RNN, {"activation": "elu"}),
    (gatelab.RNN, {"activation": "softplus"}),
]


# (layer, options, with lengths, export form); between them every C++ activation kind in some slot,
# per-gate mappings, peepholes (both output forms), layer norm, zoneout, uni/bi, 1-2 layers
SCAN_GRID = [
    (gatelab.RNN, {"activation": "elliott"}, True, "auto"),
    (gatelab.RNN, {"activation": "gelu", "num_layers": 2, "bidirectional": True}, False, "auto"),
    (gatelab.RNN, {"activation": "silu", "bias": False}, True, "auto"),
    (gatelab.RNN, {"activation": "hardtanh"}, False, "auto"),
    (gatelab.LSTM, {"gate_activation": {"i": "hard_sigmoid", "f": "sigmoid", "o": "elliott"},
                    "candidate_activation": "gelu", "cell_activation": "silu", "peephole": True,
                    "bidirectional": True}, True, "auto"),
    (gatelab.LSTM, {"gate_activation": "elliott", "num_layers": 2}, True, "auto"),
    (gatelab.LSTM, {"peephole": True, "peephole_output": "previous", "bidirectional": True}, False, "auto"),
    (gatelab.LSTM, {"gate_activation": {"f": "hard_sigmoid:0.2"}, "candidate_activation": "hardtanh",
                    "cell_activation": "softsign", "peephole": True}, False, "auto"),
    (gatelab.LSTM, {"layer_norm": True, "num_layers": 2, "bidirectional": True}, True, "auto"),
    (gatelab.LSTM, {"layer_norm": True, "gate_activation": "hard_sigmoid", "candidate_activation": "relu",
                    "bias": False}, False, "auto"),
    (gatelab.LSTM, {"zoneout": 0.3}, True, "auto"),
    (gatelab.LSTM, {"num_layers": 2, "bidirectional": True}, True, "scan"),  # torch's defaults, Scan forced
    (gatelab.GRU, {"candidate_activation": "selu", "bidirectional": True}, True, "auto"),
    (gatelab.GRU, {"gate_activation": {"r": "elliott", "z": "sigmoid"}, "candidate_activation": "softplus",
                   "num_layers": 2}, False, "auto"),
    (gatelab.GRU, {"gate_activation": "hardtanh", "candidate_activation": "identity", "zoneout": 0.2}, True, "auto"),
    (gatelab.GRU, {}, False, "scan"),
    (gatelab.GatedStateRNN, {}, True, "auto"),
    (gatelab.GatedStateRNN, {"gate_activation": {"f": "elliott"}, "candidate_activation": "hardtanh",
                             "num_layers": 2, "bidirectional": True}, True, "auto"),
    (gatelab.GatedStateRNN, {"gate_activation": "leaky_relu", "candidate_activation": "elu:0.5"}, False, "auto"),
]


def _run(path, feed):
    session = ort.InferenceSession(str(path))
    names = [i.name for i in session.get_inputs()]
    return session.run(None, dict(zip(names, feed)))


def _flat(result):
    out, hn = result
    return [out, *(hn if isinstance(hn, tuple) else (hn,))]


@pytest.mark.parametrize(("cls", "options"), GRID, ids=lambda v: v.__name__ if isinstance(v, type) else
                         ",".join(f"{k}={w}" for k, w in v.items()) or "defaults")
@pytest.mark.parametrize("with_lengths", [False, True])
def test_native_node_export_runs_in_onnxruntime_like_pytorch(cls, options, with_lengths, tmp_path):
    torch.manual_seed(0)
    model = cls(3, 5, **options).eval()
    x = torch.randn(6, 2, 3)
    if with_lengths:
        args, dynamic = (x, None, torch.tensor([6, 4])), ({0: "T", 1: "B"}, None, {0: "B"})
    else:
        args, dynamic = (x,), ({0: "T", 1: "B"},)
    program = gonnx.export(model, args, dynamic_shapes=dynamic)
    kinds = [n.op_type for n in program.model_proto.graph.node if n.op_type in ("LSTM", "GRU", "RNN", "Loop", "Scan")]
    expected = {gatelab.LSTM: "LSTM", gatelab.GRU: "GRU", gatelab.RNN: "RNN"}[cls]
    assert kinds == [expected] * (model.num_layers * model.num_directions)  # one node per layer and direction
    program.save(tmp_path / "m.onnx")
    x2, lengths = torch.randn(11, 4, 3), torch.tensor([11, 3, 7, 1])
    got = _run(tmp_path / "m.onnx", [x2.numpy(), lengths.numpy()] if with_lengths else [x2.numpy()])
    with torch.no_grad():
        want = _flat(model(x2, lengths=lengths if with_lengths else None))
    assert len(got) == len(want)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b.numpy(), rtol=0, atol=1e-5)


def _recurrent_nodes(program):
    return [n.op_type for n in program.model_proto.graph.node if n.op_type in ("LSTM", "GRU", "RNN", "Loop", "Scan")]


@pytest.mark.parametrize(("cls", "options", "with_lengths", "form"), SCAN_GRID,
                         ids=lambda v: v.__name__ if isinstance(v, type) else
                         ",".join(f"{k}={w}" for k, w in v.items()) or "defaults" if isinstance(v, dict) else str(v))
def test_scan_form_runs_in_onnxruntime_like_pytorch(cls, options, with_lengths, form, tmp_path):
    torch.manual_seed(0)
    model = cls(3, 5, **options).eval()
    assert gonnx.form(model, form).startswith(f"ONNX Scan over time ({model.num_layers * model.num_directions})")
    x = torch.randn(6, 2, 3)
    if with_lengths:
        args, dynamic = (x, None, torch.tensor([6, 4])), ({0: "T", 1: "B"}, None, {0: "B"})
    else:
        args, dynamic = (x,), ({0: "T", 1: "B"},)
    program = gonnx.export(model, args, dynamic_shapes=dynamic, form=form)
    assert _recurrent_nodes(program) == ["Scan"] * (model.num_layers * model.num_directions)
    program.save(tmp_path / "m.onnx")
    x2, lengths = torch.randn(11, 4, 3), torch.tensor([11, 3, 7, 1])
    got = _run(tmp_path / "m.onnx", [x2.numpy(), lengths.numpy()] if with_lengths else [x2.numpy()])
    with torch.no_grad():
        want = _flat(model(x2, lengths=lengths if with_lengths else None))
    assert len(got) == len(want)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b.numpy(), rtol=0, atol=1e-5)


# The layers the C++ operators do not take, which export through gatelab's export operator
# (torch.ops.gatelab.recurrence): (layer, options, with lengths, export form, the ONNX node it becomes)
RECURRENCE_GRID = [
    (gatelab.LSTM, {"proj_size": 3}, True, "auto", "Scan"),
    (gatelab.LSTM, {"proj_size": 2, "num_layers": 2, "bidirectional": True, "peephole": True,
                    "gate_activation": "hard_sigmoid"}, False, "auto", "Scan"),
    (gatelab.LSTM, {"proj_size": 2, "zoneout": 0.2}, True, "auto", "Scan"),
    (gatelab.LSTM, {"coupled": True, "peephole": True}, True, "auto", "Scan"),
    (gatelab.LSTM, {"variant": "CIFG", "num_layers": 2, "bidirectional": True, "candidate_activation": "elliott"},
     False, "auto", "Scan"),
    (gatelab.LSTM, {"variant": "NIG"}, True, "auto", "Scan"),
    (gatelab.LSTM, {"gates": "if", "num_layers": 2, "cell_activation": "softsign"}, False, "auto", "Scan"),
    (gatelab.LSTM, {"variant": "FGR", "bidirectional": True}, True, "auto", "Scan"),
    (gatelab.GRU, {"reset_after": False}, True, "auto", "GRU"),
    (gatelab.GRU, {"reset_after": False, "num_layers": 2, "bidirectional": True, "gate_activation": "hard_sigmoid"},
     False, "auto", "GRU"),
    (gatelab.GRU, {"reset_after": False, "candidate_activation": "gelu"}, True, "auto", "Scan"),
    (gatelab.GRU, {"reset_after": False}, False, "scan", "Scan"),
    (gatelab.GRU, {"candidate_activation": "prelu", "bidirectional": True}, True, "auto", "Scan"),
    (gatelab.LSTM, {"gate_activation": {"i": "adaptive_sigmoid", "f": "sigmoid", "o": "adaptive_sigmoid"},
                    "cell_activation": "adaptive_tanh", "num_layers": 2}, False, "auto", "Scan"),
    (gatelab.RNN, {"activation": "prelu"}, True, "auto", "Scan"),
    (gatelab.GatedStateRNN, {"gate_activation": "adaptive_sigmoid", "candidate_activation": "adaptive_tanh"}, True,
     "auto", "Scan"),
    # the scan engine's cells (issue 19): no ONNX node exists for any of them
    (gatelab.MinGRU, {}, True, "auto", "Scan"),
    (gatelab.MinGRU, {"gate_activation": "hard_sigmoid", "candidate_activation": "min_g", "num_layers": 2,
                      "bidirectional": True}, False, "auto", "Scan"),
    (gatelab.MinGRU, {"candidate_activation": "prelu", "scan": "parallel"}, True, "auto", "Scan"),
    (gatelab.MinLSTM, {"gate_activation": "elliott", "bidirectional": True}, True, "auto", "Scan"),
    (gatelab.MinGRU, {"norm": True, "mlp": 7, "num_layers": 2, "residual": True}, True, "auto", "Scan"),
    (gatelab.IndRNN, {}, True, "auto", "Scan"),
    (gatelab.IndRNN, {"activation": "tanh", "num_layers": 2, "residual": True}, False, "auto", "Scan"),
    (gatelab.IndRNN, {"activation": "hardtanh", "max_length": 10}, True, "auto", "Scan"),
    (gatelab.SLSTM, {}, True, "auto", "Scan"),
    (gatelab.SLSTM, {"num_heads": 5, "bidirectional": True, "candidate_activation": "softsign"}, True, "auto", "Scan"),
    (gatelab.SLSTM, {"gate_activation": "sigmoid", "num_layers": 2}, False, "auto", "Scan"),
    (gatelab.SLSTM, {"gate_activation": {"i": "softplus", "o": "hard_sigmoid"}}, True, "auto", "Scan"),
]


def _perturbed(model):
    """Every parameter moved off its initial value (a learnable activation's 0.25 or 1 too)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


@pytest.mark.parametrize(("cls", "options", "with_lengths", "form", "node"), RECURRENCE_GRID,
                         ids=lambda v: v.__name__ if isinstance(v, type) else
                         ",".join(f"{k}={w}" for k, w in v.items()) or "defaults" if isinstance(v, dict) else str(v))
def test_the_export_operator_runs_in_onnxruntime_like_pytorch(cls, options, with_lengths, form, node, tmp_path):
    """Projection, CIFG, removed gates, FGR, the reset-before GRU and learnable activations run the
    PyTorch loop eagerly; exported, each direction is one Scan (or ONNX's GRU, linear_before_reset=0)."""
    torch.manual_seed(0)
    model = _perturbed(cls(3, 5, **options)).eval()
    count = model.num_layers * model.num_directions
    assert gonnx.form(model, form).startswith(f"ONNX {node}")
    x = torch.randn(6, 2, 3)
    if with_lengths:
        args, dynamic = (x, None, torch.tensor([6, 4])), ({0: "T", 1: "B"}, None, {0: "B"})
    else:
        args, dynamic = (x,), ({0: "T", 1: "B"},)
    program = gonnx.export(model, args, dynamic_shapes=dynamic, form=form)
    assert _recurrent_nodes(program) == [node] * count
    program.save(tmp_path / "m.onnx")
    x2, lengths = torch.randn(11, 4, 3), torch.tensor([11, 3, 7, 1])
    got = _run(tmp_path / "m.onnx", [x2.numpy(), lengths.numpy()] if with_lengths else [x2.numpy()])
    with torch.no_grad():
        want = _flat(model(x2, lengths=lengths if with_lengths else None))
    assert len(got) == len(want)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b.numpy(), rtol=0, atol=1e-5)


def test_learned_activation_parameters_are_initializers():
    torch.manual_seed(0)
    model = _perturbed(gatelab.GRU(3, 5, candidate_activation="prelu", gate_activation="adaptive_sigmoid")).eval()
    program = gonnx.export(model, (torch.randn(4, 2, 3),), dynamic_shapes=({0: "T", 1: "B"},))
    inits = {i.name: i for i in program.model_proto.graph.initializer}
    import onnx.numpy_helper

    for name in ("phi_weight_l0", "sigma_r_weight_l0", "sigma_z_weight_l0"):
        key = next(k for k in inits if k.endswith(name))
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(inits[key]), getattr(model, name).detach().numpy())


def _one_scan_at_any_length(make):
    """Exports ``make()`` at T 4 and 24: asserts the node lists are equal and hold one Scan; returns the
    T-24 graph and the Scan's body."""
    def graph(T):
        torch.manual_seed(0)
        program = gonnx.export(make().eval(), (torch.randn(T, 2, 3), None, torch.tensor([T, 2])),
                               dynamic_shapes=({0: "T", 1: "B"}, None, {0: "B"}))
        return program.model_proto.graph

    short, long = graph(4), graph(24)
    assert [n.op_type for n in short.node] == [n.op_type for n in long.node]
    scans = [n for n in long.node if n.op_type == "Scan"]
    assert len(scans) == 1
    return long, next(a.g for a in scans[0].attribute if a.name == "body")


def test_the_export_operator_is_not_unrolled_and_only_used_when_exporting():
    """A projection LSTM's graph is the same whatever the example's length (one Scan, one step in its body:
    the recurrent and the projection MatMul); outside gatelab.onnx.export the layer runs as before."""
    from gatelab.engines import export_op

    _, body = _one_scan_at_any_length(lambda: gatelab.LSTM(3, 5, proj_size=2))
    assert [n.op_type for n in body.node].count("MatMul") == 2
    model = gatelab.LSTM(3, 5, proj_size=2).eval()
    assert not export_op.active() and export_op.engine_for(model) is None
    assert "pure-PyTorch loop" in model.explain()


def test_a_multi_head_slstm_runs_in_onnxruntime_like_pytorch(tmp_path):
    """Heads of 3 units (d > 1): the dense R built from the block-diagonal weight_hh must put each
    head's (out, in) block in place, which a head of one unit cannot show."""
    torch.manual_seed(0)
    model = _perturbed(gatelab.SLSTM(3, 6, num_heads=2)).eval()
    program = gonnx.export(model, (torch.randn(5, 2, 3),), dynamic_shapes=({0: "T", 1: "B"},))
    program.save(tmp_path / "m.onnx")
    x2 = torch.randn(9, 3, 3)
    got = _run(tmp_path / "m.onnx", [x2.numpy()])
    with torch.no_grad():
        want = _flat(model(x2))
    assert len(got) == len(want) == 5
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b.numpy(), rtol=0, atol=1e-5)


def test_a_scan_cell_exports_one_scan_whatever_the_length():
    """MinGRU's body holds no MatMul (its gates read x_t only); sLSTM's one, its block-diagonal R made
    dense; neither graph grows with T."""
    _, body = _one_scan_at_any_length(lambda: gatelab.MinGRU(3, 5))
    assert "MatMul" not in [n.op_type for n in body.node]
    _, body = _one_scan_at_any_length(lambda: gatelab.SLSTM(3, 4, num_heads=2))
    assert [n.op_type for n in body.node].count("MatMul") == 1


def test_the_export_operator_computes_the_layer_in_an_exported_program():
    """Under routing() torch.export records one torch.ops.gatelab.recurrence call per direction, with T
    dynamic; the program run eagerly (the operator's kernel, the reference loop) equals the layer."""
    from gatelab.engines import export_op

    torch.manual_seed(0)
    model = _perturbed(gatelab.LSTM(3, 5, proj_size=2, bidirectional=True, coupled=True)).eval()
    steps = torch.export.Dim("T", min=2, max=64)
    with torch.no_grad(), export_op.routing():
        program = torch.export.export(model, (torch.randn(5, 2, 3),), dynamic_shapes={"input": {0: steps}})
    calls = [n for n in program.graph.nodes if n.op == "call_function" and "recurrence" in str(n.target)]
    assert len(calls) == 2
    x2 = torch.randn(9, 2, 3)
    with torch.no_grad():
        for a, b in zip(_flat(program.module()(x2)), _flat(model(x2))):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_a_sequence_model_with_a_cifg_and_a_projection_lstm_exports_with_its_head(tmp_path):
    torch.manual_seed(0)
    for options in ({"coupled": True, "peephole": True}, {"proj_size": 3}):
        model = gatelab.SequenceModel(3, 4, cell="lstm", hidden_sizes=(6, 5), head="mean", layer_options=options).eval()
        x, lengths = torch.randn(2, 7, 3), torch.tensor([7, 4])
        program = gonnx.export(model, (x, lengths), dynamic_shapes=({0: "B", 1: "T"}, {0: "B"}))
        assert _recurrent_nodes(program) == ["Scan"] * 2
        program.save(tmp_path / "s.onnx")
        x2, l2 = torch.randn(5, 12, 3), torch.tensor([12, 3, 9, 1, 12])
        got = _run(tmp_path / "s.onnx", [x2.numpy(), l2.numpy()])
        with torch.no_grad():
            want = model(x2, l2)[0]
        np.testing.assert_allclose(got[0], want.numpy(), rtol=0, atol=1e-5)


def test_every_kernel_activation_has_a_scan_expression():
    from gatelab.engines import export_op
    from gatelab.engines.fused import cpp

    # the C++ kernels' kinds, and exp / min_g of the scan cells (the learnable ones are built from their weight)
    assert set(gonnx._EXPRESSIONS) == set(export_op.KINDS) - set(export_op.LEARNABLE) == {*cpp.KINDS, "exp", "min_g"}
    kinds_in_grid = set()
    for cls, options, _, _ in SCAN_GRID:
        cell = cls(3, 5, **options).cells[0]
        kinds_in_grid |= {cpp.KINDS[cpp._kind(a)[0]] for a in cell.activation_slots().values()}
    assert kinds_in_grid == set(cpp.KINDS)


def test_the_scan_form_is_not_unrolled():
    """The graph is the same whatever the example's length: one Scan per direction, one step in its body
    (one recurrent MatMul), no per-step nodes outside it."""
    long, body = _one_scan_at_any_length(lambda: gatelab.LSTM(3, 5, gate_activation="elliott"))
    assert [n.op_type for n in body.node].count("MatMul") == 1
    assert sum(n.op_type == "MatMul" for n in long.node) == 1  # the input projection of all steps


def test_alpha_and_beta_are_written_out(tmp_path):
    model = gatelab.LSTM(3, 4, gate_activation="hard_sigmoid", candidate_activation="relu").eval()
    program = gonnx.export(model, (torch.randn(5, 2, 3),), dynamic_shapes=({0: "T", 1: "B"},))
    node = next(n for n in program.model_proto.graph.node if n.op_type == "LSTM")
    attrs = {a.name: a for a in node.attribute}
    assert [s.decode() for s in attrs["activations"].strings] == ["HardSigmoid", "Relu", "Tanh"]
    # consumed in order by the activations that take them: HardSigmoid's, torch's slope (not ONNX's 0.2)
    assert list(attrs["activation_alpha"].floats) == pytest.approx([1 / 6])
    assert list(attrs["activation_beta"].floats) == pytest.approx([0.5])


def test_a_sequence_model_exports_with_its_head(tmp_path):
    torch.manual_seed(0)
    model = gatelab.SequenceModel(3, 4, cell="gru", hidden_sizes=(6, 5), head="mean",
                                  gate_activation="hard_sigmoid").eval()
    x, lengths = torch.randn(2, 7, 3), torch.tensor([7, 4])
    program = gonnx.export(model, (x, lengths), dynamic_shapes=({0: "B", 1: "T"}, {0: "B"}))
    program.save(tmp_path / "s.onnx")
    x2, l2 = torch.randn(5, 12, 3), torch.tensor([12, 3, 9, 1, 12])
    got = _run(tmp_path / "s.onnx", [x2.numpy(), l2.numpy()])
    with torch.no_grad():
        want = model(x2, l2)[0]
    np.testing.assert_allclose(got[0], want.numpy(), rtol=0, atol=1e-5)


def test_a_sequence_model_exports_with_its_head_in_the_scan_form(tmp_path):
    torch.manual_seed(0)
    model = gatelab.SequenceModel(3, 4, cell="lstm", hidden_sizes=(6, 5), head="last", bidirectional=True,
                                  gate_activation="elliott", candidate_activation="gelu",
                                  layer_options={"peephole": True}).eval()
    x, lengths = torch.randn(2, 7, 3), torch.tensor([7, 4])
    program = gonnx.export(model, (x, lengths), dynamic_shapes=({0: "B", 1: "T"}, {0: "B"}))
    assert _recurrent_nodes(program) == ["Scan"] * 4
    program.save(tmp_path / "s.onnx")
    x2, l2 = torch.randn(5, 12, 3), torch.tensor([12, 3, 9, 1, 12])
    got = _run(tmp_path / "s.onnx", [x2.numpy(), l2.numpy()])
    with torch.no_grad():
        want = model(x2, l2)[0]
    np.testing.assert_allclose(got[0], want.numpy(), rtol=0, atol=1e-5)


@pytest.mark.parametrize(("layer", "form", "reason"), [
    (lambda: gatelab.LSTM(3, 4, gate_activation={"i": "hard_sigmoid"}), "native",
     "one activation for the i, f and o gates"),
    (lambda: gatelab.GRU(3, 4, candidate_activation="elliott"), "native", "activation elliott has no counterpart"),
    (lambda: gatelab.LSTM(3, 4, peephole=True, peephole_output="previous"), "native", "peephole_output='previous'"),
    (lambda: gatelab.GatedStateRNN(3, 4), "native", "the gated-state cell has no ONNX recurrent node"),
    (lambda: gatelab.LSTM(3, 4, zoneout=0.2), "native", "zoneout"),
    (lambda: gatelab.LSTM(3, 4, proj_size=2), "native", "no projection"),
    (lambda: gatelab.LSTM(3, 4, coupled=True), "native", r"input_forget couples the other way"),
    (lambda: gatelab.GRU(3, 4, candidate_activation="prelu"), "native", "prelu is learnable"),
    (lambda: gatelab.GRU(3, 4, candidate_activation=lambda x: x.clamp(-2, 2)), "auto",
     r"user activation with no ONNX expression"),
    (lambda: gatelab.LSTM(3, 4, candidate_activation=torch.nn.Softshrink()), "scan",
     r"user activation with no ONNX expression"),
    (lambda: gatelab.LSTM(3, 4, layer_norm=True, peephole=True), "auto", r"the C\+\+ layer-norm loop has no peepholes"),
    (lambda: gatelab.LSTM(3, 4, proj_size=2, backend="reference"), "auto", "backend='reference' was asked for"),
    (lambda: gatelab.MinGRU(3, 4), "native", "ONNX has no recurrent node for minGRU"),
    (lambda: gatelab.SLSTM(3, 4, candidate_activation=lambda x: x.clamp(-2, 2)), "auto",
     r"user activation with no ONNX expression"),
])
def test_what_onnx_cannot_express_is_named(layer, form, reason):
    with warnings.catch_warnings(), pytest.raises(gonnx.NotExpressibleError, match=reason):
        warnings.simplefilter("ignore")
        gonnx.export(layer(), (torch.randn(5, 2, 3),), dynamic_shapes=({0: "T", 1: "B"},), form=form)


def test_an_exported_run_reloads_and_scores_its_metric(tmp_path, capsys):
    """gatelab export: the safetensors weights rebuild the model, and the ONNX file run in onnxruntime,
    score the test split exactly as the trained run's summary says."""
    import json

    from gatelab import cli
    from gatelab.export import load_safetensors

    config = tmp_path / "tiny.toml"
    config.write_text('name = "tiny"\n[task]\nname = "ucr:ItalyPowerDemand"\n[model]\ncell = "gru"\nhidden_sizes = [6]\n'
                      'gate_activation = "hard_sigmoid"\n[train]\nsteps = 30\nbatch_size = 16\n')
    assert cli.main(["train", str(config), "--runs", str(tmp_path / "runs"), "--quiet"]) == 0
    run = tmp_path / "runs" / "tiny"
    summary = json.loads((run / "summary.json").read_text())
    out = tmp_path / "out"
    assert cli.main(["export", str(run), "--onnx", str(out / "m.onnx"), "--safetensors", str(out / "m.safetensors")]) == 0
    printed = capsys.readouterr().out
    assert "from " + str(run / "best.pt") in printed or "from " + str(run / "last.pt") in printed
    assert (out / "m.toml").read_text() == (run / "config.toml").read_text()
    task = gatelab.tasks.get("ucr:ItalyPowerDemand")
    model = load_safetensors(out / "m.safetensors")
    assert gatelab.train.evaluate(model, task, "test") == pytest.approx(summary["final"]["test"], abs=1e-6)
    test = task.split("test")
    x = torch.stack(list(test.xs))  # equal lengths: (N, T, 1)
    logits = _run(out / "m.onnx", [x.numpy(), np.full(len(test), x.shape[1], dtype=np.int64)])[0]
    assert task.evaluate(torch.from_numpy(logits), "test")["accuracy"] == summary["final"]["test"]["accuracy"]
    assert cli.main(["export", str(run)]) == 2  # nothing to write: a usage error, one line on stderr
    assert "give --onnx OUT.onnx and/or --safetensors" in capsys.readouterr().err


def test_form_says_which_onnx_form_a_layer_exports_to():
    assert gonnx.form(gatelab.LSTM(3, 4, 2, bidirectional=True, gate_activation="hard_sigmoid",
                                   candidate_activation="relu")) == "ONNX LSTM nodes (4), activations HardSigmoid, Relu, Tanh"
    assert gonnx.form(gatelab.GRU(3, 4)) == "ONNX GRU node (1), activations Sigmoid, Tanh"
    assert gonnx.form(gatelab.LSTM(3, 4, gate_activation={"i": "elliott"})) == (
        "ONNX Scan over time (1): ONNX's node takes one activation for the i, f and o gates; this layer has elliott, "
        "sigmoid")
    assert gonnx.form(gatelab.GatedStateRNN(3, 4, num_layers=2)) == (
        "ONNX Scan over time (2): the gated-state cell has no ONNX recurrent node")
    assert gonnx.form(gatelab.GRU(3, 4), "scan") == "ONNX Scan over time (1): form=scan asked for"
    assert gonnx.form(gatelab.GRU(3, 4, candidate_activation="gelu"), "native").startswith(
        "not expressible as an ONNX node: activation gelu has no counterpart")
    assert gonnx.form(gatelab.LSTM(3, 4, proj_size=2)) == (
        "ONNX Scan over time (1): ONNX's LSTM node has no projection (proj_size)")
    assert gonnx.form(gatelab.GRU(3, 4, 2, reset_after=False)) == (
        "ONNX GRU nodes (2), activations Sigmoid, Tanh, linear_before_reset=0")
    assert gonnx.form(gatelab.GRU(3, 4, reset_after=False), "scan") == "ONNX Scan over time (1): form=scan asked for"
    assert gonnx.form(gatelab.LSTM(3, 4, variant="FGR", bidirectional=True)) == (
        "ONNX Scan over time (2): ONNX's LSTM node has no full gate recurrence (FGR)")
    assert gonnx.form(gatelab.RNN(3, 4, activation="prelu")).startswith(
        "ONNX Scan over time (1): activation prelu is learnable")
    assert gonnx.form(gatelab.RNN(3, 4, activation=lambda x: x.clamp(-2, 2))).startswith(
        "not expressible in ONNX: phi (<lambda>) is a user activation with no ONNX expression")
    with pytest.raises(ValueError, match="form must be one of 'auto', 'native', 'scan'"):
        gonnx.form(gatelab.GRU(3, 4), "loop")


PLAIN_EXPORT = [  # one layer per route: ONNX's own node, a Scan on the C++ operator, the export operator's Scan
    (gatelab.LSTM, {"gate_activation": "hard_sigmoid", "candidate_activation": "relu"}, "LSTM"),
    (gatelab.GRU, {"gate_activation": "elliott", "bidirectional": True}, "Scan"),
    (gatelab.LSTM, {"proj_size": 3, "num_layers": 2}, "Scan"),
]


@pytest.mark.parametrize(("cls", "options", "node"), PLAIN_EXPORT)
def test_plain_torch_onnx_export_works_once_registered(cls, options, node, tmp_path):
    """After gatelab.onnx.register_with_torch_onnx(), torch's own exporter translates gatelab's operators
    without a custom table: ONNX's node or a Scan, T and B dynamic, onnxruntime equal to PyTorch."""
    import onnx

    assert gonnx.register_with_torch_onnx()
    torch.manual_seed(0)
    layer = cls(4, 6, **options).eval()
    path = tmp_path / "plain.onnx"
    torch.onnx.export(layer, (torch.randn(5, 2, 4),), str(path), dynamo=True, dynamic_shapes=({0: "T", 1: "B"},))
    graph = onnx.load(str(path)).graph
    assert node in {n.op_type for n in graph.node}
    x = torch.randn(11, 3, 4)
    with torch.no_grad():
        want = _flat(layer(x))
    got = _run(path, [x.numpy()])
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b.numpy(), rtol=0, atol=1e-5)


def test_a_first_plain_export_without_registration_says_what_to_do(tmp_path):
    """torch builds its translation table before tracing: in a fresh process the first plain export
    cannot translate gatelab's operators; the layer registers them while traced and warns how to avoid
    that, and the second export works."""
    import subprocess
    import sys

    script = f"""
import warnings, torch, gatelab
layer = gatelab.LSTM(4, 6, gate_activation="hard_sigmoid").eval()
x = torch.randn(5, 2, 4)
with warnings.catch_warnings(record=True) as seen:
    warnings.simplefilter("always")
    try:
        torch.onnx.export(layer, (x,), r"{tmp_path / 'a.onnx'}", dynamo=True)
        print("FIRST OK")
    except Exception as err:
        print("FIRST FAILED", type(err).__name__)
print("WARNED", any("register_with_torch_onnx" in str(w.message) for w in seen))
torch.onnx.export(layer, (x,), r"{tmp_path / 'b.onnx'}", dynamo=True)
print("SECOND OK")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert "FIRST FAILED" in done.stdout and "WARNED True" in done.stdout, done.stdout + done.stderr[-2000:]
    assert "SECOND OK" in done.stdout, done.stdout + done.stderr[-2000:]


def test_plain_exports_of_pytorch_loop_layers_work_as_before_without_registration(tmp_path):
    """Without registration, a first dynamo export of a layer on the PyTorch loop still traces it
    (unrolled, as before gatelab's translations existed), and the TorchScript exporter (dynamo=False),
    which cannot use them, is never routed to the export operator."""
    import subprocess
    import sys

    script = f"""
import warnings, torch, gatelab
warnings.simplefilter("ignore")
layer = gatelab.LSTM(4, 6, coupled=True).eval()
x = torch.randn(5, 2, 4)
torch.onnx.export(layer, (x,), r"{tmp_path / 'dynamo.onnx'}", dynamo=True)
print("DYNAMO OK")
torch.onnx.export(layer, (x,), r"{tmp_path / 'script.onnx'}", dynamo=False)
print("TORCHSCRIPT OK")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert "DYNAMO OK" in done.stdout and "TORCHSCRIPT OK" in done.stdout, done.stdout + done.stderr[-2000:]
