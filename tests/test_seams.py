"""The seams of issue 11: layers own torch's parameters (names, order, all_weights, parametrize), one
engine registry with a public step hook, cells that declare their facts, one cell registry (a toy cell
added in this file alone runs everywhere), old checkpoints still load."""

from __future__ import annotations

import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from torch.nn.utils import parametrizations, parametrize
from torch.nn.utils.rnn import pack_padded_sequence

import gatelab
from gatelab import engines
from gatelab.cells import RecurrentCell, Slot, registry
from gatelab.cells.base import unbatch
from gatelab.engines.fused import cpp
from gatelab.layers import RecurrentLayer

F64 = torch.float64
DATA = Path(__file__).parent / "data"


# -- torch's parameter names, order and all_weights ---------------------------------------------------

TORCH_CONFIGS = [
    ("RNN", {"nonlinearity": "tanh"}), ("RNN", {"nonlinearity": "relu"}), ("LSTM", {}), ("LSTM", {"proj_size": 2}),
    ("GRU", {}),
]


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("num_layers", [1, 2, 3])
@pytest.mark.parametrize("kind,kw", TORCH_CONFIGS, ids=lambda v: str(v))
def test_named_parameters_state_dict_and_all_weights_are_torchs(kind, kw, num_layers, bidirectional):
    ours = getattr(gatelab, kind)(3, 4, num_layers, bidirectional=bidirectional, dtype=F64, **kw)
    theirs = getattr(nn, kind)(3, 4, num_layers, bidirectional=bidirectional, dtype=F64, **kw)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    assert [p.shape for p in ours.parameters()] == [p.shape for p in theirs.parameters()]
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    assert ours._flat_weights_names == theirs._flat_weights_names
    assert len(ours.all_weights) == len(theirs.all_weights)
    for mine, torchs in zip(ours.all_weights, theirs.all_weights):
        assert len(mine) == len(torchs) and all(torch.equal(a, b) for a, b in zip(mine, torchs))
    # the layer's parameter is what its cell computes with: one tensor, no copy
    assert ours.weight_hh_l0 is ours.cells[0].weight_hh


def test_extra_parameters_get_torch_style_names_and_cells_keep_theirs():
    lstm = gatelab.LSTM(3, 4, 2, bidirectional=True, peephole=True, gate_activation={"f": "prelu"}, residual=True)
    names = [n for n, _ in lstm.named_parameters()]
    assert names[0] == "weight_res_l0"
    assert names[1:9] == ["weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0", "weight_ci_l0", "weight_cf_l0",
                          "weight_co_l0", "sigma_f_weight_l0"]
    assert "sigma_f_weight_l1_reverse" in names and all("." not in n for n in names)
    norm = gatelab.LSTM(3, 4, layer_norm=True)
    assert {"ln_ih_weight_l0", "ln_hh_weight_l0", "ln_c_weight_l0", "ln_c_bias_l0"} <= dict(norm.named_parameters()).keys()
    cell = gatelab.LSTMCell(3, 4, peephole=True)
    assert [n for n, _ in cell.named_parameters()][:5] == ["weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_ci"]


def test_init_loops_and_optimiser_groups_keyed_on_torch_names_reach_the_weights():
    lstm = gatelab.LSTM(3, 4, 2, gate_activation="hard_sigmoid", dtype=F64)
    for name, p in lstm.named_parameters():
        if name.startswith("weight_hh"):
            nn.init.zeros_(p)
    groups = [{"params": [p for n, p in lstm.named_parameters() if n.startswith("bias")], "lr": 0.0},
              {"params": [p for n, p in lstm.named_parameters() if not n.startswith("bias")]}]
    opt = torch.optim.SGD(groups, lr=0.1)
    x = torch.randn(5, 2, 3, dtype=F64)
    ref = gatelab.LSTM(3, 4, 2, gate_activation="hard_sigmoid", dtype=F64, backend="reference")
    ref.load_state_dict(lstm.state_dict())
    torch.testing.assert_close(lstm(x)[0], ref(x)[0], rtol=0, atol=1e-12)  # the zeroed W_hh is what runs
    bias = lstm.bias_ih_l1.detach().clone()
    lstm(x)[0].sum().backward()
    opt.step()
    assert torch.equal(lstm.bias_ih_l1, bias) and lstm.weight_hh_l1.abs().sum() > 0


# -- torch.nn.utils.parametrize on torch's names, every engine ----------------------------------------

PARAMETRISATIONS = {
    "orthogonal": lambda m: parametrizations.orthogonal(m, "weight_hh_l0"),
    "spectral_norm": lambda m: parametrizations.spectral_norm(m, "weight_hh_l0"),
    "weight_norm": lambda m: parametrizations.weight_norm(m, "weight_hh_l0"),
}


class _Scale(nn.Module):
    def forward(self, w: Tensor) -> Tensor:
        return 0.5 * w.tanh()


def _run(module, x):
    out, (h, c) = module(x)
    g = torch.Generator().manual_seed(5)
    loss = (out * torch.randn(out.shape, generator=g, dtype=F64)).sum() + (h * c).sum()
    names, params = zip(*module.named_parameters())
    return out, h, c, dict(zip(("x", *names), torch.autograd.grad(loss, [x, *params])))


@pytest.mark.parametrize("engine", ["native", "reference", "fused"])
@pytest.mark.parametrize("how", [*PARAMETRISATIONS, "user"])
def test_parametrised_weight_hh_equals_torch_on_every_engine(how, engine):
    torch.manual_seed(0)
    theirs = nn.LSTM(3, 4, 2, dtype=F64)
    ours = gatelab.LSTM(3, 4, 2, dtype=F64, backend=engine, strict=True)
    ours.load_state_dict(theirs.state_dict())
    before = ours.explain()
    for module in (theirs, ours):
        torch.manual_seed(1)  # spectral_norm draws its power-iteration start
        if how == "user":
            parametrize.register_parametrization(module, "weight_hh_l0", _Scale())
        else:
            PARAMETRISATIONS[how](module)
    theirs.eval(), ours.eval()  # spectral_norm: no power iteration during the forward
    assert ours.engine_name == engine and ours.explain() == before.replace("training", "eval")
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    x = torch.randn(6, 2, 3, dtype=F64)
    mine, torchs = _run(ours, x.clone().requires_grad_()), _run(theirs, x.clone().requires_grad_())
    for a, b in zip(mine[:3], torchs[:3]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-9)
    assert mine[3].keys() == torchs[3].keys()
    for name in mine[3]:
        torch.testing.assert_close(mine[3][name], torchs[3][name], rtol=0, atol=1e-9, msg=name)
    # the parametrised weight is what ran: the same layer with the weight's value plain agrees
    plain = gatelab.LSTM(3, 4, 2, dtype=F64, backend="reference")
    plain.load_state_dict({**{k: v for k, v in theirs.state_dict().items() if "parametrizations" not in k},
                           "weight_hh_l0": theirs.weight_hh_l0.detach()}, strict=True)
    torch.testing.assert_close(plain(x)[0], mine[0], rtol=0, atol=1e-9)


def test_parametrised_custom_layer_stays_on_the_fused_engine_and_trains():
    lstm = gatelab.LSTM(3, 4, gate_activation="hard_sigmoid", dtype=F64)
    parametrizations.orthogonal(lstm, "weight_hh_l0")
    assert lstm.engine_name == "fused" and "fused engine, C++ loop" in lstm.explain()
    W = lstm.weight_hh_l0
    torch.testing.assert_close(W.T @ W, torch.eye(4, dtype=F64), rtol=0, atol=1e-10)
    assert lstm.cells[0].weight_ih is lstm.weight_ih_l0  # unparametrised weights: the same tensor at rest
    opt = torch.optim.Adam(lstm.parameters(), lr=0.05)
    for _ in range(3):
        opt.zero_grad()
        lstm(torch.randn(5, 2, 3, dtype=F64))[0].pow(2).sum().backward()
        opt.step()
    W = lstm.weight_hh_l0
    torch.testing.assert_close(W.T @ W, torch.eye(4, dtype=F64), rtol=0, atol=1e-8)


@pytest.mark.parametrize("engine", ["reference", "fused"])
def test_parametrised_extra_parameters_run_on_every_engine(engine):
    """Peepholes and a learnable gate's slope under a parametrisation: the parametrised values are what
    runs (the same layer with those values as plain weights agrees), gradients reach the originals."""
    torch.manual_seed(0)
    layer = gatelab.LSTM(3, 4, bidirectional=True, peephole=True, gate_activation={"f": "prelu"}, dtype=F64,
                         backend=engine, strict=True)
    plain = gatelab.LSTM(3, 4, bidirectional=True, peephole=True, gate_activation={"f": "prelu"}, dtype=F64,
                         backend="reference")
    for name in ("weight_ci_l0", "sigma_f_weight_l0_reverse"):
        parametrize.register_parametrization(layer, name, _Scale())
    assert layer.engine_name == engine
    plain.load_state_dict({n: getattr(layer, n).detach() for n, _ in plain.named_parameters()})
    x = torch.randn(5, 2, 3, dtype=F64)
    out = layer(x)[0]
    torch.testing.assert_close(out, plain(x)[0], rtol=0, atol=1e-12)
    # gradients: the parametrised value's gradient is the plain layer's, chained through tanh(·)/2 once
    g = torch.Generator().manual_seed(2)
    weights = torch.randn(out.shape, generator=g, dtype=F64)
    (out * weights).sum().backward()
    (plain(x)[0] * weights).sum().backward()
    for name in ("weight_ci_l0", "sigma_f_weight_l0_reverse"):
        original = layer.parametrizations[name].original
        chain = 0.5 * (1 - original.detach().tanh() ** 2)
        torch.testing.assert_close(original.grad, getattr(plain, name).grad * chain, rtol=0, atol=1e-10)
    torch.testing.assert_close(layer.weight_hh_l0.grad, plain.weight_hh_l0.grad, rtol=0, atol=1e-10)


FUNCTIONAL_CASES = [
    (gatelab.LSTM, {"proj_size": 2, "gate_activation": "hard_sigmoid"}), (gatelab.LSTM, {"layer_norm": True}),
    (gatelab.LSTM, {"gate_activation": {"f": "adaptive_sigmoid"}, "peephole": True}),
    (gatelab.GRU, {"reset_after": False, "candidate_activation": "prelu"}),
]


@pytest.mark.parametrize("case", range(len(FUNCTIONAL_CASES)))
def test_functional_call_gradients_reach_the_passed_tensors_on_the_fused_engine(case):
    """torch.func.functional_call swaps in other tensors: the fused backward must use them too (it reads
    projections, gains and activation slopes from the cell after the forward returned)."""
    cls, kw = FUNCTIONAL_CASES[case]
    torch.manual_seed(0)
    fus = cls(3, 4, bidirectional=True, dtype=F64, backend="fused", strict=True, **kw)
    ref = cls(3, 4, bidirectional=True, dtype=F64, backend="reference", **kw)
    params = {n: (p.detach() * 1.3 + 0.05).requires_grad_() for n, p in fus.named_parameters()}
    x = torch.randn(5, 2, 3, dtype=F64)
    grads = []
    for layer in (fus, ref):
        out = torch.func.functional_call(layer, params, (x,))[0]
        grads.append(torch.autograd.grad(out.pow(2).sum(), list(params.values())))
    for name, a, b in zip(params, *grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10, msg=name)


def test_reading_cells_or_explain_during_a_call_keeps_parametrised_gradients():
    torch.manual_seed(0)
    layers = []
    for read in (False, True):
        torch.manual_seed(0)
        m = gatelab.LSTM(3, 4, num_layers=2, dtype=F64)
        parametrize.register_parametrization(m, "weight_hh_l1", _Scale())
        if read:
            m.register_step_hook(lambda call, m=m: (m.explain(), m.cells, None)[2])
        m(torch.randn(5, 2, 3, dtype=F64, generator=torch.Generator().manual_seed(1)))[0].sum().backward()
        layers.append(m.parametrizations.weight_hh_l1.original.grad)
    torch.testing.assert_close(layers[0], layers[1], rtol=0, atol=1e-12)


@pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated:FutureWarning")
def test_hook_style_weight_norm_works_like_torchs():
    torch.manual_seed(0)
    theirs = nn.LSTM(3, 4, dtype=F64)
    ours = gatelab.LSTM(3, 4, dtype=F64, backend="fused")
    ours.load_state_dict(theirs.state_dict())
    for m in (theirs, ours):
        torch.nn.utils.weight_norm(m, "weight_hh_l0")
    ours.eval(), theirs.eval()  # hook-style weight_norm deletes the parameter; train/eval/explain still work
    assert "fused" in ours.explain() and "weight_hh_l0_g" in dict(ours.named_parameters())
    x = torch.randn(5, 2, 3, dtype=F64)
    torch.testing.assert_close(ours(x)[0], theirs(x)[0], rtol=0, atol=1e-10)


def test_spectral_norm_state_moves_only_when_the_layer_runs():
    layer = gatelab.LSTM(3, 4, gate_activation="hard_sigmoid")
    parametrizations.spectral_norm(layer, "weight_hh_l0")
    u = layer.parametrizations.weight_hh_l0[0]._u.clone()
    layer.train(), layer.eval(), layer.explain(), layer.cells
    assert torch.equal(layer.parametrizations.weight_hh_l0[0]._u, u)


def test_one_activation_module_shared_by_every_gate_is_one_parameter():
    class Slope(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Parameter(torch.tensor(0.7))

        def forward(self, x):
            return torch.sigmoid(self.a * x)

    shared = Slope()
    layer = gatelab.LSTM(3, 4, bidirectional=True, gate_activation=shared, dtype=F64)
    names = [n for n in layer.state_dict() if "module" in n]
    assert names == ["sigma_i_module_a_l0"] and layer.sigma_i_module_a_l0 is shared.a
    parametrize.register_parametrization(layer, "sigma_i_module_a_l0", _Scale())
    seen = []
    layer.register_step_hook(lambda call: seen.append(call.cell.sigma_f.module.a.item()))
    layer(torch.randn(4, 2, 3, dtype=F64))
    assert seen == [pytest.approx(0.5 * math.tanh(0.7))] * 2  # both directions, every gate: the parametrised value


def test_data_parallel_replicas_bind_into_cells_of_their_own():
    """What nn.parallel.replicate does per device, on the CPU: replicas run concurrently and each computes
    with its own weights."""
    import threading

    layer = gatelab.LSTM(8, 16, gate_activation="hard_sigmoid")
    replica = layer._replicate_for_data_parallel()
    assert replica._cells is not layer._cells and replica._cells[0] is not layer._cells[0]
    for name, p in layer.named_parameters():
        setattr(replica, name, p.detach() * -1)  # replicate() sets broadcast copies as plain attributes
    x = torch.randn(60, 4, 8)
    with torch.no_grad():
        expected = {id(layer): layer(x)[0], id(replica): replica(x)[0]}
    assert not torch.allclose(expected[id(layer)], expected[id(replica)])
    wrong = []

    def run(m):
        for _ in range(6):
            with torch.no_grad():
                wrong.append(not torch.equal(m(x)[0], expected[id(m)]))

    threads = [threading.Thread(target=run, args=(m,)) for m in (layer, replica)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == [False] * 12
    assert all(isinstance(p, nn.Parameter) for p in layer._cells[0]._parameters.values() if p is not None)


def test_a_subclass_of_a_builtin_cell_runs_its_own_maths():
    class HalfLSTMCell(gatelab.LSTMCell):
        def step(self, x, state, rec_mask=None, weight_hh=None):
            h, (h2, c2) = super().step(x, state, rec_mask, weight_hh)
            return 0.5 * h, (0.5 * h2, c2)

    class HalfLSTM(gatelab.LSTM):
        cell_class = HalfLSTMCell

    class LoudGatedCell(gatelab.GatedStateCell):
        def step(self, x, state, rec_mask=None, weight_hh=None):
            y, s = super().step(x, state, rec_mask, weight_hh)
            return 2 * y, s

    class LoudGated(gatelab.GatedStateRNN):
        cell_class = LoudGatedCell

    for cls in (HalfLSTM, LoudGated):
        layer = cls(3, 4, dtype=F64)
        assert layer.engine_name == "reference", layer.explain()
        ref = cls(3, 4, dtype=F64, backend="reference")
        ref.load_state_dict(layer.state_dict())
        x = torch.randn(5, 2, 3, dtype=F64)
        hand = ref.cells[0]
        state = tuple(torch.zeros(2, s, dtype=F64) for s in hand.state_sizes())
        outs = []
        for t in range(5):
            out, state = hand.step(x[t], state)
            outs.append(out)
        torch.testing.assert_close(layer(x)[0], torch.stack(outs), rtol=0, atol=1e-12)
    assert "torch has no HalfLSTMCell" in HalfLSTM(3, 4).explain()


def test_a_module_activation_keeps_its_buffers_on_the_layer():
    class Shifted(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Parameter(torch.tensor(0.7))
            self.register_buffer("shift", torch.tensor(0.1))

        def forward(self, x):
            return torch.tanh(self.a * x) + self.shift

    layer = gatelab.GRU(3, 4, candidate_activation=Shifted(), dtype=F64)
    assert "phi_module_shift_l0" in layer.state_dict() and "phi_module_a_l0" in dict(layer.named_parameters())
    layer.phi_module_shift_l0.fill_(0.5)
    layer.float()
    x = torch.randn(5, 2, 3)
    ref = gatelab.GRU(3, 4, candidate_activation=Shifted(), backend="reference")
    ref.load_state_dict(layer.state_dict())
    assert ref.phi_module_shift_l0.item() == 0.5 and layer.cells[0].phi.module.shift.dtype == torch.float32
    torch.testing.assert_close(layer(x)[0], ref(x)[0], rtol=0, atol=0)


# -- the engine registry and the step hook -------------------------------------------------------------

def test_engines_are_an_ordered_registry_and_auto_takes_the_first_that_applies():
    assert [e.name for e in engines.ENGINES] == ["native", "fused", "reference"]
    assert engines.BACKENDS == ("auto", "native", "fused", "reference")
    for engine in engines.ENGINES:
        assert isinstance(engine, engines.Engine)
    assert isinstance(engines.get("native"), engines.StackEngine)
    assert isinstance(engines.get("fused"), engines.DirectionEngine)
    for layer in (gatelab.LSTM(3, 4), gatelab.LSTM(3, 4, gate_activation="elliott"), gatelab.LSTM(3, 4, variant="FGR")):
        first = next(e for e in engines.ENGINES if not e.unsupported(layer))
        assert layer.engine is first
    with pytest.raises(ValueError, match="unknown engine 'gpu'; valid: native, fused, reference"):
        engines.get("gpu")
    assert [loop.name for loop in engines.fused.LOOPS] == ["Triton", "C++", "PyTorch"]


def test_engines_never_call_into_a_layer_at_run_time(monkeypatch):
    """Every attribute read on the layer during a forward comes from the layer's own code, not from an engine."""
    layer = gatelab.LSTM(3, 4, 2, bidirectional=True, gate_activation="hard_sigmoid", zoneout=0.1)
    engine_files = {str(Path(engines.__file__).parent)}
    callers = []
    original = RecurrentLayer.__getattribute__

    def spy(self, name):
        import sys

        frame = sys._getframe(1)
        if any(frame.f_code.co_filename.startswith(f) for f in engine_files):
            callers.append((frame.f_code.co_name, name))
        return original(self, name)

    x = torch.randn(5, 2, 3)
    monkeypatch.setattr(RecurrentLayer, "__getattribute__", spy)
    for backend in ("auto", "reference"):
        layer.backend = backend
        layer(x)
    monkeypatch.undo()
    assert callers == []


def test_step_hook_sees_every_state_runs_the_reference_loop_and_is_removable():
    layer = gatelab.GRU(3, 4, 2, bidirectional=True, candidate_activation="relu", dtype=F64)
    assert layer.engine_name == "fused"
    x = torch.randn(5, 2, 3, dtype=F64)
    expected, _ = layer(x)
    seen: dict[tuple[int, int], dict[int, Tensor]] = {}

    def hook(call):
        record = seen.setdefault((call.layer, call.direction), {})
        assert call.cell is layer.cells[call.layer * 2 + call.direction] and call.x.shape[0] == 5
        return lambda t, state: record.__setitem__(t, state[0].detach())

    handle = layer.register_step_hook(hook)
    assert layer.engine_name == "reference" and "step hook" in layer.explain()
    out, hn = layer(x)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    assert sorted(seen) == [(0, 0), (0, 1), (1, 0), (1, 1)] and all(len(v) == 5 for v in seen.values())
    torch.testing.assert_close(seen[(1, 0)][4], out[4, :, :4], rtol=0, atol=0)  # last layer, forward direction
    torch.testing.assert_close(seen[(1, 1)][0], out[0, :, 4:], rtol=0, atol=0)  # reverse direction ends at t = 0
    handle.remove()
    assert layer.engine_name == "fused" and "step hook" not in layer.explain()
    assert "run_stack" not in vars(layer)


# -- cells declare their facts ---------------------------------------------------------------------------

def test_each_cell_declares_its_facts():
    lstm, gru = gatelab.LSTMCell(3, 4), gatelab.GRUCell(3, 4)
    elman, gated = gatelab.ElmanCell(3, 4, activation="relu"), gatelab.GatedStateCell(3, 4)
    assert [s.attr for s in gatelab.LSTMCell.slots] == ["sigma_i", "sigma_f", "phi", "sigma_o", "psi"]
    assert gatelab.LSTMCell.roles() == {"gate_activation": "sigmoid", "candidate_activation": "tanh",
                                        "cell_activation": "tanh"}
    assert gatelab.ElmanCell.roles() == {"activation": "tanh"}
    assert (lstm.torch_cell, gru.torch_cell, elman.torch_cell, gated.torch_cell) == (nn.LSTMCell, nn.GRUCell,
                                                                                      nn.RNNCell, None)
    assert (lstm.torch_mode, gru.torch_mode, elman.torch_mode) == ("LSTM", "GRU", "RNN_RELU")
    assert (lstm.output_state, gated.output_state) == (0, None)
    assert (lstm.keep_gate, gru.keep_gate, elman.keep_gate, gated.keep_gate) == ("f", "z", None, "f")
    assert gatelab.LSTMCell(3, 4, gates="io").keep_gate is None
    assert gatelab.LSTMCell(3, 4, variant="FGR").state_names == ("h", "c", "gates")
    assert list(gatelab.LSTMCell(3, 4, coupled=True).activation_slots()) == ["sigma_f", "phi", "sigma_o", "psi"]
    assert gatelab.LSTMCell(3, 4, peephole=True, gate_activation="elliott").torch_differences()[:2] == [
        "peephole=True", "gate_activation['i'] is elliott (torch has sigmoid)"]
    assert gated.torch_differences() == ["torch has no GatedStateCell"]


def test_the_cpp_kind_list_matches_the_cpp_enum():
    source = (Path(cpp.__file__).with_name("kernels.cpp")).read_text()
    body = re.search(r"enum Act : int64_t \{(.*?)\};", source, re.S).group(1)
    names = [n.split("=")[0].strip().lower() for n in body.split(",") if n.strip()]
    assert tuple(names) == cpp.KINDS
    assert "IDENTITY = 0" in body


def test_cpp_slot_order_is_each_cells_slot_order():
    """The kernels read kinds positionally in the cell's slot order (comments in kernels.cpp name it)."""
    source = (Path(cpp.__file__).with_name("kernels.cpp")).read_text()
    for cell, comment in ((gatelab.LSTMCell, "kinds/params: sigma_i, sigma_f, phi, sigma_o, psi"),
                          (gatelab.GRUCell, "kinds/params: sigma_r, sigma_z, phi"),
                          (gatelab.GatedStateCell, "kinds/params: sigma_f, sigma_i, sigma_o, phi")):
        assert comment in source.replace("\n// ", " ")
        assert comment.split(": ")[1] == ", ".join(s.attr for s in cell.slots)


def test_registry_lists_the_builtin_kinds_and_rejects_bad_entries():
    assert registry.available()[:4] == ("lstm", "gru", "rnn", "gated_state")
    assert registry.get("gru").layer is gatelab.GRU and registry.get("gru").cell is gatelab.GRUCell
    with pytest.raises(ValueError, match="unknown cell 'lsmt'; valid: lstm, gru, rnn, gated_state"):
        registry.get("lsmt")
    with pytest.raises(ValueError, match="a cell named 'lstm' is registered already"):
        class Other(gatelab.LSTMCell):
            pass

        class OtherLayer(gatelab.LSTM):
            cell_class = Other

        registry.register(Other, OtherLayer)
    with pytest.raises(ValueError, match="cell_class must be LSTMCell"):
        registry.register(gatelab.LSTMCell, gatelab.GRU)
    assert registry.entry_of(gatelab.LSTMCell(2, 3)).name == "lstm"


# -- a toy cell through the registry alone --------------------------------------------------------------

class ToyCell(RecurrentCell):
    r"""A two-block gated cell: ``u = σ_u(xw_u + gh_u)``, ``h' = u ⊙ φ(xw_c + gh_c) + (1 − u) ⊙ h``."""

    name = "toy"
    blocks = ("u", "c")
    gate_names = ("u",)
    slots = (Slot("sigma_u", "gate_activation", "sigmoid", gate="u"), Slot("phi", "candidate_activation", "tanh"))
    keep_gate = "u"

    def __init__(self, input_size, hidden_size, bias=True, *, gate_activation=None, candidate_activation="tanh",
                 device=None, dtype=None):
        super().__init__(input_size, hidden_size, bias, device=device, dtype=dtype)
        self._gate_slots(gate_activation, self.gate_names)
        self._slot("phi", candidate_activation, "candidate_activation")
        self.reset_parameters()

    def forward(self, input, hx=None):
        x, batched = self._check_input(input)
        h = self._check_state("hx", hx, x.shape[0], self.hidden_size, batched, x)
        return unbatch(self.step(x, (h,))[0], batched)

    def combine(self, xw, gh, state):
        (h,) = state
        pu, pc = (xw + gh).chunk(2, 1)
        u = self.sigma_u(pu)
        h = u * self.phi(pc) + (1 - u) * h
        return h, (h,)


class ToyRNN(RecurrentLayer):
    """The toy cell over a sequence."""

    cell_class = ToyCell

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
                 bidirectional=False, device=None, dtype=None, *, gate_activation=None, candidate_activation="tanh",
                 zoneout=0.0, recurrent_dropout=0.0, init="torch", forget_bias=None, backend="auto", strict=False):
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         cell_options={"gate_activation": gate_activation, "candidate_activation": candidate_activation},
                         zoneout=zoneout, recurrent_dropout=recurrent_dropout, init=init, forget_bias=forget_bias,
                         backend=backend, strict=strict, device=device, dtype=dtype)


@pytest.fixture
def toy():
    entry = registry.register(ToyCell, ToyRNN)
    yield entry
    registry.unregister("toy")


def _pair(toy_kw: dict, T=6, B=3):
    torch.manual_seed(0)
    ref = ToyRNN(3, 4, 2, bidirectional=True, dtype=F64, backend="reference", **toy_kw)
    fus = ToyRNN(3, 4, 2, bidirectional=True, dtype=F64, backend="fused", strict=True, **toy_kw)
    fus.load_state_dict(ref.state_dict())
    x = torch.randn(T, B, 3, dtype=F64)
    lengths = torch.tensor([T, 2, 4][:B])
    results = []
    for layer in (ref, fus):
        xg = x.clone().requires_grad_()
        torch.manual_seed(1)
        out, h = layer(pack_padded_sequence(xg, lengths, enforce_sorted=False))
        loss = (out.data * out.data.detach().cos()).sum() + (h * 1.3).sum()
        names, params = zip(*layer.named_parameters())
        results.append((out.data, h, dict(zip(("x", *names), torch.autograd.grad(loss, [xg, *params])))))
    return fus, results


@pytest.mark.parametrize("toy_kw", [{}, {"gate_activation": "hard_sigmoid", "candidate_activation": "prelu"},
                                    {"zoneout": 0.3, "recurrent_dropout": 0.2}], ids=["plain", "learnable", "masks"])
def test_toy_cell_runs_on_reference_and_fused_pytorch_with_one_registry_entry(toy, toy_kw):
    fus, (a, b) = _pair(toy_kw)
    assert fus.engine_name == "fused" and "pure-PyTorch loop" in fus.explain() and "no C++ loop for ToyCell" in fus.explain()
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(a[1], b[1], rtol=0, atol=1e-12)
    assert a[2].keys() == b[2].keys()
    for name in a[2]:
        torch.testing.assert_close(a[2][name], b[2][name], rtol=0, atol=1e-12, msg=name)
    if "candidate_activation" in toy_kw:
        assert b[2]["phi_weight_l1_reverse"].abs().sum() > 0
    auto = ToyRNN(3, 4)
    assert auto.engine_name == "fused" and "torch has no ToyCell" in auto.explain()  # native does not apply


def test_toy_cell_gradcheck_on_the_fused_loop(toy):
    torch.manual_seed(0)
    layer = ToyRNN(2, 3, backend="fused", strict=True, dtype=F64, candidate_activation="prelu")
    names, params = zip(*layer.named_parameters())
    x = torch.randn(4, 2, 2, dtype=F64, requires_grad=True)

    def fn(x, *ps):
        return torch.func.functional_call(layer, dict(zip(names, ps)), (x,))[0]

    assert torch.autograd.gradcheck(fn, (x, *params))


def test_toy_cell_in_a_sequence_model_config_init_and_listing(toy, tmp_path):
    from gatelab import cli
    from gatelab.tasks import Batch

    model = gatelab.SequenceModel(2, 1, cell="toy", hidden_sizes=(5, 4), gate_activation="hard_sigmoid",
                                  forget_bias=2.0)
    assert model.engines == ["fused", "fused"]
    assert torch.equal(model.layers[0].bias_ih_l0[:5], torch.full((5,), 2.0))  # the keep gate u, declared by the cell
    x = torch.randn(4, 7, 2)
    loss, _ = model.loss(Batch(x, torch.randn(4, 1), torch.tensor([7, 3, 5, 1])))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    cfg = gatelab.config.load(Path("configs/adding_quick.toml"), ["model.cell=toy", "model.hidden_sizes=[4]",
                                                                   "train.steps=3", "task.length=6"])
    run = gatelab.fit(cfg, run_dir=tmp_path / "toy", quiet=True)
    assert run.model.engines == ["fused"] and run.summary["final"]["test"]["mse"] > 0
    assert "toy" in cli.listing("cells") and "ToyRNN" in cli.listing("cells")
    with pytest.raises(gatelab.config.ConfigError, match="cell 'toy' has no such slot; its activation slots: "
                                                         "gate_activation, candidate_activation"):
        gatelab.config.load(Path("configs/adding_quick.toml"), ["model.cell=toy", "model.cell_activation=tanh"])


# -- checkpoints written by earlier code ------------------------------------------------------------------

@pytest.mark.parametrize("name", ["lstm", "gru"])
def test_trainer_checkpoints_written_before_the_seam_still_load_and_resume(name, tmp_path):
    """tests/data/checkpoint_b02f7a2_*.pt: written by ``gatelab.fit`` at commit b02f7a2, when a
    learnable activation's parameter was saved as ``sigma_f.weight_l0`` (the LSTM: prelu gates,
    peepholes, residual projection; the GRU: bidirectional, adaptive_tanh candidate)."""
    from gatelab.checkpoint import load_checkpoint
    from gatelab.config import from_dict
    from gatelab.train import load_model

    path = DATA / f"checkpoint_b02f7a2_{name}.pt"
    model, config, payload = load_model(path)
    x = torch.linspace(-1, 1, 3 * 12 * 2).reshape(3, 12, 2)
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0], torch.load(DATA / "checkpoint_b02f7a2_outputs.pt")[name], rtol=0, atol=0)
    # the optimiser state maps onto the parameters in the same order (shapes agree one by one)
    from gatelab.train import make_optimizer

    opt = make_optimizer(model, config.train)
    opt.load_state_dict(payload["optimizer"])
    for p in model.parameters():
        assert opt.state[p]["exp_avg"].shape == p.shape
    model.train()
    model(x)[0].square().mean().backward()
    opt.step()  # Adam's moments line up with the parameters (a shape mismatch would raise here)
    run_dir = tmp_path / name
    run_dir.mkdir()
    shutil.copy(path, run_dir / "last.pt")
    run = gatelab.fit(from_dict(payload["config"]), run_dir=run_dir, resume=True, quiet=True)
    assert run.step == 30 and load_checkpoint(run_dir / "last.pt")["step"] == 30
    assert (run_dir / "summary.json").exists()


# -- explicit constructors, the slot observer ------------------------------------------------------------

@pytest.mark.parametrize("name", ["lstm", "gru", "rnn", "gated_state"])
def test_public_layers_list_every_option_typed_with_one_doc_line(name):
    import inspect

    layer = registry.get(name).layer
    params = inspect.signature(layer).parameters
    assert not [p for p in params.values() if p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    assert not [n for n, p in params.items() if p.annotation is p.empty]
    assert re.findall(r"^        (\w+)  ", layer.__doc__, re.M) == list(params)  # one line each, in order
    torch_class = getattr(layer, "torch_class", None)
    positional = list(inspect.signature(torch_class).parameters) if torch_class else []
    for n, p in params.items():  # torch's arguments keep torch's places; everything beyond is keyword-only
        assert (p.kind is p.KEYWORD_ONLY) == (n not in positional and n not in (
            "input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout", "bidirectional", "proj_size",
            "nonlinearity", "device", "dtype")), n
    assert "``\"fused\"``" in layer.__doc__


def test_observing_a_cell_sees_every_slot_and_restores_it():
    cell = gatelab.GRUCell(3, 4, candidate_activation="relu", dtype=F64)
    seen = []
    x, h = torch.randn(2, 3, dtype=F64), torch.randn(2, 4, dtype=F64)
    with cell.observing(lambda slot, z, y: seen.append((slot, z, y))):
        out = cell(x, h)
    assert [s for s, _, _ in seen] == ["sigma_r", "sigma_z", "phi"]
    for slot, z, y in seen:
        torch.testing.assert_close(y, torch.relu(z) if slot == "phi" else torch.sigmoid(z), rtol=0, atol=0)
    r, zg, n = (y for _, _, y in seen)
    torch.testing.assert_close(out, (1 - zg) * n + zg * h, rtol=0, atol=1e-15)
    assert cell.phi is gatelab.activations.get("relu")


# -- a toy engine and a toy fused loop: one class and one entry each ----------------------------------

class CountingEngine:
    """Runs the reference loop and counts calls; takes only GRU layers."""

    name, title, whole_stack = "toy_engine", "the toy engine", False

    def __init__(self):
        self.calls = 0

    def unsupported(self, layer):
        return [] if isinstance(layer, gatelab.GRU) else [f"the toy engine runs GRUs, not {layer.kind_name}"]

    def describe(self, layer):
        return "the toy engine"

    def run_direction(self, cell, x, state, lengths, reverse, *, rec_mask=None, weight_hh=None, zoneout=None,
                      strict=False):
        self.calls += 1
        return engines.reference.run_direction(cell, x, state, lengths, reverse, rec_mask=rec_mask,
                                               weight_hh=weight_hh, zoneout=zoneout)


def test_a_new_engine_is_one_class_and_one_entry():
    toy_engine = CountingEngine()
    engines.register(toy_engine, before="fused")
    try:
        assert engines.BACKENDS == ("auto", "native", "toy_engine", "fused", "reference")
        gru = gatelab.GRU(3, 4, 2, bidirectional=True, candidate_activation="relu", dtype=F64)
        lstm = gatelab.LSTM(3, 4, gate_activation="elliott")
        assert gru.engine_name == "toy_engine" and "Runs the toy engine" in gru.explain()
        assert lstm.engine_name == "fused" and "the toy engine runs GRUs, not LSTM" in lstm.explain()
        x = torch.randn(5, 2, 3, dtype=F64)
        ref = gatelab.GRU(3, 4, 2, bidirectional=True, candidate_activation="relu", dtype=F64, backend="reference")
        ref.load_state_dict(gru.state_dict())
        torch.testing.assert_close(gru(x)[0], ref(x)[0], rtol=0, atol=0)
        assert toy_engine.calls == 4  # two layers, two directions
        assert gatelab.GRU(3, 4, backend="toy_engine").engine is toy_engine
        gatelab.config.ModelConfig(cell="gru", backend="toy_engine")  # config validation follows the registry
        with pytest.raises(ValueError, match="exists already"):
            engines.register(toy_engine)
    finally:
        engines.unregister("toy_engine")
    assert engines.BACKENDS == ("auto", "native", "fused", "reference")


class CountingLoop:
    """The PyTorch loop under another name, for GRUs only; counts runs."""

    name = "counting"

    def __init__(self):
        self.runs, self.inner = 0, engines.fused.PyTorchLoop()

    def unsupported(self, cell):
        return [] if isinstance(cell, gatelab.GRUCell) else ["the counting loop runs GRU cells only"]

    def unavailable(self):
        return []

    def ready(self, strict):
        return True

    def describe(self, cell):
        return "counting loop"

    def run(self, *args):
        self.runs += 1
        return self.inner.run(*args)


def test_a_new_fused_loop_is_one_class_and_one_entry():
    loop = CountingLoop()
    engines.fused.register_loop(loop, before="C++")
    try:
        assert [existing.name for existing in engines.fused.LOOPS] == ["Triton", "counting", "C++", "PyTorch"]
        gru = gatelab.GRU(3, 4, bidirectional=True, gate_activation="hard_sigmoid", dtype=F64)
        assert "the fused engine, counting loop" in gru.explain()
        elman = gatelab.RNN(3, 4, activation="elliott")
        assert "C++ loop" in elman.explain() and "counting loop runs GRU cells only" in elman.explain()
        ref = gatelab.GRU(3, 4, bidirectional=True, gate_activation="hard_sigmoid", dtype=F64, backend="reference")
        ref.load_state_dict(gru.state_dict())
        x = torch.randn(5, 2, 3, dtype=F64, requires_grad=True)
        torch.testing.assert_close(gru(x)[0], ref(x)[0], rtol=0, atol=1e-12)
        assert loop.runs == 2
    finally:
        engines.fused.unregister_loop("counting")
    assert [existing.name for existing in engines.fused.LOOPS] == ["Triton", "C++", "PyTorch"]


def test_cells_declare_their_memory_state_and_the_verdict_leads_with_it():
    from gatelab.diagnostics import gradient_flow
    from gatelab.diagnostics.verdict import state_verdicts

    assert (gatelab.LSTMCell.memory_state, gatelab.GRUCell.memory_state) == ("c", None)
    flow = gradient_flow(gatelab.LSTM(2, 3, dtype=F64), torch.randn(6, 2, 2, dtype=F64))
    assert flow.memory == {"l0": "c"} and state_verdicts(flow).leading == "c"
