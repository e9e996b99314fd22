"""The Triton kernels of the fused engine's GPU loop (imported only where triton is installed).

Two kernels serve every cell (``CELL``: :data:`LSTM`, :data:`GRU`, :data:`ELMAN`, :data:`GATED_STATE`)
and both forms of :mod:`.gpu`:

- :func:`recurrent_forward` runs ``nsteps`` steps of one direction. One program owns a tile of ``BB``
  batch rows and every hidden unit of them. With ``FUSED`` it also computes each step's recurrent
  product ``h_rec · W_hhᵀ`` itself (``tl.dot`` over tiles of ``W_hh``, or, with ``RESIDENT``,
  against tiles loaded once before the time loop and held on chip) and loops over all steps: the
  *persistent* form. Without ``FUSED`` the caller has written that product into ``GH`` and the
  kernel runs one step: the *per-step* form's elementwise kernel.
- :func:`recurrent_backward`, the hand-written backward through time the same way: per step the
  gradients of the pre-activations (``DZ``), then, with ``FUSED``, the gradient reaching the
  previous state through ``W_hh`` (``DZ_t · W_hh``) before the next step.

The steps exchange the recurrent state through global memory (``HR``: the masked state each step
multiplies ``W_hh`` with, which the backward needs anyway), so a program synchronises only its own
threads between steps (``tl.debug_barrier``); programs never wait for each other. State (``h``,
``c``) and arithmetic are float32 (or float64) whatever the tensors' dtype; only the operands of the
recurrent product are in the weights' dtype (tensor cores for bfloat16 and float16).

The activations come in as ``@triton.jit`` functions (``F0``...``F4`` forward, ``D0``...``D4``
derivative ``d(x, y)``), generated from the registry entries' Triton forms (:mod:`.gpu`), so each
combination of activations is compiled into the kernel. The saved buffers follow the contract of the
C++ loops (``kernels.cpp``), so the operators' shared Python around them (projections, weight
gradients) is the same on both devices.
"""

from __future__ import annotations

import triton
import triton.language as tl

# the cells (the CELL argument); constexpr, so that the kernels may read them
LSTM, GRU, ELMAN, GATED_STATE = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2), tl.constexpr(3)


@triton.jit
def _step_of(kk, T, REVERSE: tl.constexpr):
    if REVERSE:
        return T - 1 - kk
    return kk


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """``acc + a · b`` with ``a`` cast to ``b``'s dtype (the weights' dtype: tensor cores for 16-bit);
    ``UPCAST``: both in float32 (Triton's interpreter multiplies 16-bit operands wrongly)."""
    if UPCAST:
        return acc + tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return acc + tl.dot(a.to(b.dtype), b, input_precision=PRECISION)


@triton.jit
def _recurrent_gate(HR_row, W, WT, g, rows, rmask, cols, cmask, H, G, w_gate, acc,
                    FUSED: tl.constexpr, RESIDENT: tl.constexpr, BK: tl.constexpr, UPCAST: tl.constexpr,
                    PRECISION: tl.constexpr):
    """One gate block of a step's recurrent product for the tile (rows, cols): ``HR_row · W_gᵀ``
    (fused), or what the caller computed (``WT`` then points at ``GH``)."""
    if FUSED:
        if RESIDENT:
            ks = tl.arange(0, BK)
            hr = tl.load(HR_row + rows[:, None] * H + ks[None, :], mask=rmask[:, None] & (ks[None, :] < H), other=0.0)
            acc = _dot(hr, w_gate, acc, UPCAST, PRECISION)
        else:
            for k0 in range(0, H, BK):
                ks = k0 + tl.arange(0, BK)
                kmask = ks < H
                hr = tl.load(HR_row + rows[:, None] * H + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
                w = tl.load(W + (g * H + cols)[None, :] * H + ks[:, None], mask=cmask[None, :] & kmask[:, None],
                            other=0.0)
                acc = _dot(hr, w, acc, UPCAST, PRECISION)
    else:
        acc += tl.load(WT + rows[:, None] * G + (g * H + cols)[None, :],
                       mask=rmask[:, None] & cmask[None, :], other=0.0).to(acc.dtype)
    return acc


@triton.jit
def _program_rows(B, BB: tl.constexpr):
    """This program's batch rows, which of them exist, and B as int64 (offsets of whole steps, t·B·G, pass
    2^31 at long sequences)."""
    rows = tl.program_id(0) * BB + tl.arange(0, BB)
    return rows, rows < B, B.to(tl.int64)


@triton.jit
def _resident_tile(W, g, H, BH: tl.constexpr, BK: tl.constexpr):
    """W_g's (k, j) tile, transposed for the product; loaded once when the whole block fits one tile."""
    ks = tl.arange(0, BK)
    cols = tl.arange(0, BH)
    return tl.load(W + (g * H + cols)[None, :] * H + ks[:, None], mask=(cols[None, :] < H) & (ks[:, None] < H),
                   other=0.0)


# not specialised: the loop counters (one compiled kernel for every step of the per-step form) and B (a
# runtime scalar, so that B64 below is int64 even for a batch of one)
@triton.jit(do_not_specialize=["B", "k_first", "nsteps"])
def recurrent_forward(
    XW, W, BHH, HS, CS, OUT, A, C, K, HR, X2, LEN, MASK, ZH, ZC, GH,
    T, B, H, k_first, nsteps,
    CELL: tl.constexpr, NG: tl.constexpr,
    F0: tl.constexpr, F1: tl.constexpr, F2: tl.constexpr, F3: tl.constexpr, F4: tl.constexpr,
    REVERSE: tl.constexpr, TRAIN: tl.constexpr, SAVE_Z: tl.constexpr, WRITE_S: tl.constexpr,
    HAS_BHH: tl.constexpr, HAS_LEN: tl.constexpr, HAS_MASK: tl.constexpr, HAS_ZH: tl.constexpr,
    HAS_ZC: tl.constexpr, HAS_X2: tl.constexpr, FUSED: tl.constexpr, RESIDENT: tl.constexpr,
    BB: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """Steps ``k_first .. k_first + nsteps - 1`` (loop counters; ``_step_of`` gives the time index).

    Buffers, as the C++ loops keep them (``q``: the step's slot, ``t`` when training, else 0):
    ``XW (T, B, NG·H)`` the input projection, overwritten with the pre-activations when ``SAVE_Z``;
    ``HS``/``CS (B, H)`` float32 running state (``h`` or ``s``; ``c``); ``OUT (T, B, H)``; ``A (·, B,
    NG·H)`` the gate activations; ``C`` the LSTM's cell state c' (GRU, gated state: the state handed
    on; Elman: φ's output); ``K`` the LSTM's ψ(c') (GRU: the n block of the recurrent product);
    ``HR`` the masked state each step multiplies ``W_hh`` with (slot ``t`` when training, else
    alternating 0/1); ``X2`` the LSTM's zoned-out cell state or the gated state's s' (zoneout only).
    """
    rows, rmask, B64 = _program_rows(B, BB)
    G = NG * H
    if RESIDENT:
        w0 = _resident_tile(W, 0, H, BH, BK)
        w1 = w0
        w2 = w0
        w3 = w0
        if NG > 1:
            w1 = _resident_tile(W, 1, H, BH, BK)
            w2 = _resident_tile(W, 2, H, BH, BK)
        if NG > 3:
            w3 = _resident_tile(W, 3, H, BH, BK)
    else:
        w0 = tl.full((BK, BH), 0.0, W.dtype.element_ty)
        w1 = w0
        w2 = w0
        w3 = w0
    if HAS_LEN:
        length = tl.load(LEN + rows, mask=rmask, other=0)
    for kk in range(k_first, k_first + nsteps):
        t = _step_of(kk, T, REVERSE)
        if TRAIN:
            q = t
            rec_in = t
            rec_out = _step_of(kk + 1, T, REVERSE)
        else:
            q = 0
            rec_in = kk % 2
            rec_out = (kk + 1) % 2
        HR_in = HR + rec_in * B64 * H
        for j0 in range(0, H, BH):
            cols = j0 + tl.arange(0, BH)
            cmask = cols < H
            m2 = rmask[:, None] & cmask[None, :]
            cell = rows[:, None] * H + cols[None, :]  # (b, j) in a (B, H) buffer
            gate = rows[:, None] * G + cols[None, :]  # (b, j) of block 0 in a (B, NG·H) buffer
            xw_t = XW + t * B64 * G
            if HAS_LEN:
                live = (t < length)[:, None] & m2
            else:
                live = m2
            acc = tl.full((BB, BH), 0.0, tl.float32)
            if XW.dtype.element_ty == tl.float64:
                acc = acc.to(tl.float64)
            zero = acc
            # the pre-activations: input projection plus the recurrent product, block by block
            z0 = tl.load(xw_t + gate, mask=m2, other=0.0).to(acc.dtype)
            r0 = _recurrent_gate(HR_in, W, GH, 0, rows, rmask, cols, cmask, H, G, w0, zero, FUSED, RESIDENT, BK, UPCAST,
                                 PRECISION)
            h_old = tl.load(HS + cell, mask=m2, other=0.0)
            if HAS_ZH:
                mh = tl.load(ZH + t * B64 * H + cell, mask=m2, other=0.0).to(acc.dtype)
            if CELL == ELMAN:
                z = z0 + r0
                y = F0(z)
                new = y
                if HAS_ZH:
                    new = mh * h_old + (1 - mh) * y
                if SAVE_Z:
                    tl.store(xw_t + gate, z.to(XW.dtype.element_ty), mask=live)
                s_keep = tl.where(live, y, h_old)
                if WRITE_S:
                    tl.store(C + q * B64 * H + cell, s_keep.to(C.dtype.element_ty), mask=m2)
                h_new = tl.where(live, new, h_old)
                out = tl.where(live, new, 0.0)
            else:
                z1 = tl.load(xw_t + gate + H, mask=m2, other=0.0).to(acc.dtype)
                z2 = tl.load(xw_t + gate + 2 * H, mask=m2, other=0.0).to(acc.dtype)
                r1 = _recurrent_gate(HR_in, W, GH, 1, rows, rmask, cols, cmask, H, G, w1, zero, FUSED, RESIDENT, BK,
                                     UPCAST, PRECISION)
                r2 = _recurrent_gate(HR_in, W, GH, 2, rows, rmask, cols, cmask, H, G, w2, zero, FUSED, RESIDENT, BK,
                                     UPCAST, PRECISION)
                a_q = A + q * B64 * G + gate
                if CELL == GRU:
                    if HAS_BHH:
                        r0 += tl.load(BHH + cols, mask=cmask, other=0.0).to(acc.dtype)[None, :]
                        r1 += tl.load(BHH + H + cols, mask=cmask, other=0.0).to(acc.dtype)[None, :]
                        r2 += tl.load(BHH + 2 * H + cols, mask=cmask, other=0.0).to(acc.dtype)[None, :]
                    zr = z0 + r0
                    zu = z1 + r1
                    r = F0(zr)
                    u = F1(zu)
                    zn = z2 + r * r2
                    n = F2(zn)
                    upd = (1 - u) * n + u * h_old
                    if HAS_ZH:
                        upd = mh * h_old + (1 - mh) * upd
                    if SAVE_Z:
                        tl.store(xw_t + gate, zr.to(XW.dtype.element_ty), mask=live)
                        tl.store(xw_t + gate + H, zu.to(XW.dtype.element_ty), mask=live)
                        tl.store(xw_t + gate + 2 * H, zn.to(XW.dtype.element_ty), mask=live)
                    tl.store(a_q, r.to(A.dtype.element_ty), mask=live)
                    tl.store(a_q + H, u.to(A.dtype.element_ty), mask=live)
                    tl.store(a_q + 2 * H, n.to(A.dtype.element_ty), mask=live)
                    tl.store(K + q * B64 * H + cell, r2.to(K.dtype.element_ty), mask=live)
                    h_new = tl.where(live, upd, h_old)
                    tl.store(C + q * B64 * H + cell, h_new.to(C.dtype.element_ty), mask=m2)
                    out = tl.where(live, upd, 0.0)
                else:
                    z3 = tl.load(xw_t + gate + 3 * H, mask=m2, other=0.0).to(acc.dtype)
                    r3 = _recurrent_gate(HR_in, W, GH, 3, rows, rmask, cols, cmask, H, G, w3, zero, FUSED, RESIDENT, BK,
                                         UPCAST, PRECISION)
                    z0 = z0 + r0
                    z1 = z1 + r1
                    z2 = z2 + r2
                    z3 = z3 + r3
                    a0 = F0(z0)
                    a1 = F1(z1)
                    a2 = F2(z2)
                    a3 = F3(z3)
                    if SAVE_Z:
                        tl.store(xw_t + gate, z0.to(XW.dtype.element_ty), mask=live)
                        tl.store(xw_t + gate + H, z1.to(XW.dtype.element_ty), mask=live)
                        tl.store(xw_t + gate + 2 * H, z2.to(XW.dtype.element_ty), mask=live)
                        tl.store(xw_t + gate + 3 * H, z3.to(XW.dtype.element_ty), mask=live)
                    tl.store(a_q, a0.to(A.dtype.element_ty), mask=live)
                    tl.store(a_q + H, a1.to(A.dtype.element_ty), mask=live)
                    tl.store(a_q + 2 * H, a2.to(A.dtype.element_ty), mask=live)
                    tl.store(a_q + 3 * H, a3.to(A.dtype.element_ty), mask=live)
                    if CELL == LSTM:  # blocks i, f, g, o; c' = f c + i g, h' = o ψ(c')
                        c_old = tl.load(CS + cell, mask=m2, other=0.0)
                        c_new = a1 * c_old + a0 * a2
                        k = F4(c_new)
                        upd = a3 * k
                        c_hand = c_new
                        if HAS_ZC:
                            mc = tl.load(ZC + t * B64 * H + cell, mask=m2, other=0.0).to(acc.dtype)
                            c_hand = mc * c_old + (1 - mc) * c_new
                        if HAS_ZH:
                            upd = mh * h_old + (1 - mh) * upd
                        c_keep = tl.where(live, c_hand, c_old)
                        tl.store(C + q * B64 * H + cell, tl.where(live, c_new, c_old).to(C.dtype.element_ty), mask=m2)
                        tl.store(K + q * B64 * H + cell, k.to(K.dtype.element_ty), mask=live)
                        if HAS_X2:
                            tl.store(X2 + q * B64 * H + cell, c_keep.to(X2.dtype.element_ty), mask=m2)
                        tl.store(CS + cell, c_keep, mask=m2)
                        h_new = tl.where(live, upd, h_old)
                        out = tl.where(live, upd, 0.0)
                    else:  # gated state, blocks f, i, o, n: s' = f s + i n, y = o s'
                        sn = a0 * h_old + a1 * a3
                        out = tl.where(live, a2 * sn, 0.0)
                        hand = sn
                        if HAS_ZH:
                            hand = mh * h_old + (1 - mh) * sn
                        h_new = tl.where(live, hand, h_old)
                        tl.store(C + q * B64 * H + cell, h_new.to(C.dtype.element_ty), mask=m2)
                        if HAS_X2:
                            tl.store(X2 + q * B64 * H + cell, sn.to(X2.dtype.element_ty), mask=live)
            tl.store(HS + cell, h_new, mask=m2)
            tl.store(OUT + t * B64 * H + cell, out.to(OUT.dtype.element_ty), mask=m2)
            if kk + 1 < T:
                h_rec = h_new
                if HAS_MASK:
                    h_rec = h_rec * tl.load(MASK + cell, mask=m2, other=0.0).to(acc.dtype)
                tl.store(HR + rec_out * B64 * H + cell, h_rec.to(HR.dtype.element_ty), mask=m2)
        if FUSED:
            tl.debug_barrier()  # the next step's product reads every unit this step wrote to HR


@triton.jit
def _back_through_weights(DGH_t, W, DH, rows, rmask, H, G, HAS_MASK: tl.constexpr, MASK,
                          BB: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr, UPCAST: tl.constexpr,
                          PRECISION: tl.constexpr):
    """dL/dh_rec of one step, ``DGH_t (B, G) · W_hh (G, H)``, masked, added into ``DH``."""
    for k0 in range(0, H, BK):
        ks = k0 + tl.arange(0, BK)
        kmask = ks < H
        acc = tl.full((BB, BK), 0.0, tl.float32)
        if DH.dtype.element_ty == tl.float64:
            acc = acc.to(tl.float64)
        for r0 in range(0, G, BH):
            rs = r0 + tl.arange(0, BH)
            rsm = rs < G
            d = tl.load(DGH_t + rows[:, None] * G + rs[None, :], mask=rmask[:, None] & rsm[None, :], other=0.0)
            w = tl.load(W + rs[:, None] * H + ks[None, :], mask=rsm[:, None] & kmask[None, :], other=0.0)
            acc = _dot(d, w, acc, UPCAST, PRECISION)
        m2 = rmask[:, None] & kmask[None, :]
        cell = rows[:, None] * H + ks[None, :]
        if HAS_MASK:
            acc = acc * tl.load(MASK + cell, mask=m2, other=0.0).to(acc.dtype)
        tl.store(DH + cell, tl.load(DH + cell, mask=m2, other=0.0) + acc, mask=m2)


@triton.jit(do_not_specialize=["B", "k_last", "nsteps"])
def recurrent_backward(
    DOUT, DH, DC, Z, A, C, K, X2, S0, W, DZ, DGH, LEN, MASK, ZH, ZC,
    T, B, H, k_last, nsteps,
    CELL: tl.constexpr, NG: tl.constexpr,
    D0: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, D3: tl.constexpr, D4: tl.constexpr,
    REVERSE: tl.constexpr, HAS_Z: tl.constexpr, HAS_LEN: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_ZH: tl.constexpr, HAS_ZC: tl.constexpr, HAS_X2: tl.constexpr, FUSED: tl.constexpr,
    BB: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """Loop counters ``k_last`` down to ``k_last - nsteps + 1``. ``DH``/``DC (B, H)`` float32 hold
    dL/d(state after the step) and become dL/d(state before it); ``DZ`` gets dL/d(pre-activations)
    (the GRU's ``DGH`` dL/d(recurrent product)); ``S0`` is the state before the first step (the
    LSTM's c0, else h0/s0). ``Z`` holds the pre-activations when ``HAS_Z`` (a derivative that reads
    them), else the derivatives read only the outputs (``A``, ``C``)."""
    rows, rmask, B64 = _program_rows(B, BB)
    G = NG * H
    if HAS_LEN:
        length = tl.load(LEN + rows, mask=rmask, other=0)
    for i in range(nsteps):
        kk = k_last - i
        t = _step_of(kk, T, REVERSE)
        t_prev = _step_of(kk - 1, T, REVERSE)
        for j0 in range(0, H, BH):
            cols = j0 + tl.arange(0, BH)
            cmask = cols < H
            m2 = rmask[:, None] & cmask[None, :]
            cell = rows[:, None] * H + cols[None, :]
            gate = t * B64 * G + rows[:, None] * G + cols[None, :]
            if HAS_LEN:
                live = (t < length)[:, None] & m2
            else:
                live = m2
            dh = tl.load(DH + cell, mask=m2, other=0.0)
            d = dh + tl.load(DOUT + t * B64 * H + cell, mask=m2, other=0.0).to(dh.dtype)
            kept = d * 0
            if HAS_ZH:
                mh = tl.load(ZH + t * B64 * H + cell, mask=m2, other=0.0).to(dh.dtype)
                kept = d * mh
                d = d * (1 - mh)
            if kk > 0:  # the state before the step: the one the previous step handed on
                if CELL == LSTM and HAS_X2:
                    prev = tl.load(X2 + t_prev * B64 * H + cell, mask=m2, other=0.0).to(dh.dtype)
                else:
                    prev = tl.load(C + t_prev * B64 * H + cell, mask=m2, other=0.0).to(dh.dtype)
            else:
                prev = tl.load(S0 + cell, mask=m2, other=0.0).to(dh.dtype)
            a0 = tl.load(A + gate, mask=m2, other=0.0).to(dh.dtype)
            if HAS_Z:
                x0 = tl.load(Z + gate, mask=m2, other=0.0).to(dh.dtype)
            else:
                x0 = a0
            if CELL == ELMAN:
                y = tl.load(C + t * B64 * H + cell, mask=m2, other=0.0).to(dh.dtype)
                if not HAS_Z:
                    x0 = y
                g0 = d * D0(x0, y)
                tl.store(DZ + gate, tl.where(live, g0, 0.0).to(DZ.dtype.element_ty), mask=m2)
                tl.store(DH + cell, tl.where(live, kept, dh), mask=m2)
            else:
                a1 = tl.load(A + gate + H, mask=m2, other=0.0).to(dh.dtype)
                a2 = tl.load(A + gate + 2 * H, mask=m2, other=0.0).to(dh.dtype)
                x1 = a1
                x2 = a2
                if HAS_Z:
                    x1 = tl.load(Z + gate + H, mask=m2, other=0.0).to(dh.dtype)
                    x2 = tl.load(Z + gate + 2 * H, mask=m2, other=0.0).to(dh.dtype)
                if CELL == GRU:  # blocks r, z, n; h' = (1 - z) n + z h
                    ghn = tl.load(K + t * B64 * H + cell, mask=m2, other=0.0).to(dh.dtype)
                    gn = d * (1 - a1) * D2(x2, a2)
                    gu = d * (prev - a2) * D1(x1, a1)
                    gr = gn * ghn * D0(x0, a0)
                    tl.store(DZ + gate, tl.where(live, gr, 0.0).to(DZ.dtype.element_ty), mask=m2)
                    tl.store(DZ + gate + H, tl.where(live, gu, 0.0).to(DZ.dtype.element_ty), mask=m2)
                    tl.store(DZ + gate + 2 * H, tl.where(live, gn, 0.0).to(DZ.dtype.element_ty), mask=m2)
                    tl.store(DGH + gate, tl.where(live, gr, 0.0).to(DGH.dtype.element_ty), mask=m2)
                    tl.store(DGH + gate + H, tl.where(live, gu, 0.0).to(DGH.dtype.element_ty), mask=m2)
                    tl.store(DGH + gate + 2 * H, tl.where(live, gn * a0, 0.0).to(DGH.dtype.element_ty), mask=m2)
                    tl.store(DH + cell, tl.where(live, d * a1 + kept, dh), mask=m2)
                else:
                    a3 = tl.load(A + gate + 3 * H, mask=m2, other=0.0).to(dh.dtype)
                    x3 = a3
                    if HAS_Z:
                        x3 = tl.load(Z + gate + 3 * H, mask=m2, other=0.0).to(dh.dtype)
                    if CELL == LSTM:  # blocks i, f, g, o
                        c_new = tl.load(C + t * B64 * H + cell, mask=m2, other=0.0).to(dh.dtype)
                        k = tl.load(K + t * B64 * H + cell, mask=m2, other=0.0).to(dh.dtype)
                        g3 = d * k * D3(x3, a3)
                        dc = tl.load(DC + cell, mask=m2, other=0.0)
                        keep_c = dc * 0
                        if HAS_ZC:
                            keep_c = tl.load(ZC + t * B64 * H + cell, mask=m2, other=0.0).to(dh.dtype)
                        dcn = dc * (1 - keep_c) + d * a3 * D4(c_new, k)
                        g0 = dcn * a2 * D0(x0, a0)
                        g1 = dcn * prev * D1(x1, a1)
                        g2 = dcn * a0 * D2(x2, a2)
                        tl.store(DC + cell, tl.where(live, dcn * a1 + dc * keep_c, dc), mask=m2)
                        tl.store(DH + cell, tl.where(live, kept, dh), mask=m2)
                    else:  # gated state, blocks f, i, o, n
                        if HAS_X2:
                            sn = tl.load(X2 + t * B64 * H + cell, mask=m2, other=0.0).to(dh.dtype)
                        else:
                            sn = tl.load(C + t * B64 * H + cell, mask=m2, other=0.0).to(dh.dtype)
                        dout = tl.load(DOUT + t * B64 * H + cell, mask=m2, other=0.0).to(dh.dtype)
                        keep_s = dh * 0
                        if HAS_ZH:
                            keep_s = mh
                        dst = dh * (1 - keep_s) + dout * a2
                        g2 = dout * sn * D2(x2, a2)
                        g0 = dst * prev * D0(x0, a0)
                        g1 = dst * a3 * D1(x1, a1)
                        g3 = dst * a1 * D3(x3, a3)
                        tl.store(DH + cell, tl.where(live, dst * a0 + dh * keep_s, dh), mask=m2)
                    tl.store(DZ + gate, tl.where(live, g0, 0.0).to(DZ.dtype.element_ty), mask=m2)
                    tl.store(DZ + gate + H, tl.where(live, g1, 0.0).to(DZ.dtype.element_ty), mask=m2)
                    tl.store(DZ + gate + 2 * H, tl.where(live, g2, 0.0).to(DZ.dtype.element_ty), mask=m2)
                    tl.store(DZ + gate + 3 * H, tl.where(live, g3, 0.0).to(DZ.dtype.element_ty), mask=m2)
        if FUSED:
            tl.debug_barrier()  # every unit's DZ of this step is written before the product reads them
            _back_through_weights(DGH + t * B64 * G, W, DH, rows, rmask, H, G, HAS_MASK, MASK, BB, BH, BK, UPCAST, PRECISION)
            tl.debug_barrier()
