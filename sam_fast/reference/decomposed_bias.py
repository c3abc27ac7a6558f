"""Reference of ``sam_fast::decomposed_bias``: SAM's decomposed rel-pos bias in full, by broadcasting."""

from __future__ import annotations

import torch


def decomposed_bias(rel_h: torch.Tensor, rel_w: torch.Tensor) -> torch.Tensor:
    """rel_h (..., ay), rel_w (..., ax) -> (..., ay * ax): ``out[..., i * ax + j] = rel_h[..., i] + rel_w[..., j]``."""
    return (rel_h[..., :, None] + rel_w[..., None, :]).flatten(-2)
