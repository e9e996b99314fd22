"""The task contract, the datasets tasks hand out, batching with lengths, and shared helpers.

A :class:`Task` knows its kind, its sizes, how to build ``(train, val, test)`` datasets of ``(x, y)``
pairs with ``x`` of shape ``(T, input_size)`` (``T`` may differ between items), its metrics, how to
score predictions against a split, and the trivial baselines it must be compared with.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence
from torch.utils.data import Dataset

__all__ = [
    "Task",
    "Batch",
    "collate",
    "SequenceDataset",
    "MissingExtraError",
    "require",
    "quiet_deprecations",
    "data_dir",
    "split_rng",
    "stratified_split",
    "SPLITS",
    "KINDS",
]

SPLITS = ("train", "val", "test")
KINDS = ("classification", "regression", "forecast", "lm")
IGNORE_INDEX = -100  # what torch.nn.functional.cross_entropy ignores by default
EXTRA_HINT = "pip install 'gatelab[data]'"


class MissingExtraError(ImportError):
    """A loader needs a package of gatelab's ``data`` extra that is not installed."""


def require(module: str, purpose: str) -> ModuleType:
    """Import ``module`` for ``purpose``; if it is missing, raise :class:`MissingExtraError` naming the extra."""
    try:
        with quiet_deprecations():
            return importlib.import_module(module)
    except ImportError as err:
        package = module.split(".")[0]
        raise MissingExtraError(
            f"{purpose} needs the '{package}' package, part of gatelab's data extra: {EXTRA_HINT}"
        ) from err


@contextlib.contextmanager
def quiet_deprecations() -> Iterator[None]:
    """Silence deprecation warnings raised *inside* a data package's loader (e.g. statsmodels passing a
    pandas argument that pandas deprecates): they are not the caller's to act on, and tests turn
    warnings into errors."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        yield


def data_dir() -> Path:
    """gatelab's data cache: ``$GATELAB_DATA``, else ``$XDG_CACHE_HOME/gatelab``, else ``~/.cache/gatelab``."""
    if os.environ.get("GATELAB_DATA"):
        return Path(os.environ["GATELAB_DATA"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache).expanduser() / "gatelab"


def split_rng(seed: int, split: str) -> np.random.Generator:
    """An independent, reproducible generator per ``(seed, split)``."""
    return np.random.default_rng([seed, SPLITS.index(split)])


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into ``(keep, held_out)``, holding out ``round(fraction * n_c)`` of every class.

    Every class keeps at least one item. Both index arrays are sorted; the split depends only on
    ``labels``, ``fraction`` and ``seed``.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    held: list[np.ndarray] = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        n_val = min(int(round(fraction * len(idx))), len(idx) - 1)
        held.append(rng.permutation(idx)[:n_val])
    held_out = np.sort(np.concatenate(held)) if held else np.zeros(0, dtype=np.int64)
    keep = np.setdiff1d(np.arange(len(labels)), held_out)
    return keep, held_out


def stratified_folds(labels: np.ndarray, k: int, seed: int) -> list[np.ndarray]:
    """``k`` disjoint index arrays that together cover ``range(len(labels))``, each holding about
    ``1/k`` of every class (a class's items, shuffled with ``seed``, are dealt to the folds in turn,
    the deal continuing across classes so that fold sizes differ by at most one). Sorted arrays."""
    if k < 2 or k > len(labels):
        raise ValueError(f"val_folds must be in 2..{len(labels)} (the training items), got {k}")
    values, counts = np.unique(labels, return_counts=True)
    if len(values) > 1 and (counts == 1).any():
        raise ValueError(f"class {values[counts == 1][0]} has a single item: the fold holding it would train without "
                         f"that class; use val_fraction, which keeps every class in training")
    rng = np.random.default_rng(seed)
    folds: list[list[int]] = [[] for _ in range(k)]
    dealt = 0
    for c in np.unique(labels):
        for i in rng.permutation(np.flatnonzero(labels == c)):
            folds[dealt % k].append(int(i))
            dealt += 1
    return [np.sort(np.array(f, dtype=np.int64)) for f in folds]


def fold_split(labels: np.ndarray, k: int, fold: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(keep, held_out)`` for fold ``fold`` of :func:`stratified_folds`: that fold is held out."""
    if not 0 <= fold < k:
        raise ValueError(f"fold must be in 0..{k - 1} (val_folds = {k}), got {fold}")
    held_out = stratified_folds(labels, k, seed)[fold]
    return np.setdiff1d(np.arange(len(labels)), held_out), held_out


class SequenceDataset(Dataset):
    """``(x, y)`` pairs held as lists of tensors; ``x`` is ``(T_i, input_size)``, ``T_i`` may vary.

    ``transform`` (optional) maps a stored ``x`` to the one returned, e.g. symbol ids to one-hot rows,
    so that large one-hot inputs are never materialised for a whole split.
    """

    def __init__(
        self,
        xs: Sequence[Tensor] | Tensor,
        ys: Sequence[Tensor] | Tensor,
        transform: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        if len(xs) != len(ys):
            raise ValueError(f"{len(xs)} inputs but {len(ys)} targets")
        self.xs = xs
        self.ys = ys
        self.transform = transform

    def __len__(self) -> int:
        return len(self.xs)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        x = self.xs[i]
        return (self.transform(x) if self.transform is not None else x), self.ys[i]

    def lengths(self) -> list[int]:
        """Length ``T_i`` of every item, in order."""
        return [int(x.shape[0]) for x in self.xs]


class Batch(NamedTuple):
    """A padded batch and the true lengths; padded steps are never data and must be masked or packed.

    ``x``: ``(B, T_max, input_size)`` if ``batch_first`` else ``(T_max, B, input_size)``, zero past each
    length. ``y``: stacked targets, or padded with ``-100`` (integer) / ``0`` (float) where targets are
    per step and lengths differ. ``lengths``: ``(B,)`` int64 on the CPU, as ``pack_padded_sequence`` wants.
    """

    x: Tensor
    y: Tensor
    lengths: Tensor
    batch_first: bool = True

    def packed(self) -> PackedSequence:
        """``x`` as a :class:`PackedSequence` (unsorted lengths are fine)."""
        return pack_padded_sequence(self.x, self.lengths, batch_first=self.batch_first, enforce_sorted=False)

    def mask(self) -> Tensor:
        """``(B, T_max)`` (or ``(T_max, B)``) bool, True on real steps."""
        steps = torch.arange(self.x.shape[1 if self.batch_first else 0])
        m = steps[None, :] < self.lengths[:, None]  # (B, T_max)
        return m if self.batch_first else m.T


def collate(items: Sequence[tuple[Tensor, Tensor]], batch_first: bool = True) -> Batch:
    """Batch ``(x, y)`` items of possibly different lengths; use as ``DataLoader(..., collate_fn=collate)``.

    Returns a :class:`Batch` ``(x, y, lengths)``. Per-step integer targets of different lengths are
    padded with ``-100``, which ``F.cross_entropy`` ignores.
    """
    xs = [x for x, _ in items]
    ys = [y for _, y in items]
    lengths = torch.tensor([x.shape[0] for x in xs], dtype=torch.int64)
    x = torch.nn.utils.rnn.pad_sequence(xs, batch_first=batch_first)  # (B, T_max, I) or (T_max, B, I)
    if all(y.shape == ys[0].shape for y in ys):
        y = torch.stack(ys)
    else:
        pad = IGNORE_INDEX if not ys[0].is_floating_point() else 0.0
        y = torch.nn.utils.rnn.pad_sequence(ys, batch_first=True, padding_value=pad)  # (B, T_max, ...)
        if not batch_first:
            y = y.transpose(0, 1)
    return Batch(x, y, lengths, batch_first)


class Task:
    """A supervised sequence task: datasets, metrics and trivial baselines.

    Subclasses set ``name``, ``kind`` (one of ``KINDS``), ``input_size``, ``output_size``,
    ``metrics`` (names of the keys :meth:`evaluate` returns; the first is the headline),
    ``per_step`` (True when there is a target at every step, False when one target per sequence,
    read from the output at the last real step) and ``primary_baseline``, and implement
    :meth:`_build`, :meth:`baselines` and :meth:`evaluate`.
    """

    name: str
    kind: str
    input_size: int
    output_size: int
    metrics: tuple[str, ...]
    per_step: bool = False
    primary_baseline: str

    def __init__(self) -> None:
        self._splits: dict[str, SequenceDataset] | None = None

    def _build(self) -> dict[str, SequenceDataset]:
        raise NotImplementedError

    def splits(self) -> tuple[SequenceDataset, SequenceDataset, SequenceDataset]:
        """``(train, val, test)`` datasets of ``(x, y)``; built once, then cached."""
        if self._splits is None:
            self._splits = self._build()
        return self._splits["train"], self._splits["val"], self._splits["test"]

    def split(self, split: str) -> SequenceDataset:
        """One of the datasets by name: ``"train"``, ``"val"`` or ``"test"``."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        return dict(zip(SPLITS, self.splits()))[split]

    def baselines(self, split: str = "test") -> dict[str, dict[str, float]]:
        """Every trivial baseline of the task on ``split``: ``{baseline name: {metric: value}}``."""
        raise NotImplementedError

    def baseline(self, split: str = "test", which: str | None = None) -> dict[str, float]:
        """The trivial baseline per metric on ``split`` (``which`` picks one of :meth:`baselines`)."""
        all_ = self.baselines(split)
        which = which or self.primary_baseline
        if which not in all_:
            raise ValueError(f"unknown baseline {which!r} for task {self.name!r}; expected one of {list(all_)}")
        return all_[which]

    def evaluate(self, predictions: Any, split: str) -> dict[str, float]:
        """Score model outputs for every item of ``split`` (in dataset order) on :attr:`metrics`."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, kind={self.kind!r}, input_size={self.input_size}, "
            f"output_size={self.output_size})"
        )
