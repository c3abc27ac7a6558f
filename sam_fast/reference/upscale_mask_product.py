"""Reference of SAM's final decoder step (``sam_fast.ops.upscale_mask_product``), unfused.

Exactly segment_anything's ``MaskDecoder.predict_masks`` tail: the second ConvTranspose2d of
``output_upscaling`` and its GELU, then ``hyper_in @ upscaled_embedding``; with ``skip``, SAM 2's
``act2(dc2(x) + feat_s0)`` (its high-resolution features, of the image each prompt belongs to).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def upscale_mask_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, hyper: torch.Tensor,
                         skip: Optional[torch.Tensor] = None,
                         skip_index: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x (P, CIN, h, w), weight (CIN, COUT, 2, 2), bias (COUT,), hyper (P, M, COUT), skip (I, COUT, 2h, 2w) with
    skip_index (P,) -> (P, M, 2h, 2w)."""
    up = F.conv_transpose2d(x, weight, bias, stride=2)
    if skip is not None:  # one image: broadcast, no per-prompt copy of its features
        up = up + (skip if skip.shape[0] == 1 else skip[skip_index.long()])
    up = F.gelu(up)
    P, c, H, W = up.shape
    return (hyper @ up.view(P, c, H * W)).view(P, -1, H, W)
