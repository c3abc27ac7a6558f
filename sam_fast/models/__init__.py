"""Model builders and checkpoint loaders."""

from .tiny import sam_decoder, tiny_image_encoder, tiny_sam

__all__ = ["sam_decoder", "tiny_image_encoder", "tiny_sam"]
