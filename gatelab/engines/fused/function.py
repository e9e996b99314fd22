"""The fused engine's autograd function: one direction of one layer with hand-written BPTT.

Forward: the input projection of all steps as one matrix product, then a *time loop* (per step one
recurrent product and one elementwise step). Backward: the loop's hand-written backward, then the
weight gradients as matrix products over all steps. Here the loop is :class:`PyLoop` (pure PyTorch,
over :mod:`.steps`; always available, handles every option), the readable twin of the C++ loops,
which are torch operators of their own with the same arithmetic (:mod:`.ops`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_unflatten

from .cpp import matmul
from .steps import Step

_TENSOR = object()  # where a tensor of the loop's saved structure went to save_for_backward


class PyLoop:
    """The time loop in PyTorch over a :class:`~.steps.Step`. ``zoneout``: per state tensor the keep
    shares ``m (T, B, S)`` or None (see :func:`gatelab.engines.reference.run_direction`). ``forward``
    returns ``(out (T, B, O), final state, saved)``; ``backward`` returns ``(dL/dxw, dL/dgh (T, B, G·H),
    dL/dstate0, h_rec (T, B, R), extra parameter grads)``."""

    def __init__(self, step: Step, zoneout: tuple[Tensor | None, ...] | None = None) -> None:
        self.step = step
        self.zoneout = zoneout
        self.output_state = step.cell.output_state  # which state is also the output (None: computed)

    def forward(self, xw, W_hh, b_hh, state, lengths, rec_mask, reverse):
        T, B, _ = xw.shape
        order = range(T - 1, -1, -1) if reverse else range(T)
        outs: list[Tensor] = [xw.new_empty(0)] * T
        saved: list[Any] = [None] * T
        h_recs = xw.new_empty(T, B, W_hh.shape[1])  # (T, B, R): what each step multiplied W_hh with
        for t in order:
            h_rec = state[0] if rec_mask is None else state[0] * rec_mask
            h_recs[t] = h_rec
            gh = h_rec @ W_hh.t()
            if b_hh is not None:
                gh += b_hh
            out, new, saved[t] = self.step.forward(xw[t], gh, state, h_rec)
            if self.zoneout is not None:
                new = tuple(s if m is None else m[t] * old + (1 - m[t]) * s for old, s, m in zip(state, new, self.zoneout))
                out = out if self.output_state is None else new[self.output_state]
            if lengths is not None:
                live = (lengths > t).unsqueeze(1)  # (B, 1); where, not a blend: a dead row's update may be inf
                new = tuple(torch.where(live, s, old) for old, s in zip(state, new))
                out = out * live
            state = new
            outs[t] = out
        return torch.stack(outs), state, (saved, h_recs)

    def backward(self, saved, dout, dstate, W_hh, lengths, rec_mask, reverse):
        steps, h_recs = saved
        T, B, _ = dout.shape
        GH = W_hh.shape[0]
        dxws = dout.new_empty(T, B, GH)  # every step writes its row below
        dghs = dout.new_empty(T, B, GH)
        pgrads: dict[str, Tensor] = {}
        for t in range(T) if reverse else range(T - 1, -1, -1):
            live = None if lengths is None else (lengths > t).unsqueeze(1).to(dout.dtype)
            do_t = dout[t] if live is None else dout[t] * live
            ds_t = dstate if live is None else tuple(d * live for d in dstate)
            kept = None
            if self.zoneout is not None:  # new = m·old + (1 − m)·update: split the gradient between them
                if (k := self.output_state) is not None:  # the output is the zoned-out state
                    ds_t, do_t = (*ds_t[:k], ds_t[k] + do_t, *ds_t[k + 1:]), torch.zeros_like(do_t)
                kept = tuple(None if m is None else d * m[t] for d, m in zip(ds_t, self.zoneout))
                ds_t = tuple(d if m is None else d * (1 - m[t]) for d, m in zip(ds_t, self.zoneout))
            dxw, dgh, dprev, dh_extra = self.step.backward(do_t, ds_t, steps[t], None, pgrads, [])
            if kept is not None:
                dprev = tuple(p if k is None else p + k for p, k in zip(dprev, kept))
            dh_rec = dgh @ W_hh
            if dh_extra is not None:
                dh_rec = dh_rec + dh_extra
            if rec_mask is not None:
                dh_rec = dh_rec * rec_mask
            dprev = (dprev[0] + dh_rec, *dprev[1:])
            if live is not None:  # dead rows: the state passed through unchanged
                dprev = tuple(p + d * (1 - live) for p, d in zip(dprev, dstate))
            dstate = dprev
            dxws[t], dghs[t] = dxw, dgh
        return dxws, dghs, dstate, h_recs, self.step.param_grads(pgrads)


def input_projection(x: Tensor, W_ih: Tensor, b_ih: Tensor | None) -> Tensor:
    """``x W_ihᵀ + b_ih`` for all steps as one product: (T, B, I) -> (T, B, G·H) (``b_hh`` is added to
    each step's recurrent product)."""
    T, B, I = x.shape
    return matmul(x.reshape(T * B, I), W_ih.t(), b_ih).view(T, B, -1)


def infer(loop: PyLoop, reverse: bool, lengths: Tensor | None, rec_mask: Tensor | None, x: Tensor, W_ih: Tensor,
          W_hh: Tensor, b_ih: Tensor | None, b_hh: Tensor | None, *state: Tensor) -> tuple[Tensor, ...]:
    """The forward pass without autograd: same results as :class:`FusedDirection`, nothing kept."""
    with torch.no_grad():
        out, final, _ = loop.forward(input_projection(x, W_ih, b_ih), W_hh, b_hh, state, lengths, rec_mask, reverse)
    return (out, *final)


class FusedDirection(torch.autograd.Function):
    """``apply(loop, reverse, lengths, rec_mask, x, W_ih, W_hh, b_ih, b_hh, *state, *extra)``
    returns ``(out (T, B, O), *final_state)``; ``extra`` are the loop's extra parameters (peepholes,
    projection, learnable activations, layer-norm gains) in the order its backward returns their
    gradients."""

    @staticmethod
    def forward(ctx: Any, loop: PyLoop, reverse: bool, lengths: Tensor | None, rec_mask: Tensor | None,
                x: Tensor, W_ih: Tensor, W_hh: Tensor, b_ih: Tensor | None, b_hh: Tensor | None,
                *rest: Tensor) -> tuple[Tensor, ...]:
        n_state = len(loop.step.cell.state_names)
        xw = input_projection(x, W_ih, b_ih)  # (T, B, G·H)
        out, final, saved = loop.forward(xw, W_hh, b_hh, tuple(rest[:n_state]), lengths, rec_mask, reverse)
        ctx.loop, ctx.reverse, ctx.has_bias = loop, reverse, b_ih is not None
        ctx.x_shape = x.shape
        # The cell's tensors as bound for this call (a layer's parametrised or functional_call weights):
        # the backward reads projections, gains and activation slopes from the cell, after the layer
        # has restored it, so it binds these again.
        ctx.weights = dict(loop.step.cell.named_parameters())
        # which cell parameter each extra input is, for a differentiable backward (see backward)
        ctx.extra_names = [next(n for n, t in ctx.weights.items() if t is e) for e in rest[n_state:]]
        ctx.n_state = n_state
        # What the loop saved goes through save_for_backward as well: held as a plain attribute it would
        # live as long as the node (as long as any output is referenced, not just until the backward),
        # and the final states, which are its last step's tensors, would close a cycle through the node
        # that Python's collector cannot see (every call's saved loop stayed in memory).
        leaves, ctx.loop_spec = tree_flatten(saved)
        ctx.loop_leaves = [_TENSOR if isinstance(t, Tensor) else t for t in leaves]
        inputs = (x, W_ih, W_hh, lengths, rec_mask, b_ih, b_hh, *rest)
        ctx.n_inputs = len(inputs)
        ctx.save_for_backward(*inputs, *(t for t in leaves if isinstance(t, Tensor)))
        return (out, *final)

    @staticmethod
    def backward(ctx: Any, dout: Tensor | None, *dfinal: Tensor | None) -> tuple[Tensor | None, ...]:
        if torch.is_grad_enabled():  # create_graph=True: the gradient must itself be differentiable
            return _differentiable_backward(ctx, dout, dfinal)
        return _hand_backward(ctx, dout, dfinal)


def _differentiable_backward(ctx: Any, dout: Tensor | None, dfinal: tuple[Tensor | None, ...]
                             ) -> tuple[Tensor | None, ...]:
    """The backward as a graph, for double backward (gradient penalties, meta-learning): the direction is
    recomputed on the reference loop from the saved inputs, with the cell bound to them, and
    differentiated with ``create_graph=True``; the result equals the hand-written backward and stays
    connected to every input."""
    from .. import reference

    x, W_ih, W_hh, lengths, rec_mask, b_ih, b_hh, *rest = ctx.saved_tensors[:ctx.n_inputs]
    loop: PyLoop = ctx.loop
    cell = loop.step.cell
    state, extra = tuple(rest[:ctx.n_state]), rest[ctx.n_state:]
    bound = {"weight_ih": W_ih, "weight_hh": W_hh, **dict(zip(ctx.extra_names, extra))}
    if b_ih is not None:
        bound.update(bias_ih=b_ih, bias_hh=b_hh)
    zoneout = loop.zoneout
    with cell.using(bound):
        out, final = reference.run_direction(cell, x, state, lengths, ctx.reverse, rec_mask=rec_mask, weight_hh=W_hh,
                                             zoneout=zoneout)
    outputs, grads = [], []
    for t, g in zip((out, *final), (dout, *dfinal)):
        if g is not None and t.requires_grad:
            outputs.append(t)
            grads.append(g)
    inputs = [x, W_ih, W_hh, b_ih, b_hh, *state, *extra]
    # one gradient per distinct tensor: an activation module shared by several gates is one input
    # several times, and its full gradient belongs to the first of them only
    first = {}
    for k, t in enumerate(inputs):
        if t is not None and t.requires_grad:
            first.setdefault(id(t), k)
    unique = sorted(first.values())
    found = torch.autograd.grad(outputs, [inputs[k] for k in unique], grads, create_graph=True, allow_unused=True) \
        if outputs and unique else ()
    by_position = dict(zip(unique, found))
    return (None, None, None, None, *(by_position.get(k) for k in range(len(inputs))))


def _hand_backward(ctx: Any, dout: Tensor | None, dfinal: tuple[Tensor | None, ...]) -> tuple[Tensor | None, ...]:
    """The hand-written backward: the loop's backward, then the weight gradients as matrix products (grad
    mode is off here: the autograd engine runs a backward that way unless create_graph=True)."""
    tensors = ctx.saved_tensors
    x, W_ih, W_hh, lengths, rec_mask = tensors[:5]
    kept = iter(tensors[ctx.n_inputs:])
    saved = tree_unflatten([next(kept) if t is _TENSOR else t for t in ctx.loop_leaves], ctx.loop_spec)
    loop: PyLoop = ctx.loop
    T, B, I = ctx.x_shape
    GH = W_hh.shape[0]
    cell = loop.step.cell
    sizes = cell.state_sizes()
    dstate = tuple(W_hh.new_zeros(B, s) if d is None else d.contiguous() for s, d in zip(sizes, dfinal))
    dout = W_hh.new_zeros(T, B, cell.output_size) if dout is None else dout.contiguous()
    with cell.using(ctx.weights):
        dxws, dghs, dstate0, h_recs, extra = loop.backward(saved, dout, dstate, W_hh, lengths, rec_mask,
                                                           ctx.reverse)
    dxw2, dgh2 = dxws.view(T * B, GH), dghs.view(T * B, GH)
    need = ctx.needs_input_grad  # skip the products nobody asked for (e.g. dx of a data batch)
    dx = matmul(dxw2, W_ih).view(T, B, I) if need[4] else None
    dW_ih = matmul(dxw2.t(), x.reshape(T * B, I)) if need[5] else None
    dW_hh = matmul(dgh2.t(), h_recs.view(T * B, -1))  # the step may fold peephole/projection gradients into it
    db_ih = dxw2.sum(0) if ctx.has_bias and need[7] else None
    db_hh = dgh2.sum(0) if ctx.has_bias else None
    loop.step.fix_weight_grads(dW_hh, db_hh, dxws, saved[0])
    return (None, None, None, None, dx, dW_ih, dW_hh, db_ih, db_hh, *dstate0, *extra)
