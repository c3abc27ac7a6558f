"""``evaluate(student, teacher, images)``: how close a student is to its teacher, and how much faster.

Per image, ``prompts_per_image`` objects are drawn from the teacher's masks exactly as in training
(:func:`sam_fast.distill.prompts.object_prompts`, seeded by ``seed`` and the image's index, so every
student is scored on the same prompts). For a point prompt both models give three masks and each keeps
the one *it* predicts best (as a user of ``SamPredictor`` would); a box prompt gives one mask. The score
is the IoU of the two masks' foregrounds at the decoder's low resolution (a quarter of the input side)
over the image, not its padding; mIoU is the mean over all prompts of that kind. The embedding SQNR (dB)
is over all images' embeddings together. Encoder speed is images per second at batch 1 after one warm-up
image, each encoder timed on the same preprocessed images.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Dict, Optional, Sequence

import numpy as np
import torch
from torch import nn

from .._args import int_arg
from ..images import list_images, normalize, read_rgb, resize_pad
from ..metrics import ratio_db
from ..surgery import PIXEL_MEAN, PIXEL_STD, sam_image_encoder
from .prompts import best_masks, decode, mask_iou, object_prompts, sample_generator

PROMPT_KINDS = ("points", "boxes")


@dataclasses.dataclass
class EvalResult:
    """Attributes: ``images``; ``miou`` {prompt kind: mIoU against the teacher}; ``prompts`` {kind: count};
    ``sqnr_db`` of the student's embeddings; ``student_ips`` / ``teacher_ips`` encoder images/s."""

    images: int
    miou: Dict[str, float]
    prompts: Dict[str, int]
    sqnr_db: float
    student_ips: float
    teacher_ips: float

    @property
    def speedup(self) -> float:
        return self.student_ips / self.teacher_ips if self.teacher_ips else math.nan

    def table(self) -> str:
        lines = [f"{'metric':<28} {'value':>10}", f"{'images':<28} {self.images:>10}"]
        for kind, v in self.miou.items():
            lines.append(f"{'mask mIoU vs teacher, ' + kind:<28} {v:>10.4f}   ({self.prompts[kind]} prompts)")
        lines += [f"{'embedding SQNR (dB)':<28} {self.sqnr_db:>10.2f}",
                  f"{'teacher encoder images/s':<28} {self.teacher_ips:>10.3g}",
                  f"{'student encoder images/s':<28} {self.student_ips:>10.3g}   ({self.speedup:.2f}x)"]
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return dict(dataclasses.asdict(self), speedup=self.speedup)


def _as_images(images):
    """Arrays stay arrays; a folder or list of paths is read (unreadable files are an error here: evaluation
    images are few and chosen)."""
    if isinstance(images, np.ndarray) and images.ndim == 3:
        return [images]
    if isinstance(images, (list, tuple)) and images and all(isinstance(a, np.ndarray) for a in images):
        return list(images)
    out = []
    for p in list_images(images, "images"):
        try:
            out.append(read_rgb(p))
        except Exception as exc:
            raise ValueError(f"images: cannot read {p} ({type(exc).__name__}: {exc})") from exc
    return out


def _ips(encoder: nn.Module, inputs: Sequence[torch.Tensor]) -> float:
    sync = torch.cuda.synchronize if inputs[0].is_cuda else (lambda: None)
    encoder(inputs[0])
    sync()
    t0 = time.perf_counter()
    for x in inputs:
        encoder(x)
    sync()
    return len(inputs) / max(time.perf_counter() - t0, 1e-9)


@torch.no_grad()
def evaluate(student: nn.Module, teacher: nn.Module, images, *, prompts: Sequence[str] = PROMPT_KINDS,
             prompts_per_image: int = 8, seed: int = 0, device=None, progress: bool = True,
             timing: bool = True) -> EvalResult:
    """Score ``student`` against ``teacher`` (both segment_anything ``Sam``) on ``images`` (a folder, a list of
    paths, or HxWx3 uint8 arrays): mask mIoU for ``prompts`` (``"points"``, ``"boxes"`` or both), embedding
    SQNR and encoder images/s (module docstring; ``timing=False`` skips the timing, the speeds are then NaN).
    Both models are used in eval mode and left as they were."""
    from tqdm import tqdm

    if isinstance(prompts, str):
        prompts = (prompts,)
    bad = [p for p in prompts if p not in PROMPT_KINDS]
    if bad or not prompts:
        raise ValueError(f"prompts must be 'points', 'boxes' or both, got {prompts!r}")
    prompts_per_image = int_arg(prompts_per_image, "prompts_per_image", 1)
    t_enc, s_enc = sam_image_encoder(teacher, "teacher"), sam_image_encoder(student, "student")
    if int(t_enc.img_size) != int(s_enc.img_size):
        raise ValueError(f"student: its encoder takes {s_enc.img_size}-pixel images, the teacher's {t_enc.img_size}")
    arrays = _as_images(images)
    if device is None:
        device = next(teacher.parameters()).device
    device = torch.device(device)
    img_size = int(t_enc.img_size)
    mean = getattr(teacher, "pixel_mean", torch.tensor(PIXEL_MEAN)).flatten().tolist()
    std = getattr(teacher, "pixel_std", torch.tensor(PIXEL_STD)).flatten().tolist()
    modes = (teacher.training, student.training)
    teacher.eval().to(device)
    student.eval().to(device)
    try:
        inputs, hws = [], []
        for a in arrays:
            u8, hw = resize_pad(a, img_size)
            hw_t = torch.tensor([hw], device=device)
            inputs.append(normalize(torch.from_numpy(u8)[None].to(device), hw_t, mean, std))
            hws.append(hw)
        ious: Dict[str, list] = {k: [] for k in prompts}
        signal = noise = 0.0
        for n, (x, hw) in enumerate(tqdm(list(zip(inputs, hws)), desc="evaluate", unit="image", disable=not progress)):
            t_emb, s_emb = t_enc(x)[0].float(), s_enc(x)[0].float()
            signal += t_emb.double().pow(2).sum().item()
            noise += (s_emb.double() - t_emb.double()).pow(2).sum().item()
            points, boxes, _ = object_prompts(teacher, t_emb, hw, prompts_per_image, sample_generator(seed, n))
            for kind, p in (("points", points), ("boxes", boxes)):
                if kind not in prompts:
                    continue
                t_low, t_iou = decode(teacher, t_emb, p)
                s_low, s_iou = decode(student, s_emb, p)
                ious[kind].append(mask_iou(best_masks(s_low, s_iou), best_masks(t_low, t_iou), hw, img_size).cpu())
        sqnr = ratio_db(signal, noise)
        teacher_ips = _ips(t_enc, inputs) if timing else math.nan
        student_ips = _ips(s_enc, inputs) if timing else math.nan
    finally:
        teacher.train(modes[0])
        student.train(modes[1])
    miou = {k: float(torch.cat(v).mean()) for k, v in ious.items()}
    return EvalResult(images=len(arrays), miou=miou, prompts={k: sum(len(t) for t in v) for k, v in ious.items()},
                      sqnr_db=sqnr, student_ips=student_ips, teacher_ips=teacher_ips)


def plot_results(results: Dict[str, EvalResult], path: str, title: Optional[str] = None) -> str:
    """Bars of several students' results side by side (e.g. ``{"dilated, undistilled": r0, "DLD": r1}``): mask
    mIoU per prompt kind, embedding SQNR, and encoder speedup over the teacher. Returns ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    kinds = [k for k in PROMPT_KINDS if any(k in r.miou for r in results.values())]
    fig, axes = plt.subplots(1, 3, figsize=(4 + 2.2 * len(names), 4))
    width = 0.8 / max(len(kinds), 1)
    for j, kind in enumerate(kinds):
        axes[0].bar([i + j * width for i in range(len(names))], [results[n].miou.get(kind, np.nan) for n in names],
                    width, label=kind)
    axes[0].set_title("mask mIoU vs teacher")
    axes[0].set_ylim(0, 1)
    axes[0].legend()
    axes[1].bar(range(len(names)), [results[n].sqnr_db for n in names], color="tab:green")
    axes[1].set_title("embedding SQNR (dB)")
    axes[2].bar(range(len(names)), [results[n].speedup for n in names], color="tab:purple")
    axes[2].axhline(1.0, color="grey", lw=0.8)
    axes[2].set_title("encoder speed vs teacher (x)")
    for ax in axes:
        ax.set_xticks([i + (len(kinds) - 1) * width / 2 if ax is axes[0] else i for i in range(len(names))])
        ax.set_xticklabels(names, rotation=20, ha="right", fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


__all__ = ["EvalResult", "PROMPT_KINDS", "evaluate", "plot_results"]
