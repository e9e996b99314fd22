"""``digits``: scikit-learn's 8×8 handwritten digits (1797 images, shipped inside scikit-learn) as sequences."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from . import _checks as check
from . import metrics as M
from .base import SequenceDataset, Task, quiet_deprecations, require, stratified_split

__all__ = ["ClassificationTask", "DigitsTask"]


class ClassificationTask(Task):
    """One label per sequence, read from the output at the last real step; metric accuracy.

    Subclasses fill ``self._splits`` (or implement ``_build``) with datasets whose targets are 0-d
    int64 labels in ``0 .. output_size - 1``. The trivial baseline predicts the most frequent class
    of the training split.
    """

    kind = "classification"
    metrics = ("accuracy",)
    primary_baseline = "majority"

    def labels(self, split: str) -> Tensor:
        """The labels of ``split`` as a ``(N,)`` int64 tensor."""
        ys = self.split(split).ys
        if isinstance(ys, Tensor):
            return ys
        return torch.stack(list(ys)) if len(ys) else torch.zeros(0, dtype=torch.int64)

    def majority_class(self) -> int:
        counts = torch.bincount(self.labels("train"), minlength=self.output_size)
        return int(counts.argmax())  # ties: the smallest label

    def baselines(self, split: str = "test") -> dict[str, dict[str, float]]:
        y = self.labels(split)
        return {"majority": {"accuracy": M.accuracy(y, torch.full_like(y, self.majority_class()))}}

    def evaluate(self, predictions: Tensor, split: str) -> dict[str, float]:
        """``predictions``: labels ``(N,)`` or class scores ``(N, C)``."""
        return {"accuracy": M.accuracy(self.labels(split), predictions)}


class DigitsTask(ClassificationTask):
    """scikit-learn ``load_digits`` as a sequence classification task (10 classes).

    ``mode="rows"``: each image is 8 steps of 8 pixels, ``x`` is ``(8, 8)``; ``mode="pixels"``: 64
    steps of one pixel, ``x`` is ``(64, 1)`` (row-major). Pixels are scaled from 0..16 to [0, 1].
    The first half of the data set (898 images) is the training data and the second half (899) the
    test split, as in scikit-learn's digits example (SVC 0.9689); ``val_fraction`` of the training
    half, stratified and drawn with ``seed``, is the validation split.
    """

    output_size = 10

    def __init__(self, mode: str = "rows", val_fraction: float = 0.1, seed: int = 0) -> None:
        super().__init__()
        self.name = "digits"
        self.mode = check.choice(self.name, "mode", mode, ("rows", "pixels"))
        self.val_fraction = check.real(self.name, "val_fraction", val_fraction, 0.0, 1.0)
        self.seed = check.integer(self.name, "seed", seed)
        self.input_size = 8 if mode == "rows" else 1
        self._datasets = require("sklearn.datasets", "the digits task")

    def _build(self) -> dict[str, SequenceDataset]:
        with quiet_deprecations():
            images, labels = self._datasets.load_digits(return_X_y=True)
        x = torch.from_numpy((images / 16.0).astype(np.float32)).reshape(len(images), -1, self.input_size)
        y = torch.from_numpy(labels.astype(np.int64))
        n_train = len(images) // 2
        keep, val = stratified_split(labels[:n_train], self.val_fraction, self.seed)
        test = np.arange(n_train, len(images))
        parts = (("train", keep), ("val", val), ("test", test))
        return {s: SequenceDataset(x[torch.from_numpy(idx)], y[torch.from_numpy(idx)]) for s, idx in parts}
