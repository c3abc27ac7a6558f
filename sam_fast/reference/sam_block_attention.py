"""Reference of ``sam_fast::sam_block_attention``: segment_anything's block attention (window partition, the
decomposed rel-pos bias, un-partition) read from a block's qkv tensor, in plain PyTorch. It is also the path tiny
blocks take on the CPU (``SDPA`` with the bias as its mask is the fastest way through a few hundred tokens)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .decomposed_bias import decomposed_bias


def _rel_table(table: torch.Tensor, size: int, dtype) -> torch.Tensor:
    """(size, size, D): ``table[i - j + size - 1]`` for query index i, key index j."""
    pos = torch.arange(size, device=table.device)
    return table.to(dtype)[pos[:, None] - pos[None, :] + size - 1]


def sam_block_attention(qkv: torch.Tensor, heads: int, window: int, rel_pos_h: Optional[torch.Tensor],
                        rel_pos_w: Optional[torch.Tensor], qkv_bias: Optional[torch.Tensor] = None,
                        pad_k: Optional[torch.Tensor] = None, pad_v: Optional[torch.Tensor] = None,
                        scale: Optional[float] = None) -> torch.Tensor:
    """qkv (B, Hg, Wg, 3 * heads * D) -> (B, Hg, Wg, heads * D) in qkv's dtype.

    ``window`` 0: global attention over the grid; otherwise (window x window) windows over the grid padded to whole
    windows, where a padded token's k and v are ``pad_k`` / ``pad_v`` (heads, D) (zeros when None: the qkv of a
    zero token without a bias). ``rel_pos_h`` / ``rel_pos_w`` span ``2 * segment - 1`` offsets (segment: the window,
    or the grid's height / width); None: no bias. ``qkv_bias`` (3 * heads * D,) is added to qkv first. ``scale``:
    ``D ** -0.5`` when None.
    """
    B, Hg, Wg, C3 = qkv.shape
    C = C3 // 3
    D = C // heads
    x = qkv if qkv_bias is None else qkv + qkv_bias.to(qkv.dtype)
    if window > 0:
        h = w = window
        ph, pw = -Hg % window, -Wg % window
        if ph or pw:
            kv = [x.new_zeros(C) if p is None else p.reshape(C).to(x.dtype) for p in (pad_k, pad_v)]
            fill = torch.cat([x.new_zeros(C)] + kv)
            x = torch.cat([x, fill.expand(B, ph, Wg, C3)], dim=1)
            x = torch.cat([x, fill.expand(B, Hg + ph, pw, C3)], dim=2)
        nh, nw = (Hg + ph) // window, (Wg + pw) // window
        x = x.reshape(B, nh, window, nw, window, C3).permute(0, 1, 3, 2, 4, 5).reshape(B * nh * nw, h * w, C3)
    else:
        h, w = Hg, Wg
        x = x.reshape(B, h * w, C3)
    n = x.shape[0]
    q, k, v = x.reshape(n, h * w, 3, heads, D).permute(2, 0, 3, 1, 4).unbind(0)  # (n, heads, L, D)
    mask = None
    if rel_pos_h is not None:
        q5 = q.reshape(n, heads, h, w, D)
        rel_h = torch.einsum("nhyxd,ykd->nhyxk", q5, _rel_table(rel_pos_h, h, q.dtype)).reshape(n, heads, h * w, h)
        rel_w = torch.einsum("nhyxd,xkd->nhyxk", q5, _rel_table(rel_pos_w, w, q.dtype)).reshape(n, heads, h * w, w)
        mask = decomposed_bias(rel_h, rel_w)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    out = out.transpose(1, 2).reshape(n, h, w, C)
    if window > 0:
        out = out.reshape(B, nh, nw, window, window, C).permute(0, 1, 3, 2, 4, 5)
        out = out.reshape(B, nh * window, nw * window, C)[:, :Hg, :Wg]
    return out.reshape(B, Hg, Wg, C)
