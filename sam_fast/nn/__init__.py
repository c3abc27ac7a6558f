"""nn.Module drop-ins built on sam_fast ops."""

from .attention import DilatedAttention, SamFastBlock, is_sam_vit_block, sam_attention

__all__ = ["DilatedAttention", "SamFastBlock", "is_sam_vit_block", "sam_attention"]
