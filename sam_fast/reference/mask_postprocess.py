"""Reference of ``sam_fast.mask_postprocess``: segment_anything's own post-processing, step by step.

This is the pipeline the fused op replaces, built from segment_anything's functions so that it is the
oracle of the tests and the baseline of ``bench/bench_decoder.py``:

1. ``Sam.postprocess_masks``: bilinear resize to the padded input size, crop to the resized image,
   bilinear resize to the original size (here on ``logits.float()``);
2. ``calculate_stability_score`` at ``mask_threshold +- stability_offset``;
3. threshold, ``batched_mask_to_box``, area;
4. ``uncrop_masks`` into the RLE frame and ``mask_to_rle_pytorch`` (column-major COCO counts).

It materialises every full-resolution float mask, which is exactly what the fused op avoids.
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F


class PostprocessedMasks(NamedTuple):
    """Per-mask results of the post-processing, P masks of size (H, W) = ``original_size``.

    * ``stability_score`` (P,) float32 - ``count(logit > t + off) / count(logit > t - off)``;
    * ``area`` (P,) int64 - ``count(logit > t)``;
    * ``boxes`` (P, 4) int64 - XYXY, inclusive, in mask coordinates; zeros for an empty mask;
    * ``rle_counts`` (R,) int64, ``rle_offsets`` (P + 1,) int64 - mask i's COCO counts are
      ``rle_counts[rle_offsets[i]:rle_offsets[i + 1]]`` (column-major, starting with a run of zeros), of
      the mask placed in the RLE frame; both empty / ``[0]`` when RLE was not asked for;
    * ``masks`` (P, H, W) bool, or None when not asked for.
    """

    stability_score: torch.Tensor
    area: torch.Tensor
    boxes: torch.Tensor
    rle_counts: torch.Tensor
    rle_offsets: torch.Tensor
    masks: Optional[torch.Tensor]


def upsample_logits(logits: torch.Tensor, padded_size: Sequence[int], input_size: Sequence[int],
                    original_size: Sequence[int]) -> torch.Tensor:
    """(P, h, w) -> (P, H, W) float32: the body of ``segment_anything.modeling.Sam.postprocess_masks``."""
    masks = F.interpolate(logits[:, None].float(), tuple(padded_size), mode="bilinear", align_corners=False)
    masks = masks[..., : input_size[0], : input_size[1]]
    masks = F.interpolate(masks, tuple(original_size), mode="bilinear", align_corners=False)
    return masks[:, 0]


def flatten_rles(rles: list, device=None) -> tuple:
    """segment_anything's ``[{"size", "counts"}]`` -> flat (counts, offsets) int64 tensors."""
    lengths = [len(r["counts"]) for r in rles]
    counts = torch.tensor([c for r in rles for c in r["counts"]], dtype=torch.int64, device=device)
    offsets = torch.zeros(len(rles) + 1, dtype=torch.int64, device=device)
    if rles:
        offsets[1:] = torch.tensor(lengths, dtype=torch.int64, device=device).cumsum(0)
    return counts, offsets


def mask_postprocess(logits: torch.Tensor, padded_size: Sequence[int], input_size: Sequence[int],
                     original_size: Sequence[int], rle_frame: Sequence[int], mask_threshold: float,
                     stability_offset: float, return_rle: bool, return_masks: bool) -> PostprocessedMasks:
    """Same contract as the ``sam_fast::mask_postprocess`` op; ``rle_frame`` = (x0, y0, frame_h, frame_w)."""
    from segment_anything.utils.amg import (
        batched_mask_to_box,
        calculate_stability_score,
        mask_to_rle_pytorch,
        uncrop_masks,
    )

    upsampled = upsample_logits(logits, padded_size, input_size, original_size)
    stability = calculate_stability_score(upsampled, mask_threshold, stability_offset)
    binary = upsampled > mask_threshold
    del upsampled
    boxes = batched_mask_to_box(binary).to(torch.int64)
    area = binary.sum(dim=(1, 2), dtype=torch.int64)
    if return_rle:
        x0, y0, frame_h, frame_w = (int(v) for v in rle_frame)
        h, w = binary.shape[-2:]
        framed = uncrop_masks(binary, [x0, y0, x0 + w, y0 + h], frame_h, frame_w)
        counts, offsets = flatten_rles(mask_to_rle_pytorch(framed), device=logits.device)
    else:
        counts = torch.zeros(0, dtype=torch.int64, device=logits.device)
        offsets = torch.zeros(1, dtype=torch.int64, device=logits.device)
    return PostprocessedMasks(stability.float(), area, boxes, counts, offsets, binary if return_masks else None)


def coco_string(counts: Sequence[int]) -> str:
    """pycocotools' compressed RLE string of one mask's counts (its ``rleToString`` format), plainly."""
    out = []
    for i, count in enumerate(counts):
        value = int(count) - (int(counts[i - 2]) if i > 2 else 0)
        more = True
        while more:
            group = value & 0x1F
            value >>= 5
            more = value != -1 if group & 0x10 else value != 0
            out.append(chr((group | (0x20 if more else 0)) + 48))
    return "".join(out)


def coco_counts(text: str) -> List[int]:
    """The inverse of :func:`coco_string`: pycocotools' compressed string back to run lengths, plainly."""
    counts: List[int] = []
    i = 0
    while i < len(text):
        value, shift, more = 0, 0, True
        while more:
            if i == len(text):
                raise ValueError("counts: the compressed string ends inside a run length")
            group = ord(text[i]) - 48
            if not 0 <= group < 64:
                raise ValueError(f"counts: {text[i]!r} at position {i} is not a compressed-RLE character")
            value |= (group & 0x1F) << shift
            more = bool(group & 0x20)
            i += 1
            shift += 5
            if not more and group & 0x10:
                value |= -1 << shift
        if len(counts) > 2:
            value += counts[-2]
        counts.append(value)
    return counts

