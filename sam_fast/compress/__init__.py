"""Compressing a SAM image encoder: structured pruning to smaller widths (:mod:`~.prune`)."""

from .prune import channel_groups, magnitude_scores, prune_to_widths

__all__ = ["channel_groups", "magnitude_scores", "prune_to_widths"]
