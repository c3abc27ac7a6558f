"""``window_bias_attention``: TinyViT's window attention (MobileSAM, TinySAM) straight from a block's qkv tensor.

Backends (``sam_fast._dispatch``):

* ``cpu``: the C++ op ``sam_fast::window_bias_attention`` (csrc/cpu/sam_block_attention.cpp), the machinery of
  ``sam_block_attention`` with TinyViT's channel order and its dense per-head bias: each window's keys gathered
  once, the padded ones read from ``pad_kv``, the bias row of each query added inside the softmax row pass, each
  output row written in place. No padded copy of the grid, no window partition, no lse. float32 or bfloat16 qkv,
  nothing for autograd to record.
* ``reference`` (:mod:`sam_fast.reference.window_bias_attention`): the padding, partition and SDPA with the bias
  as its mask, differentiable.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .._args import float_arg, int_arg
from .._dispatch import Backend, Refusal, dispatch
from ..reference import window_bias_attention as _ref
from ._ext import cpp_device_refusal, register_fake
from .dilated_attention_cpu import FUSED_DTYPES, fused_ok
from .sam_block_attention import check_pad_kv, check_qkv


@register_fake("sam_fast::window_bias_attention")
def _(qkv, heads, window, bias, pad_k, pad_v, scale, out):
    return None


def _cpu_supports(qkv, heads, window, bias, pad_kv, scale, *, explicit):
    refusal = cpp_device_refusal(qkv, "cpu")
    if refusal is not None:
        return refusal
    if qkv.dtype not in FUSED_DTYPES:
        return Refusal(f"the C++ kernel takes float32 or bfloat16 qkv, got {qkv.dtype}", wrong_device=True)
    if not fused_ok(qkv, bias, *(pad_kv or ())):
        return Refusal("the C++ kernel has no backward; autograd is recording", wrong_device=True)
    return None


def _cpu_run(qkv, heads, window, bias, pad_kv, scale):
    B, Hg, Wg, C3 = qkv.shape
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    out = torch.empty(B, Hg, Wg, C3 // 3, dtype=qkv.dtype, device=qkv.device)
    pad_k, pad_v = (None, None) if pad_kv is None else (p.to(qkv.dtype).reshape(heads, -1).contiguous()
                                                        for p in pad_kv)
    torch.ops.sam_fast.window_bias_attention(qkv, heads, window, bias.to(torch.float32).contiguous(), pad_k, pad_v,
                                             scale, out)
    return out


def _reference_run(qkv, heads, window, bias, pad_kv, scale):
    pad_k, pad_v = (None, None) if pad_kv is None else pad_kv
    return _ref.window_bias_attention(qkv, heads, window, bias, pad_k, pad_v, scale)


_TABLE = (
    Backend("cpu", _cpu_supports, _cpu_run),
    Backend("reference", lambda *a, explicit: None, _reference_run),
)


def window_bias_attention(qkv: torch.Tensor, heads: int, window: int, bias: torch.Tensor,
                          pad_kv: Optional[Tuple[torch.Tensor, torch.Tensor]], scale: float, *,
                          backend: str = "auto") -> torch.Tensor:
    """TinyViT's window attention on ``qkv`` (B, Hg, Wg, 3 * heads * D), each token's channels in TinyViT's
    (heads, 3, D) order: softmax(scale * q k^T + bias[head]) v over (window x window) windows of the grid padded to
    whole windows, the padded keys carrying ``pad_kv`` (the k and v of a padded token, each (heads, D); zeros when
    None). ``bias`` (heads, window^2, window^2): row = the query's place in its window. Returns (B, Hg, Wg,
    heads * D) in qkv's dtype, heads in order."""
    heads, D = check_qkv(qkv, heads)
    window = int_arg(window, "window", 1)
    if window > 64:
        raise ValueError(f"window must be at most 64, got {window}")
    L = window * window
    if not isinstance(bias, torch.Tensor) or not bias.is_floating_point():
        raise TypeError("bias must be a floating-point tensor")
    if tuple(bias.shape) != (heads, L, L):
        raise ValueError(f"bias must be (heads, window^2, window^2) = ({heads}, {L}, {L}), got {tuple(bias.shape)}")
    check_pad_kv(pad_kv, heads, D)
    scale = float_arg(scale, "scale")
    return dispatch("window_bias_attention", _TABLE, backend, qkv, heads, window, bias, pad_kv, float(scale))
