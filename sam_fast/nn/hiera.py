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
from ..ops.hiera_attention import hiera_attention, sdpa_global_wins
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


class _Parts:
    """A Hiera block's pieces under one set of names: Meta's ``MultiScaleBlock`` (norm1 / attn.qkv / attn.proj /
    norm2 / mlp.layers / pool) or transformers' ``Sam2MultiScaleBlock`` (layer_norm1 / ... / mlp.proj_in /
    mlp.proj_out / query_stride)."""

    __slots__ = ("norm1", "attn", "qkv", "proj", "heads", "norm2", "mlp", "fc1", "act", "fc2", "shortcut", "stride",
                 "window", "skipped")

    @classmethod
    def of_meta(cls, block: nn.Module) -> Optional["_Parts"]:
        attn, m = block.attn, block.mlp
        if type(attn).__name__ != "MultiScaleAttention" or type(attn).__module__ != HIERA_MODULE \
                or len(getattr(m, "layers", ())) != 2 or getattr(m, "sigmoid_output", True) \
                or type(m.act) is not nn.GELU or attn.q_pool is not block.pool:
            return None
        stride = 1
        if block.pool is not None:
            pool = block.pool
            k, s = pool.kernel_size, pool.stride
            if type(pool) is not nn.MaxPool2d or k != s or pool.padding not in (0, (0, 0)) or pool.ceil_mode \
                    or pool.dilation not in (1, (1, 1)) or len(set(_pair(k))) != 1:
                return None
            stride = _pair(k)[0]
        p = cls()
        p.norm1, p.attn, p.qkv, p.proj, p.heads, p.norm2, p.mlp = (block.norm1, attn, attn.qkv, attn.proj,
                                                                   attn.num_heads, block.norm2, m)
        p.fc1, p.act, p.fc2 = m.layers[0], m.act, m.layers[1]
        p.shortcut = getattr(block, "proj", None) if block.dim != block.dim_out else None
        p.stride, p.window = stride, block.window_size
        p.skipped = (block.drop_path,)
        if block.dim != block.dim_out and p.shortcut is None or stride > 1 and block.dim == block.dim_out:
            return None  # (the original adds an unpooled shortcut to a pooled output there: it fails)
        return p

    @classmethod
    def of_transformers(cls, layer: nn.Module) -> Optional["_Parts"]:
        attn, m = layer.attn, layer.mlp
        act = getattr(m, "activation", None)
        exact_gelu = type(act) is nn.GELU and act.approximate == "none" or \
            type(act).__name__ == "GELUActivation" and getattr(act, "act", None) is F.gelu
        if len(getattr(m, "layers", ())) != 0 or getattr(m, "sigmoid_output", True) or not exact_gelu:
            return None
        stride = layer.query_stride
        if stride is not None and (len(set(_pair(stride))) != 1 or attn.query_stride != stride):
            return None
        p = cls()
        p.norm1, p.attn, p.qkv, p.proj, p.heads, p.norm2, p.mlp = (layer.layer_norm1, attn, attn.qkv, attn.proj,
                                                                   attn.num_attention_heads, layer.layer_norm2, m)
        p.fc1, p.act, p.fc2 = m.proj_in, _EXACT_GELU, m.proj_out
        p.shortcut = getattr(layer, "proj", None) if layer.dim != layer.dim_out else None
        p.stride, p.window = 1 if stride is None else _pair(stride)[0], layer.window_size
        p.skipped = (act,)
        if layer.dim != layer.dim_out and p.shortcut is None or stride is not None and layer.dim == layer.dim_out:
            return None
        return p


_EXACT_GELU = nn.GELU()  # (what transformers' GELUActivation computes, as the fused MLP path recognises it)


def _fast_stride(parts: _Parts, backend: str, x: torch.Tensor, params) -> Optional[int]:
    """The block's query stride (1 without pooling) where its fast path applies to ``x``, else None."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or torch.compiler.is_compiling():
        return None
    if x.device.type == "cpu" and backend in ("auto", "cpu"):  # the C++ kernel
        if x.dtype not in FUSED_DTYPES or compute_dtype(x.dtype) != x.dtype or not fused_bias_kernel():
            return None
    elif x.device.type == "cuda" or backend in ("triton", "reference"):  # the Triton kernel or the reference
        if x.dtype not in (torch.float32, torch.float16, torch.bfloat16) or backend == "cpu":
            return None
    else:
        return None
    if not isinstance(parts.qkv, _OWN_OUTPUT) or not isinstance(parts.proj, _OWN_OUTPUT):
        return None
    if has_hooks(parts.norm1, parts.attn, parts.qkv, parts.proj, parts.norm2, parts.mlp, parts.fc1, parts.fc2,
                 *parts.skipped, parts.shortcut):
        return None
    if not fused_ok(x, *params):
        return None
    stride, ws = parts.stride, parts.window
    if stride > 1 and ws > 0:
        # the original re-partitions the pooled output with the pooled window: it needs as many windows
        H, W = x.shape[1], x.shape[2]
        if ws % stride or any(-(-n // ws) != -(-(n // stride) // (ws // stride)) for n in (H, W)):
            return None
    return stride


def hiera_block_forward(parts: _Parts, x: torch.Tensor, backend: str, params) -> Optional[torch.Tensor]:
    """A Hiera block on ``x`` (B, H, W, C) through sam_fast's kernels (module docstring), or None where that does not
    apply (the caller then runs the block's own forward). ``params``: the block's parameters (autograd's check)."""
    stride = _fast_stride(parts, backend, x, params)
    if stride is None:
        return None
    xn = parts.norm1(x)
    shortcut = x
    if parts.shortcut is not None:
        shortcut = parts.shortcut(xn)
        if stride > 1:
            shortcut = F.max_pool2d(shortcut.permute(0, 3, 1, 2), stride, stride).permute(0, 2, 3, 1)
    lin = parts.qkv
    qkv_bias = None
    cpu = x.device.type == "cpu" and backend in ("auto", "cpu")
    if cpu and type(lin) is nn.Linear and lin.bias is not None and xn.dtype == torch.float32 \
            and not sdpa_global_wins(xn.dtype, parts.window, stride):
        qkv, qkv_bias = gemm(xn, lin.weight), lin.bias  # the kernel adds the bias as it reads
    else:
        qkv = lin(xn)
    out = hiera_attention(qkv, parts.heads, parts.window, stride, _pad_kv(parts, x), None, qkv_bias,
                          backend="cpu" if cpu else backend)
    x = _project(parts, out, shortcut.contiguous(), backend)
    y = mlp_layers_fused(parts.fc1, parts.act, parts.fc2, parts.norm2(x), x, backend)
    return y if y is not None else _add_residual(parts.mlp(parts.norm2(x)), None, x)


def _pad_kv(parts: _Parts, x: torch.Tensor):
    """The k and v of a padded position (the original pads the normed tokens with zeros: qkv(0) is the qkv bias), or
    None where no window is padded."""
    ws = parts.window
    if ws <= 0 or (x.shape[1] % ws == 0 and x.shape[2] % ws == 0):
        return None
    lin = parts.qkv
    if type(lin) is nn.Linear:  # qkv(0) is its bias (or zeros): no GEMM per call
        zero = lin.bias if lin.bias is not None else x.new_zeros(lin.out_features)
        zero = zero.to(x.dtype).reshape(3, parts.heads, -1)
    else:  # an int8 or other replaced linear: ask it
        zero = lin(x.new_zeros(1, lin.in_features)).reshape(3, parts.heads, -1)
    return zero[1], zero[2]


class FastHieraBlock(_SharedModule):
    """Meta's SAM 2 Hiera block with its attention through sam_fast's kernels and its linears' biases, GELU and
    residuals fused after their GEMMs (inference); the original forward elsewhere."""

    backend = "auto"
    pattern = None  # (no dilated patterns: apply's updates restore it with the backend)

    def extra_repr(self) -> str:
        return f"fast form of {self._original_class.__name__}, backend={self.backend!r}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = None if self.training else _Parts.of_meta(self)
        y = None if parts is None else hiera_block_forward(parts, x, self.backend, tuple(self.parameters()))
        return self.float_forward(x) if y is None else y


# --- transformers' SAM 2 (Sam2Model, Sam2VisionModel, Sam2HieraDetModel) --------------------------------------------

#: where transformers defines SAM 2's Hiera block
TRANSFORMERS_HIERA_MODULE = "transformers.models.sam2.modeling_sam2"


def transformers_hiera_layers(model: nn.Module):
    """(encoder, layer) of every transformers SAM 2 Hiera block (``Sam2MultiScaleBlock``) in ``model``; ``encoder``
    is the module whose ``blocks`` list holds it."""
    found = []
    for enc in model.modules():
        blocks = getattr(enc, "blocks", None)
        if isinstance(blocks, nn.ModuleList):
            found += [(enc, layer) for layer in blocks if type(layer).__name__ == "Sam2MultiScaleBlock"
                      and type(layer).__module__ == TRANSFORMERS_HIERA_MODULE]
    return found


class FastHieraLayerForward:
    """The instance ``forward`` sam_fast gives a transformers SAM 2 Hiera block: the layer object stays (its class,
    its gradient checkpointing, transformers' hidden-state capture), its forward runs sam_fast's kernels where they
    apply and the class's own forward elsewhere."""

    pattern = None

    def __init__(self, layer: nn.Module, backend: str):
        self.layer, self.backend = layer, backend

    def __call__(self, hidden_states, *args, **kwargs):
        layer = self.layer
        parts = None if layer.training or args else _Parts.of_transformers(layer)
        y = None if parts is None else hiera_block_forward(parts, hidden_states, self.backend,
                                                           tuple(layer.parameters()))
        return type(layer).forward(layer, hidden_states, *args, **kwargs) if y is None else y

    def __repr__(self):
        return f"FastHieraLayerForward(backend={self.backend!r})"


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)
