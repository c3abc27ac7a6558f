"""SAM 2's Hiera attention on the GPU: windows (or the whole grid) read in place from a block's qkv tensor.

Hiera's blocks attend without a bias inside windows of 8, 4, 14 and 7 tokens a side (16 at Hiera-L's third stage),
global blocks over the whole grid, and the first block of each stage max-pools its queries 2 x 2 inside each window.
SAM 2 partitions the normed tokens into padded windows, pools q, and calls SDPA on (windows, heads, L, D): copies of
the grid before and after, and at 16 to 64 tokens a window, attention calls far too small for a GPU. Here one launch
covers every window: a program takes ``TASKS`` consecutive (window, block of queries) tasks of one head of one image,
and for each

* gathers its block of queries straight from qkv (B, Hg, Wg, 3C): with a query stride S > 1 each query is the max of
  its S x S cell, taken as the rows are loaded (no pooled copy of q);
* walks the window's keys in blocks of ``BLOCK_N`` with the online softmax (so a global block's 4096 keys need no
  more registers than a window's 64); a key past the grid (the window padding) reads ``pad_k`` / ``pad_v``, the k and
  v that SAM 2's zero padding gives it;
* writes each output row to its place on the (pooled) grid (B, Hg // S, Wg // S, C).

Head dims that are not powers of two (Hiera-B+'s 56, Hiera-L's 72) are padded to the next power of two inside the
program with masked loads. With ``qkv_bias`` (3C,), qkv holds ``x W^T`` alone and each row read gets its part.

Tensor contract (validated by :mod:`sam_fast.ops.hiera_attention`): qkv (B, Hg, Wg, 3 * heads * D) with a contiguous
last dim; pad_k, pad_v (heads, D) contiguous in qkv's dtype; qkv_bias (3 * heads * D,) contiguous or None; out
(B, Hg // S, Wg // S, heads * D) contiguous.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._arch import COMPILE_OPTIONS
from ._tl import dot as _dot
from ._tl import precision as _precision
from ._tl import upcast as _upcast
from .upscale_mask_product import _MAX_GRID_Y, _round_bf16

MAX_HEAD_DIM = 128


@triton.jit
def _hiera_attention_kernel(qkv_ptr, bias_ptr, padk_ptr, padv_ptr, out_ptr, Hg, Wg, Hq, Wq, n_wx, n_tasks, C,
                            stride_b, stride_h, stride_w, stride_ob, stride_oh, stride_ow, scale,
                            D: tl.constexpr, D_P: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
                            S: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NQB: tl.constexpr,
                            TASKS: tl.constexpr, HAS_BIAS: tl.constexpr, PREC: tl.constexpr,
                            UPCAST: tl.constexpr):
    pid = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    QH: tl.constexpr = SH // S
    QW: tl.constexpr = SW // S
    LQ: tl.constexpr = QH * QW
    LK: tl.constexpr = SH * SW
    dt = qkv_ptr.dtype.element_ty
    base = qkv_ptr + b * stride_b
    offs_d = tl.arange(0, D_P)
    d_ok = offs_d < D
    col_q = h * D + offs_d
    col_k = C + col_q
    col_v = 2 * C + col_q
    pad_k = tl.load(padk_ptr + h * D + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    pad_v = tl.load(padv_ptr + h * D + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        b_q = tl.load(bias_ptr + col_q, mask=d_ok, other=0.0).to(tl.float32)
        b_k = tl.load(bias_ptr + col_k, mask=d_ok, other=0.0).to(tl.float32)
        b_v = tl.load(bias_ptr + col_v, mask=d_ok, other=0.0).to(tl.float32)
    for t in range(TASKS):
        task = pid * TASKS + t
        if task < n_tasks:
            win = task // NQB
            wy = win // n_wx
            wx = win % n_wx
            r = (task % NQB) * BLOCK_M + tl.arange(0, BLOCK_M)
            py = wy * QH + r // QW
            px = wx * QW + r % QW
            q_ok = (r < LQ) & (py < Hq) & (px < Wq)
            qm = q_ok[:, None] & d_ok[None, :]
            q = tl.full((BLOCK_M, D_P), float("-inf"), tl.float32)
            for dy in tl.static_range(S):
                for dx in tl.static_range(S):
                    q_rows = (py * S + dy).to(tl.int64) * stride_h + (px * S + dx).to(tl.int64) * stride_w
                    q = tl.maximum(q, tl.load(base + q_rows[:, None] + col_q[None, :], mask=qm, other=0.0)
                                   .to(tl.float32))
            if HAS_BIAS:
                q = q + b_q[None, :]
            q = tl.where(qm, q, 0.0)
            q = _round_bf16(q, UPCAST).to(dt)
            m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
            l_i = tl.zeros((BLOCK_M,), tl.float32)
            acc = tl.zeros((BLOCK_M, D_P), tl.float32)
            for n0 in range(0, LK, BLOCK_N):
                j = n0 + tl.arange(0, BLOCK_N)
                ky = wy * SH + j // SW
                kx = wx * SW + j % SW
                j_ok = j < LK
                real = j_ok & (ky < Hg) & (kx < Wg)
                km = real[:, None] & d_ok[None, :]
                k_rows = ky.to(tl.int64) * stride_h + kx.to(tl.int64) * stride_w
                k = tl.load(base + k_rows[:, None] + col_k[None, :], mask=km, other=0.0).to(tl.float32)
                v = tl.load(base + k_rows[:, None] + col_v[None, :], mask=km, other=0.0).to(tl.float32)
                if HAS_BIAS:
                    k = k + b_k[None, :]
                    v = v + b_v[None, :]
                k = tl.where(real[:, None], k, pad_k[None, :])
                v = tl.where(real[:, None], v, pad_v[None, :])
                s = _dot(q, tl.trans(_round_bf16(k, UPCAST).to(dt)), PREC, UPCAST) * scale
                s = tl.where(j_ok[None, :], s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, axis=1))
                alpha = tl.exp(m_i - m_new)
                p = tl.exp(s - m_new[:, None])
                l_i = l_i * alpha + tl.sum(p, axis=1)
                acc = acc * alpha[:, None] + _dot(_round_bf16(p, UPCAST).to(dt), _round_bf16(v, UPCAST).to(dt),
                                                  PREC, UPCAST)
                m_i = m_new
            o = acc / l_i[:, None]
            dst = out_ptr + b * stride_ob + py.to(tl.int64) * stride_oh + px.to(tl.int64) * stride_ow
            tl.store(dst[:, None] + col_q[None, :], _round_bf16(o, UPCAST).to(out_ptr.dtype.element_ty), mask=qm)


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(n))


def launch_config(window_q: int, window_k: int, D: int, dtype: torch.dtype = torch.bfloat16):
    """(BLOCK_M, BLOCK_N, TASKS, num_warps) for windows of ``window_q`` (pooled) queries and ``window_k`` keys: a
    window's queries in one block up to 64 (128 for head dims up to 64; float32, whose exact products do not run on
    tensor cores, half of that), keys in blocks of up to 64 (float32: 32), and as many windows per program as keep it
    near 8K query-key pairs."""
    D_P = _pow2(D)
    block_m = min(_pow2(window_q), (128 if D_P <= 64 else 64) // (2 if dtype == torch.float32 else 1))
    block_n = min(_pow2(window_k), 32 if dtype == torch.float32 else 64)
    tasks = max(1, min(16, 8192 // (block_m * _pow2(window_k))))
    return block_m, block_n, tasks, 4 if block_m * D_P <= 64 * 64 else 8


def hiera_attention(qkv: torch.Tensor, heads: int, window: int, q_stride: int, qkv_bias, pad_k: torch.Tensor,
                    pad_v: torch.Tensor, scale: float) -> torch.Tensor:
    """Launch: SAM 2's Hiera attention on qkv (B, Hg, Wg, 3 * heads * D) -> (B, Hg // S, Wg // S, heads * D)."""
    B, Hg, Wg, C3 = qkv.shape
    C = C3 // 3
    D = C // heads
    S = q_stride
    out = torch.empty((B, Hg // S, Wg // S, C), device=qkv.device, dtype=qkv.dtype)
    if out.numel() == 0:
        return out
    SH, SW = (window, window) if window > 0 else (Hg, Wg)
    n_wy, n_wx = triton.cdiv(Hg, SH), triton.cdiv(Wg, SW)
    LQ = (SH // S) * (SW // S)
    block_m, block_n, tasks, warps = launch_config(LQ, SH * SW, D, qkv.dtype)
    nqb = triton.cdiv(LQ, block_m)
    n_tasks = n_wy * n_wx * nqb
    bias = qkv_bias if qkv_bias is not None else pad_k  # (unread without HAS_BIAS)
    for b0 in range(0, B, _MAX_GRID_Y):  # grid dimension 2 holds at most 65535 images
        b1 = min(B, b0 + _MAX_GRID_Y)
        _hiera_attention_kernel[(triton.cdiv(n_tasks, tasks), heads, b1 - b0)](
            qkv[b0:b1], bias, pad_k, pad_v, out[b0:b1], Hg, Wg, Hg // S, Wg // S, n_wx, n_tasks, C,
            qkv.stride(0), qkv.stride(1), qkv.stride(2), out.stride(0), out.stride(1), out.stride(2), scale,
            D=D, D_P=_pow2(D), SH=SH, SW=SW, S=S, BLOCK_M=block_m, BLOCK_N=block_n, NQB=nqb, TASKS=tasks,
            HAS_BIAS=qkv_bias is not None, PREC=_precision(qkv.dtype), UPCAST=_upcast(qkv.dtype),
            num_warps=warps, **COMPILE_OPTIONS)
    return out
