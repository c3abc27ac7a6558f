"""``prune``: SlimSAM's alternate slimming of a SAM image encoder, end to end.

1. score the channels (disturbed Taylor on the images, or magnitude), narrow the embedding (residual) width, and
   recover by distilling from the original model (:func:`sam_fast.distill.distill`: its loop, teacher cache, resume
   and torchrun support);
2. score again on the recovered model, narrow every block's head dim and MLP width, and recover again.

Each stage ends in ``<out_dir>/<stage>/pruned.pth`` (a :func:`sam_fast.save_sam` checkpoint); a rerun with the same
settings takes a finished stage from there, and an unfinished one resumes its distillation. ``<out_dir>/prune.json``
records the settings: a rerun with other ones is refused before any work.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Dict, List, Optional

import torch
from torch import nn

from .._args import float_arg, int_arg
from .._files import write_atomic
from ..checkpoint import load_sam, save_sam
from ..distill import DistillConfig, distill
from ..metrics import sqnr_db
from .importance import _encoder_inputs, taylor_scores
from .prune import MODES, magnitude_scores, plan_widths, prune_to_widths

IMPORTANCE = ("disturbed_taylor", "magnitude")
STAGES = ("embed", "bottleneck")


@dataclasses.dataclass
class PruneResult:
    """What :func:`prune` made: the pruned ``model`` (a ``Sam``), its ``widths``, the parameter counts, and per stage
    its checkpoint and the embedding SQNR against the original model before and after recovery."""

    model: nn.Module
    widths: Dict[str, object]
    params_before: int
    params_after: int
    stages: List[Dict[str, object]]

    def summary(self) -> str:
        lines = [f"{'stage':<12} {'encoder params':>15} {'SQNR pruned (dB)':>17} {'recovered (dB)':>15}"]
        for s in self.stages:
            lines.append(f"{s['stage']:<12} {s['params']:>15,} {s['sqnr_pruned_db']:>17.2f} {s['sqnr_db']:>15.2f}")
        lines.append(f"encoder parameters {self.params_before:,} -> {self.params_after:,} "
                     f"({self.params_after / self.params_before:.1%})")
        return "\n".join(lines)


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.image_encoder.parameters())


def _embedding(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    enc = model.image_encoder
    was = enc.training
    try:
        with torch.no_grad():
            return torch.cat([enc.eval()(x[i:i + 4].to(next(enc.parameters()).device)) for i in range(0, len(x), 4)])
    finally:
        enc.train(was)


def prune(model: nn.Module, images, *, out_dir: str, ratio: Optional[float] = None,
          widths: Optional[Dict[str, object]] = None, mode: str = "uniform", importance: str = "disturbed_taylor",
          sigma: float = 0.01, num_images: int = 64, recover: Optional[DistillConfig] = None,
          eval_images: int = 4, device=None, progress: bool = True) -> PruneResult:
    """Prune ``model`` (a segment_anything ``Sam``; not modified) in SlimSAM's two stages (module docstring).

    Args:
        images: a folder or list of image files: for the importance scores, the recovery and the SQNR figures.
        out_dir: where each stage's checkpoint and distillation run go.
        ratio: the fraction of channels removed (``plan_widths(model, ratio, mode)``), or
        widths: ``{"embed": int, "head_dim": int | [per block], "mlp": int | [per block]}`` (not both).
        mode: ``"uniform"`` or ``"global"`` (with ``ratio``).
        importance: ``"disturbed_taylor"`` (``sigma``, ``num_images``) or ``"magnitude"``.
        recover: the distillation of each stage (default ``DistillConfig(method="dld")``: block-wise, through the
            width adapters).
        eval_images: images whose embedding SQNR against the original is reported.
        device, progress: handed to each stage's :func:`sam_fast.distill.distill`.
    """
    if (ratio is None) == (widths is None):
        raise ValueError("give ratio or widths (one of them)")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if importance not in IMPORTANCE:
        raise ValueError(f"importance must be one of {IMPORTANCE}, got {importance!r}")
    sigma = float_arg(sigma, "sigma", minimum=0)
    num_images = int_arg(num_images, "num_images", 1)
    eval_images = int_arg(eval_images, "eval_images", 1)
    recover = DistillConfig(method="dld") if recover is None else recover
    if not isinstance(recover, DistillConfig):
        raise TypeError(f"recover must be a sam_fast.distill.DistillConfig, got {type(recover).__name__}")
    if not isinstance(getattr(model, "image_encoder", None), nn.Module):
        raise TypeError(f"model must be a segment_anything Sam, got {type(model).__name__}")

    def scores(m):
        if importance == "magnitude":
            return magnitude_scores(m)
        return taylor_scores(m, images, sigma=sigma, num_images=num_images)

    if widths is None:
        plan = plan_widths(model, ratio, mode, scores=scores(model) if mode == "global" else None)
    else:
        if not isinstance(widths, dict) or not set(widths) <= {"embed", "head_dim", "mlp"}:
            raise ValueError(f"widths must be a dict with keys among 'embed', 'head_dim', 'mlp', got {widths!r}")
        plan = dict(widths)
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    settings = {"plan": plan, "ratio": ratio, "mode": mode, "importance": importance, "sigma": sigma,
                "num_images": num_images, "recover": dataclasses.asdict(recover), "params": _params(model)}
    record = os.path.join(out_dir, "prune.json")
    if os.path.isfile(record):
        with open(record) as f:
            before = json.load(f)
        if before != json.loads(json.dumps(settings, default=repr)):
            changed = sorted(k for k in settings if json.dumps(before.get(k), default=repr) !=
                             json.dumps(settings[k], default=repr))
            raise ValueError(f"out_dir {out_dir} holds a pruning run with other settings ({', '.join(changed)}): use "
                             "another out_dir")
    else:
        def write(tmp):
            with open(tmp, "w") as f:
                json.dump(settings, f, default=repr, indent=1)

        write_atomic(record, write)

    x = _encoder_inputs(model, images, eval_images)
    reference = _embedding(model, x)
    stages, current = [], model
    for stage in STAGES:
        done = os.path.join(out_dir, stage, "pruned.pth")
        if stage == "embed":
            narrow = {"embed": plan.get("embed")}
        else:
            narrow = {"head_dim": plan.get("head_dim"), "mlp": plan.get("mlp")}
        if os.path.isfile(done):
            pruned_sqnr = float("nan")  # (measured by the run that made it)
            current = load_sam(done)
        else:
            student = prune_to_widths(current, scores=scores(current), **narrow)
            pruned_sqnr = sqnr_db(reference, _embedding(student, x))
            distill(model, student, images, out_dir=os.path.join(out_dir, stage), config=recover, device=device,
                    progress=progress)
            save_sam(student, done)
            current = student
        stages.append({"stage": stage, "checkpoint": done, "params": _params(current),
                       "sqnr_pruned_db": pruned_sqnr, "sqnr_db": sqnr_db(reference, _embedding(current, x))})
    return PruneResult(model=current, widths=plan, params_before=_params(model), params_after=_params(current),
                       stages=stages)


__all__ = ["IMPORTANCE", "PruneResult", "STAGES", "prune"]
