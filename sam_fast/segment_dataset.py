"""Segmenting a dataset on many processes or GPUs: a worker any engine can call, an exact partition, and
restartable per-shard outputs, with Ray Data as the engine (``sam-fast segment-dataset``).

The image list (sorted paths) is cut into *shards* of ``shard_size`` consecutive images; image ``i`` has COCO
``image_id`` ``i + 1`` whoever processes it. A shard's result is one COCO JSON file, ``shard-<k>-<digest>.json``
(``images``, ``annotations`` with compressed RLE, ``errors``: the images that could not be read or segmented,
with the reason, and ``sam_fast``: what the shard covers), written atomically (a temporary file renamed into
place), so a reader or a rerun never sees half a shard. The digest names what the shard's content depends on:
its images (absolute paths) and their ids, their box prompts, and the run's settings (checkpoint, model, mode,
generator arguments). A rerun skips a shard whose file exists under the digest it would write now, so a killed
job completes without duplicates and nothing already written is lost; a shard written for other images or
other settings (another ``--shard-size``, a photo added to the folder, another checkpoint) is never taken for
done: the run refuses and says what changed, or with ``overwrite=True`` (``--overwrite``) redoes exactly those
shards. ``plan.json`` records the run's image list and settings, for that message.

* :class:`SegmentWorker` - loads and patches a model once (checkpoint, model type, :class:`sam_fast.SamFastConfig`,
  optional calibration images for int8) and turns images (with optional per-image boxes, e.g. a detector's)
  into COCO records with :class:`sam_fast.SamFastAutomaticMaskGenerator` or :class:`sam_fast.SamFastPredictor`;
  ``process_shard`` writes one shard. Engine-agnostic: a plain loop, torchrun or SLURM ranks, or a Ray actor.
* :func:`partition` - the exact split of a list over ``world`` ranks (every item exactly once; unlike
  ``DistributedSampler``, which pads by repeating items).
* :func:`run_shards` - this rank's shards in a loop (``--shard RANK/WORLD``), with a progress bar.
* :func:`run_ray` - Ray Data reads the files (``read_binary_files``), an actor pool of workers (one GPU each on a
  GPU cluster, ``num_gpus=1``) decodes and segments them in batches, and the result rows stream back to the
  driver, which writes each shard the moment its last image arrives. Ray Data's own writers are not used for
  the output: they name files per write task and cannot promise one complete, atomically written file per shard,
  which is what makes a rerun safe.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import time
from typing import Dict, List, Optional, Sequence

import numpy as np

from ._args import int_arg
from ._files import write_atomic

MODES = ("everything", "boxes")


def partition(items: Sequence, rank: int, world: int) -> list:
    """The ``rank``-th of ``world`` contiguous, near-equal parts of ``items``: together the parts hold every item
    exactly once (sizes differ by at most one)."""
    rank, world = int_arg(rank, "rank"), int_arg(world, "world")
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"need 0 <= rank < world, got rank={rank}, world={world}")
    n = len(items)
    return list(items[rank * n // world:(rank + 1) * n // world])


def parse_shard(text: str):
    """``"RANK/WORLD"`` -> (rank, world); ``ValueError`` naming ``--shard`` otherwise."""
    try:
        rank, world = (int(t) for t in str(text).split("/"))
    except ValueError:
        raise ValueError(f"--shard must be RANK/WORLD, e.g. 0/4, got {text!r}") from None
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"--shard {text}: need 0 <= RANK < WORLD")
    return rank, world


class SegmentWorker:
    """Load and patch a model once; segment images into COCO records.

    Args:
        checkpoint: anything :func:`sam_fast.load_sam` reads (a distilled student brings its pattern).
        model_type, decoder_heads: as for ``load_sam``.
        config: a :class:`sam_fast.SamFastConfig` applied to the model (default: exact fused attention where the
            encoder has ViT blocks, the fast forms of a TinyViT); ``None`` keeps a distilled student's own attention.
        calibration_images: with ``config.quantize`` set (int8): images (paths or arrays) to calibrate on.
        mode: ``"everything"`` (the automatic mask generator) or ``"boxes"`` (one mask per given box, the
            predictor's single-mask output).
        generator_kwargs: for :class:`sam_fast.SamFastAutomaticMaskGenerator` (e.g. ``points_per_side``,
            ``hierarchical``); ``output_mode`` is always ``"coco_rle"``.
        device: default ``cuda`` when available.
        prompts: ``{path: {"boxes": [[x0, y0, x1, y1], ...]}}`` for the Ray entry point (``__call__``), which
            receives only the files' paths and bytes.
    """

    def __init__(self, checkpoint, model_type: str = "auto", *, config=None, calibration_images=None,
                 mode: str = "everything", generator_kwargs: Optional[dict] = None, device=None,
                 decoder_heads: Optional[int] = None, prompts: Optional[Dict[str, dict]] = None):
        import torch

        from . import Int8, SamFastAutomaticMaskGenerator, SamFastConfig, SamFastPredictor, apply
        from .checkpoint import is_sam2_model, load_sam
        from .nn.tinyvit import tinyvit_fast_modules
        from .surgery import vit_blocks

        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        #: what this worker's records depend on, beside the images and their prompts (shard digests hold it)
        self.settings = worker_settings(checkpoint, model_type=model_type, config=config, mode=mode,
                                        generator_kwargs=generator_kwargs, decoder_heads=decoder_heads,
                                        calibration_images=calibration_images)
        self.mode = mode
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if isinstance(checkpoint, (str, os.PathLike)):
            sam = load_sam(checkpoint, model_type, decoder_heads=decoder_heads)
        else:
            sam = checkpoint  # a model object (a plain loop in the caller's process)
        sam.to(self.device).eval()
        self.sam2 = is_sam2_model(sam)  # SAM 2: its predictor's API (set_image_batch), its generator's defaults
        if config is None and getattr(sam, "sam_fast_config", None) is None:
            exact = vit_blocks(sam) or tinyvit_fast_modules(sam) or self.sam2
            config = SamFastConfig(attention="exact" if exact else "none")
        if config is not None:
            if config.quantize is not None and calibration_images is not None and config.quantize.calibration is None:
                from .quantize import calibrate

                images = []
                for p in calibration_images:
                    try:
                        images.append(self._read(p) if isinstance(p, (str, os.PathLike)) else p)
                    except Exception as exc:
                        raise ValueError(f"calibration_images: cannot read {p} ({type(exc).__name__}: {exc})") from None
                config = dataclasses.replace(config, quantize=Int8(calibrate(sam, images, progress=False)))
            apply(sam, config)
        self.sam = sam
        self.prompts = None if prompts is None else normalize_prompts(prompts)
        kwargs = dict(generator_kwargs or {})
        kwargs["output_mode"] = "coco_rle"
        self.engine = SamFastAutomaticMaskGenerator(sam, **kwargs) if mode == "everything" else SamFastPredictor(sam)

    @staticmethod
    def _read(source, name=None):
        from .images import read_rgb

        return read_rgb(source, name)

    def segment(self, image, boxes=None) -> List[dict]:
        """COCO records of one HxWx3 uint8 image (:mod:`sam_fast.coco`): the generator's records, or one per box
        (``mode="boxes"``: the predictor's single-mask output, with the box as ``box_prompt``)."""
        if self.mode == "everything":
            return self.engine.generate(image)
        boxes = np.asarray(boxes if boxes is not None else np.zeros((0, 4)), dtype=np.float64).reshape(-1, 4)
        if not len(boxes):
            return []
        self.engine.set_image_batch([image]) if self.sam2 else self.engine.set_images([image])
        return self.engine.coco_records([{"boxes": boxes}], multimask_output=False)[0]

    def process_image(self, path, image_id: int, boxes=None, name: Optional[str] = None) -> dict:
        """One result row: ``path``, ``image_id``, ``height``, ``width``, ``annotations`` (records), ``error``
        ("" when it worked; the reason when the file could not be read or segmented, or, in boxes mode, when no
        boxes were given for it - never an exception). ``path`` may also be the file's bytes (the row's ``path``
        is then ``name``, or ``""``). ``boxes=[]`` in boxes mode is an image with no box: no masks, no error."""
        if isinstance(path, (bytes, bytearray, memoryview)):
            source, path = path, name or ""
        else:
            source = path
        if self.mode == "boxes" and boxes is None:
            return dict(path=path, image_id=image_id, height=0, width=0, annotations=[],
                        error="no boxes for this image (mode 'boxes': it has no entry in the prompts)")
        try:
            image = self._read(source, path or None)
        except Exception as exc:
            return dict(path=path, image_id=image_id, height=0, width=0, annotations=[],
                        error=f"cannot read: {type(exc).__name__}: {exc}")
        try:
            records = self.segment(image, boxes)
        except Exception as exc:
            return dict(path=path, image_id=image_id, height=image.shape[0], width=image.shape[1], annotations=[],
                        error=f"cannot segment: {type(exc).__name__}: {exc}")
        return dict(path=path, image_id=image_id, height=image.shape[0], width=image.shape[1], annotations=records,
                    error="")

    def process_shard(self, shard: "Shard", out_dir: str, prompts: Optional[Dict[str, dict]] = None) -> dict:
        """Segment ``shard`` and write its file atomically. Returns a summary row (shard, images, annotations,
        errors, seconds)."""
        t0 = time.perf_counter()
        prompts = self.prompts if prompts is None else prompts
        rows = [self.process_image(p, shard.first_id + j, _boxes_of(prompts, p)) for j, p in enumerate(shard.files)]
        return dict(write_shard(out_dir, shard, rows), seconds=time.perf_counter() - t0)

    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, list]:
        """Ray Data ``map_batches`` entry point: rows ``{path, bytes}`` (``ray.data.read_binary_files`` with
        ``include_paths=True``) in; rows ``{path, height, width, annotations (JSON list of records), error}`` out.
        Boxes for ``mode="boxes"`` come from ``prompts`` given to the constructor, keyed by path."""
        out: Dict[str, list] = {"path": [], "height": [], "width": [], "annotations": [], "error": []}
        for path, data in zip(batch["path"], batch["bytes"]):
            path = _local_path(str(path))
            row = self.process_image(bytes(data), 0, _boxes_of(self.prompts, path), name=path)
            out["path"].append(path)
            out["height"].append(row["height"])
            out["width"].append(row["width"])
            out["annotations"].append(json.dumps(row["annotations"]))
            out["error"].append(row["error"])
        return out


def worker_settings(checkpoint, **kwargs) -> dict:
    """What a :class:`SegmentWorker` built from these arguments makes of an image, beside the image and its
    boxes, as JSON-able data: the checkpoint (absolute path, size and modification time; a model object by its
    class, which cannot tell two models apart), model type, config, mode, generator arguments, decoder heads and
    calibration images."""
    if isinstance(checkpoint, (str, os.PathLike)):
        path = os.path.abspath(os.fspath(checkpoint))
        try:
            st = os.stat(path)
            ckpt = {"path": path, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}
        except OSError:
            ckpt = {"path": path}
    else:
        ckpt = {"object": type(checkpoint).__name__}
    cal = kwargs.pop("calibration_images", None)
    settings = {"checkpoint": ckpt, **kwargs}
    settings["generator_kwargs"] = dict(settings.get("generator_kwargs") or {})
    settings["config"] = None if settings.get("config") is None else repr(settings["config"])
    if cal is not None:
        settings["calibration_images"] = [os.path.abspath(p) if isinstance(p, (str, os.PathLike)) else
                                          f"<{type(p).__name__}>" for p in cal]
    return json.loads(json.dumps(settings, sort_keys=True, default=repr))


def _key(path) -> str:
    return os.path.normpath(os.path.abspath(os.fspath(path)))


def normalize_prompts(prompts: Dict[str, dict]) -> Dict[str, dict]:
    """``{path: {"boxes": [[x0, y0, x1, y1], ...]}}`` keyed by normalised absolute paths, each box list checked
    (``ValueError`` naming the path)."""
    if not isinstance(prompts, dict):
        raise TypeError(f"prompts must be a dict {{path: {{'boxes': [[x0, y0, x1, y1], ...]}}}}, got "
                        f"{type(prompts).__name__}")
    out = {}
    for path, entry in prompts.items():
        if not isinstance(entry, dict) or set(entry) != {"boxes"}:
            raise ValueError(f"prompts[{path!r}] must be {{'boxes': [[x0, y0, x1, y1], ...]}}, got {entry!r}")
        out[_key(path)] = {"boxes": check_boxes(entry["boxes"], f"boxes of {path}")}
    return out


def check_boxes(boxes, name: str) -> list:
    """A list of XYXY boxes, as floats (``ValueError`` naming ``name`` for anything else)."""
    try:
        arr = np.asarray(boxes, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a list of [x0, y0, x1, y1] boxes, got {str(boxes)[:80]}") from None
    if arr.size == 0:
        return []
    if arr.ndim != 2 or arr.shape[1] != 4 or not np.isfinite(arr).all():
        raise ValueError(f"{name} must be a list of [x0, y0, x1, y1] boxes of finite numbers, got "
                         f"{str(boxes)[:80]}")
    if (arr[:, 2] < arr[:, 0]).any() or (arr[:, 3] < arr[:, 1]).any():
        raise ValueError(f"{name}: a box must have x1 >= x0 and y1 >= y0, got {str(boxes)[:80]}")
    return arr.tolist()


def _boxes_of(prompts: Optional[Dict[str, dict]], path: str):
    """The boxes of ``path`` in normalised prompts; None when there are no prompts or no entry for it."""
    if prompts is None:
        return None
    entry = prompts.get(_key(path))
    return None if entry is None else entry["boxes"]


def match_box_keys(raw: dict, files: Sequence[str], src: str) -> tuple:
    """The keys of a ``--boxes`` file matched to the listed images: a key may be an absolute path, a path relative
    to the working directory or to ``src``, or a bare file name that only one image has. Returns (prompts keyed
    by absolute paths, keys that match no image, images without an entry); ``ValueError`` for a bare name that
    several images share."""
    by_path = {_key(f): f for f in files}
    by_name: Dict[str, List[str]] = {}
    for f in files:
        by_name.setdefault(os.path.basename(f), []).append(_key(f))
    prompts, unmatched = {}, []
    for key, boxes in raw.items():
        candidates = [_key(key), _key(os.path.join(src, key))] if not os.path.isabs(key) else [_key(key)]
        hit = next((c for c in candidates if c in by_path), None)
        if hit is None and os.sep not in key and (os.altsep is None or os.altsep not in key):
            named = by_name.get(key, [])
            if len(named) > 1:
                raise ValueError(f"--boxes key {key!r} names {len(named)} images ({named[0]}, {named[1]}, ...): "
                                 "give its path relative to SRC")
            hit = named[0] if named else None
        if hit is None:
            unmatched.append(key)
        elif hit in prompts:
            raise ValueError(f"--boxes: {key!r} and another key both name {hit}")
        else:
            prompts[hit] = {"boxes": check_boxes(boxes, f"--boxes[{key!r}]")}
    missing = [f for f in files if _key(f) not in prompts]
    return prompts, unmatched, missing


def _local_path(path: str) -> str:
    """A path as Ray Data reports it (``include_paths``) -> the absolute local path the job listed."""
    if path.startswith("local://"):
        path = path[len("local://"):]
    return os.path.normpath(path if os.path.isabs(path) else os.sep + path)


# ------------------------------------------------------------------------------------------------
# Shards, their digests, the plan
# ------------------------------------------------------------------------------------------------

PLAN_FILE = "plan.json"
_SHARD_NAME = re.compile(r"^shard-(\d+)(?:-([0-9a-f]+))?\.json$")


@dataclasses.dataclass(frozen=True)
class Shard:
    """Shard ``index``: its ``files`` (as listed), the image id of the first, and the digest of what its content
    depends on (its images' absolute paths and ids, their boxes, the run's settings)."""

    index: int
    files: tuple
    first_id: int
    digest: str

    @property
    def name(self) -> str:
        return f"shard-{self.index:06d}-{self.digest}.json"


def make_shards(files: Sequence[str], shard_size: int, settings: Optional[dict] = None,
                prompts: Optional[Dict[str, dict]] = None) -> List[Shard]:
    """The shards of ``files`` (``shard_size`` consecutive images each) with their digests."""
    shard_size = int_arg(shard_size, "shard_size", 1)
    settings_text = json.dumps(settings, sort_keys=True, default=repr)
    shards = []
    for k, i in enumerate(range(0, len(files), shard_size)):
        part = list(files[i:i + shard_size])
        what = {"files": [_key(f) for f in part], "first_id": i + 1, "settings": settings_text,
                "boxes": [_boxes_of(prompts, f) for f in part]}
        digest = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:12]
        shards.append(Shard(k, tuple(part), i + 1, digest))
    return shards


def shard_path(out_dir: str, shard: Shard) -> str:
    return os.path.join(out_dir, shard.name)


def _existing_shards(out_dir: str) -> Dict[int, List[str]]:
    """{index: [file names]} of the shard files in ``out_dir`` (digest-named, or the digest-less names of
    earlier versions)."""
    found: Dict[int, List[str]] = {}
    if os.path.isdir(out_dir):
        for name in os.listdir(out_dir):
            m = _SHARD_NAME.match(name)
            if m:
                found.setdefault(int(m.group(1)), []).append(name)
    return found


def _plan(files, shard_size, settings) -> dict:
    return {"format": 1, "shard_size": shard_size, "files": [_key(f) for f in files], "settings": settings}


def _describe_change(out_dir: str, plan: dict) -> str:
    """What differs between ``out_dir``'s recorded plan and this one, in words."""
    try:
        with open(os.path.join(out_dir, PLAN_FILE)) as f:
            old = json.load(f)
    except (OSError, ValueError):
        return "its shards were written by another run (it records no plan.json)"
    parts = []
    if old.get("shard_size") != plan["shard_size"]:
        parts.append(f"--shard-size {plan['shard_size']} (it was {old.get('shard_size')})")
    before, now = list(old.get("files", [])), plan["files"]
    added, removed = sorted(set(now) - set(before)), sorted(set(before) - set(now))
    if added or removed:
        what = []
        if added:
            what.append(f"{len(added)} added (e.g. {added[0]})")
        if removed:
            what.append(f"{len(removed)} gone (e.g. {removed[0]})")
        parts.append(f"the image list ({len(now)} images, it was {len(before)}: {', '.join(what)})")
    elif before != now:
        parts.append("the images' order")
    old_s, new_s = old.get("settings") or {}, plan["settings"]
    changed = sorted(k for k in set(old_s) | set(new_s) if old_s.get(k) != new_s.get(k))
    if changed:
        parts.append(f"the settings ({', '.join(changed)})")
    return ", ".join(parts) or "the boxes of some images"


def _todo(files: Sequence[str], out_dir: str, shard_size: int, settings: dict, prompts, mine: Optional[List[int]],
          overwrite: bool, rank: int = 0):
    """(shards to run, shards already done) of this rank's part; checks what ``out_dir`` holds first.

    A shard file under another digest than the one this run would write (other images, boxes or settings) is
    stale: ``ValueError`` saying what changed, or with ``overwrite`` it is deleted (each rank deletes those of
    its own shards, rank 0 those past the new last shard) and the shard is redone."""
    shards = make_shards(files, shard_size, settings, prompts)
    plan = _plan(files, shard_size, settings)
    existing = _existing_shards(out_dir)
    stale = sorted(name for k, names in existing.items() for name in names
                   if k >= len(shards) or name != shards[k].name)
    if stale and not overwrite:
        raise ValueError(f"{out_dir} holds {len(stale)} shard file(s) of a different run (e.g. {stale[0]}): "
                         f"{_describe_change(out_dir, plan)} changed. Nothing was written; use another output "
                         "folder, or overwrite=True (--overwrite) to redo the shards that changed")
    ks = list(range(len(shards))) if mine is None else list(mine)
    owned = set(ks)
    for name in stale:
        k = int(_SHARD_NAME.match(name).group(1))
        if k in owned or (k >= len(shards) and rank == 0):
            try:
                os.unlink(os.path.join(out_dir, name))
            except FileNotFoundError:  # another process removed it
                pass
    write_atomic(os.path.join(out_dir, PLAN_FILE), lambda tmp: _dump(plan, tmp))
    done = {k for k, names in existing.items() if k < len(shards) and shards[k].name in names}
    todo = [shards[k] for k in ks if k not in done]
    return todo, len(ks) - len(todo)


def _dump(obj, path) -> None:
    with open(path, "w") as f:
        json.dump(obj, f)


def write_shard(out_dir: str, shard: Shard, rows: Sequence[dict]) -> dict:
    """Write result rows (``process_image``'s, in any order) as the shard's file, atomically: COCO ``images``,
    ``annotations`` (ids unique across shards: image id x 100000 + n), ``errors``, ordered by image id, and
    ``sam_fast`` (the shard's index, digest and images). Returns a summary row (shard, images, annotations,
    errors)."""
    coco = {"images": [], "annotations": [], "errors": [],
            "sam_fast": {"shard": shard.index, "digest": shard.digest, "files": [_key(f) for f in shard.files]}}
    for r in sorted(rows, key=lambda r: r["image_id"]):
        coco["images"].append({"id": r["image_id"], "file_name": r["path"], "height": r["height"],
                               "width": r["width"]})
        if r["error"]:
            coco["errors"].append({"image_id": r["image_id"], "file_name": r["path"], "error": r["error"]})
        for rec in r["annotations"]:
            coco["annotations"].append(dict(rec, image_id=r["image_id"]))
    for n, ann in enumerate(coco["annotations"]):
        ann["id"] = ann["image_id"] * 100000 + n
    write_atomic(shard_path(out_dir, shard), lambda tmp: _dump(coco, tmp))
    return {"shard": shard.index, "images": len(rows), "annotations": len(coco["annotations"]),
            "errors": len(coco["errors"])}


@dataclasses.dataclass
class Summary:
    """What a run did: shards written now / skipped as already done, images, annotations, error rows, seconds."""

    shards_written: int = 0
    shards_skipped: int = 0
    images: int = 0
    annotations: int = 0
    errors: int = 0
    seconds: float = 0.0

    def add(self, row: dict) -> None:
        self.shards_written += 1
        self.images += int(row["images"])
        self.annotations += int(row["annotations"])
        self.errors += int(row["errors"])

    def __str__(self):
        return (f"{self.images} images in {self.shards_written} shards written ({self.shards_skipped} already done, "
                f"skipped), {self.annotations} masks, {self.errors} images with errors, {self.seconds:.1f} s")


def run_shards(worker: SegmentWorker, files: Sequence[str], out_dir: str, *, shard_size: int = 64, rank: int = 0,
               world: int = 1, prompts: Optional[Dict[str, dict]] = None, overwrite: bool = False,
               progress: bool = True) -> Summary:
    """This rank's shards (``partition`` of the shard list) in a loop, skipping finished ones (see the module
    docstring for what counts as finished, and ``overwrite``). ``prompts``: ``{path: {"boxes": [...]}}`` for a
    boxes-mode worker (default: the worker's own)."""
    from tqdm import tqdm

    prompts = worker.prompts if prompts is None else normalize_prompts(prompts)
    os.makedirs(out_dir, exist_ok=True)
    n_shards = -(-len(files) // shard_size) if isinstance(shard_size, int) and shard_size > 0 else 0
    mine = partition(list(range(n_shards)), rank, world)
    todo, skipped = _todo(files, out_dir, shard_size, worker.settings, prompts, mine, overwrite, rank)
    summary = Summary(shards_skipped=skipped)
    t0 = time.perf_counter()
    for shard in tqdm(todo, desc=f"segment-dataset {rank}/{world}", unit="shard", disable=not progress):
        summary.add(worker.process_shard(shard, out_dir, prompts))
    summary.seconds = time.perf_counter() - t0
    return summary


def run_ray(files: Sequence[str], out_dir: str, worker_kwargs: dict, *, shard_size: int = 64, num_workers: int = 1,
            num_gpus_per_worker: float = 0.0, prompts: Optional[Dict[str, dict]] = None, address: Optional[str] = None,
            batch_size: int = 4, overwrite: bool = False, progress: bool = True) -> Summary:
    """Segment the images of the unfinished shards on Ray Data: the files are read by
    ``ray.data.read_binary_files`` tasks (one block per file, so that the actors share the work and a killed job
    keeps every shard finished so far), decoded and segmented by a pool of ``num_workers``
    :class:`SegmentWorker` actors (``num_gpus_per_worker`` GPUs each) in batches of ``batch_size`` images, and
    the result rows streamed back; each shard is written (atomically) as soon as all its images are in. Files
    that cannot be opened, or that Ray Data does not return, become error rows. Connects to ``address``, or
    starts a local Ray when none runs."""
    try:
        import ray
    except ImportError:
        raise ImportError("the Ray engine needs Ray: pip install sam_fast[ray] (or use --shard RANK/WORLD)") from None
    from tqdm import tqdm

    batch_size = int_arg(batch_size, "batch_size", 1)
    prompts = None if prompts is None else normalize_prompts(prompts)
    kwargs = dict(worker_kwargs)
    if prompts is not None:
        kwargs["prompts"] = prompts
    settings = worker_settings(kwargs.get("checkpoint"), **_settings_args(kwargs))
    os.makedirs(out_dir, exist_ok=True)
    todo, skipped = _todo(files, out_dir, shard_size, settings, prompts, None, overwrite)
    summary = Summary(shards_skipped=skipped)
    if not todo:
        return summary
    t0 = time.perf_counter()
    where: Dict[str, tuple] = {}  # absolute path -> (listed path, image id, shard)
    pending: Dict[int, list] = {sh.index: [] for sh in todo}
    by_index = {sh.index: sh for sh in todo}
    readable = []
    for sh in todo:
        for j, p in enumerate(sh.files):
            key = _key(p)
            if key in where:
                raise ValueError(f"files: {p} is listed twice")
            where[key] = (p, sh.first_id + j, sh.index)
            if prompts is not None and kwargs.get("mode") == "boxes" and key not in prompts:
                pending[sh.index].append(dict(path=p, image_id=sh.first_id + j, height=0, width=0, annotations=[],
                                              error="no boxes for this image (mode 'boxes': it has no entry in the "
                                                    "prompts)"))
            elif os.path.isfile(key) and os.access(key, os.R_OK):
                readable.append(key)
            else:
                pending[sh.index].append(dict(path=p, image_id=sh.first_id + j, height=0, width=0, annotations=[],
                                              error="cannot read: not a readable file"))

    def finish(k, bar):
        summary.add(write_shard(out_dir, by_index[k], pending.pop(k)))
        bar.update(1)

    with tqdm(total=len(todo), desc="segment-dataset (ray)", unit="shard", disable=not progress) as bar:
        for k in [k for k, rows in pending.items() if len(rows) == len(by_index[k].files)]:
            finish(k, bar)
        if readable:
            if not ray.is_initialized():
                ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
            # reading is I/O: its tasks reserve no CPU, so CPU-only actors holding every core cannot starve it; one
            # block per file, or Ray Data may hand every file to one actor as a single block
            ds = ray.data.read_binary_files(readable, include_paths=True, ignore_missing_paths=True, num_cpus=0,
                                            override_num_blocks=len(readable))
            results = ds.map_batches(SegmentWorker, fn_constructor_kwargs=kwargs, batch_size=batch_size,
                                     batch_format="numpy",
                                     compute=ray.data.ActorPoolStrategy(size=max(1, int(num_workers))),
                                     num_gpus=num_gpus_per_worker or None)
            for row in results.iter_rows():
                listed, image_id, k = where[_local_path(str(row["path"]))]
                pending[k].append(dict(path=listed, image_id=image_id, height=int(row["height"]),
                                       width=int(row["width"]), annotations=json.loads(row["annotations"]),
                                       error=str(row["error"])))
                if len(pending[k]) == len(by_index[k].files):
                    finish(k, bar)
        for sh in todo:  # files that vanished between listing and reading
            if sh.index not in pending:
                continue
            seen = {r["image_id"] for r in pending[sh.index]}
            pending[sh.index] += [dict(path=p, image_id=sh.first_id + j, height=0, width=0, annotations=[],
                                       error="cannot read: Ray Data returned no bytes (file missing)")
                                  for j, p in enumerate(sh.files) if sh.first_id + j not in seen]
            finish(sh.index, bar)
    summary.seconds = time.perf_counter() - t0
    return summary


def _settings_args(kwargs: dict) -> dict:
    """The :func:`worker_settings` arguments among a :class:`SegmentWorker`'s keyword arguments (defaults as its
    constructor's)."""
    return {"model_type": kwargs.get("model_type", "auto"), "config": kwargs.get("config"),
            "mode": kwargs.get("mode", "everything"), "generator_kwargs": kwargs.get("generator_kwargs"),
            "decoder_heads": kwargs.get("decoder_heads"), "calibration_images": kwargs.get("calibration_images")}


def read_results(out_dir: str) -> dict:
    """All shards of ``out_dir`` merged into one COCO dict (``images``, ``annotations``, ``errors``)."""
    merged = {"images": [], "annotations": [], "errors": []}
    for name in sorted(os.listdir(out_dir)):
        if _SHARD_NAME.match(name):
            with open(os.path.join(out_dir, name)) as f:
                shard = json.load(f)
            for key in merged:
                merged[key].extend(shard[key])
    return merged
