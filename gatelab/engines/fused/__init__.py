"""The fused engine: one input GEMM for all steps, one fused elementwise step per time step for any
registered activation, and hand-written backpropagation through time with the weight gradients as
GEMMs after the loop.

Two implementations of the same algorithm: C++ kernels (compiled at first use and cached; see
:mod:`.cpp`) and a pure-PyTorch twin (:mod:`.function`, :mod:`.steps`), which always works and is
what the C++ is tested against.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ...activations import ModuleActivation
from ...cells import LSTMCell, RecurrentCell
from . import cpp
from .function import FusedDirection, PyLoop, infer
from .steps import STEPS

if TYPE_CHECKING:
    from ...layers.base import RecurrentLayer
    from ...layers.sequence import SequenceBatch

name = "fused"


def cell_blockers(cell: RecurrentCell) -> list[str]:
    """Why the fused engine cannot run ``cell`` (empty when it can)."""
    out = []
    if type(cell) not in STEPS:
        out.append(f"the fused engine has no step for {type(cell).__name__}")
    if isinstance(cell, LSTMCell):
        if cell.layer_norm:
            out.append("layer_norm=True is not fused yet")
        if cell.full_gate_recurrence:
            out.append("full_gate_recurrence (FGR) is not fused yet")
    for slot, act in cell.activation_slots().items():
        if isinstance(act, ModuleActivation):
            out.append(f"{slot} is an nn.Module ({act.name}) whose parameter derivatives the fused engine does not know")
    return out


def unsupported(layer: RecurrentLayer) -> list[str]:
    return cell_blockers(layer.cells[0])


def forward(layer: RecurrentLayer, batch: SequenceBatch, hx: tuple[Tensor, ...]) -> tuple[Tensor, tuple[Tensor, ...]]:
    return layer.run_stack(batch, hx, partial(run_direction, strict=layer.strict))


def describe(layer: RecurrentLayer) -> str:
    """Which loop the fused engine runs for ``layer``: the C++ one, or the pure-PyTorch one and why."""
    blockers = cpp.cell_blockers(layer.cells[0])
    if blockers:
        return "fused engine, pure-PyTorch loop: " + "; ".join(blockers)
    if cpp.failed():
        return "fused engine, pure-PyTorch loop: " + cpp.status()
    return "fused engine, C++ loop" + ("" if cpp.loaded() else " (compiled at first use)")


def run_direction(
    cell: RecurrentCell,
    x: Tensor,
    state: tuple[Tensor, ...],
    lengths: Tensor | None,
    reverse: bool,
    *,
    rec_mask: Tensor | None = None,
    weight_hh: Tensor | None = None,
    zoneout: tuple[Tensor | None, ...] | None = None,
    strict: bool = False,
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """Same contract as :func:`gatelab.engines.reference.run_direction`; runs the C++ loop when the
    cell allows it and the kernels load, else the pure-PyTorch loop."""
    W_hh = cell.weight_hh if weight_hh is None else weight_hh
    step = STEPS[type(cell)](cell, W_hh)
    if not cpp.cell_blockers(cell) and cpp.load(strict=strict):
        loop = cpp.CppLoop(step, None if zoneout is None else tuple(cpp.contiguous(m) for m in zoneout))
        state = tuple(s.contiguous() for s in state)
        x, W_hh = x.contiguous(), W_hh.contiguous()
        rec_mask = cpp.contiguous(rec_mask)
        lengths = None if lengths is None else lengths.to("cpu", dtype=torch.int64).contiguous()
    else:
        loop = PyLoop(step, zoneout)
    args = (loop, reverse, lengths, rec_mask, x, cell.weight_ih, W_hh, cell.bias_ih, cell.bias_hh, *state)
    extra = step.extra_params()
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (*args[4:], *extra))
    out, *final = FusedDirection.apply(*args, *extra) if needs_grad else infer(*args)
    return out, tuple(final)


def implementation() -> str:
    """Which implementation of the fused engine's loop runs here: ``"C++"`` or ``"PyTorch"``."""
    return "C++" if cpp.load() else "PyTorch"
