"""``sam_fast.mask_postprocess``: segment_anything's mask post-processing as one C++ / CUDA op.

From low-resolution mask logits (P, 256, 256) to what the automatic mask generator and the predictor
need at the original image size - stability score, area, box, COCO RLE, and binary masks only when
asked - without materialising any full-resolution float mask (csrc/mask_postprocess.h explains the
composite resize; csrc/cpu and csrc/cuda hold the kernels). The reference
(:mod:`sam_fast.reference.mask_postprocess`) runs segment_anything's own functions.

Results agree with the reference except where an upsampled logit lies within float rounding
(about 1e-6) of ``mask_threshold`` or ``mask_threshold +- stability_offset``: the fused op combines the
two resizes' taps, so its rounding differs from the two-step computation in the last bits.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch

from .._dispatch import Backend, Refusal, dispatch
from ..reference import mask_postprocess as _ref
from ..reference.mask_postprocess import PostprocessedMasks
from ._ext import cpp_device_refusal, register_fake

__all__ = ["PostprocessedMasks", "coco_to_mask", "mask_postprocess", "rles_to_coco", "rles_to_uncompressed"]

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_MAX_MASKS_PER_CALL = 65535  # the CUDA kernel's grid dimension


@register_fake("sam_fast::mask_postprocess")
def _fake_mask_postprocess(logits, padded_size, input_size, original_size, rle_frame, mask_threshold,
                           stability_offset, return_rle, return_masks):
    P = logits.shape[0]
    ctx = torch.library.get_ctx()
    n = ctx.new_dynamic_size() if return_rle else 0
    H, W = original_size
    return (
        logits.new_empty((P,), dtype=torch.float32),
        logits.new_empty((P,), dtype=torch.int64),
        logits.new_empty((P, 4), dtype=torch.int64),
        logits.new_empty((n,), dtype=torch.int64),
        logits.new_empty((P + 1 if return_rle else 1,), dtype=torch.int64),
        logits.new_empty((P, H, W) if return_masks else (0,), dtype=torch.bool),
    )


@register_fake("sam_fast::rle_to_string")
def _fake_rle_to_string(counts, offsets):
    n = torch.library.get_ctx().new_dynamic_size()
    return counts.new_empty((n,), dtype=torch.uint8), offsets.new_empty(offsets.shape)


def _run_op(logits, padded_size, input_size, original_size, rle_frame, mask_threshold, stability_offset,
            return_rle, return_masks):
    out = torch.ops.sam_fast.mask_postprocess(logits, padded_size, input_size, original_size, rle_frame,
                                              float(mask_threshold), float(stability_offset), return_rle,
                                              return_masks)
    return PostprocessedMasks(*out[:5], out[5] if return_masks else None)


def _cpp(device_type: str):
    def supports(logits, *args, explicit):
        refusal = cpp_device_refusal(logits, device_type)
        if refusal is not None:
            return refusal
        if device_type == "cuda":
            if logits.shape[1] > 1536:
                return Refusal(f"the CUDA kernel keeps a column of the logits in shared memory: at most 1536 "
                               f"rows, got {logits.shape[1]}")
        return None

    return Backend(device_type, supports, _run_op)


_TABLE = (
    _cpp("cuda"),
    _cpp("cpu"),
    Backend("reference", lambda *args, explicit: None, _ref.mask_postprocess),
)


def _all_finite(logits: torch.Tensor) -> bool:
    """One reduction instead of an elementwise test (about 2% of the op on a CPU, not 30%): the sum of
    finite logits cannot overflow float32, and any NaN or infinity makes it non-finite."""
    total = logits.sum(dtype=torch.float32) if logits.dtype == torch.float16 else logits.sum()
    return bool(torch.isfinite(total))


def _pair(name: str, value, *, positive: bool = True) -> tuple:
    if isinstance(value, torch.Size):
        value = tuple(value)
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"{name} must be a pair (h, w), got {value!r}")
    out = []
    for v in value:
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            v = v.item()
        if isinstance(v, bool) or not isinstance(v, int) and not (hasattr(v, "__index__")):
            raise TypeError(f"{name} must hold ints, got {value!r}")
        v = int(v)
        if positive and v < 1:
            raise ValueError(f"{name} must be positive, got {value!r}")
        out.append(v)
    return tuple(out)


def mask_postprocess(
    logits: torch.Tensor,
    *,
    padded_size: Sequence[int] = (1024, 1024),
    input_size: Sequence[int],
    original_size: Sequence[int],
    mask_threshold: float = 0.0,
    stability_offset: float = 1.0,
    crop_box: Optional[Sequence[int]] = None,
    image_size: Optional[Sequence[int]] = None,
    return_rle: bool = True,
    return_masks: bool = False,
    backend: str = "auto",
) -> PostprocessedMasks:
    """Post-process SAM's low-resolution mask logits in one pass.

    Args:
        logits: (P, h, w) float32 / float16 / bfloat16 mask logits, e.g. (P, 256, 256) from the decoder
            (computed in float32 whatever the input dtype).
        padded_size: the encoder's padded input size, (1024, 1024) for SAM (first resize).
        input_size: the resized image inside it, ``SamPredictor.input_size`` (the crop).
        original_size: the image size the masks are returned at (second resize), (H, W).
        mask_threshold, stability_offset: as ``Sam.mask_threshold`` and the mask generator's
            ``stability_score_offset``.
        crop_box: (x0, y0, x1, y1) - where the (H, W) masks sit in a larger image, as the automatic mask
            generator's crops; the RLE is then that of the uncropped mask. Default: the whole image.
        image_size: (IH, IW) of that larger image; default ``original_size``.
        return_rle: compute the column-major COCO RLE counts.
        return_masks: also return the (P, H, W) bool masks.
        backend: "auto" | "cuda" | "cpu" | "reference".

    Returns:
        :class:`PostprocessedMasks` (stability_score, area, boxes, rle_counts, rle_offsets, masks);
        :func:`rles_to_coco` / :func:`rles_to_uncompressed` turn the RLE part into records.
    """
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() != 3:
        raise ValueError(f"logits must have shape (P, h, w), got {tuple(logits.shape)}")
    if logits.dtype not in _FLOATS:
        raise TypeError(f"logits must be float32, float16 or bfloat16, got {logits.dtype}")
    if logits.shape[1] < 1 or logits.shape[2] < 1:
        raise ValueError(f"logits must have non-empty masks, got shape {tuple(logits.shape)}")
    padded_size = _pair("padded_size", padded_size)
    input_size = _pair("input_size", input_size)
    original_size = _pair("original_size", original_size)
    if padded_size[0] < logits.shape[1] or padded_size[1] < logits.shape[2]:
        raise ValueError(f"padded_size {padded_size} must be at least the logits' size {tuple(logits.shape[1:])}")
    if input_size[0] > padded_size[0] or input_size[1] > padded_size[1]:
        raise ValueError(f"input_size {input_size} must lie within padded_size {padded_size}")
    H, W = original_size
    image_size = original_size if image_size is None else _pair("image_size", image_size)
    if crop_box is None:
        crop_box = (0, 0, W, H)
    if not isinstance(crop_box, (tuple, list, torch.Tensor)) or len(crop_box) != 4:
        raise ValueError(f"crop_box must be (x0, y0, x1, y1), got {crop_box!r}")
    x0, y0, x1, y1 = (int(v) for v in crop_box)
    if (x1 - x0, y1 - y0) != (W, H):
        raise ValueError(f"crop_box {tuple(crop_box)} must have the masks' size (W, H) = ({W}, {H})")
    if x0 < 0 or y0 < 0 or x1 > image_size[1] or y1 > image_size[0]:
        raise ValueError(f"crop_box {tuple(crop_box)} must lie inside image_size {image_size}")
    for name, v in (("mask_threshold", mask_threshold), ("stability_offset", stability_offset)):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"{name} must be a float, got {type(v).__name__}")
    if math.isnan(mask_threshold) or math.isnan(stability_offset):
        raise ValueError(f"mask_threshold and stability_offset must be numbers, got {mask_threshold!r}, "
                         f"{stability_offset!r}")
    if logits.numel() and not _all_finite(logits):
        raise ValueError("logits holds NaN or infinite values (a decoder that overflowed?): their masks would be "
                         "silently empty")
    rle_frame = (x0, y0, image_size[0], image_size[1])
    args = (padded_size, input_size, original_size, rle_frame, mask_threshold, stability_offset, bool(return_rle),
            bool(return_masks))
    if logits.shape[0] <= _MAX_MASKS_PER_CALL:
        return dispatch("mask_postprocess", _TABLE, backend, logits, *args)
    # The CUDA grid holds 65535 masks: larger batches run in chunks, joined here.
    parts = [dispatch("mask_postprocess", _TABLE, backend, chunk, *args)
             for chunk in logits.split(_MAX_MASKS_PER_CALL)]
    offsets = [parts[0].rle_offsets]
    for part in parts[1:]:
        offsets.append(part.rle_offsets[1:] + offsets[-1][-1])
    return PostprocessedMasks(
        torch.cat([p.stability_score for p in parts]), torch.cat([p.area for p in parts]),
        torch.cat([p.boxes for p in parts]), torch.cat([p.rle_counts for p in parts]),
        torch.cat(offsets) if return_rle else parts[0].rle_offsets,
        torch.cat([p.masks for p in parts]) if return_masks else None)


def _split(counts: torch.Tensor, offsets: torch.Tensor) -> List[List[int]]:
    flat = counts.tolist()
    bounds = offsets.tolist()
    return [flat[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def rles_to_uncompressed(counts: torch.Tensor, offsets: torch.Tensor, size: Sequence[int]) -> List[dict]:
    """Flat RLE -> segment_anything's uncompressed records ``{"size": [h, w], "counts": [int, ...]}``."""
    h, w = (int(v) for v in size)
    return [{"size": [h, w], "counts": c} for c in _split(counts.cpu(), offsets.cpu())]


def rles_to_coco(counts: torch.Tensor, offsets: torch.Tensor, size: Sequence[int]) -> List[dict]:
    """Flat RLE -> COCO compressed records ``{"size": [h, w], "counts": str}`` (pycocotools' encoding).

    The strings are built by the C++ op ``sam_fast::rle_to_string`` (pure Python when the extension is
    unavailable, with a :class:`~sam_fast.SamFastFallbackWarning`).
    """
    h, w = (int(v) for v in size)
    counts, offsets = counts.cpu(), offsets.cpu()
    strings = dispatch("rle_to_string", _STRING_TABLE, "auto", counts, offsets)
    return [{"size": [h, w], "counts": s} for s in strings]


def coco_to_mask(record: dict):
    """One RLE record -> its binary mask, a ``(h, w)`` bool numpy array.

    ``record`` is ``{"size": [h, w], "counts": ...}`` with the counts either pycocotools' compressed
    string (``str`` or ``bytes``, as :func:`rles_to_coco` and ``output_mode="coco_rle"`` write them) or
    segment_anything's uncompressed list of run lengths (:func:`rles_to_uncompressed`,
    ``output_mode="uncompressed_rle"``). Runs are column-major and start with a run of zeros, as in
    pycocotools, so ``coco_to_mask(r)`` equals ``pycocotools.mask.decode(r)`` (which needs the bytes).
    Malformed records raise ``ValueError`` / ``TypeError`` naming what is wrong.
    """
    import numpy as np

    if not isinstance(record, dict) or "size" not in record or "counts" not in record:
        raise TypeError(f"record: expected a dict with 'size' and 'counts', got {type(record).__name__}")
    size = record["size"]
    if (not isinstance(size, (list, tuple)) or len(size) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in size)):
        raise ValueError(f"record['size']: expected [height, width] of non-negative ints, got {size!r}")
    h, w = size
    counts = record["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii", errors="replace")
    if isinstance(counts, str):
        counts = _ref.coco_counts(counts)
    elif isinstance(counts, torch.Tensor):
        counts = counts.tolist()
    elif not isinstance(counts, (list, tuple, np.ndarray)):
        raise TypeError(f"record['counts']: expected str, bytes or a list of ints, got {type(counts).__name__}")
    runs = np.asarray(counts, dtype=np.int64).reshape(-1)
    if runs.size and int(runs.min()) < 0:
        raise ValueError("record['counts']: run lengths must be non-negative")
    if int(runs.sum()) != h * w:
        raise ValueError(f"record['counts']: the runs cover {int(runs.sum())} pixels, size {h}x{w} has {h * w}")
    values = np.zeros(runs.size, dtype=bool)
    values[1::2] = True
    return np.repeat(values, runs).reshape(w, h).T


def _strings_cpp(counts, offsets):
    chars, bounds = torch.ops.sam_fast.rle_to_string(counts, offsets)
    data = chars.numpy().tobytes()
    b = bounds.tolist()
    return [data[b[i]:b[i + 1]].decode("ascii") for i in range(len(b) - 1)]


def _strings_reference(counts, offsets):
    return [_ref.coco_string(c) for c in _split(counts, offsets)]


_STRING_TABLE = (
    Backend("cpu", lambda counts, offsets, explicit: cpp_device_refusal(counts, "cpu"), _strings_cpp),
    Backend("reference", lambda *args, explicit: None, _strings_reference),
)
