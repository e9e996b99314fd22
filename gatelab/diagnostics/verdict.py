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

``str(verdict)`` says the horizon in words: "the gradient stays above 1e-3 of its peak over all 20
steps", or "... falls below 1e-3 of its peak after 10 of 21 steps".

**Per state** (:func:`state_verdicts`): a cell with several state tensors gets one verdict per state,
``h`` and ``c`` for an LSTM, named as the cell's ``state_names`` (which a trace records and a
:class:`~.gradients.GradientFlow` keys on). The state that carries the cell's memory leads: for an
LSTM that is ``c``, the additive path ``c_t = f ⊙ c_{t-1} + i ⊙ g``, while ``h = o ⊙ ψ(c)`` is a gated
read-out whose gradient can fall away at the first lag and look "vanishing" although ``c`` carries it
over the whole sequence. Each cell declares its memory state (``RecurrentCell.memory_state``), and
:func:`~.gradients.gradient_flow` records it per layer (``GradientFlow.memory``); a flow without that
record (built by hand) falls back to :data:`MEMORY_STATES`, a rule on state names, and else to the
first state.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = ["Verdict", "verdict", "log_slope", "memory_horizon", "TOLERANCE", "FLOOR", "FIT_FLOOR",
           "StateVerdicts", "state_verdicts", "layer_verdicts", "memory_state", "MEMORY_STATES"]

TOLERANCE = 0.02  # |slope| per step above which a curve is not healthy
FLOOR = 1e-3  # the memory horizon is where the norm falls below FLOOR x its largest value
FIT_FLOOR = 1e-30  # entries below FIT_FLOOR x the largest are left out of the slope fit
#: State names that carry a cell's memory, in order of preference: the fallback for a flow that does
#: not record its cells' ``memory_state`` (see the module docstring).
MEMORY_STATES: tuple[str, ...] = ("c",)


@dataclass(frozen=True)
class Verdict:
    """The verdict on one norm-versus-lag curve; ``str()`` gives a one-line summary."""

    label: str  # "vanishing" | "exploding" | "healthy"
    slope: float  # d ln‖·‖ / d lag, per step
    horizon: int | None  # lags until the norm < floor x max; None if never within the curve
    lags: int  # length of the curve
    tolerance: float
    floor: float
    peak: int = 0  # lag of the largest norm, where the horizon is counted from

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def horizon_words(self) -> str:
        """The memory horizon as a sentence, e.g. "the gradient stays above 1e-3 of its peak over all 20 steps"."""
        floor, n = _number(self.floor), self.lags
        if math.isinf(self.slope) and self.slope > 0:
            return f"the norms overflowed to inf or NaN within {n} steps"
        if self.horizon == 0:
            return f"the gradient is zero at all {n} steps"
        if self.horizon is None:
            if self.peak == 0:
                return f"the gradient stays above {floor} of its peak over all {n} steps"
            if self.peak == n - 1:  # lags count back from the last step: the largest lag is the first step
                return f"the gradient is largest at the first of the {n} steps"
            return (f"the gradient peaks at lag {self.peak} and stays above {floor} of that peak back to the first "
                    f"step ({n - self.peak} of {n} steps)")
        if self.peak == 0:
            return f"the gradient falls below {floor} of its peak after {self.horizon} of {n} steps"
        return (f"the gradient peaks at lag {self.peak} and falls below {floor} of that peak {self.horizon} steps "
                f"further back (of {n})")

    def __str__(self) -> str:
        return f"{self.label} (slope {self.slope:+.4f}/step; {self.horizon_words()})"


def _number(x: float) -> str:
    """``1e-3`` rather than ``0.001`` or ``1e-03``."""
    mantissa, exponent = f"{x:e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"


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
    return Verdict(label, slope, horizon, int(a.size), tolerance, floor, int(np.argmax(a)))


# -- one verdict per state -------------------------------------------------------------------------


def memory_state(state_names: Sequence[str]) -> str:
    """The state whose verdict leads: the first of :data:`MEMORY_STATES` among ``state_names`` (``"c"``
    for an LSTM's ``("h", "c")``), else the first state (``h``; ``s`` for the gated-state cell)."""
    names = tuple(state_names)
    if not names:
        raise ValueError("a cell has at least one state")
    return next((m for m in MEMORY_STATES if m in names), names[0])


@dataclass(frozen=True)
class StateVerdicts:
    """The verdicts on one layer and direction's states, ``verdicts`` ordered with the ``leading``
    state (the memory, see :func:`memory_state`) first; ``str()`` gives one line for all of them."""

    layer: str  # the GradientFlow key without its state: "rnn.l0", "l1_reverse"
    verdicts: dict[str, Verdict]  # state name -> verdict on ‖∂L/∂state_t‖ by lag, leading first
    leading: str

    @property
    def label(self) -> str:
        """The leading state's label."""
        return self.verdicts[self.leading].label

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "leading": self.leading, "label": self.label,
                "verdicts": {k: v.to_dict() for k, v in self.verdicts.items()}}

    def __str__(self) -> str:
        several = len(self.verdicts) > 1
        return "; ".join(f"{name}{' (memory)' if several and name == self.leading else ''}: {v}"
                         for name, v in self.verdicts.items())


def _layers(flow: Any) -> dict[str, list[str]]:
    """GradientFlow keys ``"<layer>.<state>"`` grouped by layer, states in the cell's order."""
    out: dict[str, list[str]] = {}
    for key in flow.norms:
        layer, _, state = key.rpartition(".")
        out.setdefault(layer, []).append(state)
    return out


def state_verdicts(
    flow: Any, layer: str | None = None, *, tolerance: float = TOLERANCE, floor: float = FLOOR
) -> StateVerdicts:
    """One :func:`verdict` per state of one layer and direction of a :class:`~.gradients.GradientFlow`
    (``layer``: its key without the state, e.g. ``"rnn.l0"``; default: the layer of
    ``flow.default_key``, the last layer's forward direction), the memory state leading."""
    layers = _layers(flow)
    layer = flow.default_key.rpartition(".")[0] if layer is None else layer
    if layer not in layers:
        raise KeyError(f"no gradient norms for layer {layer!r}; have {', '.join(layers)}")
    states = layers[layer]
    declared = getattr(flow, "memory", {}).get(layer)  # the cell's own fact, when the flow recorded it
    leading = declared if declared in states else memory_state(states)
    order = [leading] + [s for s in states if s != leading]
    verdicts = {s: verdict(flow.by_lag(f"{layer}.{s}"), tolerance=tolerance, floor=floor) for s in order}
    return StateVerdicts(layer, verdicts, leading)


def layer_verdicts(flow: Any, *, tolerance: float = TOLERANCE, floor: float = FLOOR) -> dict[str, StateVerdicts]:
    """:func:`state_verdicts` for every layer and direction of ``flow``, in the flow's order."""
    return {layer: state_verdicts(flow, layer, tolerance=tolerance, floor=floor) for layer in _layers(flow)}
