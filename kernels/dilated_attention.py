"""Flash dilated attention with SAM's decomposed relative-position bias (Triton).

One kernel family for every pattern of docs/design.md ("Dilated flash attention") (see :mod:`sam_fast.pattern`):
dense attention, SAM's windows, dilated 1-D / 2-D branches and multi-branch mixes, forward and
backward, with online softmax (no N x N matrix in memory), no gather/scatter or padding copies and no
atomics. SAM-Lightening's dilated attention is what this serves; the rel-pos bias is segment_anything's
``add_decomposed_rel_pos`` with absolute grid coordinates.

How a launch is organised:

* Every branch lives on a 2-D addressing grid ``(rows, cols)`` (a 1-D branch over N tokens is the
  grid ``(1, N)``). Branches are planned into *groups* (:func:`plan_groups`); a group is one launch.
* A group's *base segment* is its smallest segment and its *step* the lcm of its dilations. Query
  tiles are *class tiles*: the positions of one base segment with one residue modulo the step. Such a
  tile lies inside one segment of every branch of the group and, for each head, is either kept
  entirely by a branch or not at all; so a program runs every branch that keeps its tile through
  **one** online softmax, which is exactly the lse-weighted merge of the branches, and writes out and
  lse once. Tiles no branch keeps write out 0 and lse -inf. Nested patterns (any single branch,
  LongNet's powers of two) are one group; others become several launches, each starting its online
  softmax from the (out, lse) the previous one left (ACCUMULATE): exact, deterministic, no atomics.
* Backward: the merged attention is a softmax over the union of the branches' key sets normalised by
  the combined lse, so each branch's gradient is the flash backward with that lse and
  ``delta = rowsum(dO * O) - dlse``; the gradient through the branch weights needs no extra term.
  dQ programs own class tiles (like the forward), dK/dV programs own key blocks of class tiles; each
  loops over the branches that keep its tile.
* Keys are visited in 2-D blocks of ``BKY x BKX`` kept positions so that the rel-pos bias of a block is
  ``RH[i, ky] + RW[i, kx]``: column slices of two small per-query tables (one pair per branch, side by
  side) instead of a gather per score. The tables are made by :func:`relpos_tables` with tensor-core
  einsums (segment_anything computes the same ``rel_h``/``rel_w``). A 1-D branch over a 2-D grid has no
  such decomposition (its segments wrap around grid rows): its bias is one per-query table over the
  kept keys (:func:`relpos_table_1d`, memory B * H * N * kept, like a bias mask), read per key block
  (REL_ROWS off). A pattern mixing 1-D and 2-D branches runs each kind in its own launch group.

Tensor contract (the launchers check nothing a caller could get wrong; sam_fast.ops validates):

* ``q, k, v``: (B, N, H, D), last dim contiguous, other strides free, fp16/bf16/fp32, D <= 128.
  D is padded to a power of two inside the kernel by masked loads, never by copies; a D that is not
  a power of two runs as two power-of-two column slices when that pads less
  (:func:`head_dim_split`: ViT-H's 80 runs as 64 + 16, not 128).
* ``pad_k, pad_v`` (H, D), single 2-D branch only: partial segments are completed to full size with
  virtual keys carrying these vectors (segment_anything pads windows with zero tokens whose k and v
  are the qkv bias). Their gradients are reduced through a compact scratch, no atomics.
* Outputs: ``out`` (B, N, H, D) in the input dtype, ``lse`` (B, H, N) fp32 natural log.

Softmax runs in base 2 (``exp2``) with ``log2(e)`` folded into the scale and bias.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from ._arch import COMPILE_OPTIONS, device_arch
from ._interpreter import interpreting as _interpreting

LOG2E = 1.4426950408889634


@triton.jit
def _dot(a, b, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """tl.dot with fp32 accumulation. UPCAST (set only under TRITON_INTERPRET for bfloat16, whose dot the
    interpreter gets wrong) feeds fp32 copies: bf16 products are exact in fp32, so the result is the
    tensor-core one up to summation order."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _tile_geometry(pid_s, ROWS, COLS, BSEG_H, BSEG_W, RY, RX, NSEG_W, PADDED: tl.constexpr):
    """First position, and query / key extents, of the class tile ``pid_s`` = (base segment, class).

    A class is a residue ``(cy, cx)`` modulo ``(RY, RX)`` inside a base segment; its positions form the
    lattice ``(y0 + cy + RY * a, x0 + cx + RX * b)``. Key extents cover SAM's padded segment when PADDED.
    """
    ncls = RY * RX
    cls = pid_s % ncls
    s = pid_s // ncls
    cy = cls // RX
    cx = cls % RX
    y0 = (s // NSEG_W) * BSEG_H
    x0 = (s % NSEG_W) * BSEG_W
    rows = tl.minimum(BSEG_H, ROWS - y0)
    cols = tl.minimum(BSEG_W, COLS - x0)
    qh = tl.maximum(rows - cy + RY - 1, 0) // RY
    qw = tl.maximum(cols - cx + RX - 1, 0) // RX
    if PADDED:
        kh = tl.maximum(BSEG_H - cy + RY - 1, 0) // RY
        kw = tl.maximum(BSEG_W - cx + RX - 1, 0) // RX
    else:
        kh = qh
        kw = qw
    return y0 + cy, x0 + cx, qh, qw, kh, kw


@triton.jit
def _branch_segment(ty0, tx0, h, ROWS, COLS, SEG_H, SEG_W, DIL_H, DIL_W, PADDED: tl.constexpr):
    """Branch ``(SEG, DIL)`` as seen from a class tile whose first position is (ty0, tx0).

    The tile lies inside one segment of the branch (the launcher only groups branches whose segments
    are multiples of the base segment) and all its positions share their residue modulo the dilation,
    so either every tile position is kept by the branch for head h or none is. Returns the segment
    origin, head offsets, kept query extents and kept key extents (all zero when not kept).
    """
    oy = (h // DIL_W) % DIL_H
    ox = h % DIL_W
    y0 = (ty0 // SEG_H) * SEG_H
    x0 = (tx0 // SEG_W) * SEG_W
    active = (((ty0 - y0) % DIL_H) == oy) & (((tx0 - x0) % DIL_W) == ox)
    seg_rows = tl.minimum(SEG_H, ROWS - y0)
    seg_cols = tl.minimum(SEG_W, COLS - x0)
    qh = tl.where(active, tl.maximum(seg_rows - oy + DIL_H - 1, 0) // DIL_H, 0)
    qw = tl.where(active, tl.maximum(seg_cols - ox + DIL_W - 1, 0) // DIL_W, 0)
    if PADDED:
        kh = tl.where(active, (SEG_H - oy + DIL_H - 1) // DIL_H, 0)
        kw = tl.where(active, (SEG_W - ox + DIL_W - 1) // DIL_W, 0)
    else:
        kh = qh
        kw = qw
    return y0, x0, oy, ox, qh, qw, kh, kw


@triton.jit
def _query_rows(t0, nq, qw, yf, xf, COLS, STEP_H, STEP_W, BLOCK_M: tl.constexpr):
    """Token indices of lattice points t0 .. t0 + BLOCK_M of the lattice ``(yf + STEP_H * a, xf + STEP_W * b)``
    with ``qw`` points per row (row-major), and which of them exist (t < nq)."""
    t = t0 + tl.arange(0, BLOCK_M)
    qwc = tl.maximum(qw, 1)
    qn = (yf + (t // qwc) * STEP_H) * COLS + (xf + (t % qwc) * STEP_W)
    return qn, t < nq


@triton.jit
def _key_block(blk, yf, xf, kh, kw, ROWS, COLS, STEP_H, STEP_W,
               BKY: tl.constexpr, BKX: tl.constexpr, PADDED: tl.constexpr):
    """Key block ``blk`` (BKY x BKX lattice points, row-major) of a kh x kw lattice starting at (yf, xf).

    Returns the block's lattice row / column indices (BKY,), (BKX,), token coordinates (BLOCK_N,),
    ``valid`` (inside the lattice) and ``real`` (also inside the grid: False for SAM's virtual keys).
    """
    nbx = (kw + BKX - 1) // BKX
    cy = (blk // nbx) * BKY + tl.arange(0, BKY)
    cx = (blk % nbx) * BKX + tl.arange(0, BKX)
    j = tl.arange(0, BKY * BKX)
    jy = (blk // nbx) * BKY + j // BKX
    jx = (blk % nbx) * BKX + j % BKX
    valid = (jy < kh) & (jx < kw)
    ky = yf + jy * STEP_H
    kx = xf + jx * STEP_W
    if PADDED:
        real = valid & (ky < ROWS) & (kx < COLS)
    else:
        real = valid
    return cy, cx, ky, kx, valid, real


@triton.jit
def _pad_vectors(PADK, PADV, h, D, offs_d, dmask, dtype: tl.constexpr, BLOCK_D: tl.constexpr, PADDED: tl.constexpr):
    """Head h's virtual-key vectors (k, v) for SAM's window padding; zeros when not PADDED."""
    if PADDED:
        pad_k = tl.load(PADK + h * D + offs_d, mask=dmask, other=0.0).to(dtype)
        pad_v = tl.load(PADV + h * D + offs_d, mask=dmask, other=0.0).to(dtype)
    else:
        pad_k = tl.zeros((BLOCK_D,), dtype=dtype)
        pad_v = pad_k
    return pad_k, pad_v


@triton.jit
def _load_key_block(blk, yf, xf, kh, kw, ROWS, COLS, STEP_H, STEP_W, k_base, v_base, skn, svn, offs_d, dmask,
                    pad_k, pad_v, BKY: tl.constexpr, BKX: tl.constexpr, PADDED: tl.constexpr):
    """:func:`_key_block` plus its K and V tiles (BLOCK_N, BLOCK_D); SAM's virtual keys get pad_k/pad_v."""
    cy, cx, ky, kx, valid, real = _key_block(blk, yf, xf, kh, kw, ROWS, COLS, STEP_H, STEP_W, BKY, BKX, PADDED)
    k, v = _load_kv(ky * COLS + kx, real, k_base, v_base, skn, svn, offs_d, dmask, pad_k, pad_v, PADDED)
    return cy, cx, ky, kx, valid, real, k, v


@triton.jit
def _load_kv(kn, real, k_base, v_base, skn, svn, offs_d, dmask, pad_k, pad_v, PADDED: tl.constexpr):
    """K and V tiles (BLOCK_N, len(offs_d)) of tokens kn at head-dim columns offs_d; virtual keys
    (not ``real``) get pad_k / pad_v."""
    kmask = real[:, None] & dmask[None, :]
    k = tl.load(k_base + kn[:, None] * skn + offs_d[None, :], mask=kmask, other=0.0)
    v = tl.load(v_base + kn[:, None] * svn + offs_d[None, :], mask=kmask, other=0.0)
    if PADDED:
        k = tl.where(real[:, None], k, pad_k[None, :])
        v = tl.where(real[:, None], v, pad_v[None, :])
    return k, v


@triton.jit
def _rw_columns(rw_row, mrow, kw, BLOCK_M: tl.constexpr, BKX: tl.constexpr, LOAD: tl.constexpr):
    """RW[i, 0:BKX] for the query rows (zeros unless LOAD): the whole kept width when one key block spans it."""
    cx0 = tl.arange(0, BKX)
    tile = tl.zeros((BLOCK_M, BKX), dtype=tl.float32)
    if LOAD:
        tile = tl.load(rw_row[:, None] + cx0[None, :], mask=mrow[:, None] & (cx0 < kw)[None, :],
                       other=0.0).to(tl.float32)
    return tile


@triton.jit
def _rel_bias(rh_row, rw_row, mrow, cy, cx, kh, kw, rw_tile, BLOCK_M: tl.constexpr, BKY: tl.constexpr,
              BKX: tl.constexpr, REL_ROWS: tl.constexpr, SINGLE_KX: tl.constexpr):
    """Bias tile (BLOCK_M, BKY * BKX) of a key block with kept rows cy (BKY,) and columns cx (BKX,).

    REL_ROWS (2-D branches): RH[i, cy] + RW[i, cx], SAM's decomposed bias. Otherwise (1-D branches, one
    lattice row) RW[i, cx] alone: a per-query table over the branch's kept keys (:func:`relpos_table_1d`).
    With SINGLE_KX the RW columns are the preloaded ``rw_tile``."""
    if SINGLE_KX:
        rw = rw_tile
    else:
        rw = tl.load(rw_row[:, None] + cx[None, :], mask=mrow[:, None] & (cx < kw)[None, :], other=0.0).to(tl.float32)
    if REL_ROWS:
        rh = tl.load(rh_row[:, None] + cy[None, :], mask=mrow[:, None] & (cy < kh)[None, :],
                     other=0.0).to(tl.float32)
        bias = rh[:, :, None] + rw[:, None, :]
    else:
        bias = tl.broadcast_to(rw[:, None, :], (BLOCK_M, BKY, BKX))
    return tl.reshape(bias, (BLOCK_M, BKY * BKX))


@triton.jit
def _block_logits(qk, qk_scale, rh_row, rw_row, mrow, cy, cx, kh, kw, rw_tile, BLOCK_M: tl.constexpr,
                  BKY: tl.constexpr, BKX: tl.constexpr, HAS_REL: tl.constexpr, REL_ROWS: tl.constexpr,
                  SINGLE_KX: tl.constexpr):
    """Base-2 logits (BLOCK_M, BLOCK_N) of a query tile against a key block from ``qk`` = q k^T:
    scale * qk (+ bias)."""
    s = qk * qk_scale
    if HAS_REL:
        s += _rel_bias(rh_row, rw_row, mrow, cy, cx, kh, kw, rw_tile, BLOCK_M, BKY, BKX, REL_ROWS,
                       SINGLE_KX) * 1.4426950408889634
    return s


@triton.jit
def _branch_keys(ty0, tx0, h, rh_row, rw_row, mrow, ROWS, COLS, SEG_H, SEG_W, DIL_H, DIL_W, RH_OFF, RW_OFF,
                 BLOCK_M: tl.constexpr, BKY: tl.constexpr, BKX: tl.constexpr, HAS_REL: tl.constexpr,
                 PADDED: tl.constexpr):
    """One branch seen from a query tile: the first kept key (yf, xf), the kept key extents, the number
    of key blocks (0 when the branch does not keep the tile), the query rows' RH / RW pointers at the
    branch's table columns, and the preloaded RW tile (with the bias one key block spans the width)."""
    y0, x0, oy, ox, qh, qw, kh, kw = _branch_segment(ty0, tx0, h, ROWS, COLS, SEG_H, SEG_W, DIL_H, DIL_W, PADDED)
    rh_row = rh_row + RH_OFF
    rw_row = rw_row + RW_OFF
    rw_tile = _rw_columns(rw_row, mrow, kw, BLOCK_M, BKX, HAS_REL)
    n_blocks = ((kh + BKY - 1) // BKY) * ((kw + BKX - 1) // BKX)
    return y0 + oy, x0 + ox, kh, kw, n_blocks, rh_row, rw_row, rw_tile


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
    S0H, S0W, D0H, D0W, S1H, S1W, D1H, D1W, H1, W1, S2H, S2W, D2H, D2W, H2, W2, S3H, S3W, D3H, D3W, H3, W3,
    NB: tl.constexpr, BLOCK_M: tl.constexpr, BKY: tl.constexpr, BKX: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DT: tl.constexpr, TAIL: tl.constexpr,
    HAS_REL: tl.constexpr, REL_ROWS: tl.constexpr, SINGLE_KX: tl.constexpr, PADDED: tl.constexpr, PREC: tl.constexpr,
    UPCAST: tl.constexpr, ACCUMULATE: tl.constexpr,
):
    """One program per (query tile, class tile, batch * head). Runs every branch of the group (NB <= 4,
    geometry ``S*/D*``, rel-pos table column offsets ``H*/W*``) through one online softmax, which is
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

    acc, acc_t, m_i, l_i = _fwd_branch(
        acc, acc_t, m_i, l_i, q, q_t, mrow, rh_row, rw_row, k_base, v_base, skn, svn, offs_d, dmask, offs_t,
        dmask_t, pad_k, pad_v, pad_kt, pad_vt, ty0, tx0, h, ROWS, COLS, S0H, S0W, D0H, D0W, 0, 0, qk_scale,
        BLOCK_M, BKY, BKX, HAS_REL, REL_ROWS, SINGLE_KX, PADDED, PREC, UPCAST, TAIL)
    if NB > 1:
        acc, acc_t, m_i, l_i = _fwd_branch(
            acc, acc_t, m_i, l_i, q, q_t, mrow, rh_row, rw_row, k_base, v_base, skn, svn, offs_d, dmask, offs_t,
            dmask_t, pad_k, pad_v, pad_kt, pad_vt, ty0, tx0, h, ROWS, COLS, S1H, S1W, D1H, D1W, H1, W1, qk_scale,
            BLOCK_M, BKY, BKX, HAS_REL, REL_ROWS, SINGLE_KX, PADDED, PREC, UPCAST, TAIL)
    if NB > 2:
        acc, acc_t, m_i, l_i = _fwd_branch(
            acc, acc_t, m_i, l_i, q, q_t, mrow, rh_row, rw_row, k_base, v_base, skn, svn, offs_d, dmask, offs_t,
            dmask_t, pad_k, pad_v, pad_kt, pad_vt, ty0, tx0, h, ROWS, COLS, S2H, S2W, D2H, D2W, H2, W2, qk_scale,
            BLOCK_M, BKY, BKX, HAS_REL, REL_ROWS, SINGLE_KX, PADDED, PREC, UPCAST, TAIL)
    if NB > 3:
        acc, acc_t, m_i, l_i = _fwd_branch(
            acc, acc_t, m_i, l_i, q, q_t, mrow, rh_row, rw_row, k_base, v_base, skn, svn, offs_d, dmask, offs_t,
            dmask_t, pad_k, pad_v, pad_kt, pad_vt, ty0, tx0, h, ROWS, COLS, S3H, S3W, D3H, D3W, H3, W3, qk_scale,
            BLOCK_M, BKY, BKX, HAS_REL, REL_ROWS, SINGLE_KX, PADDED, PREC, UPCAST, TAIL)

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
    S0H, S0W, D0H, D0W, S1H, S1W, D1H, D1W, H1, W1, S2H, S2W, D2H, D2W, H2, W2, S3H, S3W, D3H, D3W, H3, W3,
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
    dk, dv, dk_t, dv_t = _dkdv_branch(
        dk, dv, dk_t, dv_t, k, v, k_t, v_t, kyv, kxv, valid, ty0, tx0, b, h, Q, DO, LSE, DELTA, RH, RW,
        sqb, sqn, sqh, sdob, sdon, sdoh, slb, slh, srb, srh, srn, swb, swh, swn, offs_d, dmask, offs_t, dmask_t,
        ROWS, COLS, S0H, S0W, D0H, D0W, 0, 0, qk_scale, BLOCK_M, BKY, BKX, HAS_REL, REL_ROWS, PADDED, PREC, UPCAST,
        TAIL)
    if NB > 1:
        dk, dv, dk_t, dv_t = _dkdv_branch(
            dk, dv, dk_t, dv_t, k, v, k_t, v_t, kyv, kxv, valid, ty0, tx0, b, h, Q, DO, LSE, DELTA, RH, RW,
            sqb, sqn, sqh, sdob, sdon, sdoh, slb, slh, srb, srh, srn, swb, swh, swn, offs_d, dmask, offs_t,
            dmask_t, ROWS, COLS, S1H, S1W, D1H, D1W, H1, W1, qk_scale, BLOCK_M, BKY, BKX, HAS_REL, REL_ROWS,
            PADDED, PREC, UPCAST, TAIL)
    if NB > 2:
        dk, dv, dk_t, dv_t = _dkdv_branch(
            dk, dv, dk_t, dv_t, k, v, k_t, v_t, kyv, kxv, valid, ty0, tx0, b, h, Q, DO, LSE, DELTA, RH, RW,
            sqb, sqn, sqh, sdob, sdon, sdoh, slb, slh, srb, srh, srn, swb, swh, swn, offs_d, dmask, offs_t,
            dmask_t, ROWS, COLS, S2H, S2W, D2H, D2W, H2, W2, qk_scale, BLOCK_M, BKY, BKX, HAS_REL, REL_ROWS,
            PADDED, PREC, UPCAST, TAIL)
    if NB > 3:
        dk, dv, dk_t, dv_t = _dkdv_branch(
            dk, dv, dk_t, dv_t, k, v, k_t, v_t, kyv, kxv, valid, ty0, tx0, b, h, Q, DO, LSE, DELTA, RH, RW,
            sqb, sqn, sqh, sdob, sdon, sdoh, slb, slh, srb, srh, srn, swb, swh, swn, offs_d, dmask, offs_t,
            dmask_t, ROWS, COLS, S3H, S3W, D3H, D3W, H3, W3, qk_scale, BLOCK_M, BKY, BKX, HAS_REL, REL_ROWS,
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
    S0H, S0W, D0H, D0W, S1H, S1W, D1H, D1W, H1, W1, S2H, S2W, D2H, D2W, H2, W2, S3H, S3W, D3H, D3W, H3, W3,
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
    dq, dq_t = _dq_branch(
        dq, dq_t, q, q_t, do, do_t, lse, delta, mrow, rh_row, rw_row, drh_row, drw_row, k_base, v_base, skn, svn,
        offs_d, dmask, offs_t, dmask_t, pad_k, pad_v, pad_kt, pad_vt, ty0, tx0, h, ROWS, COLS,
        S0H, S0W, D0H, D0W, 0, 0, qk_scale, BLOCK_M, BKY, BKX, HAS_REL, REL_ROWS, PADDED, PREC, UPCAST, TAIL)
    if NB > 1:
        dq, dq_t = _dq_branch(
            dq, dq_t, q, q_t, do, do_t, lse, delta, mrow, rh_row, rw_row, drh_row, drw_row, k_base, v_base, skn,
            svn, offs_d, dmask, offs_t, dmask_t, pad_k, pad_v, pad_kt, pad_vt, ty0, tx0, h, ROWS, COLS,
            S1H, S1W, D1H, D1W, H1, W1, qk_scale, BLOCK_M, BKY, BKX, HAS_REL, REL_ROWS, PADDED, PREC, UPCAST, TAIL)
    if NB > 2:
        dq, dq_t = _dq_branch(
            dq, dq_t, q, q_t, do, do_t, lse, delta, mrow, rh_row, rw_row, drh_row, drw_row, k_base, v_base, skn,
            svn, offs_d, dmask, offs_t, dmask_t, pad_k, pad_v, pad_kt, pad_vt, ty0, tx0, h, ROWS, COLS,
            S2H, S2W, D2H, D2W, H2, W2, qk_scale, BLOCK_M, BKY, BKX, HAS_REL, REL_ROWS, PADDED, PREC, UPCAST, TAIL)
    if NB > 3:
        dq, dq_t = _dq_branch(
            dq, dq_t, q, q_t, do, do_t, lse, delta, mrow, rh_row, rw_row, drh_row, drw_row, k_base, v_base, skn,
            svn, offs_d, dmask, offs_t, dmask_t, pad_k, pad_v, pad_kt, pad_vt, ty0, tx0, h, ROWS, COLS,
            S3H, S3W, D3H, D3W, H3, W3, qk_scale, BLOCK_M, BKY, BKX, HAS_REL, REL_ROWS, PADDED, PREC, UPCAST, TAIL)
    dq_rows = DQ + b * sdqb + h * sdqh + qn[:, None] * sdqn
    _store_tile(dq_rows + offs_d[None, :], dq * sm_scale, qmask, ACCUMULATE)
    if TAIL:
        _store_tile(dq_rows + offs_t[None, :], dq_t * sm_scale, qmask_t, ACCUMULATE)


# ----------------------------------------------------------------------------------------------
# Host side: geometry, branch groups, rel-pos tables, launch configuration, launchers.
# ----------------------------------------------------------------------------------------------

MAX_HEAD_DIM = 128
MAX_REL_WIDTH = 128  # kept segment width up to which the rel-pos path keeps one key block per row
MAX_GROUP_BRANCHES = 4  # branches one launch runs (the kernels take 4 branch geometries)
# Fusing branches shrinks query tiles to (base segment / lcm of dilations) positions; fuse only while a
# tile keeps at least min(MIN_FUSED_TILE, each branch's own tile) queries, so no program runs mostly
# empty rows (LongNet's {(1024,1),(2048,2),(4096,4)} keeps 256 per tile and fuses).
MIN_FUSED_TILE = 64


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

    def padded_grid(self):
        nsy, nsx = self.n_seg
        return nsy * self[2], nsx * self[3]


def encode_pattern(rows: int, cols: int, branches) -> list:
    """Flat int list (the custom ops' ``geometry``): the token grid ``[rows, cols]`` (``[1, N]`` without
    one), then ``[b_rows, b_cols, seg_h, seg_w, dil_h, dil_w]`` per branch, each branch on its own
    addressing grid: a 2-D branch on the token grid, a 1-D branch on ``(1, N)``."""
    out = [int(rows), int(cols)]
    for branch in branches:
        if len(branch) != 6:
            raise ValueError(f"each branch must be (rows, cols, seg_h, seg_w, dil_h, dil_w), got {tuple(branch)}")
        out += [int(x) for x in branch]
    return out


def decode_pattern(geometry) -> Tuple[Tuple[int, int], Tuple[Geometry, ...]]:
    """(token grid, branch geometries) of an :func:`encode_pattern` list."""
    geometry = [int(x) for x in geometry]
    rest = geometry[2:]
    if len(geometry) < 8 or len(rest) % 6:
        raise ValueError(f"geometry must be [rows, cols] + 6 ints per branch, got {geometry}")
    rows, cols = geometry[0], geometry[1]
    branches = tuple(Geometry(*rest[i:i + 6]) for i in range(0, len(rest), 6))
    for b in branches:
        if b.rows * b.cols != rows * cols:
            raise ValueError(f"branch grid {b.rows}x{b.cols} does not hold the {rows}x{cols} tokens: {geometry}")
    return (rows, cols), branches


class Group:
    """Branches one launch runs: tiles are the classes (residues modulo ``step`` = lcm of the dilations)
    of the base segment (the smallest segment), and each tile lies inside one segment of every branch."""

    def __init__(self, branches: Sequence[Geometry]):
        self.branches = tuple(branches)
        g = self.branches[0]
        self.rows, self.cols = g.rows, g.cols
        self.base = (min(b[2] for b in branches), min(b[3] for b in branches))
        self.step = (math.lcm(*(b[4] for b in branches)), math.lcm(*(b[5] for b in branches)))

    @property
    def n_seg(self):
        return (-(-self.rows // self.base[0]), -(-self.cols // self.base[1]))

    def n_class_tiles(self):
        nsy, nsx = self.n_seg
        return nsy * nsx * self.step[0] * self.step[1]

    def class_extent(self, padded: bool):
        """Largest class lattice (rows, cols) of a base segment; ``padded`` counts SAM's virtual keys."""
        sh, sw = self.base if padded else (min(self.base[0], self.rows), min(self.base[1], self.cols))
        return -(-sh // self.step[0]), -(-sw // self.step[1])

    def kept_extent(self, padded: bool):
        ext = [b.kept_extent(padded) for b in self.branches]
        return max(e[0] for e in ext), max(e[1] for e in ext)


def _fits_group(branches: Sequence[Geometry], min_tile: int) -> bool:
    """Whether one launch can run these branches: same addressing grid, every segment a multiple of the
    smallest (or covering the whole axis), nested dilations (their lcm is the largest, so no class tile
    is wasted on residues no branch keeps), a base segment at least one step long, and tiles no smaller
    than ``min(min_tile, smallest per-branch tile)``."""
    if len(branches) > MAX_GROUP_BRANCHES:
        return False
    rows, cols = branches[0].rows, branches[0].cols
    if any((b.rows, b.cols) != (rows, cols) for b in branches):
        return False
    for axis, extent in ((0, rows), (1, cols)):
        segs = [b[2 + axis] for b in branches]
        dils = [b[4 + axis] for b in branches]
        base = min(segs)
        if any(s % base and s < extent for s in segs):
            return False
        if math.lcm(*dils) != max(dils) or max(dils) > min(base, extent):
            return False
    fused = Group(branches).class_extent(False)
    own = min(b.kept_extent(False)[0] * b.kept_extent(False)[1] for b in branches)
    return fused[0] * fused[1] >= min(min_tile, own)


def plan_groups(branches: Sequence[Geometry], min_tile: Optional[int] = None) -> Tuple[Group, ...]:
    """Split a pattern into launch groups, in order: greedily extend a group while it still fits.
    A pattern whose branches nest (LongNet's powers of two, any single branch) is one group."""
    min_tile = MIN_FUSED_TILE if min_tile is None else min_tile
    groups, current = [], []
    for b in branches:
        if current and _fits_group(current + [b], min_tile):
            current.append(b)
            continue
        if current:
            groups.append(Group(current))
        current = [b]
    groups.append(Group(current))
    return tuple(groups)


def _pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


@functools.lru_cache(maxsize=64)
def _rel_index(n_coord: int, seg: int, dil: int, kept: int, offsets: Tuple[int, ...], center: int, length: int,
               device: torch.device) -> torch.Tensor:
    """idx[h, c, u] = c - (segment origin of c + offsets[h] + u * dil) + center, clamped to the table's
    ``length`` rows, on ``device``. Cached: forward and backward of every call reuse it, no H2D copy."""
    c = torch.arange(n_coord)
    origin = (c // seg) * seg
    u = torch.arange(kept)
    offs = torch.tensor(offsets)
    idx = c[None, :, None] - (origin[None, :, None] + offs[:, None, None] + u[None, None, :] * dil) + center
    return idx.clamp(0, length - 1).to(device)


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
    lh, lw = rel_pos_h.shape[0], rel_pos_w.shape[0]
    idx_h = _rel_index(rows, geom[2], dy, khp, tuple((h // dx) % dy for h in range(H)), (lh - 1) // 2, lh, q.device)
    idx_w = _rel_index(cols, geom[3], dx, kwp, tuple(h % dx for h in range(H)), (lw - 1) // 2, lw, q.device)
    gh = rel_pos_h.to(q.dtype)[idx_h]  # (H, rows, KHP, D)
    gw = rel_pos_w.to(q.dtype)[idx_w]  # (H, cols, KWP, D)
    q5 = q.unflatten(1, (rows, cols))  # a view for any (B, N, H, D) strides
    rh = torch.einsum("byxhd,hyud->bhyxu", q5, gh).reshape(B, H, N, khp)
    rw = torch.einsum("byxhd,hxud->bhyxu", q5, gw).reshape(B, H, N, kwp)
    return rh, rw, (gh, idx_h, gw, idx_w)


def relpos_backward(q, drh, drw, tables, rel_pos_h, rel_pos_w):
    """Chain rule from the table gradients dRH/dRW to dq (B, N, H, D) fp32 and the two rel-pos tables
    (fp32)."""
    B, N, H, D = q.shape
    gh, idx_h, gw, idx_w = tables
    rows, cols = gh.shape[1], gw.shape[1]
    drh5 = drh.reshape(B, H, rows, cols, -1)
    drw5 = drw.reshape(B, H, rows, cols, -1)
    q5 = q.float().reshape(B, rows, cols, H, D)
    dq = torch.einsum("bhyxu,hyud->byxhd", drh5, gh.float()) + torch.einsum("bhyxu,hxud->byxhd", drw5, gw.float())
    dgh = torch.einsum("bhyxu,byxhd->hyud", drh5, q5)
    dgw = torch.einsum("bhyxu,byxhd->hxud", drw5, q5)
    dtab_h = torch.zeros(rel_pos_h.shape, dtype=torch.float32, device=q.device)
    dtab_w = torch.zeros(rel_pos_w.shape, dtype=torch.float32, device=q.device)
    dtab_h.index_add_(0, idx_h.reshape(-1), dgh.reshape(-1, D))
    dtab_w.index_add_(0, idx_w.reshape(-1), dgw.reshape(-1, D))
    return dq.reshape(B, N, H, D), dtab_h, dtab_w


@functools.lru_cache(maxsize=64)
def _rel_index_1d(n: int, grid: Tuple[int, int], seg: int, dil: int, kwp: int, heads: int, lh: int, lw: int,
                  device: torch.device):
    """Indices of :func:`relpos_table_1d` for N = ``n`` tokens on ``grid``, cached per geometry and device:
    ``idx_y`` (N, Hg) / ``idx_x`` (N, Wg) the table rows of offsets from query i to key row / column
    yk / xk, clamped; ``key_y`` / ``key_x`` (H, S, KWP) the grid row / column of the u-th kept key of
    segment s for head h (clamped into the sequence past the segment's end, where the kernel masks)."""
    hg, wg = grid
    i = torch.arange(n)
    yq, xq = i // wg, i % wg
    idx_y = (yq[:, None] - torch.arange(hg)[None, :] + (lh - 1) // 2).clamp(0, lh - 1)
    idx_x = (xq[:, None] - torch.arange(wg)[None, :] + (lw - 1) // 2).clamp(0, lw - 1)
    s = torch.arange(-(-n // seg))
    offs = torch.arange(heads) % dil
    key = (s[None, :, None] * seg + offs[:, None, None] + torch.arange(kwp)[None, None, :] * dil).clamp(max=n - 1)
    return tuple(t.to(device) for t in (idx_y, idx_x, key // wg, key % wg))


def relpos_table_1d(q: torch.Tensor, geom: Geometry, grid: Tuple[int, int], rel_pos_h, rel_pos_w):
    """Per-query bias over the kept keys of a 1-D branch on a 2-D token grid (B, H, N, KWP), fp32 (fp64 for
    fp64 q):
    ``T[b, h, i, u] = q_i . rel_pos_h[y_i - y_k + (L_h - 1) / 2] + q_i . rel_pos_w[x_i - x_k + (L_w - 1) / 2]``
    for the u-th kept key k of query i's segment (head h's offset), with absolute coordinates
    ``y = idx // Wg``, ``x = idx % Wg``.

    A 1-D segment wraps around grid rows, so no row x column decomposition of its keys exists: the table
    holds every kept key (memory B * H * N * KWP, as a bias mask would), made from q's projections on
    both tables re-indexed by absolute key row / column (B, H, N, Hg + Wg), then gathered per segment.
    """
    B, N, H, D = q.shape
    seg, dil = geom[3], geom[5]
    kwp = _pow2(geom.kept_extent(False)[1])
    a, c, idx = _rel_abs_projections(q, grid, seg, dil, kwp, rel_pos_h, rel_pos_w)
    idx_y, idx_x, key_y, key_x = idx
    S = key_y.shape[1]
    pad = S * seg - N
    a = torch.nn.functional.pad(a, (0, 0, 0, pad)).view(B, H, S, seg, grid[0])
    c = torch.nn.functional.pad(c, (0, 0, 0, pad)).view(B, H, S, seg, grid[1])
    t = a.gather(4, key_y[None, :, :, None, :].expand(B, H, S, seg, kwp))
    t += c.gather(4, key_x[None, :, :, None, :].expand(B, H, S, seg, kwp))
    return t.view(B, H, S * seg, kwp)[:, :, :N]


def _rel_abs_projections(q, grid, seg, dil, kwp, rel_pos_h, rel_pos_w):
    """q's projections on both rel-pos tables, re-indexed by absolute key row / column: (B, H, N, Hg) and
    (B, H, N, Wg) in fp32 (or fp64), and the :func:`_rel_index_1d` indices."""
    B, N, H, D = q.shape
    lh, lw = rel_pos_h.shape[0], rel_pos_w.shape[0]
    idx = _rel_index_1d(N, tuple(grid), seg, dil, kwp, H, lh, lw, q.device)
    acc = torch.promote_types(q.dtype, torch.float32)
    qf = q.to(acc)
    a = torch.einsum("bnhd,ld->bhnl", qf, rel_pos_h.to(acc)).gather(3, idx[0].expand(B, H, N, grid[0]))
    c = torch.einsum("bnhd,ld->bhnl", qf, rel_pos_w.to(acc)).gather(3, idx[1].expand(B, H, N, grid[1]))
    return a, c, idx


def relpos_backward_1d(q, dt, geom: Geometry, grid, rel_pos_h, rel_pos_w):
    """Chain rule of :func:`relpos_table_1d`: from dT (B, H, N, KWP) to dq (B, N, H, D) and the two
    tables' gradients, in fp32 (fp64 for fp64 q)."""
    B, N, H, D = q.shape
    seg, dil = geom[3], geom[5]
    kwp = dt.shape[-1]
    lh, lw = rel_pos_h.shape[0], rel_pos_w.shape[0]
    idx_y, idx_x, key_y, key_x = _rel_index_1d(N, tuple(grid), seg, dil, kwp, H, lh, lw, q.device)
    S = key_y.shape[1]
    acc = torch.promote_types(q.dtype, torch.float32)
    dt5 = torch.nn.functional.pad(dt.to(acc), (0, 0, 0, S * seg - N)).view(B, H, S, seg, kwp)
    qf = q.to(acc)
    dq = torch.zeros((B, N, H, D), dtype=acc, device=q.device)
    grads = []
    for key, idx, extent, table in ((key_y, idx_y, grid[0], rel_pos_h), (key_x, idx_x, grid[1], rel_pos_w)):
        d_abs = torch.zeros((B, H, S, seg, extent), dtype=acc, device=q.device)
        d_abs.scatter_add_(4, key[None, :, :, None, :].expand(B, H, S, seg, kwp), dt5)
        d_abs = d_abs.view(B, H, S * seg, extent)[:, :, :N]
        d_proj = torch.zeros((B, H, N, table.shape[0]), dtype=acc, device=q.device)
        d_proj.scatter_add_(3, idx.expand(B, H, N, extent), d_abs)
        dq += torch.einsum("bhnl,ld->bnhd", d_proj, table.to(acc))
        grads.append(torch.einsum("bhnl,bnhd->ld", d_proj, qf))
    return dq, grads[0], grads[1]


def _rel_rows(group: "Group", grid: Tuple[int, int]) -> bool:
    """Whether a group takes SAM's decomposed (row + column) tables: its branches address the token grid
    (2-D branches). 1-D branches over a 2-D grid take per-key tables (:func:`relpos_table_1d`)."""
    return (group.rows, group.cols) == tuple(grid)


def _group_tables(q, group: Group, grid, rel_pos_h, rel_pos_w, padded: bool):
    """Every branch's RH / RW tables side by side (branch j's columns start at offs[j]) + backward data.
    1-D groups on a 2-D grid: per-key tables in RW (RH a placeholder no kernel reads)."""
    if _rel_rows(group, grid):
        parts = [relpos_tables(q, b, rel_pos_h, rel_pos_w, padded) for b in group.branches]
    else:
        empty = q.new_empty((1, 1, 1, 1))
        parts = [(empty, relpos_table_1d(q, b, grid, rel_pos_h, rel_pos_w).to(q.dtype), None)
                 for b in group.branches]
    rh = torch.cat([p[0] for p in parts], dim=-1).contiguous()  # the kernels share strides with dRH/dRW
    rw = torch.cat([p[1] for p in parts], dim=-1).contiguous()
    offs_h = [0]
    offs_w = [0]
    for p in parts[:-1]:
        offs_h.append(offs_h[-1] + p[0].shape[-1])
        offs_w.append(offs_w[-1] + p[1].shape[-1])
    return rh, rw, list(zip(offs_h, offs_w)), [p[2] for p in parts]


def _branch_args(group: Group, rel_offsets=None) -> list:
    """The kernels' 22 branch scalars: branch 0 (seg, dil), branches 1-3 (seg, dil, rel offsets)."""
    offs = rel_offsets or [(0, 0)] * len(group.branches)
    out = []
    for j in range(MAX_GROUP_BRANCHES):
        if j < len(group.branches):
            b = group.branches[j]
            vals = [b[2], b[3], b[4], b[5]] + ([offs[j][0], offs[j][1]] if j else [])
        else:
            vals = [1, 1, 1, 1] + ([0, 0] if j else [])
        out += vals
    return out


def _launch_config(group: Group, padded: bool, has_rel: bool, head_dim: int, backward: bool = False,
                   fp32: bool = False, choice: Optional[dict] = None, rel_rows: bool = True):
    """Block shapes for one group.

    Forward / dQ visit each branch's kept keys in BKY x BKX blocks, BKX a power of two covering the
    kept width when it is small (with the bias, always: one block per key row run, SINGLE_KX); the
    dK/dV kernel's key blocks (KBY x KBX) tile the class lattice of the base segment.
    fp32 inputs (``tl.dot`` in IEEE fp32 runs on FMA units, its tiles held in registers) take blocks
    of 32 keys and 32 queries (16 above head dim 64): at 64 the sm_90 compile spilled up to 20 KB per
    thread to local memory (``tools/aot_compile.py`` reports registers and stack).
    ``choice`` (a tuned entry's config, see :func:`tuned_choice`) overrides the query tile, warps,
    pipeline stages and the head-dim split; the key blocks are structural and stay.
    """
    choice = choice or {}
    kh, kw = group.kept_extent(padded)
    kwp = _pow2(kw)
    block_n = 32 if fp32 else 64
    if has_rel and rel_rows:  # one key block spans the kept width: the 2-D bias relies on it (SINGLE_KX)
        block_n = max(block_n, kwp)
        bkx = kwp
    else:
        bkx = min(kwp, block_n)
    bky = max(1, block_n // bkx)
    _, cw = group.class_extent(padded)
    kbx = min(_pow2(cw), block_n)
    kby = max(1, block_n // kbx)
    block_d, block_dt = head_dim_split(head_dim, choice.get("split", True))
    if fp32:
        block_m = 16 if head_dim > 64 else 32
    else:
        # 128-query forward tiles (each K/V block serves twice the queries) while the columns the
        # kernel computes stay at most 80: D = 64, and ViT-H's 80 once split into 64 + 16 (on sm_90:
        # 185-220 registers, no spills, 56-60 KiB shared, as D = 64); wider ones take 64.
        block_m = 64 if (_interpreting() or backward or block_d + block_dt > 80) else 128
    if backward:
        # fp32 backward: 8 warps. With 4, the sm_90 compile of most cases sat at 255 registers and spilled
        # 260-560 bytes per thread (dK/dV and dQ of the dilated and rel-pos patterns); with 8, one case in
        # fourteen spills (bench/results/aot_compile_sm90.csv).
        num_warps = 8 if fp32 else 4
    else:
        num_warps = 4 if block_m == 64 else 8
    if not _interpreting():  # the interpreter keeps its own (small) query tiles
        block_m = choice.get("BLOCK_M", block_m)
    return dict(BLOCK_M=block_m, BKY=bky, BKX=bkx, KBY=kby, KBX=kbx, BLOCK_D=block_d,
                BLOCK_DT=max(block_dt, 16), TAIL=block_dt > 0, SINGLE_KX=kwp <= bkx,
                num_warps=choice.get("num_warps", num_warps), num_stages=choice.get("num_stages", 1 if backward else 2))


# Forward and backward split a head dim that is not a power of two into two power-of-two column slices
# when that saves tensor-core work (set False to pad to the next power of two instead, e.g. to compare).
SPLIT_HEAD_DIM = True


@contextlib.contextmanager
def padded_head_dim():
    """Within this block the kernels pad the head dim to a power of two instead of splitting it, and
    ignore the tuned table: the configuration before the split (the benchmarks' same-run measure of
    what it buys; results agree to rounding)."""
    global SPLIT_HEAD_DIM
    saved, SPLIT_HEAD_DIM = SPLIT_HEAD_DIM, False
    try:
        yield
    finally:
        SPLIT_HEAD_DIM = saved


def head_dim_split(head_dim: int, split: bool = True) -> Tuple[int, int]:
    """(main, tail) column slices the kernels use for ``head_dim``: tail 0 means one slice padded to a
    power of two. tl.dot needs slices of at least 16, so D = 80 (ViT-H) becomes 64 + 16 (80 columns of
    MMA work instead of 128), D = 96 becomes 64 + 32, D = 40 becomes 32 + 16; D = 112 stays 128
    (64 + 64 saves nothing). ``split=False`` (or :func:`padded_head_dim`) always pads."""
    padded = max(16, _pow2(head_dim))
    if not (split and SPLIT_HEAD_DIM) or head_dim <= 16 or padded == head_dim:
        return padded, 0
    main = padded // 2
    tail = max(16, _pow2(head_dim - main))
    return (main, tail) if main + tail < padded else (padded, 0)


# ---- tuned table: kernels/tuned/attention.json, written on a GPU by tools/tune_attention.py ----

_TABLE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tuned", "attention.json")
TUNABLE = ("BLOCK_M", "num_warps", "num_stages", "split")
_FORCED: Optional[dict] = None


@functools.lru_cache(maxsize=None)
def tuned_table() -> dict:
    """{arch: [{"key": {...}, "config": {...}}, ...]} from ``tuned/attention.json`` (checked in per GPU
    architecture; empty until a GPU has tuned it). A config may set only :data:`TUNABLE` fields."""
    if not os.path.exists(_TABLE_PATH):
        return {}
    with open(_TABLE_PATH) as f:
        table = json.load(f).get("configs", {})
    for arch, entries in table.items():
        for e in entries:
            unknown = set(e.get("config", {})) - set(TUNABLE)
            if "key" not in e or "config" not in e or unknown:
                raise ValueError(f"{_TABLE_PATH}: entry for {arch} {e.get('key')} is malformed (needs 'key' and "
                                 f"'config' with fields among {TUNABLE}; unknown {sorted(unknown)})")
    return table


def tune_key(group: Group, padded: bool, has_rel: bool, head_dim: int, dtype: torch.dtype, backward: bool) -> dict:
    """What a tuned entry is keyed by: direction, head dim, 16- or 32-bit inputs, rel-pos, window padding,
    branches in the group, the kept key extent and the class step (the batch and head count are not)."""
    kh, kw = group.kept_extent(padded)
    return {"dir": "bwd" if backward else "fwd", "d": int(head_dim), "bits": 32 if dtype == torch.float32 else 16,
            "rel": bool(has_rel), "pad": bool(padded), "nb": len(group.branches), "kept": [int(kh), int(kw)],
            "step": [int(s) for s in group.step]}


def tuned_choice(key: dict, device: torch.device) -> Optional[dict]:
    """The config forced by :func:`forced_config`, else the tuned entry for this key on this GPU's
    architecture, else None (the heuristics of :func:`_launch_config`). :func:`padded_head_dim` skips
    the table."""
    if _FORCED is not None:
        return _FORCED
    if not SPLIT_HEAD_DIM or device.type != "cuda":
        return None
    for e in tuned_table().get(device_arch(device), []):
        if e["key"] == key:
            return e["config"]
    return None


@contextlib.contextmanager
def forced_config(config: dict):
    """Within this block every launch uses ``config`` (TUNABLE fields): how the tuner times candidates."""
    global _FORCED
    unknown = set(config) - set(TUNABLE)
    if unknown:
        raise ValueError(f"forced_config: unknown fields {sorted(unknown)}; tunable: {TUNABLE}")
    saved, _FORCED = _FORCED, dict(config)
    try:
        yield
    finally:
        _FORCED = saved


def _config_for(group: Group, padded: bool, has_rel: bool, q: torch.Tensor, backward: bool,
                rel_rows: bool = True) -> dict:
    fp32 = q.dtype == torch.float32 and not _interpreting()
    choice = tuned_choice(tune_key(group, padded, has_rel, q.shape[-1], q.dtype, backward), q.device)
    cfg = _launch_config(group, padded, has_rel, q.shape[-1], backward=backward, fp32=fp32, choice=choice,
                         rel_rows=rel_rows)
    cfg["REL_ROWS"] = rel_rows
    return cfg


def _precision(dtype):
    return "ieee" if dtype == torch.float32 else "tf32"


def _upcast(dtype):
    return dtype == torch.bfloat16 and _interpreting()


def dilated_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    geometry,
    rel_pos_h: Optional[torch.Tensor],
    rel_pos_w: Optional[torch.Tensor],
    pad_k: Optional[torch.Tensor],
    pad_v: Optional[torch.Tensor],
    scale: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Forward of a whole pattern (``geometry`` from :func:`encode_pattern`).
    Returns (out (B, N, H, D), lse (B, H, N) fp32, natural log)."""
    B, N, H, D = q.shape
    tokens, branches = decode_pattern(geometry)
    groups = plan_groups(branches)
    padded = pad_k is not None
    has_rel = rel_pos_h is not None
    # Every position belongs to exactly one class tile of each group, so nothing needs zero-filling.
    # Several groups merge through the running (out, lse): out stays fp32 until the last one.
    out = torch.empty((B, N, H, D), dtype=q.dtype if len(groups) == 1 else torch.float32, device=q.device)
    lse = torch.empty((B, H, N), dtype=torch.float32, device=q.device)
    pk = pad_k.contiguous() if padded else q.new_empty(1)
    pv = pad_v.contiguous() if padded else q.new_empty(1)
    for gi, group in enumerate(groups):
        cfg = _config_for(group, padded, has_rel, q, backward=False, rel_rows=_rel_rows(group, tokens))
        if has_rel:
            rh, rw, rel_offs, _ = _group_tables(q, group, tokens, rel_pos_h, rel_pos_w, padded)
        else:
            rh = rw = q.new_empty((1, 1, 1, 1))
            rel_offs = None
        qh, qw = group.class_extent(False)
        grid = (triton.cdiv(qh * qw, cfg["BLOCK_M"]), group.n_class_tiles(), B * H)
        _dilated_attention_fwd_kernel[grid](
            q, k, v, out, lse, rh, rw, pk, pv,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
            lse.stride(0), lse.stride(1), rh.stride(0), rh.stride(1), rh.stride(2),
            rw.stride(0), rw.stride(1), rw.stride(2),
            H, D, group.rows, group.cols, group.base[0], group.base[1], group.step[0], group.step[1],
            group.n_seg[1], scale * LOG2E, *_branch_args(group, rel_offs),
            NB=len(group.branches), BLOCK_M=cfg["BLOCK_M"], BKY=cfg["BKY"], BKX=cfg["BKX"],
            BLOCK_D=cfg["BLOCK_D"], BLOCK_DT=cfg["BLOCK_DT"], TAIL=cfg["TAIL"], HAS_REL=has_rel,
            REL_ROWS=cfg["REL_ROWS"], SINGLE_KX=cfg["SINGLE_KX"], PADDED=padded,
            PREC=_precision(q.dtype), UPCAST=_upcast(q.dtype), ACCUMULATE=gi > 0,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **COMPILE_OPTIONS,
        )
    return out.to(q.dtype), lse


def dilated_attention_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dlse: Optional[torch.Tensor],
    geometry,
    rel_pos_h: Optional[torch.Tensor],
    rel_pos_w: Optional[torch.Tensor],
    pad_k: Optional[torch.Tensor],
    pad_v: Optional[torch.Tensor],
    scale: float,
):
    """Backward of a whole pattern. Returns (dq, dk, dv, d_rel_pos_h, d_rel_pos_w, dpad_k, dpad_v), the
    last four None when the corresponding input is absent.

    The merged attention is one softmax over the union of the branches' key sets, with the combined lse
    as normaliser; so each branch's backward is the flash backward with that lse and
    ``delta = rowsum(dO * O) - dlse``, and the gradient through the merge weights needs no extra term.
    """
    B, N, H, D = q.shape
    tokens, branches = decode_pattern(geometry)
    groups = plan_groups(branches)
    padded = pad_k is not None
    has_rel = rel_pos_h is not None
    if dout.stride(-1) != 1:  # autograd may hand in expanded (stride-0) gradients
        dout = dout.contiguous()
    delta = (dout.float() * out.float()).sum(-1).transpose(1, 2).contiguous()
    if dlse is not None:
        delta = delta - torch.where(torch.isfinite(lse), dlse.float(), torch.zeros_like(delta))
    multi = len(groups) > 1
    # Several groups (or the bias's second dq term) accumulate: keep fp32 until the end.
    dq = torch.empty(q.shape, dtype=torch.float32 if (has_rel or multi) else q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=torch.float32 if multi else k.dtype, device=q.device)
    dv = torch.empty(v.shape, dtype=torch.float32 if multi else v.dtype, device=q.device)
    if padded:
        # pad_kv patterns are a single 2-D branch (validated by sam_fast.dilated_attention).
        geom = groups[0].branches[0]
        pr, pc = geom.padded_grid()
        npad = pr * pc - geom.rows * geom.cols
        dpk = torch.zeros((B, H, max(npad, 1), D), dtype=torch.float32, device=q.device)
        dpv = torch.zeros_like(dpk)
        pk, pv = pad_k.contiguous(), pad_v.contiguous()
    else:
        pr = pc = 0
        dpk = dpv = torch.zeros((1, 1, 1, 1), dtype=torch.float32, device=q.device)
        pk = pv = q.new_empty(1)
    drel_h = drel_w = None
    for gi, group in enumerate(groups):
        cfg = _config_for(group, padded, has_rel, q, backward=True, rel_rows=_rel_rows(group, tokens))
        if has_rel:
            rh, rw, rel_offs, tables = _group_tables(q, group, tokens, rel_pos_h, rel_pos_w, padded)
            drh = torch.zeros(rh.shape, dtype=torch.float32, device=q.device)
            drw = torch.zeros(rw.shape, dtype=torch.float32, device=q.device)
        else:
            rh = rw = drh = drw = q.new_empty((1, 1, 1, 1))
            rel_offs = None
        common = dict(NB=len(group.branches), BLOCK_M=cfg["BLOCK_M"], BLOCK_D=cfg["BLOCK_D"],
                      BLOCK_DT=cfg["BLOCK_DT"], TAIL=cfg["TAIL"], HAS_REL=has_rel,
                      REL_ROWS=cfg["REL_ROWS"], PADDED=padded, PREC=_precision(q.dtype), UPCAST=_upcast(q.dtype),
                      ACCUMULATE=gi > 0,
                      num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **COMPILE_OPTIONS)
        bargs = _branch_args(group, rel_offs)
        geo = (H, D, group.rows, group.cols, group.base[0], group.base[1], group.step[0], group.step[1],
               group.n_seg[1])
        ch, cw = group.class_extent(padded)
        n_kblocks = triton.cdiv(ch, cfg["KBY"]) * triton.cdiv(cw, cfg["KBX"])
        _dilated_attention_bwd_dkdv_kernel[(n_kblocks, group.n_class_tiles(), B * H)](
            q, k, v, dout, lse, delta, rh, rw, pk, pv, dk, dv, dpk, dpv,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), dout.stride(0), dout.stride(1), dout.stride(2),
            dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
            lse.stride(0), lse.stride(1), rh.stride(0), rh.stride(1), rh.stride(2),
            rw.stride(0), rw.stride(1), rw.stride(2), dpk.stride(0), dpk.stride(1), dpk.stride(2),
            *geo, pr, pc, scale * LOG2E, scale, *bargs, BKY=cfg["KBY"], BKX=cfg["KBX"], **common,
        )
        qh, qw = group.class_extent(False)
        _dilated_attention_bwd_dq_kernel[(triton.cdiv(qh * qw, cfg["BLOCK_M"]), group.n_class_tiles(), B * H)](
            q, k, v, dout, lse, delta, rh, rw, pk, pv, dq, drh, drw,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), dout.stride(0), dout.stride(1), dout.stride(2),
            dq.stride(0), dq.stride(1), dq.stride(2),
            lse.stride(0), lse.stride(1), rh.stride(0), rh.stride(1), rh.stride(2),
            rw.stride(0), rw.stride(1), rw.stride(2),
            *geo, scale * LOG2E, scale, *bargs, BKY=cfg["BKY"], BKX=cfg["BKX"], **common,
        )
        if has_rel:
            ends = [o[1] for o in rel_offs[1:]] + [rw.shape[-1]]
            for j, tabs in enumerate(tables):
                (oh, ow) = rel_offs[j]
                if tabs is None:  # a 1-D branch's per-key table
                    dq_rel, dth, dtw = relpos_backward_1d(q, drw[..., ow:ends[j]], group.branches[j], tokens,
                                                          rel_pos_h, rel_pos_w)
                else:
                    kh_p, kw_p = tabs[0].shape[2], tabs[2].shape[2]
                    dq_rel, dth, dtw = relpos_backward(q, drh[..., oh:oh + kh_p], drw[..., ow:ow + kw_p], tabs,
                                                       rel_pos_h, rel_pos_w)
                dq += dq_rel
                drel_h = dth if drel_h is None else drel_h + dth
                drel_w = dtw if drel_w is None else drel_w + dtw
    dpad_k = dpad_v = None
    if has_rel:
        drel_h, drel_w = drel_h.to(rel_pos_h.dtype), drel_w.to(rel_pos_w.dtype)
    if padded:
        dpad_k = dpk.sum(dim=(0, 2)).to(pad_k.dtype)
        dpad_v = dpv.sum(dim=(0, 2)).to(pad_v.dtype)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), drel_h, drel_w, dpad_k, dpad_v
