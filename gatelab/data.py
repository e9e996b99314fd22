"""Training units: what one optimiser step trains on, as a pure function of the step number.

Because unit ``k`` depends only on ``(seed, k)``, a resumed run sees exactly the data an
uninterrupted one would, with no loader state to save.

* :class:`Minibatches`: shuffled minibatches of a task's training split (a new permutation per
  epoch, drawn from ``(seed, epoch)``). With truncated BPTT each batch is cut into time windows.
* :class:`StreamWindows`: a language model's training stream laid out as ``B`` parallel rows and
  walked in windows of ``k1`` steps, the state carried from one window to the next (truncated BPTT
  over the whole stream).

Truncated BPTT (k1, k2): window ``j`` ends at ``e = (j + 1)·k1``; the loss is that of its last k1
steps, backpropagated through the ``k2`` steps ``[e − k2, e)``. The state carried into window
``j + 1`` is the one at ``e + k1 − k2``, which lies inside window ``j``: ``Unit.keep`` says after how
many steps to take it. With ``k1 == k2`` windows do not overlap and ``keep`` is the whole window.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from torch import Tensor

from .tasks import SequenceDataset, collate

__all__ = ["Unit", "Minibatches", "StreamWindows", "in_order"]


class Unit(NamedTuple):
    """One optimiser step's data, batch-first.

    ``fresh``: start from a zero state (else from the state carried from the previous unit).
    ``keep``: carry the state after this many steps (``None``: after the last one).
    ``targets``: the loss is over the last ``targets`` steps of the output, whose targets ``y`` holds
    (``None``: ``y`` are the targets of the whole unit, as for a plain batch).
    ``prefix``: one-target truncated BPTT: the first ``prefix`` steps run without gradient and hand their
    (detached) state to the rest, which alone is backpropagated; the loss is at the end, as without it.
    """

    x: Tensor
    y: Tensor
    lengths: Tensor | None
    fresh: bool = True
    keep: int | None = None
    targets: int | None = None
    prefix: int = 0


def _window(j: int, T: int, k1: int, k2: int) -> tuple[int, int, int]:
    """Window ``j`` over ``T`` steps: ``(start, end, keep)`` (see the module docstring)."""
    end = min((j + 1) * k1, T)
    start = max(0, end - k2)
    next_start = max(0, min(end + k1, T) - k2)
    return start, end, next_start - start


class Minibatches:
    """Shuffled minibatches of ``dataset``; unit ``k`` is a pure function of ``(seed, k)``."""

    def __init__(self, dataset: SequenceDataset, batch_size: int, seed: int, tbptt: tuple[int, int] | None = None,
                 one_target: bool = False):
        if len(dataset) == 0:
            raise ValueError("the training split is empty")
        self.dataset, self.batch_size, self.seed, self.tbptt = dataset, batch_size, seed, tbptt
        self.batches_per_epoch = math.ceil(len(dataset) / batch_size)
        self.windows = 1
        if tbptt is not None:
            lengths = set(dataset.lengths())
            if len(lengths) != 1:
                raise ValueError(f"truncated BPTT over minibatches needs sequences of one length, got lengths "
                                 f"{min(lengths)}..{max(lengths)}")
            self.T = lengths.pop()
            # per-step targets: one unit per window; one target per sequence: one unit per batch whose
            # last k2 steps alone are backpropagated
            self.windows = 1 if one_target else math.ceil(self.T / tbptt[0])
        self.one_target = one_target
        self.steps_per_epoch = self.batches_per_epoch * self.windows
        self._perm: tuple[int, np.ndarray] | None = None

    def permutation(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset)))
        return self._perm[1]

    def __call__(self, step: int) -> Unit:
        epoch, r = divmod(step, self.steps_per_epoch)
        b, j = divmod(r, self.windows)
        idx = self.permutation(epoch)[b * self.batch_size : (b + 1) * self.batch_size]
        batch = collate([self.dataset[int(i)] for i in idx])
        if self.tbptt is None:
            return Unit(batch.x, batch.y, batch.lengths)
        if self.one_target:
            return Unit(batch.x, batch.y, None, prefix=max(0, self.T - self.tbptt[1]))
        start, end, keep = _window(j, self.T, *self.tbptt)
        targets = end - j * self.tbptt[0]
        return Unit(batch.x[:, start:end], batch.y[:, end - targets : end], None, j == 0, keep, targets)


class StreamWindows:
    """A token stream as ``batch_size`` contiguous rows, walked in truncated-BPTT windows.

    Row ``b`` holds inputs ``ids[b·L : (b+1)·L]`` and targets shifted by one, ``L = (N − 1) // B``;
    an epoch is ``L // k1`` windows, after which the state starts again from zeros.
    """

    def __init__(self, ids: Tensor, batch_size: int, k1: int, k2: int):
        L = (len(ids) - 1) // batch_size
        if L < k1:
            raise ValueError(f"the stream ({len(ids)} tokens) is too short for {batch_size} rows of at least "
                             f"tbptt_k1 = {k1} steps")
        self.x = ids[: batch_size * L].view(batch_size, L)
        self.y = ids[1 : batch_size * L + 1].view(batch_size, L)
        self.k1, self.k2 = k1, k2
        self.steps_per_epoch = L // k1

    def __call__(self, step: int) -> Unit:
        j = step % self.steps_per_epoch
        T = self.steps_per_epoch * self.k1
        start, end, keep = _window(j, T, self.k1, self.k2)
        return Unit(self.x[:, start:end], self.y[:, end - self.k1 : end], None, j == 0, keep, self.k1)


def in_order(dataset: SequenceDataset, batch_size: int, limit: int = 0):
    """Batches of ``dataset`` in order (the first ``limit`` items when ``limit > 0``), for evaluation."""
    n = min(len(dataset), limit) if limit else len(dataset)
    for i in range(0, n, batch_size):
        yield collate([dataset[k] for k in range(i, min(i + batch_size, n))])
