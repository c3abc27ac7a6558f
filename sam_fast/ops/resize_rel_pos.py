"""``sam_fast.resize_rel_pos``: linear resize of a relative-position table (C++ CPU and CUDA kernels).

segment_anything's ``get_rel_pos`` resizes a table whose length does not match ``2 * size - 1`` with
``F.interpolate(mode="linear")``; the swapped attention modules call this op for the same job, on the
device where the table lives.
"""

from __future__ import annotations

import torch

from .._dispatch import Backend, dispatch
from ..reference.resize_rel_pos import resize_rel_pos as resize_rel_pos_reference
from ._ext import cpp_device_refusal, register_autograd, register_fake


@register_fake("sam_fast::resize_rel_pos")
def _(rel_pos, length):
    return rel_pos.new_empty((length, rel_pos.shape[1]))


def _setup(ctx, inputs, output):
    ctx.shape = inputs[0].shape
    ctx.dtype = inputs[0].dtype


def _backward(ctx, grad):
    # The resize is linear: its gradient is the transpose of the interpolation.
    probe = torch.zeros(ctx.shape, dtype=grad.dtype, device=grad.device, requires_grad=True)
    with torch.enable_grad():
        out = resize_rel_pos_reference(probe, grad.shape[0])
    (g,) = torch.autograd.grad(out, probe, grad)
    return g, None


register_autograd("sam_fast::resize_rel_pos", _backward, _setup)


def _cpp(device_type: str):
    def supports(rel_pos, length, explicit):
        return cpp_device_refusal(rel_pos, device_type)

    def run(rel_pos, length):
        return torch.ops.sam_fast.resize_rel_pos(rel_pos, length)

    return Backend(device_type, supports, run)


_TABLE = (
    _cpp("cuda"),
    _cpp("cpu"),
    Backend("reference", lambda rel_pos, length, explicit: None, resize_rel_pos_reference),
)


def resize_rel_pos(rel_pos: torch.Tensor, length: int, *, backend: str = "auto") -> torch.Tensor:
    """Resize a (L, C) relative-position table to (length, C) by linear interpolation.

    Same arithmetic as segment_anything's ``get_rel_pos`` (``F.interpolate``, ``align_corners=False``).
    """
    if not isinstance(rel_pos, torch.Tensor):
        raise TypeError(f"rel_pos must be a torch.Tensor, got {type(rel_pos).__name__}")
    if rel_pos.dim() != 2 or rel_pos.shape[0] < 1:
        raise ValueError(f"rel_pos must have shape (L, C) with L >= 1, got {tuple(rel_pos.shape)}")
    if not rel_pos.is_floating_point():
        raise TypeError(f"rel_pos must be a floating-point tensor, got {rel_pos.dtype}")
    if not isinstance(length, int) or isinstance(length, bool) or length < 1:
        raise ValueError(f"length must be a positive int, got {length!r}")
    if length == rel_pos.shape[0]:
        return rel_pos
    return dispatch("resize_rel_pos", _TABLE, backend, rel_pos, length)
