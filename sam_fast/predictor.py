"""``SamFastPredictor``: segment_anything's ``SamPredictor`` on the batched decoder and fused post-processing.

Everything ``SamPredictor`` offers works unchanged (``set_image``, ``set_torch_image``, ``predict``,
``predict_torch``, ``get_image_embedding``, ``reset_image``, ``transform``) with the same results:
``predict_torch`` decodes through :class:`sam_fast.nn.BatchedMaskDecoder` (no per-prompt copy of the
image embedding) and thresholds through ``sam_fast::mask_postprocess`` (no full-resolution float masks);
``return_logits=True`` upsamples exactly as segment_anything does.

On top of it, a batch API: :meth:`SamFastPredictor.set_images` encodes several images in one encoder
batch and :meth:`SamFastPredictor.predict_batch` takes a prompt set per image and decodes every prompt
of every image in as few decoder calls as there are prompt structures.
"""

from __future__ import annotations

import threading
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from segment_anything import SamPredictor

from ._dispatch import check_backend_name
from .coco import coco_record
from .nn.decoder import BatchedMaskDecoder
from .ops.mask_postprocess import mask_postprocess, rles_to_coco
from .reference.mask_postprocess import upsample_logits

POSTPROCESS_BACKENDS = ("auto", "cuda", "cpu", "reference")  # sam_fast::mask_postprocess's


def check_image_size(hw, img_size: Optional[int], name: str = "image") -> None:
    """ValueError unless SAM can resize an (H, W) image: both sides at least 1 pixel after its long side
    is scaled to ``img_size`` (a 1-pixel side of a long image rounds to 0). ``img_size=None`` (SAM 2, which
    resizes any image to its square input): only that the image is not empty."""
    h, w = int(hw[0]), int(hw[1])
    if h < 1 or w < 1:
        raise ValueError(f"{name} is empty ({h}x{w} pixels)")
    if img_size is not None and int(min(h, w) * img_size / max(h, w) + 0.5) < 1:
        raise ValueError(f"{name} is {w}x{h} pixels: resized to SAM's {img_size} on its long side, its short side "
                         "becomes 0 pixels")


def _integer_labels(labels, name: str) -> np.ndarray:
    """Point labels as ints: 1 foreground, 0 background, -1 padding; floats must be whole numbers
    (segment_anything truncates 0.5 to 0, background)."""
    arr = np.asarray(labels)
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all() or (arr != np.round(arr)).any():
            raise ValueError(f"{name} must be whole numbers (1 foreground, 0 background, -1 padding), got "
                             f"{arr.ravel()[:6].tolist()}")
        arr = arr.astype(np.int64)
    elif arr.dtype.kind not in "iub":
        raise TypeError(f"{name} must be integers, got dtype {arr.dtype}")
    return arr


class _PerThread:
    """An attribute kept per thread: the image state of a predictor that several threads share."""

    def __init__(self, default=None):
        self.default = default

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, obj, owner=None):
        if obj is None:
            return self
        return getattr(obj._thread_state(), self.name, self.default)

    def __set__(self, obj, value):
        setattr(obj._thread_state(), self.name, value)


class SamFastPredictor(SamPredictor):
    """Drop-in for ``segment_anything.SamPredictor(sam)``.

    Args:
        sam_model: a segment_anything ``Sam`` (possibly patched with :func:`sam_fast.apply`).
        backend: backend of the post-processing op ("auto", "cuda", "cpu", "reference").

    The model is read at call time: replacing ``sam.mask_decoder`` or ``sam.prompt_encoder`` (or the
    predictor's ``model``) after construction takes effect at the next call, as in segment_anything.

    Threads: the image state (what :meth:`set_image` / :meth:`set_images` computed) is kept per thread,
    so threads sharing one predictor each get the masks of the image they set (segment_anything's
    predictor gives whichever image was set last); an image set in one thread is not visible in another.
    The model's weights are shared. :func:`sam_fast.record_backends` records the calling thread only.
    """

    # per-thread image state (segment_anything's attributes and the batch of set_images)
    features = _PerThread()
    original_size = _PerThread()
    input_size = _PerThread()
    is_image_set = _PerThread(False)
    orig_h = _PerThread()
    orig_w = _PerThread()
    input_h = _PerThread()
    input_w = _PerThread()
    _batch = _PerThread()

    def __new__(cls, sam_model=None, *args, **kwargs):
        # A SAM 2 model gets SAM 2's predictor API (SAM2ImagePredictor's drop-in), not SamPredictor's.
        if cls is SamFastPredictor and _is_sam2_model(sam_model):
            from .predictor_sam2 import Sam2FastPredictor

            return Sam2FastPredictor(sam_model, *args, **kwargs)
        return super().__new__(cls)

    def __init__(self, sam_model, backend: str = "auto") -> None:
        self.backend = check_backend_name(backend)
        if self.backend not in POSTPROCESS_BACKENDS:
            raise ValueError(f"backend is the mask post-processing's: one of {POSTPROCESS_BACKENDS}, got {backend!r} "
                             "(the decoder's Triton kernels are chosen by 'auto')")
        self._decoder: Optional[BatchedMaskDecoder] = None
        super().__init__(sam_model)

    def _thread_state(self) -> threading.local:
        return self.__dict__.setdefault("_tls", threading.local())

    @property
    def decoder(self) -> BatchedMaskDecoder:
        """The batched decoder over the model's current prompt encoder and mask decoder (rebuilt, sharing
        their weights, when either module was replaced)."""
        d, m = self._decoder, self.model
        if d is None or d.prompt_encoder is not m.prompt_encoder or d.mask_decoder is not m.mask_decoder:
            self._decoder = d = BatchedMaskDecoder.from_sam(m)
        return d

    @property
    def padded_size(self) -> Tuple[int, int]:
        """The encoder's square input, (img_size, img_size): the size images are resized and padded to, and the
        frame the low-resolution masks cover (``mask_postprocess``'s ``padded_size``)."""
        s = self.model.image_encoder.img_size
        return (s, s)

    # -- single image: segment_anything's API -----------------------------------------------------------

    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        """As ``SamPredictor.set_image`` (an HxWx3 array, pixel values in [0, 255]), with named errors
        where segment_anything fails inside (a grey image) or asserts (an unknown format)."""
        if image_format not in ("RGB", "BGR"):
            raise ValueError(f"image_format must be 'RGB' or 'BGR', got {image_format!r}")
        if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image must be an HxWx3 array, got {getattr(image, 'shape', type(image).__name__)}")
        check_image_size(image.shape[:2], self.model.image_encoder.img_size)
        super().set_image(image, image_format)

    def predict(
        self,
        point_coords: Optional[np.ndarray] = None,
        point_labels: Optional[np.ndarray] = None,
        box: Optional[np.ndarray] = None,
        mask_input: Optional[np.ndarray] = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """As ``SamPredictor.predict``: one prompt given by ``point_coords`` (N, 2) with ``point_labels``
        (N,) in original-image pixels, and/or ``box`` (4,) XYXY, and/or ``mask_input`` (1, 256, 256)
        -> (masks (C, H, W), scores (C,), low-res logits (C, 256, 256)) as numpy arrays. Shapes are
        checked here with named errors (segment_anything asserts or fails inside)."""
        if not self.is_image_set:
            raise RuntimeError("An image must be set with .set_image(...) before mask prediction.")
        if (point_coords is None) != (point_labels is None):
            raise ValueError("point_coords and point_labels must be given together")
        if point_coords is not None:
            coords, labels = np.asarray(point_coords), _integer_labels(point_labels, "point_labels")
            if coords.ndim != 2 or coords.shape[1] != 2 or labels.shape != coords.shape[:1]:
                raise ValueError(f"point_coords must be (N, 2) with point_labels (N,), got {coords.shape} and "
                                 f"{labels.shape}")
            point_coords, point_labels = coords, labels  # (lists and tuples too: segment_anything wants arrays)
        if box is not None:
            box = np.asarray(box)
            if box.shape not in ((4,), (1, 4)):
                raise ValueError(f"box must be (4,) XYXY, got {box.shape}")
        if mask_input is not None:
            side = tuple(4 * s for s in self.model.prompt_encoder.image_embedding_size)
            mask_input = np.asarray(mask_input)
            if mask_input.shape != (1,) + side:
                raise ValueError(f"mask_input must be (1, {side[0]}, {side[1]}) low-res logits, got "
                                 f"{mask_input.shape}")
        return super().predict(point_coords, point_labels, box, mask_input, multimask_output, return_logits)

    @torch.no_grad()
    def set_torch_image(self, transformed_image: torch.Tensor, original_image_size: Tuple[int, ...]) -> None:
        """As ``SamPredictor.set_torch_image``; the normalised image is cast to the encoder's dtype, so a
        bf16 / fp16 model works (segment_anything feeds float32 to it and fails)."""
        size = self.model.image_encoder.img_size
        if (not isinstance(transformed_image, torch.Tensor) or transformed_image.dim() != 4
                or transformed_image.shape[1] != 3 or max(*transformed_image.shape[2:]) != size):
            raise ValueError(f"transformed_image must be (1, 3, H, W) with long side {size}, got "
                             f"{getattr(transformed_image, 'shape', type(transformed_image).__name__)}")
        self.reset_image()
        self.original_size = original_image_size
        self.input_size = tuple(transformed_image.shape[-2:])
        self.features = self.model.image_encoder(self._encoder_input(self.model.preprocess(transformed_image)))
        self.is_image_set = True

    def _encoder_input(self, x: torch.Tensor) -> torch.Tensor:
        weight = next(self.model.image_encoder.parameters(), None)
        return x if weight is None else x.to(weight.dtype)

    @torch.no_grad()
    def predict_torch(
        self,
        point_coords: Optional[torch.Tensor],
        point_labels: Optional[torch.Tensor],
        boxes: Optional[torch.Tensor] = None,
        mask_input: Optional[torch.Tensor] = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """As ``SamPredictor.predict_torch``: prompts (B, ...) in the input frame -> (masks (B, C, H, W),
        iou_predictions (B, C), low_res_logits (B, C, 256, 256))."""
        if not self.is_image_set:
            raise RuntimeError("An image must be set with .set_image(...) before mask prediction.")
        B = _prompt_count(point_coords, boxes, mask_input)
        index = torch.zeros(B, dtype=torch.int64, device=self.device)
        low_res, iou = self.decoder(self.features, index, point_coords, point_labels, boxes, mask_input,
                                    multimask_output)
        masks = self._masks(low_res, self.input_size, self.original_size, return_logits)
        # float32 out whatever the model's dtype (numpy has no bfloat16; SamPredictor.predict converts).
        return masks, iou.float(), low_res.float()

    def _masks(self, low_res, input_size, original_size, return_logits):
        P, M = low_res.shape[:2]
        if return_logits:
            up = upsample_logits(low_res.flatten(0, 1), self.padded_size, input_size, original_size)
            return up.view(P, M, *up.shape[-2:])
        out = mask_postprocess(low_res.flatten(0, 1), padded_size=self.padded_size, input_size=input_size,
                               original_size=original_size, mask_threshold=self.model.mask_threshold,
                               return_rle=False, return_masks=True, backend=self.backend)
        return out.masks.view(P, M, *out.masks.shape[-2:])

    # -- several images ---------------------------------------------------------------------------------

    @torch.no_grad()
    def set_images(self, images: Sequence[np.ndarray], image_format: str = "RGB", batch_size: int = 8) -> None:
        """Encode several HWC uint8 images (sizes may differ), ``batch_size`` per encoder call."""
        if isinstance(images, np.ndarray) and images.ndim == 3:
            raise TypeError("images must be a sequence of HWC arrays; for one image use set_image")
        if len(images) == 0:
            raise ValueError("images must hold at least one image, got an empty sequence")
        if image_format not in ("RGB", "BGR"):
            raise ValueError(f"image_format must be 'RGB' or 'BGR', got {image_format!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        tensors, input_sizes, original_sizes = [], [], []
        for i, image in enumerate(images):
            if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise ValueError(f"images[{i}] must be an HxWx3 uint8 array, got "
                                 f"{getattr(image, 'shape', type(image).__name__)} {getattr(image, 'dtype', '')}")
            check_image_size(image.shape[:2], self.model.image_encoder.img_size, f"images[{i}]")
            if image_format != self.model.image_format:
                image = image[..., ::-1]
            x = torch.as_tensor(self.transform.apply_image(image), device=self.device).permute(2, 0, 1)
            tensors.append(self.model.preprocess(x[None].contiguous())[0])
            input_sizes.append(tuple(x.shape[-2:]))
            original_sizes.append(tuple(image.shape[:2]))
        stacked = torch.stack(tensors)
        features = torch.cat([self.model.image_encoder(self._encoder_input(stacked[i:i + batch_size]))
                              for i in range(0, len(tensors), batch_size)])
        self.reset_image()
        self._batch = {"features": features, "input_sizes": input_sizes, "original_sizes": original_sizes}

    def reset_image(self) -> None:
        super().reset_image()
        self._batch = None

    @torch.no_grad()
    def predict_batch(
        self,
        prompts: Sequence[Dict[str, np.ndarray]],
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> List[Dict[str, torch.Tensor]]:
        """Decode a prompt set per image set by :meth:`set_images`, all images in one go.

        ``prompts[i]`` describes K_i prompts for image i in its original pixel coordinates:
        ``point_coords`` (K_i, n, 2) with ``point_labels`` (K_i, n), and/or ``boxes`` (K_i, 4), and/or
        ``mask_input`` (K_i, 1, 256, 256); a (n, 2) / (n,) / (4,) array is one prompt. An empty dict or
        K_i = 0 gives empty results for that image.

        Returns, per image, ``{"masks": (K_i, M, H, W) bool (float logits with return_logits),
        "iou_predictions": (K_i, M), "low_res_logits": (K_i, M, 256, 256)}``.
        """
        parsed, low, iou = self._decode_batch(prompts, multimask_output)
        results = []
        for i in range(len(parsed)):
            masks = self._masks(low[i], self._batch["input_sizes"][i], self._batch["original_sizes"][i], return_logits)
            results.append({"masks": masks, "iou_predictions": iou[i].float(), "low_res_logits": low[i].float()})
        return results

    @torch.no_grad()
    def coco_records(self, prompts: Sequence[Dict[str, np.ndarray]], multimask_output: bool = True) -> List[List[dict]]:
        """:meth:`predict_batch`'s masks as COCO records, per image (:func:`sam_fast.coco.coco_record`: COCO RLE,
        area, bbox, predicted_iou, point_coords, stability_score, crop_box, and box_prompt for a box prompt), made
        from the low-resolution logits in one post-processing pass: no full-size float mask is formed. A prompt
        gives its M masks in order (M = 3 with ``multimask_output``, else 1)."""
        parsed, low, iou = self._decode_batch(prompts, multimask_output)
        return [prompt_records(low[i], iou[i], prompt, self.padded_size, self._batch["input_sizes"][i],
                               self._batch["original_sizes"][i], self.model.mask_threshold, self.backend)
                for i, prompt in enumerate(prompts)]

    def _decode_batch(self, prompts, multimask_output: bool):
        """The decoder over a prompt set per image set by :meth:`set_images`: (parsed prompts, low-res logits
        (K_i, M, 4h, 4w) per image, IoU predictions (K_i, M) per image)."""
        if self._batch is None:
            raise RuntimeError("Images must be set with .set_images(...) before predict_batch.")
        batch = self._batch
        if len(prompts) != len(batch["input_sizes"]):
            raise ValueError(f"prompts must hold one entry per image set ({len(batch['input_sizes'])}), "
                             f"got {len(prompts)}")
        parsed = [self._parse(i, p) for i, p in enumerate(prompts)]
        # Prompts of the same structure, from all images, form one decoder call.
        groups: Dict[tuple, List[int]] = {}
        for i, item in enumerate(parsed):
            if item["count"]:
                groups.setdefault(item["key"], []).append(i)
        M = self.model.mask_decoder.num_mask_tokens - 1 if multimask_output else 1
        emb_h, emb_w = self.model.prompt_encoder.image_embedding_size
        side = 4 * emb_h, 4 * emb_w
        low = [None] * len(parsed)
        iou = [None] * len(parsed)
        for key, members in groups.items():
            index = torch.cat([torch.full((parsed[i]["count"],), i, dtype=torch.int64) for i in members])
            cat = {name: (torch.cat([parsed[i][name] for i in members]) if parsed[members[0]][name] is not None
                          else None) for name in ("coords", "labels", "boxes", "masks")}
            lo, io = self.decoder(batch["features"], index.to(self.device), cat["coords"], cat["labels"],
                                  cat["boxes"], cat["masks"], multimask_output)
            start = 0
            for i in members:
                n = parsed[i]["count"]
                low[i], iou[i] = lo[start:start + n], io[start:start + n]
                start += n
        dtype = self.model.mask_decoder.iou_token.weight.dtype
        for i in range(len(parsed)):
            if low[i] is None:
                low[i] = torch.zeros((0, M) + side, dtype=dtype, device=self.device)
                iou[i] = torch.zeros((0, M), dtype=dtype, device=self.device)
        return parsed, low, iou

    def _parse(self, i: int, prompt) -> dict:
        check_prompt_dict(i, prompt)
        original_size = self._batch["original_sizes"][i]
        coords = prompt.get("point_coords")
        labels = prompt.get("point_labels")
        boxes = prompt.get("boxes")
        masks = prompt.get("mask_input")
        counts = []
        if (coords is None) != (labels is None):
            raise ValueError(f"prompts[{i}]: point_coords and point_labels must be given together")
        if coords is not None:
            coords = np.asarray(coords, dtype=np.float64)
            labels = _integer_labels(labels, f"prompts[{i}] point_labels")
            if coords.ndim == 2:
                coords, labels = coords[None], labels[None]
            if coords.ndim != 3 or coords.shape[-1] != 2 or labels.shape != coords.shape[:2]:
                raise ValueError(f"prompts[{i}]: point_coords must be (K, n, 2) with point_labels (K, n), got "
                                 f"{coords.shape} and {labels.shape}")
            counts.append(coords.shape[0])
            coords = torch.as_tensor(self.transform.apply_coords(coords, original_size), dtype=torch.float,
                                     device=self.device)
            labels = torch.as_tensor(labels, dtype=torch.int, device=self.device)
        if boxes is not None:
            boxes = np.asarray(boxes, dtype=np.float64)
            if boxes.ndim == 1:
                boxes = boxes[None]
            if boxes.ndim != 2 or boxes.shape[1] != 4:
                raise ValueError(f"prompts[{i}]: boxes must be (K, 4) XYXY, got {boxes.shape}")
            counts.append(boxes.shape[0])
            boxes = torch.as_tensor(self.transform.apply_boxes(boxes, original_size), dtype=torch.float,
                                    device=self.device)
        if masks is not None:
            masks = torch.as_tensor(np.asarray(masks), dtype=torch.float, device=self.device)
            if masks.dim() == 3:
                masks = masks[None]
            counts.append(masks.shape[0])
        if len(set(counts)) > 1:
            raise ValueError(f"prompts[{i}]: point_coords, boxes and mask_input must describe the same number of "
                             f"prompts, got {counts}")
        count = counts[0] if counts else 0
        key = (None if coords is None else coords.shape[1], boxes is not None, masks is not None)
        return {"count": count, "key": key, "coords": coords, "labels": labels, "boxes": boxes, "masks": masks}


def check_prompt_dict(i: int, prompt) -> None:
    """``prompts[i]`` of a batch API: a dict whose keys are among point_coords, point_labels, boxes, mask_input."""
    if not isinstance(prompt, dict):
        raise TypeError(f"prompts[{i}] must be a dict of arrays, got {type(prompt).__name__}")
    unknown = set(prompt) - {"point_coords", "point_labels", "boxes", "mask_input"}
    if unknown:
        raise ValueError(f"prompts[{i}] has unknown keys {sorted(unknown)}; expected point_coords, point_labels, "
                         "boxes, mask_input")


def prompt_records(low: torch.Tensor, iou: torch.Tensor, prompt: Dict[str, np.ndarray], padded_size, input_size,
                   original_size, mask_threshold: float, backend: str) -> List[dict]:
    """COCO records of one image's K prompts x M masks from their low-resolution logits (K, M, h, w) and IoU (K, M), in
    one post-processing pass; ``prompt`` is the prompt set they were decoded from (its points and boxes, in image
    pixels, go into the records)."""
    K, M = low.shape[:2]
    if K == 0:
        return []
    H, W = original_size
    post = mask_postprocess(low.flatten(0, 1), padded_size=padded_size, input_size=input_size, original_size=(H, W),
                            mask_threshold=mask_threshold, return_rle=True, backend=backend)
    segs = rles_to_coco(post.rle_counts, post.rle_offsets, (H, W))
    points = prompt.get("point_coords")
    points = [] if points is None else np.asarray(points, dtype=np.float64).reshape(K, -1, 2).tolist()
    boxes = prompt.get("boxes")
    boxes = None if boxes is None else np.asarray(boxes, dtype=np.float64).reshape(K, 4).tolist()
    scores = iou.float().tolist()
    return [coco_record(segs[k * M + m], int(post.area[k * M + m]), post.boxes[k * M + m], scores[k][m],
                        points[k] if points else [], float(post.stability_score[k * M + m]), (0, 0, W, H),
                        box_prompt=None if boxes is None else boxes[k])
            for k in range(K) for m in range(M)]


def _is_sam2_model(model) -> bool:
    from .checkpoint import is_sam2_model

    return is_sam2_model(model)


def _prompt_count(point_coords, boxes, mask_input) -> int:
    for t in (point_coords, boxes, mask_input):
        if t is not None:
            return t.shape[0]
    raise ValueError("predict_torch needs point_coords, boxes or mask_input; all are None")
