"""``nn.Linear`` on the CPU at inference with what follows it fused: ``act(x W^T + b) + residual``.

PyTorch's CPU ``addmm`` copies the broadcast bias into the whole output before the GEMM runs on top of it, and a
GELU or a residual add after the layer is another full pass each. In a ViT-B block on SAM's 64 x 64 grid those
passes over the 4096 x 3072 hidden tensor cost about as much as the attention itself. :func:`fused_linear` runs
the GEMM without a bias and hands its output to ``sam_fast::linear_epilogue_``, which adds the bias, applies the
activation and adds the residual a cache-sized block of rows at a time (ATen's own kernels on each block).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .._hooks import has_hooks
from ._ext import extension_error, register_fake

#: the dtypes :func:`fused_linear` takes: bf16 linears gain nothing from it (oneDNN adds their bias inside its own
#: GEMM), and rounding the GEMM to bf16 before the bias would round twice
EPILOGUE_DTYPES = (torch.float32,)

#: outputs smaller than this keep ``nn.Linear`` (+ in-place ops): while the output fits in a core's L2 the extra
#: passes are cheap, and the op's own call costs more than it saves (the 256-token block of ``sam-fast bench``: 3-5%
#: slower through it)
FUSED_MIN_BYTES = 1 << 21

_ACTIVATIONS = ("none", "gelu", "gelu_tanh")


def fused_linear(lin: nn.Module, x: torch.Tensor, activation: str = "none",
                 residual: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """``activation(lin(x)) + residual`` in one pass after a bias-free GEMM, or None where it does not apply (the
    caller then runs the module itself): ``lin`` a plain ``nn.Linear`` without hooks, x a CPU tensor in
    :data:`EPILOGUE_DTYPES` matching its weight, an output of at least :data:`FUSED_MIN_BYTES`, nothing for
    autograd to record, not while torch.compile traces, the C++ extension loaded. ``activation``: ``"none"``,
    ``"gelu"`` (exact) or ``"gelu_tanh"``; ``residual`` shaped like the output, in its dtype."""
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {_ACTIVATIONS}, got {activation!r}")
    if type(lin) is not nn.Linear or x.device.type != "cpu" or x.dtype not in EPILOGUE_DTYPES or has_hooks(lin):
        return None
    if x.dtype != lin.weight.dtype or torch.compiler.is_compiling():
        return None
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, lin.weight, lin.bias, residual)):
        return None
    if extension_error() is not None:
        return None
    if residual is not None and (residual.dtype != x.dtype or residual.shape[:-1] != x.shape[:-1]
                                 or residual.shape[-1] != lin.out_features):
        return None
    if x.numel() // max(1, x.shape[-1]) * lin.out_features * x.element_size() < FUSED_MIN_BYTES:
        return None
    y = F.linear(x, lin.weight)
    if not y.is_contiguous():
        y = y.contiguous()
    if residual is not None and not residual.is_contiguous():
        residual = residual.contiguous()
    torch.ops.sam_fast.linear_epilogue_(y, lin.bias, activation, residual)
    return y


@register_fake("sam_fast::linear_epilogue_")
def _(y, bias, activation, residual):
    return None
