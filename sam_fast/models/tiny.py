"""Small randomly initialised segment_anything models for tests, examples and CPU benchmarks.

No weights can be downloaded in CI, so tests build these; their modules are the real
segment_anything classes and their state_dict keys the official ones.
"""

from __future__ import annotations

from functools import partial
from typing import Sequence

import torch
from torch import nn


def tiny_image_encoder(
    img_size: int = 128,
    patch_size: int = 16,
    embed_dim: int = 64,
    depth: int = 4,
    num_heads: int = 2,
    window_size: int = 3,
    global_attn_indexes: Sequence[int] = (1, 3),
    out_chans: int = 32,
    seed: int = 0,
) -> nn.Module:
    """A segment_anything ``ImageEncoderViT`` with random weights (rel-pos tables and qkv bias nonzero,
    so window padding and the bias are exercised)."""
    from segment_anything.modeling import ImageEncoderViT

    gen = torch.Generator().manual_seed(seed)
    enc = ImageEncoderViT(
        img_size=img_size,
        patch_size=patch_size,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=4.0,
        out_chans=out_chans,
        qkv_bias=True,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        use_abs_pos=True,
        use_rel_pos=True,
        rel_pos_zero_init=False,
        window_size=window_size,
        global_attn_indexes=tuple(global_attn_indexes),
    )
    with torch.no_grad():
        for name, p in enc.named_parameters():
            if "rel_pos" in name or name.endswith("bias") or "pos_embed" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return enc.eval()
