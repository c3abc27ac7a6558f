"""``decomposed_bias``: SAM's decomposed rel-pos bias written out in full, for the CPU attention paths that hand a
materialised bias to PyTorch's fused kernel as its mask.

Backends (``sam_fast._dispatch``): ``cpu``, the C++ op ``sam_fast::decomposed_bias`` (csrc/cpu/decomposed_bias.cpp;
PyTorch's broadcasting add crawls over SAM's 14-wide rows), float32 / float64, eager; ``reference``
(:mod:`sam_fast.reference.decomposed_bias`), anything else.
"""

from __future__ import annotations

from typing import Optional

import torch

from .._dispatch import Backend, Refusal, dispatch
from ..reference import decomposed_bias as _ref
from ._ext import cpp_device_refusal, register_fake

_DTYPES = (torch.float32, torch.float64)


@register_fake("sam_fast::decomposed_bias")
def _(rel_h, rel_w, out):
    return None


def _cpu_supports(rel_h, rel_w, out, *, explicit):
    refusal = cpp_device_refusal(rel_h, "cpu")
    if refusal is not None:
        return refusal
    if rel_h.dtype not in _DTYPES or rel_w.dtype != rel_h.dtype:
        # the kernel's dtypes by design: the reference is the path for the others, not a fallback
        return Refusal(f"the C++ kernel takes float32 or float64 terms of one dtype, got {rel_h.dtype} and "
                       f"{rel_w.dtype}", wrong_device=True)
    if torch.compiler.is_compiling():
        return Refusal("while torch.compile traces the broadcasting add is compiled instead", wrong_device=True)
    return None


def _cpu_run(rel_h, rel_w, out):
    if out is None:
        out = rel_h.new_empty((*rel_h.shape[:-1], rel_h.shape[-1] * rel_w.shape[-1]))
    torch.ops.sam_fast.decomposed_bias(rel_h.contiguous(), rel_w.contiguous(), out)
    return out


def _reference_run(rel_h, rel_w, out):
    ref = _ref.decomposed_bias(rel_h, rel_w)
    return ref if out is None else out.copy_(ref)


_TABLE = (
    Backend("cpu", _cpu_supports, _cpu_run),
    Backend("reference", lambda *a, explicit: None, _reference_run),
)


def decomposed_bias(rel_h: torch.Tensor, rel_w: torch.Tensor, out: Optional[torch.Tensor] = None, *,
                    backend: str = "auto") -> torch.Tensor:
    """rel_h (..., ay), rel_w (..., ax) with the same leading dims -> (..., ay * ax),
    ``out[..., i * ax + j] = rel_h[..., i] + rel_w[..., j]``; written into ``out`` (contiguous, that shape, the
    terms' dtype) when given, and returned."""
    for name, t in (("rel_h", rel_h), ("rel_w", rel_w)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {t.dtype}")
        if t.dim() < 1:
            raise ValueError(f"{name} must have at least one dim, got a 0-d tensor")
    if rel_h.shape[:-1] != rel_w.shape[:-1]:
        raise ValueError(f"rel_h and rel_w must share their leading dims, got {tuple(rel_h.shape)} and "
                         f"{tuple(rel_w.shape)}")
    if rel_h.device != rel_w.device:
        raise ValueError(f"rel_w must be on rel_h's device {rel_h.device}, got {rel_w.device}")
    if out is not None:
        want = (*rel_h.shape[:-1], rel_h.shape[-1] * rel_w.shape[-1])
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"out must be a torch.Tensor or None, got {type(out).__name__}")
        if tuple(out.shape) != want or not out.is_contiguous() or out.device != rel_h.device:
            raise ValueError(f"out must be a contiguous {want} tensor on {rel_h.device}, got {tuple(out.shape)} "
                             f"on {out.device}{'' if out.is_contiguous() else ', not contiguous'}")
        if out.dtype != torch.promote_types(rel_h.dtype, rel_w.dtype):
            raise TypeError(f"out must have the terms' dtype {torch.promote_types(rel_h.dtype, rel_w.dtype)}, "
                            f"got {out.dtype}")
    return dispatch("decomposed_bias", _TABLE, backend, rel_h, rel_w, out)
