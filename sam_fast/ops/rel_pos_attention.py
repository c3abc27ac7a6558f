"""``rel_pos_attention``: attention over segments with SAM's decomposed rel-pos bias added inside the kernel's row
blocks, the CPU dilated-attention path's kernel for segments of many keys (:mod:`sam_fast.ops.dilated_attention_cpu`).

Backends (``sam_fast._dispatch``): ``cpu``, the C++ op ``sam_fast::rel_pos_attention``
(csrc/cpu/rel_pos_attention.cpp), q / k / v float32 or bfloat16 (float32 accumulation), float32 terms, nothing for
autograd to record; ``reference`` (:mod:`sam_fast.reference.rel_pos_attention`), differentiable, any float dtype.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .._args import float_arg
from .._dispatch import Backend, Refusal, dispatch
from ..reference import rel_pos_attention as _ref
from ._ext import cpp_device_refusal, register_fake

#: q / k / v dtypes of the C++ kernel
KERNEL_DTYPES = (torch.float32, torch.bfloat16)


@register_fake("sam_fast::rel_pos_attention")
def _(q, k, v, rel_h, rel_w, scale, out, lse):
    return None


def _cpu_supports(q, k, v, rel_h, rel_w, scale, out, lse, *, explicit):
    refusal = cpp_device_refusal(q, "cpu")
    if refusal is not None:
        return refusal
    if q.dtype not in KERNEL_DTYPES or rel_h.dtype != torch.float32 or rel_w.dtype != torch.float32:
        return Refusal(f"the C++ kernel takes float32 / bfloat16 q, k, v and float32 terms, got {q.dtype} and "
                       f"{rel_h.dtype}", wrong_device=True)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, rel_h, rel_w)):
        return Refusal("the C++ kernel has no backward; autograd is recording", wrong_device=True)
    return None


def _cpu_run(q, k, v, rel_h, rel_w, scale, out, lse):
    S, H, Lq, D = q.shape
    out = q.new_empty((S, Lq, H, D)) if out is None else out
    lse = q.new_empty((S, H, Lq), dtype=torch.float32) if lse is None else lse
    torch.ops.sam_fast.rel_pos_attention(q, k, v, rel_h.contiguous(), rel_w.contiguous(), scale, out, lse)
    return out, lse


def _reference_run(q, k, v, rel_h, rel_w, scale, out, lse):
    o, l = _ref.rel_pos_attention(q, k, v, rel_h, rel_w, scale)
    if out is not None:
        o = out.copy_(o)
    if lse is not None:
        l = lse.copy_(l)
    return o, l


_TABLE = (
    Backend("cpu", _cpu_supports, _cpu_run),
    Backend("reference", lambda *a, explicit: None, _reference_run),
)


def _tensor(t, name, dims):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {t.dtype}")
    if t.dim() != dims:
        raise ValueError(f"{name} must have {dims} dims, got shape {tuple(t.shape)}")
    return t


def rel_pos_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_h: torch.Tensor, rel_w: torch.Tensor,
                      scale: float, *, out: Optional[torch.Tensor] = None, lse: Optional[torch.Tensor] = None,
                      backend: str = "auto") -> Tuple[torch.Tensor, torch.Tensor]:
    """``softmax(scale * q k^T + rel_h[., key_y] + rel_w[., key_x]) v`` per segment and head.

    Args:
        q: (S, H, Lq, D); k, v: (S, H, Lk, D), all of one dtype.
        rel_h, rel_w: (S, H, Lq, ay) and (S, H, Lq, ax) with ``ay * ax = Lk``: key ``y * ax + x`` of query i gets
            ``rel_h[s, h, i, y] + rel_w[s, h, i, x]`` (-inf masks it).
        scale: the logits' scale.
        out, lse: optional outputs to write, (S, Lq, H, D) in q's dtype and (S, H, Lq) float32.
    Returns:
        ``(out, lse)``; a row that sees no key: out 0, lse -inf.
    """
    for name, t in (("q", q), ("k", k), ("v", v), ("rel_h", rel_h), ("rel_w", rel_w)):
        _tensor(t, name, 4)
    S, H, Lq, D = q.shape
    if k.shape != v.shape or k.shape[:2] != (S, H) or k.shape[3] != D:
        raise ValueError(f"k and v must be (S, H, Lk, D) = ({S}, {H}, Lk, {D}), got {tuple(k.shape)} and "
                         f"{tuple(v.shape)}")
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    ay, ax = rel_h.shape[-1], rel_w.shape[-1]
    if rel_h.shape[:3] != (S, H, Lq) or rel_w.shape[:3] != (S, H, Lq) or ay * ax != k.shape[2]:
        raise ValueError(f"rel_h and rel_w must be (S, H, Lq, ay) and (S, H, Lq, ax) with ay * ax = Lk = {k.shape[2]}, "
                         f"got {tuple(rel_h.shape)} and {tuple(rel_w.shape)}")
    if len({t.device for t in (q, k, v, rel_h, rel_w)}) != 1:
        raise ValueError("q, k, v, rel_h and rel_w must be on one device")
    scale = float_arg(scale, "scale")
    for name, t, shape, dtype in (("out", out, (S, Lq, H, D), q.dtype), ("lse", lse, (S, H, Lq), torch.float32)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
        if tuple(t.shape) != shape or t.dtype != dtype or not t.is_contiguous() or t.device != q.device:
            raise ValueError(f"{name} must be a contiguous {shape} {dtype} tensor on {q.device}, got "
                             f"{tuple(t.shape)} {t.dtype} on {t.device}")
    return dispatch("rel_pos_attention", _TABLE, backend, q, k, v, rel_h, rel_w, float(scale), out, lse)
