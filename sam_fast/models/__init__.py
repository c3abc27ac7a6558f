"""Model builders and checkpoint loaders."""

from .tiny import tiny_image_encoder

__all__ = ["tiny_image_encoder"]
