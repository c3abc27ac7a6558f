"""Building SAM-family models by type or from a checkpoint's geometry (loading and saving checkpoints is
:mod:`sam_fast.checkpoint`).

Model types: segment_anything's ``vit_b`` / ``vit_l`` / ``vit_h``, SlimSAM's uniform ``slimsam_50`` /
``slimsam_77``, MobileSAM's and TinySAM's TinyViT ``vit_t``, the test models' ``tiny``, and ``auto``:
the image encoder's geometry is read from the checkpoint itself
(:func:`sam_fast.models.vit.encoder_geometry`, :func:`sam_fast.models.tinyvit.tinyvit_config`),
which loads all of the above, SlimSAM's globally pruned encoders, whose blocks each have their own
head dim and MLP width, and DC-ViT's, whose compressed blocks have no attention.
"""

from __future__ import annotations

from typing import Optional

from .tinyvit import build_vit_t
from .vit import (
    SLIMSAM_UNIFORM,
    BlockGeometry,
    EncoderGeometry,
    build_sam_from_geometry,
    slimsam_uniform_geometry,
)

MODEL_TYPES = ("vit_b", "vit_l", "vit_h", "slimsam_50", "slimsam_77", "vit_t", "tiny", "auto")

# segment_anything's encoders: (embed dim, depth, heads, global blocks); window 14, MLP 4 x embed.
_SAM_VITS = {"vit_b": (768, 12, 12, (2, 5, 8, 11)), "vit_l": (1024, 24, 16, (5, 11, 17, 23)),
             "vit_h": (1280, 32, 16, (7, 15, 23, 31))}


def released_geometry(model_type: str) -> EncoderGeometry:
    """The image encoder geometry of a released checkpoint: ``vit_b`` / ``vit_l`` / ``vit_h`` /
    ``slimsam_50`` / ``slimsam_77`` (build it with :func:`sam_fast.models.build_image_encoder`)."""
    if model_type in SLIMSAM_UNIFORM:
        return slimsam_uniform_geometry(model_type)
    if model_type not in _SAM_VITS:
        raise ValueError(f"model_type must be one of {tuple(_SAM_VITS) + tuple(SLIMSAM_UNIFORM)}, got {model_type!r}")
    embed, depth, heads, glob = _SAM_VITS[model_type]
    blocks = tuple(BlockGeometry(heads, embed // heads, 4 * embed, 0 if i in glob else 14) for i in range(depth))
    return EncoderGeometry(img_size=1024, patch_size=16, embed_dim=embed, out_chans=256, blocks=blocks)


def known_model_type(geom: EncoderGeometry) -> Optional[str]:
    """The released model type whose image encoder has geometry ``geom`` (None: e.g. a globally pruned
    SlimSAM encoder, which only ``"auto"`` loads)."""
    for name in (*_SAM_VITS, *SLIMSAM_UNIFORM):
        if released_geometry(name) == geom:
            return name
    return None


def build_sam(model_type: str):
    """An uninitialised segment_anything ``Sam`` of ``model_type`` ("tiny": :func:`tiny_sam`'s geometry).
    ``"auto"`` has no geometry without a checkpoint: use :func:`load_sam`."""
    if model_type not in MODEL_TYPES or model_type == "auto":
        raise ValueError(f"model_type must be one of {MODEL_TYPES[:-1]}, got {model_type!r}"
                         + (" (auto needs a checkpoint: load_sam)" if model_type == "auto" else ""))
    if model_type == "tiny":
        from .tiny import tiny_sam

        return tiny_sam()
    if model_type in SLIMSAM_UNIFORM:
        return build_sam_from_geometry(slimsam_uniform_geometry(model_type))
    if model_type == "vit_t":
        return build_vit_t()
    from segment_anything import sam_model_registry

    return sam_model_registry[model_type](checkpoint=None)
