"""``SamFastAutomaticMaskGenerator``: segment_anything's "segment everything" on the fast decoder side.

Same constructor arguments and output records as ``segment_anything.SamAutomaticMaskGenerator``
(every ``output_mode``, crop layers, min-region cleanup), with

* all points of a crop decoded in as few :class:`~sam_fast.nn.BatchedMaskDecoder` calls as memory
  allows (``points_per_batch=None``), the image embedding never copied per point;
* thresholding, stability score, box and uncropped COCO RLE of every mask in one
  ``sam_fast::mask_postprocess`` call per batch (no full-resolution float masks, no per-mask loop);
* box NMS on the device (torchvision's ``batched_nms``);
* ``hierarchical=True`` (or ``"tinysam"``): TinySAM's two-round strategy, as its authors' code runs it
  (their speed and mIoU figures were measured with it). Round 1 decodes a sparse grid of
  ``points_per_side // 4`` points per side. Its confident masks - those passing the round's own
  ``pred_iou_thresh`` and ``stability_score_thresh`` filters (``hierarchical_iou_thresh`` /
  ``hierarchical_stability_thresh`` override them) - mark the pixels where their upsampled logits exceed
  ``hierarchical_logit_thresh`` (8.5) as done. Round 2 takes, around each round-1 point ``(x, y)``, the
  eight points ``(x + a * ws, y + b * hs)`` for a, b in {-1, 0, 1} other than the point itself, plus the
  ``+2`` column ``(x + 2 ws, y + b hs)`` and row ``(x + a ws, y + 2 hs)`` and their corner where they stay
  inside the image, with strides ``ws = W // points_per_side``, ``hs = H // points_per_side`` in pixels;
  it decodes those not on a done pixel. For 512 x 512 at 32 points per side that is 897 candidates at
  16, 32, ..., 496 - not the dense grid. Both rounds' masks then go through NMS together. The done-mask
  is read at row ``y``, column ``x`` (TinySAM's code permutes its (H, W) mask to (W, H) and reads it at
  ``[x, y]``: the same pixel). ``hierarchical="dense"`` is this package's earlier variant: round 2
  decodes the dense ``points_per_side`` grid minus its done points.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from torchvision.ops.boxes import batched_nms, box_area

from .coco import coco_record
from .ops.mask_postprocess import coco_to_mask, mask_postprocess, rles_to_coco
from .predictor import SamFastPredictor, _is_sam2_model, check_image_size

_OUTPUT_MODES = ("binary_mask", "uncompressed_rle", "coco_rle")


def _linear_taps(index: torch.Tensor, in_len: int, out_len: int):
    """ATen's bilinear (align_corners=False) taps of output positions ``index``: (i0, i1, w0, w1)."""
    scale = torch.tensor(float(in_len), dtype=torch.float32) / torch.tensor(float(out_len), dtype=torch.float32)
    src = (scale * (index.float() + 0.5) - 0.5).clamp(min=0)
    i0 = src.floor().long().clamp(max=in_len - 1)
    i1 = torch.where(i0 < in_len - 1, i0 + 1, i0)
    w1 = (src - i0.float()).clamp(0, 1)
    return i0, i1, 1 - w1, w1


def _composite_taps(index, low_len, padded_len, crop_len, out_len):
    """Taps of the two resizes composed: (K, 4) low-resolution indices and weights."""
    r0, r1, a0, a1 = _linear_taps(index, crop_len, out_len)
    idx, wts = [], []
    for r, a in ((r0, a0), (r1, a1)):
        k0, k1, b0, b1 = _linear_taps(r, low_len, padded_len)
        idx += [k0, k1]
        wts += [a * b0, a * b1]
    return torch.stack(idx, 1), torch.stack(wts, 1)


def sample_upsampled_logits(low_res: torch.Tensor, points: torch.Tensor, padded_size, input_size,
                            original_size) -> torch.Tensor:
    """Value of segment_anything's upsampled mask logits at given pixels, without upsampling.

    ``low_res`` (M, h, w); ``points`` (K, 2) XY pixel coordinates in the (H, W) = ``original_size``
    frame (rounded down to a pixel, clamped inside). Returns (M, K) float32, equal to
    ``Sam.postprocess_masks(low_res)[:, y, x]`` up to float rounding.
    """
    H, W = original_size
    xs = points[:, 0].floor().long().clamp(0, W - 1)
    ys = points[:, 1].floor().long().clamp(0, H - 1)
    rows, wr = _composite_taps(ys, low_res.shape[-2], padded_size[0], input_size[0], H)
    cols, wc = _composite_taps(xs, low_res.shape[-1], padded_size[1], input_size[1], W)
    L = low_res.float()
    vals = L[:, rows[:, :, None].to(L.device), cols[:, None, :].to(L.device)]  # (M, K, 4, 4)
    w = (wr[:, :, None] * wc[:, None, :]).to(L.device)
    return (vals * w).sum(dim=(-1, -2))


def points_inside(low_res: torch.Tensor, points: np.ndarray, threshold: float, padded_size, input_size,
                  original_size) -> np.ndarray:
    """(K,) bool: whether any of the masks' upsampled logits exceeds ``threshold`` at each point."""
    if low_res.shape[0] == 0 or len(points) == 0:
        return np.zeros(len(points), dtype=bool)
    values = sample_upsampled_logits(low_res, torch.as_tensor(points, dtype=torch.float32), padded_size,
                                     input_size, original_size)
    return (values > threshold).any(dim=0).cpu().numpy()


HIERARCHICAL_MODES = (False, True, "tinysam", "dense")


def tinysam_second_round_points(sparse: np.ndarray, im_size, points_per_side: int) -> np.ndarray:
    """TinySAM's round-2 candidate points (K', 2) XY for round-1 points ``sparse`` (K, 2) XY pixels on an
    image of ``im_size`` (H, W) with ``points_per_side``: around each round-1 point, in TinySAM's order,
    its 8 neighbours at one stride, then the +2-stride column and row and their corner where they stay
    inside the image (strides ``W // points_per_side``, ``H // points_per_side``, whole pixels)."""
    ih, iw = int(im_size[0]), int(im_size[1])
    ws, hs = iw // points_per_side, ih // points_per_side
    ring = [(a, b) for a in (-1, 0, 1) for b in (-1, 0, 1) if (a, b) != (0, 0)]
    out = []
    for x, y in np.asarray(sparse, dtype=np.float64).reshape(-1, 2):
        right, below = x + 2 * ws < iw, y + 2 * hs < ih
        offsets = ring + ([(2, b) for b in (-1, 0, 1)] if right else []) \
            + ([(a, 2) for a in (-1, 0, 1)] if below else []) + ([(2, 2)] if right and below else [])
        out += [(x + a * ws, y + b * hs) for a, b in offsets]
    return np.asarray(out, dtype=np.float64).reshape(-1, 2)


def remove_small_regions(mask: np.ndarray, area_thresh: float, mode: str) -> Tuple[np.ndarray, bool]:
    """segment_anything's ``remove_small_regions`` (8-connected components) without OpenCV: scipy."""
    try:
        from scipy import ndimage
    except ImportError as exc:  # pragma: no cover - scipy comes with scikit-image
        raise ImportError("min_mask_region_area > 0 needs scipy (pip install scipy)") from exc
    if mode not in ("holes", "islands"):
        raise ValueError(f"mode must be 'holes' or 'islands', got {mode!r}")
    correct_holes = mode == "holes"
    working = correct_holes ^ mask.astype(bool)
    regions, n = ndimage.label(working, structure=np.ones((3, 3), dtype=int))
    sizes = np.bincount(regions.ravel(), minlength=n + 1)[1:]
    small = [i + 1 for i, s in enumerate(sizes) if s < area_thresh]
    if not small:
        return mask, False
    fill = [0] + small
    if not correct_holes:
        fill = [i for i in range(n + 1) if i not in fill]
        if not fill:  # every region is small: keep the largest
            fill = [int(np.argmax(sizes)) + 1]
    return np.isin(regions, fill), True


class SamFastAutomaticMaskGenerator:
    """Drop-in for ``segment_anything.SamAutomaticMaskGenerator`` (same arguments, same records).

    Differences: ``points_per_batch=None`` (the default) decodes as many points per call as memory
    allows; ``hierarchical`` and its thresholds select TinySAM's two-round mode; ``backend`` picks the
    post-processing op's backend; ``progress`` shows a bar over crops and batches.
    """

    def __new__(cls, model=None, *args, **kwargs):
        # A SAM 2 model gets SAM2AutomaticMaskGenerator's drop-in (its defaults, use_m2m, multimask_output).
        if cls is SamFastAutomaticMaskGenerator and _is_sam2_model(model):
            from .everything_sam2 import Sam2FastAutomaticMaskGenerator

            return super().__new__(Sam2FastAutomaticMaskGenerator)
        return super().__new__(cls)

    def __init__(
        self,
        model,
        points_per_side: Optional[int] = 32,
        points_per_batch: Optional[int] = None,
        pred_iou_thresh: float = 0.88,
        stability_score_thresh: float = 0.95,
        stability_score_offset: float = 1.0,
        box_nms_thresh: float = 0.7,
        crop_n_layers: int = 0,
        crop_nms_thresh: float = 0.7,
        crop_overlap_ratio: float = 512 / 1500,
        crop_n_points_downscale_factor: int = 1,
        point_grids: Optional[List[np.ndarray]] = None,
        min_mask_region_area: int = 0,
        output_mode: str = "binary_mask",
        hierarchical=False,
        hierarchical_iou_thresh: Optional[float] = None,
        hierarchical_stability_thresh: Optional[float] = None,
        hierarchical_logit_thresh: float = 8.5,
        backend: str = "auto",
        progress: bool = False,
    ) -> None:
        from segment_anything.utils.amg import build_all_layer_point_grids

        if (points_per_side is None) == (point_grids is None):
            raise ValueError("exactly one of points_per_side or point_grids must be given, got "
                             f"points_per_side={points_per_side!r} and point_grids="
                             f"{'None' if point_grids is None else 'a list'}")
        if output_mode not in _OUTPUT_MODES:
            raise ValueError(f"output_mode must be one of {_OUTPUT_MODES}, got {output_mode!r}")
        if points_per_batch is not None and (not isinstance(points_per_batch, int) or points_per_batch < 1):
            raise ValueError(f"points_per_batch must be a positive int or None, got {points_per_batch!r}")
        if points_per_side is not None and (not isinstance(points_per_side, int) or points_per_side < 1):
            raise ValueError(f"points_per_side must be a positive int, got {points_per_side!r}")
        for name, value, least in (("crop_n_layers", crop_n_layers, 0),
                                   ("crop_n_points_downscale_factor", crop_n_points_downscale_factor, 1),
                                   ("min_mask_region_area", min_mask_region_area, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
        if not 0 <= crop_overlap_ratio < 1:
            raise ValueError(f"crop_overlap_ratio must lie in [0, 1), got {crop_overlap_ratio!r}")
        if hierarchical not in HIERARCHICAL_MODES:
            raise ValueError(f"hierarchical must be one of {HIERARCHICAL_MODES}, got {hierarchical!r}")
        hierarchical_iou_thresh = pred_iou_thresh if hierarchical_iou_thresh is None else hierarchical_iou_thresh
        hierarchical_stability_thresh = (stability_score_thresh if hierarchical_stability_thresh is None
                                         else hierarchical_stability_thresh)
        for name, value in (("pred_iou_thresh", pred_iou_thresh), ("stability_score_thresh", stability_score_thresh),
                            ("stability_score_offset", stability_score_offset),
                            ("hierarchical_iou_thresh", hierarchical_iou_thresh),
                            ("hierarchical_stability_thresh", hierarchical_stability_thresh),
                            ("hierarchical_logit_thresh", hierarchical_logit_thresh)):
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        for name, value in (("box_nms_thresh", box_nms_thresh), ("crop_nms_thresh", crop_nms_thresh)):
            # NaN compares false with every IoU: NMS would silently keep every mask
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value <= 1:
                raise ValueError(f"{name} must be an IoU threshold in [0, 1], got {value!r}")
        if point_grids is not None:
            if len(point_grids) != crop_n_layers + 1:
                raise ValueError(f"point_grids must hold one grid per crop layer ({crop_n_layers + 1}), "
                                 f"got {len(point_grids)}")
            for i, grid in enumerate(point_grids):
                grid = np.asarray(grid)
                if grid.ndim != 2 or grid.shape[1] != 2 or not (np.isfinite(grid).all() and (grid >= 0).all()
                                                                and (grid <= 1).all()):
                    raise ValueError(f"point_grids[{i}] must be an (n, 2) array of points in [0, 1], got "
                                     f"shape {grid.shape}")
        if hierarchical and points_per_side is None:
            raise ValueError("hierarchical mode builds its sparse grid from points_per_side; got point_grids")
        if points_per_side is not None:
            self.point_grids = build_all_layer_point_grids(points_per_side, crop_n_layers,
                                                           crop_n_points_downscale_factor)
            # per crop layer: its points per side, and round 1's sparse grid (a quarter of them per side)
            self.layer_sides = [int(points_per_side / (crop_n_points_downscale_factor ** i))
                                for i in range(crop_n_layers + 1)]
            self.sparse_grids = [build_all_layer_point_grids(max(1, s // 4), 0, 1)[0] for s in self.layer_sides]
        else:
            self.point_grids = point_grids
        self.predictor = self._make_predictor(model, backend, min_mask_region_area)
        self.points_per_batch = points_per_batch
        self.pred_iou_thresh = pred_iou_thresh
        self.stability_score_thresh = stability_score_thresh
        self.stability_score_offset = stability_score_offset
        self.box_nms_thresh = box_nms_thresh
        self.crop_n_layers = crop_n_layers
        self.crop_nms_thresh = crop_nms_thresh
        self.crop_overlap_ratio = crop_overlap_ratio
        self.crop_n_points_downscale_factor = crop_n_points_downscale_factor
        self.min_mask_region_area = min_mask_region_area
        self.output_mode = output_mode
        self.hierarchical = {True: "tinysam", False: None}.get(hierarchical, hierarchical)
        self.hierarchical_iou_thresh = hierarchical_iou_thresh
        self.hierarchical_stability_thresh = hierarchical_stability_thresh
        self.hierarchical_logit_thresh = hierarchical_logit_thresh
        self.progress = progress
        self.last_stats: Dict[str, int] = {}

    # -- public -----------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, image: np.ndarray) -> List[Dict[str, Any]]:
        """Masks for the whole HWC uint8 image, as ``SamAutomaticMaskGenerator.generate`` returns them."""
        from segment_anything.utils.amg import area_from_rle

        if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"image must be an HxWx3 uint8 array, got "
                             f"{getattr(image, 'shape', type(image).__name__)} {getattr(image, 'dtype', '')}")
        self._check_image_size(image.shape[:2])
        self.last_stats = {"points_decoded": 0, "points_skipped": 0, "decoder_calls": 0}
        data = self._generate_masks(image)
        if self.min_mask_region_area > 0 and self._cleans_small_regions:
            data = self._postprocess_small_regions(data, self.min_mask_region_area,
                                                   max(self.box_nms_thresh, self.crop_nms_thresh))
        rles = data["rles"]
        if self.output_mode == "coco_rle":
            segmentations = self._coco(rles)
        elif self.output_mode == "binary_mask":
            segmentations = [coco_to_mask(r) for r in rles]
        else:
            segmentations = rles
        return [coco_record(segmentations[i], area_from_rle(rles[i]), data["boxes"][i], data["iou_preds"][i].item(),
                            [data["points"][i].tolist()], data["stability_score"][i].item(), data["crop_boxes"][i])
                for i in range(len(rles))]

    # -- stages -----------------------------------------------------------------------------------------

    @staticmethod
    def _make_predictor(model, backend, min_mask_region_area):
        return SamFastPredictor(model, backend=backend)

    _cleans_small_regions = True  # min_mask_region_area > 0 cleans the final masks (SAM 2's generator does not)

    def _check_image_size(self, hw) -> None:
        check_image_size(hw, self.predictor.model.image_encoder.img_size)

    @staticmethod
    def _coco(rles):
        if not rles:
            return []
        lengths = torch.tensor([len(r["counts"]) for r in rles])
        offsets = torch.zeros(len(rles) + 1, dtype=torch.int64)
        offsets[1:] = lengths.cumsum(0)
        counts = torch.tensor([c for r in rles for c in r["counts"]], dtype=torch.int64)
        out = []
        for r, rec in zip(rles, rles_to_coco(counts, offsets, rles[0]["size"])):
            rec["size"] = list(r["size"])
            out.append(rec)
        return out

    def _generate_masks(self, image: np.ndarray) -> Dict[str, Any]:
        from segment_anything.utils.amg import generate_crop_boxes

        orig_size = image.shape[:2]
        crop_boxes, layer_idxs = generate_crop_boxes(orig_size, self.crop_n_layers, self.crop_overlap_ratio)
        parts = [self._process_crop(image, box, layer, orig_size)
                 for box, layer in self._progress(list(zip(crop_boxes, layer_idxs)), "crops")]
        data = _cat(parts)
        if len(crop_boxes) > 1 and len(data["rles"]):
            scores = 1 / box_area(data["crop_boxes"].float())
            keep = batched_nms(data["boxes"].float(), scores.to(data["boxes"].device),
                               torch.zeros(len(data["boxes"]), device=data["boxes"].device),
                               iou_threshold=self.crop_nms_thresh)
            data = _filter(data, keep)
        return _to_cpu(data)

    def _process_crop(self, image, crop_box, layer_idx, orig_size) -> Dict[str, Any]:
        from segment_anything.utils.amg import uncrop_boxes_xyxy, uncrop_points

        x0, y0, x1, y1 = crop_box
        cropped = image[y0:y1, x0:x1, :]
        im_size = cropped.shape[:2]
        self.predictor.set_image(cropped)
        scale = np.array(im_size)[None, ::-1]
        dense = self.point_grids[layer_idx] * scale
        if self.hierarchical:
            sparse = self.sparse_grids[layer_idx] * scale
            first, confident = self._process_points(sparse, im_size, crop_box, orig_size, keep_confident=True)
            if self.hierarchical == "tinysam":
                candidates = tinysam_second_round_points(sparse, im_size, self.layer_sides[layer_idx])
            else:
                candidates = dense
            done = points_inside(confident, candidates, self.hierarchical_logit_thresh, self.predictor.padded_size,
                                 self.predictor.input_size, im_size)
            self.last_stats["points_skipped"] += int(done.sum())
            second, _ = self._process_points(candidates[~done], im_size, crop_box, orig_size)
            data = _cat([first, second])
        else:
            data, _ = self._process_points(dense, im_size, crop_box, orig_size)
        self._reset_image()
        if len(data["rles"]):
            keep = batched_nms(data["boxes"].float(), data["iou_preds"],
                               torch.zeros(len(data["boxes"]), device=data["boxes"].device),
                               iou_threshold=self.box_nms_thresh)
            data = _filter(data, keep)
        data["boxes"] = uncrop_boxes_xyxy(data["boxes"], crop_box)
        data["points"] = uncrop_points(data["points"], crop_box)
        data["crop_boxes"] = torch.tensor([crop_box for _ in range(len(data["rles"]))],
                                          dtype=torch.int64).reshape(-1, 4)
        return data

    def _reset_image(self) -> None:
        self.predictor.reset_image()

    def _batch_size(self, total: int) -> int:
        if self.points_per_batch is not None:
            return self.points_per_batch
        # Peak memory per point: three masks' upscaled embeddings (C/8 x 4h x 4w) and logits, the keys.
        dec = self.predictor.decoder.mask_decoder
        h, w = self.predictor.decoder.prompt_encoder.image_embedding_size
        C = dec.transformer_dim
        elem = dec.iou_token.weight.element_size()
        per_point = elem * (C // 8 * 16 * h * w + 6 * C * h * w) + 3 * 4 * 16 * h * w
        device = self.predictor.device
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            budget = free // 2
        else:
            budget = 2 << 30
        return max(1, min(total, int(budget // per_point)))

    def _process_points(self, points, im_size, crop_box, orig_size, keep_confident=False):
        from segment_anything.utils.amg import is_box_near_crop_edge

        predictor = self.predictor
        device = predictor.device
        orig_h, orig_w = orig_size
        parts, confident = [], []
        n = len(points)
        step = self._batch_size(n) if n else 1
        for start in self._progress(range(0, n, step), "batches", total=(n + step - 1) // step):
            batch = points[start:start + step]
            low, iou, pts = self._decode_points(batch, im_size)
            self.last_stats["decoder_calls"] += 1
            self.last_stats["points_decoded"] += len(batch)
            if self.pred_iou_thresh > 0.0:
                keep = iou > self.pred_iou_thresh
                low, iou, pts = low[keep], iou[keep], pts[keep.cpu()]
            post = mask_postprocess(low, padded_size=predictor.padded_size, input_size=predictor.input_size,
                                    original_size=im_size, mask_threshold=self._mask_threshold(),
                                    stability_offset=self.stability_score_offset, crop_box=crop_box,
                                    image_size=orig_size, return_rle=True, backend=predictor.backend)
            keep = torch.ones(len(iou), dtype=torch.bool, device=iou.device)
            if self.stability_score_thresh > 0.0:
                keep &= post.stability_score >= self.stability_score_thresh
            if keep_confident:  # round 1's filters, as TinySAM applies them (a threshold <= 0 filters nothing)
                sure = torch.ones_like(keep)
                if self.hierarchical_iou_thresh > 0.0:
                    sure &= iou > self.hierarchical_iou_thresh
                if self.hierarchical_stability_thresh > 0.0:
                    sure &= post.stability_score >= self.hierarchical_stability_thresh
                confident.append(low[sure])
            boxes = post.boxes
            keep &= ~is_box_near_crop_edge(boxes, crop_box, [0, 0, orig_w, orig_h])
            index = torch.nonzero(keep).flatten()
            bounds = post.rle_offsets.tolist()
            flat = post.rle_counts.tolist()
            size = [orig_h, orig_w]
            rles = [{"size": size, "counts": flat[bounds[i]:bounds[i + 1]]} for i in index.tolist()]
            parts.append({
                "iou_preds": iou[index],
                "points": pts[index.cpu()],
                "stability_score": post.stability_score[index],
                "boxes": boxes[index],
                "rles": rles,
            })
        if not parts:
            parts.append(_empty(device))
        conf = torch.cat(confident) if confident else None
        if keep_confident and conf is None:
            side = 4 * predictor.decoder.prompt_encoder.image_embedding_size[0]
            conf = torch.zeros((0, side, side), device=device)
        return _cat(parts), conf

    def _decode_points(self, batch: np.ndarray, im_size):
        """One batch of (K, 2) XY points in crop pixels -> low-res logits (K * M, h, w), IoU (K * M,) float32 and the
        points (K * M, 2) their records name, masks of a point consecutive."""
        predictor = self.predictor
        device = predictor.device
        coords = torch.as_tensor(predictor.transform.apply_coords(batch, im_size), device=device)
        labels = torch.ones(len(batch), dtype=torch.int, device=device)
        low, iou = predictor.decoder(predictor.features, torch.zeros(len(batch), dtype=torch.int64, device=device),
                                     coords[:, None, :].float(), labels[:, None], multimask_output=True)
        return low.flatten(0, 1), iou.flatten(0, 1).float(), torch.as_tensor(batch.repeat(low.shape[1], axis=0))

    def _mask_threshold(self) -> float:
        return self.predictor.model.mask_threshold

    def _postprocess_small_regions(self, data, min_area, nms_thresh):
        from segment_anything.utils.amg import batched_mask_to_box, mask_to_rle_pytorch

        if len(data["rles"]) == 0:
            return data
        masks, scores = [], []
        for rle in data["rles"]:
            mask = coco_to_mask(rle)
            mask, changed = remove_small_regions(mask, min_area, mode="holes")
            unchanged = not changed
            mask, changed = remove_small_regions(mask, min_area, mode="islands")
            unchanged = unchanged and not changed
            masks.append(torch.as_tensor(mask).unsqueeze(0))
            scores.append(float(unchanged))
        masks = torch.cat(masks, dim=0)
        boxes = batched_mask_to_box(masks)
        keep = batched_nms(boxes.float(), torch.as_tensor(scores), torch.zeros(len(boxes)), iou_threshold=nms_thresh)
        for i in keep.tolist():
            if scores[i] == 0.0:
                data["rles"][i] = mask_to_rle_pytorch(masks[i].unsqueeze(0))[0]
                data["boxes"][i] = boxes[i]
        return _filter(data, keep)

    def _progress(self, items, what, total=None):
        if not self.progress:
            return items
        from tqdm.auto import tqdm

        return tqdm(items, desc=f"segment everything: {what}", total=total, leave=False)


def _empty(device) -> Dict[str, Any]:
    return {"iou_preds": torch.zeros(0, device=device), "points": torch.zeros((0, 2), dtype=torch.float64),
            "stability_score": torch.zeros(0, device=device),
            "boxes": torch.zeros((0, 4), dtype=torch.int64, device=device), "rles": []}


def _cat(parts: List[Dict[str, Any]]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for key in parts[0]:
        if key == "rles":
            out[key] = [r for p in parts for r in p[key]]
        else:
            out[key] = torch.cat([p[key].to(parts[0][key].device) for p in parts])
    return out


def _filter(data: Dict[str, Any], keep: torch.Tensor) -> Dict[str, Any]:
    idx = keep.flatten().tolist() if keep.dtype != torch.bool else torch.nonzero(keep).flatten().tolist()
    out = {}
    for key, value in data.items():
        if key == "rles":
            out[key] = [value[i] for i in idx]
        else:
            out[key] = value[torch.as_tensor(idx, dtype=torch.int64, device=value.device)]
    return out


def _to_cpu(data: Dict[str, Any]) -> Dict[str, Any]:
    return {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in data.items()}
