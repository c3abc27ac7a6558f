"""One mask as a COCO-style record, the way segment_anything's automatic mask generator writes it.

Every record sam_fast writes - the generator's (:class:`sam_fast.SamFastAutomaticMaskGenerator`), the predictor's
(:meth:`sam_fast.SamFastPredictor.coco_records`), ``sam-fast segment`` and ``sam-fast segment-dataset`` - is built
here, so one mask gets the same fields and the same numbers whichever way it was made:

* ``segmentation`` (COCO RLE, binary mask or uncompressed RLE, as the caller chose), ``area`` (pixels);
* ``bbox`` XYWH from the mask's XYXY box with inclusive pixel bounds, segment_anything's convention:
  ``w = x1 - x0`` (a one-pixel-wide mask has w = 0; COCO's tools count it as 1);
* ``predicted_iou``, ``point_coords`` (the prompt's points, ``[]`` for none), ``stability_score``;
* ``crop_box`` XYWH of the crop the mask was found in (the whole image outside the generator's crops);
* ``box_prompt`` (XYXY), only for a mask that a box prompt made.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence


def xyxy_to_xywh(box) -> list:
    """segment_anything's ``box_xyxy_to_xywh``: ``[x0, y0, x1 - x0, y1 - y0]`` (a tensor's or a sequence's values,
    as Python numbers of their own type)."""
    x0, y0, x1, y1 = box.tolist() if hasattr(box, "tolist") else list(box)
    return [x0, y0, x1 - x0, y1 - y0]


def coco_record(segmentation: Any, area: int, box_xyxy: Sequence[float], predicted_iou: float,
                point_coords: Sequence[Sequence[float]], stability_score: float, crop_box_xyxy: Sequence[float],
                box_prompt: Optional[Sequence[float]] = None) -> Dict[str, Any]:
    """The record of one mask (module docstring): ``box_xyxy`` the mask's box with inclusive bounds,
    ``crop_box_xyxy`` the crop's (x0, y0, x1, y1)."""
    record = {"segmentation": segmentation, "area": int(area), "bbox": xyxy_to_xywh(box_xyxy),
              "predicted_iou": float(predicted_iou), "point_coords": [list(p) for p in point_coords],
              "stability_score": float(stability_score), "crop_box": xyxy_to_xywh(crop_box_xyxy)}
    if box_prompt is not None:
        record["box_prompt"] = [float(v) for v in box_prompt]
    return record
