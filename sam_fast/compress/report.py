"""What a compressed encoder costs and how close it stays: parameters, multiply-accumulates, and (through
:func:`sam_fast.distill.evaluate`) the embedding SQNR and point / box mask mIoU against the original model.

MACs are counted, not estimated: torch's ``FlopCounterMode`` watches one image go through a copy of the encoder built
on the ``meta`` device from the encoder's geometry, so nothing is computed and no weight is copied; every matmul,
convolution and attention product is counted (a multiply-accumulate is two FLOPs).
"""

from __future__ import annotations

from typing import Dict

import torch
from torch import nn

from ..models.vit import build_image_encoder
from ..surgery import find_encoder
from .prune import geometry


def encoder_params(model: nn.Module) -> int:
    """Parameters of ``model``'s image encoder (``model``: a ``Sam`` or the encoder)."""
    enc, _, _ = find_encoder(model)
    return sum(p.numel() for p in enc.parameters())


def encoder_macs(model: nn.Module) -> int:
    """Multiply-accumulates of one image (at the encoder's ``img_size``) through ``model``'s image encoder, a
    segment_anything ViT encoder, pruned or with attention removed from some blocks (module docstring)."""
    from torch.utils.flop_counter import FlopCounterMode

    enc, _, _ = find_encoder(model)
    geom = geometry(enc)
    counter = FlopCounterMode(display=False)
    with torch.device("meta"):  # (also for what the forward creates: a decomposition's constants)
        ghost = build_image_encoder(geom).eval()
        with counter, torch.no_grad():
            ghost(torch.empty(1, 3, geom.img_size, geom.img_size))
    return int(counter.get_total_flops()) // 2


def closeness(student: nn.Module, teacher: nn.Module, images, *, prompts_per_image: int,
              device=None) -> Dict[str, float]:
    """``{"sqnr_db", "points", "boxes"}``: the embedding SQNR and point / box mask mIoU of ``student`` against
    ``teacher`` on ``images`` (files or HxWx3 arrays), as :func:`sam_fast.distill.evaluate` scores them."""
    from ..distill.evaluate import evaluate

    r = evaluate(student, teacher, images, prompts_per_image=prompts_per_image, device=device, progress=False,
                 timing=False)
    return {"sqnr_db": r.sqnr_db, "points": r.miou["points"], "boxes": r.miou["boxes"]}


__all__ = ["closeness", "encoder_macs", "encoder_params"]
