"""``ucr:NAME``: the UCR/UEA time-series sets that ship inside the ``aeon`` package, never downloaded.

gatelab reads ``aeon/datasets/data/*/NAME_TRAIN.ts`` and ``NAME_TEST.ts`` with
``aeon.datasets.load_from_ts_file``; names that aeon would have to fetch from the network
(``aeon.datasets.load_classification``) are refused. In aeon 1.6 these are ACSF1, ArrowHead,
BasicMotions, Covid3Month_disc, GunPoint, ItalyPowerDemand, JapaneseVowels (and ``_eq``), OSULeaf,
PickupGestureWiimoteZ (and ``_eq``) and UnitTest, plus two regression sets from the TSER archive
(CardanoSentiment, Covid3Month), which load as ``kind == "regression"``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from . import _checks as check
from . import metrics as M
from .base import SequenceDataset, Task, fold_split, quiet_deprecations, require, stratified_split
from .digits import ClassificationTask

__all__ = ["UCRClassificationTask", "UCRRegressionTask", "shipped", "ucr_task"]

NORMALIZE = (None, "series", "train")


def _aeon_data_dir() -> Path | None:
    """aeon's shipped data folder, found without importing aeon (None when aeon is not installed)."""
    try:
        spec = importlib.util.find_spec("aeon")
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent / "datasets" / "data"


def shipped() -> list[str]:
    """Names of the train/test ``.ts`` sets inside the installed aeon (empty if aeon is absent)."""
    root = _aeon_data_dir()
    if root is None or not root.is_dir():
        return []
    names = []
    for train in root.glob("*/*_TRAIN.ts"):
        name = train.name.removesuffix("_TRAIN.ts")
        if (train.parent / f"{name}_TEST.ts").is_file():
            names.append(name)
    return sorted(names, key=str.lower)


def _check_folds(name: str, val_folds: int, fold: int) -> tuple[int, int]:
    task = f"ucr:{name}"
    val_folds, fold = check.integer(task, "val_folds", val_folds), check.integer(task, "fold", fold)
    if val_folds == 1:
        raise ValueError(f"{task}: val_folds must be 0 (one val_fraction split) or at least 2, got 1")
    if fold and not val_folds:
        raise ValueError(f"{task}: fold = {fold} needs val_folds (the number of folds)")
    if val_folds and not 0 <= fold < val_folds:
        raise ValueError(f"{task}: fold must be in 0..{val_folds - 1} (val_folds = {val_folds}), got {fold}")
    return val_folds, fold


def _check_args(name: str, val_fraction: float, normalize: str | None, seed: int) -> tuple[float, str | None, int]:
    """The options of a ``ucr:`` task, checked before any file is read."""
    task = f"ucr:{check.text('ucr', 'name', name)}"
    return (check.real(task, "val_fraction", val_fraction, 0.0, 1.0), check.choice(task, "normalize", normalize, NORMALIZE),
            check.integer(task, "seed", seed))


def _check_shaping(name: str, crop: Sequence[int] | None, pool: int) -> tuple[tuple[int, int] | None, int]:
    """``crop`` (None, or steps ``[start, stop)``) and ``pool`` (mean over every ``pool`` steps, >= 1)."""
    task = f"ucr:{name}"
    pool = check.integer(task, "pool", pool, 1)
    if crop is None:
        return None, pool
    if not isinstance(crop, (list, tuple)) or len(crop) != 2:
        raise TypeError(f"{task}: crop must be None or [start, stop] (steps), got {crop!r} ({type(crop).__name__})")
    start, stop = check.integer(task, "crop[0]", crop[0]), check.integer(task, "crop[1]", crop[1], 1)
    if start >= stop:
        raise ValueError(f"{task}: crop must be [start, stop] with start < stop, got {list(crop)!r}")
    return (start, stop), pool


def _shape(series: list[np.ndarray], crop: tuple[int, int] | None, pool: int, task: str) -> list[np.ndarray]:
    """Each ``(C, T_i)`` series cut to ``crop`` (within its own length) and mean-pooled over ``pool`` steps
    (a last partial group is the mean of what it has)."""
    out = []
    for s in series:
        if crop is not None:
            if crop[0] >= s.shape[1]:
                raise ValueError(f"{task}: crop starts at step {crop[0]}, but a series has only {s.shape[1]} steps")
            s = s[:, crop[0]:crop[1]]
        if pool > 1:
            T = s.shape[1]
            groups = [s[:, k:k + pool].mean(axis=1) for k in range(0, T, pool)]
            s = np.stack(groups, axis=1)
        out.append(s)
    return out


def _files(name: str) -> tuple[str, Path, Path]:
    require("aeon.datasets", f"the task 'ucr:{name}'")
    by_lower = {n.lower(): n for n in shipped()}
    if name.lower() not in by_lower:
        raise ValueError(
            f"UCR/UEA set {name!r} is not shipped inside the installed aeon package, and gatelab never downloads "
            f"data; shipped sets: {', '.join(by_lower.values())}"
        )
    name = by_lower[name.lower()]
    root = _aeon_data_dir()
    assert root is not None
    (train,) = root.glob(f"*/{name}_TRAIN.ts")
    return name, train, train.with_name(f"{name}_TEST.ts")


@lru_cache(maxsize=32)
def _load(path: Path) -> tuple[tuple[np.ndarray, ...], np.ndarray, dict]:
    """One ``.ts`` file as (series ``(C, T_i)`` each, targets, aeon's metadata)."""
    datasets = require("aeon.datasets", "the ucr tasks")
    with quiet_deprecations():
        X, y, meta = datasets.load_from_ts_file(str(path), return_meta_data=True)
    return tuple(np.asarray(s, dtype=np.float64) for s in X), np.asarray(y), meta


def _label_order(labels: np.ndarray) -> list[str]:
    """Classes in numeric order when every label is a number, else in string order."""
    classes = sorted({str(v) for v in labels})
    try:
        return sorted(classes, key=float)
    except ValueError:
        return classes


def _normalize(series: list[np.ndarray], mode: str | None, train_idx: np.ndarray) -> list[np.ndarray]:
    """z-normalise every series ``(C, T_i)`` per channel ("series") or with train-split channel statistics."""
    if mode is None:
        return series
    if mode == "series":
        out = []
        for s in series:
            std = s.std(axis=1, keepdims=True)
            out.append((s - s.mean(axis=1, keepdims=True)) / np.where(std > 0, std, 1.0))
        return out
    steps = np.concatenate([series[i] for i in train_idx], axis=1)  # (C, sum T_i)
    mean, std = steps.mean(axis=1, keepdims=True), steps.std(axis=1, keepdims=True)
    return [(s - mean) / np.where(std > 0, std, 1.0) for s in series]


class _UCRMixin:
    """Shared loading for both kinds: official train/test files, validation drawn from train only."""

    def _load_sets(self, name: str, val_fraction: float, normalize: str | None, seed: int,
                   crop: Sequence[int] | None = None, pool: int = 1, val_folds: int = 0, fold: int = 0) -> None:
        val_fraction, normalize, seed = _check_args(name, val_fraction, normalize, seed)
        self.val_folds, self.fold = _check_folds(name, val_folds, fold)
        self.crop, self.pool = _check_shaping(name, crop, pool)
        self.dataset, train_path, test_path = _files(name)
        self.name = f"ucr:{self.dataset}"
        self.val_fraction, self.normalize, self.seed = val_fraction, normalize, seed
        X_train, self._y_train, self.meta = _load(train_path)
        X_test, self._y_test, _ = _load(test_path)
        self._series = list(X_train) + list(X_test)
        self._n_official_train = len(X_train)
        if self.val_folds > self._n_official_train:
            raise ValueError(f"{self.name}: val_folds = {self.val_folds} is more than the {self._n_official_train} "
                             f"training series")
        self.input_size = int(X_train[0].shape[0])
        self.equal_length = len({s.shape[1] for s in self._series}) == 1

    def _validation(self, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(train, val) indices into the official training set: a stratified ``val_fraction``, or with
        ``val_folds = k`` the ``fold``-th of k stratified folds."""
        if self.val_folds:
            try:
                return fold_split(labels, self.val_folds, self.fold, self.seed)
            except ValueError as err:
                raise ValueError(f"{self.name}: {err}") from None
        return stratified_split(labels, self.val_fraction, self.seed)

    def _datasets(self, y: Tensor, keep: np.ndarray, val: np.ndarray) -> dict[str, SequenceDataset]:
        series = _shape(_normalize(self._series, self.normalize, keep), self.crop, self.pool, self.name)
        xs = [torch.from_numpy(s.T.astype(np.float32)) for s in series]  # (T_i, C)
        test = np.arange(self._n_official_train, len(xs))
        return {
            split: SequenceDataset([xs[i] for i in idx], y[torch.from_numpy(idx)])
            for split, idx in (("train", keep), ("val", val), ("test", test))
        }


class UCRClassificationTask(_UCRMixin, ClassificationTask):
    """A UCR/UEA classification set shipped in aeon; labels mapped to ``0 .. k-1`` (see ``classes``).

    ``x`` is ``(T_i, channels)``; unequal-length sets keep their lengths (batch them with
    :func:`gatelab.tasks.collate`). ``val_fraction`` of the official training set, stratified and
    drawn with ``seed``, becomes the validation split (or, with ``val_folds = k``, fold ``fold`` of k
    stratified disjoint folds: :func:`gatelab.cross_validate` runs every fold and reports the mean and
    spread); the official test set is the test split. ``normalize``: None (as shipped), ``"series"``
    (z-normalise each series per channel) or ``"train"`` (per-channel mean and std of the training
    split). Then, for long series: ``crop`` keeps steps ``[start, stop)`` and ``pool`` averages every
    ``pool`` steps (a 1500-step series with ``pool=10`` runs 150 steps).
    """

    def __init__(self, name: str, val_fraction: float = 0.2, normalize: str | None = None, seed: int = 0,
                 crop: Sequence[int] | None = None, pool: int = 1, val_folds: int = 0, fold: int = 0) -> None:
        ClassificationTask.__init__(self)
        self._load_sets(name, val_fraction, normalize, seed, crop, pool, val_folds, fold)
        self.classes = _label_order(self._y_train)
        unknown = {str(v) for v in self._y_test} - set(self.classes)
        if unknown:
            raise ValueError(f"{self.name}: test labels {sorted(unknown)} do not occur in the training set")
        self.output_size = len(self.classes)

    def _build(self) -> dict[str, SequenceDataset]:
        index = {c: k for k, c in enumerate(self.classes)}
        labels = np.array([index[str(v)] for v in np.concatenate([self._y_train, self._y_test])], dtype=np.int64)
        keep, val = self._validation(labels[: self._n_official_train])
        return self._datasets(torch.from_numpy(labels), keep, val)


class UCRRegressionTask(_UCRMixin, Task):
    """A time-series extrinsic regression set shipped in aeon (target ``(1,)``; metric RMSE).

    Validation is a random ``val_fraction`` of the training set (seeded); the trivial baseline
    predicts the training-split mean.
    """

    kind = "regression"
    output_size = 1
    metrics = ("rmse", "mse")
    primary_baseline = "predict_mean"

    def __init__(self, name: str, val_fraction: float = 0.2, normalize: str | None = None, seed: int = 0,
                 crop: Sequence[int] | None = None, pool: int = 1, val_folds: int = 0, fold: int = 0) -> None:
        Task.__init__(self)
        self._load_sets(name, val_fraction, normalize, seed, crop, pool, val_folds, fold)

    def _build(self) -> dict[str, SequenceDataset]:
        y = np.concatenate([self._y_train, self._y_test]).astype(np.float32)[:, None]  # (N, 1)
        keep, val = self._validation(np.zeros(self._n_official_train))
        return self._datasets(torch.from_numpy(y), keep, val)

    def _targets(self, split: str) -> Tensor:
        return self.split(split).ys

    def baselines(self, split: str = "test") -> dict[str, dict[str, float]]:
        y = self._targets(split)
        return {"predict_mean": self.evaluate(torch.full_like(y, float(self._targets("train").mean())), split)}

    def evaluate(self, predictions: Tensor, split: str) -> dict[str, float]:
        y = self._targets(split)
        return {"rmse": M.rmse(y, predictions), "mse": M.mse(y, predictions)}


def ucr_task(name: str, val_fraction: float = 0.2, normalize: str | None = None, seed: int = 0,
             crop: Sequence[int] | None = None, pool: int = 1, val_folds: int = 0, fold: int = 0) -> Task:
    """``ucr:NAME``: a classification or regression task, whichever the shipped ``.ts`` file declares
    (the options are those of both classes)."""
    _check_args(name, val_fraction, normalize, seed)
    _check_shaping(name, crop, pool)
    _check_folds(name, val_folds, fold)
    _, train_path, _ = _files(name)
    _, _, meta = _load(train_path)
    cls = UCRClassificationTask if meta.get("classlabel", True) else UCRRegressionTask
    return cls(name, val_fraction=val_fraction, normalize=normalize, seed=seed, crop=crop, pool=pool,
               val_folds=val_folds, fold=fold)
