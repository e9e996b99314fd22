"""Metric functions shared by the tasks, their baselines and (later) the trainer.

All take tensors or arrays and return a Python float. Definitions:

* ``mse`` = mean (y - ŷ)²; ``rmse`` = √mse; ``mae`` = mean |y - ŷ|;
* ``smape`` = 100 · mean 2|y - ŷ| / (|y| + |ŷ|) (percent, the M4 form; a term with y = ŷ = 0 counts 0);
* ``accuracy`` = share of exact label matches; predictions may be labels ``(N,)`` or scores ``(N, C)``;
* ``cross_entropy`` = mean −ln p(target) in nats over every target not equal to ``-100``;
* ``bits_per_char`` = ``cross_entropy / ln 2``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["mse", "rmse", "mae", "smape", "accuracy", "cross_entropy", "bits_per_char"]

ArrayLike = Tensor | np.ndarray


def _f64(a: ArrayLike) -> np.ndarray:
    if isinstance(a, Tensor):
        a = a.detach().cpu().numpy()
    return np.asarray(a, dtype=np.float64)


def _same_shape(y: ArrayLike, pred: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    y, pred = _f64(y), _f64(pred)
    if y.size != pred.size:
        raise ValueError(f"targets have {y.size} values but predictions {pred.size}")
    return y.reshape(-1), pred.reshape(-1)


def mse(y: ArrayLike, pred: ArrayLike) -> float:
    y, pred = _same_shape(y, pred)
    return float(np.mean((y - pred) ** 2))


def rmse(y: ArrayLike, pred: ArrayLike) -> float:
    return math.sqrt(mse(y, pred))


def mae(y: ArrayLike, pred: ArrayLike) -> float:
    y, pred = _same_shape(y, pred)
    return float(np.mean(np.abs(y - pred)))


def smape(y: ArrayLike, pred: ArrayLike) -> float:
    y, pred = _same_shape(y, pred)
    denom = np.abs(y) + np.abs(pred)
    terms = np.divide(2.0 * np.abs(y - pred), denom, out=np.zeros_like(denom), where=denom > 0)
    return float(100.0 * np.mean(terms))


def accuracy(y: ArrayLike, pred: ArrayLike) -> float:
    y = torch.as_tensor(y).reshape(-1)
    pred = torch.as_tensor(pred)
    if pred.ndim == 2 and pred.shape[0] == y.shape[0] and pred.is_floating_point():
        pred = pred.argmax(dim=1)
    pred = pred.reshape(-1)
    if pred.shape != y.shape:
        raise ValueError(f"{y.numel()} targets but {pred.numel()} predicted labels")
    return float((pred.long() == y.long()).double().mean())


def cross_entropy(y: Tensor, logits: Tensor) -> float:
    """``y``: integer targets of any shape; ``logits``: the same shape plus a trailing class dimension."""
    y = torch.as_tensor(y).long()
    logits = torch.as_tensor(logits)
    if logits.shape[:-1] != y.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match targets {tuple(y.shape)} + (classes,)")
    return float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(), y.reshape(-1)))


def bits_per_char(y: Tensor, logits: Tensor) -> float:
    return cross_entropy(y, logits) / math.log(2.0)
