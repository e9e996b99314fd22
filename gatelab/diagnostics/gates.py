"""Gate and state statistics: saturation per gate, dead ReLU units, state norms, spectra of W_hh.

Gate values are read where the cell computes them: during one recorded forward (see
:func:`~.gradients.recording`) every activation slot of every cell (``sigma_i``, ``sigma_f``, ``phi``,
``psi`` ...) is wrapped by a probe that keeps its input and output, whatever the cell's equations.

* **saturation** of a slot with a bounded output range ``(lo, hi)`` (sigmoid, hard sigmoid, Elliott:
  ``(0, 1)``; tanh, softsign: ``(-1, 1)``): the share of its values within 5 % of the range of either
  end, i.e. below 0.05 or above 0.95 for a ``(0, 1)`` gate, as in the spec.
* **dead units** of a ReLU-like slot (:data:`RELU_LIKE`): the share of units whose pre-activation is
  ``<= 0`` at every real step of every sequence, so that their output never moves (ReLU: exactly 0).
* **state norms**: the mean over the batch of ``‖s_t‖`` for every state tensor and step.
* **spectra** of ``W_hh``: per row block (``i, f, g, o`` / ``r, z, n`` / ``h``) the spectral radius
  (largest ``|eigenvalue|``, square blocks only) and the spectral norm; for the whole matrix the
  spectral norm, and its radius when it is square (Elman). IndRNN's diagonal ``u``: ``max |u|`` and
  the spread of ``|u|``; sLSTM's block-diagonal ``R``: per gate and head; MinGRU / MinLSTM (no
  recurrent weight): skipped, with the reason.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .gradients import compute_loss, recording, recurrent_layers, trace_key

__all__ = [
    "GateStatistics", "gate_statistics", "saturation_share", "dead_unit_share", "spectral_radius",
    "spectral_norm", "recurrent_spectra", "RELU_LIKE", "SATURATION_MARGIN",
]

SATURATION_MARGIN = 0.05  # share of the output range at either end that counts as saturated
RELU_LIKE = frozenset({"relu", "leaky_relu", "prelu", "elu", "selu", "gelu", "silu", "softplus"})
_SAMPLE = 20_000  # values kept per slot for histograms


def saturation_share(values: Tensor, output_range: tuple[float, float], margin: float = SATURATION_MARGIN) -> float:
    """Share of ``values`` within ``margin`` of the range at either end (``< 0.05`` or ``> 0.95`` for (0, 1))."""
    lo, hi = output_range
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"saturation needs a bounded output range, got {output_range}")
    width = margin * (hi - lo)
    v = values.detach()
    return float(((v < lo + width) | (v > hi - width)).double().mean()) if v.numel() else math.nan


def dead_unit_share(pre: Tensor, live: Tensor | None = None) -> float:
    """Share of units (last dimension) whose pre-activation ``pre (T, B, H)`` is ``<= 0`` at every step
    and sequence; ``live (T, B)`` masks the padded steps out."""
    active = pre.detach() > 0
    if live is not None:
        active = active & live.unsqueeze(-1)
    return float((~active.flatten(0, -2).any(0)).double().mean())


def spectral_radius(matrix: Tensor) -> float:
    """Largest absolute eigenvalue of a square matrix."""
    m = matrix.detach()
    if m.dim() != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"the spectral radius needs a square matrix, got shape {tuple(m.shape)}")
    if not bool(torch.isfinite(m).all()):
        return math.nan
    return float(torch.linalg.eigvals(m.double()).abs().max())


def spectral_norm(matrix: Tensor) -> float:
    """Largest singular value (NaN for a matrix with a non-finite entry)."""
    m = matrix.detach().double()
    return float(torch.linalg.matrix_norm(m, ord=2)) if bool(torch.isfinite(m).all()) else math.nan


def _dense_spectra(cell: nn.Module, W: Tensor) -> dict[str, float | str]:
    """Per row block (``cell.blocks``) and for the whole dense ``W (G·H, H)``."""
    stats: dict[str, float | str] = {}
    for block, w in zip(cell.blocks, W.split(cell.hidden_size, 0)):
        if w.shape[0] == w.shape[1]:
            stats[f"{block}.radius"] = spectral_radius(w)
        stats[f"{block}.norm"] = spectral_norm(w)
    stats["all.norm"] = spectral_norm(W)
    if W.shape[0] == W.shape[1]:
        stats["all.radius"] = spectral_radius(W)
    return stats


def _diagonal_spectra(cell: nn.Module, u: Tensor) -> dict[str, float | str]:
    """``W_hh = diag(u)`` (IndRNN): its eigenvalues are ``u`` itself, so radius = norm = ``max |u|``;
    the per-unit ``|u|`` spectrum is summarised by its minimum, median and mean, beside the bound."""
    a = u.detach().double().abs()
    top = float(a.max()) if bool(torch.isfinite(a).all()) else math.nan
    stats: dict[str, float | str] = {"h.radius": top, "h.norm": top, "all.radius": top, "all.norm": top,
                                     "h.abs_min": float(a.min()), "h.abs_median": float(a.median()),
                                     "h.abs_mean": float(a.mean())}
    bound = getattr(cell, "recurrent_max", None)
    if bound is not None:
        stats["h.bound"] = float(bound)
    return stats


def _block_diagonal_spectra(cell: nn.Module, W: Tensor) -> dict[str, float | str]:
    """``R`` block-diagonal over heads (sLSTM, ``W (4H, H/K)``): per gate and head the square block's
    radius and norm (``"i.head0.radius"``); per gate the block-diagonal matrix's, which are the
    largest over its heads (its eigenvalues and singular values are the union of the heads'); for
    the whole ``(4H, H)`` ``R`` the norm, the largest over heads of the head's stacked ``(4d, d)``."""
    K, d = cell.num_heads, cell.hidden_size // cell.num_heads
    G = len(cell.blocks)
    R = W.detach().view(G, K, d, d)  # (gate, head, out, in)
    stats: dict[str, float | str] = {}
    for g, block in enumerate(cell.blocks):
        radii = [spectral_radius(R[g, k]) for k in range(K)]
        norms = [spectral_norm(R[g, k]) for k in range(K)]
        if K > 1:
            for k in range(K):
                stats[f"{block}.head{k}.radius"] = radii[k]
                stats[f"{block}.head{k}.norm"] = norms[k]
        stats[f"{block}.radius"] = max(radii)
        stats[f"{block}.norm"] = max(norms)
    stats["all.norm"] = max(spectral_norm(R[:, k].reshape(G * d, d)) for k in range(K))
    return stats


def recurrent_spectra(layer: nn.Module) -> dict[str, dict[str, float | str]]:
    """Spectral radius and norm of ``W_hh`` per cell and row block: ``{"l0": {"f.radius": ..., "f.norm":
    ..., "all.norm": ...}}``; keys carry the module path inside a model, like the gradient keys.

    By the cell's ``recurrence``: a dense ``W_hh`` as above; IndRNN's per-unit ``u`` (``W_hh =
    diag(u)``) as :func:`_diagonal_spectra`; sLSTM's block-diagonal ``R`` per gate and head
    (:func:`_block_diagonal_spectra`); a cell with no recurrent weight (MinGRU, MinLSTM) gives
    ``{"skipped": reason}``, since its ``∂h'/∂h = diag(a_t)`` depends on the input only (the gradient
    and Jacobian diagnostics measure it)."""
    out: dict[str, dict[str, float | str]] = {}
    for name, rec in recurrent_layers(layer):
        D = rec.num_directions
        for k, cell in enumerate(rec.cells):
            key = f"l{k // D}{'_reverse' if k % D else ''}"
            key = f"{name}.{key}" if name else key
            W = getattr(cell, "weight_hh", None)
            kind = getattr(cell, "recurrence", "dense")
            if W is None:
                out[key] = {"skipped": f"{type(cell).__name__} has no recurrent weight (its gates read x_t only; "
                                       "∂h'/∂h = diag(a_t) is input-dependent: see the gradient and Jacobian figures)"}
            elif kind == "elementwise" or W.dim() == 1:
                out[key] = _diagonal_spectra(cell, W)
            elif kind == "block_diagonal":
                out[key] = _block_diagonal_spectra(cell, W)
            else:
                out[key] = _dense_spectra(cell, W)
    return out


@contextlib.contextmanager
def _probed(model: nn.Module) -> Iterator[dict[tuple[int, str], tuple[Any, list[tuple[Tensor, Tensor]]]]]:
    """Observe every activation slot of every cell (:meth:`~gatelab.cells.RecurrentCell.observing`);
    yield ``{(id(cell), slot): (activation, [(input, output) per call, detached])}``."""
    probes: dict[tuple[int, str], tuple[Any, list]] = {}
    with contextlib.ExitStack() as stack:
        for _, layer in recurrent_layers(model):
            for cell in layer.cells:
                for slot, act in cell.activation_slots().items():
                    probes[(id(cell), slot)] = (act, [])

                def observe(slot: str, x: Tensor, y: Tensor, cell_id: int = id(cell)) -> None:
                    probes[(cell_id, slot)][1].append((x.detach(), y.detach()))

                stack.enter_context(cell.observing(observe))
        yield probes


@dataclass(frozen=True)
class GateStatistics:
    """Statistics of one forward pass; keys like the gradient keys plus the slot: ``"l0.sigma_f"``.

    ``saturation``: bounded slots only; ``dead``: ReLU-like slots only; ``state_norms[key]`` is ``(T,)``
    (input order); ``spectra`` as :func:`recurrent_spectra`; ``values`` keeps up to 20 000 output
    values per slot (for histograms); ``ranges`` the output range of each slot; ``activations`` the
    name of the activation in each slot.
    """

    saturation: dict[str, float]
    dead: dict[str, float]
    state_norms: dict[str, np.ndarray]
    spectra: dict[str, dict[str, float | str]]
    values: dict[str, np.ndarray]
    ranges: dict[str, tuple[float, float]]
    activations: dict[str, str]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (no raw values)."""
        return {
            "saturation": dict(self.saturation), "dead": dict(self.dead),
            "state_norms": {k: v.tolist() for k, v in self.state_norms.items()},
            "spectra": {k: dict(v) for k, v in self.spectra.items()}, "activations": dict(self.activations),
        }


def gate_statistics(model: nn.Module, batch: Any, loss_fn: Any = None, *, seed: int = 0) -> GateStatistics:
    """Run ``model`` once on ``batch`` (as :func:`~.gradients.gradient_flow` does, without gradients) and
    collect the gate and state statistics described in the module docstring."""
    with torch.no_grad(), _probed(model) as probes, recording(model, leaf_states=False) as traces:
        compute_loss(model, batch, loss_fn)
    gen = np.random.default_rng(seed)
    saturation: dict[str, float] = {}
    dead: dict[str, float] = {}
    values: dict[str, np.ndarray] = {}
    ranges: dict[str, tuple[float, float]] = {}
    names: dict[str, str] = {}
    state_norms: dict[str, np.ndarray] = {}
    seen: set[tuple[int, str]] = set()
    for tr in traces:
        T = tr.x.shape[0]
        live = None
        if tr.lengths is not None:
            live = torch.arange(T, device=tr.x.device).unsqueeze(1) < tr.lengths.unsqueeze(0)  # (T, B)
            live = live.flip(0) if tr.reverse else live  # the probes saw the steps in processing order
        for j, name in enumerate(tr.state_names):
            norms = torch.stack([s[j].detach().double().norm(dim=-1).mean() for s in tr.states])
            state_norms[trace_key(tr, name)] = norms.cpu().numpy()
        for (cell_id, slot), (act, calls) in probes.items():
            if cell_id != id(tr.cell) or (cell_id, slot) in seen or not calls:
                continue
            seen.add((cell_id, slot))  # a cell called several times: the calls are pooled below
            key = trace_key(tr, slot)
            pre = torch.stack([c[0] for c in calls])  # (calls, B, H)
            out = torch.stack([c[1] for c in calls])
            mask = live if live is not None and live.shape[0] == out.shape[0] else None
            kept = out[mask] if mask is not None else out.flatten(0, 1)  # (N, H)
            rng = tuple(float(v) for v in getattr(act, "output_range", (-math.inf, math.inf)))
            ranges[key] = rng
            names[key] = getattr(act, "key", type(act).__name__)
            if math.isfinite(rng[0]) and math.isfinite(rng[1]):
                saturation[key] = saturation_share(kept, rng)
            if getattr(act, "kind", "") in RELU_LIKE:
                dead[key] = dead_unit_share(pre, mask)
            flat = kept.double().flatten().cpu().numpy()
            if flat.size > _SAMPLE:
                flat = gen.choice(flat, _SAMPLE, replace=False)
            values[key] = flat
    return GateStatistics(saturation, dead, state_norms, recurrent_spectra(model), values, ranges, names)
