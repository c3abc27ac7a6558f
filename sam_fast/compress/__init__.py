"""Compressing a SAM image encoder: structured pruning to smaller widths (:mod:`~.prune`), with channels ranked by
magnitude or by SlimSAM's disturbed Taylor importance on images (:mod:`~.importance`)."""

from .importance import taylor_scores
from .prune import channel_groups, group_totals, magnitude_scores, prune_to_widths

__all__ = ["channel_groups", "group_totals", "magnitude_scores", "prune_to_widths", "taylor_scores"]
