"""``prune``: compress a SAM image encoder in stages, each recovered by distillation from the original model.

0. ``attention`` (with ``drop_attention=k``): DC-ViT's block compression - the k blocks whose attention matters
   least, measured on the images, keep only their MLP (:func:`sam_fast.compress.drop_attention`);
1. ``embed``: SlimSAM's first step - score the channels (disturbed Taylor on the images, or magnitude) and narrow the
   embedding (residual) width;
2. ``bottleneck``: score again on the recovered model and narrow every block's head dim and MLP width.

A stage that would remove nothing is skipped. Each stage is recovered with :func:`sam_fast.distill.distill` (its
loop, teacher cache, resume and torchrun support) and ends in ``<out_dir>/<stage>/pruned.pth`` (a
:func:`sam_fast.save_sam` checkpoint) and ``report.json`` (its parameters, MACs, wall time, and embedding SQNR and
point / box mask mIoU against the original before and after recovery). A rerun with the same settings takes a
finished stage from there, and an unfinished one resumes its distillation. ``<out_dir>/prune.json`` records the
settings: a rerun with other ones is refused before any work.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Dict, List, Optional

from torch import nn

from .._args import float_arg, int_arg
from .._files import write_json_atomic
from ..checkpoint import load_sam, save_sam
from ..distill import DistillConfig, distill
from ..images import list_images, read_rgb
from .blocks import drop_attention as _drop_attention
from .importance import taylor_scores
from .prune import MODES, channel_groups, magnitude_scores, plan_widths, prune_to_widths, target_widths
from .report import closeness, encoder_macs, encoder_params

IMPORTANCE = ("disturbed_taylor", "magnitude")
STAGES = ("attention", "embed", "bottleneck")


def _pair(row: Dict[str, object], key: str, fmt: str) -> str:
    before, after = row["pruned"][key], row["recovered"][key]
    return f"{format(before, fmt)} -> {format(after, fmt)}"


@dataclasses.dataclass
class PruneResult:
    """What :func:`prune` made: the compressed ``model`` (a ``Sam``), the ``widths`` it was pruned to (None when
    no width was pruned) and the blocks that lost their attention, the original's and the result's encoder
    parameters and MACs, and per stage (``stages``, in order) a dict: ``stage``, ``checkpoint``, ``params``,
    ``macs``, ``seconds`` (scoring, pruning and recovery), ``pruned`` and ``recovered`` (each ``{"sqnr_db",
    "points", "boxes"}``: embedding SQNR and point / box mask mIoU against the original), and the stage's
    ``widths`` or ``blocks``."""

    model: nn.Module
    widths: Optional[Dict[str, object]]
    blocks_without_attention: List[int]
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    stages: List[Dict[str, object]]

    def summary(self) -> str:
        """The report as a table: a row per stage, the original first."""
        head = (f"{'stage':<11} {'params':>12} {'GMACs':>8} {'SQNR dB (pruned -> recovered)':>30} "
                f"{'point mIoU':>15} {'box mIoU':>15} {'time':>9}")
        lines = [head, f"{'original':<11} {self.params_before:>12,} {self.macs_before / 1e9:>8.3g}"]
        for r in self.stages:
            lines.append(f"{r['stage']:<11} {r['params']:>12,} {r['macs'] / 1e9:>8.3g} "
                         f"{_pair(r, 'sqnr_db', '.2f'):>30} {_pair(r, 'points', '.3f'):>15} "
                         f"{_pair(r, 'boxes', '.3f'):>15} {r['seconds']:>8.1f}s")
        lines.append(f"encoder: {self.params_before:,} -> {self.params_after:,} parameters "
                     f"({self.params_after / self.params_before:.1%}), {self.macs_before / 1e9:.3g} -> "
                     f"{self.macs_after / 1e9:.3g} GMACs ({self.macs_after / self.macs_before:.1%}) per image")
        return "\n".join(lines)


def _write_json(path: str, value) -> None:
    write_json_atomic(path, value, default=repr, indent=1)


def _settings_guard(out_dir: str, settings: dict, resume: bool) -> None:
    record = os.path.join(out_dir, "prune.json")
    if not os.path.isfile(record):
        _write_json(record, settings)
        return
    if not resume:
        raise ValueError(f"out_dir {out_dir} holds a pruning run: resume=True (sam-fast prune --resume) continues "
                         "it, or use another out_dir")
    with open(record) as f:
        before = json.load(f)
    now = json.loads(json.dumps(settings, default=repr))
    changed = sorted(k for k in set(now) | set(before) if before.get(k) != now.get(k))
    if changed:
        raise ValueError(f"out_dir {out_dir} holds a pruning run with other settings ({', '.join(changed)}): use "
                         "another out_dir")


def prune(model: nn.Module, images, *, out_dir: str, ratio: Optional[float] = None,
          widths: Optional[Dict[str, object]] = None, mode: str = "uniform", importance: str = "disturbed_taylor",
          drop_attention: int = 0, sigma: float = 0.01, num_images: int = 64, draws: int = 1,
          recover: Optional[DistillConfig] = None, eval_images=4, prompts_per_image: int = 4, resume: bool = True,
          device=None, progress: bool = True) -> PruneResult:
    """Compress ``model`` (a segment_anything ``Sam`` with a ViT encoder; not modified) in stages (module
    docstring).

    Args:
        images: a folder or list of image files: importance scores, block choice and recovery.
        out_dir: where each stage's checkpoint, report and distillation run go.
        ratio: the fraction of channels removed (``plan_widths(model, ratio, mode)``), or
        widths: ``{"embed": int, "head_dim": int | [per block], "mlp": int | [per block]}`` (any of them; not
            with ``ratio``). Neither: no width is pruned (``drop_attention`` only).
        mode: ``"uniform"`` or ``"global"`` (with ``ratio``; global ranks the head dims and MLP channels of all
            blocks together, scored on the model recovered from the embedding stage).
        importance: ``"disturbed_taylor"`` (``sigma``, ``draws`` noise draws on each of ``num_images`` images:
            :func:`sam_fast.compress.taylor_scores`) or ``"magnitude"``.
        drop_attention: how many blocks lose their attention first (DC-ViT; measured on ``num_images`` images).
        recover: the distillation of each stage (default ``DistillConfig(method="dld")``: block by block, through
            width adapters where the widths changed).
        eval_images: the report's images: how many of ``images`` (an int), or other image files (held out).
        prompts_per_image: prompts per report image, for the point and box mask mIoU.
        resume: continue the run in ``out_dir`` (finished stages are read back); False refuses an ``out_dir`` that
            holds one.
        device: where each stage's :func:`sam_fast.distill.distill` trains.
        progress: progress bars for the scoring, the attention measurement and each recovery.
    """
    if not isinstance(out_dir, (str, os.PathLike)):
        raise TypeError(f"out_dir must be a path, got {type(out_dir).__name__}")
    out_dir = os.fspath(out_dir)
    if ratio is not None and widths is not None:
        raise ValueError("give ratio or widths, not both")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if importance not in IMPORTANCE:
        raise ValueError(f"importance must be one of {IMPORTANCE}, got {importance!r}")
    sigma = float_arg(sigma, "sigma", minimum=0)
    draws = int_arg(draws, "draws", 1)
    num_images = int_arg(num_images, "num_images", 1)
    prompts_per_image = int_arg(prompts_per_image, "prompts_per_image", 1)
    drop_attention = int_arg(drop_attention, "drop_attention", 0)
    if not isinstance(resume, bool):
        raise TypeError(f"resume must be a bool, got {type(resume).__name__}")
    recover = DistillConfig(method="dld") if recover is None else recover
    if not isinstance(recover, DistillConfig):
        raise TypeError(f"recover must be a sam_fast.distill.DistillConfig, got {type(recover).__name__}")
    if not isinstance(getattr(model, "image_encoder", None), nn.Module):
        raise TypeError(f"model must be a segment_anything Sam, got {type(model).__name__}")
    groups = channel_groups(model)  # (TypeError for an encoder that is not a segment_anything ViT)
    attention_blocks = sum(1 for g in groups if g[0] == "head_dim")
    if drop_attention >= attention_blocks:
        raise ValueError(f"drop_attention={drop_attention}: the encoder has {attention_blocks} attention blocks and "
                         "at least one must keep its attention")
    if ratio is not None:
        uniform = plan_widths(model, ratio, "uniform")
        target = {"embed": uniform["embed"]}
        if mode == "uniform":
            target.update(head_dim=uniform["head_dim"], mlp=uniform["mlp"])
    elif widths is not None:
        if not isinstance(widths, dict) or not widths or not set(widths) <= {"embed", "head_dim", "mlp"}:
            raise ValueError(f"widths must be a dict with keys among 'embed', 'head_dim', 'mlp', got {widths!r}")
        target = dict(widths)
        target_widths(model, **target)  # (a ValueError naming the width that does not fit)
    else:
        target = {}
        if not drop_attention:
            raise ValueError("nothing to compress: give ratio, widths or drop_attention")
    files = list_images(images, "images")
    if isinstance(eval_images, int) and not isinstance(eval_images, bool):
        report_files = files[:int_arg(eval_images, "eval_images", 1)]
    else:
        report_files = list_images(eval_images, "eval_images")

    full = {g: w for g, (w, _) in groups.items()}
    stages = ["attention"] if drop_attention else []
    if target_widths(model, embed=target.get("embed"))[("embed",)] != full[("embed",)]:
        stages.append("embed")
    if ratio is not None and mode == "global":
        stages.append("bottleneck")
    elif target_widths(model, head_dim=target.get("head_dim"), mlp=target.get("mlp")) != full:
        stages.append("bottleneck")

    if not stages:
        raise ValueError(f"nothing to compress: widths {widths!r} are the model's own")
    os.makedirs(out_dir, exist_ok=True)
    _settings_guard(out_dir, {"ratio": ratio, "widths": widths, "mode": mode, "importance": importance,
                              "drop_attention": drop_attention, "sigma": sigma, "num_images": num_images,
                              "draws": draws,
                              "recover": dataclasses.asdict(recover), "params": encoder_params(model)}, resume)

    def scores(m):
        if importance == "magnitude":
            return magnitude_scores(m)
        return taylor_scores(m, files, sigma=sigma, num_images=num_images, draws=draws, teacher=model,
                             progress=progress)

    report_arrays = [read_rgb(f) for f in report_files]
    rows, current, dropped = [], model, []
    for stage in stages:
        stage_dir = os.path.join(out_dir, stage)
        done, report = os.path.join(stage_dir, "pruned.pth"), os.path.join(stage_dir, "report.json")
        if os.path.isfile(done) and os.path.isfile(report):  # (report.json is written first)
            current = load_sam(done)
            with open(report) as f:
                row = json.load(f)
        else:
            t0 = time.perf_counter()
            row = {"stage": stage}
            if stage == "attention":
                student, chosen, _ = _drop_attention(current, files, blocks=drop_attention, num_images=num_images,
                                                     progress=progress)
                row["blocks"] = chosen
            else:
                s = scores(current)
                if stage == "embed":
                    narrow = {"embed": target["embed"]}
                elif "head_dim" in target or "mlp" in target:
                    narrow = {"head_dim": target.get("head_dim"), "mlp": target.get("mlp")}
                else:  # ratio, global: ranked on the model as it is now
                    plan = plan_widths(current, ratio, "global", scores=s)
                    narrow = {"head_dim": plan["head_dim"], "mlp": plan["mlp"]}
                student = prune_to_widths(current, scores=s, **narrow)
                row["widths"] = narrow
            work = time.perf_counter() - t0  # (the stage's time leaves the measurements out)
            os.makedirs(stage_dir, exist_ok=True)
            pruned = closeness(student, model, report_arrays, prompts_per_image=prompts_per_image, device=device)
            t0 = time.perf_counter()
            distill(model, student, files, out_dir=stage_dir, config=recover, device=device, progress=progress)
            row["seconds"] = work + time.perf_counter() - t0
            recovered = closeness(student, model, report_arrays, prompts_per_image=prompts_per_image, device=device)
            row.update(pruned=pruned, recovered=recovered, params=encoder_params(student), macs=encoder_macs(student),
                       checkpoint=done)
            _write_json(report, row)
            save_sam(student, done)
            current = student
        dropped += row.get("blocks", [])
        rows.append(row)
    final_widths = None
    for row in rows:
        if "widths" in row:
            final_widths = dict(final_widths or {}, **{k: v for k, v in row["widths"].items() if v is not None})
    return PruneResult(model=current, widths=final_widths, blocks_without_attention=sorted(dropped),
                       params_before=encoder_params(model), params_after=encoder_params(current),
                       macs_before=encoder_macs(model), macs_after=encoder_macs(current), stages=rows)


__all__ = ["IMPORTANCE", "PruneResult", "STAGES", "prune"]
