"""nn.Module drop-ins built on sam_fast ops."""

from .attention import DilatedAttention, SamFastBlock, is_sam_vit_block, sam_attention
from .decoder import BatchedMaskDecoder
from .quantized import Int8Linear

__all__ = ["BatchedMaskDecoder", "DilatedAttention", "Int8Linear", "SamFastBlock", "is_sam_vit_block", "sam_attention"]
