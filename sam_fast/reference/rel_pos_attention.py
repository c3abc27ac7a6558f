"""Reference of ``sam_fast::rel_pos_attention``: attention over segments with SAM's decomposed rel-pos bias added to
the logits, in plain PyTorch."""

from __future__ import annotations

from typing import Tuple

import torch

from .decomposed_bias import decomposed_bias


def rel_pos_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_h: torch.Tensor, rel_w: torch.Tensor,
                      scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """``softmax(scale * q k^T + rel_h[., key_y] + rel_w[., key_x]) v`` per segment and head.

    q (S, H, Lq, D), k, v (S, H, Lk, D), rel_h (S, H, Lq, ay), rel_w (S, H, Lq, ax) with ``ay * ax = Lk`` (key
    ``y * ax + x`` gets ``rel_h[..., y] + rel_w[..., x]``; -inf there masks the key). Returns out (S, Lq, H, D) in
    q's dtype and lse (S, H, Lq) in the bias' dtype; a row that sees no key gives out 0, lse -inf. The logits are
    q k^T in q's dtype, then the bias' dtype.
    """
    bias = decomposed_bias(rel_h, rel_w)
    logits = scale * (q @ k.transpose(-1, -2)).to(bias.dtype) + bias
    lse = torch.logsumexp(logits, dim=-1)
    p = torch.exp(logits - lse[..., None])
    p = torch.where(torch.isneginf(lse)[..., None], torch.zeros_like(p), p)  # rows that see no key
    return (p.to(v.dtype) @ v).transpose(1, 2), lse
