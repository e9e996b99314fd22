"""The reference engine: an autograd loop over ``cell.step``. Slow, obviously correct."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..cells import RecurrentCell

if TYPE_CHECKING:
    from ..layers.base import RecurrentLayer
    from ..layers.sequence import SequenceBatch

name = "reference"


def unsupported(layer: RecurrentLayer) -> list[str]:
    return []


def forward(layer: RecurrentLayer, batch: SequenceBatch, hx: tuple[Tensor, ...]) -> tuple[Tensor, tuple[Tensor, ...]]:
    return layer.run_stack(batch, hx, run_direction)


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
    on_step: Callable[[int, tuple[Tensor, ...]], None] | None = None,
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """Run ``cell`` over ``x (T, B, I)`` from ``state``; return ``(out (T, B, O), final state)``.

    With ``lengths``, sequence ``b`` runs steps ``0 .. lengths[b]-1`` only (in reverse order when
    ``reverse``): its state is held and its output is zero elsewhere, as torch does for packed input.
    ``zoneout`` gives per state tensor the share ``m (T, B, S)`` of the old value each unit keeps
    (``m ⊙ old + (1 − m) ⊙ new``; 0/1 draws in training, the rate in eval; None: no zoneout on that
    state); the layer draws it (``layers.base._zoneout_masks``). ``on_step(t, state)``,
    if given, sees every step's new state before the length mask (the diagnostics record them).
    """
    T = x.shape[0]
    outputs: list[Tensor] = [x.new_empty(0)] * T
    output_is_state = cell.state_names[0] == "h"
    for t in range(T - 1, -1, -1) if reverse else range(T):
        out, new = cell.step(x[t], state, rec_mask=rec_mask, weight_hh=weight_hh)
        if zoneout is not None:
            new = tuple(s if m is None else zoneout_mix(old, s, m[t]) for old, s, m in zip(state, new, zoneout))
            out = new[0] if output_is_state else out
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
