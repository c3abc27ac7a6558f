"""Reference of ``sam_fast::hiera_attention``: SAM 2's Hiera attention (no bias; windows over the grid padded to whole
windows, or the whole grid; each window's queries optionally max-pooled) in plain PyTorch, differentiable."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def hiera_attention(qkv: torch.Tensor, heads: int, window: int, q_stride: int = 1,
                    qkv_bias: Optional[torch.Tensor] = None, pad_k: Optional[torch.Tensor] = None,
                    pad_v: Optional[torch.Tensor] = None, scale: Optional[float] = None) -> torch.Tensor:
    """qkv (B, Hg, Wg, 3 * heads * D), each token's channels in (3, heads, D) order (plus ``qkv_bias`` (3 * heads *
    D,) where given) -> (B, Hg // s, Wg // s, heads * D) in qkv's dtype, s = ``q_stride``: softmax(scale * q k^T) v
    over (window x window) windows of the grid padded to whole windows (``window`` 0: the whole grid), where a
    padded token's k and v are ``pad_k`` / ``pad_v`` (heads, D) (zeros when None). With s > 1 each window's queries
    are the s x s max-pools of its cells (the window a multiple of s), placed on the pooled grid, and pooled cells
    past ``Hg // s`` / ``Wg // s`` are dropped. ``scale``: ``D ** -0.5`` when None."""
    B, Hg, Wg, C3 = qkv.shape
    C = C3 // 3
    D = C // heads
    x = qkv if qkv_bias is None else qkv + qkv_bias.to(qkv.dtype)
    sh, sw = (window, window) if window > 0 else (Hg, Wg)
    ph, pw = -Hg % sh, -Wg % sw
    if ph or pw:
        kv = [x.new_zeros(heads, D) if p is None else p.reshape(heads, D).to(x.dtype) for p in (pad_k, pad_v)]
        fill = torch.stack([x.new_zeros(heads, D), *kv]).reshape(C3)  # (3, heads, D) order; padded q never read
        x = torch.cat([x, fill.expand(B, ph, Wg, C3)], dim=1)
        x = torch.cat([x, fill.expand(B, Hg + ph, pw, C3)], dim=2)
    nh, nw = (Hg + ph) // sh, (Wg + pw) // sw
    x = x.reshape(B, nh, sh, nw, sw, C3).permute(0, 1, 3, 2, 4, 5).reshape(B * nh * nw, sh, sw, 3, heads, D)
    q, k, v = x.unbind(3)  # (n, sh, sw, heads, D)
    qh, qw = sh // q_stride, sw // q_stride
    if q_stride > 1:
        q = F.max_pool2d(q.reshape(-1, sh, sw, C).permute(0, 3, 1, 2), q_stride, q_stride).permute(0, 2, 3, 1)
    q = q.reshape(-1, qh * qw, heads, D).transpose(1, 2)
    k, v = (t.reshape(-1, sh * sw, heads, D).transpose(1, 2) for t in (k, v))
    out = F.scaled_dot_product_attention(q, k, v, scale=scale)  # (n, heads, qh * qw, D)
    out = out.transpose(1, 2).reshape(B, nh, nw, qh, qw, C).permute(0, 1, 3, 2, 4, 5)
    return out.reshape(B, nh * qh, nw * qw, C)[:, :Hg // q_stride, :Wg // q_stride].contiguous()
