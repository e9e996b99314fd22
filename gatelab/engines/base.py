"""The engine seam: what an engine is, and what the layer hands it.

A layer (:class:`gatelab.layers.RecurrentLayer`) owns the stack loop: layers, directions, dropout
and residual sums between layers, the random masks. Per layer and direction it calls its engine's
:meth:`DirectionEngine.run_direction` with a cell whose weights are bound and plain tensors; an
engine that runs a whole stack at once (``native``: torch's kernels take all layers in one call)
gets a :class:`Stack` instead. Engines never call back into the layer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple, Protocol, runtime_checkable

import torch
from torch import Tensor

if TYPE_CHECKING:
    from ..cells import RecurrentCell
    from ..layers.base import RecurrentLayer

ZoneoutMasks = tuple[Tensor | None, ...]


def tracing_or_transforming() -> bool:
    """torch.compile / torch.export tracing, or a torch.func transform running: where an engine or loop
    that is not ``traceable`` gives way to one that is."""
    return torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active()

OnStep = Callable[[int, tuple[Tensor, ...]], None]


class Stack(NamedTuple):
    """A whole stack as a stack engine receives it: the cells (``cells[layer * D + direction]``, their
    weights bound) and torch's layer arguments."""

    cells: tuple[RecurrentCell, ...]
    num_layers: int
    bidirectional: bool
    bias: bool
    dropout: float
    training: bool


@runtime_checkable
class Engine(Protocol):
    """What every engine states about itself.

    ``unsupported(layer)`` lists why the engine cannot run ``layer`` as configured, in its current
    train/eval mode (empty: it can). ``describe(layer)`` is the phrase ``explain()`` uses for what
    runs (``"the fused engine, C++ loop"``). ``title`` names the engine in a reason
    (``"torch's kernel"``). An engine that ``torch.compile`` and ``torch.export`` cannot trace sets
    ``traceable = False`` and says why in ``untraceable``; traced, the layer runs the next engine
    that can (:func:`gatelab.engines.traceable`).
    """

    name: str
    title: str
    whole_stack: bool  # True: run_stack (all layers in one call); False: run_direction

    def unsupported(self, layer: RecurrentLayer) -> list[str]: ...

    def describe(self, layer: RecurrentLayer) -> str: ...


@runtime_checkable
class DirectionEngine(Engine, Protocol):
    """An engine that runs one layer and direction at a time."""

    def run_direction(
        self, cell: RecurrentCell, x: Tensor, state: tuple[Tensor, ...], lengths: Tensor | None, reverse: bool, *,
        rec_mask: Tensor | None = None, weight_hh: Tensor | None = None, zoneout: ZoneoutMasks | None = None,
        strict: bool = False,
    ) -> tuple[Tensor, tuple[Tensor, ...]]:
        """Run ``cell`` over ``x (T, B, I)`` from ``state``; return ``(out (T, B, O), final state)``.

        With ``lengths`` (B,), sequence ``b`` runs steps ``0 .. lengths[b]-1`` only (in reverse order
        when ``reverse``): its state is held and its output is zero elsewhere, as torch does for packed
        input. ``rec_mask (B, R)`` multiplies the recurrent input of every step (variational dropout),
        ``weight_hh`` replaces the cell's ``W_hh`` (DropConnect), ``zoneout`` gives per state tensor the
        share ``m (T, B, S)`` of the old value each unit keeps (``m ⊙ old + (1 − m) ⊙ new``; None: no
        zoneout on that state). ``strict``: raise rather than fall back to a slower loop.
        """
        ...


@runtime_checkable
class StackEngine(Engine, Protocol):
    """An engine that runs every layer and direction in one call."""

    def run_stack(self, stack: Stack, x: Tensor, lengths: Tensor | None, hx: tuple[Tensor, ...]
                  ) -> tuple[Tensor, tuple[Tensor, ...]]:
        """Run ``stack`` over ``x (T, B, I)`` from ``hx`` (each ``(L·D, B, size)``); return the last
        layer's output ``(T, B, D·O)`` and the final states, each ``(L·D, B, size)``."""
        ...
