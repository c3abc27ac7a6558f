"""``Sam2FastAutomaticMaskGenerator``: SAM 2's "segment everything" (``SAM2AutomaticMaskGenerator``) on the fast
decoder side.

Same constructor arguments, defaults and records as ``sam2.automatic_mask_generator.SAM2AutomaticMaskGenerator``
(``use_m2m``, ``multimask_output``, ``mask_threshold``, crop layers, every ``output_mode``), on the machinery of
:class:`sam_fast.SamFastAutomaticMaskGenerator`: a crop's points decoded in as few batched decoder calls as
memory allows, thresholds, stability, boxes and uncropped RLE of a batch in one ``mask_postprocess`` call, NMS
on the device. ``use_m2m`` refines every mask of a batch with its own low-resolution logits as the mask prompt
in one more decoder call, as SAM 2 does batch by batch.

SAM 2's ``min_mask_region_area`` is not segment_anything's: it becomes the predictor's hole and sprinkle area,
filled on the low-resolution logits by SAM 2's connected-components CUDA extension (which, where it is not
built, warns and skips), and the final masks are not cleaned. This generator does exactly that, through SAM 2's
own post-processing.
"""

from __future__ import annotations

import math
import numbers
from typing import List, Optional

import numpy as np
import torch

from .everything import SamFastAutomaticMaskGenerator
from .predictor import check_image_size


class Sam2FastAutomaticMaskGenerator(SamFastAutomaticMaskGenerator):
    """Drop-in for ``SAM2AutomaticMaskGenerator(model, ...)`` (what ``SamFastAutomaticMaskGenerator(sam2_model)``
    builds): its arguments in its order. ``points_per_batch=None`` (the default) decodes as many points per call as
    memory allows; ``options`` are :class:`~sam_fast.SamFastAutomaticMaskGenerator`'s own keywords (``hierarchical``
    and its thresholds, ``backend``, ``progress``), anything else a TypeError."""

    _cleans_small_regions = False

    def __init__(
        self,
        model,
        points_per_side: Optional[int] = 32,
        points_per_batch: Optional[int] = None,
        pred_iou_thresh: float = 0.8,
        stability_score_thresh: float = 0.95,
        stability_score_offset: float = 1.0,
        mask_threshold: float = 0.0,
        box_nms_thresh: float = 0.7,
        crop_n_layers: int = 0,
        crop_nms_thresh: float = 0.7,
        crop_overlap_ratio: float = 512 / 1500,
        crop_n_points_downscale_factor: int = 1,
        point_grids: Optional[List[np.ndarray]] = None,
        min_mask_region_area: int = 0,
        output_mode: str = "binary_mask",
        use_m2m: bool = False,
        multimask_output: bool = True,
        **options,
    ) -> None:
        for name, value in (("use_m2m", use_m2m), ("multimask_output", multimask_output)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool, got {value!r}")
        if isinstance(mask_threshold, bool) or not isinstance(mask_threshold, numbers.Real) \
                or not math.isfinite(mask_threshold):
            raise ValueError(f"mask_threshold must be a finite number, got {mask_threshold!r}")
        self.mask_threshold = float(mask_threshold)
        self.use_m2m = use_m2m
        self.multimask_output = multimask_output
        super().__init__(model, points_per_side=points_per_side, points_per_batch=points_per_batch,
                         pred_iou_thresh=pred_iou_thresh, stability_score_thresh=stability_score_thresh,
                         stability_score_offset=stability_score_offset, box_nms_thresh=box_nms_thresh,
                         crop_n_layers=crop_n_layers, crop_nms_thresh=crop_nms_thresh,
                         crop_overlap_ratio=crop_overlap_ratio,
                         crop_n_points_downscale_factor=crop_n_points_downscale_factor, point_grids=point_grids,
                         min_mask_region_area=min_mask_region_area, output_mode=output_mode, **options)

    @staticmethod
    def _make_predictor(model, backend, min_mask_region_area):
        from .predictor_sam2 import Sam2FastPredictor

        return Sam2FastPredictor(model, max_hole_area=min_mask_region_area, max_sprinkle_area=min_mask_region_area,
                                 backend=backend)

    def _check_image_size(self, hw) -> None:
        check_image_size(hw, None)  # SAM 2 resizes any non-empty image to its square input

    def _mask_threshold(self) -> float:
        return self.mask_threshold

    def _reset_image(self) -> None:
        self.predictor.reset_predictor()

    def _decode_points(self, batch: np.ndarray, im_size):
        predictor = self.predictor
        points = torch.as_tensor(batch, dtype=torch.float32, device=predictor.device)  # SAM 2's records: float32
        coords = predictor._transforms.transform_coords(points, normalize=True, orig_hw=im_size)
        labels = torch.ones(len(batch), 1, dtype=torch.int, device=predictor.device)
        low, iou = predictor._decode([(0, coords[:, None], labels, None, None)], self.multimask_output)[0]
        M = low.shape[1]
        low, iou, points = low.flatten(0, 1), iou.flatten(0, 1), points.repeat_interleave(M, dim=0)
        if self.use_m2m:
            # every mask again, its own (clamped) low-res logits as the mask prompt, one mask out
            coords = predictor._transforms.transform_coords(points, normalize=True, orig_hw=im_size)
            labels = torch.ones(len(points), 1, dtype=torch.int, device=predictor.device)
            mask_input = torch.clamp(low, -32.0, 32.0)[:, None]
            low, iou = predictor._decode([(0, coords[:, None], labels, None, mask_input)], False)[0]
            low, iou = low[:, 0], iou[:, 0]
        t = predictor._transforms
        if t.max_hole_area > 0 or t.max_sprinkle_area > 0:
            # SAM 2's hole / sprinkle filling, by its own code; at the logits' own size its resize is the identity
            low = t.postprocess_masks(low[:, None], low.shape[-2:])[:, 0]
        return low, iou.float(), points.cpu()
