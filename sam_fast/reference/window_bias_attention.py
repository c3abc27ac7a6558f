"""Reference of ``sam_fast::window_bias_attention``: TinyViT's window attention (its qkv channel order, a dense
per-head bias over each window, the grid padded to whole windows) in plain PyTorch."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def window_bias_attention(qkv: torch.Tensor, heads: int, window: int, bias: torch.Tensor,
                          pad_k: Optional[torch.Tensor] = None, pad_v: Optional[torch.Tensor] = None,
                          scale: Optional[float] = None) -> torch.Tensor:
    """qkv (B, Hg, Wg, 3 * heads * D), each token's channels in TinyViT's (heads, 3, D) order -> (B, Hg, Wg,
    heads * D) in qkv's dtype: softmax(scale * q k^T + bias[head]) v over (window x window) windows of the grid
    padded to whole windows, where a padded token's k and v are ``pad_k`` / ``pad_v`` (heads, D) (zeros when None).
    ``bias`` (heads, window^2, window^2): row = the query's place in its window, column the key's. ``scale``:
    ``D ** -0.5`` when None."""
    B, Hg, Wg, C3 = qkv.shape
    C = C3 // 3
    D = C // heads
    x = qkv
    ph, pw = -Hg % window, -Wg % window
    if ph or pw:
        kv = [x.new_zeros(heads, D) if p is None else p.reshape(heads, D).to(x.dtype) for p in (pad_k, pad_v)]
        fill = torch.stack([x.new_zeros(heads, D), *kv], dim=1).reshape(C3)  # (heads, 3, D) order
        x = torch.cat([x, fill.expand(B, ph, Wg, C3)], dim=1)
        x = torch.cat([x, fill.expand(B, Hg + ph, pw, C3)], dim=2)
    nh, nw = (Hg + ph) // window, (Wg + pw) // window
    L = window * window
    x = x.reshape(B, nh, window, nw, window, C3).permute(0, 1, 3, 2, 4, 5).reshape(B * nh * nw, L, C3)
    q, k, v = x.reshape(-1, L, heads, 3, D).permute(3, 0, 2, 1, 4).unbind(0)  # (n, heads, L, D)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype).unsqueeze(0), scale=scale)
    out = out.transpose(1, 2).reshape(B, nh, nw, window, window, C).permute(0, 1, 3, 2, 4, 5)
    return out.reshape(B, nh * window, nw * window, C)[:, :Hg, :Wg].reshape(B, Hg, Wg, C)
