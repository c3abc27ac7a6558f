"""nn.Module drop-ins for segment_anything's ViT blocks, built on :func:`sam_fast.dilated_attention`.

:class:`SamFastBlock` wraps an ``image_encoder.Block`` *sharing its submodules* (``norm1``, ``attn``,
``norm2``, ``mlp``), so parameter names, state_dict keys and optimizer state are unchanged. Its forward
is segment_anything's, except attention: global blocks run dense fused attention over the (Hg, Wg)
grid; window blocks run the 2-D window pattern directly on the unpadded grid, with SAM's zero-token
padding reproduced by virtual keys whose k, v are the qkv bias (``pad_kv``) - no pad, partition or
unpartition copies.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from ..ops.attention import dilated_attention
from ..ops.relpos import resize_rel_pos
from ..pattern import Branch


def _rel_table(table: torch.Tensor, size: int) -> torch.Tensor:
    """segment_anything's get_rel_pos resize: the table must span 2 * size - 1 offsets."""
    need = 2 * size - 1
    return table if table.shape[0] == need else resize_rel_pos(table, need)


def sam_attention(attn: nn.Module, x: torch.Tensor, window_size: int = 0, backend: str = "auto") -> torch.Tensor:
    """segment_anything ``Attention`` (with its Block's window partition when ``window_size > 0``)
    on x (B, Hg, Wg, C) through the fused kernel. Returns (B, Hg, Wg, C_out of attn.proj)."""
    B, Hg, Wg, _ = x.shape
    heads = attn.num_heads
    qkv = attn.qkv(x).reshape(B, Hg * Wg, 3, heads, -1)
    q, k, v = qkv.unbind(2)  # (B, N, heads, head_dim) views; last dim contiguous
    head_dim = q.shape[-1]
    pattern = None
    pad_kv = None
    size_h, size_w = Hg, Wg
    if window_size > 0:
        pattern = Branch((window_size, window_size))
        size_h = size_w = window_size
        if Hg % window_size or Wg % window_size:
            if attn.qkv.bias is not None:
                bias = attn.qkv.bias.view(3, heads, head_dim).to(q.dtype)
                pad_kv = (bias[1], bias[2])
            else:
                zero = q.new_zeros(heads, head_dim)
                pad_kv = (zero, zero)
    rel_h = rel_w = None
    if getattr(attn, "use_rel_pos", False):
        rel_h = _rel_table(attn.rel_pos_h, size_h)
        rel_w = _rel_table(attn.rel_pos_w, size_w)
    out = dilated_attention(q, k, v, pattern, grid=(Hg, Wg), rel_pos_h=rel_h, rel_pos_w=rel_w,
                            softmax_scale=attn.scale, backend=backend, pad_kv=pad_kv)
    return attn.proj(out.reshape(B, Hg, Wg, heads * head_dim))


class SamFastBlock(nn.Module):
    """segment_anything ViT ``Block`` with fused attention; shares the wrapped block's submodules."""

    def __init__(self, block: nn.Module, backend: str = "auto"):
        super().__init__()
        self.norm1 = block.norm1
        self.attn = block.attn
        self.norm2 = block.norm2
        self.mlp = block.mlp
        self.window_size = int(block.window_size)
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + sam_attention(self.attn, self.norm1(x), self.window_size, self.backend)
        return x + self.mlp(self.norm2(x))

    def extra_repr(self) -> str:
        return f"window_size={self.window_size}, backend={self.backend!r}"


def is_sam_vit_block(m: nn.Module) -> bool:
    """Whether ``m`` is structured like segment_anything's image-encoder Block (by attributes and
    submodule types, not by class name): norm1, attn with Linear qkv/proj and num_heads, norm2, mlp,
    integer window_size, and qkv width divisible into 3 * num_heads heads."""
    attn = getattr(m, "attn", None)
    if attn is None or isinstance(m, SamFastBlock):
        return False
    if not all(isinstance(getattr(m, n, None), nn.Module) for n in ("norm1", "norm2", "mlp")):
        return False
    if not isinstance(getattr(m, "window_size", None), int):
        return False
    qkv, proj, heads = getattr(attn, "qkv", None), getattr(attn, "proj", None), getattr(attn, "num_heads", None)
    if not (isinstance(qkv, nn.Linear) and isinstance(proj, nn.Linear) and isinstance(heads, int) and heads > 0):
        return False
    if qkv.out_features % (3 * heads) != 0 or not hasattr(attn, "scale"):
        return False
    return proj.in_features == qkv.out_features // 3
