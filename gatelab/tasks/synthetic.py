"""Long-range synthetic tasks: ``adding`` (Le 2015 / Arjovsky 2016), ``adding_1997`` (Hochreiter &
Schmidhuber 1997) and ``copy`` (Arjovsky 2016).

Every split is drawn from its own generator seeded by ``(seed, split)``, so a task is a pure function
of its arguments: the same ``seed`` gives bit-identical data, and growing ``n_train`` leaves val and
test unchanged.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from . import _checks as check
from . import metrics as M
from .base import SPLITS, SequenceDataset, Task, split_rng

__all__ = ["AddingTask", "Adding1997Task", "CopyTask"]


def _sizes(task: str, n_train: int, n_val: int, n_test: int) -> dict[str, int]:
    """The split sizes, checked: a model needs at least one training item; val and test may be empty
    (the trainer then skips them)."""
    sizes = (check.integer(task, "n_train", n_train, 1), check.integer(task, "n_val", n_val),
             check.integer(task, "n_test", n_test))
    return dict(zip(SPLITS, sizes))


def _targets(ds: SequenceDataset) -> Tensor:
    return torch.as_tensor(ds.ys) if isinstance(ds.ys, Tensor) else torch.stack(list(ds.ys))


class AddingTask(Task):
    """The adding problem as in Le et al. 2015 and Arjovsky et al. 2016.

    ``x`` is ``(T, 2)``: channel 0 holds values ~ U[0, 1]; channel 1 is 0 except for two markers of 1,
    the first at a uniform step in ``[0, T//2)``, the second in ``[T//2, T)``. The target ``y`` (shape
    ``(1,)``) is the sum of the two marked values, read from the output at the last step; the loss and
    metric are MSE. Predicting 1 always scores Var(X1 + X2) = 2/12 = 1/6.
    """

    kind = "regression"
    input_size = 2
    output_size = 1
    metrics = ("mse",)
    primary_baseline = "predict_one"

    def __init__(
        self, length: int = 100, n_train: int = 10_000, n_val: int = 1_000, n_test: int = 1_000, seed: int = 0
    ) -> None:
        super().__init__()
        self.name = "adding"
        self.length = check.integer(self.name, "length", length, 2)  # one marker in each half
        self.sizes = _sizes(self.name, n_train, n_val, n_test)
        self.seed = check.integer(self.name, "seed", seed)

    def _generate(self, n: int, rng: np.random.Generator) -> SequenceDataset:
        T = self.length
        values = rng.random((n, T))
        first = rng.integers(0, T // 2, size=n)
        second = rng.integers(T // 2, T, size=n)
        rows = np.arange(n)
        markers = np.zeros((n, T))
        markers[rows, first] = 1.0
        markers[rows, second] = 1.0
        y = values[rows, first] + values[rows, second]
        x = torch.from_numpy(np.stack([values, markers], axis=-1).astype(np.float32))  # (n, T, 2)
        return SequenceDataset(x, torch.from_numpy(y.astype(np.float32))[:, None])  # y: (n, 1)

    def _build(self) -> dict[str, SequenceDataset]:
        return {s: self._generate(n, split_rng(self.seed, s)) for s, n in self.sizes.items()}

    def baselines(self, split: str = "test") -> dict[str, dict[str, float]]:
        y = _targets(self.split(split))
        return {"predict_one": {"mse": M.mse(y, torch.ones_like(y))}}

    def evaluate(self, predictions: Tensor, split: str) -> dict[str, float]:
        return {"mse": M.mse(_targets(self.split(split)), predictions)}


class Adding1997Task(Task):
    """The adding problem of Hochreiter & Schmidhuber 1997, section 5.4 (experiment 4).

    As the paper defines it, for a minimal length ``T``:

    * each sequence has a length drawn uniformly from ``T .. T + T//10`` (so lengths vary);
    * ``x`` is ``(L, 2)``: channel 0 ~ U[-1, 1]; channel 1 is a marker, 0 except -1 at the first and
      the last step;
    * one of the first ten steps is marked (marker 1.0; its value is X1), then one of the first
      ``T//2 - 1`` still unmarked steps (X2): we read "the first T/2 - 1 still unmarked pairs" as the
      first ``T//2 - 1`` step indices other than X1's;
    * if the first step is marked its value is set to 0 (the paper's "rare case");
    * the target (shape ``(1,)``) is ``0.5 + (X1 + X2) / 4``, read at the sequence end; a sequence
      counts as correct when the absolute error is below 0.04.

    Metrics: ``accuracy`` (share correct) and ``mse``. The paper's LSTM has 1 of 2560 test sequences
    wrong at T = 100. The trivial baseline predicts the mean 0.5: MSE ≈ 1/24, accuracy ≈ 0.154.
    """

    kind = "regression"
    input_size = 2
    output_size = 1
    metrics = ("accuracy", "mse")
    primary_baseline = "predict_mean"
    tolerance = 0.04

    def __init__(
        self, length: int = 100, n_train: int = 10_000, n_val: int = 1_000, n_test: int = 2_560, seed: int = 0
    ) -> None:
        super().__init__()
        self.name = "adding_1997"
        self.length = check.integer(self.name, "length", length, 10)  # X1 is one of the first ten steps
        self.sizes = _sizes(self.name, n_train, n_val, n_test)
        self.seed = check.integer(self.name, "seed", seed)

    def _generate(self, n: int, rng: np.random.Generator) -> SequenceDataset:
        T = self.length
        lengths = rng.integers(T, T + T // 10 + 1, size=n)
        first = rng.integers(0, 10, size=n)
        second = rng.integers(0, T // 2 - 1, size=n)
        second = second + (second >= first)  # skip X1's step: uniform over the first T//2 - 1 others
        xs, ys = [], torch.empty(n, 1)
        for k in range(n):
            L = int(lengths[k])
            values = rng.uniform(-1.0, 1.0, size=L)
            markers = np.zeros(L)
            markers[0] = markers[L - 1] = -1.0
            markers[first[k]] = markers[second[k]] = 1.0
            if markers[0] == 1.0:
                values[0] = 0.0
            ys[k, 0] = 0.5 + (values[first[k]] + values[second[k]]) / 4.0
            xs.append(torch.from_numpy(np.stack([values, markers], axis=-1).astype(np.float32)))  # (L, 2)
        return SequenceDataset(xs, ys)

    def _build(self) -> dict[str, SequenceDataset]:
        return {s: self._generate(n, split_rng(self.seed, s)) for s, n in self.sizes.items()}

    def _scores(self, y: Tensor, pred: Tensor) -> dict[str, float]:
        pred = torch.as_tensor(pred, dtype=torch.float64).reshape(y.shape)
        correct = (pred - y.double()).abs() < self.tolerance
        return {"accuracy": float(correct.double().mean()), "mse": M.mse(y, pred)}

    def baselines(self, split: str = "test") -> dict[str, dict[str, float]]:
        y = _targets(self.split(split))
        return {"predict_mean": self._scores(y, torch.full_like(y, 0.5))}

    def evaluate(self, predictions: Tensor, split: str) -> dict[str, float]:
        return self._scores(_targets(self.split(split)), predictions)


class CopyTask(Task):
    """The copy memory task of Arjovsky et al. 2016.

    Alphabet of 10: symbols 0..7, blank 8, delimiter 9. The input (length ``T + 20``, one-hot, so
    ``x`` is ``(T + 20, 10)``) is 10 symbols drawn uniformly from 0..7, ``T - 1`` blanks, the
    delimiter, then 10 blanks. The target ``y`` (``(T + 20,)`` int64) is ``T + 10`` blanks, then the
    10 symbols. Loss and metric: cross-entropy over all ``T + 20`` steps (nats).

    The memoryless baseline predicts blank for the first ``T + 10`` steps and a uniform symbol for the
    last 10: ``10 ln 8 / (T + 20)`` (0.17329 at T = 100).
    """

    kind = "classification"
    per_step = True
    input_size = 10
    output_size = 10
    metrics = ("cross_entropy",)
    primary_baseline = "memoryless"
    n_symbols, blank, delimiter, copy_length = 8, 8, 9, 10

    def __init__(
        self, length: int = 100, n_train: int = 10_000, n_val: int = 1_000, n_test: int = 1_000, seed: int = 0
    ) -> None:
        super().__init__()
        self.name = "copy"
        self.length = check.integer(self.name, "length", length, 1)
        self.sizes = _sizes(self.name, n_train, n_val, n_test)
        self.seed = check.integer(self.name, "seed", seed)

    def _generate(self, n: int, rng: np.random.Generator) -> SequenceDataset:
        T, K = self.length, self.copy_length
        symbols = rng.integers(0, self.n_symbols, size=(n, K))
        x = np.full((n, T + 2 * K), self.blank, dtype=np.int64)
        x[:, :K] = symbols
        x[:, T + K - 1] = self.delimiter
        y = np.full((n, T + 2 * K), self.blank, dtype=np.int64)
        y[:, T + K :] = symbols
        return SequenceDataset(torch.from_numpy(x), torch.from_numpy(y), transform=self.one_hot)

    def one_hot(self, ids: Tensor) -> Tensor:
        """Symbol ids ``(T,)`` to the input rows ``(T, 10)`` float32."""
        return F.one_hot(ids, self.input_size).float()

    def _build(self) -> dict[str, SequenceDataset]:
        return {s: self._generate(n, split_rng(self.seed, s)) for s, n in self.sizes.items()}

    def baselines(self, split: str = "test") -> dict[str, dict[str, float]]:
        y = _targets(self.split(split))
        # memoryless: p(blank) = 1 where the target is blank (loss 0), uniform over 8 symbols elsewhere
        n_symbol_steps = int((y != self.blank).sum())
        return {"memoryless": {"cross_entropy": n_symbol_steps * math.log(self.n_symbols) / y.numel()}}

    def evaluate(self, predictions: Tensor, split: str) -> dict[str, float]:
        """``predictions``: logits ``(N, T + 20, C)`` for the items of ``split``."""
        return {"cross_entropy": M.cross_entropy(_targets(self.split(split)), predictions)}
