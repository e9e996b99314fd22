"""The fused engine of the scan cells (minGRU, minLSTM, IndRNN) and sLSTM's hoisted loop.

minGRU and minLSTM read ``x_t`` only in their gates, so a direction is

1. one GEMM: the input projections of all steps, ``xw = x W_ihᵀ + b_ih`` (T, B, G·H);
2. every activation over all steps at once, giving ``h_t = a_t ⊙ h_{t−1} + b_t`` (the cell's
   :meth:`~gatelab.cells.min_rnn._MinCell.coefficients`);
3. that linear recurrence, in one of two forms (:func:`linear_scan`):

   * ``"sequential"``: one elementwise pass over time (the C++ loop of ``kernels_scan.cpp``, or its
     PyTorch twin), and one reverse pass for the backward. The CPU's form: measured here, a parallel
     scan does ``O(T log T)`` work against this pass's ``O(T)`` and is slower on a few cores.
   * ``"parallel"``: an associative (Hillis–Steele) scan of the pairs ``(a_t, b_t)`` under
     ``(a, b) ∘ (a', b') = (a a', a' b + b')``, ``⌈log₂ T⌉`` rounds of whole-tensor ops: the GPU's form.
     Linear space, no logarithms, so any sign of ``h`` and any gate activation; with ``|a_t| ≤ 1``
     (sigmoid-like gates: minGRU's ``1 − z``, minLSTM's ``f/(f+i)``) no partial product exceeds 1, and
     each ``h_t = Σ_s (Π_{s<r≤t} a_r) b_s`` is computed with at most ``2⌈log₂ T⌉ + 1`` roundings per
     term: ``|ĥ_t − h_t| ≤ γ_{2⌈log₂T⌉+1} Σ_s Π|a_r| |b_s|`` with ``γ_k = k u / (1 − k u)``.

   Its backward is the same recurrence run the other way (``g_t = ∂L/∂h_t + a_{t+1} g_{t+1}``).

IndRNN's ``h_t = φ(xw_t + u ⊙ h_{t−1})`` has its activation inside the recurrence: a C++ pass for the
activations :data:`INDRNN_KINDS` (else a PyTorch loop), and for the backward the linear recurrence
``g_{t−1} = ∂L/∂h_{t−1} + u ⊙ φ'(z_t) ⊙ g_t`` through the same scan.

sLSTM's recurrence is a (block-diagonal) matrix product, so its loop stays step by step; this engine
hoists its input projection out of the loop (one GEMM) and differentiates the steps with autograd.

Padded steps (``lengths``) hold the state and output zero, as everywhere in gatelab.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from ..cells import RecurrentCell
from ..cells.indrnn import IndRNNCell
from ..cells.min_rnn import SCAN_FORMS, MinGRUCell, MinLSTMCell, _MinCell
from ..cells.slstm import SLSTMCell
from . import native, reference
from .base import ZoneoutMasks
from .fused import cpp

if TYPE_CHECKING:
    from ..layers.base import RecurrentLayer

FORMS = SCAN_FORMS
# IndRNN activations the C++ pass knows, in the order of kernels_scan.cpp's enum ScanAct.
INDRNN_KINDS = ("identity", "relu", "tanh", "sigmoid", "leaky_relu", "hardtanh")
_DEFAULT_PARAM = {"leaky_relu": 0.01}


def cpp_ready() -> bool:
    """Whether the C++ scan kernels are loaded (built with the fused engine's kernels at first use)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fused engine warns once about a failed build itself
        return cpp.load() and hasattr(torch.ops, "gatelab_scan") and hasattr(torch.ops.gatelab_scan, "linear_scan")


def _use_cpp(t: Tensor) -> bool:
    return t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64) and cpp_ready()


def resolve_form(form: str, x: Tensor) -> str:
    """``"auto"``: the parallel scan on an accelerator, the sequential pass on the CPU."""
    if form not in FORMS:
        raise ValueError(f"scan form must be one of {', '.join(FORMS)}, got {form!r}")
    return ("sequential" if x.device.type == "cpu" else "parallel") if form == "auto" else form


# -- the linear recurrence h_t = a_t ⊙ h_{t-1} + b_t ---------------------------------------------------


def scan_loop(a: Tensor, b: Tensor, h0: Tensor, reverse: bool) -> Tensor:
    """The sequential form in PyTorch (the C++ ``linear_scan``'s twin): every ``h_t``, ``(T, ...)``."""
    out = torch.empty_like(b)
    h = h0
    for t in (range(a.shape[0] - 1, -1, -1) if reverse else range(a.shape[0])):
        h = a[t] * h + b[t]
        out[t] = h
    return out


def scan_parallel(a: Tensor, b: Tensor, h0: Tensor, reverse: bool) -> Tensor:
    """The parallel form: Hillis–Steele doubling over the pairs ``(a_t, b_t)``, ``⌈log₂ T⌉`` rounds."""
    if reverse:
        a, b = a.flip(0), b.flip(0)
    b = torch.cat([(a[0] * h0 + b[0]).unsqueeze(0), b[1:]])  # fold h0 into the first step
    A, Bv, k, T = a, b, 1, a.shape[0]
    while k < T:
        # element t absorbs element t − k: (A, B)_t <- (A_t A_{t−k}, A_t B_{t−k} + B_t)
        Bv = torch.cat([Bv[:k], torch.addcmul(Bv[k:], A[k:], Bv[:-k])])
        A = torch.cat([A[:k], A[k:] * A[:-k]])
        k *= 2
    return Bv.flip(0) if reverse else Bv


def _scan(a: Tensor, b: Tensor, h0: Tensor, reverse: bool, form: str) -> Tensor:
    if form == "parallel":
        return scan_parallel(a, b, h0, reverse)
    if _use_cpp(a):
        T = a.shape[0]
        return torch.ops.gatelab_scan.linear_scan(a.reshape(T, -1), b.reshape(T, -1), h0.reshape(-1),
                                                  reverse).view_as(b)
    return scan_loop(a, b, h0, reverse)


def _scan_backward(a: Tensor, H: Tensor, h0: Tensor, gH: Tensor, reverse: bool, form: str
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """``(∂L/∂a, ∂L/∂b, ∂L/∂h0)`` of the scan from ``gH = ∂L/∂h_t`` (each step as an output)."""
    if form != "parallel" and _use_cpp(a):
        T = a.shape[0]
        ga, gb, gh0 = torch.ops.gatelab_scan.linear_scan_backward(
            a.reshape(T, -1), H.reshape(T, -1), h0.reshape(-1), gH.reshape(T, -1), reverse)
        return ga.view_as(a), gb.view_as(a), gh0.view_as(h0)
    # g_t = gH_t + a_next g_next: the same scan the other way, with a shifted by one step
    one = torch.ones_like(a[:1])
    a_next = torch.cat([one, a[:-1]]) if reverse else torch.cat([a[1:], one])
    G = _scan(a_next, gH, torch.zeros_like(h0), not reverse, form)
    H_prev = torch.cat([H[1:], h0.unsqueeze(0)]) if reverse else torch.cat([h0.unsqueeze(0), H[:-1]])
    first = -1 if reverse else 0
    return G * H_prev, G, a[first] * G[first]


class LinearScan(torch.autograd.Function):
    """``H = scan(a, b, h0)``: every ``h_t`` of ``h_t = a_t ⊙ h_{t−1} + b_t``, differentiable in all three."""

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, h0: Tensor, reverse: bool, form: str) -> Tensor:
        H = _scan(a, b, h0, reverse, form)
        ctx.save_for_backward(a, H, h0)
        ctx.reverse, ctx.form = reverse, form
        return H

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gH: Tensor):
        a, H, h0 = ctx.saved_tensors
        ga, gb, gh0 = _scan_backward(a, H, h0, gH.contiguous(), ctx.reverse, ctx.form)
        return ga, gb, gh0, None, None


def linear_scan(a: Tensor, b: Tensor, h0: Tensor, reverse: bool = False, form: str = "auto") -> Tensor:
    """Every ``h_t`` of ``h_t = a_t ⊙ h_{t−1} + b_t`` (``t`` descending when ``reverse``), ``(T, ...)``."""
    form = resolve_form(form, a)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (a, b, h0)):
        return LinearScan.apply(a, b, h0, reverse, form)
    return _scan(a, b, h0, reverse, form)


# -- IndRNN ------------------------------------------------------------------------------------------------


def _indrnn_kind(act) -> tuple[int, float] | None:
    kind = getattr(act, "kind", "")
    if kind not in INDRNN_KINDS or getattr(act, "learnable", False):
        return None
    param = act.param if act.param is not None else _DEFAULT_PARAM.get(kind, 0.0)
    return INDRNN_KINDS.index(kind), float(param)


def indrnn_loop(xw: Tensor, u: Tensor, h0: Tensor, live: Tensor | None, phi: Callable[[Tensor], Tensor],
                reverse: bool) -> Tensor:
    """The IndRNN pass in PyTorch (the C++ ``indrnn_forward``'s twin): every ``h_t``, held on dead steps."""
    out = torch.empty_like(xw)
    h = h0
    for t in (range(xw.shape[0] - 1, -1, -1) if reverse else range(xw.shape[0])):
        new = phi(xw[t] + u * h)
        h = new if live is None else torch.where(live[t], new, h)
        out[t] = h
    return out


class IndRNNScan(torch.autograd.Function):
    """Every ``h_t`` of IndRNN from ``xw (T, B, H)``, ``u (H,)``, ``h0 (B, H)``; differentiable in all three."""

    @staticmethod
    def forward(ctx, xw, u, h0, lengths, live, phi, reverse):
        kind = _indrnn_kind(phi)
        if kind is not None and _use_cpp(xw):
            H = torch.ops.gatelab_scan.indrnn_forward(xw, u, h0, lengths, kind[0], kind[1], reverse)
        else:
            with torch.no_grad():
                H = indrnn_loop(xw, u, h0, live, phi, reverse)
        ctx.save_for_backward(xw, u, h0, H, live)
        ctx.phi, ctx.reverse = phi, reverse
        return H

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gH):
        xw, u, h0, H, live = ctx.saved_tensors
        reverse = ctx.reverse
        H_prev = torch.cat([H[1:], h0.unsqueeze(0)]) if reverse else torch.cat([h0.unsqueeze(0), H[:-1]])
        z = torch.addcmul(xw, u, H_prev)
        D = ctx.phi.derivative(z, ctx.phi(z))  # φ'(z_t), every step at once
        if live is not None:
            D = D * live
        # g_{t−1} = gH_{t−1} + c_t ⊙ g_t with c_t = u φ'(z_t) on live steps, 1 on dead ones (the state is held)
        c = u * D if live is None else torch.where(live, u * D, 1.0)
        G_times_prev, G, gh0 = _scan_backward(c, H, h0, gH.contiguous(), reverse, "sequential")
        dz = G * D
        du = (G_times_prev * D).sum((0, 1))
        return dz, du, gh0, None, None, None, None


def _live(lengths: Tensor | None, T: int, like: Tensor) -> Tensor | None:
    if lengths is None:
        return None
    return (torch.arange(T, device=like.device).unsqueeze(1) < lengths.to(like.device)).unsqueeze(2)  # (T, B, 1)


# -- the runners, one per cell kind ---------------------------------------------------------------------------


def run_min(cell: _MinCell, x: Tensor, state: tuple[Tensor, ...], lengths: Tensor | None, reverse: bool,
            form: str) -> tuple[Tensor, tuple[Tensor, ...]]:
    """minGRU / minLSTM over ``x (T, B, I)``: one GEMM, the activations over all steps, one scan."""
    (h0,) = state
    xw = F.linear(x, cell.weight_ih, cell.bias_ih)  # (T, B, G·H)
    a, b = cell.coefficients(xw)  # (T, B, H) each
    live = _live(lengths, x.shape[0], x)
    if live is not None:  # a dead step is h' = 1 ⊙ h + 0
        a, b = torch.where(live, a, 1.0), torch.where(live, b, 0.0)
    H = linear_scan(a, b, h0, reverse, form)
    out = H if live is None else H * live
    return out, (H[0] if reverse else H[-1],)


def run_indrnn(cell: IndRNNCell, x: Tensor, state: tuple[Tensor, ...], lengths: Tensor | None, reverse: bool,
               form: str) -> tuple[Tensor, tuple[Tensor, ...]]:
    """IndRNN over ``x (T, B, I)``: one GEMM, then the elementwise pass (C++ or PyTorch)."""
    (h0,) = state
    xw = F.linear(x, cell.weight_ih, cell.bias_ih)  # (T, B, H)
    live = _live(lengths, x.shape[0], x)
    u = cell.weight_hh
    if isinstance(cell.phi, torch.nn.Module):  # a learnable φ: its parameters' gradients by autograd through the loop
        H = indrnn_loop(xw, u, h0, live, cell.phi, reverse)
    elif torch.is_grad_enabled() and any(t.requires_grad for t in (xw, u, h0)):
        H = IndRNNScan.apply(xw, u, h0, lengths, live, cell.phi, reverse)
    else:
        kind = _indrnn_kind(cell.phi)
        H = (torch.ops.gatelab_scan.indrnn_forward(xw, u, h0, lengths, kind[0], kind[1], reverse)
             if kind is not None and _use_cpp(xw) else indrnn_loop(xw, u, h0, live, cell.phi, reverse))
    out = H if live is None else H * live
    return out, (H[0] if reverse else H[-1],)


def run_slstm(cell: SLSTMCell, x: Tensor, state: tuple[Tensor, ...], lengths: Tensor | None, reverse: bool,
              form: str) -> tuple[Tensor, tuple[Tensor, ...]]:
    """sLSTM over ``x (T, B, I)``: the input GEMM of all steps hoisted, then the step loop (autograd)."""
    xw = F.linear(x, cell.weight_ih, cell.bias_ih)  # (T, B, 4H)
    T = x.shape[0]
    outputs: list[Tensor] = [x.new_empty(0)] * T
    for t in range(T - 1, -1, -1) if reverse else range(T):
        out, new = cell.combine(xw[t], cell.recurrent(state[0]), state)
        if lengths is not None:
            alive = (lengths > t).unsqueeze(1)
            new = tuple(torch.where(alive, s, old) for s, old in zip(new, state))
            out = out * alive
        state = new
        outputs[t] = out
    return torch.stack(outputs), state


RUNNERS: dict[type[RecurrentCell], Callable[..., tuple[Tensor, tuple[Tensor, ...]]]] = {
    MinGRUCell: run_min, MinLSTMCell: run_min, IndRNNCell: run_indrnn, SLSTMCell: run_slstm,
}


def _runner(cell: RecurrentCell):
    for cls in type(cell).__mro__:
        if cls in RUNNERS:
            return RUNNERS[cls]
    return None


class ScanEngine:
    """The fused engine of the scan cells and sLSTM (see the module docstring); ``backend="fused"``."""

    name = "fused"
    title = "the fused engine"
    whole_stack = False
    traceable = False
    untraceable = "its scan is an autograd.Function over C++ ops without fake kernels (the reference loop traces)"

    def unsupported(self, layer: RecurrentLayer) -> list[str]:
        cell = layer.cells[0]
        return [] if _runner(cell) is not None else [f"the scan engine has no runner for {type(cell).__name__}"]

    def describe(self, layer: RecurrentLayer) -> str:
        cell = layer.cells[0]
        device = cell.weight_ih.device
        here = ("C++ loop" + ("" if cpp.loaded() else ", compiled at first use")
                if device.type == "cpu" and not cpp.failed() else "PyTorch loop")
        if isinstance(cell, _MinCell):
            form = resolve_form(cell.scan, cell.weight_ih)
            what = ("one elementwise pass per direction" + f" ({here})" if form == "sequential"
                    else "a parallel (associative, Hillis–Steele) scan in PyTorch")
            return f"the fused engine: one input GEMM for all steps, the activations over all steps, then {what}"
        if isinstance(cell, IndRNNCell):
            kind = _indrnn_kind(cell.phi)
            loop = here if kind is not None else "PyTorch loop"
            why = "" if kind is not None else f" ({getattr(cell.phi, 'key', 'this activation')} has no C++ pass)"
            return (f"the fused engine: one input GEMM for all steps, then one elementwise pass per direction "
                    f"({loop}{why}); the backward is a linear scan")
        return ("the fused engine: sLSTM's input GEMM hoisted out of the step loop; the block-diagonal recurrence "
                "step by step under autograd (no hand-written BPTT yet)")

    def run_direction(
        self, cell: RecurrentCell, x: Tensor, state: tuple[Tensor, ...], lengths: Tensor | None, reverse: bool, *,
        rec_mask: Tensor | None = None, weight_hh: Tensor | None = None, zoneout: ZoneoutMasks | None = None,
        strict: bool = False,
    ) -> tuple[Tensor, tuple[Tensor, ...]]:
        runner = _runner(cell)
        if runner is None or rec_mask is not None or weight_hh is not None or (zoneout and any(
                m is not None for m in zoneout)):
            return reference.run_direction(cell, x, state, lengths, reverse, rec_mask=rec_mask, weight_hh=weight_hh,
                                           zoneout=zoneout)
        return runner(cell, x, state, lengths, reverse, getattr(cell, "scan", "auto"))


ENGINE = ScanEngine()
ORDER = (native.ENGINE, ENGINE, reference.ENGINE)


def choose(layer: RecurrentLayer, backend: str, strict: bool):
    """As :func:`gatelab.engines.choose`, over :data:`ORDER` (torch has none of these cells, so
    ``native`` never applies): ``auto`` takes the first engine with nothing unsupported."""
    owner = layer.kind_name
    if backend == "auto":
        why = "backend='auto'"
        for engine in ORDER:
            blockers = engine.unsupported(layer)
            if not blockers:
                return engine, why + f". Runs {engine.describe(layer)}"
            why += f"; {engine.title} does not apply: " + "; ".join(blockers)
        raise AssertionError("the reference engine runs every layer")
    engine = next(e for e in ORDER if e.name == backend)
    blockers = engine.unsupported(layer)
    if not blockers:
        return engine, f"backend={backend!r} was asked for. Runs {engine.describe(layer)}"
    message = f"backend={backend!r} cannot run this layer: " + "; ".join(blockers)
    if strict:
        raise ValueError(f"{owner}: {message} (strict=True)")
    warnings.warn(f"{owner}: {message}; falling back to 'reference'", UserWarning, stacklevel=4)
    return reference.ENGINE, message + "; fell back to 'reference'"


__all__ = ["ENGINE", "ScanEngine", "FORMS", "INDRNN_KINDS", "linear_scan", "scan_loop", "scan_parallel", "choose",
           "cpp_ready", "resolve_form", "RUNNERS"]
