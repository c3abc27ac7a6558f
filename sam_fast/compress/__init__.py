"""Compressing a SAM image encoder: structured pruning to smaller widths (:mod:`~.prune`), with channels ranked by
magnitude or by SlimSAM's disturbed Taylor importance on images (:mod:`~.importance`), and DC-ViT-style removal of
the attention of the blocks that need it least (:mod:`~.blocks`); ``prune`` runs them in stages, SlimSAM's
alternate slimming, each recovered by distillation (:mod:`~.slim`) and reported in parameters, MACs, embedding SQNR
and mask mIoU (:mod:`~.report`)."""

from .blocks import attention_removal_sqnr, drop_attention
from .importance import taylor_scores
from .prune import MODES, channel_groups, group_totals, magnitude_scores, plan_widths, prune_to_widths, target_widths
from .report import encoder_macs, encoder_params
from .slim import IMPORTANCE, STAGES, PruneResult, prune

__all__ = ["IMPORTANCE", "MODES", "PruneResult", "STAGES", "attention_removal_sqnr", "channel_groups",
           "drop_attention", "encoder_macs", "encoder_params", "group_totals", "magnitude_scores", "plan_widths",
           "prune", "prune_to_widths", "target_widths", "taylor_scores"]
