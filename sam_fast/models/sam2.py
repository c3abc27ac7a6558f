"""SAM 2.1's image encoders as Meta's ``sam2`` package builds them (its Hiera trunk and FPN neck), from the released
configurations, with random weights: what benchmarks and tests time and check ``sam_fast.apply`` against. Building
needs the ``sam2`` package (``pip install sam_fast[sam2]``; it is an sdist: ``SAM2_BUILD_CUDA=0`` skips its optional
CUDA extension)."""

from __future__ import annotations

from typing import Dict

import torch
from torch import nn

#: the Hiera trunks of SAM 2.1's released image encoders (its configs' ``trunk`` entries; Hiera's defaults otherwise:
#: windows 8, 4, 14, 7, queries pooled 2 x 2 at each stage change); all take 1024 px images
HIERA_CONFIGS: Dict[str, dict] = {
    "hiera_t": dict(embed_dim=96, num_heads=1, stages=(1, 2, 7, 2), global_att_blocks=(5, 7, 9),
                    window_pos_embed_bkg_spatial_size=(7, 7)),
    "hiera_s": dict(embed_dim=96, num_heads=1, stages=(1, 2, 11, 2), global_att_blocks=(7, 10, 13),
                    window_pos_embed_bkg_spatial_size=(7, 7)),
    "hiera_b+": dict(embed_dim=112, num_heads=2),
    "hiera_l": dict(embed_dim=144, num_heads=2, stages=(2, 6, 36, 4), global_att_blocks=(23, 33, 43),
                    window_pos_embed_bkg_spatial_size=(7, 7), window_spec=(8, 4, 16, 8)),
}


def sam2_available() -> bool:
    """Whether Meta's ``sam2`` package can be imported."""
    try:
        import sam2.modeling.backbones.hieradet  # noqa: F401
    except ImportError:
        return False
    return True


def build_sam2_image_encoder(name: str, seed: int = 0) -> nn.Module:
    """SAM 2.1's image encoder ``name`` (a key of :data:`HIERA_CONFIGS`) as Meta's ``ImageEncoder``: the Hiera trunk
    and the FPN neck (256 channels, sine position encodings, nearest-neighbour top-down sums into the two finest
    levels, the coarsest level dropped), in eval mode, with random weights seeded by ``seed``: layers as PyTorch
    initialises them, the position embeddings N(0, 0.2) (SAM 2 initialises them to zero, which would hide them)."""
    if name not in HIERA_CONFIGS:
        raise ValueError(f"name must be one of {sorted(HIERA_CONFIGS)}, got {name!r}")
    try:
        from sam2.modeling.backbones.hieradet import Hiera
        from sam2.modeling.backbones.image_encoder import FpnNeck, ImageEncoder
        from sam2.modeling.position_encoding import PositionEmbeddingSine
    except ImportError as exc:
        raise ImportError("SAM 2's models need Meta's sam2 package: pip install 'sam_fast[sam2]' (with "
                          "SAM2_BUILD_CUDA=0 to skip its CUDA extension)") from exc
    torch.manual_seed(seed)
    trunk = Hiera(**HIERA_CONFIGS[name])
    neck = FpnNeck(PositionEmbeddingSine(num_pos_feats=256, normalize=True, temperature=10000), 256,
                   trunk.channel_list, fpn_top_down_levels=[2, 3], fpn_interp_model="nearest")
    encoder = ImageEncoder(trunk, neck, scalp=1)
    with torch.no_grad():
        for pname, p in encoder.named_parameters():
            if "pos_embed" in pname:
                p.normal_(0.0, 0.2)
    return encoder.eval()
