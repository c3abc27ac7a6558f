"""Benchmark: segmenting a folder of images end to end, the Ray Data pipeline vs a plain loop, one device.

Both run :class:`sam_fast.segment_dataset.SegmentWorker` (everything mode) over the same images into per-shard
COCO JSON; the time is the whole job as a user runs it - model load, (Ray start and actor creation), every
image read, segmented and written - so on few images the fixed costs show, and the rows say how many images
they cover. Backends:

* ``loop`` - :func:`sam_fast.segment_dataset.run_shards` in this process (the ``--shard 0/1`` path);
* ``ray(1 actor)`` - :func:`sam_fast.segment_dataset.run_ray` with one actor (one GPU on a GPU machine) on a
  local Ray instance started for the run (rows say "not installed" where Ray is absent).

GPU case: ViT-B geometry (random weights), 32 points per side, 16 scikit-image photos. CPU case: the tiny test
model, 4 points per side, 6 photos. Metric: images/s (``value``).

    python bench/bench_segment_dataset.py [--out bench/results] [--quick]
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time

from sam_fast.kernels._interpreter import use_interpreter_without_gpu

if __name__ == "__main__":
    use_interpreter_without_gpu()

import torch  # noqa: E402

from sam_fast.bench.harness import LiveRows, bench_main, provenance, save_results  # noqa: E402

SCRIPT = "bench_segment_dataset"
BASELINE = "loop"
EXTRA_COLUMNS = ["images"]
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "cat", "immunohistochemistry", "retina", "hubble_deep_field")


def planned_rows(targets=True):
    return [dict(op="segment_dataset", case="vit_b everything 16 images", backend=b, mode="end-to-end")
            for b in (BASELINE, "ray(1 actor)")]


def _folder(root: str, n: int, side: int) -> str:
    import numpy as np
    import skimage.data
    from PIL import Image

    folder = os.path.join(root, "images")
    os.makedirs(folder)
    for i in range(n):
        im = getattr(skimage.data, PHOTOS[i % len(PHOTOS)])()
        im = im if im.ndim == 3 else np.repeat(im[..., None], 3, axis=2)
        Image.fromarray(np.ascontiguousarray(im[..., :3])).resize((side, side * 3 // 4)).save(
            os.path.join(folder, f"{i:03d}.png"))
    return folder


def run(out_dir: str, quick: bool = False, device: str = None):
    from sam_fast.checkpoint import save_sam
    from sam_fast.images import list_images
    from sam_fast.models import build_sam, tiny_sam
    from sam_fast.segment_dataset import SegmentWorker, run_ray, run_shards

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = dev.type == "cuda"
    prov = provenance(dev)
    rows = LiveRows(out_dir, SCRIPT, EXTRA_COLUMNS)
    work = tempfile.mkdtemp(prefix="sam_fast_bench_dataset_")
    try:
        n = (4 if quick else 16) if gpu else 6
        ckpt = os.path.join(work, "model.pth")
        save_sam(build_sam("vit_b") if gpu else tiny_sam(), ckpt)
        files = list_images(_folder(work, n, 1024 if gpu else 320))
        kwargs = dict(checkpoint=ckpt, device=str(dev), generator_kwargs={"points_per_side": 32 if gpu else 4})
        case = f"{'vit_b' if gpu else 'tiny'} everything {n} images"
        base = dict(prov, op="segment_dataset", case=case, mode="end-to-end", images=n, metric="images/s")
        t0 = time.perf_counter()
        run_shards(SegmentWorker(**kwargs), files, os.path.join(work, "loop"), shard_size=4, progress=False)
        seconds = time.perf_counter() - t0
        rows.append(dict(base, backend=BASELINE, median_ms=seconds * 1e3, value=n / seconds))
        try:
            import ray
        except ImportError:
            rows.append(dict(base, backend="ray(1 actor)", median_ms="",
                             note="not installed: pip install sam_fast[ray]"))
        else:
            t0 = time.perf_counter()
            ray.init(num_cpus=os.cpu_count(), num_gpus=1 if gpu else 0, include_dashboard=False, log_to_driver=False)
            try:
                run_ray(files, os.path.join(work, "ray"), kwargs, shard_size=4, num_workers=1,
                        num_gpus_per_worker=1.0 if gpu else 0.0, progress=False)
            finally:
                ray.shutdown()
            seconds = time.perf_counter() - t0
            rows.append(dict(base, backend="ray(1 actor)", median_ms=seconds * 1e3, value=n / seconds,
                             note="Ray start and actor creation included"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return save_results(out_dir, SCRIPT, rows, BASELINE, f"segment a dataset, {prov['device']}, {prov['git_sha']}",
                        EXTRA_COLUMNS)


def main(argv=None):
    return bench_main(__doc__, run, BASELINE, argv)


if __name__ == "__main__":
    sys.exit(main())
