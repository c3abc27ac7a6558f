"""Model builders and checkpoint loaders."""

from .sam import MODEL_TYPES, build_sam, known_model_type, load_sam, released_geometry, save_sam
from .tiny import sam_decoder, tiny_image_encoder, tiny_sam
from .tinyvit import TinyViT, build_vit_t, tinyvit_config
from .transformers_format import save_transformers
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
           "build_sam", "build_sam_from_geometry", "build_vit_t", "encoder_geometry", "known_model_type", "load_sam",
           "released_geometry", "sam_decoder", "save_sam", "save_transformers", "slimsam_uniform_geometry",
           "tiny_image_encoder", "tiny_sam", "tinyvit_config"]
