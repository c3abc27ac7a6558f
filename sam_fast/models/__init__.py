"""Model builders and checkpoint loaders."""

from .sam import MODEL_TYPES, build_sam, load_sam
from .tiny import sam_decoder, tiny_image_encoder, tiny_sam

__all__ = ["MODEL_TYPES", "build_sam", "load_sam", "sam_decoder", "tiny_image_encoder", "tiny_sam"]
