"""Flash dilated attention with SAM's decomposed relative-position bias (Triton).

Computes, for one branch of a dilated-attention pattern (DESIGN.md, :mod:`sam_fast.pattern`),
``softmax(scale * q k^T + bias) v`` among the kept positions of every segment, with online softmax
(no N x N matrix in memory), forward and backward. Dense attention and SAM's windowed attention are
the special cases ``segment = grid`` and ``segment = (14, 14)`` with dilation 1. SAM-Lightening
(seeds/003) is the paper this kernel grows towards; the rel-pos bias is segment_anything's
``add_decomposed_rel_pos`` with absolute grid coordinates.

Tensor contract (the launchers check nothing a caller could get wrong; sam_fast.ops validates):

* ``q, k, v``: (B, N, H, D), last dim contiguous, other strides free, fp16/bf16/fp32, D <= 128.
  D is padded to a power of two inside the kernel by masked loads, never by copies.
* Addressing: every branch lives on a 2-D grid ``(rows, cols)`` (a 1-D branch over N tokens is the
  grid ``(1, N)``). A program owns one query tile of one segment of one (batch, head); segment
  origin, per-head offsets and dilation turn a tile index into token indices (address arithmetic,
  no gather/scatter copies).
* Keys are visited in 2-D blocks of ``BKY x BKX`` kept positions (``BLOCK_N = BKY * BKX``) so that
  the rel-pos bias of a block is ``RH[i, ky] + RW[i, kx]``: a column slice of two small per-query
  tables instead of a gather per score.
* ``rh, rw``: (B, H, N, KHP) / (B, H, N, KWP) fp32-or-input-dtype tables of ``q_i . rel_pos_h[...]``
  for every kept key row / column of query i's segment, made by :func:`relpos_tables` with tensor-core
  einsums (segment_anything computes the same ``rel_h``/``rel_w``).
* ``pad_k, pad_v`` (H, D): when given, partial segments are completed to full size with virtual keys
  carrying these vectors (segment_anything pads windows with zero tokens whose k and v are the qkv
  bias). Their gradients are reduced through a compact scratch, no atomics.
* Outputs: ``out`` (B, N, H, D) in the input dtype, ``lse`` (B, H, N) fp32 natural log.

Softmax runs in base 2 (``exp2``) with ``log2(e)`` folded into the scale and bias.
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def _dot(a, b, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """tl.dot with fp32 accumulation. UPCAST (set only under TRITON_INTERPRET for bfloat16, whose dot the
    interpreter gets wrong) feeds fp32 copies: bf16 products are exact in fp32, so the result is the
    tensor-core one up to summation order."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _segment_geometry(
    seg, h, ROWS, COLS, SEG_H, SEG_W, DIL_H, DIL_W, NSEG_W, PADDED: tl.constexpr
):
    """Origin, head offsets and kept query/key extents of one segment for one head."""
    oy = (h // DIL_W) % DIL_H
    ox = h % DIL_W
    y0 = (seg // NSEG_W) * SEG_H
    x0 = (seg % NSEG_W) * SEG_W
    seg_rows = tl.minimum(SEG_H, ROWS - y0)
    seg_cols = tl.minimum(SEG_W, COLS - x0)
    qh = tl.maximum(seg_rows - oy + DIL_H - 1, 0) // DIL_H
    qw = tl.maximum(seg_cols - ox + DIL_W - 1, 0) // DIL_W
    if PADDED:
        kh = (SEG_H - oy + DIL_H - 1) // DIL_H
        kw = (SEG_W - ox + DIL_W - 1) // DIL_W
    else:
        kh = qh
        kw = qw
    return oy, ox, y0, x0, qh, qw, kh, kw


@triton.jit
def _query_rows(t0, nq, qw, y0, x0, oy, ox, COLS, DIL_H, DIL_W, BLOCK_M: tl.constexpr):
    """Token indices of kept queries t0 .. t0 + BLOCK_M of a segment (row-major over its kept grid)."""
    t = t0 + tl.arange(0, BLOCK_M)
    qwc = tl.maximum(qw, 1)
    qn = (y0 + oy + (t // qwc) * DIL_H) * COLS + (x0 + ox + (t % qwc) * DIL_W)
    return qn, t < nq


@triton.jit
def _key_block(blk, y0, x0, oy, ox, kh, kw, ROWS, COLS, DIL_H, DIL_W,
               BKY: tl.constexpr, BKX: tl.constexpr, PADDED: tl.constexpr):
    """Token indices of key block ``blk`` (BKY x BKX kept positions, row-major)."""
    nbx = (kw + BKX - 1) // BKX
    ky0 = (blk // nbx) * BKY
    kx0 = (blk % nbx) * BKX
    j = tl.arange(0, BKY * BKX)
    jy = ky0 + j // BKX
    jx = kx0 + j % BKX
    valid = (jy < kh) & (jx < kw)
    ky = y0 + oy + jy * DIL_H
    kx = x0 + ox + jx * DIL_W
    if PADDED:
        real = valid & (ky < ROWS) & (kx < COLS)
    else:
        real = valid
    return ky0, kx0, ky, kx, valid, real


@triton.jit
def _rel_bias(rh_row, rw_row, mrow, ky0, kx0, kh, kw, rw_tile,
              BLOCK_M: tl.constexpr, BKY: tl.constexpr, BKX: tl.constexpr, SINGLE_KX: tl.constexpr):
    """Bias tile (BLOCK_M, BKY * BKX) = RH[i, ky] + RW[i, kx] for the key block at (ky0, kx0)."""
    cy = ky0 + tl.arange(0, BKY)
    rh = tl.load(rh_row[:, None] + cy[None, :], mask=mrow[:, None] & (cy < kh)[None, :], other=0.0).to(tl.float32)
    if SINGLE_KX:
        rw = rw_tile
    else:
        cx = kx0 + tl.arange(0, BKX)
        rw = tl.load(rw_row[:, None] + cx[None, :], mask=mrow[:, None] & (cx < kw)[None, :], other=0.0).to(tl.float32)
    return tl.reshape(rh[:, :, None] + rw[:, None, :], (BLOCK_M, BKY * BKX))


@triton.jit
def _dilated_attention_fwd_kernel(
    Q, K, V, O, LSE, RH, RW, PADK, PADV,
    sqb, sqn, sqh, skb, skn, skh, svb, svn, svh, sob, son, soh,
    slb, slh, srb, srh, srn, swb, swh, swn,
    H, D, ROWS, COLS, SEG_H, SEG_W, DIL_H, DIL_W, NSEG_W,
    qk_scale,
    BLOCK_M: tl.constexpr, BKY: tl.constexpr, BKX: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_REL: tl.constexpr, SINGLE_KX: tl.constexpr, PADDED: tl.constexpr, PREC: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid_m = tl.program_id(0)
    seg = tl.program_id(1)
    bh = tl.program_id(2)
    b = bh // H
    h = bh % H
    oy, ox, y0, x0, qh, qw, kh, kw = _segment_geometry(
        seg, h, ROWS, COLS, SEG_H, SEG_W, DIL_H, DIL_W, NSEG_W, PADDED)
    nq = qh * qw
    if pid_m * BLOCK_M >= nq:
        return
    qn, mrow = _query_rows(pid_m * BLOCK_M, nq, qw, y0, x0, oy, ox, COLS, DIL_H, DIL_W, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D

    q = tl.load(Q + b * sqb + h * sqh + qn[:, None] * sqn + offs_d[None, :],
                mask=mrow[:, None] & dmask[None, :], other=0.0)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    if PADDED:
        pad_k = tl.load(PADK + h * D + offs_d, mask=dmask, other=0.0).to(q.dtype)
        pad_v = tl.load(PADV + h * D + offs_d, mask=dmask, other=0.0).to(q.dtype)
    rh_row = RH + b * srb + h * srh + qn * srn
    rw_row = RW + b * swb + h * swh + qn * swn
    rw_tile = tl.zeros((BLOCK_M, BKX), dtype=tl.float32)
    if HAS_REL:
        if SINGLE_KX:
            cx = tl.arange(0, BKX)
            rw_tile = tl.load(rw_row[:, None] + cx[None, :], mask=mrow[:, None] & (cx < kw)[None, :],
                              other=0.0).to(tl.float32)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    n_blocks = ((kh + BKY - 1) // BKY) * ((kw + BKX - 1) // BKX)
    for blk in range(0, n_blocks):
        ky0, kx0, ky, kx, valid, real = _key_block(
            blk, y0, x0, oy, ox, kh, kw, ROWS, COLS, DIL_H, DIL_W, BKY, BKX, PADDED)
        kn = ky * COLS + kx
        kmask = real[:, None] & dmask[None, :]
        k = tl.load(k_base + kn[:, None] * skn + offs_d[None, :], mask=kmask, other=0.0)
        v = tl.load(v_base + kn[:, None] * svn + offs_d[None, :], mask=kmask, other=0.0)
        if PADDED:
            k = tl.where(real[:, None], k, pad_k[None, :])
            v = tl.where(real[:, None], v, pad_v[None, :])
        s = _dot(q, tl.trans(k), PREC, UPCAST) * qk_scale
        if HAS_REL:
            s += _rel_bias(rh_row, rw_row, mrow, ky0, kx0, kh, kw, rw_tile,
                           BLOCK_M, BKY, BKX, SINGLE_KX) * 1.4426950408889634
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PREC, UPCAST)
        m_i = m_new

    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(l_i > 0.0, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    tl.store(O + b * sob + h * soh + qn[:, None] * son + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=mrow[:, None] & dmask[None, :])
    tl.store(LSE + b * slb + h * slh + qn, lse, mask=mrow)


@triton.jit
def _dilated_attention_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, RH, RW, PADK, PADV, DK, DV, DPADK, DPADV,
    sqb, sqn, sqh, skb, skn, skh, svb, svn, svh, sdob, sdon, sdoh,
    sdkb, sdkn, sdkh, sdvb, sdvn, sdvh,
    slb, slh, srb, srh, srn, swb, swh, swn, spb, sph, spn,
    H, D, ROWS, COLS, SEG_H, SEG_W, DIL_H, DIL_W, NSEG_W, PAD_ROWS, PAD_COLS,
    qk_scale, sm_scale,
    BLOCK_M: tl.constexpr, BKY: tl.constexpr, BKX: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_REL: tl.constexpr, PADDED: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    """One program per key block: loops over the segment's query tiles, accumulates dK and dV."""
    pid_n = tl.program_id(0)
    seg = tl.program_id(1)
    bh = tl.program_id(2)
    b = bh // H
    h = bh % H
    oy, ox, y0, x0, qh, qw, kh, kw = _segment_geometry(
        seg, h, ROWS, COLS, SEG_H, SEG_W, DIL_H, DIL_W, NSEG_W, PADDED)
    n_blocks = ((kh + BKY - 1) // BKY) * ((kw + BKX - 1) // BKX)
    if pid_n >= n_blocks:
        return
    nq = qh * qw
    ky0, kx0, ky, kx, valid, real = _key_block(
        pid_n, y0, x0, oy, ox, kh, kw, ROWS, COLS, DIL_H, DIL_W, BKY, BKX, PADDED)
    kn = ky * COLS + kx
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    kmask = real[:, None] & dmask[None, :]
    k = tl.load(K + b * skb + h * skh + kn[:, None] * skn + offs_d[None, :], mask=kmask, other=0.0)
    v = tl.load(V + b * svb + h * svh + kn[:, None] * svn + offs_d[None, :], mask=kmask, other=0.0)
    if PADDED:
        pad_k = tl.load(PADK + h * D + offs_d, mask=dmask, other=0.0).to(k.dtype)
        pad_v = tl.load(PADV + h * D + offs_d, mask=dmask, other=0.0).to(v.dtype)
        k = tl.where(real[:, None], k, pad_k[None, :])
        v = tl.where(real[:, None], v, pad_v[None, :])

    dk = tl.zeros((BKY * BKX, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BKY * BKX, BLOCK_D), dtype=tl.float32)
    for t0 in range(0, nq, BLOCK_M):
        qn, mrow = _query_rows(t0, nq, qw, y0, x0, oy, ox, COLS, DIL_H, DIL_W, BLOCK_M)
        qmask = mrow[:, None] & dmask[None, :]
        q = tl.load(Q + b * sqb + h * sqh + qn[:, None] * sqn + offs_d[None, :], mask=qmask, other=0.0)
        do = tl.load(DO + b * sdob + h * sdoh + qn[:, None] * sdon + offs_d[None, :], mask=qmask, other=0.0)
        lse = tl.load(LSE + b * slb + h * slh + qn, mask=mrow, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA + b * slb + h * slh + qn, mask=mrow, other=0.0)
        s = _dot(q, tl.trans(k), PREC, UPCAST) * qk_scale
        if HAS_REL:
            rh_row = RH + b * srb + h * srh + qn * srn
            rw_row = RW + b * swb + h * swh + qn * swn
            s += _rel_bias(rh_row, rw_row, mrow, ky0, kx0, kh, kw, tl.zeros((BLOCK_M, BKX), dtype=tl.float32),
                           BLOCK_M, BKY, BKX, False) * 1.4426950408889634
        p = tl.exp2(s - lse[:, None])
        p = tl.where(mrow[:, None] & valid[None, :], p, 0.0)
        dv += _dot(tl.trans(p.to(do.dtype)), do, PREC, UPCAST)
        dp = _dot(do, tl.trans(v), PREC, UPCAST)
        ds = p * (dp - delta[:, None])
        dk += _dot(tl.trans(ds.to(q.dtype)), q, PREC, UPCAST)
    dk = dk * sm_scale
    tl.store(DK + b * sdkb + h * sdkh + kn[:, None] * sdkn + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=kmask)
    tl.store(DV + b * sdvb + h * sdvh + kn[:, None] * sdvn + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=kmask)
    if PADDED:
        # Virtual keys of the completed segments: compact index over the padded-grid margin
        # (rows below the grid first, then the columns right of it), each written exactly once.
        is_pad = valid & (~real)
        below = ky >= ROWS
        pidx = tl.where(below, (ky - ROWS) * PAD_COLS + kx,
                        (PAD_ROWS - ROWS) * PAD_COLS + ky * (PAD_COLS - COLS) + (kx - COLS))
        pmask = is_pad[:, None] & dmask[None, :]
        tl.store(DPADK + b * spb + h * sph + pidx[:, None] * spn + offs_d[None, :], dk, mask=pmask)
        tl.store(DPADV + b * spb + h * sph + pidx[:, None] * spn + offs_d[None, :], dv, mask=pmask)


@triton.jit
def _dilated_attention_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, RH, RW, PADK, PADV, DQ, DRH, DRW,
    sqb, sqn, sqh, skb, skn, skh, svb, svn, svh, sdob, sdon, sdoh, sdqb, sdqn, sdqh,
    slb, slh, srb, srh, srn, swb, swh, swn,
    H, D, ROWS, COLS, SEG_H, SEG_W, DIL_H, DIL_W, NSEG_W,
    qk_scale, sm_scale,
    BLOCK_M: tl.constexpr, BKY: tl.constexpr, BKX: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_REL: tl.constexpr, PADDED: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    """One program per query tile: loops over key blocks, accumulates dQ and the rel-pos table grads.

    With the bias, ``dRH[i, ky] = sum_kx dS[i, (ky, kx)]`` and ``dRW[i, kx] = sum_ky dS[i, (ky, kx)]``;
    the launcher only enables HAS_REL when one key block spans the kept width (SINGLE_KX), so every
    ``dRH`` column is written by exactly one iteration and ``dRW`` stays in registers.
    """
    pid_m = tl.program_id(0)
    seg = tl.program_id(1)
    bh = tl.program_id(2)
    b = bh // H
    h = bh % H
    oy, ox, y0, x0, qh, qw, kh, kw = _segment_geometry(
        seg, h, ROWS, COLS, SEG_H, SEG_W, DIL_H, DIL_W, NSEG_W, PADDED)
    nq = qh * qw
    if pid_m * BLOCK_M >= nq:
        return
    qn, mrow = _query_rows(pid_m * BLOCK_M, nq, qw, y0, x0, oy, ox, COLS, DIL_H, DIL_W, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    qmask = mrow[:, None] & dmask[None, :]
    q = tl.load(Q + b * sqb + h * sqh + qn[:, None] * sqn + offs_d[None, :], mask=qmask, other=0.0)
    do = tl.load(DO + b * sdob + h * sdoh + qn[:, None] * sdon + offs_d[None, :], mask=qmask, other=0.0)
    lse = tl.load(LSE + b * slb + h * slh + qn, mask=mrow, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + b * slb + h * slh + qn, mask=mrow, other=0.0)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    if PADDED:
        pad_k = tl.load(PADK + h * D + offs_d, mask=dmask, other=0.0).to(q.dtype)
        pad_v = tl.load(PADV + h * D + offs_d, mask=dmask, other=0.0).to(q.dtype)
    rh_row = RH + b * srb + h * srh + qn * srn
    rw_row = RW + b * swb + h * swh + qn * swn
    cx = tl.arange(0, BKX)
    rw_tile = tl.zeros((BLOCK_M, BKX), dtype=tl.float32)
    if HAS_REL:
        rw_tile = tl.load(rw_row[:, None] + cx[None, :], mask=mrow[:, None] & (cx < kw)[None, :],
                          other=0.0).to(tl.float32)
    drw = tl.zeros((BLOCK_M, BKX), dtype=tl.float32)
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    n_blocks = ((kh + BKY - 1) // BKY) * ((kw + BKX - 1) // BKX)
    for blk in range(0, n_blocks):
        ky0, kx0, ky, kx, valid, real = _key_block(
            blk, y0, x0, oy, ox, kh, kw, ROWS, COLS, DIL_H, DIL_W, BKY, BKX, PADDED)
        kn = ky * COLS + kx
        kmask = real[:, None] & dmask[None, :]
        k = tl.load(k_base + kn[:, None] * skn + offs_d[None, :], mask=kmask, other=0.0)
        v = tl.load(v_base + kn[:, None] * svn + offs_d[None, :], mask=kmask, other=0.0)
        if PADDED:
            k = tl.where(real[:, None], k, pad_k[None, :])
            v = tl.where(real[:, None], v, pad_v[None, :])
        s = _dot(q, tl.trans(k), PREC, UPCAST) * qk_scale
        if HAS_REL:
            s += _rel_bias(rh_row, rw_row, mrow, ky0, kx0, kh, kw, rw_tile,
                           BLOCK_M, BKY, BKX, True) * 1.4426950408889634
        p = tl.exp2(s - lse[:, None])
        p = tl.where(mrow[:, None] & valid[None, :], p, 0.0)
        dp = _dot(do, tl.trans(v), PREC, UPCAST)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, PREC, UPCAST)
        if HAS_REL:
            ds3 = tl.reshape(ds, (BLOCK_M, BKY, BKX))
            cy = ky0 + tl.arange(0, BKY)
            tl.store(DRH + b * srb + h * srh + qn[:, None] * srn + cy[None, :], tl.sum(ds3, axis=2),
                     mask=mrow[:, None] & (cy < kh)[None, :])
            drw += tl.sum(ds3, axis=1)
    tl.store(DQ + b * sdqb + h * sdqh + qn[:, None] * sdqn + offs_d[None, :], (dq * sm_scale).to(DQ.dtype.element_ty),
             mask=qmask)
    if HAS_REL:
        tl.store(DRW + b * swb + h * swh + qn[:, None] * swn + cx[None, :], drw,
                 mask=mrow[:, None] & (cx < kw)[None, :])


# ----------------------------------------------------------------------------------------------
# Host side: geometry, rel-pos tables, launch configuration, launchers.
# ----------------------------------------------------------------------------------------------

MAX_HEAD_DIM = 128
MAX_REL_WIDTH = 128  # kept segment width up to which the rel-pos path keeps one key block per row


class Geometry(tuple):
    """(rows, cols, seg_h, seg_w, dil_h, dil_w) of one branch on its addressing grid."""

    __slots__ = ()

    def __new__(cls, rows, cols, seg_h, seg_w, dil_h, dil_w):
        return super().__new__(cls, (int(rows), int(cols), int(seg_h), int(seg_w), int(dil_h), int(dil_w)))

    rows = property(lambda s: s[0])
    cols = property(lambda s: s[1])
    seg = property(lambda s: (s[2], s[3]))
    dil = property(lambda s: (s[4], s[5]))

    @property
    def n_seg(self):
        return (-(-self.rows // self[2]), -(-self.cols // self[3]))

    def kept_extent(self, padded: bool):
        """Largest number of kept key rows / columns in any segment (over all head offsets)."""
        sh, sw = self.seg
        dy, dx = self.dil
        if padded:
            return -(-sh // dy), -(-sw // dx)
        return -(-min(sh, self.rows) // dy), -(-min(sw, self.cols) // dx)

    def max_queries(self):
        kh, kw = self.kept_extent(False)
        return kh * kw

    def padded_grid(self):
        nsy, nsx = self.n_seg
        return nsy * self[2], nsx * self[3]


def _pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def _rel_index(n_coord: int, seg: int, dil: int, kept: int, heads: int, offset_of_head, center: int):
    """idx[h, c, u] = c - (segment origin of c + offset(h) + u * dil) + center, clamped to the table."""
    c = torch.arange(n_coord)
    origin = (c // seg) * seg
    u = torch.arange(kept)
    offs = torch.tensor([offset_of_head(h) for h in range(heads)])
    idx = c[None, :, None] - (origin[None, :, None] + offs[:, None, None] + u[None, None, :] * dil) + center
    return idx


def relpos_tables(q: torch.Tensor, geom: Geometry, rel_pos_h, rel_pos_w, padded: bool):
    """Per-query projections of the rel-pos tables onto every kept key row / column of its segment.

    Returns ``rh`` (B, H, N, KHP), ``rw`` (B, H, N, KWP) in q's dtype (fp32 accumulate), and the
    gathered tables ``(gh (H, rows, KHP, D), idx_h, gw, idx_w)`` the backward needs.
    """
    B, N, H, D = q.shape
    rows, cols = geom.rows, geom.cols
    dy, dx = geom.dil
    kh, kw = geom.kept_extent(padded)
    khp, kwp = _pow2(kh), _pow2(kw)
    idx_h = _rel_index(rows, geom[2], dy, khp, H, lambda h: (h // dx) % dy, (rel_pos_h.shape[0] - 1) // 2)
    idx_w = _rel_index(cols, geom[3], dx, kwp, H, lambda h: h % dx, (rel_pos_w.shape[0] - 1) // 2)
    idx_h = idx_h.clamp(0, rel_pos_h.shape[0] - 1).to(q.device)
    idx_w = idx_w.clamp(0, rel_pos_w.shape[0] - 1).to(q.device)
    gh = rel_pos_h.to(q.dtype)[idx_h]  # (H, rows, KHP, D)
    gw = rel_pos_w.to(q.dtype)[idx_w]  # (H, cols, KWP, D)
    q5 = q.unflatten(1, (rows, cols))  # a view for any (B, N, H, D) strides
    rh = torch.einsum("byxhd,hyud->bhyxu", q5, gh).reshape(B, H, N, khp)
    rw = torch.einsum("byxhd,hxud->bhyxu", q5, gw).reshape(B, H, N, kwp)
    return rh, rw, (gh, idx_h, gw, idx_w)


def relpos_backward(q, drh, drw, tables, rel_pos_h, rel_pos_w):
    """Chain rule from the table gradients dRH/dRW to dq (B, N, H, D) and the two rel-pos tables."""
    B, N, H, D = q.shape
    gh, idx_h, gw, idx_w = tables
    rows, cols = gh.shape[1], gw.shape[1]
    drh5 = drh.view(B, H, rows, cols, -1)
    drw5 = drw.view(B, H, rows, cols, -1)
    q5 = q.float().reshape(B, rows, cols, H, D)
    dq = torch.einsum("bhyxu,hyud->byxhd", drh5, gh.float()) + torch.einsum("bhyxu,hxud->byxhd", drw5, gw.float())
    dgh = torch.einsum("bhyxu,byxhd->hyud", drh5, q5)
    dgw = torch.einsum("bhyxu,byxhd->hxud", drw5, q5)
    dtab_h = torch.zeros(rel_pos_h.shape, dtype=torch.float32, device=q.device)
    dtab_w = torch.zeros(rel_pos_w.shape, dtype=torch.float32, device=q.device)
    dtab_h.index_add_(0, idx_h.reshape(-1), dgh.reshape(-1, D))
    dtab_w.index_add_(0, idx_w.reshape(-1), dgw.reshape(-1, D))
    return dq.reshape(B, N, H, D), dtab_h.to(rel_pos_h.dtype), dtab_w.to(rel_pos_w.dtype)


def _launch_config(geom: Geometry, padded: bool, has_rel: bool, head_dim: int, backward: bool = False):
    """Block shapes for one branch. Key blocks are BKY x BKX kept positions, BKX a power of two
    covering the kept width when it is small (one block per key row run), 64 otherwise."""
    kh, kw = geom.kept_extent(padded)
    kwp = _pow2(kw)
    interp = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    block_n = 64
    if has_rel:
        block_n = max(block_n, kwp)  # one block spans the kept width (SINGLE_KX)
        bkx = kwp
    else:
        bkx = min(kwp, block_n)
    bky = max(1, block_n // bkx)
    block_m = 64 if (interp or backward or head_dim > 64) else 128
    block_d = max(16, _pow2(head_dim))
    num_warps = 4 if block_m == 64 else 8
    return dict(BLOCK_M=block_m, BKY=bky, BKX=bkx, BLOCK_D=block_d, SINGLE_KX=kwp <= bkx, num_warps=num_warps)


def _precision(dtype):
    return "ieee" if dtype == torch.float32 else "tf32"


def _upcast(dtype):
    return dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def dilated_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    geom: Geometry,
    rel_pos_h: Optional[torch.Tensor],
    rel_pos_w: Optional[torch.Tensor],
    pad_k: Optional[torch.Tensor],
    pad_v: Optional[torch.Tensor],
    scale: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel for one branch. Returns (out (B, N, H, D), lse (B, H, N) fp32)."""
    B, N, H, D = q.shape
    padded = pad_k is not None
    has_rel = rel_pos_h is not None
    cfg = _launch_config(geom, padded, has_rel, D)
    covers_all = geom.dil == (1, 1)
    # With dilation some positions are kept by no program: they must read as out = 0, lse = -inf.
    if covers_all:
        out = torch.empty((B, N, H, D), dtype=q.dtype, device=q.device)
        lse = torch.empty((B, H, N), dtype=torch.float32, device=q.device)
    else:
        out = torch.zeros((B, N, H, D), dtype=q.dtype, device=q.device)
        lse = torch.full((B, H, N), float("-inf"), dtype=torch.float32, device=q.device)
    if has_rel:
        rh, rw, _ = relpos_tables(q, geom, rel_pos_h, rel_pos_w, padded)
    else:
        rh = rw = q.new_empty((1, 1, 1, 1))
    pk = pad_k.contiguous() if padded else q.new_empty(1)
    pv = pad_v.contiguous() if padded else q.new_empty(1)
    nsy, nsx = geom.n_seg
    grid = (triton.cdiv(geom.max_queries(), cfg["BLOCK_M"]), nsy * nsx, B * H)
    _dilated_attention_fwd_kernel[grid](
        q, k, v, out, lse, rh, rw, pk, pv,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1), rh.stride(0), rh.stride(1), rh.stride(2),
        rw.stride(0), rw.stride(1), rw.stride(2),
        H, D, geom.rows, geom.cols, geom[2], geom[3], geom[4], geom[5], nsx,
        scale * LOG2E,
        BLOCK_M=cfg["BLOCK_M"], BKY=cfg["BKY"], BKX=cfg["BKX"], BLOCK_D=cfg["BLOCK_D"],
        HAS_REL=has_rel, SINGLE_KX=cfg["SINGLE_KX"], PADDED=padded, PREC=_precision(q.dtype),
        UPCAST=_upcast(q.dtype),
        num_warps=cfg["num_warps"], num_stages=2,
    )
    return out, lse


def dilated_attention_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dlse: Optional[torch.Tensor],
    geom: Geometry,
    rel_pos_h: Optional[torch.Tensor],
    rel_pos_w: Optional[torch.Tensor],
    pad_k: Optional[torch.Tensor],
    pad_v: Optional[torch.Tensor],
    scale: float,
):
    """Launch the two backward kernels. Returns (dq, dk, dv, d_rel_pos_h, d_rel_pos_w, dpad_k, dpad_v),
    the last four None when the corresponding input is absent."""
    B, N, H, D = q.shape
    padded = pad_k is not None
    has_rel = rel_pos_h is not None
    cfg = _launch_config(geom, padded, has_rel, D, backward=True)
    if dout.stride(-1) != 1:  # autograd may hand in expanded (stride-0) gradients
        dout = dout.contiguous()
    # delta_i = sum_d dO_i O_i; a gradient flowing into lse adds p_ij * dlse_i to dS, i.e. subtracts
    # dlse from delta.
    delta = (dout.float() * out.float()).sum(-1).transpose(1, 2).contiguous()
    if dlse is not None:
        delta = delta - torch.where(torch.isfinite(lse), dlse.float(), torch.zeros_like(delta))
    # With the bias, dq gets a second term from the tables: keep the kernel's part in fp32 until then.
    dq = torch.empty(q.shape, dtype=torch.float32 if has_rel else q.dtype, device=q.device)
    covers_all = geom.dil == (1, 1)
    alloc = torch.empty_like if covers_all else torch.zeros_like
    dk = alloc(k, memory_format=torch.contiguous_format)
    dv = alloc(v, memory_format=torch.contiguous_format)
    if has_rel:
        rh, rw, tables = relpos_tables(q, geom, rel_pos_h, rel_pos_w, padded)
        drh = torch.zeros(rh.shape, dtype=torch.float32, device=q.device)
        drw = torch.zeros(rw.shape, dtype=torch.float32, device=q.device)
    else:
        rh = rw = drh = drw = q.new_empty((1, 1, 1, 1))
    if padded:
        pr, pc = geom.padded_grid()
        npad = pr * pc - geom.rows * geom.cols
        dpk = torch.zeros((B, H, max(npad, 1), D), dtype=torch.float32, device=q.device)
        dpv = torch.zeros_like(dpk)
        pk, pv = pad_k.contiguous(), pad_v.contiguous()
    else:
        pr, pc = geom.rows, geom.cols
        dpk = dpv = torch.zeros((1, 1, 1, 1), dtype=torch.float32, device=q.device)
        pk = pv = q.new_empty(1)
    nsy, nsx = geom.n_seg
    kh, kw = geom.kept_extent(padded)
    n_kblocks = triton.cdiv(kh, cfg["BKY"]) * triton.cdiv(kw, cfg["BKX"])
    common = dict(BKY=cfg["BKY"], BKX=cfg["BKX"], BLOCK_D=cfg["BLOCK_D"], HAS_REL=has_rel, PADDED=padded,
                  PREC=_precision(q.dtype), UPCAST=_upcast(q.dtype), num_warps=4, num_stages=1)
    _dilated_attention_bwd_dkdv_kernel[(n_kblocks, nsy * nsx, B * H)](
        q, k, v, dout, lse, delta, rh, rw, pk, pv, dk, dv, dpk, dpv,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), dout.stride(0), dout.stride(1), dout.stride(2),
        dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
        lse.stride(0), lse.stride(1), rh.stride(0), rh.stride(1), rh.stride(2),
        rw.stride(0), rw.stride(1), rw.stride(2), dpk.stride(0), dpk.stride(1), dpk.stride(2),
        H, D, geom.rows, geom.cols, geom[2], geom[3], geom[4], geom[5], nsx, pr, pc,
        scale * LOG2E, scale, BLOCK_M=cfg["BLOCK_M"], **common,
    )
    _dilated_attention_bwd_dq_kernel[(triton.cdiv(geom.max_queries(), cfg["BLOCK_M"]), nsy * nsx, B * H)](
        q, k, v, dout, lse, delta, rh, rw, pk, pv, dq, drh, drw,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), dout.stride(0), dout.stride(1), dout.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2),
        lse.stride(0), lse.stride(1), rh.stride(0), rh.stride(1), rh.stride(2),
        rw.stride(0), rw.stride(1), rw.stride(2),
        H, D, geom.rows, geom.cols, geom[2], geom[3], geom[4], geom[5], nsx,
        scale * LOG2E, scale, BLOCK_M=cfg["BLOCK_M"], **common,
    )
    drel_h = drel_w = dpad_k = dpad_v = None
    if has_rel:
        dq_rel, drel_h, drel_w = relpos_backward(q, drh, drw, tables, rel_pos_h, rel_pos_w)
        dq = (dq + dq_rel).to(q.dtype)
    if padded:
        dpad_k = dpk.sum(dim=(0, 2)).to(pad_k.dtype)
        dpad_v = dpv.sum(dim=(0, 2)).to(pad_v.dtype)
    return dq, dk, dv, drel_h, drel_w, dpad_k, dpad_v
