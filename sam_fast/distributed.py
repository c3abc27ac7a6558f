"""Segmenting a dataset on many processes or GPUs: a worker any engine can call, an exact partition, and
restartable per-shard outputs, with Ray Data as the engine (``sam-fast segment-dataset``).

The image list (sorted paths) is cut into *shards* of ``shard_size`` consecutive images; image ``i`` has COCO
``image_id`` ``i + 1`` whoever processes it. A shard's result is one COCO JSON file, ``shard-<k>.json``
(``images``, ``annotations`` with compressed RLE, and ``errors``: the images that could not be read or
segmented, with the reason), written atomically (a temporary file renamed into place), so a reader or a rerun
never sees half a shard. A rerun skips the shards whose file exists, so a killed job completes without
duplicates and nothing already written is lost.

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
import json
import os
import time
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np

from ._files import write_atomic

MODES = ("everything", "boxes")


def partition(items: Sequence, rank: int, world: int) -> list:
    """The ``rank``-th of ``world`` contiguous, near-equal parts of ``items``: together the parts hold every item
    exactly once (sizes differ by at most one)."""
    for name, v in (("rank", rank), ("world", world)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be an int, got {type(v).__name__}")
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


def shard_path(out_dir: str, k: int) -> str:
    return os.path.join(out_dir, f"shard-{k:06d}.json")


def make_shards(files: Sequence[str], shard_size: int) -> List[List[str]]:
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size must be an int >= 1, got {shard_size!r}")
    return [list(files[i:i + shard_size]) for i in range(0, len(files), shard_size)]


class SegmentWorker:
    """Load and patch a model once; segment images into COCO records.

    Args:
        checkpoint: anything :func:`sam_fast.models.load_sam` reads (a distilled student brings its pattern).
        model_type, decoder_heads: as for ``load_sam``.
        config: a :class:`sam_fast.SamFastConfig` applied to the model (default: exact fused attention where the
            encoder has ViT blocks, nothing for TinyViT); ``None`` keeps a distilled student's own attention.
        calibration_images: with ``config.quantize == "int8"``: images (paths or arrays) to calibrate on.
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

        from . import SamFastAutomaticMaskGenerator, SamFastConfig, SamFastPredictor, apply
        from .models import load_sam
        from .surgery import vit_blocks

        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if isinstance(checkpoint, (str, os.PathLike)):
            sam = load_sam(checkpoint, model_type, decoder_heads=decoder_heads)
        else:
            sam = checkpoint  # a model object (a plain loop in the caller's process)
        sam.to(self.device).eval()
        if config is None and getattr(sam, "sam_fast_config", None) is None:
            config = SamFastConfig(attention="exact" if vit_blocks(sam) else "none")
        if config is not None:
            if config.quantize == "int8" and calibration_images is not None and config.calibration is None:
                from .quantize import calibrate

                images = []
                for p in calibration_images:
                    try:
                        images.append(self._read(p) if isinstance(p, (str, os.PathLike)) else p)
                    except Exception as exc:
                        raise ValueError(f"calibration_images: cannot read {p} ({type(exc).__name__}: {exc})") from None
                config = dataclasses.replace(config, calibration=calibrate(sam, images, progress=False))
            apply(sam, config)
        self.sam = sam
        self.prompts = prompts
        kwargs = dict(generator_kwargs or {})
        kwargs["output_mode"] = "coco_rle"
        self.engine = SamFastAutomaticMaskGenerator(sam, **kwargs) if mode == "everything" else SamFastPredictor(sam)

    @staticmethod
    def _read(source):
        from .images import read_rgb

        return read_rgb(source)

    def segment(self, image, boxes=None) -> List[dict]:
        """COCO records of one HxWx3 uint8 image: the generator's records, or one per box (``mode="boxes"``)."""
        if self.mode == "everything":
            return self.engine.generate(image)
        from pycocotools import mask as mask_utils

        boxes = np.asarray(boxes if boxes is not None else np.zeros((0, 4)), dtype=np.float64).reshape(-1, 4)
        if not len(boxes):
            return []
        self.engine.set_images([image])
        out = self.engine.predict_batch([{"boxes": boxes}], multimask_output=False)[0]
        masks = out["masks"][:, 0].cpu().numpy()
        records = []
        for m, box, iou in zip(masks, boxes, out["iou_predictions"][:, 0].tolist()):
            rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
            ys, xs = np.nonzero(m)
            bbox = [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)] \
                if len(xs) else [0.0, 0.0, 0.0, 0.0]
            records.append({"segmentation": {"size": list(rle["size"]), "counts": rle["counts"].decode()},
                            "area": int(m.sum()), "bbox": bbox, "predicted_iou": float(iou),
                            "box_prompt": [float(v) for v in box]})
        return records

    def process_image(self, path, image_id: int, boxes=None) -> dict:
        """One result row: ``path``, ``image_id``, ``height``, ``width``, ``annotations`` (records), ``error``
        ("" when it worked; the reason when the file could not be read or segmented - never an exception).
        ``path`` may also be the file's bytes (the row's ``path`` is then ``""``)."""
        if isinstance(path, (bytes, bytearray, memoryview)):
            source, path = path, ""
        else:
            source = path
        try:
            image = self._read(source)
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

    def process_shard(self, k: int, files: Sequence[str], first_id: int, out_dir: str,
                      prompts: Optional[Dict[str, dict]] = None) -> dict:
        """Segment shard ``k`` (its files; the first has image id ``first_id``) and write ``shard-<k>.json``
        atomically. Returns a summary row (shard, images, annotations, errors, seconds)."""
        t0 = time.perf_counter()
        rows = [self.process_image(p, first_id + j, (prompts or {}).get(p, {}).get("boxes"))
                for j, p in enumerate(files)]
        return dict(write_shard(out_dir, k, rows), seconds=time.perf_counter() - t0)

    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, list]:
        """Ray Data ``map_batches`` entry point: rows ``{path, bytes}`` (``ray.data.read_binary_files`` with
        ``include_paths=True``) in; rows ``{path, height, width, annotations (JSON list of records), error}`` out.
        Boxes for ``mode="boxes"`` come from ``prompts`` given to the constructor, keyed by path."""
        out: Dict[str, list] = {"path": [], "height": [], "width": [], "annotations": [], "error": []}
        for path, data in zip(batch["path"], batch["bytes"]):
            path = _local_path(str(path))
            row = self.process_image(bytes(data), 0, (self.prompts or {}).get(path, {}).get("boxes"))
            out["path"].append(path)
            out["height"].append(row["height"])
            out["width"].append(row["width"])
            out["annotations"].append(json.dumps(row["annotations"]))
            out["error"].append(row["error"])
        return out


def _local_path(path: str) -> str:
    """A path as Ray Data reports it (``include_paths``) -> the absolute local path the job listed."""
    if path.startswith("local://"):
        path = path[len("local://"):]
    return os.path.normpath(path if os.path.isabs(path) else os.sep + path)


def write_shard(out_dir: str, k: int, rows: Sequence[dict]) -> dict:
    """Write result rows (``process_image``'s, in any order) as ``shard-<k>.json``, atomically: COCO ``images``,
    ``annotations`` (ids unique across shards: image id x 100000 + n) and ``errors``, ordered by image id.
    Returns a summary row (shard, images, annotations, errors)."""
    coco = {"images": [], "annotations": [], "errors": []}
    for r in sorted(rows, key=lambda r: r["image_id"]):
        coco["images"].append({"id": r["image_id"], "file_name": r["path"], "height": r["height"],
                               "width": r["width"]})
        if r["error"]:
            coco["errors"].append({"image_id": r["image_id"], "file_name": r["path"], "error": r["error"]})
        for rec in r["annotations"]:
            coco["annotations"].append(dict(rec, image_id=r["image_id"]))
    for n, ann in enumerate(coco["annotations"]):
        ann["id"] = ann["image_id"] * 100000 + n

    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(coco, f)

    write_atomic(shard_path(out_dir, k), write)
    return {"shard": k, "images": len(rows), "annotations": len(coco["annotations"]), "errors": len(coco["errors"])}


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


def _todo(files: Sequence[str], out_dir: str, shard_size: int, mine: Optional[Iterable[int]] = None):
    shards = make_shards(files, shard_size)
    ks = range(len(shards)) if mine is None else mine
    todo = [(k, shards[k], k * shard_size + 1) for k in ks if not os.path.isfile(shard_path(out_dir, k))]
    return todo, len(list(ks)) - len(todo)


def run_shards(worker: SegmentWorker, files: Sequence[str], out_dir: str, *, shard_size: int = 64, rank: int = 0,
               world: int = 1, prompts: Optional[Dict[str, dict]] = None, progress: bool = True) -> Summary:
    """This rank's shards (``partition`` of the shard list) in a loop, skipping finished ones."""
    from tqdm import tqdm

    os.makedirs(out_dir, exist_ok=True)
    n_shards = len(make_shards(files, shard_size))
    todo, skipped = _todo(files, out_dir, shard_size, partition(list(range(n_shards)), rank, world))
    summary = Summary(shards_skipped=skipped)
    t0 = time.perf_counter()
    for k, shard_files, first in tqdm(todo, desc=f"segment-dataset {rank}/{world}", unit="shard",
                                      disable=not progress):
        summary.add(worker.process_shard(k, shard_files, first, out_dir, prompts))
    summary.seconds = time.perf_counter() - t0
    return summary


def run_ray(files: Sequence[str], out_dir: str, worker_kwargs: dict, *, shard_size: int = 64, num_workers: int = 1,
            num_gpus_per_worker: float = 0.0, prompts: Optional[Dict[str, dict]] = None, address: Optional[str] = None,
            batch_size: int = 4, progress: bool = True) -> Summary:
    """Segment the images of the unfinished shards on Ray Data: the files are read by
    ``ray.data.read_binary_files`` tasks, decoded and segmented by a pool of ``num_workers``
    :class:`SegmentWorker` actors (``num_gpus_per_worker`` GPUs each) in batches of ``batch_size`` images, and
    the result rows streamed back; each shard is written (atomically) as soon as all its images are in, so a
    killed job keeps every finished shard. Files that cannot be opened, or that Ray Data does not return,
    become error rows. Connects to ``address``, or starts a local Ray when none runs."""
    try:
        import ray
    except ImportError:
        raise ImportError("the Ray engine needs Ray: pip install sam_fast[ray] (or use --shard RANK/WORLD)") from None
    from tqdm import tqdm

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    os.makedirs(out_dir, exist_ok=True)
    todo, skipped = _todo(files, out_dir, shard_size)
    summary = Summary(shards_skipped=skipped)
    if not todo:
        return summary
    t0 = time.perf_counter()
    where: Dict[str, tuple] = {}  # absolute path -> (listed path, image id, shard)
    pending: Dict[int, list] = {k: [] for k, _, _ in todo}
    size = {k: len(fs) for k, fs, _ in todo}
    readable = []
    for k, fs, first in todo:
        for j, p in enumerate(fs):
            key = os.path.normpath(os.path.abspath(p))
            if key in where:
                raise ValueError(f"files: {p} is listed twice")
            where[key] = (p, first + j, k)
            if os.path.isfile(key) and os.access(key, os.R_OK):
                readable.append(key)
            else:
                pending[k].append(dict(path=p, image_id=first + j, height=0, width=0, annotations=[],
                                       error="cannot read: not a readable file"))

    def finish(k, bar):
        summary.add(write_shard(out_dir, k, pending.pop(k)))
        bar.update(1)

    kwargs = dict(worker_kwargs)
    if prompts:
        kwargs["prompts"] = {os.path.normpath(os.path.abspath(p)): v for p, v in prompts.items()}
    with tqdm(total=len(todo), desc="segment-dataset (ray)", unit="shard", disable=not progress) as bar:
        for k in [k for k, rows in pending.items() if len(rows) == size[k]]:
            finish(k, bar)
        if readable:
            if not ray.is_initialized():
                ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
            # reading is I/O: its tasks reserve no CPU, so CPU-only actors holding every core cannot starve it
            ds = ray.data.read_binary_files(readable, include_paths=True, ignore_missing_paths=True, num_cpus=0)
            results = ds.map_batches(SegmentWorker, fn_constructor_kwargs=kwargs, batch_size=batch_size,
                                     batch_format="numpy",
                                     compute=ray.data.ActorPoolStrategy(size=max(1, int(num_workers))),
                                     num_gpus=num_gpus_per_worker or None)
            for row in results.iter_rows():
                listed, image_id, k = where[_local_path(str(row["path"]))]
                pending[k].append(dict(path=listed, image_id=image_id, height=int(row["height"]),
                                       width=int(row["width"]), annotations=json.loads(row["annotations"]),
                                       error=str(row["error"])))
                if len(pending[k]) == size[k]:
                    finish(k, bar)
        for k, fs, first in todo:  # files that vanished between listing and reading
            if k not in pending:
                continue
            seen = {r["image_id"] for r in pending[k]}
            pending[k] += [dict(path=p, image_id=first + j, height=0, width=0, annotations=[],
                                error="cannot read: Ray Data returned no bytes (file missing)")
                           for j, p in enumerate(fs) if first + j not in seen]
            finish(k, bar)
    summary.seconds = time.perf_counter() - t0
    return summary


def read_results(out_dir: str) -> dict:
    """All shards of ``out_dir`` merged into one COCO dict (``images``, ``annotations``, ``errors``)."""
    merged = {"images": [], "annotations": [], "errors": []}
    for name in sorted(os.listdir(out_dir)):
        if name.startswith("shard-") and name.endswith(".json"):
            with open(os.path.join(out_dir, name)) as f:
                shard = json.load(f)
            for key in merged:
                merged[key].extend(shard[key])
    return merged
