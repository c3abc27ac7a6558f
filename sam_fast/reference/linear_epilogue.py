"""Reference of ``sam_fast::linear_epilogue_``: what follows a bias-free GEMM, in PyTorch's own ops."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

ACTIVATIONS = ("none", "gelu", "gelu_tanh")


def linear_epilogue(y: torch.Tensor, bias: Optional[torch.Tensor], activation: str,
                    residual: Optional[torch.Tensor]) -> torch.Tensor:
    """``act(y + bias) + residual`` as a new tensor; activation ``"none"``, ``"gelu"`` (exact erf) or
    ``"gelu_tanh"``."""
    out = y if bias is None else y + bias
    if activation == "gelu":
        out = F.gelu(out)
    elif activation == "gelu_tanh":
        out = F.gelu(out, approximate="tanh")
    return out if residual is None else out + residual
