"""``distill(teacher, student, images, ...)``: the training loop.

Stages. ``steps`` optimizer steps of *encoder distillation* with ``method``:

* ``"dld"`` - dynamic layer-wise distillation: every cached block's output against the teacher's, weighted
  by :class:`sam_fast.distill.DLDSchedule`, plus the image-embedding loss (student of the teacher's depth);
* ``"embedding"`` - the image-embedding loss only (any encoder whose embedding has the teacher's shape);
* ``"full_stage"`` - the embedding loss plus mask and IoU losses of the student's whole pipeline (encoder
  and mask decoder trained together) on prompts drawn from the teacher's masks, with online hard-prompt
  rounds (:mod:`sam_fast.distill.prompts`);

then ``decoder_steps`` steps of *decoder alignment*: the encoder frozen, the mask decoder fine-tuned on the
same prompt losses, so it reads the student's embeddings as the teacher's decoder reads the teacher's.

Data. The teacher's embeddings and block outputs are computed once per image and memory-mapped
(:mod:`sam_fast.distill.cache`). Step ``s`` takes images ``s * batch_size ... (s + 1) * batch_size - 1`` of
an endless stream that visits every image once per epoch in an order drawn from ``seed`` and the epoch, so
the data order depends on the step alone; every random prompt is drawn from ``seed``, the step and the
image's position in the stream. A run resumed from a checkpoint therefore continues exactly as it would
have, and ``torchrun`` with any number of processes computes the same global batch (each process takes an
equal slice; DistributedDataParallel averages the gradients).

Optimisation: AdamW, linear warm-up then cosine decay per stage (:func:`sam_fast.distill.schedule.lr_factor`),
``accumulate`` micro-batches per step, bf16 autocast on CUDA (``precision``), optional activation
checkpointing of the student's ViT blocks. The student runs in eval mode (BatchNorm statistics, e.g.
TinyViT's, stay frozen; SAM has no dropout), so its function does not depend on the batch split.

Files in ``out_dir``: ``teacher_cache/``; ``train_log.csv`` (one row per step: stage, learning rate, the
total loss and every loss term, and the DLD block weights); ``checkpoints/last.pt`` (written atomically
every ``checkpoint_every`` steps and at the end: student, adapters, optimizer, step); ``student.pt``, the
final student in the official key format plus its dilated pattern (:func:`sam_fast.save_sam`).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import functools
import hashlib
import json
import math
import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from .._args import float_arg, int_arg
from .._files import write_atomic
from ..checkpoint import save_sam
from ..images import list_images
from ..surgery import PIXEL_MEAN, PIXEL_STD, encoder_blocks
from .cache import CACHE_DTYPES, BlockOutputs, TeacherCache, cache_key, teacher_cache
from .losses import feature_loss, iou_loss, mask_loss
from .prompts import decode, hard_point, object_prompts, sample_generator
from .schedule import DLDSchedule, lr_factor
from .students import check_pair, check_pattern_covers, dilated_patterns

METHODS = ("dld", "embedding", "full_stage")
PRECISIONS = ("auto", "bf16", "fp32")


@dataclasses.dataclass
class DistillResult:
    """What :func:`distill` returns.

    Attributes:
        student: the trained student (the object passed in, trained in place).
        checkpoint: path of ``student.pt`` (:func:`sam_fast.load_sam` restores it, pattern included).
        log: path of the per-step CSV log.
        steps: optimizer steps done in all (encoder + decoder stages).
        resumed_from: the step the run continued from, or None for a fresh run.
        losses: the last step's loss terms (mean over its global batch).
        images: how many images were trained on; skipped: the unreadable files left out, with why.
        rank, world_size: this process's place in the run (0 and 1 without torchrun).
    """

    student: nn.Module
    checkpoint: str
    log: str
    steps: int
    resumed_from: Optional[int]
    losses: Dict[str, float]
    images: int
    skipped: Dict[str, str]
    rank: int = 0
    world_size: int = 1


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """How :func:`distill` trains: every setting of a run, checked when the config is made. A resumed run must have
    the settings of the run it continues (out_dir's checkpoint records them).

    Attributes:
        method: ``"dld"``, ``"embedding"`` or ``"full_stage"`` (module docstring).
        steps: optimizer steps of encoder distillation (may be 0 with ``decoder_steps``); default 1000.
        epochs: instead of ``steps``: passes over the readable images, ``ceil(epochs * images / batch_size)``
            steps.
        batch_size: images per optimizer step, over all processes and accumulation steps (must divide
            into world size x ``accumulate`` equal parts).
        lr, weight_decay, warmup_steps, min_lr_ratio: AdamW and its schedule (warm-up default
            ``min(100, steps // 10)``; cosine to ``min_lr_ratio * lr``).
        schedule: the DLD weights (default :class:`DLDSchedule()`).
        decoder_steps, decoder_lr: the decoder-alignment stage after the encoder stage (lr default ``lr``).
        prompts_per_image, hard_prompt_rounds: objects drawn per image, hard-point rounds per object.
        mask_weight, iou_weight: weights of the prompt losses.
        accumulate: micro-batches per optimizer step.
        precision: ``"auto"`` (bf16 autocast on CUDA, fp32 on CPU), ``"bf16"`` or ``"fp32"``.
        activation_checkpointing: recompute the student's ViT blocks in the backward pass (less memory).
        checkpoint_every: steps between checkpoints (also written at the end).
        resume: continue the run in ``out_dir`` from its last checkpoint when there is one (its settings
            must match); False starts afresh, replacing it.
        seed: data order and prompt draws; the same seed gives the same run.
        cache_blocks: the teacher blocks whose outputs are cached for DLD (default: all; a subset must
            hold the focal blocks; the others then get no feature loss).
        cache_dtype, cache_batch_size: the teacher cache's storage type and batch (:mod:`~.cache`).
    """

    method: str = "dld"
    steps: Optional[int] = None
    epochs: Optional[float] = None
    batch_size: int = 8
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_steps: Optional[int] = None
    min_lr_ratio: float = 0.01
    schedule: Optional[DLDSchedule] = None
    decoder_steps: int = 0
    decoder_lr: Optional[float] = None
    prompts_per_image: int = 4
    hard_prompt_rounds: int = 1
    mask_weight: float = 1.0
    iou_weight: float = 1.0
    accumulate: int = 1
    precision: str = "auto"
    activation_checkpointing: bool = False
    checkpoint_every: int = 100
    resume: bool = True
    seed: int = 0
    cache_blocks: Optional[Sequence[int]] = None
    cache_dtype: str = "float16"
    cache_batch_size: int = 8

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.steps is not None and self.epochs is not None:
            raise ValueError("give steps or epochs, not both")
        checked = dict(
            epochs=None if self.epochs is None else float_arg(self.epochs, "epochs", positive=True),
            steps=int_arg(1000 if self.steps is None and self.epochs is None else self.steps or 0, "steps", 0),
            decoder_steps=int_arg(self.decoder_steps, "decoder_steps", 0),
            batch_size=int_arg(self.batch_size, "batch_size", 1),
            accumulate=int_arg(self.accumulate, "accumulate", 1),
            checkpoint_every=int_arg(self.checkpoint_every, "checkpoint_every", 1),
            prompts_per_image=int_arg(self.prompts_per_image, "prompts_per_image", 1),
            hard_prompt_rounds=int_arg(self.hard_prompt_rounds, "hard_prompt_rounds", 0),
            cache_batch_size=int_arg(self.cache_batch_size, "cache_batch_size", 1),
            lr=float_arg(self.lr, "lr", positive=True),
            weight_decay=float_arg(self.weight_decay, "weight_decay", minimum=0),
            min_lr_ratio=float_arg(self.min_lr_ratio, "min_lr_ratio", minimum=0),
            mask_weight=float_arg(self.mask_weight, "mask_weight", minimum=0),
            iou_weight=float_arg(self.iou_weight, "iou_weight", minimum=0),
            warmup_steps=None if self.warmup_steps is None else int_arg(self.warmup_steps, "warmup_steps", 0),
            seed=int_arg(self.seed, "seed"),
            schedule=DLDSchedule() if self.schedule is None else self.schedule,
        )
        checked["decoder_lr"] = checked["lr"] if self.decoder_lr is None else float_arg(self.decoder_lr, "decoder_lr",
                                                                                          positive=True)
        if self.epochs is None and checked["steps"] + checked["decoder_steps"] == 0:
            raise ValueError("steps and decoder_steps are both 0: nothing to train")
        if self.cache_dtype not in CACHE_DTYPES:
            raise ValueError(f"cache_dtype must be one of {tuple(CACHE_DTYPES)}, got {self.cache_dtype!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        for name in ("activation_checkpointing", "resume"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if not isinstance(checked["schedule"], DLDSchedule):
            raise TypeError(f"schedule must be a sam_fast.distill.DLDSchedule, got {type(self.schedule).__name__}")
        if self.cache_blocks is not None:
            if self.method != "dld":
                raise ValueError(f"cache_blocks applies to method='dld' only, got method={self.method!r}")
            if isinstance(self.cache_blocks, (str, bytes)) or not hasattr(self.cache_blocks, "__iter__"):
                raise TypeError(f"cache_blocks must be a list of block indices, got {self.cache_blocks!r}")
            checked["cache_blocks"] = tuple(sorted(set(self.cache_blocks)))
        for name, value in checked.items():
            object.__setattr__(self, name, value)


def _distributed():
    """(rank, world size, started here): joins the process group torchrun describes when there is one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return dist.get_rank(), dist.get_world_size(), True
    return 0, 1, False


def _default_device(rank_local: int):
    if torch.cuda.is_available():
        return torch.device("cuda", rank_local)
    return torch.device("cpu")


@functools.lru_cache(maxsize=4)
def _epoch_order(seed: int, epoch: int, n: int) -> Tuple[int, ...]:
    return tuple(torch.randperm(n, generator=sample_generator(seed, 1 << 20, epoch)).tolist())


def stream_indices(step: int, batch_size: int, n: int, seed: int) -> List[int]:
    """Positions ``step * batch_size ...`` of the endless epoch-shuffled stream over ``n`` images (each epoch's
    order drawn once, not per step)."""
    return [_epoch_order(seed, pos // n, n)[pos % n] for pos in range(step * batch_size, (step + 1) * batch_size)]


class _Checkpointed:
    """Activation checkpointing of a model's ViT blocks through an instance-level ``forward`` (state_dict
    keys and module structure unchanged); ``restore()`` removes it."""

    def __init__(self, blocks: Sequence[nn.Module]):
        from torch.utils.checkpoint import checkpoint

        self.blocks = list(blocks)
        for b in self.blocks:
            inner = type(b).forward.__get__(b)
            b.forward = lambda x, inner=inner: checkpoint(inner, x, use_reentrant=False)

    def restore(self):
        for b in self.blocks:
            b.__dict__.pop("forward", None)


class StudentStep(nn.Module):
    """The student's side of one micro-batch: returns per-image loss terms (the module DDP wraps)."""

    def __init__(self, student: nn.Module, adapters: Optional[nn.Module]):
        super().__init__()
        self.student = student
        self.adapters = adapters

    def forward(self, batch, *, stage: str, method: str, blocks: Sequence[int], run_decoder,
                autocast) -> Dict[str, torch.Tensor]:
        enc = self.student.image_encoder
        terms: Dict[str, torch.Tensor] = {}
        with autocast():
            if stage == "decoder":
                with torch.no_grad():
                    emb = enc(batch["image"])
            else:
                with BlockOutputs(enc, blocks if method == "dld" else ()) as rec:
                    emb = enc(batch["image"])
        if stage == "encoder":
            terms["embedding"] = feature_loss(emb, batch["embedding"])
            if method == "dld":
                for i in blocks:
                    out = rec.outputs[i].float()
                    terms[f"block_{i}"] = feature_loss(out if self.adapters is None else self.adapters(i, out),
                                                       batch["blocks"][i])
        if stage == "decoder" or method == "full_stage":
            with autocast():
                mask, iou = run_decoder(self.student, emb, batch)
            terms["mask"], terms["iou"] = mask, iou
        return terms


def weighted_total(terms, method, weights, schedule, mask_weight, iou_weight):
    """(B,) per-image loss: the terms of :class:`StudentStep` with their weights."""
    total = 0
    for name, value in terms.items():
        if name == "embedding":
            w = schedule.embedding_weight if method == "dld" else 1.0
        elif name.startswith("block_"):
            w = weights[int(name[6:])]
        elif name == "mask":
            w = mask_weight
        else:
            w = iou_weight
        total = total + w * value
    return total


def _decoder_losses(teacher, prompts_per_image, hard_rounds, seed, step, img_size):
    """run_decoder(student, student_embeddings, batch) -> per-image (mask loss, IoU loss) over the prompts
    drawn from the teacher (points, boxes, then ``hard_rounds`` hard points)."""

    def run(student, emb, batch):
        masks, ious = [], []
        for b in range(emb.shape[0]):
            gen = sample_generator(seed, step, int(batch["positions"][b]))
            t_emb, s_emb, hw = batch["embedding"][b], emb[b], batch["input_hw"][b]
            points, boxes, _ = object_prompts(teacher, t_emb, hw, prompts_per_image, gen)
            m_terms, i_terms = [], []
            t_pts = None
            for prompts in (points, boxes):
                with torch.no_grad():
                    t_low, t_iou = decode(teacher, t_emb, prompts)
                s_low, s_iou = decode(student, s_emb, prompts)
                m_terms.append(mask_loss(s_low, t_low))
                i_terms.append(iou_loss(s_iou, t_iou))
                if prompts is points:
                    t_pts, s_pts = (t_low, t_iou), (s_low, s_iou)
            current = points
            for _ in range(hard_rounds):
                pick = t_pts[1].argmax(1)
                rows = torch.arange(len(pick), device=pick.device)
                current = hard_point(current, s_pts[0][rows, pick], t_pts[0][rows, pick], hw, img_size, gen)
                with torch.no_grad():
                    t_low, t_iou = decode(teacher, t_emb, current)
                s_low, s_iou = decode(student, s_emb, current)
                m_terms.append(mask_loss(s_low, t_low))
                i_terms.append(iou_loss(s_iou, t_iou))
                t_pts, s_pts = (t_low, t_iou), (s_low, s_iou)
            masks.append(torch.stack(m_terms).mean())
            ious.append(torch.stack(i_terms).mean())
        return torch.stack(masks), torch.stack(ious)

    return run


def _atomic_save(obj, path: str) -> None:
    write_atomic(path, lambda tmp: torch.save(obj, tmp))


def _settings(**kw) -> str:
    return json.dumps(kw, sort_keys=True, default=str)


#: what a settings difference means, for the resume refusal
_SETTING_WORDS = {"cache": "the images or the teacher (the teacher cache's key)",
                  "student": "the student (its architecture or dilated pattern)"}


def student_spec(student: nn.Module) -> dict:
    """The student's identity for a resumed run: its class, its encoder's class, every parameter and buffer's name,
    shape and dtype (digested), and the dilated pattern of each block that has one - not the trained values."""
    h = hashlib.sha256()
    for name, t in student.state_dict().items():
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}\n".encode())
    return {"class": type(student).__name__,
            "encoder": type(getattr(student, "image_encoder", student)).__name__,
            "tensors": h.hexdigest()[:24],
            "dilated": {str(i): repr(p) for i, p in sorted(dilated_patterns(student).items())}}


def _resume_state(ckpt_path: str, settings: str) -> dict:
    """The checkpoint a resumed run continues from, after checking it was made with ``settings`` (ValueError
    saying what differs otherwise)."""
    try:
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        old = json.loads(state["settings"])
    except Exception as exc:
        raise ValueError(f"resume: {ckpt_path} cannot be read ({type(exc).__name__}: {exc}); use another out_dir, "
                         "or resume=False to start afresh") from None
    new = json.loads(settings)
    if old != new:
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        words = ", ".join(_SETTING_WORDS.get(k, k) for k in diff)
        raise ValueError(f"resume: {ckpt_path} is a run with other settings ({words} differ); nothing was changed. "
                         "Use another out_dir, or resume=False (sam-fast distill --no-resume) to start afresh there")
    return state


def _check_student_patterns(student) -> None:
    patterns = dilated_patterns(student)
    if not patterns:
        return
    enc = student.image_encoder
    grid = (enc.img_size // enc.patch_embed.proj.kernel_size[0],) * 2
    blocks = encoder_blocks(student) or []
    for i, pat in patterns.items():
        check_pattern_covers(pat, grid, blocks[i].attn.num_heads, f"student block {i}'s dilated pattern")


def distill(teacher: nn.Module, student: nn.Module, images, *, out_dir: str, config: Optional[DistillConfig] = None,
            device=None, progress: bool = True, callback: Optional[Callable[[int, Dict[str, float]], None]] = None,
            **settings) -> DistillResult:
    """Distil ``teacher`` (a segment_anything ``Sam``) into ``student`` (trained in place) on ``images``.

    Args:
        teacher: the frozen teacher ``Sam``; never modified.
        student: a ``Sam`` with an image embedding of the teacher's shape, e.g. from
            :func:`sam_fast.distill.dilated_student`, a pruned ViT or a TinyViT (``vit_t``).
        images: a folder (searched recursively for JPEG / PNG, any sizes) or a list of image paths;
            unreadable files are skipped with a warning listing them.
        out_dir: where the cache, log, checkpoints and ``student.pt`` go.
        config: a :class:`DistillConfig`; or its fields as keyword arguments (``steps=200, lr=3e-4``), not both.
        device: default ``cuda:LOCAL_RANK`` when CUDA is available, else CPU.
        progress: a progress bar (rank 0 only).
        callback: ``callback(step, losses)`` after every optimizer step (rank 0 only).
    """
    if config is None:
        unknown = sorted(set(settings) - {f.name for f in dataclasses.fields(DistillConfig)})
        if unknown:
            raise TypeError(f"distill() got unknown settings {unknown}; DistillConfig's fields are "
                            f"{[f.name for f in dataclasses.fields(DistillConfig)]}")
        config = DistillConfig(**settings)
    elif settings:
        raise TypeError(f"give config or keyword settings, not both (got config and {sorted(settings)})")
    elif not isinstance(config, DistillConfig):
        raise TypeError(f"config must be a sam_fast.distill.DistillConfig, got {type(config).__name__}")
    cfg = config
    method, schedule, batch_size, accumulate = cfg.method, cfg.schedule, cfg.batch_size, cfg.accumulate
    if not isinstance(out_dir, (str, os.PathLike)):
        raise TypeError(f"out_dir must be a path, got {type(out_dir).__name__}")
    out_dir = os.fspath(out_dir)

    adapters = check_pair(teacher, student, method)
    _check_student_patterns(student)
    depth = len(encoder_blocks(student) or [])
    blocks: List[int] = []
    if method == "dld":
        schedule.check_depth(depth)
        all_blocks = list(range(depth))
        blocks = all_blocks if cfg.cache_blocks is None else list(cfg.cache_blocks)
        bad = [i for i in blocks if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < depth]
        if bad:
            raise ValueError(f"cache_blocks: {bad} are not block indices of the {depth}-block encoder")
        focal = all_blocks[depth - schedule.focal:]
        if not set(focal) <= set(blocks):
            raise ValueError(f"cache_blocks must include the focal blocks {focal} (DLD always distills them), got "
                             f"{blocks}")
    files = list_images(images, "images")

    rank, world, started = _distributed()
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    try:
        device = torch.device(device) if device is not None else _default_device(local_rank)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device: {device!r} is not a torch device ({exc})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r}, but torch sees no CUDA GPU on this machine; use 'cpu'")
    micro, rem = divmod(batch_size, world * accumulate)
    if rem or micro == 0:
        raise ValueError(f"batch_size {batch_size} must split into {world} process(es) x {accumulate} accumulation "
                         f"step(s) of equal size")
    try:
        os.makedirs(os.path.join(out_dir, "checkpoints"), exist_ok=True)
    except OSError as exc:
        raise ValueError(f"out_dir: cannot create {out_dir} ({exc.strerror or exc})") from exc
    use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")

    import torch.distributed as dist

    barrier = dist.barrier if world > 1 else None
    mean = getattr(teacher, "pixel_mean", torch.tensor(PIXEL_MEAN)).flatten().tolist()
    std = getattr(teacher, "pixel_std", torch.tensor(PIXEL_STD)).flatten().tolist()
    # Everything a resumed run must share with the run it continues, known before the teacher cache is touched: a
    # rerun with other images, another student or other settings is refused here, with the cache left as it was.
    enc = getattr(teacher, "image_encoder", teacher)
    key = cache_key(enc, files, int(enc.img_size), tuple(sorted(set(blocks))), mean, std, cfg.cache_dtype)
    settings = _settings(method=method, steps=None if cfg.epochs is not None else cfg.steps, epochs=cfg.epochs,
                         decoder_steps=cfg.decoder_steps, batch_size=batch_size, accumulate=accumulate, lr=cfg.lr,
                         decoder_lr=cfg.decoder_lr, weight_decay=cfg.weight_decay, warmup_steps=cfg.warmup_steps,
                         min_lr_ratio=cfg.min_lr_ratio, schedule=dataclasses.asdict(schedule), blocks=blocks,
                         prompts_per_image=cfg.prompts_per_image, hard_prompt_rounds=cfg.hard_prompt_rounds,
                         mask_weight=cfg.mask_weight, iou_weight=cfg.iou_weight, seed=cfg.seed, cache=key,
                         bf16=use_bf16, student=student_spec(student))
    ckpt_path = os.path.join(out_dir, "checkpoints", "last.pt")
    state = _resume_state(ckpt_path, settings) if cfg.resume and os.path.isfile(ckpt_path) else None
    teacher_was = teacher.training
    student_was = student.training
    teacher.eval().to(device)
    student.to(device)
    try:
        cache = teacher_cache(teacher, files, out_dir, blocks, mean=mean, std=std, device=device,
                              batch_size=cfg.cache_batch_size, cache_dtype=cfg.cache_dtype,
                              progress=progress and rank == 0, rank=rank, barrier=barrier, key=key)
        steps = cfg.steps if cfg.epochs is None else max(1, math.ceil(cfg.epochs * len(cache) / batch_size))
        warmup_steps = min(100, steps // 10) if cfg.warmup_steps is None else cfg.warmup_steps
        return _train(_Run(teacher=teacher, student=student, adapters=adapters, cache=cache, out_dir=out_dir,
                           config=cfg, steps=steps, warmup_steps=warmup_steps, micro=micro, blocks=blocks,
                           use_bf16=use_bf16, device=device, rank=rank, world=world, progress=progress,
                           callback=callback, mean=mean, std=std, settings=settings, ckpt_path=ckpt_path,
                           state=state))
    finally:
        teacher.train(teacher_was)
        student.train(student_was)
        if started:
            dist.destroy_process_group()


@dataclasses.dataclass
class _Run:
    """One run of :func:`distill` as :func:`_train` needs it: the models and data, the checked config, and what the
    call resolved (the step count, the micro-batch, this process's rank, the resume state)."""

    teacher: nn.Module
    student: nn.Module
    adapters: Optional[nn.Module]
    cache: TeacherCache
    out_dir: str
    config: DistillConfig
    steps: int
    warmup_steps: int
    micro: int
    blocks: List[int]
    use_bf16: bool
    device: torch.device
    rank: int
    world: int
    progress: bool
    callback: Optional[Callable[[int, Dict[str, float]], None]]
    mean: List[float]
    std: List[float]
    settings: dict
    ckpt_path: str
    state: Optional[dict]


def _train(run: _Run) -> DistillResult:
    cfg = run.config
    teacher, student, adapters, cache, device = run.teacher, run.student, run.adapters, run.cache, run.device
    rank, world, steps, blocks = run.rank, run.world, run.steps, run.blocks
    method, decoder_steps, batch_size = cfg.method, cfg.decoder_steps, cfg.batch_size
    import torch.distributed as dist
    from tqdm import tqdm

    total_steps = steps + decoder_steps
    if adapters is not None:
        adapters.to(device)
    log_path = os.path.join(run.out_dir, "train_log.csv")
    start, opt_state, resumed_from = 0, None, None
    if run.state is not None:  # checked against these settings before the cache was built
        try:
            student.load_state_dict(run.state["student"])
            if adapters is not None:
                adapters.load_state_dict(run.state["adapters"])
        except RuntimeError as exc:
            raise ValueError(f"resume: {run.ckpt_path} does not load into this student ({str(exc).splitlines()[0]}); "
                             "use another out_dir, or resume=False to start afresh") from None
        start, opt_state, resumed_from = int(run.state["step"]), run.state["optimizer"], int(run.state["step"])
    elif rank == 0 and not cfg.resume and os.path.isfile(run.ckpt_path):
        os.unlink(run.ckpt_path)

    block_names = [f"block_{i}" for i in blocks]
    columns = ["step", "stage", "lr", "loss"]
    if steps:
        columns += ["embedding"] + (block_names + [f"w_{i}" for i in blocks] if method == "dld" else [])
    if decoder_steps or method == "full_stage":
        columns += ["mask", "iou"]
    if rank == 0:
        _prepare_log(log_path, columns, start)

    flags = {p: p.requires_grad for p in student.parameters()}
    ckpt_blocks = _Checkpointed(encoder_blocks(student) or []) if cfg.activation_checkpointing else None
    step_module = StudentStep(student, adapters)
    student.eval()
    img_size = int(teacher.image_encoder.img_size)

    def autocast():
        if run.use_bf16:
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    bar = tqdm(total=total_steps, initial=start, desc=f"distill ({method})", unit="step",
               disable=not (run.progress and rank == 0))
    last: Dict[str, float] = {}
    optimizer = wrapped = None
    stage = None
    try:
        for step in range(start, total_steps):
            new_stage = "encoder" if step < steps else "decoder"
            if new_stage != stage:
                stage = new_stage
                trainable = _stage_parameters(student, adapters, stage, method)
                for p in student.parameters():
                    p.requires_grad_(False)
                for p in trainable:
                    p.requires_grad_(True)
                optimizer = torch.optim.AdamW(trainable, lr=cfg.lr if stage == "encoder" else cfg.decoder_lr,
                                              weight_decay=cfg.weight_decay)
                if opt_state is not None and step == start:
                    optimizer.load_state_dict(opt_state)
                wrapped = step_module
                if world > 1:
                    from torch.nn.parallel import DistributedDataParallel as DDP

                    wrapped = DDP(step_module, device_ids=[device.index] if device.type == "cuda" else None,
                                  find_unused_parameters=True)
            stage_step = step if stage == "encoder" else step - steps
            stage_total = steps if stage == "encoder" else decoder_steps
            base_lr = cfg.lr if stage == "encoder" else cfg.decoder_lr
            cur_lr = base_lr * lr_factor(stage_step, stage_total, run.warmup_steps if stage == "encoder" else
                                         min(run.warmup_steps, decoder_steps // 10), cfg.min_lr_ratio)
            for g in optimizer.param_groups:
                g["lr"] = cur_lr
            depth = len(encoder_blocks(student) or [])
            weights = dict(zip(range(depth), cfg.schedule.weights(depth, stage_step / max(stage_total - 1, 1))
                               if method == "dld" else []))
            run_decoder = _decoder_losses(teacher, cfg.prompts_per_image, cfg.hard_prompt_rounds, cfg.seed, step,
                                          img_size)
            order = stream_indices(step, batch_size, len(cache), cfg.seed)
            sums: Dict[str, torch.Tensor] = {}
            optimizer.zero_grad(set_to_none=True)
            for a in range(cfg.accumulate):
                lo = (a * world + rank) * run.micro
                pos = list(range(step * batch_size + lo, step * batch_size + lo + run.micro))
                batch = cache.batch(order[lo:lo + run.micro], device, run.mean, run.std)
                batch["positions"] = pos
                sync = a == cfg.accumulate - 1 or world == 1
                ctx = contextlib.nullcontext() if sync else wrapped.no_sync()
                with ctx:
                    terms = wrapped(batch, stage=stage, method=method, blocks=blocks, run_decoder=run_decoder,
                                    autocast=autocast)
                    per_image = weighted_total(terms, method, weights, cfg.schedule, cfg.mask_weight, cfg.iou_weight)
                    (per_image.mean() / cfg.accumulate).backward()
                for name, v in terms.items():
                    sums[name] = sums.get(name, 0) + v.detach().float().sum()
                sums["loss"] = sums.get("loss", 0) + per_image.detach().float().sum()
            names = sorted(sums)
            vec = torch.stack([sums[n] for n in names]).to(device)
            if world > 1:
                dist.all_reduce(vec)
            last = {n: float(v) / batch_size for n, v in zip(names, vec.cpu())}
            if not all(math.isfinite(v) for v in last.values()):
                raise FloatingPointError(f"step {step}: the loss is not finite ({last}); lower lr or use "
                                         "precision='fp32'")
            optimizer.step()
            if rank == 0:
                row = {"step": step, "stage": stage, "lr": cur_lr, **last}
                if method == "dld" and stage == "encoder":
                    row.update({f"w_{i}": weights[i] for i in blocks})
                _append_log(log_path, columns, row)
                bar.set_postfix(loss=f"{last['loss']:.4g}", stage=stage)
                bar.update(1)
            done = step + 1
            if rank == 0 and (done % cfg.checkpoint_every == 0 or done == total_steps or done == steps):
                _atomic_save({"step": done, "settings": run.settings, "student": student.state_dict(),
                              "adapters": adapters.state_dict() if adapters is not None else {},
                              "optimizer": optimizer.state_dict() if done != steps or not decoder_steps else None},
                             run.ckpt_path)
            if world > 1 and (done % cfg.checkpoint_every == 0 or done == total_steps):
                dist.barrier()
            if run.callback is not None and rank == 0:
                run.callback(step, dict(last))
    finally:
        bar.close()
        if ckpt_blocks is not None:
            ckpt_blocks.restore()
        for p, flag in flags.items():
            p.requires_grad_(flag)
    final = os.path.join(run.out_dir, "student.pt")
    if rank == 0:
        save_sam(student, final)
    if world > 1:
        dist.barrier()
    return DistillResult(student=student, checkpoint=final, log=log_path, steps=total_steps,
                         resumed_from=resumed_from, losses=last, images=len(cache), skipped=dict(cache.skipped),
                         rank=rank, world_size=world)


def _stage_parameters(student, adapters, stage, method) -> List[nn.Parameter]:
    if stage == "decoder":
        return list(student.mask_decoder.parameters())
    params = list(student.image_encoder.parameters())
    if method == "full_stage":
        params += list(student.mask_decoder.parameters())
    if adapters is not None:
        params += list(adapters.parameters())
    return params


def _prepare_log(path: str, columns: List[str], start: int) -> None:
    """A fresh log with its header, or (resuming) the existing one cut to the rows before ``start``."""
    rows = []
    if start and os.path.isfile(path):
        with open(path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if int(r["step"]) < start]
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def _append_log(path: str, columns: List[str], row: Dict[str, object]) -> None:
    with open(path, "a", newline="") as f:
        csv.DictWriter(f, fieldnames=columns, extrasaction="ignore").writerow(
            {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


def read_log(path: str) -> Dict[str, np.ndarray]:
    """A run's ``train_log.csv`` as columns (numbers as float arrays, the stage as strings)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return {}
    out = {}
    for k in rows[0]:
        vals = [r[k] for r in rows]
        out[k] = np.array(vals) if k == "stage" else np.array([float(v) if v != "" else np.nan for v in vals])
    return out


__all__ = ["DistillResult", "METHODS", "distill", "read_log", "stream_indices"]
