"""W8A8 int8 GEMM with fused quantization and epilogue (Triton).

TinySAM quantizes SAM's encoder to W8A8 but only simulates int8 in floating point;
segment-anything-fast runs ``torch._int_mm`` with the activation quantization and the dequantization as
separate passes over memory. Here the passes that touch the activations are fused:

* :func:`quantize_rows` - symmetric int8 quantization of each row of ``x`` (M, K): per-token dynamic
  (``scale[m] = max|x[m, :]| / 127``) or with one static (calibrated) scale for the whole tensor.
* :func:`layer_norm_quantize` - LayerNorm (weight, bias, eps, biased variance as ``nn.LayerNorm``) of
  each row followed by per-token quantization, in one pass: the input of SAM's qkv and first MLP linear
  never exists in floating point.
* :func:`int8_gemm` - ``A (M, K) int8 @ W (N, K) int8 ^T`` accumulated in int32 on tensor cores, with an
  epilogue that dequantizes (``acc * a_scale[m] * w_scale[n]``), adds the bias, applies the exact (erf)
  GELU of SAM's MLP, and either casts to bf16/fp16/fp32 or re-quantizes to int8 with a static scale so
  the next GEMM reads int8 directly. ``out_dtype=torch.int32`` stores the raw accumulator (tests prove
  the integer arithmetic exact with it).

Numerics, shared bit for bit with :mod:`sam_fast.reference.int8_linear` (the CPU backend):

* quantization is ``q = clamp(round_half_even(x / scale), -127, 127)`` with an IEEE division
  (``div_rn``; Triton's default fp32 ``/`` is approximate on GPUs) and rounding by adding and
  subtracting 1.5 * 2**23, which rounds ties to even exactly like ``torch.round`` for |x / scale| < 2**22.
  A row of zeros gets scale 1 (so it quantizes to zeros, not NaN). int8 holds no NaN: a NaN quantizes
  to 0 and +-inf saturates to +-127; a row holding either gets a NaN per-token scale, so its output row
  is NaN as a float linear's would be (``tl.max`` alone drops NaN, which left such rows finite).
* the epilogue is ``((float(acc) * a_scale) * w_scale) + bias`` in fp32, then GELU, then the cast or the
  re-quantization. On a GPU the compiler may contract the last multiply and add into an FMA, so
  dequantized outputs agree with the reference to rounding level; the int32 accumulator is exact.

Tensor contract (the launchers check nothing a caller could get wrong; :mod:`sam_fast.ops.int8_linear`
validates): ``x``/``a`` 2-D with a contiguous last dim (row stride free); ``w`` (N, K) int8 with a
contiguous last dim (nn.Linear's layout, K-major, which is what int8 tensor-core MMAs want for both
operands); scales fp32; any M, N, K >= 1 (edges are masked; no padding copies).

Block sizes come from a checked-in table per GPU architecture (``tuned/int8_linear.json``, written by
``tools/tune_int8_linear.py`` on that GPU) and a heuristic where the table has no entry.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from ._arch import COMPILE_OPTIONS, device_arch, launchable

ACTIVATIONS = {None: 0, "gelu": 1}
_OUT_FLOAT, _OUT_INT8, _OUT_INT32 = 0, 1, 2


@triton.jit
def _round_half_even(y):
    """Round fp32 ``y`` (|y| < 2**22) to the nearest integer, ties to even, as torch.round does: adding
    1.5 * 2**23 leaves no fraction bits, and IEEE addition rounds ties to even. ``y`` comes from an
    IEEE division, so no multiply can be contracted into this add."""
    return (y + 12582912.0) - 12582912.0


@triton.jit
def _quantize(y, scale):
    """int8 values of fp32 ``y`` with fp32 ``scale`` (broadcastable): clamp(round(y / scale)); NaN -> 0."""
    q = _round_half_even(tl.math.div_rn(y, scale))
    q = tl.where(q == q, q, 0.0)
    return tl.minimum(tl.maximum(q, -127.0), 127.0).to(tl.int8)


@triton.jit
def _row_scale(y):
    """Per-row symmetric scale of a (ROWS, BLOCK_K) fp32 tile whose padding is 0: max|y| / 127, 1 for an
    all-zero row, NaN for a row holding NaN or +-inf."""
    a = tl.abs(y)
    amax = tl.max(a, axis=1)
    non_finite = tl.max(tl.where(a < float("inf"), 0, 1), axis=1)  # NaN < inf is false
    scale = tl.math.div_rn(amax, 127.0)
    scale = tl.where(scale == 0.0, 1.0, scale)
    return tl.where(non_finite > 0, float("nan"), scale)


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, scale_ptr, static_ptr, M, K, stride_xm, stride_qm,
                          STATIC: tl.constexpr, ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    """ROWS rows per program, each row whole in registers (BLOCK_K >= K): read x once, write int8 once."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_K)
    mask = (rows[:, None] < M) & (cols[None, :] < K)
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xm + cols[None, :], mask=mask, other=0.0)
    x = x.to(tl.float32)
    if STATIC:
        static = tl.load(static_ptr)
        q = _quantize(x, static)
        # each row's scale is the static one, NaN where the row holds NaN or +-inf (its output row is then NaN)
        own = _row_scale(x)
        scale = tl.where(own == own, static, own)
    else:
        scale = _row_scale(x)
        q = _quantize(x, scale[:, None])
    tl.store(scale_ptr + rows, scale, mask=rows < M)
    tl.store(q_ptr + rows[:, None].to(tl.int64) * stride_qm + cols[None, :], q, mask=mask)


@triton.jit
def _layer_norm_quantize_kernel(x_ptr, w_ptr, b_ptr, q_ptr, scale_ptr, M, K, stride_xm, stride_qm, eps,
                                HAS_W: tl.constexpr, HAS_B: tl.constexpr, ROWS: tl.constexpr,
                                BLOCK_K: tl.constexpr):
    """LayerNorm of ROWS rows (fp32 statistics, biased variance) then per-token int8 quantization."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_K)
    cmask = cols < K
    mask = (rows[:, None] < M) & cmask[None, :]
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xm + cols[None, :], mask=mask, other=0.0)
    x = x.to(tl.float32)
    mean = tl.sum(x, axis=1) / K
    xc = tl.where(cmask[None, :], x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / K
    y = xc * (1.0 / tl.sqrt(var + eps))[:, None]
    if HAS_W:
        y = y * tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        y = y + tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    y = tl.where(cmask[None, :], y, 0.0)
    scale = _row_scale(y)
    tl.store(scale_ptr + rows, scale, mask=rows < M)
    q = _quantize(y, scale[:, None])
    tl.store(q_ptr + rows[:, None].to(tl.int64) * stride_qm + cols[None, :], q, mask=mask)


@triton.jit
def _int8_gemm_kernel(a_ptr, w_ptr, c_ptr, a_scale_ptr, w_scale_ptr, bias_ptr, out_scale_ptr,
                      M, N, K, stride_am, stride_wn, stride_cm,
                      A_PER_ROW: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
                      OUT_MODE: tl.constexpr, EVEN_K: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      GROUP_M: tl.constexpr):
    """One (BLOCK_M, BLOCK_N) output tile. Tiles are visited in column groups of GROUP_M row tiles so
    that a wave of programs shares weight tiles in L2. Row and column indices past the edge are wrapped
    (``% M``, ``% N``) for the loads, which then need no mask; only the stores are masked."""
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * grid_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    am = rm % M
    wn = rn % N
    a_ptrs = a_ptr + am[:, None].to(tl.int64) * stride_am + rk[None, :]
    w_ptrs = w_ptr + wn[None, :].to(tl.int64) * stride_wn + rk[:, None]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            w = tl.load(w_ptrs)
        else:
            left = K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=rk[None, :] < left, other=0)
            w = tl.load(w_ptrs, mask=rk[:, None] < left, other=0)
        acc = tl.dot(a, w, acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    c_ptrs = c_ptr + rm[:, None].to(tl.int64) * stride_cm + rn[None, :]
    c_mask = (rm[:, None] < M) & (rn[None, :] < N)
    if OUT_MODE == 2:
        tl.store(c_ptrs, acc, mask=c_mask)
    else:
        if A_PER_ROW:
            a_scale = tl.load(a_scale_ptr + am)[:, None]
        else:
            a_scale = tl.load(a_scale_ptr)
        y = acc.to(tl.float32) * a_scale
        y = y * tl.load(w_scale_ptr + wn)[None, :]
        if HAS_BIAS:
            y = y + tl.load(bias_ptr + wn).to(tl.float32)[None, :]
        if ACT == 1:  # SAM's nn.GELU(): the exact erf form
            y = 0.5 * y * (1.0 + tl.erf(y * 0.7071067811865476))
        if OUT_MODE == 1:
            tl.store(c_ptrs, _quantize(y, tl.load(out_scale_ptr)), mask=c_mask)
        else:
            tl.store(c_ptrs, y.to(c_ptr.dtype.element_ty), mask=c_mask)


# ------------------------------------------------------------------------------------------------
# Launch configuration
# ------------------------------------------------------------------------------------------------

_TABLE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tuned", "int8_linear.json")


@functools.lru_cache(maxsize=None)
def tuned_table() -> dict:
    """{arch: [{"m": .., "n": .., "k": .., "config": {...}}, ...]} from ``tuned/int8_linear.json``."""
    if not os.path.exists(_TABLE_PATH):
        return {}
    with open(_TABLE_PATH) as f:
        return json.load(f).get("configs", {})


def _m_bucket(m: int) -> int:
    """Tuned entries are keyed by M rounded up to a power of two (at least 16)."""
    return max(16, triton.next_power_of_2(m))


def heuristic_config(m: int, n: int, k: int) -> dict:
    """Block shapes where the table has nothing: 128x128 tiles with 128-byte K steps (one int8 MMA
    k-group per warp per stage) for SAM's large M; narrower M tiles for few tokens."""
    block_m = 128 if m > 64 else max(16, triton.next_power_of_2(m))
    block_n = 128 if n > 64 else max(16, triton.next_power_of_2(n))
    block_k = 128 if k >= 128 else max(32, triton.next_power_of_2(k))
    warps = 8 if block_m * block_n >= 128 * 64 else 4  # 4 warps on 128 x 64 spilled on sm_90
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8, num_warps=warps, num_stages=4)


def gemm_config(m: int, n: int, k: int, device: torch.device) -> dict:
    """The tuned entry for this GPU's architecture and (N, K) whose M bucket is nearest to M's (in
    powers of two), else :func:`heuristic_config`. A symbolic M (a trace with a dynamic batch, where M is the
    batch times the tokens) is taken as large: the config of the biggest bucket, with no guard on the batch."""
    if isinstance(m, torch.SymInt):
        m = 1 << 20
    entries = [e for e in tuned_table().get(device_arch(device), []) if e["n"] == n and e["k"] == k]
    if not entries:
        return heuristic_config(m, n, k)
    mb = _m_bucket(m).bit_length()
    return dict(min(entries, key=lambda e: abs(e["m"].bit_length() - mb))["config"])


def _rows_config(k: int):
    block_k = max(16, triton.next_power_of_2(k))
    rows = max(1, min(16, 4096 // block_k))
    warps = 4 if block_k <= 2048 else 8
    return rows, block_k, warps


# ------------------------------------------------------------------------------------------------
# Host launchers
# ------------------------------------------------------------------------------------------------


def quantize_rows(x: torch.Tensor, static_scale: Optional[torch.Tensor] = None, traceable: bool = False):
    """Symmetric int8 quantization of the rows of ``x`` (M, K).

    Returns ``(q, scale)``: ``q`` (M, K) int8 and ``scale`` (M,) fp32 per row: each row's own, or with a 0-d fp32
    ``static_scale`` that one for every row; NaN for a row holding NaN or +-inf.
    """
    M, K = x.shape
    q = torch.empty((M, K), device=x.device, dtype=torch.int8)
    static = static_scale is not None
    scale = torch.empty(M, device=x.device, dtype=torch.float32)
    rows, block_k, warps = _rows_config(K)
    launchable(_quantize_rows_kernel, traceable)[(triton.cdiv(M, rows),)](
        x, q, scale, static_scale if static else scale, M, K, x.stride(0), q.stride(0),
        STATIC=static, ROWS=rows, BLOCK_K=block_k, num_warps=warps, **COMPILE_OPTIONS)
    return q, scale


def layer_norm_quantize(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                        eps: float, traceable: bool = False):
    """LayerNorm over the last dim of ``x`` (M, K), then per-token int8: ``(q (M, K) int8, scale (M,))``."""
    M, K = x.shape
    q = torch.empty((M, K), device=x.device, dtype=torch.int8)
    scale = torch.empty(M, device=x.device, dtype=torch.float32)
    rows, block_k, warps = _rows_config(K)
    launchable(_layer_norm_quantize_kernel, traceable)[(triton.cdiv(M, rows),)](
        x, weight if weight is not None else x, bias if bias is not None else x, q, scale, M, K,
        x.stride(0), q.stride(0), float(eps), HAS_W=weight is not None, HAS_B=bias is not None,
        ROWS=rows, BLOCK_K=block_k, num_warps=warps, **COMPILE_OPTIONS)
    return q, scale


def int8_gemm(a: torch.Tensor, a_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
              bias: Optional[torch.Tensor] = None, activation: Optional[str] = None,
              out_dtype: torch.dtype = torch.bfloat16, out_scale: Optional[torch.Tensor] = None,
              config: Optional[dict] = None, traceable: bool = False) -> torch.Tensor:
    """``epilogue(a @ w.T)`` for int8 ``a`` (M, K) and ``w`` (N, K).

    ``a_scale``: (M,) per-token or 0-d per-tensor fp32; ``w_scale``: (N,) fp32; ``bias``: (N,) or None;
    ``activation``: None or ``"gelu"``; ``out_dtype``: a float dtype, ``torch.int8`` (re-quantize with
    the 0-d fp32 ``out_scale``) or ``torch.int32`` (raw accumulator, no epilogue). ``config`` overrides
    the block shapes (the tuner uses it).
    """
    M, K = a.shape
    N = w.shape[0]
    c = torch.empty((M, N), device=a.device, dtype=out_dtype)
    out_mode = {torch.int8: _OUT_INT8, torch.int32: _OUT_INT32}.get(out_dtype, _OUT_FLOAT)
    cfg = dict(config) if config is not None else gemm_config(M, N, K, a.device)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    launchable(_int8_gemm_kernel, traceable)[grid](
        a, w, c, a_scale, w_scale, bias if bias is not None else w_scale,
        out_scale if out_scale is not None else w_scale,
        M, N, K, a.stride(0), w.stride(0), c.stride(0),
        A_PER_ROW=a_scale.dim() == 1, HAS_BIAS=bias is not None, ACT=ACTIVATIONS[activation],
        OUT_MODE=out_mode, EVEN_K=K % cfg["BLOCK_K"] == 0, **cfg, **COMPILE_OPTIONS)
    return c
