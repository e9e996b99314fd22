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
import torch.nn.functional as F
from torch import Tensor

from ...activations import ModuleActivation
from ...cells import LSTMCell, RecurrentCell
from .. import reference
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
        if cell.layer_norm and (blocked := _layer_norm_blockers(cell)):
            out.append(f"layer_norm=True is fused on the C++ loop only, which cannot run this cell ({blocked[0]})")
        if cell.full_gate_recurrence:
            out.append("full_gate_recurrence (FGR) is not fused yet")
    for slot, act in cell.activation_slots().items():
        if isinstance(act, ModuleActivation):
            out.append(f"{slot} is an nn.Module ({act.name}) whose parameter derivatives the fused engine does not know")
    return out


def _layer_norm_blockers(cell: LSTMCell) -> list[str]:
    """What keeps the C++ loop from a layer-norm LSTM cell, its device aside: a cell moved to another
    device after the engine was chosen runs the reference loop (see :func:`_run_layer_norm`)."""
    return [b for b in cpp.cell_blockers(cell) if not b.startswith("the C++ loop runs on the CPU")]


def unsupported(layer: RecurrentLayer) -> list[str]:
    return cell_blockers(layer.cells[0])


def forward(layer: RecurrentLayer, batch: SequenceBatch, hx: tuple[Tensor, ...]) -> tuple[Tensor, tuple[Tensor, ...]]:
    return layer.run_stack(batch, hx, partial(run_direction, strict=layer.strict))


def describe(layer: RecurrentLayer) -> str:
    """Which loop the fused engine runs for ``layer``: the C++ one, or the pure-PyTorch one and why."""
    cell = layer.cells[0]
    blockers = cpp.cell_blockers(cell)
    layer_norm = isinstance(cell, LSTMCell) and cell.layer_norm
    if blockers:
        loop = "layer_norm on the reference loop" if layer_norm else "pure-PyTorch loop"
        return f"fused engine, {loop}: " + "; ".join(blockers)
    if cpp.failed():
        if layer_norm:
            return "fused engine, layer_norm on the reference loop: " + cpp.status()
        return "fused engine, pure-PyTorch loop: " + cpp.status()
    what = "C++ loop" + (" (layer-norm LSTM; the input-side norm under autograd)" if layer_norm else "")
    return f"fused engine, {what}" + ("" if cpp.loaded() else " (compiled at first use)")


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
    cell allows it and the kernels load, else the pure-PyTorch loop (the layer-norm LSTM: see
    :func:`_run_layer_norm`)."""
    W_hh = cell.weight_hh if weight_hh is None else weight_hh
    if isinstance(cell, LSTMCell) and cell.layer_norm:
        return _run_layer_norm(cell, x, state, lengths, reverse, rec_mask, W_hh, zoneout, strict)
    step = STEPS[type(cell)](cell, W_hh)
    if not cpp.cell_blockers(cell) and cpp.load(strict=strict):
        loop = cpp.CppLoop(step, None if zoneout is None else tuple(cpp.contiguous(m) for m in zoneout))
        state = tuple(s.contiguous() for s in state)
        x, W_hh = x.contiguous(), W_hh.contiguous()
        rec_mask = cpp.contiguous(rec_mask)
        lengths = None if lengths is None else lengths.to("cpu", dtype=torch.int64).contiguous()
    else:
        loop = PyLoop(step, zoneout)
    return _apply((loop, reverse, lengths, rec_mask, x, cell.weight_ih, W_hh, cell.bias_ih, cell.bias_hh, *state),
                  step.extra_params())


def _apply(args: tuple, extra: list[Tensor]) -> tuple[Tensor, tuple[Tensor, ...]]:
    """Run :class:`FusedDirection` (or, when nothing needs a gradient, the inference path that keeps
    nothing) on ``args`` (its ``apply`` arguments) and the loop's extra parameters."""
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (*args[4:], *extra))
    out, *final = FusedDirection.apply(*args, *extra) if needs_grad else infer(*args)
    return out, tuple(final)


def _run_layer_norm(cell: LSTMCell, x: Tensor, state: tuple[Tensor, ...], lengths: Tensor | None, reverse: bool,
                    rec_mask: Tensor | None, W_hh: Tensor, zoneout: tuple[Tensor | None, ...] | None, strict: bool
                    ) -> tuple[Tensor, tuple[Tensor, ...]]:
    """The layer-norm LSTM: the input side ``LN(W_ih x) ⊙ g_ih + b`` for all steps under autograd, the
    recurrence (with the norms of ``W_hh h`` and ``c'``) in the C++ loop. Without the C++ kernels, or
    on another device than the CPU, it runs the reference loop (:func:`describe` says so)."""
    if strict and (blockers := _layer_norm_blockers(cell)):
        raise RuntimeError("the fused engine cannot run this layer-norm LSTM: " + "; ".join(blockers))
    if cpp.cell_blockers(cell) or not cpp.load(strict=strict):  # e.g. on CUDA: the C++ loop is CPU-only
        return reference.run_direction(cell, x, state, lengths, reverse, rec_mask=rec_mask, weight_hh=W_hh,
                                       zoneout=zoneout)
    G = cell.weight_ih.shape[0]
    xw = F.layer_norm(F.linear(x, cell.weight_ih), (G,), cell.ln_ih_weight, None, cell.layer_norm_eps)
    if cell.bias:
        xw = xw + (cell.bias_ih + cell.bias_hh)
    loop = cpp.CppLoop(STEPS[LSTMCell](cell, W_hh), None if zoneout is None else tuple(map(cpp.contiguous, zoneout)))
    state = tuple(s.contiguous() for s in state)
    lengths = None if lengths is None else lengths.to("cpu", dtype=torch.int64).contiguous()
    args = (loop, reverse, lengths, cpp.contiguous(rec_mask), xw.contiguous(), None, W_hh.contiguous(), None, None,
            *state)
    return _apply(args, [cell.ln_hh_weight, cell.ln_c_weight, cell.ln_c_bias])  # the order CppLoop returns


def implementation() -> str:
    """Which implementation of the fused engine's loop runs here: ``"C++"`` or ``"PyTorch"``."""
    return "C++" if cpp.load() else "PyTorch"
