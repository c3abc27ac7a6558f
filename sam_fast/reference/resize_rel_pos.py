"""Reference of ``sam_fast.resize_rel_pos``: segment_anything's ``get_rel_pos`` resize of a relative-position
table, ``F.interpolate(mode="linear")``."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def resize_rel_pos(rel_pos: torch.Tensor, length: int) -> torch.Tensor:
    """(L, C) -> (length, C), exactly segment_anything's resize."""
    L = rel_pos.shape[0]
    return F.interpolate(rel_pos.reshape(1, L, -1).permute(0, 2, 1), size=length, mode="linear").reshape(
        -1, length).permute(1, 0)
