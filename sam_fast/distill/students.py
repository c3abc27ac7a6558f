"""Students: what may be distilled from what, and the dilated student.

* :func:`dilated_student` - a copy of the teacher whose chosen blocks run dilated attention (with the
  teacher's weights as the starting point); its pattern travels with it (``student.sam_fast_config``,
  and in the checkpoint :func:`sam_fast.save_sam` writes).
* any segment_anything ``Sam`` with a ViT encoder of the teacher's depth (a pruned one, SlimSAM's widths):
  all three methods; where widths differ, DLD compares block outputs through learned linear adapters
  (:class:`FeatureAdapters`, trained with the student and not part of it).
* any other encoder (TinyViT's ``vit_t``): ``method="embedding"`` or ``"full_stage"``, which only need
  the image embedding to have the teacher's shape.
"""

from __future__ import annotations

import copy
from typing import Dict, Optional

import torch
from torch import nn

from ..nn.attention import SamFastBlock
from ..pattern import check_pattern, check_pattern_covers
from ..surgery import encoder_blocks, sam_image_encoder, vit_blocks


def _block_width(block: nn.Module) -> int:
    """The residual width a block reads and writes (``norm2`` is in every kind: with attention or without)."""
    return int(block.norm2.normalized_shape[0])


def dilated_student(teacher: nn.Module, pattern, blocks="global", *, backend: str = "auto") -> nn.Module:
    """A copy of ``teacher`` (a segment_anything ``Sam``) whose ``blocks`` run dilated attention with
    ``pattern`` (as :class:`sam_fast.Dilated`); the teacher is not modified. The pattern is checked to tile
    every chosen block's token grid for all its heads. Returns the student with
    ``student.sam_fast_config`` set (what :func:`sam_fast.apply` applies by default)."""
    from ..patch import Dilated, SamFastConfig, apply

    enc = sam_image_encoder(teacher, "teacher")
    if isinstance(pattern, dict):
        for key, p in pattern.items():
            check_pattern(p, f"pattern[{key!r}]")
    else:
        check_pattern(pattern, "pattern")
    if isinstance(blocks, str) and blocks not in ("global", "all"):
        raise ValueError(f"blocks must be 'global', 'all' or a list of block indices, got {blocks!r}")
    config = SamFastConfig(attention=Dilated(pattern, blocks), backend=backend)
    found = vit_blocks(teacher)
    if not found:
        raise ValueError("teacher: no segment_anything ViT blocks to make dilated (a TinyViT encoder cannot take "
                         "a dilated pattern)")
    grid = (enc.img_size // enc.patch_embed.proj.kernel_size[0],) * 2
    chosen = {}
    for *_, block, index in found:
        pat = config.pattern_for(index, block)
        if pat is not None:
            check_pattern_covers(pat, grid, block.attn.num_heads,
                                 "pattern" if not isinstance(pattern, dict) else f"pattern[{index}]")
            chosen[index] = pat
    if isinstance(config.chosen_blocks(), (list, tuple)):
        missing = sorted(set(config.chosen_blocks()) - {index for *_, index in found})
        if missing:
            raise ValueError(f"blocks {missing} do not exist: the teacher's ViT blocks are "
                             f"{sorted(index for *_, index in found)}")
    if not chosen:
        raise ValueError(f"blocks={blocks!r} chose no block of the teacher (its global blocks: "
                         f"{[i for *_, b, i in found if int(b.window_size) == 0]})")
    student = copy.deepcopy(teacher)
    student.train(teacher.training)
    per_block = SamFastConfig(attention=Dilated(chosen), backend=backend)
    apply(student, per_block)
    student.sam_fast_config = per_block
    return student


def dilated_patterns(model: nn.Module) -> Dict[int, tuple]:
    """``{block index: pattern}`` of the model's blocks that run dilated attention now."""
    return {i: b.pattern for i, b in enumerate(encoder_blocks(model) or []) if isinstance(b, SamFastBlock)
            and b.pattern is not None}


class FeatureAdapters(nn.Module):
    """Linear maps from student block widths to the teacher's, one per distilled block whose widths differ
    (identity elsewhere). Initialised to the least-squares-free choice ``W = [I; 0]`` truncated / padded."""

    def __init__(self, student_widths: Dict[int, int], teacher_widths: Dict[int, int]):
        super().__init__()
        self.maps = nn.ModuleDict()
        for i, sw in student_widths.items():
            tw = teacher_widths[i]
            if sw != tw:
                lin = nn.Linear(sw, tw, bias=False)
                with torch.no_grad():
                    lin.weight.zero_()
                    k = min(sw, tw)
                    lin.weight[:k, :k] = torch.eye(k)
                self.maps[str(i)] = lin

    def forward(self, index: int, x: torch.Tensor) -> torch.Tensor:
        lin = self.maps[str(index)] if str(index) in self.maps else None
        return x if lin is None else lin(x)


def check_pair(teacher: nn.Module, student: nn.Module, method: str) -> Optional[FeatureAdapters]:
    """Errors naming ``student`` before any work when it cannot be distilled from ``teacher`` with ``method``;
    the DLD adapters when widths differ."""
    t_enc, s_enc = sam_image_encoder(teacher, "teacher"), sam_image_encoder(student, "student")
    if student is teacher:
        raise ValueError("student is the teacher itself: make a copy (e.g. sam_fast.distill.dilated_student)")
    from ..nn.quantized import Int8Linear

    if any(isinstance(m, Int8Linear) for m in student.modules()):
        raise ValueError("student has int8 layers (quantize='int8'), whose int8 weights cannot be trained: distill "
                         "the float model (undo() the int8 handle) and quantize the result")
    if int(t_enc.img_size) != int(s_enc.img_size):
        raise ValueError(f"student: its encoder takes {s_enc.img_size}x{s_enc.img_size} images, the teacher's "
                         f"{t_enc.img_size}x{t_enc.img_size}; they must match")
    for name in ("prompt_encoder", "mask_decoder"):
        if not isinstance(getattr(student, name, None), nn.Module):
            raise TypeError(f"student must be a segment_anything Sam with a {name}")
    if method != "dld":
        return None
    t_blocks, s_blocks = encoder_blocks(teacher), encoder_blocks(student)
    if s_blocks is None:
        raise ValueError(f"student: method='dld' distills block by block and needs a ViT encoder with the teacher's "
                         f"depth; this student's encoder is a {type(s_enc).__name__} without a blocks list: use "
                         "method='embedding' or 'full_stage'")
    if t_blocks is None or len(t_blocks) != len(s_blocks):
        raise ValueError(f"student: method='dld' pairs block i of the student with block i of the teacher, but the "
                         f"student has {len(s_blocks)} blocks and the teacher "
                         f"{'no block list' if t_blocks is None else len(t_blocks)}: use method='embedding' or "
                         "'full_stage'")
    t_w = {i: _block_width(b) for i, b in enumerate(t_blocks)}
    s_w = {i: _block_width(b) for i, b in enumerate(s_blocks)}
    return FeatureAdapters(s_w, t_w)
