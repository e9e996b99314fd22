"""A task from your own datasets: :func:`from_datasets`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from . import metrics as M
from .base import SequenceDataset, Task
from .digits import ClassificationTask

KINDS = ("classification", "regression")


def _as_sequences(data: Dataset | Sequence[Any] | None, split: str, name: str) -> SequenceDataset:
    """``data``'s ``(x, y)`` items as a new :class:`SequenceDataset` (``data`` itself is never changed);
    ``x`` becomes a ``(T, input_size)`` tensor of torch's default float dtype, ``y`` a tensor, every ``y``
    of one shape. ``None`` or an empty sequence: an empty split."""
    if data is None:
        return SequenceDataset([], torch.zeros(0))
    try:
        n = len(data)
    except TypeError:
        raise TypeError(f"{name}: {split} must be a dataset with len() of (x, y) pairs, got "
                        f"{type(data).__name__}") from None
    xs, ys = [], []
    for i in range(n):
        item = data[i]
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise TypeError(f"{name}: {split}[{i}] must be an (x, y) pair, got {type(item).__name__}")
        try:
            x, y = torch.as_tensor(item[0]), torch.as_tensor(item[1])
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(f"{name}: {split}[{i}]: x and y must be numbers or tensors ({err})") from None
        if x.dim() != 2 or x.shape[0] == 0 or x.is_complex() or x.dtype == torch.bool:
            raise ValueError(f"{name}: {split}[{i}]: x must be a (T, input_size) array of numbers with T >= 1, "
                             f"got {x.dtype} of shape {tuple(x.shape)}")
        if ys and y.shape != ys[0].shape:
            raise ValueError(f"{name}: {split}[{i}]: y has shape {tuple(y.shape)}, {split}[0]'s has "
                             f"{tuple(ys[0].shape)}: every target must have one shape")
        xs.append(x.to(torch.get_default_dtype()))
        ys.append(y)
    return SequenceDataset(xs, torch.stack(ys) if ys else torch.zeros(0))


class _UserClassification(ClassificationTask):
    def __init__(self, name: str, splits: dict[str, SequenceDataset], classes: int) -> None:
        super().__init__()
        self.name, self._splits, self.output_size = name, splits, classes


class _UserRegression(Task):
    kind = "regression"
    metrics = ("rmse", "mse", "mae")
    primary_baseline = "predict_mean"

    def __init__(self, name: str, splits: dict[str, SequenceDataset], outputs: int) -> None:
        super().__init__()
        self.name, self._splits, self.output_size = name, splits, outputs

    def _targets(self, split: str) -> Tensor:
        return self.split(split).ys.reshape(len(self.split(split)), -1).float()

    def baselines(self, split: str = "test") -> dict[str, dict[str, float]]:
        y = self._targets(split)
        mean = self._targets("train").mean(0, keepdim=True).expand_as(y)
        return {"predict_mean": self.evaluate(mean, split)}

    def evaluate(self, predictions: Tensor, split: str) -> dict[str, float]:
        y = self._targets(split)
        predictions = predictions.reshape(y.shape)
        return {"rmse": M.rmse(y, predictions), "mse": M.mse(y, predictions), "mae": M.mae(y, predictions)}


def from_datasets(train: Dataset | Sequence[Any], val: Dataset | Sequence[Any], test: Dataset | Sequence[Any] | None
                  = None, *, kind: str = "classification", classes: int | None = None, name: str = "data") -> Task:
    """A task of your own data for :func:`gatelab.fit`: datasets (anything with ``len`` and ``[i]``) of
    ``(x, y)`` pairs, ``x`` a float ``(T_i, input_size)`` sequence (lengths may differ: batches are
    padded and carry their lengths), ``y`` a class index (``kind="classification"``; ``classes``
    defaults to the largest label + 1) or a target vector (``"regression"``: metrics RMSE, MSE, MAE).
    ``test`` may be omitted (then nothing is scored on test). Baselines: the training split's
    majority class, or its mean target."""
    if kind not in KINDS:
        raise ValueError(f"{name}: kind must be one of {', '.join(KINDS)}, got {kind!r}")
    splits = {split: _as_sequences(data, split, name) for split, data in (("train", train), ("val", val),
                                                                          ("test", test))}
    if not len(splits["train"]):
        raise ValueError(f"{name}: train is empty")
    sizes = {int(x.shape[1]) for s in splits.values() for x in s.xs}
    if len(sizes) != 1:
        raise ValueError(f"{name}: every x must have the same number of features, got {sorted(sizes)}")
    shape = tuple(splits["train"].ys.shape[1:])
    for split, data in splits.items():
        if len(data) and tuple(data.ys.shape[1:]) != shape:
            raise ValueError(f"{name}: {split}'s targets have shape {tuple(data.ys.shape[1:])}, train's {shape}")
    if kind == "classification":
        labels = torch.cat([s.ys.reshape(-1) for s in splits.values() if len(s)])
        if labels.is_floating_point() or labels.numel() != sum(len(s) for s in splits.values()):
            raise ValueError(f"{name}: classification targets must be one integer class index per sequence")
        if int(labels.min()) < 0:
            raise ValueError(f"{name}: class indices must be >= 0, got {int(labels.min())}")
        n = classes if classes is not None else int(labels.max()) + 1
        if int(labels.max()) >= n:
            raise ValueError(f"{name}: classes={n}, but a label is {int(labels.max())}")
        for s in splits.values():
            s.ys = s.ys.reshape(-1).long()  # our own copies (_as_sequences)
        task: Task = _UserClassification(name, splits, n)
    else:
        outputs = int(splits["train"].ys[0].numel())
        for s in splits.values():
            s.ys = s.ys.reshape(len(s), outputs).to(torch.get_default_dtype())
        task = _UserRegression(name, splits, outputs)
    task.input_size = sizes.pop()
    return task


__all__ = ["from_datasets"]
