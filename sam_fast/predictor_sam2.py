"""``Sam2FastPredictor``: Meta's ``SAM2ImagePredictor`` on the batched decoder and fused post-processing.

Everything ``SAM2ImagePredictor`` offers works unchanged (``set_image``, ``set_image_batch``, ``predict``,
``predict_batch``, ``_predict``, ``get_image_embedding``, ``reset_predictor``, ``from_pretrained``) with the
same results; what changes is underneath:

* prompts decode through :class:`sam_fast.nn.BatchedMaskDecoder`: several prompts of an image do not copy the
  (256, 64, 64) image embedding and the positional encoding per prompt (SAM 2's ``repeat_image``), and the
  high-resolution features are read per image inside the fused upscaling kernel;
* ``predict_batch`` decodes the prompts of all images in one decoder call per prompt structure, where
  SAM 2's loops over images;
* binary masks come from ``sam_fast::mask_postprocess`` (one pass from the 256 x 256 logits to the
  thresholded mask, no full-resolution float mask), where SAM 2 interpolates to a float mask and compares;
  with ``return_logits`` (or hole / sprinkle filling) SAM 2's own post-processing runs.

This module imports Meta's ``sam2`` package (``pip install sam_fast[sam2]``);
``sam_fast.SamFastPredictor(sam2_model)`` builds one of these.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

try:
    from sam2.sam2_image_predictor import SAM2ImagePredictor
except ImportError as exc:  # pragma: no cover - exercised without the extra
    raise ImportError("Sam2FastPredictor needs Meta's sam2 package: pip install 'sam_fast[sam2]' (with "
                      "SAM2_BUILD_CUDA=0 to skip its CUDA extension)") from exc

from ._dispatch import check_backend_name
from .nn.decoder import BatchedMaskDecoder
from .ops.mask_postprocess import mask_postprocess
from .predictor import POSTPROCESS_BACKENDS, _integer_labels, check_image_size, check_prompt_dict, prompt_records


class Sam2FastPredictor(SAM2ImagePredictor):
    """Drop-in for ``sam2.sam2_image_predictor.SAM2ImagePredictor(sam_model, ...)``.

    Args:
        sam_model: a SAM 2 / 2.1 model (``SAM2Base``; possibly patched with :func:`sam_fast.apply`).
        mask_threshold, max_hole_area, max_sprinkle_area: as ``SAM2ImagePredictor``'s.
        backend: backend of the post-processing op ("auto", "cuda", "cpu", "reference").

    The model is read at call time: replacing ``model.sam_mask_decoder`` or ``model.sam_prompt_encoder`` after
    construction takes effect at the next call, as in SAM 2.
    """

    def __init__(self, sam_model, mask_threshold: float = 0.0, max_hole_area: float = 0.0,
                 max_sprinkle_area: float = 0.0, backend: str = "auto", **kwargs) -> None:
        self.backend = check_backend_name(backend)
        if self.backend not in POSTPROCESS_BACKENDS:
            raise ValueError(f"backend is the mask post-processing's: one of {POSTPROCESS_BACKENDS}, got {backend!r} "
                             "(the decoder's Triton kernels are chosen by 'auto')")
        for name in ("sam_prompt_encoder", "sam_mask_decoder", "image_size"):
            if not hasattr(sam_model, name):
                raise TypeError(f"sam_model must be a SAM 2 model (SAM2Base) with {name}, got "
                                f"{type(sam_model).__name__}")
        self._decoder: Optional[BatchedMaskDecoder] = None
        super().__init__(sam_model, mask_threshold=mask_threshold, max_hole_area=max_hole_area,
                         max_sprinkle_area=max_sprinkle_area, **kwargs)

    @property
    def decoder(self) -> BatchedMaskDecoder:
        """The batched decoder over the model's current prompt encoder and mask decoder (rebuilt, sharing their
        weights, when either module was replaced)."""
        d, m = self._decoder, self.model
        if d is None or d.prompt_encoder is not m.sam_prompt_encoder or d.mask_decoder is not m.sam_mask_decoder:
            self._decoder = d = BatchedMaskDecoder.from_sam(m)
        return d

    @property
    def padded_size(self) -> Tuple[int, int]:
        """The low-resolution logits' (4h, 4w): SAM 2 resizes them straight to the image (no padded frame to crop), so
        for ``mask_postprocess`` the padded and input frames are the logits' own (its first resize is the identity)."""
        h, w = self.model.sam_prompt_encoder.image_embedding_size
        return (4 * h, 4 * w)

    input_size = padded_size

    # -- images: SAM 2's, with named errors where it asserts or fails inside -----------------------------

    def set_image(self, image) -> None:
        """As ``SAM2ImagePredictor.set_image``: an HxWx3 RGB array (or a PIL image), pixel values in [0, 255]."""
        if isinstance(image, np.ndarray):
            _check_image(image, "image")
        super().set_image(image)

    def set_image_batch(self, image_list: List[np.ndarray]) -> None:
        """As ``SAM2ImagePredictor.set_image_batch``: a list of HxWx3 RGB arrays."""
        if not isinstance(image_list, list) or not image_list:
            raise ValueError(f"image_list must be a non-empty list of HxWx3 arrays, got "
                             f"{type(image_list).__name__ if not isinstance(image_list, list) else 'an empty list'}")
        for i, image in enumerate(image_list):
            if not isinstance(image, np.ndarray):
                raise TypeError(f"image_list[{i}] must be an HxWx3 numpy array, got {type(image).__name__}")
            _check_image(image, f"image_list[{i}]")
        super().set_image_batch(image_list)

    def _prep_prompts(self, point_coords, point_labels, box, mask_logits, normalize_coords, img_idx=-1):
        if (point_coords is None) != (point_labels is None):
            raise ValueError("point_coords and point_labels must be given together")
        if point_labels is not None:
            point_labels = _integer_labels(point_labels, "point_labels")
        if point_coords is not None:
            coords = np.asarray(point_coords, dtype=np.float64)
            if coords.ndim not in (2, 3) or coords.shape[-1] != 2 or np.shape(point_labels) != coords.shape[:-1]:
                raise ValueError(f"point_coords must be (N, 2) or (B, N, 2) with point_labels (N,) or (B, N), got "
                                 f"{coords.shape} and {np.shape(point_labels)}")
        if box is not None and (np.ndim(box) not in (1, 2) or np.shape(box)[-1] != 4):
            raise ValueError(f"box must be (4,) or (B, 4) XYXY, got shape {np.shape(box)}")
        return super()._prep_prompts(point_coords, point_labels, box, mask_logits, normalize_coords, img_idx)

    # -- decoding -------------------------------------------------------------------------------------------

    @torch.no_grad()
    def _predict(
        self,
        point_coords: Optional[torch.Tensor],
        point_labels: Optional[torch.Tensor],
        boxes: Optional[torch.Tensor] = None,
        mask_input: Optional[torch.Tensor] = None,
        multimask_output: bool = True,
        return_logits: bool = False,
        img_idx: int = -1,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """As ``SAM2ImagePredictor._predict``: prompts (B, ...) in the model's input frame -> (masks (B, C, H, W),
        iou_predictions (B, C), low-res logits (B, C, 256, 256) clamped to [-32, 32])."""
        if not self._is_image_set:
            raise RuntimeError("An image must be set with .set_image(...) before mask prediction.")
        low, iou = self._decode([(img_idx, point_coords, point_labels, boxes, mask_input)], multimask_output)[0]
        return self._masks(low, self._orig_hw[img_idx], return_logits), iou, torch.clamp(low, -32.0, 32.0)

    @torch.no_grad()
    def predict_batch(
        self,
        point_coords_batch: List[np.ndarray] = None,
        point_labels_batch: List[np.ndarray] = None,
        box_batch: List[np.ndarray] = None,
        mask_input_batch: List[np.ndarray] = None,
        multimask_output: bool = True,
        return_logits: bool = False,
        normalize_coords=True,
    ) -> Tuple[List[np.ndarray], List[np.ndarray], List[np.ndarray]]:
        """As ``SAM2ImagePredictor.predict_batch`` (after :meth:`set_image_batch`): per image lists of masks, IoU
        predictions and low-res logits, all images' prompts decoded together."""
        if not self._is_batch:
            raise RuntimeError("predict_batch needs images set with .set_image_batch(...)")
        if not self._is_image_set:
            raise RuntimeError("An image must be set with .set_image_batch(...) before mask prediction.")
        n = len(self._features["image_embed"])
        given = {"point_coords_batch": point_coords_batch, "point_labels_batch": point_labels_batch,
                 "box_batch": box_batch, "mask_input_batch": mask_input_batch}
        for name, value in given.items():
            if value is not None and len(value) != n:
                raise ValueError(f"{name} must hold one entry per image set ({n}), got {len(value)}")
        items = []
        for i in range(n):
            mask_input, coords, labels, box = self._prep_prompts(
                *(None if v is None else v[i] for v in given.values()), normalize_coords, img_idx=i)
            items.append((i, coords, labels, box, mask_input))
        decoded = self._decode(items, multimask_output)
        out = ([], [], [])
        for i, (low, iou) in enumerate(decoded):
            masks = self._masks(low, self._orig_hw[i], return_logits)
            for acc, t in zip(out, (masks, iou, torch.clamp(low, -32.0, 32.0))):
                acc.append(t.squeeze(0).float().cpu().numpy())
        return out

    @torch.no_grad()
    def coco_records(self, prompts: Sequence[Dict[str, np.ndarray]], multimask_output: bool = True) -> List[List[dict]]:
        """COCO records (as ``SamFastPredictor.coco_records``) of a prompt set per image set by :meth:`set_image` or
        :meth:`set_image_batch`: ``prompts[i]`` holds ``point_coords`` (K, n, 2) with ``point_labels`` (K, n) and / or
        ``boxes`` (K, 4) and / or ``mask_input`` (K, 1, 256, 256), in image pixels (a (n, 2) / (n,) / (4,) array is
        one prompt); a prompt gives its M masks in order."""
        if not self._is_image_set:
            raise RuntimeError("An image must be set with .set_image(...) or .set_image_batch(...) first.")
        n = len(self._features["image_embed"])
        if isinstance(prompts, dict) or len(prompts) != n:
            raise ValueError(f"prompts must be a sequence of one dict per image set ({n})")
        items = []
        for i, prompt in enumerate(prompts):
            check_prompt_dict(i, prompt)
            if not any(prompt.get(k) is not None for k in ("point_coords", "boxes", "mask_input")):
                continue  # no prompt for this image: no records
            mask_input, coords, labels, box = self._prep_prompts(prompt.get("point_coords"), prompt.get("point_labels"),
                                                                 prompt.get("boxes"), prompt.get("mask_input"), True,
                                                                 img_idx=i)
            items.append((i, coords, labels, box, mask_input))
        records: List[List[dict]] = [[] for _ in prompts]
        for item, (low, iou) in zip(items, self._decode(items, multimask_output)):
            i = item[0]
            records[i] = prompt_records(low, iou, prompts[i], self.padded_size, self.input_size,
                                        tuple(self._orig_hw[i]), self.mask_threshold, self.backend)
        return records

    def _decode(self, items, multimask_output: bool) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """(img_idx, coords, labels, boxes, mask_input) per image -> (low-res logits, IoU) per item; items of the
        same prompt structure (point count, mask or not) share one decoder call."""
        decoder = self.decoder
        n_images = len(self._features["image_embed"])
        prepared, groups = [], {}
        for j, (img_idx, coords, labels, boxes, mask_input) in enumerate(items):
            coords, labels, mask_input, count = _sam2_points(coords, labels, boxes, mask_input)
            prepared.append((img_idx % n_images, coords, labels, mask_input, count))
            key = (None if coords is None else coords.shape[1], mask_input is not None)
            groups.setdefault(key, []).append(j)
        results: List[Optional[Tuple[torch.Tensor, torch.Tensor]]] = [None] * len(items)
        feats = self._features
        high_res = feats["high_res_feats"] if getattr(decoder.mask_decoder, "use_high_res_features", False) else None
        for members in groups.values():
            parts = [prepared[j] for j in members]
            index = torch.cat([torch.full((p[4],), p[0], dtype=torch.int64) for p in parts]).to(self.device)
            cat = [None if parts[0][k] is None else torch.cat([p[k] for p in parts]) for k in (1, 2, 3)]
            low, iou = decoder(feats["image_embed"], index, cat[0], cat[1], None, cat[2], multimask_output,
                               high_res_features=high_res)
            start = 0
            for j, p in zip(members, parts):
                results[j] = (low[start:start + p[4]], iou[start:start + p[4]])
                start += p[4]
        return results

    def _masks(self, low: torch.Tensor, orig_hw, return_logits: bool) -> torch.Tensor:
        """SAM 2's ``postprocess_masks`` (+ threshold): in one fused pass unless logits or hole / sprinkle filling
        are asked for."""
        t = self._transforms
        if return_logits or t.max_hole_area > 0 or t.max_sprinkle_area > 0 or low.shape[0] * low.shape[1] == 0:
            masks = t.postprocess_masks(low, orig_hw)
            return masks if return_logits else masks > self.mask_threshold
        P, M = low.shape[:2]
        out = mask_postprocess(low.flatten(0, 1), padded_size=self.padded_size, input_size=self.input_size,
                               original_size=tuple(int(v) for v in orig_hw), mask_threshold=self.mask_threshold,
                               return_rle=False, return_masks=True, backend=self.backend)
        return out.masks.view(P, M, *out.masks.shape[-2:])


def _check_image(image: np.ndarray, name: str) -> None:
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{name} must be an HxWx3 RGB array, got shape {image.shape}")
    check_image_size(image.shape[:2], None, name)  # SAM 2 resizes any non-empty image to its square input


def _sam2_points(coords, labels, boxes, mask_input):
    """SAM 2's prompt layout: a box becomes two points labelled 2 and 3, placed before the clicks; returns
    (coords (B, n, 2), labels (B, n), mask_input (B, 1, 256, 256) or None, B)."""
    if boxes is not None:
        corners = boxes.reshape(-1, 2, 2)
        corner_labels = torch.tensor([[2, 3]], dtype=torch.int, device=boxes.device).repeat(corners.shape[0], 1)
        if coords is not None:
            if coords.shape[0] != corners.shape[0]:
                raise ValueError(f"box and point_coords must describe the same number of prompts, got "
                                 f"{corners.shape[0]} boxes and {coords.shape[0]} point sets")
            coords, labels = torch.cat([corners, coords], dim=1), torch.cat([corner_labels, labels.int()], dim=1)
        else:
            coords, labels = corners, corner_labels
    count = coords.shape[0] if coords is not None else mask_input.shape[0] if mask_input is not None else 0
    if count == 0 and coords is None:
        raise ValueError("a prediction needs point_coords, box or mask_input; all are None")
    if mask_input is not None:
        if mask_input.dim() != 4 or mask_input.shape[1] != 1:
            raise ValueError(f"mask_input must be (1, H, W) or (B, 1, H, W) low-res logits, got "
                             f"{tuple(mask_input.shape)}")
        if mask_input.shape[0] == 1 and count > 1:  # one mask for every prompt: SAM 2 broadcasts it
            mask_input = mask_input.expand(count, -1, -1, -1)
        elif mask_input.shape[0] != count:
            raise ValueError(f"mask_input must hold 1 or {count} masks (one per prompt), got {mask_input.shape[0]}")
    return coords, labels, mask_input, count


__all__ = ["Sam2FastPredictor"]
