"""The reference engine: an autograd loop over ``cell.step``. Slow, obviously correct."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..cells import RecurrentCell
from .base import OnStep, ZoneoutMasks

if TYPE_CHECKING:
    from ..layers.base import RecurrentLayer


class ReferenceEngine:
    """Runs any cell and every option: the specification the other engines are tested against."""

    name = "reference"
    title = "the reference loop"
    whole_stack = False

    def unsupported(self, layer: RecurrentLayer) -> list[str]:
        return []

    def describe(self, layer: RecurrentLayer) -> str:
        return "the reference loop (autograd over the cell's step)"

    def run_direction(
        self, cell: RecurrentCell, x: Tensor, state: tuple[Tensor, ...], lengths: Tensor | None, reverse: bool, *,
        rec_mask: Tensor | None = None, weight_hh: Tensor | None = None, zoneout: ZoneoutMasks | None = None,
        strict: bool = False, on_step: OnStep | None = None,
    ) -> tuple[Tensor, tuple[Tensor, ...]]:
        return run_direction(cell, x, state, lengths, reverse, rec_mask=rec_mask, weight_hh=weight_hh,
                             zoneout=zoneout, on_step=on_step)


ENGINE = ReferenceEngine()


def run_direction(
    cell: RecurrentCell,
    x: Tensor,
    state: tuple[Tensor, ...],
    lengths: Tensor | None,
    reverse: bool,
    *,
    rec_mask: Tensor | None = None,
    weight_hh: Tensor | None = None,
    zoneout: ZoneoutMasks | None = None,
    on_step: OnStep | None = None,
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """The contract of :meth:`gatelab.engines.base.DirectionEngine.run_direction`, as a loop over
    ``cell.step``. ``on_step(t, state)``, if given, sees every step's new state before the length
    mask (the layer's step hooks, :meth:`gatelab.layers.RecurrentLayer.register_step_hook`)."""
    T = x.shape[0]
    outputs: list[Tensor] = [x.new_empty(0)] * T
    k = cell.output_state  # which state is the output (None: the output is computed)
    for t in range(T - 1, -1, -1) if reverse else range(T):
        out, new = cell.step(x[t], state, rec_mask=rec_mask, weight_hh=weight_hh)
        if zoneout is not None:
            new = tuple(s if m is None else zoneout_mix(old, s, m[t]) for old, s, m in zip(state, new, zoneout))
            out = out if k is None else new[k]
        if on_step is not None:
            on_step(t, new)
        if lengths is not None:
            live = (lengths > t).unsqueeze(1)  # (B, 1)
            new = tuple(torch.where(live, s, old) for s, old in zip(new, state))
            out = out * live
        state = new
        outputs[t] = out
    return torch.stack(outputs), state


def zoneout_mix(old: Tensor, new: Tensor, keep: Tensor) -> Tensor:
    """``keep ⊙ old + (1 − keep) ⊙ new``: exactly ``old`` where ``keep`` is 1, ``new`` where it is 0."""
    return keep * old + (1 - keep) * new
