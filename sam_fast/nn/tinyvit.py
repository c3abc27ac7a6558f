"""Fast forms of a TinyViT encoder's modules (MobileSAM, TinySAM), swapped in by ``sam_fast.apply`` with
``attention="exact"``. Each holds the original module's parameters (the same tensors: state_dict keys and values
unchanged) and computes the same function:

* :class:`FoldedConv2dBN` - a convolution followed by an eval-mode BatchNorm as one convolution, its weight and bias
  folded from the current parameters at every call (nothing cached that a ``load_state_dict`` could leave stale);
  in training mode, BatchNorm's batch statistics make it the original pair.
* :class:`ChannelsLastPatchEmbed` - the encoder's input in channels-last memory order. The MBConv stage then runs
  oneDNN's convolutions in the order they compute in, without a reorder before and after each, and its 3-D tokens
  for the attention stages come out of ``flatten(2).transpose(1, 2)`` already contiguous.
* :class:`FastMBConv`, :class:`FastPatchMerging` (and the patch embedding) - their GELUs in place on the
  convolutions' fresh outputs, MBConv's residual added in place: a new tensor per activation at the first stage's
  256 x 256 x 256 cost five times the GELU itself on the development machine.
* :class:`FastTinyViTAttention` - the window attention through PyTorch's fused attention kernel: the learned
  per-offset bias is handed over with a batch axis (``(1, heads, N, N)``), the form that kernel takes; a 3-D bias
  sends the CPU to the unfused path (a third of the speed at TinyViT's windows). An int8 ``qkv`` gets its
  LayerNorm fused into its input quantization.
* :class:`FastTinyViTBlock` - on the CPU, the window attention through the C++ kernel ``window_bias_attention``
  (the tokens' qkv read in place: no padded copy, no partition; bf16 for an int8 model where the CPU policy asks);
  in float32 the MLP's first linear with its GELU in the GEMM's epilogue and the second with the block's residual
  add in its epilogue (:func:`sam_fast.ops.linear_epilogue.fused_linear`).

Where a fast form does not apply (hooks on the modules it would skip, an int8 or otherwise replaced submodule, a
tensor autograd tracks where the fused op has no backward) it runs the original forward.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import cpu_policy
from .._hooks import has_hooks
from ..models.tinyvit import Conv2dBN, MBConv, PatchEmbed, PatchMerging, TinyViTAttention, TinyViTBlock, TinyViTMlp
from ..ops.dilated_attention_cpu import FUSED_DTYPES, compute_dtype, fused_bias_kernel, fused_ok
from ..ops.window_bias_attention import window_bias_attention
from .attention import _project, mlp_layers_fused
from .quantized import Int8Linear, _is_exact_gelu, _SharedModule, norm_int8_linear


class _FastForm(_SharedModule):
    def extra_repr(self) -> str:
        return f"fast form of {self._original_class.__name__}"


def _tinyvit_qkv(attn: nn.Module, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``attn.qkv(attn.norm(x))`` in ``dtype``: an int8 qkv with the LayerNorm fused into its input quantization."""
    qkv = norm_int8_linear(attn.norm, attn.qkv, x, out_dtype=dtype)
    return (attn.qkv(attn.norm(x)) if qkv is None else qkv).to(dtype)


class FoldedConv2dBN(_FastForm):
    """``bn(c(x))`` as one convolution at inference (BatchNorm in eval mode)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c, bn = self.c, self.bn
        if bn.training or not bn.track_running_stats or bn.running_var is None or has_hooks(c, bn) \
                or type(c) is not nn.Conv2d or type(bn) is not nn.BatchNorm2d:
            return bn(c(x))  # (the original is an nn.Sequential of the two)
        # the fold in float32 whatever the weights' dtype, rounded once to it
        s = torch.rsqrt(bn.running_var.float() + bn.eps)
        if bn.weight is not None:
            s = s * bn.weight.float()
        shift = -bn.running_mean.float() * s
        if bn.bias is not None:
            shift = shift + bn.bias.float()
        if c.bias is not None:
            shift = shift + c.bias.float() * s
        w = (c.weight.float() * s.view(-1, 1, 1, 1)).to(c.weight.dtype)
        return c._conv_forward(x, w, shift.to(c.weight.dtype))


def _inplace_ok(*acts, tensors=()) -> bool:
    """Whether the GELUs ``acts`` may run in place on the fresh convolution outputs: exact GELUs without hooks, and
    nothing for autograd to record (GELU's backward reads the input an in-place GELU overwrites)."""
    if not all(_is_exact_gelu(a) for a in acts) or has_hooks(*acts):
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def _gelu_(x: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten.gelu_(x)


class ChannelsLastPatchEmbed(_FastForm):
    """The patch embedding on its input in channels-last memory order (every convolution after it keeps it), its
    GELU in place."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        seq = self.seq
        if len(seq) == 3 and not has_hooks(seq) and _inplace_ok(seq[1], tensors=(x, *self.parameters())):
            return seq[2](_gelu_(seq[0](x)))
        return self.float_forward(x)


class FastMBConv(_FastForm):
    """The MBConv block with its GELUs in place on the convolutions' fresh outputs and the residual added in place:
    no new tensor per activation (at 256 x 256 x 256 a fresh output cost five times the GELU itself here, most of
    it the operating system handing over new pages)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _inplace_ok(self.act1, self.act2, self.act3, tensors=(x, *self.parameters())):
            return self.float_forward(x)
        y = self.conv3(_gelu_(self.conv2(_gelu_(self.conv1(x)))))
        return _gelu_(y.add_(x))


class FastPatchMerging(_FastForm):
    """Patch merging with its GELUs in place (see :class:`FastMBConv`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _inplace_ok(self.act, tensors=(x, *self.parameters())):
            return self.float_forward(x)
        if x.dim() == 3:  # tokens (B, H*W, C) from a TinyViT stage
            H, W = self.resolution
            x = x.view(x.shape[0], H, W, -1).permute(0, 3, 1, 2)
        x = self.conv3(_gelu_(self.conv2(_gelu_(self.conv1(x)))))
        return x.flatten(2).transpose(1, 2)


class FastTinyViTAttention(_FastForm):
    """TinyViT's window attention (``attend(qkv(norm(x)))``) through the fused attention kernel; with an int8
    ``qkv``, the LayerNorm fused into its input quantization."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = _tinyvit_qkv(self, x, x.dtype)
        B, N, C = qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3
        q, k, v = qkv.view(B, N, self.num_heads, 3, self.head_dim).permute(3, 0, 2, 1, 4).unbind(0)
        bias = self.bias().to(q.dtype).unsqueeze(0)  # (1, heads, N, N): the fused kernel's form
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class FastTinyViTBlock(_FastForm):
    """A TinyViT block with its window attention through the C++ kernel (CPU) and its MLP's GELU and residual add in
    the linears' epilogues (float32, CPU) or in place on their fresh outputs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = self.resolution
        B, L, C = x.shape
        y = self._kernel_attention(x)
        x = x + self._windowed_attention(x) if y is None else y
        # the tokens as a channels-last image whose batch stride is H * W * C (transpose + reshape gives an equal view
        # whose batch stride oneDNN reads as "not channels-last" at B = 1: it then reorders in and writes NCHW, and the
        # tokens come back strided, to be copied by each LayerNorm after)
        x = self.local_conv(x.reshape(B, H, W, C).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).reshape(B, L, C)
        m = self.mlp
        if type(m) is TinyViTMlp and _inplace_ok(m.act, tensors=(x, *m.parameters())) \
                and not has_hooks(m, m.fc1, m.fc2):
            y = mlp_layers_fused(m.fc1, m.act, m.fc2, m.norm(x), x)  # (SAM's blocks' MLP path)
            if y is not None:
                return y
        return x + m(x)

    def _kernel_attention(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """x plus the block's window attention and projection, the attention through the C++ kernel (the tokens'
        qkv read in place: no padded copy, no partition), or None where it does not apply: not a CPU tensor in a
        dtype it takes, autograd recording, hooks on the attention (its forward is not called), windows over 64
        tokens a side, the extension absent. An int8 model runs the attention in bf16 where the CPU policy's
        ``int8_attention_bf16`` asks for it."""
        attn = self.attn
        if type(attn) is not FastTinyViTAttention or has_hooks(attn) or x.device.type != "cpu" \
                or self.window_size > 64 or x.dtype not in FUSED_DTYPES or compute_dtype(x.dtype) != x.dtype \
                or not fused_ok(x, *attn.parameters()) or not fused_bias_kernel():
            return None
        H, W = self.resolution
        B, L, C = x.shape
        ws = self.window_size
        dtype = x.dtype
        int8 = type(attn.qkv) is Int8Linear and type(attn.proj) is Int8Linear
        if int8 and dtype == torch.float32 and cpu_policy.policy().int8_attention_bf16 \
                and compute_dtype(torch.bfloat16) == torch.bfloat16:
            dtype = torch.bfloat16
        pad_kv = None
        if H % ws or W % ws:  # a padded token is zeros before the norm: its k and v are the qkv of norm(0)
            zero = _tinyvit_qkv(attn, x.new_zeros(1, 1, C), dtype).reshape(attn.num_heads, 3, attn.head_dim)
            pad_kv = (zero[:, 1], zero[:, 2])
        qkv = _tinyvit_qkv(attn, x, dtype).view(B, H, W, 3 * C)
        out = window_bias_attention(qkv, attn.num_heads, ws, attn.bias().float(), pad_kv, attn.scale, backend="cpu")
        return _project(attn, out.view(B, L, C), x)  # (SAM's blocks' projection: residual fused or in place)



#: the fast form of each TinyViT class (sam_fast.models.tinyvit); containers after the modules inside them, since a
#: fast form copies its original's submodule table when it is made
FAST_TINYVIT_MODULES = ((Conv2dBN, FoldedConv2dBN), (TinyViTAttention, FastTinyViTAttention),
                        (TinyViTBlock, FastTinyViTBlock), (PatchEmbed, ChannelsLastPatchEmbed), (MBConv, FastMBConv),
                        (PatchMerging, FastPatchMerging))


def tinyvit_fast_modules(model: nn.Module):
    """(parent, name, module, fast class) of every TinyViT module of ``model`` that has a fast form and is not one
    already, leaves before the containers holding them."""
    found = []
    for cls, fast in FAST_TINYVIT_MODULES:
        for parent in list(model.modules()):
            for name, child in list(parent._modules.items()):
                if type(child) is cls:
                    found.append((parent, name, child, fast))
    return found
