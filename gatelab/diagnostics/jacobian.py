"""Jacobian norms ‖∂s_T/∂s_t‖₂ of a layer's recurrence, for every t: exact or by power iteration.

The recurrence of one cell (one stacked layer and direction) is ``s_t = F(x_t, s_{t-1})`` with the
state ``s = (h,)``, ``(h, c)`` or ``(s,)``. Its Jacobian over ``k`` steps is the product of the
one-step Jacobians ``J_t = ∂F/∂s`` along the trajectory; ``state`` picks the block of that product
whose spectral norm is reported (``"h"``: ``∂h_T/∂h_t`` with the other state parts at ``t`` held
fixed, ``"c"``, or ``"all"``: the whole state). Sequences in a batch do not interact, so the batch
Jacobian is block-diagonal and its spectral norm is the largest per-sequence one.

* ``method="exact"``: the one-step Jacobians (one batched backward pass per state unit), multiplied out
  in float64 with a running scale (no underflow on a vanishing product), each product's spectral norm
  from a symmetric eigensolver: ``O(T·B·S³)``, for states up to a few hundred units.
* ``method="power"``: block power iteration on ``AᵀA`` for every ``t`` at once, with Jacobian-vector and
  vector-Jacobian products only (never forming a matrix; both by backward passes): ``O(iterations·T²·B·S·G)``.
* ``method="auto"``: exact when the state has at most :data:`EXACT_MAX` units, else power.

Masks (dropout, DropConnect) and zoneout are not part of the Jacobian: it is the eval-mode recurrence.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..layers.base import RecurrentLayer
from .gradients import CellTrace, compute_loss, recording, recurrent_layers, unpack_batch

__all__ = ["jacobian_norms", "EXACT_MAX"]

EXACT_MAX = 256  # largest total state size for which method="auto" forms the Jacobians
RITZ_VECTORS = 4  # vectors per block of the power iteration


def jacobian_norms(
    layer: nn.Module,
    x: Any,
    hx: Tensor | tuple[Tensor, ...] | None = None,
    *,
    module: str | None = None,
    layer_index: int = 0,
    direction: int = 0,
    state: str | None = None,
    method: str = "auto",
    reduce: str = "max",
    iterations: int = 50,
    tol: float = 1e-6,
    seed: int = 0,
) -> np.ndarray:
    """‖∂s_T/∂s_t‖₂ for every ``t``, **by lag**: entry ``k`` is the norm over the last ``k`` steps, so
    entry 0 is the identity's norm (1) and entry ``T`` is ``‖∂s_T/∂s_0‖`` (``s_0`` the initial state).

    ``x`` and ``hx`` are what ``layer`` takes (its layout, unbatched allowed; every sequence runs its
    full length). ``layer`` may also be a model containing gatelab layers: ``x`` is then a batch as
    for :func:`~.gradients.gradient_flow` and ``module`` names the layer (default: the first). The
    input of a cell is what the model feeds it. ``layer_index`` and ``direction`` pick the cell.
    ``state``: a state name (default the first, ``h`` or ``s``) or ``"all"``.
    ``reduce``: ``"max"`` (the batch Jacobian's norm), ``"mean"`` over sequences, or ``"none"`` for
    ``(T + 1, B)``. Power iteration stops after ``iterations`` or when no estimate moves by more than
    ``tol`` relatively.
    """
    if method not in ("auto", "exact", "power"):
        raise ValueError(f"method must be 'auto', 'exact' or 'power', got {method!r}")
    if reduce not in ("max", "mean", "none"):
        raise ValueError(f"reduce must be 'max', 'mean' or 'none', got {reduce!r}")
    trace = _trace(layer, x, hx, module, layer_index, direction)
    cell = trace.cell
    sizes = list(cell.state_sizes())
    names = list(cell.state_names)
    state = state or names[0]
    if state == "all":
        block = slice(0, sum(sizes))
    elif state in names:
        j = names.index(state)
        block = slice(sum(sizes[:j]), sum(sizes[: j + 1]))
    else:
        raise ValueError(f"state must be one of {', '.join(names)} or 'all', got {state!r}")

    def step(x_t: Tensor, s: Tensor) -> Tensor:  # (B, I), (B, S) -> (B, S)
        with cell.using(trace.weights):  # the weights the recorded call ran with
            _, new = cell.step(x_t, tuple(s.split(sizes, 1)))
        return torch.cat(new, 1)

    # The trajectory in processing order: xs[j] is read by step j+1, ss[j] is the state after j steps.
    order = range(trace.x.shape[0] - 1, -1, -1) if trace.reverse else range(trace.x.shape[0])
    xs = [trace.x[t].detach() for t in order]
    ss = [torch.cat([s.detach() for s in trace.initial], 1)]
    with torch.no_grad():
        for x_t in xs:
            ss.append(step(x_t, ss[-1]))
    if method == "auto":
        method = "exact" if sum(sizes) <= EXACT_MAX else "power"
    with torch.enable_grad():
        norms = (_exact if method == "exact" else _power)(step, xs, ss, block, iterations, tol, seed)  # (T+1, B)
    out = norms.detach().double().cpu().numpy()
    if reduce == "max":
        return out.max(1)
    return out.mean(1) if reduce == "mean" else out


def _trace(model: nn.Module, x: Any, hx: Any, module: str | None, layer_index: int, direction: int) -> CellTrace:
    layers = dict(recurrent_layers(model))
    if not layers:
        raise TypeError(f"jacobian_norms takes a gatelab layer (gatelab.RNN, LSTM, GRU, GatedStateRNN) or a model "
                        f"containing one, got {type(model).__name__}")
    module = next(iter(layers)) if module is None else module
    if module not in layers:
        raise ValueError(f"no recurrent layer named {module!r}; have {', '.join(map(repr, layers))}")
    layer = layers[module]
    if not 0 <= layer_index < layer.num_layers or not 0 <= direction < layer.num_directions:
        raise ValueError(f"{type(layer).__name__} has {layer.num_layers} layer(s) and {layer.num_directions} "
                         f"direction(s); got layer_index={layer_index}, direction={direction}")
    was_training = model.training
    model.eval()  # the Jacobian of the deterministic recurrence: no dropout masks in the trajectory
    try:
        with torch.no_grad(), recording(model, leaf_states=False) as traces:
            if isinstance(model, RecurrentLayer):
                model(x, hx)
            elif unpack_batch(x)[1] is not None:
                compute_loss(model, x)
            else:
                model(unpack_batch(x)[0])
    finally:
        model.train(was_training)
    trace = next(tr for tr in traces if tr.module == module and tr.layer == layer_index
                 and tr.direction == direction and tr.call == 0)
    if trace.lengths is not None and bool((trace.lengths < trace.x.shape[0]).any()):
        raise ValueError("jacobian_norms runs every sequence its full length; pass sequences of equal length")
    return trace


def _step_jacobian(step, x_t: Tensor, s: Tensor) -> Tensor:
    """``∂F(x_t, s)/∂s`` per sequence, ``(B, S_out, S_in)``. Sequences do not interact, so one batched
    backward pass per output unit (``is_grads_batched``) gives every sequence's row at once."""
    s = s.detach().requires_grad_()
    out = step(x_t, s)
    B, S = out.shape
    basis = torch.eye(S, dtype=out.dtype, device=out.device).unsqueeze(1).expand(S, B, S)  # (S_out, B, S)
    (rows,) = torch.autograd.grad(out, s, basis, is_grads_batched=True)  # (S_out, B, S_in)
    return rows.transpose(0, 1)


def _spectral_norm(M: Tensor) -> Tensor:
    """Largest singular value of each matrix in ``M (B, m, n)``, float64: ``√λ_max(MᵀM)`` after scaling
    by the largest entry (a symmetric eigensolver is several times faster than an SVD here)."""
    M = M.double()
    finite = torch.isfinite(M).all(-1).all(-1)  # (B,): an overflowed product has norm inf
    M = torch.where(finite[:, None, None], M, torch.zeros_like(M))
    scale = M.abs().amax((-2, -1), keepdim=True)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    Ms = M / safe
    top = torch.linalg.eigvalsh(Ms.mT @ Ms)[..., -1].clamp_min(0).sqrt() * scale[..., 0, 0]
    return torch.where(finite, top, torch.full_like(top, torch.inf))


def _exact(step, xs: list[Tensor], ss: list[Tensor], block: slice, iterations: int, tol: float, seed: int) -> Tensor:
    """Products of the one-step Jacobians in float64, rescaled after each step (the scale kept as a log)
    so that neither a vanishing nor an exploding product leaves the floating-point range."""
    T = len(xs)
    B, S = ss[0].shape
    P = torch.eye(S, dtype=torch.float64, device=ss[0].device).expand(B, S, S)  # ∂s_T/∂s_T
    log_scale = torch.zeros(B, dtype=torch.float64, device=ss[0].device)
    norms = [_spectral_norm(P[:, block, block])]
    for j in range(T, 0, -1):
        P = P @ _step_jacobian(step, xs[j - 1], ss[j - 1]).double()  # ∂s_T/∂s_{j-1} = ∂s_T/∂s_j · J_j
        c = P.abs().amax((-2, -1))
        c = torch.where((c > 0) & torch.isfinite(c), c, torch.ones_like(c))
        P = P / c[:, None, None]
        log_scale = log_scale + c.log()
        norms.append(_spectral_norm(P[:, block, block]) * log_scale.exp())
    return torch.stack(norms)  # (T+1, B), by lag


def _power(step, xs: list[Tensor], ss: list[Tensor], block: slice, iterations: int, tol: float, seed: int) -> Tensor:
    """Block power iteration on AₜᵀAₜ for all start points t at once (Aₜ = block of ∂s_T/∂s_t), with
    :data:`RITZ_VECTORS` vectors and a Rayleigh–Ritz estimate, so that close top singular values do not
    stall it.

    Per step j, ``J_jᵀ w`` is a backward pass and ``J_j u`` the backward pass of that backward pass
    (``J u = ∂(J_jᵀ w · u)/∂w``), so no forward-mode AD is needed; each is batched over start points
    and vectors with ``is_grads_batched``.
    """
    T = len(xs)
    B, S = ss[0].shape
    like = ss[0]
    r = min(RITZ_VECTORS, block.stop - block.start)
    gen = torch.Generator(device=like.device).manual_seed(seed)
    graphs = []
    for j in range(T):
        s = ss[j].detach().requires_grad_()
        out = step(xs[j], s)
        w = torch.zeros_like(out, requires_grad=True)
        (g,) = torch.autograd.grad(out, s, w, create_graph=True)  # J_jᵀ w, linear in w
        graphs.append((out, s, g, w))

    def sweep(V: Tensor, forward: bool) -> tuple[Tensor, Tensor]:
        """V (T, r, B, S): row t starts at state t (forward) or at s_T (backward). Each row is rescaled
        after every step (float32 would underflow over a long vanishing product); the log of the
        factor it was divided by comes back as ``(T, B)``."""
        log_scale = torch.zeros(T, B, dtype=torch.float64, device=like.device)
        for j in range(T) if forward else range(T - 1, -1, -1):  # step j+1 moves rows t <= j
            out, s, g, w = graphs[j]
            rows = V[: j + 1].reshape(-1, B, S)
            (moved,) = torch.autograd.grad(g if forward else out, w if forward else s, rows,
                                           retain_graph=True, is_grads_batched=True)
            moved = moved.reshape(j + 1, r, B, S)
            c = moved.abs().amax((1, 3))  # (j+1, B)
            c = torch.where((c > 0) & torch.isfinite(c), c, torch.ones_like(c))
            log_scale[: j + 1] += c.double().log()
            V = torch.cat([moved / c[:, None, :, None], V[j + 1:]])
        return V, log_scale

    def restrict(V: Tensor) -> Tensor:
        out = torch.zeros_like(V)
        out[..., block] = V[..., block]
        return out

    V = restrict(torch.randn(T, r, B, S, generator=gen, dtype=like.dtype, device=like.device))
    sigma = torch.zeros(T, B, dtype=torch.float64, device=like.device)
    for _ in range(iterations):
        Q = torch.linalg.qr(V.permute(0, 2, 3, 1)).Q  # orthonormal vectors per (t, b): (T, B, S, r)
        W, log_scale = sweep(Q.permute(0, 3, 1, 2), forward=True)  # A V / exp(log_scale)
        W = restrict(W)
        Wm = W.permute(0, 2, 3, 1).double()  # (T, B, S, r)
        ritz = torch.linalg.eigvalsh(Wm.mT @ Wm)[..., -1].clamp_min(0).sqrt()
        new_sigma = ritz * log_scale.exp()  # the Ritz value of AᵀA, as a singular value of A
        V = restrict(sweep(W, forward=False)[0])  # ∝ AᵀA V
        done = bool(((new_sigma - sigma).abs() <= tol * new_sigma).all())
        sigma = new_sigma
        if done:
            break
    lag0 = torch.ones(1, B, dtype=torch.float64, device=like.device)  # the identity's block
    return torch.cat([lag0, sigma.flip(0)])  # row t (start state t) has lag T - t
