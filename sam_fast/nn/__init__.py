"""nn.Module drop-ins built on sam_fast ops."""

from .attention import DilatedAttention, SamFastBlock, sam_attention
from .decoder import BatchedMaskDecoder
from .hiera import FastHieraBlock
from .quantized import Int8Linear

__all__ = ["BatchedMaskDecoder", "DilatedAttention", "FastHieraBlock", "Int8Linear", "SamFastBlock", "sam_attention"]
