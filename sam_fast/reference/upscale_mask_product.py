"""Reference of SAM's final decoder step (``sam_fast.ops.upscale_mask_product``), unfused.

Exactly segment_anything's ``MaskDecoder.predict_masks`` tail: the second ConvTranspose2d of
``output_upscaling`` and its GELU, then ``hyper_in @ upscaled_embedding``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def upscale_mask_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                         hyper: torch.Tensor) -> torch.Tensor:
    """x (P, CIN, h, w), weight (CIN, COUT, 2, 2), bias (COUT,), hyper (P, M, COUT) -> (P, M, 2h, 2w)."""
    up = F.gelu(F.conv_transpose2d(x, weight, bias, stride=2))
    P, c, H, W = up.shape
    return (hyper @ up.view(P, c, H * W)).view(P, -1, H, W)
