"""The fused engine of the scan cells (minGRU, minLSTM, IndRNN) and sLSTM's hoisted loop.

minGRU and minLSTM read ``x_t`` only in their gates, so a direction is

1. one GEMM: the input projections of all steps, ``xw = x W_ihᵀ + b_ih`` (T, B, G·H);
2. on the CPU, for the activations :data:`SLSTM_KINDS` in every slot (:func:`min_kinds`), one fused C++
   pass, ``min_rnn_forward``: it reads ``xw`` once, applies the gate and candidate activations and
   runs ``h_t = a_t ⊙ h_{t−1} + b_t`` step by step, writing the outputs and the final state; its
   backward, ``min_rnn_backward``, is one reverse pass that recomputes the activations and their
   derivatives from ``xw`` and gives ``∂L/∂xw`` directly. Both run over batch × units in parallel.
   Otherwise (another activation, a learnable one, ``scan="parallel"``, another device):
3. every activation over all steps at once, giving ``a_t, b_t`` (the cell's
   :meth:`~gatelab.cells.min_rnn._MinCell.coefficients`), then the linear recurrence in one of two
   forms (:func:`linear_scan`):

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

sLSTM's recurrence is a (block-diagonal) matrix product, so its loop stays step by step: one input
GEMM for all steps, then the C++ ``slstm_forward`` (the stabilised step with states ``h, c, n, m``,
each head's ``R_k h_k`` per step) and a hand-written BPTT, ``slstm_backward`` (one reverse pass per
sequence, giving ``∂L/∂p`` of every step; ``∂L/∂R`` is then one GEMM over all steps). The C++ knows
``exp`` and ``sigmoid`` for the ``i`` and ``f`` gates and :data:`SLSTM_KINDS` for ``z`` and ``o``;
another activation (or a learnable one) runs the PyTorch loop of :func:`run_slstm` under autograd.

Padded steps (``lengths``) hold the state and output zero, as everywhere in gatelab.

Every ``gatelab_scan`` op has a fake kernel and the forward ops a registered autograd
(:func:`_register`, at the first eager use), so under torch.compile and torch.export each layer and
direction is one op node; the forms without an op trace as plain PyTorch, and torch.func transforms
run the PyTorch forms (the ops have no vmap rules).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import activations
from ..cells import RecurrentCell
from ..cells.indrnn import IndRNNCell
from ..cells.min_rnn import SCAN_FORMS, MinGRUCell, MinLSTMCell, _MinCell
from ..cells.slstm import SLSTMCell
from . import native, reference
from .base import ZoneoutMasks, tracing_or_transforming
from .fused import cpp
from .fused.ops import _previous_cell_states

if TYPE_CHECKING:
    from ..layers.base import RecurrentLayer

FORMS = SCAN_FORMS
# IndRNN activations the C++ pass knows, in the order of kernels_scan.cpp's enum ScanAct.
INDRNN_KINDS = ("identity", "relu", "tanh", "sigmoid", "leaky_relu", "hardtanh")
_DEFAULT_PARAM = {"leaky_relu": 0.01, "hard_sigmoid": 1 / 6}
# sLSTM activations the C++ step knows (and minGRU / minLSTM's fused pass, in every slot), in the order of
# kernels_scan.cpp's enum SlstmAct; sLSTM's i and f gates take exp or sigmoid only (their log is needed
# in closed form).
SLSTM_KINDS = ("identity", "sigmoid", "hard_sigmoid", "elliott", "tanh", "hardtanh", "softsign", "relu", "leaky_relu",
               "exp")
SLSTM_LOG_GATES = ("exp", "sigmoid")


def cpp_ready() -> bool:
    """Whether the C++ scan kernels are loaded (built with the fused engine's kernels at first use)."""
    if _registered:  # the common case, and the only one torch.compile sees after a first eager call
        return True
    if torch.compiler.is_compiling():  # nothing is built or registered while tracing: the PyTorch forms trace
        return False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fused engine warns once about a failed build itself
        ready = cpp.load() and hasattr(torch.ops, "gatelab_scan") and hasattr(torch.ops.gatelab_scan, "min_rnn_forward")
    if ready:
        _register()
    return ready


def _use_cpp(t: Tensor) -> bool:
    return t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64) and cpp_ready()


def _transforming() -> bool:
    """A torch.func transform is running: the ops have no vmap rules, so the plain PyTorch forms run."""
    return torch._C._are_functorch_transforms_active()


# -- torch.library: fake kernels and autograd of the gatelab_scan ops (torch.compile, torch.export) --------

_registered = False


def _fake_linear_scan(a, b, h0, reverse):
    return torch.empty_like(b)


def _fake_linear_scan_backward(a, H, h0, gH, reverse):
    return [torch.empty_like(a), torch.empty_like(a), torch.empty_like(h0)]


def _fake_indrnn_forward(xw, u, h0, lengths, kind, param, reverse):
    return torch.empty_like(xw)


def _fake_slstm_forward(xw, R, b_hh, h0, c0, n0, m0, lengths, num_heads, kinds, params, reverse):
    T, B, G = xw.shape
    return [xw.new_empty((T, B, G // 4)) for _ in range(4)] + [xw.new_empty((T, B, G))]


def _fake_min_rnn_forward(xw, h0, lengths, kinds, params, reverse):
    T, B, G = xw.shape
    return [xw.new_empty((T, B, G // len(kinds))), xw.new_empty((B, G // len(kinds)))]


def _fake_min_rnn_backward(xw, h0, out, g_out, g_last, lengths, kinds, params, reverse):
    return [torch.empty_like(xw), xw.new_empty(out.shape[1:])]


def _fake_slstm_backward(R, P, h0, c0, n0, m0, Hs, Cs, Ns, Ms, gH, gC, gN, gM, lengths, num_heads, kinds, params,
                         reverse):
    return [torch.empty_like(P), *(torch.empty_like(s) for s in (h0, c0, n0, m0))]


def _setup_linear_scan(ctx, inputs, output):
    a, _, h0, reverse = inputs
    ctx.save_for_backward(a, output, h0)
    ctx.reverse = reverse


def _backward_linear_scan(ctx, gH):
    a, H, h0 = ctx.saved_tensors
    ga, gb, gh0 = torch.ops.gatelab_scan.linear_scan_backward(a, H, h0, gH.contiguous(), ctx.reverse)
    return ga, gb, gh0, None


def _setup_indrnn(ctx, inputs, output):
    xw, u, h0, lengths, kind, param, reverse = inputs
    ctx.save_for_backward(xw, u, h0, output, lengths)
    ctx.kind, ctx.param, ctx.reverse = kind, param, reverse


def _backward_indrnn(ctx, gH):
    xw, u, h0, H, lengths = ctx.saved_tensors
    kind = INDRNN_KINDS[ctx.kind]
    phi = activations.get(f"{kind}:{ctx.param!r}" if kind == "leaky_relu" else kind)
    live = _live(lengths, xw.shape[0], xw)
    dz, du, gh0 = _indrnn_grads(xw, u, h0, H, live, phi, gH, ctx.reverse)
    return dz, du, gh0, None, None, None, None


def _setup_slstm(ctx, inputs, output):
    xw, R, b_hh, h0, c0, n0, m0, lengths, num_heads, kinds, params, reverse = inputs
    Hs, Cs, Ns, Ms, P = output
    ctx.save_for_backward(R, P, h0, c0, n0, m0, Hs, Cs, Ns, Ms, lengths)
    ctx.config = (num_heads, kinds, params, reverse, b_hh is not None)


def _backward_slstm(ctx, grads):
    R, P, h0, c0, n0, m0, Hs, Cs, Ns, Ms, lengths = ctx.saved_tensors
    num_heads, kinds, params, reverse, has_bias = ctx.config
    g = [torch.zeros_like(Hs) if x is None else x.contiguous() for x in grads[:4]]  # P's gradient: not an output
    dP, gh0, gc0, gn0, gm0 = torch.ops.gatelab_scan.slstm_backward(
        R, P, h0, c0, n0, m0, Hs, Cs, Ns, Ms, *g, lengths, num_heads, kinds, params, reverse)
    T, B, H = Hs.shape
    K, d = num_heads, H // num_heads
    H_prev = _previous_cell_states(Hs, h0, reverse)
    # ∂L/∂R[g, k] = Σ_{t,b} dp[t, b, g, k, :] ⊗ h_prev[t, b, k, :]: one GEMM per head over all steps
    gR = torch.einsum("ngko,nki->gkoi", dP.reshape(T * B, 4, K, d), H_prev.reshape(T * B, K, d)).reshape(4 * H, d)
    gb = dP.sum((0, 1)) if has_bias else None
    return dP, gR, gb, gh0, gc0, gn0, gm0, None, None, None, None, None


def _setup_min_rnn(ctx, inputs, output):
    xw, h0, lengths, kinds, params, reverse = inputs
    ctx.save_for_backward(xw, h0, output[0], lengths)
    ctx.config = (kinds, params, reverse)


def _backward_min_rnn(ctx, grads):
    xw, h0, out, lengths = ctx.saved_tensors
    g_out, g_last = grads
    dxw, gh0 = torch.ops.gatelab_scan.min_rnn_backward(xw, h0, out, g_out, g_last, lengths, *ctx.config)
    return dxw, gh0.view_as(h0), None, None, None, None


def _register() -> None:
    """Fake (meta) kernels for every gatelab_scan op and autograd for the four forward ops, so that
    torch.compile and torch.export see each as one differentiable node (the backward ops are once
    differentiable: a second derivative is not defined)."""
    global _registered
    if _registered:
        return
    ns = "gatelab_scan::"
    for name, fake in (("linear_scan", _fake_linear_scan), ("linear_scan_backward", _fake_linear_scan_backward),
                       ("indrnn_forward", _fake_indrnn_forward), ("slstm_forward", _fake_slstm_forward),
                       ("slstm_backward", _fake_slstm_backward), ("min_rnn_forward", _fake_min_rnn_forward),
                       ("min_rnn_backward", _fake_min_rnn_backward)):
        torch.library.register_fake(ns + name, fake)
    torch.library.register_autograd(ns + "linear_scan", _backward_linear_scan, setup_context=_setup_linear_scan)
    torch.library.register_autograd(ns + "indrnn_forward", _backward_indrnn, setup_context=_setup_indrnn)
    torch.library.register_autograd(ns + "slstm_forward", _backward_slstm, setup_context=_setup_slstm)
    torch.library.register_autograd(ns + "min_rnn_forward", _backward_min_rnn, setup_context=_setup_min_rnn)
    _registered = True


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
    H_prev = _previous_cell_states(H, h0, reverse)
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
    if _transforming() or (torch.compiler.is_compiling() and not (form == "sequential" and _use_cpp(a))):
        return scan_parallel(a, b, h0, reverse) if form == "parallel" else scan_loop_autograd(a, b, h0, reverse)
    if torch.compiler.is_compiling():  # the op itself: one differentiable node (registered above)
        return torch.ops.gatelab_scan.linear_scan(a.contiguous(), b.contiguous(), h0.contiguous(), reverse)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (a, b, h0)):
        return LinearScan.apply(a, b, h0, reverse, form)
    return _scan(a, b, h0, reverse, form)


def scan_loop_autograd(a: Tensor, b: Tensor, h0: Tensor, reverse: bool) -> Tensor:
    """:func:`scan_loop` without writes into a preallocated tensor, for autograd and tracing."""
    h, out = h0, []
    for t in (range(a.shape[0] - 1, -1, -1) if reverse else range(a.shape[0])):
        h = a[t] * h + b[t]
        out.append(h)
    return torch.stack(out[::-1] if reverse else out)


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


def indrnn_loop_autograd(xw: Tensor, u: Tensor, h0: Tensor, live: Tensor | None, phi: Callable[[Tensor], Tensor],
                         reverse: bool) -> Tensor:
    """:func:`indrnn_loop` without writes into a preallocated tensor, for autograd and tracing."""
    h, out = h0, []
    for t in (range(xw.shape[0] - 1, -1, -1) if reverse else range(xw.shape[0])):
        new = phi(xw[t] + u * h)
        h = new if live is None else torch.where(live[t], new, h)
        out.append(h)
    return torch.stack(out[::-1] if reverse else out)


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
        dz, du, gh0 = _indrnn_grads(xw, u, h0, H, live, ctx.phi, gH, ctx.reverse)
        return dz, du, gh0, None, None, None, None


def _indrnn_grads(xw: Tensor, u: Tensor, h0: Tensor, H: Tensor, live: Tensor | None, phi, gH: Tensor, reverse: bool
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """``(∂L/∂xw, ∂L/∂u, ∂L/∂h0)`` of IndRNN's pass from ``gH = ∂L/∂h_t`` (every step as an output)."""
    H_prev = _previous_cell_states(H, h0, reverse)
    z = torch.addcmul(xw, u, H_prev)
    D = phi.derivative(z, phi(z))  # φ'(z_t), every step at once
    if live is not None:
        D = D * live
    # g_{t−1} = gH_{t−1} + c_t ⊙ g_t with c_t = u φ'(z_t) on live steps, 1 on dead ones (the state is held)
    c = u * D if live is None else torch.where(live, u * D, 1.0)
    G_times_prev, G, gh0 = _scan_backward(c, H, h0, gH.contiguous(), reverse, "sequential")
    return G * D, (G_times_prev * D).sum((0, 1)), gh0


def _live(lengths: Tensor | None, T: int, like: Tensor) -> Tensor | None:
    if lengths is None:
        return None
    return (torch.arange(T, device=like.device).unsqueeze(1) < lengths.to(like.device)).unsqueeze(2)  # (T, B, 1)


# -- the runners, one per cell kind ---------------------------------------------------------------------------


def _cpp_kinds(cell: RecurrentCell, slots, what: str) -> tuple[list[int], list[float]] | str:
    """The C++ kinds and parameters of ``slots`` (``(attribute, allowed kinds)``, in order), or which of
    them ``what`` has no kernel for."""
    found, blockers = [], []
    for slot, allowed in slots:
        act = getattr(cell, slot)
        kind = _slstm_kind(act, allowed)
        if kind is None:
            blockers.append(f"{slot} = {getattr(act, 'key', type(act).__name__)}")
        found.append(kind)
    if blockers:
        return f"{what} has no " + ", ".join(blockers)
    return [k[0] for k in found], [k[1] for k in found]


def min_kinds(cell: _MinCell) -> tuple[list[int], list[float]] | str:
    """The C++ kinds and parameters of the cell's slots in the order of ``xw``'s blocks (``z, h`` or
    ``f, i, h``), or why the fused C++ pass does not apply."""
    return _cpp_kinds(cell, [(slot.attr, SLSTM_KINDS) for slot in cell.slots], "the fused C++ pass")


def run_min(cell: _MinCell, x: Tensor, state: tuple[Tensor, ...], lengths: Tensor | None, reverse: bool,
            form: str) -> tuple[Tensor, tuple[Tensor, ...]]:
    """minGRU / minLSTM over ``x (T, B, I)``: one GEMM, then the fused C++ pass (``min_rnn_forward``,
    its autograd registered above), or the activations over all steps and one scan."""
    (h0,) = state
    xw = F.linear(x, cell.weight_ih, cell.bias_ih)  # (T, B, G·H)
    kinds = min_kinds(cell)
    if (resolve_form(form, x) == "sequential" and not isinstance(kinds, str) and _use_cpp(xw)
            and not _transforming()):
        if lengths is not None:
            lengths = lengths.to(device=xw.device, dtype=torch.long)
        out, last = torch.ops.gatelab_scan.min_rnn_forward(xw.contiguous(), h0.contiguous(), lengths, kinds[0],
                                                           kinds[1], reverse)  # (T, B, H), (B, H)
        return out, (last,)
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
    kind = _indrnn_kind(cell.phi)
    if torch.compiler.is_compiling() and kind is not None and _use_cpp(xw):  # one node, registered autograd
        H = torch.ops.gatelab_scan.indrnn_forward(xw.contiguous(), u, h0.contiguous(), lengths, kind[0], kind[1],
                                                  reverse)
    elif tracing_or_transforming():
        H = indrnn_loop_autograd(xw, u, h0, live, cell.phi, reverse)
    elif isinstance(cell.phi, torch.nn.Module):  # a learnable φ: its parameters' gradients by autograd through the loop
        H = indrnn_loop(xw, u, h0, live, cell.phi, reverse)
    elif torch.is_grad_enabled() and any(t.requires_grad for t in (xw, u, h0)):
        H = IndRNNScan.apply(xw, u, h0, lengths, live, cell.phi, reverse)
    else:
        H = (torch.ops.gatelab_scan.indrnn_forward(xw, u, h0, lengths, kind[0], kind[1], reverse)
             if kind is not None and _use_cpp(xw) else indrnn_loop(xw, u, h0, live, cell.phi, reverse))
    out = H if live is None else H * live
    return out, (H[0] if reverse else H[-1],)


def _slstm_kind(act, allowed: tuple[str, ...]) -> tuple[int, float] | None:
    kind = getattr(act, "kind", "")
    if kind not in allowed or getattr(act, "learnable", False) or isinstance(act, torch.nn.Module):
        return None
    param = act.param if act.param is not None else _DEFAULT_PARAM.get(kind, 0.0)
    return SLSTM_KINDS.index(kind), float(param)


def slstm_kinds(cell: SLSTMCell) -> tuple[list[int], list[float]] | str:
    """The C++ kinds and parameters of the slots ``i, f, z, o``, or why the C++ step does not apply."""
    return _cpp_kinds(cell, (("sigma_i", SLSTM_LOG_GATES), ("sigma_f", SLSTM_LOG_GATES), ("phi", SLSTM_KINDS),
                             ("sigma_o", SLSTM_KINDS)), "the C++ step")


def run_slstm(cell: SLSTMCell, x: Tensor, state: tuple[Tensor, ...], lengths: Tensor | None, reverse: bool,
              form: str) -> tuple[Tensor, tuple[Tensor, ...]]:
    """sLSTM over ``x (T, B, I)``: the input GEMM of all steps hoisted, then the C++ step loop and its
    hand-written backward (the op ``gatelab_scan::slstm_forward``, its autograd registered above), or,
    for activations the C++ lacks, the step loop in PyTorch under autograd (:func:`slstm_loop`)."""
    xw = F.linear(x, cell.weight_ih, cell.bias_ih)  # (T, B, 4H)
    kinds = slstm_kinds(cell)
    if isinstance(kinds, str) or not _use_cpp(xw) or _transforming():
        return slstm_loop(cell, xw, state, lengths, reverse)
    if lengths is not None:
        lengths = lengths.to(device=xw.device, dtype=torch.long)
    Hs, Cs, Ns, Ms, _ = torch.ops.gatelab_scan.slstm_forward(
        xw.contiguous(), cell.weight_hh, cell.bias_hh, *(s.contiguous() for s in state), lengths, cell.num_heads,
        kinds[0], kinds[1], reverse)
    live = _live(lengths, x.shape[0], x)
    out = Hs if live is None else Hs * live
    last = 0 if reverse else -1
    return out, (Hs[last], Cs[last], Ns[last], Ms[last])


def slstm_loop(cell: SLSTMCell, xw: Tensor, state: tuple[Tensor, ...], lengths: Tensor | None, reverse: bool
               ) -> tuple[Tensor, tuple[Tensor, ...]]:
    """sLSTM's step loop in PyTorch from the input projections ``xw (T, B, 4H)`` (the C++ loop's twin)."""
    T = xw.shape[0]
    outputs: list[Tensor] = [xw.new_empty(0)] * T
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
    traceable = True  # the gatelab_scan ops have fake kernels and registered autograd; under torch.func the
    # PyTorch forms run (the ops have no vmap rules)

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
            kinds = min_kinds(cell)
            if form == "sequential" and not isinstance(kinds, str) and here != "PyTorch loop":
                return ("the fused engine: one input GEMM for all steps, then one fused elementwise pass per "
                        f"direction (activations and recurrence together, {here}); the backward one fused "
                        "reverse pass")
            why = f" ({kinds})" if form == "sequential" and isinstance(kinds, str) else ""
            what = ("one elementwise pass per direction" + f" ({here})" if form == "sequential"
                    else "a parallel (associative, Hillis–Steele) scan in PyTorch")
            return f"the fused engine: one input GEMM for all steps, the activations over all steps{why}, then {what}"
        if isinstance(cell, IndRNNCell):
            kind = _indrnn_kind(cell.phi)
            loop = here if kind is not None else "PyTorch loop"
            why = "" if kind is not None else f" ({getattr(cell.phi, 'key', 'this activation')} has no C++ pass)"
            return (f"the fused engine: one input GEMM for all steps, then one elementwise pass per direction "
                    f"({loop}{why}); the backward is a linear scan")
        kinds = slstm_kinds(cell)
        if isinstance(kinds, str) or here == "PyTorch loop":
            why = f" ({kinds})" if isinstance(kinds, str) else ""
            return ("the fused engine: sLSTM's input GEMM hoisted out of the step loop; the block-diagonal "
                    f"recurrence step by step in PyTorch under autograd{why}")
        return ("the fused engine: sLSTM's input GEMM for all steps, then the stabilised step loop with its "
                f"block-diagonal recurrence and a hand-written backward ({here})")

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


__all__ = ["ENGINE", "ScanEngine", "FORMS", "INDRNN_KINDS", "SLSTM_KINDS", "slstm_kinds", "min_kinds",
            "linear_scan", "scan_loop", "scan_parallel", "choose",
           "cpp_ready", "resolve_form", "RUNNERS"]
