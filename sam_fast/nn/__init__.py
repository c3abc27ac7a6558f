"""nn.Module drop-ins built on sam_fast ops."""

from .attention import DilatedAttention, SamFastBlock, is_sam_vit_block, sam_attention
from .quantized import Int8Linear

__all__ = ["DilatedAttention", "Int8Linear", "SamFastBlock", "is_sam_vit_block", "sam_attention"]
