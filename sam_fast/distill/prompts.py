"""Prompts drawn from the teacher's masks, and the decoder runs that training and evaluation share.

For an image, :func:`object_prompts` draws ``k`` seed points uniformly over the image (not its padding),
asks the *teacher* for masks at each (multimask, keeping the one with the highest predicted IoU) and
turns each such object into two prompts: the seed point (foreground) and the object's bounding box (a
box around the seed point when the mask is empty). Prompts are in the encoder's input coordinates, as
``Sam``'s prompt encoder takes them after ``ResizeLongestSide``.

:func:`hard_point` is the online hard-prompt step: it draws a new point where the student's mask and the
teacher's disagree, labelled with the teacher's answer there (foreground inside the teacher's mask,
background outside), so the next round trains on the student's mistakes.

All draws come from a ``torch.Generator`` seeded per image and step (:func:`sample_generator`), so a run
is repeatable and independent of how the batch is split across processes.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Optional, Tuple

import torch
from torch import nn


def sample_generator(seed: int, *parts: int) -> torch.Generator:
    """A CPU generator seeded from ``seed`` and e.g. (step, image index): the same numbers on every rank."""
    digest = hashlib.sha256(repr((int(seed),) + tuple(int(p) for p in parts)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


@dataclasses.dataclass
class Prompts:
    """``k`` prompts of one image, input coordinates: points (k, n, 2) and labels (k, n), or boxes (k, 4)."""

    points: Optional[torch.Tensor] = None
    labels: Optional[torch.Tensor] = None
    boxes: Optional[torch.Tensor] = None

    @property
    def multimask(self) -> bool:
        """segment_anything's convention: three masks for a single point, one otherwise."""
        return self.boxes is None and self.points is not None and self.points.shape[1] == 1


def decode(sam: nn.Module, embedding: torch.Tensor, prompts: Prompts) -> Tuple[torch.Tensor, torch.Tensor]:
    """``sam``'s prompt encoder and mask decoder for one image embedding (C, h, w) and its prompts:
    (k, m, 4h, 4w) low-resolution mask logits and (k, m) predicted IoUs, m = 3 if multimask else 1."""
    pts = None if prompts.points is None else (prompts.points, prompts.labels)
    sparse, dense = sam.prompt_encoder(points=pts, boxes=prompts.boxes, masks=None)
    low, iou = sam.mask_decoder(image_embeddings=embedding[None].to(sparse.dtype),
                                image_pe=sam.prompt_encoder.get_dense_pe(), sparse_prompt_embeddings=sparse,
                                dense_prompt_embeddings=dense, multimask_output=prompts.multimask)
    return low.float(), iou.float()


def _valid(low_res_hw, input_hw, img_size: int, device) -> torch.Tensor:
    """(h', w') bool: the low-resolution pixels that fall inside the image, not its padding."""
    lh, lw = low_res_hw
    ys = (torch.arange(lh, device=device) + 0.5) * (img_size / lh)
    xs = (torch.arange(lw, device=device) + 0.5) * (img_size / lw)
    return (ys[:, None] < float(input_hw[0])) & (xs[None, :] < float(input_hw[1]))


def best_masks(low: torch.Tensor, iou: torch.Tensor) -> torch.Tensor:
    """(k, h', w') the mask with the highest predicted IoU of each prompt."""
    pick = iou.argmax(dim=1)
    return low[torch.arange(low.shape[0], device=low.device), pick]


@torch.no_grad()
def object_prompts(teacher: nn.Module, embedding: torch.Tensor, input_hw, k: int, gen: torch.Generator
                   ) -> Tuple[Prompts, Prompts, torch.Tensor]:
    """Point prompts (k, 1) and box prompts (k, 4) around ``k`` teacher objects of one image (module
    docstring), and the objects' (k, h', w') teacher logits."""
    img_size = int(teacher.image_encoder.img_size)
    dev = embedding.device
    h, w = int(input_hw[0]), int(input_hw[1])
    xy = torch.rand(k, 2, generator=gen) * torch.tensor([w, h], dtype=torch.float32)
    seeds = Prompts(points=xy[:, None].to(dev), labels=torch.ones(k, 1, dtype=torch.int64, device=dev))
    low, iou = decode(teacher, embedding, seeds)
    objects = best_masks(low, iou)
    scale = img_size / objects.shape[-1]
    fg = (objects > 0) & _valid(objects.shape[-2:], input_hw, img_size, dev)
    boxes = torch.empty(k, 4)
    for i in range(k):
        ys, xs = torch.nonzero(fg[i].cpu(), as_tuple=True)
        if len(ys):
            boxes[i] = torch.tensor([xs.min() * scale, ys.min() * scale, (xs.max() + 1) * scale,
                                     (ys.max() + 1) * scale])
        else:
            r = img_size / 16
            x, y = xy[i].tolist()
            boxes[i] = torch.tensor([max(x - r, 0.0), max(y - r, 0.0), min(x + r, w), min(y + r, h)])
    return seeds, Prompts(boxes=boxes.to(dev)), objects


def hard_point(prompts: Prompts, student_masks: torch.Tensor, teacher_masks: torch.Tensor, input_hw, img_size: int,
               gen: torch.Generator) -> Prompts:
    """``prompts`` (points) with one more point per prompt, drawn where the (k, h', w') student and teacher
    logits disagree in sign (anywhere in the image when they agree everywhere), labelled with the
    teacher's sign there."""
    dev = teacher_masks.device
    valid = _valid(teacher_masks.shape[-2:], input_hw, img_size, dev).cpu()
    t_fg = (teacher_masks.detach() > 0).cpu()
    wrong = (((student_masks.detach() > 0).cpu() ^ t_fg) & valid)
    scale = img_size / teacher_masks.shape[-1]
    new_xy, new_lab = [], []
    for i in range(teacher_masks.shape[0]):
        where = torch.nonzero(wrong[i] if wrong[i].any() else valid, as_tuple=False)
        y, x = where[int(torch.randint(len(where), (1,), generator=gen))].tolist()
        new_xy.append([(x + 0.5) * scale, (y + 0.5) * scale])
        new_lab.append(int(t_fg[i, y, x]))
    pts = torch.cat([prompts.points, torch.tensor(new_xy, device=dev)[:, None]], dim=1)
    labels = torch.cat([prompts.labels, torch.tensor(new_lab, device=dev)[:, None]], dim=1)
    return Prompts(points=pts, labels=labels)


def mask_iou(a: torch.Tensor, b: torch.Tensor, input_hw, img_size: int) -> torch.Tensor:
    """(k,) IoU of the signs of (k, h', w') logits ``a`` and ``b`` over the image (not its padding); two
    empty masks agree (IoU 1)."""
    valid = _valid(a.shape[-2:], input_hw, img_size, a.device)
    fa, fb = (a > 0) & valid, (b > 0) & valid
    inter = (fa & fb).flatten(1).sum(1).float()
    union = (fa | fb).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))
