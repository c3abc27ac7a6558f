"""``upscale_mask_product``: the mask decoder's last upscaling convolution + GELU + hypernetwork product as one
Triton kernel (:mod:`sam_fast.kernels.upscale_mask_product`), which never writes the (P, C/8, 4h, 4w) upscaled
embedding; SAM 2's high-resolution skip features (added before that GELU) are read per image, in the kernel.
Reference: :mod:`sam_fast.reference.upscale_mask_product`; :class:`sam_fast.nn.BatchedMaskDecoder` calls it.
"""

from __future__ import annotations

from typing import Optional

import torch

from .._dispatch import Backend, Refusal, dispatch, triton_device_refusal
from ..reference import upscale_mask_product as _ref

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
MAX_CHANNELS = 256  # the kernel keeps a (pixels x CIN) tile and a (CIN x COUT) weight tap in registers


@torch.library.custom_op("sam_fast::upscale_mask_product", mutates_args=())
def _upscale_mask_product_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, hyper: torch.Tensor,
                             skip: Optional[torch.Tensor] = None,
                             skip_index: Optional[torch.Tensor] = None) -> torch.Tensor:
    from ..kernels import upscale_mask_product as kernel

    return kernel.upscale_mask_product(x, weight, bias, hyper, skip, skip_index)


@_upscale_mask_product_op.register_fake
def _(x, weight, bias, hyper, skip=None, skip_index=None):
    P, _, h, w = x.shape
    return x.new_empty((P, hyper.shape[1], 2 * h, 2 * w))


def _triton_supports(x, weight, bias, hyper, skip, skip_index, explicit):
    refusal = triton_device_refusal(x, explicit)
    if refusal is not None:
        return refusal
    if max(weight.shape[0], weight.shape[1]) > MAX_CHANNELS:
        return Refusal(f"the kernel supports up to {MAX_CHANNELS} channels, got {tuple(weight.shape[:2])}")
    return None


def _triton_run(x, weight, bias, hyper, skip, skip_index):
    if skip is not None:
        skip, skip_index = skip.contiguous(), skip_index.to(torch.int64).contiguous()
    return _upscale_mask_product_op(x.contiguous(), weight.contiguous(), bias.contiguous(), hyper.contiguous(),
                                    skip, skip_index)


_TABLE = (
    Backend("triton", _triton_supports, _triton_run),
    Backend("reference", lambda *args, explicit: None, _ref.upscale_mask_product),
)


def upscale_mask_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, hyper: torch.Tensor,
                         skip: Optional[torch.Tensor] = None, skip_index: Optional[torch.Tensor] = None, *,
                         backend: str = "auto", check_index: bool = True) -> torch.Tensor:
    """``hyper @ GELU(conv_transpose2d(x, weight, bias, stride=2) [+ skip[skip_index]])``, per prompt.

    Args:
        x: (P, CIN, h, w) - the first upscaling stage's output.
        weight: (CIN, COUT, 2, 2), bias: (COUT,) - the second ``ConvTranspose2d(CIN, COUT, 2, stride=2)``.
        hyper: (P, M, COUT) - the hypernetwork outputs of the M masks wanted.
        skip: optional (I, COUT, 2h, 2w) - SAM 2's high-resolution features of I images, added before the GELU;
            prompt p adds ``skip[skip_index[p]]``.
        skip_index: (P,) int64 / int32 in [0, I), given with skip.
        backend: "auto" | "triton" | "reference".
        check_index: check skip_index's range (one device synchronisation); callers that built the index
            themselves pass False.

    Returns:
        (P, M, 2h, 2w) mask logits in x's dtype.
    """
    tensors = {"x": x, "weight": weight, "bias": bias, "hyper": hyper}
    if (skip is None) != (skip_index is None):
        raise ValueError("skip and skip_index must be given together")
    if skip is not None:
        tensors["skip"] = skip
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOATS:
            raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name} must be on {x.device} with x, got {t.device}")
    if x.dim() != 4:
        raise ValueError(f"x must have shape (P, CIN, h, w), got {tuple(x.shape)}")
    P, CIN = x.shape[:2]
    if weight.dim() != 4 or weight.shape[0] != CIN or tuple(weight.shape[2:]) != (2, 2):
        raise ValueError(f"weight must have shape ({CIN}, COUT, 2, 2), got {tuple(weight.shape)}")
    COUT = weight.shape[1]
    if tuple(bias.shape) != (COUT,):
        raise ValueError(f"bias must have shape ({COUT},), got {tuple(bias.shape)}")
    if hyper.dim() != 3 or hyper.shape[0] != P or hyper.shape[2] != COUT:
        raise ValueError(f"hyper must have shape ({P}, M, {COUT}), got {tuple(hyper.shape)}")
    if weight.dtype != x.dtype or hyper.dtype != x.dtype:
        raise TypeError(f"weight and hyper must have x's dtype {x.dtype}, got {weight.dtype} and {hyper.dtype}")
    if skip is not None:
        _check_skip(skip, skip_index, x, COUT, check_index)
    return dispatch("upscale_mask_product", _TABLE, backend, x, weight, bias, hyper, skip, skip_index)


def _check_skip(skip, skip_index, x, cout, check_index):
    P, _, h, w = x.shape
    if skip.dtype != x.dtype:
        raise TypeError(f"skip must have x's dtype {x.dtype}, got {skip.dtype}")
    if skip.dim() != 4 or tuple(skip.shape[1:]) != (cout, 2 * h, 2 * w):
        raise ValueError(f"skip must have shape (I, {cout}, {2 * h}, {2 * w}), got {tuple(skip.shape)}")
    if not isinstance(skip_index, torch.Tensor):
        raise TypeError(f"skip_index must be a torch.Tensor, got {type(skip_index).__name__}")
    if skip_index.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"skip_index must be int64 or int32, got {skip_index.dtype}")
    if tuple(skip_index.shape) != (P,) or skip_index.device != x.device:
        raise ValueError(f"skip_index must be a ({P},) tensor on {x.device}, got {tuple(skip_index.shape)} on "
                         f"{skip_index.device}")
    if check_index and P:
        lo, hi = torch.stack([skip_index.min(), skip_index.max()]).tolist()
        if lo < 0 or hi >= skip.shape[0]:
            raise ValueError(f"skip_index must lie in [0, {skip.shape[0]}), got values in [{lo}, {hi}]")
