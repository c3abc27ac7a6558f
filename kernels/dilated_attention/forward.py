"""The forward kernel (for the kernel author): every branch of a launch group through one online softmax."""

from __future__ import annotations

import triton
import triton.language as tl

from .._tl import dot as _dot
from .common import _block_logits, _branch_keys, _load_key_block, _load_kv, _pad_vectors, _query_rows, _tile_geometry


@triton.jit
def _fwd_branch(acc, acc_t, m_i, l_i, q, q_t, mrow, rh_row, rw_row, k_base, v_base, skn, svn, offs_d, dmask,
                offs_t, dmask_t, pad_k, pad_v, pad_kt, pad_vt, ty0, tx0, h, ROWS, COLS, SEG_H, SEG_W, DIL_H, DIL_W,
                RH_OFF, RW_OFF, qk_scale, BLOCK_M: tl.constexpr, BKY: tl.constexpr, BKX: tl.constexpr,
                HAS_REL: tl.constexpr, REL_ROWS: tl.constexpr, SINGLE_KX: tl.constexpr, PADDED: tl.constexpr,
                PREC: tl.constexpr,
                UPCAST: tl.constexpr, TAIL: tl.constexpr):
    """Continue the online softmax (base 2) of a query tile over the kept keys of one branch.

    With TAIL the head dim is two column slices, ``offs_d`` (a power of two) and ``offs_t`` (the rest,
    e.g. 64 + 16 for D = 80): q k^T is the sum of the two slices' products and P V fills ``acc`` and
    ``acc_t``, so no tensor-core work is spent on the columns a power-of-two pad (128) would add.
    Without TAIL ``q_t``/``acc_t`` are placeholders that pass through untouched."""
    yf, xf, kh, kw, n_blocks, rh_row, rw_row, rw_tile = _branch_keys(
        ty0, tx0, h, rh_row, rw_row, mrow, ROWS, COLS, SEG_H, SEG_W, DIL_H, DIL_W, RH_OFF, RW_OFF,
        BLOCK_M, BKY, BKX, HAS_REL, PADDED)
    for blk in range(0, n_blocks):
        cy, cx, ky, kx, valid, real, k, v = _load_key_block(
            blk, yf, xf, kh, kw, ROWS, COLS, DIL_H, DIL_W, k_base, v_base, skn, svn, offs_d, dmask,
            pad_k, pad_v, BKY, BKX, PADDED)
        qk = _dot(q, tl.trans(k), PREC, UPCAST)
        if TAIL:
            k_t, v_t = _load_kv(ky * COLS + kx, real, k_base, v_base, skn, svn, offs_t, dmask_t, pad_kt, pad_vt,
                                PADDED)
            qk += _dot(q_t, tl.trans(k_t), PREC, UPCAST)
        s = _block_logits(qk, qk_scale, rh_row, rw_row, mrow, cy, cx, kh, kw, rw_tile,
                          BLOCK_M, BKY, BKX, HAS_REL, REL_ROWS, SINGLE_KX)
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PREC, UPCAST)
        if TAIL:
            acc_t = acc_t * alpha[:, None] + _dot(p.to(v_t.dtype), v_t, PREC, UPCAST)
        m_i = m_new
    return acc, acc_t, m_i, l_i


@triton.jit
def _dilated_attention_fwd_kernel(
    Q, K, V, O, LSE, RH, RW, PADK, PADV,
    sqb, sqn, sqh, skb, skn, skh, svb, svn, svh, sob, son, soh,
    slb, slh, srb, srh, srn, swb, swh, swn,
    H, D, ROWS, COLS, BSEG_H, BSEG_W, RY, RX, NSEG_W, qk_scale,
    BRANCHES: tl.constexpr,
    NB: tl.constexpr, BLOCK_M: tl.constexpr, BKY: tl.constexpr, BKX: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DT: tl.constexpr, TAIL: tl.constexpr,
    HAS_REL: tl.constexpr, REL_ROWS: tl.constexpr, SINGLE_KX: tl.constexpr, PADDED: tl.constexpr, PREC: tl.constexpr,
    UPCAST: tl.constexpr, ACCUMULATE: tl.constexpr,
):
    """One program per (query tile, class tile, batch * head). Runs every branch of the group (NB <= 4;
    ``BRANCHES[j]`` = (seg_h, seg_w, dil_h, dil_w, rel-pos table column offsets)) through one online softmax, which is
    exactly the lse-weighted merge of the branches. ACCUMULATE starts from the (out, lse) already in
    O/LSE (an earlier group of the same pattern) instead of from nothing. With TAIL the head dim is
    columns [0, BLOCK_D) plus [BLOCK_D, BLOCK_D + BLOCK_DT) (see :func:`_fwd_branch`)."""
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
    q = tl.load(q_rows + offs_d[None, :], mask=qmask, other=0.0)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    pad_k, pad_v = _pad_vectors(PADK, PADV, h, D, offs_d, dmask, Q.dtype.element_ty, BLOCK_D, PADDED)
    rh_row = RH + b * srb + h * srh + qn * srn
    rw_row = RW + b * swb + h * swh + qn * swn
    o_rows = O + b * sob + h * soh + qn[:, None] * son
    o_ptr = o_rows + offs_d[None, :]
    l_ptr = LSE + b * slb + h * slh + qn
    # The tail slice (placeholders when not TAIL: never loaded, stored or multiplied).
    offs_t = BLOCK_D + tl.arange(0, BLOCK_DT)
    dmask_t = offs_t < D
    qmask_t = mrow[:, None] & dmask_t[None, :]
    if TAIL:
        q_t = tl.load(q_rows + offs_t[None, :], mask=qmask_t, other=0.0)
        pad_kt, pad_vt = _pad_vectors(PADK, PADV, h, D, offs_t, dmask_t, Q.dtype.element_ty, BLOCK_DT, PADDED)
    else:
        q_t = tl.zeros((BLOCK_M, BLOCK_DT), dtype=Q.dtype.element_ty)
        pad_kt = tl.zeros((BLOCK_DT,), dtype=Q.dtype.element_ty)
        pad_vt = pad_kt
    acc_t = tl.zeros((BLOCK_M, BLOCK_DT), dtype=tl.float32)
    if ACCUMULATE:
        l_old = tl.load(l_ptr, mask=mrow, other=float("-inf"))
        m_i = l_old * 1.4426950408889634
        l_i = tl.where(l_old == float("-inf"), 0.0, 1.0)
        acc = tl.load(o_ptr, mask=qmask, other=0.0).to(tl.float32)
        if TAIL:
            acc_t = tl.load(o_rows + offs_t[None, :], mask=qmask_t, other=0.0).to(tl.float32)
    else:
        m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)

    for j in tl.static_range(NB):  # the group's branches, unrolled at compile time
        BR = BRANCHES[j]  # (seg_h, seg_w, dil_h, dil_w, rel-pos column offsets h, w)
        if j == 0:  # branch 0's tables start at column 0: a compile-time 0, as in the unrolled form
            rel_h: tl.constexpr = 0
            rel_w: tl.constexpr = 0
        else:
            rel_h = BR[4]
            rel_w = BR[5]
        acc, acc_t, m_i, l_i = _fwd_branch(
            acc, acc_t, m_i, l_i, q, q_t, mrow, rh_row, rw_row, k_base, v_base, skn, svn, offs_d, dmask, offs_t,
            dmask_t, pad_k, pad_v, pad_kt, pad_vt, ty0, tx0, h, ROWS, COLS, BR[0], BR[1], BR[2], BR[3], rel_h, rel_w,
            qk_scale, BLOCK_M, BKY, BKX, HAS_REL, REL_ROWS, SINGLE_KX, PADDED, PREC, UPCAST, TAIL)

    # Positions kept by no branch have l_i = 0: out 0, lse -inf. Non-finite inputs give what the reference
    # gives: a NaN logit leaves l_i NaN (out and lse NaN), a +inf logit lse +inf (out NaN).
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
    lse = tl.where(m_i == float("inf"), float("inf"), lse)
    tl.store(o_ptr, out.to(O.dtype.element_ty), mask=qmask)
    if TAIL:
        tl.store(o_rows + offs_t[None, :], (acc_t / l_safe[:, None]).to(O.dtype.element_ty), mask=qmask_t)
    tl.store(l_ptr, lse, mask=mrow)
