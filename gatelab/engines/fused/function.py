"""The fused engine's autograd function: one direction of one layer with hand-written BPTT.

Forward: the input projection of all steps as one matrix product, then per step one recurrent
product and one elementwise step. Backward: per step (in reverse) the elementwise backward and one
product with ``W_hh``; the weight gradients are matrix products over all steps after the loop.

This file is the pure-PyTorch implementation; ``kernels.cpp`` runs the same loop in C++.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .steps import Step


class FusedDirection(torch.autograd.Function):
    """``apply(step, reverse, lengths, rec_mask, x, W_ih, W_hh, b_ih, b_hh, *state, *extra)``
    returns ``(out (T, B, O), *final_state)``. ``b_ih``/``b_hh`` may be ``None``."""

    @staticmethod
    def forward(ctx: Any, step: Step, reverse: bool, lengths: Tensor | None, rec_mask: Tensor | None,
                x: Tensor, W_ih: Tensor, W_hh: Tensor, b_ih: Tensor | None, b_hh: Tensor | None,
                *rest: Tensor) -> tuple[Tensor, ...]:
        n_state = len(step.cell.state_names)
        state = tuple(rest[:n_state])
        T, B, I = x.shape
        GH = W_ih.shape[0]
        xw = (x.reshape(T * B, I) @ W_ih.t()).view(T, B, GH)  # (T, B, G·H)
        if b_ih is not None:
            xw += b_ih
        order = range(T - 1, -1, -1) if reverse else range(T)
        outs: list[Tensor] = [x.new_empty(0)] * T
        saved: list[Any] = [None] * T
        h_recs = x.new_empty(T, B, W_hh.shape[1])  # (T, B, R): what each step multiplied W_hh with
        for t in order:
            h_rec = state[0] if rec_mask is None else state[0] * rec_mask
            h_recs[t] = h_rec
            gh = h_rec @ W_hh.t()
            if b_hh is not None:
                gh += b_hh
            out, new, saved[t] = step.forward(xw[t], gh, state, h_rec)
            if lengths is not None:
                live = (lengths > t).unsqueeze(1).to(x.dtype)  # (B, 1)
                new = tuple(torch.lerp(old, s, live) for old, s in zip(state, new))
                out = out * live
            state = new
            outs[t] = out
        ctx.step, ctx.reverse, ctx.n_state, ctx.saved_steps = step, reverse, n_state, saved
        ctx.has_bias = b_ih is not None
        ctx.save_for_backward(x, W_ih, W_hh, h_recs, lengths, rec_mask, *rest[:n_state])
        return (torch.stack(outs), *state)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dout: Tensor | None, *dfinal: Tensor | None) -> tuple[Tensor | None, ...]:
        x, W_ih, W_hh, h_recs, lengths, rec_mask, *state0 = ctx.saved_tensors
        step: Step = ctx.step
        T, B, I = x.shape
        GH = W_ih.shape[0]
        dstate = tuple(torch.zeros_like(s) if d is None else d for s, d in zip(state0, dfinal))
        dout = torch.zeros(T, B, step.cell.output_size, dtype=x.dtype, device=x.device) if dout is None else dout
        dxws = x.new_zeros(T, B, GH)
        dghs = x.new_zeros(T, B, GH)
        pgrads: dict[str, Tensor] = {}
        order = range(T) if ctx.reverse else range(T - 1, -1, -1)
        for t in order:
            live = None if lengths is None else (lengths > t).unsqueeze(1).to(x.dtype)
            do_t = dout[t] if live is None else dout[t] * live
            ds_t = dstate if live is None else tuple(d * live for d in dstate)
            dxw, dgh, dprev, dh_extra = step.backward(do_t, ds_t, ctx.saved_steps[t], None, pgrads, [])
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
        dxw2, dgh2 = dxws.view(T * B, GH), dghs.view(T * B, GH)
        dx = (dxw2 @ W_ih).view(T, B, I)
        dW_ih = dxw2.t() @ x.reshape(T * B, I)
        dW_hh = dgh2.t() @ h_recs.view(T * B, -1)
        db_ih = dxw2.sum(0) if ctx.has_bias else None
        db_hh = dgh2.sum(0) if ctx.has_bias else None
        step.fix_weight_grads(dW_hh, db_hh, dxws, ctx.saved_steps)
        ctx.saved_steps = None
        return (None, None, None, None, dx, dW_ih, dW_hh, db_ih, db_hh, *dstate, *step.param_grads(pgrads))
