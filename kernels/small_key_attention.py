"""Attention of many queries over a handful of keys: SAM's image-to-token cross-attention.

In each two-way block of SAM's mask decoder the 4096 image tokens attend to the prompt's few tokens
(2 output-token groups + points + box corners: T = 5..10 keys). Generic attention kernels tile the key
axis in blocks of 64 or more and waste most of each tile; segment_anything materialises the
(P, heads, 4096, T) score matrix. Here one program owns BLOCK_Q queries of one head of one prompt,
holds the prompt's whole key and value set (T_P = T rounded up to 16) in registers, and does

    s = q k^T * scale   (BLOCK_Q, T_P)   tl.dot, fp32      padded keys masked to -inf
    o = softmax(s) v     (BLOCK_Q, D_P)   tl.dot, fp32

in one pass: no online softmax is needed because all keys are present.

The queries may be shared between prompts: ``q_index[p]`` names the row of ``q`` that prompt p reads,
so the first block's image-level queries (one set per image) serve all of that image's prompts
without being copied. Heads are column slices of the (…, heads * D) layout of the projections, so no
head transposes are needed either.

Tensor contract (validated by :mod:`sam_fast.ops.small_key_attention`): q (G, N, H*D), k and v (P, T, H*D), all
with a contiguous last dim and one float dtype; q_index (P,) int64 in [0, G); out (P, N, H*D).
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

MAX_KEYS = 128
MAX_HEAD_DIM = 128


@triton.jit
def _small_key_attention_kernel(q_ptr, k_ptr, v_ptr, idx_ptr, out_ptr, N, T, scale,
                                stride_qg, stride_qn, stride_kp, stride_kt, stride_vp, stride_vt,
                                stride_op, stride_on,
                                D: tl.constexpr, D_P: tl.constexpr, T_P: tl.constexpr, BLOCK_Q: tl.constexpr,
                                PREC: tl.constexpr, UPCAST: tl.constexpr):
    pid_n = tl.program_id(0)
    h = tl.program_id(1)
    p = tl.program_id(2).to(tl.int64)
    g = tl.load(idx_ptr + p)
    offs_n = pid_n * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_d = tl.arange(0, D_P)
    offs_t = tl.arange(0, T_P)
    n_ok = offs_n < N
    d_ok = offs_d < D
    t_ok = offs_t < T
    col = h * D + offs_d
    q = tl.load(q_ptr + g * stride_qg + offs_n[:, None] * stride_qn + col[None, :],
                mask=n_ok[:, None] & d_ok[None, :], other=0.0)
    k = tl.load(k_ptr + p * stride_kp + offs_t[:, None] * stride_kt + col[None, :],
                mask=t_ok[:, None] & d_ok[None, :], other=0.0)
    v = tl.load(v_ptr + p * stride_vp + offs_t[:, None] * stride_vt + col[None, :],
                mask=t_ok[:, None] & d_ok[None, :], other=0.0)
    s = _dot(q, tl.trans(k), PREC, UPCAST) * scale
    s = tl.where(t_ok[None, :], s, float("-inf"))
    m = tl.max(s, axis=1)
    e = tl.exp(s - m[:, None])
    prob = e / tl.sum(e, axis=1)[:, None]
    o = _dot(_round_bf16(prob, UPCAST).to(v.dtype), v, PREC, UPCAST)
    tl.store(out_ptr + p * stride_op + offs_n[:, None] * stride_on + col[None, :],
             _round_bf16(o, UPCAST).to(out_ptr.dtype.element_ty), mask=n_ok[:, None] & d_ok[None, :])


def small_key_attention(q: torch.Tensor, q_index: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        num_heads: int) -> torch.Tensor:
    """Launch: out[p] = softmax(q[q_index[p]] k[p]^T / sqrt(D)) v[p] per head -> (P, N, H*D)."""
    G, N, C = q.shape
    P, T, _ = k.shape
    D = C // num_heads
    out = torch.empty((P, N, C), device=q.device, dtype=q.dtype)
    if P == 0 or N == 0:
        return out
    D_P = max(16, triton.next_power_of_2(D))
    T_P = max(16, triton.next_power_of_2(T))
    BLOCK_Q = 128 if D_P <= 64 else 64
    for p0 in range(0, P, _MAX_GRID_Y):  # grid dimensions 1 and 2 hold at most 65535 prompts
        p1 = min(P, p0 + _MAX_GRID_Y)
        _small_key_attention_kernel[(triton.cdiv(N, BLOCK_Q), num_heads, p1 - p0)](
            q, k[p0:p1], v[p0:p1], q_index[p0:p1], out[p0:p1], N, T, D ** -0.5,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            out.stride(0), out.stride(1),
            D=D, D_P=D_P, T_P=T_P, BLOCK_Q=BLOCK_Q, PREC=_precision(q.dtype), UPCAST=_upcast(q.dtype),
            num_warps=4, **COMPILE_OPTIONS)
    return out
