"""Model builders and the checkpoint formats' key maps. Loading and saving checkpoints is
:mod:`sam_fast.checkpoint` (``sam_fast.load_sam``, ``sam_fast.save_sam``, ``sam_fast.save_transformers``)."""

import warnings as _warnings

from .sam import MODEL_TYPES, build_sam, known_model_type, released_geometry
from .tiny import sam_decoder, tiny_image_encoder, tiny_sam
from .tinyvit import TinyViT, build_vit_t, tinyvit_config
from .vit import (
                  BlockGeometry,
                  EncoderGeometry,
                  MlpBlock,
                  build_image_encoder,
                  build_sam_from_geometry,
                  encoder_geometry,
                  slimsam_uniform_geometry,
)

__all__ = ["BlockGeometry", "EncoderGeometry", "MODEL_TYPES", "MlpBlock", "TinyViT", "build_image_encoder",
           "build_sam", "build_sam_from_geometry", "build_vit_t", "encoder_geometry", "known_model_type",
           "released_geometry", "sam_decoder", "slimsam_uniform_geometry", "tiny_image_encoder", "tiny_sam",
           "tinyvit_config"]

_MOVED = ("load_sam", "save_sam", "save_transformers")


def __getattr__(name):
    # the checkpoint functions moved up to sam_fast.checkpoint (they apply patterns: the layer above this one); the
    # old names keep working, with a DeprecationWarning saying where they are now
    if name in _MOVED:
        _warnings.warn(f"sam_fast.models.{name} moved: use sam_fast.{name} (sam_fast.checkpoint.{name})",
                       DeprecationWarning, stacklevel=2)
        from .. import checkpoint

        return getattr(checkpoint, name)
    raise AttributeError(f"module 'sam_fast.models' has no attribute {name!r}")
