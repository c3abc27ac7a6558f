"""Triton helpers the forward and backward kernels share (for the kernel author): tile and segment geometry,
key-block addressing, SAM's window padding keys, and the rel-pos bias of a key block."""

from __future__ import annotations

import triton
import triton.language as tl


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
