"""``hiera_attention``: SAM 2's Hiera block attention (before ``proj``) straight from the block's qkv tensor.

Hiera's blocks attend without a bias, within windows of the token grid (8, 4, 14 and 7 tokens a side at SAM 2's
stages; the grid padded to whole windows) or over the whole grid, and the first block of each stage max-pools its
queries 2 x 2 within each window, so that its output grid is a quarter of its input's.

Backends (``sam_fast._dispatch``):

* ``cpu``: the C++ op ``sam_fast::hiera_attention`` (csrc/cpu/sam_block_attention.cpp), the machinery of
  ``sam_block_attention`` with no bias: each window's keys gathered once (the padded ones read from ``pad_kv``), its
  queries block by block (max-pooled as they are gathered), each output row written in place on the (pooled) grid.
  No padded copy, no window partition, no pooled copy of q. float32 or bfloat16 qkv, nothing for autograd to record.
  A float32 global block without pooling goes instead to PyTorch's fused CPU kernel on strided views of qkv, which
  is faster there (:func:`sdpa_global_wins`).
* ``triton`` (:mod:`sam_fast.kernels.hiera_attention`): one launch for every window of the grid, several windows per
  program, queries pooled as they are loaded, keys in blocks with the online softmax; CUDA tensors (float32, float16,
  bfloat16), or CPU tensors under ``TRITON_INTERPRET=1`` when asked for. No backward.
* ``reference`` (:mod:`sam_fast.reference.hiera_attention`): the padding, partition, max-pool and SDPA of SAM 2's
  own block, differentiable.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .._args import float_arg, int_arg
from .._dispatch import Backend, Refusal, dispatch, triton_device_refusal
from ..reference import hiera_attention as _ref
from ._ext import cpp_device_refusal, register_fake
from .dilated_attention_cpu import FUSED_DTYPES, fused_ok
from .sam_block_attention import check_pad_kv, check_qkv


@register_fake("sam_fast::hiera_attention")
def _(qkv, heads, window, q_stride, qkv_bias, pad_k, pad_v, scale, out):
    return None


def _cpu_supports(qkv, heads, window, q_stride, pad_kv, scale, qkv_bias, *, explicit):
    refusal = cpp_device_refusal(qkv, "cpu")
    if refusal is not None:
        return refusal
    if qkv.dtype not in FUSED_DTYPES:
        return Refusal(f"the C++ kernel takes float32 or bfloat16 qkv, got {qkv.dtype}", wrong_device=True)
    if not fused_ok(qkv, qkv_bias, *(pad_kv or ())):
        return Refusal("the C++ kernel has no backward; autograd is recording", wrong_device=True)
    return None


def sdpa_global_wins(dtype: torch.dtype, window: int, q_stride: int) -> bool:
    """Whether the CPU backend runs this attention as PyTorch's fused (flash) kernel on strided views of qkv instead
    of the C++ kernel: a float32 global block without pooling. Measured on the development machine (2-core AVX-512,
    Hiera's global blocks of 4096 tokens at head dims 56-96): PyTorch's kernel 10-20% faster in float32; in bf16 the
    C++ kernel (AVX512-BF16 dot products) 2.2x faster; in windows of up to 256 keys the C++ kernel, which reads them
    in place where SDPA needs them partitioned, wins or ties."""
    return dtype == torch.float32 and window == 0 and q_stride == 1


def _sdpa_global(qkv, heads, scale, qkv_bias):
    B, Hg, Wg, C3 = qkv.shape
    if qkv_bias is not None:
        qkv = qkv + qkv_bias.to(qkv.dtype)
    q, k, v = qkv.reshape(B, Hg * Wg, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)  # (B, heads, N, D) views
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)
    return out.transpose(1, 2).reshape(B, Hg, Wg, C3 // 3)


def _cpu_run(qkv, heads, window, q_stride, pad_kv, scale, qkv_bias):
    if sdpa_global_wins(qkv.dtype, window, q_stride):
        return _sdpa_global(qkv, heads, scale, qkv_bias)
    B, Hg, Wg, C3 = qkv.shape
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    out = torch.empty(B, Hg // q_stride, Wg // q_stride, C3 // 3, dtype=qkv.dtype, device=qkv.device)
    pad_k, pad_v = (None, None) if pad_kv is None else (p.to(qkv.dtype).reshape(heads, -1).contiguous()
                                                        for p in pad_kv)
    if qkv_bias is not None:
        qkv_bias = qkv_bias.to(qkv.dtype).contiguous()
    torch.ops.sam_fast.hiera_attention(qkv, heads, window, q_stride, qkv_bias, pad_k, pad_v, scale, out)
    return out


@torch.library.custom_op("sam_fast::hiera_attention_triton", mutates_args=())
def _triton_op(qkv: torch.Tensor, heads: int, window: int, q_stride: int, qkv_bias: Optional[torch.Tensor],
               pad_k: torch.Tensor, pad_v: torch.Tensor, scale: float) -> torch.Tensor:
    from ..kernels import hiera_attention as kernel

    return kernel.hiera_attention(qkv, heads, window, q_stride, qkv_bias, pad_k, pad_v, scale)


@_triton_op.register_fake
def _(qkv, heads, window, q_stride, qkv_bias, pad_k, pad_v, scale):
    B, Hg, Wg, C3 = qkv.shape
    return qkv.new_empty((B, Hg // q_stride, Wg // q_stride, C3 // 3))


def _triton_supports(qkv, heads, window, q_stride, pad_kv, scale, qkv_bias, *, explicit):
    refusal = triton_device_refusal(qkv, explicit)
    if refusal is not None:
        return refusal
    from ..kernels.hiera_attention import MAX_HEAD_DIM

    if qkv.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return Refusal(f"the Triton kernel takes float32, float16 or bfloat16 qkv, got {qkv.dtype}")
    if qkv.shape[-1] // 3 // heads > MAX_HEAD_DIM:
        return Refusal(f"head dims up to {MAX_HEAD_DIM}, got {qkv.shape[-1] // 3 // heads}")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (qkv, qkv_bias, *(pad_kv or ()))):
        return Refusal("the Triton kernel has no backward; autograd is recording")
    return None


def _triton_run(qkv, heads, window, q_stride, pad_kv, scale, qkv_bias):
    D = qkv.shape[-1] // 3 // heads
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    if pad_kv is None:
        pad_k = pad_v = qkv.new_zeros(heads, D)
    else:
        pad_k, pad_v = (p.to(qkv.dtype).reshape(heads, D).contiguous() for p in pad_kv)
    if qkv_bias is not None:
        qkv_bias = qkv_bias.to(qkv.dtype).contiguous()
    return _triton_op(qkv, heads, window, q_stride, qkv_bias, pad_k, pad_v, scale)


def _reference_run(qkv, heads, window, q_stride, pad_kv, scale, qkv_bias):
    pad_k, pad_v = (None, None) if pad_kv is None else pad_kv
    return _ref.hiera_attention(qkv, heads, window, q_stride, qkv_bias, pad_k, pad_v, scale)


_TABLE = (
    Backend("cpu", _cpu_supports, _cpu_run),
    Backend("triton", _triton_supports, _triton_run),
    Backend("reference", lambda *a, explicit: None, _reference_run),
)


def hiera_attention(qkv: torch.Tensor, heads: int, window: int, q_stride: int = 1,
                    pad_kv: Optional[Tuple[torch.Tensor, torch.Tensor]] = None, scale: Optional[float] = None,
                    qkv_bias: Optional[torch.Tensor] = None, *, backend: str = "auto") -> torch.Tensor:
    """SAM 2's Hiera attention (before ``proj``) on ``qkv`` (B, Hg, Wg, 3 * heads * D), channels in (3, heads, D)
    order: ``window`` 0 is global attention, otherwise (window x window) windows over the grid padded to whole
    windows, the padded keys carrying ``pad_kv`` (the k and v of a padded token, each (heads, D); zeros when None).
    ``q_stride`` s > 1 max-pools each window's queries s x s (``window`` a multiple of s); the output is then on the
    pooled grid (Hg // s, Wg // s). ``scale``: ``D ** -0.5`` when None. ``qkv_bias`` (3 * heads * D,), when given,
    is added to every row read (qkv is then ``x W^T`` alone). Returns (B, Hg // s, Wg // s, heads * D) in qkv's
    dtype."""
    heads, D = check_qkv(qkv, heads)
    window = int_arg(window, "window", 0)
    q_stride = int_arg(q_stride, "q_stride", 1)
    if window and window % q_stride:
        raise ValueError(f"q_stride ({q_stride}) must divide window ({window})")
    check_pad_kv(pad_kv, heads, D)
    C3 = qkv.shape[-1]
    if qkv_bias is not None and (not isinstance(qkv_bias, torch.Tensor) or tuple(qkv_bias.shape) != (C3,)):
        raise ValueError(f"qkv_bias must be None or a ({C3},) tensor")
    scale = D ** -0.5 if scale is None else float_arg(scale, "scale")
    return dispatch("hiera_attention", _TABLE, backend, qkv, heads, window, q_stride, pad_kv, float(scale), qkv_bias)
