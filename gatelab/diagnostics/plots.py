"""Figures for the diagnostics (matplotlib, gatelab's ``report`` extra: ``pip install 'gatelab[report]'``).

matplotlib is imported when a figure is drawn, never at ``import gatelab``. Figures are drawn on
``matplotlib.figure.Figure`` objects rendered by the Agg backend, so nothing touches pyplot's global
state or needs a display.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..tasks.base import MissingExtraError
from .gates import GateStatistics

__all__ = ["plot_gradient_heatmap", "plot_norm_vs_lag", "plot_gate_histograms", "REPORT_HINT"]

REPORT_HINT = "pip install 'gatelab[report]'"
_TINY = 1e-300


def line_style(k: int) -> dict[str, str]:
    """The ``k``-th line's colour and dash: matplotlib's ten colours, then the same ten dashed, dotted,
    dash-dotted, so that up to 40 lines in one legend stay distinct."""
    return {"color": f"C{k % 10}", "linestyle": ("-", "--", ":", "-.")[(k // 10) % 4]}


def _quiet_subnormals(fn: Callable[..., Path]) -> Callable[..., Path]:
    """numpy warns, the first time it describes a float type, when the process flushes subnormals to
    zero; gatelab's fused C++ kernels are built with -ffast-math, which turns that on when they load.
    The warning says nothing about the figure, and tests turn warnings into errors."""

    @functools.wraps(fn)
    def wrapper(*args: object, **kwargs: object) -> Path:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The value of the smallest subnormal", category=UserWarning)
            return fn(*args, **kwargs)

    return wrapper


def _figure(rows: int, cols: int, width: float, height: float) -> tuple[Any, np.ndarray]:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise MissingExtraError(f"the diagnostics' figures need matplotlib, part of gatelab's report extra: "
                                f"{REPORT_HINT}") from err
    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).reshape(rows, cols)
    return fig, axes


def _save(fig: Any, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def _log10(a: Any) -> np.ndarray:
    return np.log10(np.maximum(np.asarray(a, dtype=np.float64), _TINY))


@_quiet_subnormals
def plot_gradient_heatmap(
    panels: Mapping[str, tuple[Sequence[int], Sequence[Sequence[float]]]], path: Path, *, title: str = "",
) -> Path:
    """One heatmap per panel of ``log10 ‖∂L/∂h_t‖``: time step ``t`` across, training step down.

    ``panels`` maps a label to ``(training steps, rows)``, each row the norms over ``t`` at one
    training step (:meth:`GradientFlowCallback.heatmap` returns exactly that). All panels share one
    colour scale so that they compare.
    """
    if not panels:
        raise ValueError("nothing to plot: panels is empty")
    mats = {k: _log10(rows) for k, (_, rows) in panels.items()}
    finite = np.concatenate([m[m > math.log10(_TINY) + 1].ravel() for m in mats.values()] or [np.zeros(1)])
    vmin, vmax = (float(np.percentile(finite, 1)), float(finite.max())) if finite.size else (-10.0, 0.0)
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = _figure(rows, cols, 4.2, 3.2)
    image = None
    for ax, (label, (steps, _)) in zip(axes.flat, panels.items()):
        m = mats[label]
        steps = list(steps)
        image = ax.imshow(m, aspect="auto", origin="lower", cmap="viridis", vmin=vmin, vmax=vmax,
                          interpolation="nearest", extent=(-0.5, m.shape[1] - 0.5, -0.5, len(steps) - 0.5))
        ticks = np.linspace(0, len(steps) - 1, min(5, len(steps))).round().astype(int)
        ax.set_yticks(ticks, [str(steps[i]) for i in ticks])
        ax.set_xlabel("time step t")
        ax.set_ylabel("training step")
        ax.set_title(label)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.colorbar(image, ax=axes.ravel().tolist(), label="log10 ‖∂L/∂h_t‖")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


@_quiet_subnormals
def plot_norm_vs_lag(
    curves: Mapping[str, Any], path: Path, *, title: str = "", ylabel: str = "norm", floor: float | None = 1e-3,
) -> Path:
    """Norm against lag on a log scale, one line per configuration.

    ``curves`` maps a label to a curve by lag, or a panel title to such a mapping (one panel each,
    side by side, same y-axis). ``floor`` draws the memory-horizon threshold: a dotted line at
    ``floor`` times the panel's largest value.
    """
    if not curves:
        raise ValueError("nothing to plot: curves is empty")
    panels = curves if all(isinstance(v, Mapping) for v in curves.values()) else {"": curves}
    fig, axes = _figure(1, len(panels), 5.0, 3.8)
    lo, hi = math.inf, -math.inf
    for ax, (panel, lines) in zip(axes.flat, panels.items()):
        top = 0.0
        for k, (label, curve) in enumerate(lines.items()):
            a = np.asarray(curve, dtype=np.float64)
            shown = np.where(a > 0, a, np.nan)
            ax.semilogy(np.arange(a.size), shown, label=label, linewidth=1.6, **line_style(k))
            if np.any(a > 0):
                lo, hi = min(lo, float(a[a > 0].min())), max(hi, float(a.max()))
                top = max(top, float(a.max()))
        if floor is not None and top > 0:
            ax.axhline(floor * top, color="grey", linestyle=":", linewidth=1, label=f"{floor:g} × max")
        ax.set_xlabel("lag k (steps back from the end)")
        ax.set_ylabel(ylabel)
        if panel:
            ax.set_title(panel)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=7)
    if math.isfinite(lo):
        for ax in axes.flat:
            ax.set_ylim(max(lo / 3, hi * 1e-30), hi * 3)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


@_quiet_subnormals
def plot_gate_histograms(stats: Mapping[str, GateStatistics] | GateStatistics, path: Path, *, title: str = "") -> Path:
    """Histograms of the gate values (bounded slots) and ReLU-like slot outputs, one row per
    configuration, one panel per slot; the saturation share (or dead-unit share) in each title."""
    stats = {"": stats} if isinstance(stats, GateStatistics) else dict(stats)
    rows = {label: [k for k in s.values if k in s.saturation or k in s.dead] for label, s in stats.items()}
    cols = max((len(v) for v in rows.values()), default=0)
    if cols == 0:
        raise ValueError("no gate or ReLU-like slot to draw")
    fig, axes = _figure(len(rows), cols, 2.6, 2.1)
    from matplotlib.ticker import NullFormatter  # matplotlib is there once _figure succeeded

    for r, (label, keys) in enumerate(rows.items()):
        s = stats[label]
        for c in range(cols):
            ax = axes[r, c]
            if c >= len(keys):
                ax.set_visible(False)
                continue
            key = keys[c]
            v = s.values[key]
            lo, hi = s.ranges[key]
            if not (math.isfinite(lo) and math.isfinite(hi)):  # ReLU-like: the values' own range
                lo, hi = min(float(v.min(initial=0.0)), 0.0), max(float(v.max(initial=0.0)), 1e-6)
            ax.hist(v, bins=40, range=(lo, hi), color="tab:blue", alpha=0.85)
            ax.set_yscale("log")
            ax.yaxis.set_minor_formatter(NullFormatter())
            slot = key.rsplit(".", 1)[-1]
            note = (f"sat {s.saturation[key]:.0%}" if key in s.saturation else "") + (
                f" dead {s.dead[key]:.0%}" if key in s.dead else "")
            ax.set_title(f"{label} {slot} ({s.activations[key]}): {note.strip()}", fontsize=7)
            ax.tick_params(labelsize=6)
            ax.locator_params(axis="x", nbins=5)
    if title:
        fig.suptitle(title)
    return _save(fig, path)
