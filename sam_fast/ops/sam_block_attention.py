"""``sam_block_attention``: segment_anything's block attention (before ``proj``) straight from the block's qkv tensor.

Backends (``sam_fast._dispatch``):

* ``cpu``: the C++ op ``sam_fast::sam_block_attention`` (csrc/cpu/sam_block_attention.cpp). It gathers each
  segment's keys and real queries itself, computes the two decomposed rel-pos terms per block of queries (a small
  GEMM against each table), adds them inside its row blocks as ``sam_fast::rel_pos_attention`` does, and writes
  each output row in place: no window partition, no padded copy, no bias terms in memory and no lse. float32 or
  bfloat16 qkv, a rel-pos bias, nothing for autograd to record.
* ``reference`` (:mod:`sam_fast.reference.sam_block_attention`): segment_anything's partition and SDPA with the
  bias as its mask, differentiable; also what tiny blocks run on the CPU, where it is fastest.

:func:`sam_block_fits` is the CPU policy's decision (:mod:`sam_fast.cpu_policy`) whether a SAM block takes the
C++ kernel at all.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import cpu_policy
from .._args import float_arg, int_arg
from .._dispatch import Backend, Refusal, dispatch
from ..reference import sam_block_attention as _ref
from ._ext import cpp_device_refusal, register_fake
from .dilated_attention_cpu import FUSED_DTYPES, compute_dtype, fused_bias_kernel, fused_ok


@register_fake("sam_fast::sam_block_attention")
def _(qkv, heads, window, rel_pos_h, rel_pos_w, qkv_bias, pad_k, pad_v, scale, out):
    return None


def sam_block_fits(qkv: torch.Tensor, window: int, rel_pos_h, rel_pos_w, backend: str, *params,
                   dtype: Optional[torch.dtype] = None) -> bool:
    """Whether a SAM block on ``qkv`` (B, Hg, Wg, 3C) takes the C++ kernel: backend ``auto`` / ``cpu``, a CPU tensor
    in a compute dtype the kernel keeps (:data:`~sam_fast.ops.dilated_attention_cpu.FUSED_DTYPES`), a rel-pos bias,
    segments (the window, or the grid of a global block) of at least ``cpu_policy.policy().sam_block_min_keys``
    keys, nothing for autograd to record (``params``: the block's parameters that feed it), and the kernel
    available (:func:`~sam_fast.ops.dilated_attention_cpu.fused_bias_kernel`). ``dtype``: ask for qkv in that dtype
    instead of its own (the grid is all that is read of a tensor that does not exist yet)."""
    if backend not in ("auto", "cpu") or qkv.device.type != "cpu" or qkv.dim() != 4 or rel_pos_h is None:
        return False
    dtype = qkv.dtype if dtype is None else dtype
    if dtype not in FUSED_DTYPES or compute_dtype(dtype) != dtype:
        return False
    keys = window * window if window > 0 else qkv.shape[1] * qkv.shape[2]
    if keys < cpu_policy.policy().sam_block_min_keys or not fused_ok(qkv, rel_pos_h, rel_pos_w, *params):
        return False
    return fused_bias_kernel()


def _cpu_supports(qkv, heads, window, rel_pos_h, rel_pos_w, pad_kv, scale, qkv_bias, *, explicit):
    refusal = cpp_device_refusal(qkv, "cpu")
    if refusal is not None:
        return refusal
    if qkv.dtype not in FUSED_DTYPES:
        return Refusal(f"the C++ kernel takes float32 or bfloat16 qkv, got {qkv.dtype}", wrong_device=True)
    if rel_pos_h is None:
        return Refusal("the C++ kernel is for blocks with a rel-pos bias", wrong_device=True)
    if not fused_ok(qkv, rel_pos_h, rel_pos_w, qkv_bias, *(pad_kv or ())):
        return Refusal("the C++ kernel has no backward; autograd is recording", wrong_device=True)
    return None


def _cpu_run(qkv, heads, window, rel_pos_h, rel_pos_w, pad_kv, scale, qkv_bias):
    B, Hg, Wg, C3 = qkv.shape
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    out = torch.empty(B, Hg, Wg, C3 // 3, dtype=qkv.dtype, device=qkv.device)
    pad_k, pad_v = (None, None) if pad_kv is None else (p.to(qkv.dtype).contiguous() for p in pad_kv)
    tables = [t.to(torch.float32).contiguous() for t in (rel_pos_h, rel_pos_w)]
    if qkv_bias is not None:
        qkv_bias = qkv_bias.to(qkv.dtype).contiguous()
    torch.ops.sam_fast.sam_block_attention(qkv, heads, window, tables[0], tables[1], qkv_bias, pad_k, pad_v, scale,
                                           out)
    return out


def _reference_run(qkv, heads, window, rel_pos_h, rel_pos_w, pad_kv, scale, qkv_bias):
    pad_k, pad_v = (None, None) if pad_kv is None else pad_kv
    return _ref.sam_block_attention(qkv, heads, window, rel_pos_h, rel_pos_w, qkv_bias, pad_k, pad_v, scale)


_TABLE = (
    Backend("cpu", _cpu_supports, _cpu_run),
    Backend("reference", lambda *a, explicit: None, _reference_run),
)


def check_qkv(qkv, heads) -> Tuple[int, int]:
    """(heads, D) of a block's qkv tensor (B, Hg, Wg, 3 * heads * D), or a TypeError / ValueError naming what is
    wrong (shared with :func:`~sam_fast.ops.window_bias_attention.window_bias_attention`)."""
    if not isinstance(qkv, torch.Tensor):
        raise TypeError(f"qkv must be a torch.Tensor, got {type(qkv).__name__}")
    if not qkv.is_floating_point() or qkv.dim() != 4:
        raise ValueError(f"qkv must be a floating-point (B, Hg, Wg, 3 * heads * D) tensor, got {qkv.dtype} "
                         f"{tuple(qkv.shape)}")
    heads = int_arg(heads, "heads", 1)
    C3 = qkv.shape[-1]
    if C3 % (3 * heads) or C3 == 0:
        raise ValueError(f"qkv's last dim must be 3 * heads * D, got {C3} for heads={heads}")
    return heads, C3 // (3 * heads)


def check_pad_kv(pad_kv, heads: int, D: int) -> None:
    """A TypeError / ValueError unless ``pad_kv`` is None or a (pad_k, pad_v) pair of (heads, D) tensors."""
    if pad_kv is None:
        return
    if not isinstance(pad_kv, (tuple, list)) or len(pad_kv) != 2:
        raise TypeError("pad_kv must be None or a (pad_k, pad_v) pair")
    for name, t in zip(("pad_k", "pad_v"), pad_kv):
        if not isinstance(t, torch.Tensor) or t.numel() != heads * D:
            raise ValueError(f"{name} must be a (heads, D) = ({heads}, {D}) tensor")


def sam_block_attention(qkv: torch.Tensor, heads: int, window: int, rel_pos_h: Optional[torch.Tensor],
                        rel_pos_w: Optional[torch.Tensor], pad_kv: Optional[Tuple[torch.Tensor, torch.Tensor]],
                        scale: float, qkv_bias: Optional[torch.Tensor] = None, *,
                        backend: str = "auto") -> torch.Tensor:
    """segment_anything's block attention (before ``proj``) on ``qkv`` (B, Hg, Wg, 3 * heads * D): ``window`` 0 is
    global attention, otherwise (window x window) windows over the grid padded to whole windows, the padded keys
    carrying ``pad_kv`` (the qkv bias' k and v parts, each (heads, D); zeros when None). ``rel_pos_h`` /
    ``rel_pos_w`` span ``2 * segment - 1`` offsets (segment: the window, or the grid's height / width), or are both
    None. ``qkv_bias`` (3 * heads * D,), when given, is added to every row read (qkv is then ``x W^T`` alone: the
    bias costs no pass of its own). Returns (B, Hg, Wg, heads * D) in qkv's dtype."""
    heads, D = check_qkv(qkv, heads)
    window = int_arg(window, "window", 0)
    B, Hg, Wg, C3 = qkv.shape
    if (rel_pos_h is None) != (rel_pos_w is None):
        raise ValueError("rel_pos_h and rel_pos_w must both be given or both be None")
    if rel_pos_h is not None:
        seg_h, seg_w = (window, window) if window > 0 else (Hg, Wg)
        for name, t, seg in (("rel_pos_h", rel_pos_h, seg_h), ("rel_pos_w", rel_pos_w, seg_w)):
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                raise TypeError(f"{name} must be a floating-point tensor")
            if tuple(t.shape) != (2 * seg - 1, D):
                raise ValueError(f"{name} must be (2 * {seg} - 1, D) = ({2 * seg - 1}, {D}), got {tuple(t.shape)}")
    check_pad_kv(pad_kv, heads, D)
    if qkv_bias is not None and (not isinstance(qkv_bias, torch.Tensor) or tuple(qkv_bias.shape) != (C3,)):
        raise ValueError(f"qkv_bias must be None or a ({C3},) tensor")
    scale = float_arg(scale, "scale")
    return dispatch("sam_block_attention", _TABLE, backend, qkv, heads, window, rel_pos_h, rel_pos_w, pad_kv,
                    float(scale), qkv_bias)
