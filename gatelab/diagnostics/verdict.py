"""One word for a norm-versus-lag curve: vanishing, exploding or healthy, with the numbers behind it.

Definitions (the curve is ``norms[k]``, the gradient or Jacobian norm ``k`` steps back in time):

* **slope**: the least-squares slope of ``ln norms[k]`` against ``k``, per step. A curve
  ``norms[k] = α^k`` has slope ``ln α`` exactly. Entries below ``1e-30`` times the largest
  (:data:`FIT_FLOOR`) are left out of the fit: in a float32 model they are subnormal numbers with few
  significant bits, or zeros where the process flushes subnormals (as it does once gatelab's fused
  C++ kernels are loaded), and the verdict is "vanishing" long before anyway.
* **memory horizon**: the first lag, counted from the lag of the largest norm, at which the norm falls
  below ``floor`` (default ``1e-3``) times the largest norm; ``None`` when it never does within the
  curve (the memory outlasts the sequence).
* **verdict**: ``"vanishing"`` when the slope is below ``-tolerance`` or the horizon is reached within
  the curve; ``"exploding"`` when the slope is above ``+tolerance``; else ``"healthy"``. The default
  ``tolerance = 0.02`` per step means: a gradient that loses (or gains) more than a factor ``e^2 ≈ 7.4``
  per hundred steps, i.e. would reach ``1e-3`` (or ``1e3``) within about 350 steps, is not healthy.
  A curve with an infinite or NaN entry (the norms overflowed) is ``"exploding"`` with slope ``inf``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = ["Verdict", "verdict", "log_slope", "memory_horizon", "TOLERANCE", "FLOOR", "FIT_FLOOR"]

TOLERANCE = 0.02  # |slope| per step above which a curve is not healthy
FLOOR = 1e-3  # the memory horizon is where the norm falls below FLOOR x its largest value
FIT_FLOOR = 1e-30  # entries below FIT_FLOOR x the largest are left out of the slope fit


@dataclass(frozen=True)
class Verdict:
    """The verdict on one norm-versus-lag curve; ``str()`` gives a one-line summary."""

    label: str  # "vanishing" | "exploding" | "healthy"
    slope: float  # d ln‖·‖ / d lag, per step
    horizon: int | None  # lags until the norm < floor x max; None if never within the curve
    lags: int  # length of the curve
    tolerance: float
    floor: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        horizon = "never" if self.horizon is None else f"{self.horizon} steps"
        return f"{self.label} (slope {self.slope:+.4f}/step, horizon {horizon} of {self.lags})"


def _curve(norms: Any) -> np.ndarray:
    if hasattr(norms, "by_lag"):  # a GradientFlow: its default series
        norms = norms.by_lag()
    a = np.asarray(norms, dtype=np.float64)
    if a.ndim != 1 or a.size < 2:
        raise ValueError(f"expected a 1-D curve of at least 2 norms (by lag), got shape {a.shape}")
    if np.any(a < 0):
        raise ValueError("norms must be non-negative")
    return a


def log_slope(norms: Any) -> float:
    """Least-squares slope of ``ln norms[k]`` against the lag ``k`` (entries below ``FIT_FLOOR`` times
    the largest left out)."""
    a = _curve(norms)
    lags = np.nonzero((a > 0) & (a >= FIT_FLOOR * a.max()))[0]
    if lags.size < 2:
        return -math.inf if a[0] > 0 or a.max() == 0 else math.nan
    k = lags.astype(np.float64)
    y = np.log(a[lags])
    k_c = k - k.mean()  # closed-form least squares (np.polyfit would consult np.finfo, see docs/diagnostics.md)
    return float((k_c * (y - y.mean())).sum() / (k_c * k_c).sum())


def memory_horizon(norms: Any, floor: float = FLOOR) -> int | None:
    """Lags from the largest norm until the norm first falls below ``floor`` times it; None if never."""
    a = _curve(norms)
    peak = int(np.argmax(a))
    if a[peak] == 0:
        return 0
    below = np.nonzero(a[peak:] < floor * a[peak])[0]
    return int(below[0]) if below.size else None


def verdict(norms: Any, *, tolerance: float = TOLERANCE, floor: float = FLOOR) -> Verdict:
    """Classify a norm-versus-lag curve (``norms[k]``: ``k`` steps back; a :class:`GradientFlow` gives
    its default series by lag) as vanishing, exploding or healthy; see the module docstring."""
    a = _curve(norms)
    if not np.all(np.isfinite(a)):  # the norms overflowed (inf, or NaN from inf - inf)
        return Verdict("exploding", math.inf, None, int(a.size), tolerance, floor)
    slope = log_slope(a)
    horizon = memory_horizon(a, floor)
    if slope < -tolerance or horizon is not None or a.max() == 0:
        label = "vanishing"
    elif slope > tolerance:
        label = "exploding"
    else:
        label = "healthy"
    return Verdict(label, slope, horizon, int(a.size), tolerance, floor)
