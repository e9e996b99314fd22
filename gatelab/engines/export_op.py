"""The export-only operator ``torch.ops.gatelab.recurrence``: one call per layer and direction for the
cells the fused engine's C++ operators do not take (LSTM projection, CIFG, removed gates, full gate
recurrence, the reset-before GRU, learnable activations ...) and for the cells of
:mod:`gatelab.engines.scan` (minGRU, minLSTM, IndRNN, sLSTM), so that an exported graph holds one
node whose arguments describe the whole recurrence instead of a loop unrolled at a fixed length.

Only :func:`gatelab.onnx.export` (or a block under :func:`routing`) sends layers here; everywhere
else they run exactly as before. The operator's arguments: the input ``x (T, B, I)``, the initial
states, the cell's tensors (its parameters under their names, learnable activations' ``weight``
included), ``lengths``, ``cell``: a JSON description (:func:`describe`: kind, sizes, options, one
activation key per slot, the tensors' names, eval zoneout rates) and ``reverse``. It returns the
output sequence and the final states side by side, ``(B, ΣS)`` (one output tensor, so the exporter's
translation returns plain values). Its kernel (every device) rebuilds the cell from the description
on the meta device, binds the tensors and runs the reference loop, so an exported program computes
what the layer does; it has no gradient (export in eval mode, without grad). gatelab.onnx translates
it to a Scan over time (or ONNX's LSTM with ``input_forget`` for a plain CIFG).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.nn.utils.parametrize import type_before_parametrizations

from .. import activations
from ..activations import Activation, LearnableActivation
from ..cells import ElmanCell, GatedStateCell, GRUCell, IndRNNCell, LSTMCell, MinGRUCell, MinLSTMCell, RecurrentCell, SLSTMCell
from . import reference
from .fused import cpp

if TYPE_CHECKING:
    from ..layers.base import RecurrentLayer

QUALNAME = "gatelab::recurrence"
SCHEMA = "(Tensor x, Tensor[] state, Tensor[] weights, Tensor? lengths, str cell, bool reverse) -> (Tensor out, Tensor state)"
CELLS: dict[str, type[RecurrentCell]] = {
    "rnn": ElmanCell, "gru": GRUCell, "lstm": LSTMCell, "gated_state": GatedStateCell,
    "min_gru": MinGRUCell, "min_lstm": MinLSTMCell, "indrnn": IndRNNCell, "slstm": SLSTMCell,
}
# the kinds whose layers run gatelab.engines.scan (no C++ operator of the fused engine exports them)
SCAN_KINDS = ("min_gru", "min_lstm", "indrnn", "slstm")
# the options each kind's description carries (with the defaults a cell built from it would have otherwise)
OPTIONS = {"gru": ("reset_after",),
           "lstm": ("peephole", "peephole_output", "coupled", "gates", "full_gate_recurrence", "proj_size"),
           "indrnn": ("recurrent_max",), "slstm": ("num_heads",)}
LEARNABLE = ("prelu", "adaptive_sigmoid", "adaptive_tanh")
# activation kinds with an ONNX expression (gatelab.onnx builds each from elementary operators)
KINDS = (*cpp.KINDS, "exp", "min_g", *LEARNABLE)

_routing = [0]


@contextlib.contextmanager
def routing() -> Iterator[None]:
    """Within the block (:func:`gatelab.onnx.export` opens one) the layers :func:`engine_for` takes run
    this operator, so ``torch.export`` records one node per direction."""
    _routing[0] += 1
    try:
        yield
    finally:
        _routing[0] -= 1


def active() -> bool:
    """Inside :func:`routing`, or while ``torch.onnx.export`` traces the model (with gatelab's translations
    registered with torch's exporter: :func:`gatelab.onnx.traced_by_torch_onnx`)."""
    if _routing[0] > 0:
        return True
    if _dynamo_onnx_export():
        from .. import onnx

        return onnx.traced_by_torch_onnx()
    return False


def _dynamo_onnx_export() -> bool:
    """Whether torch.onnx.export(..., dynamo=True) is tracing; the TorchScript exporter (dynamo=False),
    which ``torch.onnx.is_in_onnx_export()`` also reports, cannot use gatelab's translations."""
    try:
        from torch.onnx._internal.exporter import _flags
    except ImportError:
        return False
    return bool(_flags._is_onnx_exporting)


def blockers(cell: RecurrentCell) -> list[str]:
    """Why the operator cannot describe ``cell`` (empty: it can)."""
    kind = next((k for k, cls in CELLS.items() if type_before_parametrizations(cell) is cls), None)
    if kind is None:
        return [f"{type(cell).__name__} has no description for the export operator (it covers the registered cells: "
                f"{', '.join(cls.__name__ for cls in CELLS.values())})"]
    out = []
    if isinstance(cell, LSTMCell) and cell.layer_norm:
        why = [b for b in cpp.cell_blockers(cell) if not b.startswith((cpp.DEVICE_BLOCKER, cpp.DTYPE_BLOCKER))]
        out.append("layer_norm=True exports through the C++ layer-norm loop's operator (lstm_ln) only"
                   + (f", which cannot run this cell ({why[0]})" if why else ""))
    for slot, act in cell.activation_slots().items():
        if getattr(act, "kind", "") not in KINDS or not isinstance(act, (Activation, LearnableActivation)):
            out.append(f"{slot} ({getattr(act, 'key', type(act).__name__)}) is a user activation with no ONNX "
                       f"expression (only registered activations have one)")
    return out


def describe(cell: RecurrentCell, zoneout: Sequence[float]) -> str:
    """The JSON description of ``cell`` the operator carries (``zoneout``: the eval keep share per state)."""
    kind = next(k for k, cls in CELLS.items() if type_before_parametrizations(cell) is cls)
    return json.dumps({
        "kind": kind, "input_size": cell.input_size, "hidden_size": cell.hidden_size, "bias": cell.bias,
        "options": {name: getattr(cell, name) for name in OPTIONS.get(kind, ())},
        "activations": {slot: act.key for slot, act in cell.activation_slots().items()},
        "weights": [name for name, _ in cell.named_parameters(remove_duplicate=False)],
        "zoneout": [float(p) for p in zoneout], "state_sizes": list(cell.state_sizes()),
    }, sort_keys=True)


def build(description: str | dict[str, Any], device: str | torch.device = "meta") -> RecurrentCell:
    """A cell as ``description`` says (its tensors to be bound), on ``device``."""
    d = json.loads(description) if isinstance(description, str) else description
    cell = CELLS[d["kind"]](d["input_size"], d["hidden_size"], d["bias"], **d["options"], device=device)
    for slot, key in d["activations"].items():
        act = activations.resolve(key, d["hidden_size"])
        setattr(cell, slot, act.to(device) if isinstance(act, torch.nn.Module) else act)
    return cell


def _kernel(x: Tensor, state: list[Tensor], weights: list[Tensor], lengths: Tensor | None, cell: str,
            reverse: bool) -> tuple[Tensor, Tensor]:
    d = json.loads(cell)
    built = build(d)
    zoneout = tuple(None if p == 0 else s.new_full((x.shape[0], *s.shape), p) for s, p in zip(state, d["zoneout"]))
    with built.using(dict(zip(d["weights"], weights))):
        out, final = reference.run_direction(built, x, tuple(state), lengths, reverse,
                                             zoneout=zoneout if any(z is not None for z in zoneout) else None)
    return out, torch.cat(final, 1)


def _fake(x, state, weights, lengths, cell, reverse):
    return x.new_empty(x.shape[0], x.shape[1], state[0].shape[1]), x.new_empty(x.shape[1], sum(s.shape[1] for s in state))


def _no_gradient(ctx, *grads):
    raise RuntimeError("gatelab: torch.ops.gatelab.recurrence is export-only and has no gradient (gatelab.onnx.export "
                       "records it in eval mode without grad); train the layer itself")


torch.library.define(QUALNAME, SCHEMA)
torch.library.impl(QUALNAME, "CompositeExplicitAutograd", _kernel)
torch.library.register_fake(QUALNAME, _fake)
torch.library.register_autograd(QUALNAME, _no_gradient, setup_context=lambda ctx, inputs, output: None)


class ExportEngine:
    """Runs each layer direction as one ``torch.ops.gatelab.recurrence`` call (export only)."""

    name = "export"
    title = "the export operator"
    whole_stack = False

    def __init__(self, zoneout: Sequence[float]) -> None:
        self.zoneout = tuple(zoneout)

    def unsupported(self, layer: RecurrentLayer) -> list[str]:
        return blockers(layer.cells[0])

    def describe(self, layer: RecurrentLayer) -> str:
        return "one torch.ops.gatelab.recurrence call per direction (export only)"

    def run_direction(self, cell, x, state, lengths, reverse, *, rec_mask=None, weight_hh=None, zoneout=None,
                      strict=False):
        if rec_mask is not None:
            raise RuntimeError("gatelab: the export operator takes no recurrent-dropout mask (export in eval mode)")
        names = [n for n, _ in cell.named_parameters(remove_duplicate=False)]
        weights = [weight_hh if n == "weight_hh" and weight_hh is not None else t
                   for n, t in cell.named_parameters(remove_duplicate=False)]
        assert len(weights) == len(names)
        if lengths is not None:
            lengths = lengths.to(x.device, torch.int64)
        out, final = torch.ops.gatelab.recurrence(x, list(state), weights, lengths, describe(cell, self.zoneout),
                                                  reverse)
        return out, tuple(torch.split(final, list(cell.state_sizes()), 1))


def engine_for(layer: RecurrentLayer) -> ExportEngine | None:
    """The export engine for ``layer`` while :func:`routing` is on: for a layer whose direction the C++
    operators do not take (they export themselves) and the operator can describe, in eval mode (the
    training-time masks are random inputs); None otherwise (the layer runs as it would)."""
    if not active() or layer.training or layer._step_hooks:
        return None
    return ExportEngine(layer.zoneout) if takes(layer) else None


def takes(layer: RecurrentLayer) -> bool:
    """Whether the export operator runs ``layer`` under :func:`routing` (in eval mode): a layer not on
    ``backend="reference"`` whose cells the C++ loops' operators do not run (on any device) and the
    operator can describe."""
    from .fused import cell_blockers as fused_blockers

    cell = layer.cells[0]
    return layer.backend != "reference" and not blockers(cell) and bool(cpp.cell_blockers(cell) or fused_blockers(cell))


__all__ = ["ExportEngine", "KINDS", "QUALNAME", "active", "blockers", "build", "describe", "engine_for", "routing", "takes"]
