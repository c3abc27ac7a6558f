"""The fast form of SAM 2's Hiera block (``sam2.modeling.backbones.hieradet.MultiScaleBlock``), swapped in by
``sam_fast.apply`` with ``attention="exact"``. It holds the original block's parameters (the same tensors: state_dict
keys and values unchanged) and computes the same function.

At inference on the CPU (float32, or bfloat16 where the CPU multiplies it in hardware) the block runs:

* the qkv GEMM on the normed tokens as they lie (B, H, W, C): no window partition and no padded copy. In float32 the
  GEMM leaves out the bias, which the attention kernel adds as it reads each row;
* the attention through the C++ kernel :func:`~sam_fast.ops.hiera_attention.hiera_attention`: each window's keys
  gathered once (a padded position's k and v are the qkv bias', as the original's zero padding after the norm makes
  them), the first block of a stage max-pooling its queries inside the kernel, each output row written in place on
  the (pooled) grid;
* the projection with the block's residual (the input, or at a stage change the pooled projection of the normed
  input) and the MLP's GELU and residual in the GEMMs' epilogues
  (:func:`~sam_fast.ops.linear_epilogue.fused_linear`), or in place on the linears' fresh outputs.

On a CUDA GPU the attention runs the Triton kernel (:mod:`sam_fast.kernels.hiera_attention`: every window in one
launch, several per program, queries pooled as they are loaded) and the residuals are added in place on the linears'
fresh outputs. Elsewhere (autograd recording, training mode, hooks on a layer it would skip, a replaced submodule,
shapes the original itself rejects, a CPU without the C++ kernel's instructions) it runs the original forward,
unchanged. ``backend``: ``"auto"``, ``"cpu"`` (the C++ kernel), ``"triton"`` (the Triton kernel; on the CPU under
``TRITON_INTERPRET=1`` only) or ``"reference"`` (the op's PyTorch form).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .._hooks import has_hooks
from ..ops.dilated_attention_cpu import FUSED_DTYPES, compute_dtype, fused_bias_kernel, fused_ok
from ..ops.hiera_attention import hiera_attention
from ..ops.linear_epilogue import gemm
from .attention import _OWN_OUTPUT, _add_residual, _project, mlp_layers_fused
from .quantized import _SharedModule

#: where Meta's sam2 package defines the Hiera block and its attention
HIERA_MODULE = "sam2.modeling.backbones.hieradet"


def is_hiera_block(module: nn.Module) -> bool:
    """Whether ``module`` is SAM 2's Hiera block as Meta's ``sam2`` package defines it (found without importing
    sam2: a model holding one has imported it)."""
    cls = type(module)
    return cls.__name__ == "MultiScaleBlock" and cls.__module__ == HIERA_MODULE


def hiera_blocks(model: nn.Module):
    """(parent, name, block) of every Hiera block of ``model`` not yet in its fast form, in model order."""
    return [(parent, name, child) for parent in model.modules() for name, child in parent._modules.items()
            if child is not None and is_hiera_block(child)]


class FastHieraBlock(_SharedModule):
    """SAM 2's Hiera block with its attention through the C++ kernel and its linears' biases, GELU and residuals
    fused after their GEMMs (CPU, inference); the original forward elsewhere."""

    backend = "auto"
    pattern = None  # (no dilated patterns: apply's updates restore it with the backend)

    def extra_repr(self) -> str:
        return f"fast form of {self._original_class.__name__}, backend={self.backend!r}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stride = self._stride(x)
        if stride is None:
            return self.float_forward(x)
        attn = self.attn
        xn = self.norm1(x)
        shortcut = x
        if self.dim != self.dim_out:
            shortcut = self.proj(xn)
            if self.pool is not None:
                shortcut = F.max_pool2d(shortcut.permute(0, 3, 1, 2), stride, stride).permute(0, 2, 3, 1)
        lin = attn.qkv
        qkv_bias = None
        cpu = x.device.type == "cpu" and self.backend in ("auto", "cpu")
        if cpu and type(lin) is nn.Linear and lin.bias is not None and xn.dtype == torch.float32:
            qkv, qkv_bias = gemm(xn, lin.weight), lin.bias  # the kernel adds the bias as it reads
        else:
            qkv = lin(xn)
        out = hiera_attention(qkv, attn.num_heads, self.window_size, stride, self._pad_kv(x), None, qkv_bias,
                              backend="cpu" if cpu else self.backend)
        x = _project(attn, out, shortcut.contiguous(), self.backend)
        m = self.mlp
        y = mlp_layers_fused(m.layers[0], m.act, m.layers[1], self.norm2(x), x, self.backend)
        return y if y is not None else _add_residual(m(self.norm2(x)), None, x)

    def _stride(self, x: torch.Tensor) -> Optional[int]:
        """The block's query stride (1 without pooling) where the fast path applies to ``x``, else None."""
        attn, m = self.attn, self.mlp
        if self.training or not isinstance(x, torch.Tensor) or x.dim() != 4 or torch.compiler.is_compiling():
            return None
        if x.device.type == "cpu" and self.backend in ("auto", "cpu"):  # the C++ kernel
            if x.dtype not in FUSED_DTYPES or compute_dtype(x.dtype) != x.dtype or not fused_bias_kernel():
                return None
        elif x.device.type == "cuda" or self.backend in ("triton", "reference"):  # the Triton kernel or the reference
            if x.dtype not in (torch.float32, torch.float16, torch.bfloat16) or self.backend == "cpu":
                return None
        else:
            return None
        if type(attn).__name__ != "MultiScaleAttention" or type(attn).__module__ != HIERA_MODULE \
                or not isinstance(attn.qkv, _OWN_OUTPUT) or not isinstance(attn.proj, _OWN_OUTPUT) \
                or len(getattr(m, "layers", ())) != 2 or getattr(m, "sigmoid_output", True) \
                or type(m.act) is not nn.GELU or attn.q_pool is not self.pool:
            return None
        if has_hooks(self.norm1, attn, attn.qkv, attn.proj, self.norm2, m, *m.layers, m.act, self.drop_path,
                     getattr(self, "proj", None)):
            return None
        if not fused_ok(x, *self.parameters()):
            return None
        stride = 1
        if self.pool is not None:
            pool = self.pool
            k, s = pool.kernel_size, pool.stride
            if type(pool) is not nn.MaxPool2d or k != s or pool.padding not in (0, (0, 0)) or pool.ceil_mode \
                    or pool.dilation not in (1, (1, 1)) or len(set(_pair(k))) != 1:
                return None
            stride = _pair(k)[0]
            if self.dim == self.dim_out:
                return None  # the original adds an unpooled shortcut to the pooled output: it fails there
        ws = self.window_size
        if stride > 1 and ws > 0:
            # the original re-partitions the pooled output with the pooled window: it needs as many windows
            H, W = x.shape[1], x.shape[2]
            if ws % stride or any(-(-n // ws) != -(-(n // stride) // (ws // stride)) for n in (H, W)):
                return None
        return stride

    def _pad_kv(self, x: torch.Tensor):
        """The k and v of a padded position (the original pads the normed tokens with zeros: qkv(0) is the qkv
        bias), or None where no window is padded."""
        ws = self.window_size
        if ws <= 0 or (x.shape[1] % ws == 0 and x.shape[2] % ws == 0):
            return None
        lin, heads = self.attn.qkv, self.attn.num_heads
        zero = lin(x.new_zeros(1, lin.in_features)).reshape(3, heads, -1)
        return zero[1], zero[2]


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)
