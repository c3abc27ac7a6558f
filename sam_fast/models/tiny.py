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
    so window padding and the bias are exercised), all drawn from ``seed``: the same model in every process,
    whatever the caller's random state (which is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # segment_anything's layers draw their initial weights from the global generator
        return _random_encoder(img_size, patch_size, embed_dim, depth, num_heads, window_size, global_attn_indexes,
                               out_chans, seed)


def _random_encoder(img_size, patch_size, embed_dim, depth, num_heads, window_size, global_attn_indexes, out_chans,
                    seed) -> nn.Module:
    """:func:`tiny_image_encoder`'s model, its layers' initial weights drawn from the global generator as it is."""
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


def sam_around(encoder: nn.Module, img_size: int, dim: int, heads: int, mlp_dim: int, iou_hidden: int,
                patch_size: int = 16) -> nn.Module:
    """segment_anything's ``Sam`` with its real PromptEncoder / MaskDecoder classes at width ``dim``
    around ``encoder`` (the image embedding is img_size / patch_size on a side)."""
    from segment_anything.modeling import MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    side = img_size // patch_size
    return Sam(
        image_encoder=encoder,
        prompt_encoder=PromptEncoder(embed_dim=dim, image_embedding_size=(side, side),
                                     input_image_size=(img_size, img_size), mask_in_chans=16),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=dim, mlp_dim=mlp_dim, num_heads=heads),
            transformer_dim=dim,
            iou_head_depth=3,
            iou_head_hidden_dim=iou_hidden,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )


def tiny_sam(
    img_size: int = 256,
    encoder_dim: int = 64,
    decoder_dim: int = 32,
    decoder_heads: int = 2,
    decoder_mlp_dim: int = 64,
    logit_scale: float = 40.0,
    seed: int = 0,
    encoder_heads: int = 2,
) -> nn.Module:
    """A whole segment_anything ``Sam`` with random weights: a tiny ViT encoder (patch 16, so the image
    embedding is img_size / 16 on a side; ``encoder_heads`` heads), the real ``PromptEncoder`` and
    ``MaskDecoder`` classes at width ``decoder_dim`` (SAM: 256, 8 heads, MLP 2048). Low-resolution masks are
    img_size / 4."""
    torch.manual_seed(seed)  # the encoder, then the decoder, from one seeded stream
    encoder = _random_encoder(img_size, 16, encoder_dim, 4, encoder_heads, 3, (1, 3), decoder_dim, seed)
    sam = sam_around(encoder, img_size, decoder_dim, decoder_heads, decoder_mlp_dim, decoder_mlp_dim)
    with torch.no_grad():
        # A trained SAM's mask logits span about +-10; random ones would hug 0. Scale the
        # hypernetworks' last layer so thresholds and stability offsets mean something.
        for mlp in sam.mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.mul_(logit_scale)
    return sam.eval()


def sam_decoder(seed: int = 0) -> nn.Module:
    """segment_anything's real prompt encoder + mask decoder shapes (the same for ViT-B/L/H: width 256,
    8 heads, MLP 2048, 64 x 64 image embedding of a 1024 input) on a tiny encoder, random weights.
    For decoder benchmarks, where the encoder is not what is measured."""
    torch.manual_seed(seed)
    encoder = _random_encoder(1024, 16, 64, 2, 2, 8, (1,), 256, seed)
    return sam_around(encoder, 1024, 256, 8, 2048, 256).eval()
