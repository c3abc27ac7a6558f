"""Compressing a SAM image encoder: structured pruning to smaller widths (:mod:`~.prune`), with channels ranked by
magnitude or by SlimSAM's disturbed Taylor importance on images (:mod:`~.importance`), and DC-ViT-style removal of
the attention of the blocks that need it least (:mod:`~.blocks`)."""

from .blocks import attention_removal_sqnr, drop_attention
from .importance import taylor_scores
from .prune import MODES, channel_groups, group_totals, magnitude_scores, plan_widths, prune_to_widths

__all__ = ["MODES", "attention_removal_sqnr", "channel_groups", "drop_attention", "group_totals", "magnitude_scores",
           "plan_widths", "prune_to_widths", "taylor_scores"]
