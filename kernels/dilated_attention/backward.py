"""The backward kernels (for the kernel author): dK/dV programs own key blocks of class tiles, dQ programs own
class tiles (like the forward); both loop over the branches that keep their tile."""

from __future__ import annotations

import triton
import triton.language as tl

from .._tl import dot as _dot
from .common import (
    _block_logits,
    _branch_keys,
    _branch_segment,
    _load_key_block,
    _load_kv,
    _pad_vectors,
    _query_rows,
    _tile_geometry,
)


@triton.jit
def _dkdv_branch(dk, dv, dk_t, dv_t, k, v, k_t, v_t, kyv, kxv, valid, ty0, tx0, b, h, Q, DO, LSE, DELTA, RH, RW,
                 sqb, sqn, sqh, sdob, sdon, sdoh, slb, slh, srb, srh, srn, swb, swh, swn, offs_d, dmask,
                 offs_t, dmask_t, ROWS, COLS, SEG_H, SEG_W, DIL_H, DIL_W, RH_OFF, RW_OFF, qk_scale,
                 BLOCK_M: tl.constexpr, BKY: tl.constexpr, BKX: tl.constexpr, HAS_REL: tl.constexpr,
                 REL_ROWS: tl.constexpr,
                 PADDED: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr, TAIL: tl.constexpr):
    """Accumulate into dK/dV of a key block the contributions of one branch's queries.

    ``kyv`` (BKY,) / ``kxv`` (BKX,) are the block's key rows / columns on the grid; their indices in the
    branch's kept lattice address the rel-pos tables of the branch's queries. With TAIL the head-dim
    columns ``offs_t`` run beside ``offs_d`` as in the forward (``k_t``/``v_t`` in, ``dk_t``/``dv_t`` out).
    """
    y0, x0, oy, ox, qh, qw, kh, kw = _branch_segment(ty0, tx0, h, ROWS, COLS, SEG_H, SEG_W, DIL_H, DIL_W, PADDED)
    nq = qh * qw
    cy = (kyv - y0 - oy) // DIL_H
    cx = (kxv - x0 - ox) // DIL_W
    no_rw = tl.zeros((BLOCK_M, BKX), dtype=tl.float32)
    for t0 in range(0, nq, BLOCK_M):
        qn, mrow = _query_rows(t0, nq, qw, y0 + oy, x0 + ox, COLS, DIL_H, DIL_W, BLOCK_M)
        qmask = mrow[:, None] & dmask[None, :]
        q_rows = Q + b * sqb + h * sqh + qn[:, None] * sqn
        do_rows = DO + b * sdob + h * sdoh + qn[:, None] * sdon
        q = tl.load(q_rows + offs_d[None, :], mask=qmask, other=0.0)
        do = tl.load(do_rows + offs_d[None, :], mask=qmask, other=0.0)
        lse = tl.load(LSE + b * slb + h * slh + qn, mask=mrow, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA + b * slb + h * slh + qn, mask=mrow, other=0.0)
        qk = _dot(q, tl.trans(k), PREC, UPCAST)
        if TAIL:
            qmask_t = mrow[:, None] & dmask_t[None, :]
            q_t = tl.load(q_rows + offs_t[None, :], mask=qmask_t, other=0.0)
            do_t = tl.load(do_rows + offs_t[None, :], mask=qmask_t, other=0.0)
            qk += _dot(q_t, tl.trans(k_t), PREC, UPCAST)
        s = _block_logits(qk, qk_scale, RH + b * srb + h * srh + qn * srn + RH_OFF,
                          RW + b * swb + h * swh + qn * swn + RW_OFF, mrow, cy, cx, kh, kw, no_rw,
                          BLOCK_M, BKY, BKX, HAS_REL, REL_ROWS, False)
        p = tl.exp2(s - lse[:, None])
        p = tl.where(mrow[:, None] & valid[None, :], p, 0.0)
        dv += _dot(tl.trans(p.to(do.dtype)), do, PREC, UPCAST)
        dp = _dot(do, tl.trans(v), PREC, UPCAST)
        if TAIL:
            dv_t += _dot(tl.trans(p.to(do_t.dtype)), do_t, PREC, UPCAST)
            dp += _dot(do_t, tl.trans(v_t), PREC, UPCAST)
        ds = p * (dp - delta[:, None])
        dk += _dot(tl.trans(ds.to(q.dtype)), q, PREC, UPCAST)
        if TAIL:
            dk_t += _dot(tl.trans(ds.to(q_t.dtype)), q_t, PREC, UPCAST)
    return dk, dv, dk_t, dv_t


@triton.jit
def _store_tile(ptr, val, mask, ACCUMULATE: tl.constexpr):
    """Store the fp32 tile ``val`` at ``ptr`` in its dtype; ACCUMULATE adds what an earlier launch group
    left there."""
    if ACCUMULATE:
        val += tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
    tl.store(ptr, val.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _store_key_grads(DK, DV, DPADK, DPADV, dk, dv, b, h, kn, ky, kx, valid, real, offs, cols_mask,
                     sdkb, sdkn, sdkh, sdvb, sdvn, sdvh, spb, sph, spn, ROWS, COLS, PAD_ROWS, PAD_COLS,
                     PADDED: tl.constexpr, ACCUMULATE: tl.constexpr):
    """Write (ACCUMULATE: add to) a key block's dK / dV at head-dim columns ``offs``. SAM's virtual keys
    of the completed segments go to the pad scratch: a compact index over the padded grid's margin (rows
    below the grid first, then the columns right of it), each written exactly once."""
    kmask = real[:, None] & cols_mask[None, :]
    _store_tile(DK + b * sdkb + h * sdkh + kn[:, None] * sdkn + offs[None, :], dk, kmask, ACCUMULATE)
    _store_tile(DV + b * sdvb + h * sdvh + kn[:, None] * sdvn + offs[None, :], dv, kmask, ACCUMULATE)
    if PADDED:
        is_pad = valid & (~real)
        below = ky >= ROWS
        pidx = tl.where(below, (ky - ROWS) * PAD_COLS + kx,
                        (PAD_ROWS - ROWS) * PAD_COLS + ky * (PAD_COLS - COLS) + (kx - COLS))
        pmask = is_pad[:, None] & cols_mask[None, :]
        tl.store(DPADK + b * spb + h * sph + pidx[:, None] * spn + offs[None, :], dk, mask=pmask)
        tl.store(DPADV + b * spb + h * sph + pidx[:, None] * spn + offs[None, :], dv, mask=pmask)


@triton.jit
def _dilated_attention_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, RH, RW, PADK, PADV, DK, DV, DPADK, DPADV,
    sqb, sqn, sqh, skb, skn, skh, svb, svn, svh, sdob, sdon, sdoh,
    sdkb, sdkn, sdkh, sdvb, sdvn, sdvh,
    slb, slh, srb, srh, srn, swb, swh, swn, spb, sph, spn,
    H, D, ROWS, COLS, BSEG_H, BSEG_W, RY, RX, NSEG_W, PAD_ROWS, PAD_COLS, qk_scale, sm_scale,
    BRANCHES: tl.constexpr,
    NB: tl.constexpr, BLOCK_M: tl.constexpr, BKY: tl.constexpr, BKX: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DT: tl.constexpr, TAIL: tl.constexpr,
    HAS_REL: tl.constexpr, REL_ROWS: tl.constexpr, PADDED: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
    ACCUMULATE: tl.constexpr,
):
    """One program per key block of a class tile: loops over the queries of every branch that keeps the
    block, accumulates dK and dV, writes them once (ACCUMULATE: adds to an earlier group's). With TAIL
    the head dim is columns [0, BLOCK_D) plus [BLOCK_D, BLOCK_D + BLOCK_DT)."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    bh = tl.program_id(2)
    b = (bh // H).to(tl.int64)  # b * batch stride passes 2**31 in big batches (strides under it are int32)
    h = bh % H
    ty0, tx0, _qh, _qw, kh, kw = _tile_geometry(pid_s, ROWS, COLS, BSEG_H, BSEG_W, RY, RX, NSEG_W, PADDED)
    n_blocks = ((kh + BKY - 1) // BKY) * ((kw + BKX - 1) // BKX)
    if pid_n >= n_blocks:
        return
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    pad_k, pad_v = _pad_vectors(PADK, PADV, h, D, offs_d, dmask, Q.dtype.element_ty, BLOCK_D, PADDED)
    cy, cx, ky, kx, valid, real, k, v = _load_key_block(
        pid_n, ty0, tx0, kh, kw, ROWS, COLS, RY, RX, k_base, v_base, skn, svn,
        offs_d, dmask, pad_k, pad_v, BKY, BKX, PADDED)
    kyv = ty0 + cy * RY
    kxv = tx0 + cx * RX
    kn = ky * COLS + kx
    offs_t = BLOCK_D + tl.arange(0, BLOCK_DT)
    dmask_t = offs_t < D
    if TAIL:
        pad_kt, pad_vt = _pad_vectors(PADK, PADV, h, D, offs_t, dmask_t, Q.dtype.element_ty, BLOCK_DT, PADDED)
        k_t, v_t = _load_kv(kn, real, k_base, v_base, skn, svn, offs_t, dmask_t, pad_kt, pad_vt, PADDED)
    else:  # placeholders nothing reads
        k_t = tl.zeros((BKY * BKX, BLOCK_DT), dtype=Q.dtype.element_ty)
        v_t = k_t

    dk = tl.zeros((BKY * BKX, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BKY * BKX, BLOCK_D), dtype=tl.float32)
    dk_t = tl.zeros((BKY * BKX, BLOCK_DT), dtype=tl.float32)
    dv_t = tl.zeros((BKY * BKX, BLOCK_DT), dtype=tl.float32)
    for j in tl.static_range(NB):  # the group's branches, unrolled at compile time
        BR = BRANCHES[j]  # (seg_h, seg_w, dil_h, dil_w, rel-pos column offsets h, w)
        if j == 0:  # branch 0's tables start at column 0: a compile-time 0, as in the unrolled form
            rel_h: tl.constexpr = 0
            rel_w: tl.constexpr = 0
        else:
            rel_h = BR[4]
            rel_w = BR[5]
        dk, dv, dk_t, dv_t = _dkdv_branch(
            dk, dv, dk_t, dv_t, k, v, k_t, v_t, kyv, kxv, valid, ty0, tx0, b, h, Q, DO, LSE, DELTA, RH, RW,
            sqb, sqn, sqh, sdob, sdon, sdoh, slb, slh, srb, srh, srn, swb, swh, swn, offs_d, dmask, offs_t, dmask_t,
            ROWS, COLS, BR[0], BR[1], BR[2], BR[3], rel_h, rel_w, qk_scale, BLOCK_M, BKY, BKX, HAS_REL, REL_ROWS,
            PADDED, PREC, UPCAST, TAIL)
    _store_key_grads(DK, DV, DPADK, DPADV, dk * sm_scale, dv, b, h, kn, ky, kx, valid, real, offs_d, dmask,
                     sdkb, sdkn, sdkh, sdvb, sdvn, sdvh, spb, sph, spn, ROWS, COLS, PAD_ROWS, PAD_COLS,
                     PADDED, ACCUMULATE)
    if TAIL:
        _store_key_grads(DK, DV, DPADK, DPADV, dk_t * sm_scale, dv_t, b, h, kn, ky, kx, valid, real, offs_t,
                         dmask_t, sdkb, sdkn, sdkh, sdvb, sdvn, sdvh, spb, sph, spn, ROWS, COLS, PAD_ROWS,
                         PAD_COLS, PADDED, ACCUMULATE)


@triton.jit
def _dq_branch(dq, dq_t, q, q_t, do, do_t, lse, delta, mrow, rh_row, rw_row, drh_row, drw_row, k_base, v_base,
               skn, svn, offs_d, dmask, offs_t, dmask_t, pad_k, pad_v, pad_kt, pad_vt, ty0, tx0, h, ROWS, COLS,
               SEG_H, SEG_W, DIL_H, DIL_W, RH_OFF, RW_OFF, qk_scale, BLOCK_M: tl.constexpr, BKY: tl.constexpr,
               BKX: tl.constexpr, HAS_REL: tl.constexpr, REL_ROWS: tl.constexpr, PADDED: tl.constexpr,
               PREC: tl.constexpr,
               UPCAST: tl.constexpr, TAIL: tl.constexpr):
    """Accumulate dQ of a query tile over one branch's keys; write the branch's dRH / dRW columns.

    ``dRH[i, ky] = sum_kx dS[i, (ky, kx)]`` and ``dRW[i, kx] = sum_ky dS[i, (ky, kx)]``; with the bias
    one key block spans the kept width (SINGLE_KX), so every dRH column is written by exactly one
    iteration and dRW stays in registers until the branch ends. With TAIL the head-dim columns
    ``offs_t`` run beside ``offs_d`` (``q_t``, ``do_t`` in, ``dq_t`` out).
    """
    yf, xf, kh, kw, n_blocks, rh_row, rw_row, rw_tile = _branch_keys(
        ty0, tx0, h, rh_row, rw_row, mrow, ROWS, COLS, SEG_H, SEG_W, DIL_H, DIL_W, RH_OFF, RW_OFF,
        BLOCK_M, BKY, BKX, HAS_REL, PADDED)
    cx0 = tl.arange(0, BKX)
    drw = tl.zeros((BLOCK_M, BKX), dtype=tl.float32)
    for blk in range(0, n_blocks):
        cy, cx, ky, kx, valid, real, k, v = _load_key_block(
            blk, yf, xf, kh, kw, ROWS, COLS, DIL_H, DIL_W, k_base, v_base, skn, svn, offs_d, dmask,
            pad_k, pad_v, BKY, BKX, PADDED)
        qk = _dot(q, tl.trans(k), PREC, UPCAST)
        dp = _dot(do, tl.trans(v), PREC, UPCAST)
        if TAIL:
            k_t, v_t = _load_kv(ky * COLS + kx, real, k_base, v_base, skn, svn, offs_t, dmask_t, pad_kt, pad_vt,
                                PADDED)
            qk += _dot(q_t, tl.trans(k_t), PREC, UPCAST)
            dp += _dot(do_t, tl.trans(v_t), PREC, UPCAST)
        s = _block_logits(qk, qk_scale, rh_row, rw_row, mrow, cy, cx, kh, kw, rw_tile,
                          BLOCK_M, BKY, BKX, HAS_REL, REL_ROWS, REL_ROWS)
        p = tl.exp2(s - lse[:, None])
        p = tl.where(mrow[:, None] & valid[None, :], p, 0.0)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, PREC, UPCAST)
        if TAIL:
            dq_t += _dot(ds.to(k_t.dtype), k_t, PREC, UPCAST)
        if HAS_REL:
            ds3 = tl.reshape(ds, (BLOCK_M, BKY, BKX))
            if REL_ROWS:
                tl.store(drh_row[:, None] + RH_OFF + cy[None, :], tl.sum(ds3, axis=2),
                         mask=mrow[:, None] & (cy < kh)[None, :])
                drw += tl.sum(ds3, axis=1)
            else:  # one lattice row: each block owns its columns of the per-key table
                tl.store(drw_row[:, None] + RW_OFF + cx[None, :], tl.sum(ds3, axis=1),
                         mask=mrow[:, None] & (cx < kw)[None, :])
    if HAS_REL and REL_ROWS:
        tl.store(drw_row[:, None] + RW_OFF + cx0[None, :], drw, mask=mrow[:, None] & (cx0 < kw)[None, :])
    return dq, dq_t


@triton.jit
def _dilated_attention_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, RH, RW, PADK, PADV, DQ, DRH, DRW,
    sqb, sqn, sqh, skb, skn, skh, svb, svn, svh, sdob, sdon, sdoh, sdqb, sdqn, sdqh,
    slb, slh, srb, srh, srn, swb, swh, swn,
    H, D, ROWS, COLS, BSEG_H, BSEG_W, RY, RX, NSEG_W, qk_scale, sm_scale,
    BRANCHES: tl.constexpr,
    NB: tl.constexpr, BLOCK_M: tl.constexpr, BKY: tl.constexpr, BKX: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DT: tl.constexpr, TAIL: tl.constexpr,
    HAS_REL: tl.constexpr, REL_ROWS: tl.constexpr, PADDED: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
    ACCUMULATE: tl.constexpr,
):
    """One program per (query tile, class tile, batch * head): dQ over every branch of the group. With
    TAIL the head dim is columns [0, BLOCK_D) plus [BLOCK_D, BLOCK_D + BLOCK_DT)."""
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    bh = tl.program_id(2)
    b = (bh // H).to(tl.int64)  # b * batch stride passes 2**31 in big batches (strides under it are int32)
    h = bh % H
    ty0, tx0, qh, qw, _kh, _kw = _tile_geometry(pid_s, ROWS, COLS, BSEG_H, BSEG_W, RY, RX, NSEG_W, False)
    nq = qh * qw
    if pid_m * BLOCK_M >= nq:
        return
    qn, mrow = _query_rows(pid_m * BLOCK_M, nq, qw, ty0, tx0, COLS, RY, RX, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    qmask = mrow[:, None] & dmask[None, :]
    q_rows = Q + b * sqb + h * sqh + qn[:, None] * sqn
    do_rows = DO + b * sdob + h * sdoh + qn[:, None] * sdon
    q = tl.load(q_rows + offs_d[None, :], mask=qmask, other=0.0)
    do = tl.load(do_rows + offs_d[None, :], mask=qmask, other=0.0)
    lse = tl.load(LSE + b * slb + h * slh + qn, mask=mrow, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + b * slb + h * slh + qn, mask=mrow, other=0.0)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    pad_k, pad_v = _pad_vectors(PADK, PADV, h, D, offs_d, dmask, Q.dtype.element_ty, BLOCK_D, PADDED)
    offs_t = BLOCK_D + tl.arange(0, BLOCK_DT)
    dmask_t = offs_t < D
    qmask_t = mrow[:, None] & dmask_t[None, :]
    if TAIL:
        q_t = tl.load(q_rows + offs_t[None, :], mask=qmask_t, other=0.0)
        do_t = tl.load(do_rows + offs_t[None, :], mask=qmask_t, other=0.0)
        pad_kt, pad_vt = _pad_vectors(PADK, PADV, h, D, offs_t, dmask_t, Q.dtype.element_ty, BLOCK_DT, PADDED)
    else:  # placeholders nothing reads
        q_t = tl.zeros((BLOCK_M, BLOCK_DT), dtype=Q.dtype.element_ty)
        do_t = q_t
        pad_kt = tl.zeros((BLOCK_DT,), dtype=Q.dtype.element_ty)
        pad_vt = pad_kt
    rh_row = RH + b * srb + h * srh + qn * srn
    rw_row = RW + b * swb + h * swh + qn * swn
    drh_row = DRH + b * srb + h * srh + qn * srn
    drw_row = DRW + b * swb + h * swh + qn * swn
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    dq_t = tl.zeros((BLOCK_M, BLOCK_DT), dtype=tl.float32)
    for j in tl.static_range(NB):  # the group's branches, unrolled at compile time
        BR = BRANCHES[j]  # (seg_h, seg_w, dil_h, dil_w, rel-pos column offsets h, w)
        if j == 0:  # branch 0's tables start at column 0: a compile-time 0, as in the unrolled form
            rel_h: tl.constexpr = 0
            rel_w: tl.constexpr = 0
        else:
            rel_h = BR[4]
            rel_w = BR[5]
        dq, dq_t = _dq_branch(
            dq, dq_t, q, q_t, do, do_t, lse, delta, mrow, rh_row, rw_row, drh_row, drw_row, k_base, v_base, skn, svn,
            offs_d, dmask, offs_t, dmask_t, pad_k, pad_v, pad_kt, pad_vt, ty0, tx0, h, ROWS, COLS,
            BR[0], BR[1], BR[2], BR[3], rel_h, rel_w, qk_scale, BLOCK_M, BKY, BKX, HAS_REL, REL_ROWS, PADDED, PREC,
            UPCAST, TAIL)
    dq_rows = DQ + b * sdqb + h * sdqh + qn[:, None] * sdqn
    _store_tile(dq_rows + offs_d[None, :], dq * sm_scale, qmask, ACCUMULATE)
    if TAIL:
        _store_tile(dq_rows + offs_t[None, :], dq_t * sm_scale, qmask_t, ACCUMULATE)
