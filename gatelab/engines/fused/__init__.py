"""The fused engine: one input GEMM for all steps, one fused elementwise step per time step for any
registered activation, and hand-written backpropagation through time with the weight gradients as
GEMMs after the loop.

Its time loops are an ordered list, :data:`LOOPS`: the first one with nothing unsupported for the
cell (and available: the C++ kernels compile at first use) runs. Today: the Triton loops on CUDA
(:mod:`.gpu`), the C++ loops on the CPU (:mod:`.cpp`) and the pure-PyTorch twin (:mod:`.function`,
:mod:`.steps`), which always works and is what the others are tested against. A new loop is one class
with the :class:`Loop` shape and one entry (:func:`register_loop`).
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Protocol

import torch
from torch import Tensor

from ...activations import ModuleActivation
from ...cells import LSTMCell, RecurrentCell
from .. import reference
from ..base import ZoneoutMasks, tracing_or_transforming
from . import cpp, gpu, ops
from .function import FusedDirection, PyLoop, infer
from .steps import step_class

if TYPE_CHECKING:
    from ...layers.base import RecurrentLayer


class Loop(Protocol):
    """One implementation of the fused engine's time loop."""

    name: str
    traceable: bool  # torch.compile and torch.export can trace it (else the reference loop runs there)

    def unsupported(self, cell: RecurrentCell) -> list[str]:
        """Why this loop cannot run ``cell`` as configured, here (its device included); empty: it can."""

    def unavailable(self) -> list[str]:
        """Why the loop cannot run at all just now (kernels that failed to build); empty: it can."""

    def ready(self, strict: bool) -> bool:
        """Make the loop usable (build what it needs); False if it cannot, or raise when ``strict``."""

    def describe(self, cell: RecurrentCell) -> str:
        """The phrase ``explain()`` uses for this loop running ``cell``."""

    def run(self, cell: RecurrentCell, x: Tensor, state: tuple[Tensor, ...], lengths: Tensor | None, reverse: bool,
            rec_mask: Tensor | None, W_hh: Tensor, zoneout: ZoneoutMasks | None) -> tuple[Tensor, tuple[Tensor, ...]]:
        """Same contract as :meth:`gatelab.engines.base.DirectionEngine.run_direction`."""


def _is_layer_norm(cell: RecurrentCell) -> bool:
    return isinstance(cell, LSTMCell) and cell.layer_norm


class CppLoops:
    """The C++ time loops (:mod:`.cpp`): LSTM (plain and layer-norm), GRU, Elman, gated state on the CPU."""

    name = "C++"
    traceable = True  # through its operators (ops.py), which torch.compile and torch.export see as one node each

    def unsupported(self, cell: RecurrentCell) -> list[str]:
        return cpp.cell_blockers(cell)

    def unavailable(self) -> list[str]:
        return [cpp.status()] if cpp.failed() else []

    def ready(self, strict: bool) -> bool:
        # under torch.compile the build runs at trace time and its answer is a constant of the graph
        return _load_once(strict) if torch.compiler.is_compiling() else cpp.load(strict=strict)

    def describe(self, cell: RecurrentCell) -> str:
        what = "C++ loop" + (" (layer-norm LSTM; the input-side norm under autograd)" if _is_layer_norm(cell) else "")
        if (dtype := cell.weight_ih.dtype) in cpp.REDUCED:
            what += (f" in float32: the {str(dtype).removeprefix('torch.')} weights, inputs and states are cast up "
                     "for the call, its outputs and gradients rounded back")
        if not cpp.loaded():
            return what + " (compiled at first use)"
        return what + f"; its per-step products on {cpp.step_product(cell)}"

    def run(self, cell, x, state, lengths, reverse, rec_mask, W_hh, zoneout):
        if x.dtype in cpp.REDUCED:
            return _in_float32(cell, x, state, lengths, reverse, rec_mask, W_hh, zoneout)
        return ops.run(cell, x, state, lengths, reverse, rec_mask, W_hh, zoneout)


class TritonLoop:
    """The Triton loops (:mod:`.gpu`): LSTM, GRU, Elman, gated state on CUDA, any activation with a
    Triton form; on the CPU under Triton's interpreter with ``GATELAB_TRITON=interpret``."""

    name = "Triton"
    traceable = True  # through its operators, as the C++ loop

    def unsupported(self, cell: RecurrentCell) -> list[str]:
        return gpu.cell_blockers(cell)

    def unavailable(self) -> list[str]:
        return gpu.unavailable()

    def ready(self, strict: bool) -> bool:
        if why := gpu.unavailable():
            if strict:
                raise RuntimeError(f"gatelab: {why[0]}")
            return False
        return True

    def describe(self, cell: RecurrentCell) -> str:
        return gpu.describe(cell)

    def run(self, cell, x, state, lengths, reverse, rec_mask, W_hh, zoneout):
        namespace = ops.NAMESPACE if x.device.type == "cuda" else ops.TRITON_NAMESPACE
        return ops.run(cell, x, state, lengths, reverse, rec_mask, W_hh, zoneout, namespace=namespace)


def _in_float32(cell, x, state, lengths, reverse, rec_mask, W_hh, zoneout):
    """A bfloat16 or float16 direction on the C++ loop: float32 arithmetic and float32 state within
    the call (casts are differentiable, so the gradients come back in the layer's dtype)."""
    def up(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.float()

    with cell.using({name: p.float() for name, p in cell.named_parameters()}):
        out, final = ops.run(cell, x.float(), tuple(map(up, state)), lengths, reverse, up(rec_mask), W_hh.float(),
                             None if zoneout is None else tuple(map(up, zoneout)))
    return out.to(x.dtype), tuple(s.to(x.dtype) for s in final)


@torch.compiler.assume_constant_result
def _load_once(strict: bool) -> bool:
    return cpp.load(strict=strict)


class PyTorchLoop:
    """The pure-PyTorch time loop over a per-cell step (:mod:`.steps`): every option, any device."""

    name = "PyTorch"

    def unsupported(self, cell: RecurrentCell) -> list[str]:
        if _is_layer_norm(cell):
            return ["layer_norm=True is fused on the C++ loop only"]
        return []

    def unavailable(self) -> list[str]:
        return []

    def ready(self, strict: bool) -> bool:
        return True

    traceable = False  # its per-step autograd function does not trace: compiled, the reference loop runs

    def describe(self, cell: RecurrentCell) -> str:
        return "pure-PyTorch loop (under torch.compile, torch.export and torch.func the reference loop, which traces)"

    def run(self, cell, x, state, lengths, reverse, rec_mask, W_hh, zoneout):
        loop = PyLoop(step_class(cell)(cell, W_hh), zoneout)
        return _apply((loop, reverse, lengths, rec_mask, x, cell.weight_ih, W_hh, cell.bias_ih, cell.bias_hh, *state),
                      loop.step.extra_params())


LOOPS: tuple[Loop, ...] = (TritonLoop(), CppLoops(), PyTorchLoop())


def register_loop(loop: Loop, *, before: str = "PyTorch") -> None:
    """Add ``loop`` to :data:`LOOPS` before the loop called ``before`` (default: before the PyTorch
    loop, which runs every cell the engine takes and so stays last)."""
    global LOOPS
    names = [existing.name for existing in LOOPS]
    if loop.name in names:
        raise ValueError(f"register_loop: a loop named {loop.name!r} exists already")
    if before not in names:
        raise ValueError(f"register_loop: no loop named {before!r}; have {', '.join(names)}")
    at = names.index(before)
    LOOPS = (*LOOPS[:at], loop, *LOOPS[at:])


def unregister_loop(name: str) -> None:
    """Remove the loop called ``name`` (not the PyTorch loop)."""
    global LOOPS
    if name == "PyTorch":
        raise ValueError("the PyTorch loop cannot be removed: the engine falls back to it")
    LOOPS = tuple(existing for existing in LOOPS if existing.name != name)


def cell_blockers(cell: RecurrentCell) -> list[str]:
    """Why the fused engine cannot run ``cell`` on any loop (empty when it can)."""
    out = []
    if step_class(cell) is None:
        out.append(f"the fused engine has no step for {type(cell).__name__} (it needs a 'matrix' recurrence "
                   f"with combine(), or a hand-written step)")
    if isinstance(cell, LSTMCell):
        if cell.layer_norm and (blocked := [b for b in cpp.cell_blockers(cell) if not b.startswith(cpp.DEVICE_BLOCKER)]):
            out.append(f"layer_norm=True is fused on the C++ loop only, which cannot run this cell ({blocked[0]})")
        if cell.full_gate_recurrence:
            out.append("full_gate_recurrence (FGR) is not fused yet")
    for slot, act in cell.activation_slots().items():
        if isinstance(act, ModuleActivation):
            out.append(f"{slot} is an nn.Module ({act.name}) whose parameter derivatives the fused engine does not know")
    return out


class FusedEngine:
    """gatelab's engine for any registered activation (see the module docstring)."""

    name = "fused"
    title = "the fused engine"
    whole_stack = False

    def unsupported(self, layer: RecurrentLayer) -> list[str]:
        return cell_blockers(layer.cells[0])

    def describe(self, layer: RecurrentLayer) -> str:
        """Which loop runs ``layer``'s cells, and why the loops before it in :data:`LOOPS` do not."""
        cell = layer.cells[0]
        skipped: list[str] = []
        for loop in LOOPS:
            why = loop.unsupported(cell) or loop.unavailable()
            if not why:
                return f"the fused engine, {loop.describe(cell)}" + (": " + "; ".join(skipped) if skipped else "")
            skipped += [w for w in why if w != gpu.CPU_BLOCKER]  # the GPU loop on the CPU: not news
        return "the fused engine, layer_norm on the reference loop: " + "; ".join(skipped)

    def run_direction(
        self, cell: RecurrentCell, x: Tensor, state: tuple[Tensor, ...], lengths: Tensor | None, reverse: bool, *,
        rec_mask: Tensor | None = None, weight_hh: Tensor | None = None, zoneout: ZoneoutMasks | None = None,
        strict: bool = False,
    ) -> tuple[Tensor, tuple[Tensor, ...]]:
        W_hh = cell.weight_hh if weight_hh is None else weight_hh
        if x.shape[1] == 0:  # an empty batch: nothing to fuse; the reference loop returns torch's empty result
            return reference.run_direction(cell, x, state, lengths, reverse, rec_mask=rec_mask, weight_hh=W_hh,
                                           zoneout=zoneout)
        # under autocast the loops run in the layer's own dtype (the meta device has no autocast at all)
        with torch.autocast(x.device.type, enabled=False) if _autocast_available(x.device.type) \
                else contextlib.nullcontext():
            for loop in LOOPS:
                if not loop.unsupported(cell) and loop.ready(strict):
                    if getattr(loop, "traceable", True) or not tracing_or_transforming():
                        return loop.run(cell, x, state, lengths, reverse, rec_mask, W_hh, zoneout)
                    break
        # A layer-norm LSTM without its C++ loop (no kernels, or another device), or a loop that does
        # not trace under torch.compile: the reference loop, as describe() says.
        return reference.run_direction(cell, x, state, lengths, reverse, rec_mask=rec_mask, weight_hh=W_hh,
                                       zoneout=zoneout)


ENGINE = FusedEngine()


def _autocast_available(device_type: str) -> bool:
    check = getattr(torch.amp, "is_autocast_available", None)  # torch >= 2.4
    return check(device_type) if check is not None else device_type in ("cpu", "cuda")


def _apply(args: tuple, extra: list[Tensor]) -> tuple[Tensor, tuple[Tensor, ...]]:
    """Run :class:`FusedDirection` (or, when nothing needs a gradient, the inference path that keeps
    nothing) on ``args`` (its ``apply`` arguments) and the loop's extra parameters."""
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (*args[4:], *extra))
    out, *final = FusedDirection.apply(*args, *extra) if needs_grad else infer(*args)
    return out, tuple(final)


def implementation() -> str:
    """Which implementation of the fused engine's loop runs here: ``"C++"`` or ``"PyTorch"``."""
    return "C++" if cpp.load() else "PyTorch"


__all__ = ["ENGINE", "FusedEngine", "LOOPS", "Loop", "CppLoops", "PyTorchLoop", "TritonLoop", "cell_blockers",
           "implementation",
           "register_loop", "unregister_loop"]
