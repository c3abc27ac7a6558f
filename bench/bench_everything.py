"""Benchmark: "segment everything" - decoder + post-processing per image, the encoder excluded.

The image embedding is computed once and served by a stub encoder, so every backend times exactly
the decoder side: point grid -> prompt encoder -> mask decoder -> post-processing (resizes,
filtering, stability, boxes, RLE) -> NMS -> records (``output_mode="coco_rle"``).

* ``segment_anything`` (baseline): ``SamAutomaticMaskGenerator`` with its defaults (64 points per
  decoder call);
* ``segment_anything_b256``: the same pipeline with ``predict_torch`` batches of 256 points and
  torchvision NMS (``points_per_batch=256``);
* ``sam_fast``: ``SamFastAutomaticMaskGenerator`` (batched decoder, fused post-processing op, all
  points of the image in as few decoder calls as memory allows);
* ``sam_fast_hierarchical``: the same with TinySAM's two-round mode.

The decoder: SAM's (width 256, 8 heads; the tiny test model on a CPU), trained here first, in seconds,
to segment a synthetic scene of Voronoi cells whose codes form the image embedding
(``bench/synthetic_segments.py``; ``--decoder random`` keeps random weights). A random decoder returns
one near-identical mask for every point, so NMS keeps one mask and the hierarchical mode finds nothing
confident to skip: timings would leave out the work a trained SAM causes and could not measure the
hierarchical mode at all. The note of each row gives the scene, the trained decoder's best-mask IoU and
the number of masks; for the hierarchical mode also the points it skipped and the mean best IoU of the
dense mode's masks with its masks (mask agreement). No checkpoint can be downloaded here, so these are
not a trained SAM's figures.

GPU: a 1024 x 1024 image, 32 x 32 points. segment_anything cannot run a bf16 model (its prompt encoder
and predictor feed float32 into cast weights), so its generator runs in float32, its native precision;
sam_fast runs in bf16 and, for the same-precision comparison, in float32 (``sam_fast_fp32``). CPU: a
256 x 256 image, 16 x 16 points. Thresholds are lowered (``pred_iou_thresh`` off,
``stability_score_thresh`` 0) so every backend post-processes every mask: the same work for all.

SAM 2 (``--family sam2``): Meta's ``SAM2AutomaticMaskGenerator`` (baseline ``sam2``, 64 points per call; ``sam2_b256``;
on the GPU also under ``torch.autocast`` bf16, as SAM 2's examples run it) against ``SamFastAutomaticMaskGenerator``
(float32; on the GPU also under autocast and on the model cast to bf16) on the same SAM 2.1 model (its decoder at
full size, a tiny Hiera trunk whose image features are computed once and served by a stub, as above; random decoder
weights with scaled logits, ``sam_fast.models.sam2.tiny_sam2``), box NMS off so that every mask is post-processed and
recorded (a random decoder's masks overlap). The note says how many of sam_fast's masks equal Meta's (float32). CPU:
a 256 x 256 image, 8 x 8 points (``--quick``: 2 x 2); GPU: 1024 x 1024, 32 x 32 (``--quick``: 16 x 16).

    python bench/bench_everything.py [--out bench/results] [--quick | --targets] [--decoder trained|random]
                                     [--family sam|sam2]
"""

from __future__ import annotations

import copy
import sys
import time

from sam_fast.kernels._interpreter import use_interpreter_without_gpu

use_interpreter_without_gpu()

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from sam_fast.bench.harness import LiveRows, bench_main, measure, provenance, save_results  # noqa: E402

SCRIPT = "bench_everything"
BASELINE = "segment_anything"


class FixedEmbedding(nn.Module):
    """Stands in for the image encoder: returns a precomputed embedding for any input."""

    def __init__(self, embedding: torch.Tensor, img_size: int):
        super().__init__()
        self.register_buffer("embedding", embedding)
        self.img_size = img_size

    def forward(self, x):
        return self.embedding.expand(x.shape[0], -1, -1, -1)


def _agreement(reference, other) -> float:
    """Mean over ``reference`` masks of the best IoU with any ``other`` mask (COCO RLE records)."""
    from sam_fast import coco_to_mask

    if not reference or not other:
        return float("nan")
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def stack(records):  # (masks, pixels) float32: exact counts below 2**24 pixels (TF32 is off by default)
        return torch.stack([torch.from_numpy(coco_to_mask(r["segmentation"])).ravel() for r in records]).to(
            dev, torch.float32)

    a, b = stack(reference), stack(other)
    inter = a @ b.T
    union = a.sum(1)[:, None] + b.sum(1)[None, :] - inter
    return float((inter / union.clamp_min(1)).amax(dim=1).mean())


# The performance targets (tools/targets.py) read every generator but the fp32 one.
TARGET_BACKENDS = (BASELINE, "segment_anything_b256", "sam_fast", "sam_fast_hierarchical")


def _photo(side: int) -> np.ndarray:
    """The astronaut photo's top-left 512 x 512, resized to side x side: HxWx3 uint8."""
    from skimage import data

    image = torch.as_tensor(np.ascontiguousarray(data.astronaut()[:512, :512])).permute(2, 0, 1)[None].float()
    image = torch.nn.functional.interpolate(image, (side, side), mode="bilinear")[0]
    return np.asarray(image.permute(1, 2, 0).round().clamp(0, 255).byte())


def _case(side, pps, decoder):
    return f"{side}x{side} {pps}x{pps} points, {decoder} decoder"


def planned_rows(targets=True):
    """The (op, case, backend, mode) rows a GPU run writes, without running it."""
    names = TARGET_BACKENDS if targets else TARGET_BACKENDS[:2] + ("sam_fast_fp32",) + TARGET_BACKENDS[2:]
    return [dict(op="everything", case=_case(1024, 32, "trained"), backend=b, mode="fwd") for b in names]


def run(out_dir: str, quick: bool = False, device: str = None, decoder: str = "trained", targets: bool = False,
        family: str = "sam"):
    if family == "sam2":
        return run_sam2(out_dir, quick, device)
    if family not in (None, "", "sam"):
        raise ValueError(f"family must be 'sam' or 'sam2', got {family!r}")
    from segment_anything import SamAutomaticMaskGenerator

    from sam_fast import SamFastAutomaticMaskGenerator
    from sam_fast.models import sam_decoder, tiny_sam

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = dev.type == "cuda"
    prov = provenance(dev)
    if gpu:
        sam, side, pps, dtype = sam_decoder(), 1024, (16 if quick else 32), torch.bfloat16
    else:
        sam, side, pps, dtype = tiny_sam(), 256, 16, torch.float32
    image = _photo(side)
    sam = sam.to(device=dev)
    decoder = decoder or "trained"
    if decoder == "random":
        from segment_anything import SamPredictor

        with torch.no_grad():  # the (random-weight) encoder's embedding of the image, computed once
            once = SamPredictor(sam)
            once.set_image(image)
            embedding = once.features
        trained = "random decoder"
    elif decoder == "trained":  # a decoder that segments a synthetic scene (bench/synthetic_segments.py)
        from sam_fast.bench.synthetic_segments import train_segmenting_decoder

        t0 = time.perf_counter()
        scene = train_segmenting_decoder(sam, **(dict(steps=1000, points_per_step=32, n_regions=32) if gpu else
                                                 dict(steps=300, points_per_step=32, n_regions=12)))
        embedding = scene["embedding"]
        trained = f"decoder trained on a {scene['n_regions']}-cell scene, best-mask IoU {scene['mean_iou']:.2f}"
        print(f"{trained} ({time.perf_counter() - t0:.0f} s)", flush=True)
    else:
        raise ValueError(f"decoder must be 'trained' or 'random', got {decoder!r}")
    sam.image_encoder = FixedEmbedding(embedding, sam.image_encoder.img_size).to(dev)
    fast_model = copy.deepcopy(sam).to(dtype) if dtype != torch.float32 else sam
    kw = dict(points_per_side=pps, pred_iou_thresh=-1.0, stability_score_thresh=0.0, output_mode="coco_rle")
    generators = [
        (BASELINE, SamAutomaticMaskGenerator(sam, **kw)),
        ("segment_anything_b256", SamAutomaticMaskGenerator(sam, points_per_batch=256, **kw)),
        ("sam_fast", SamFastAutomaticMaskGenerator(fast_model, **kw)),
        ("sam_fast_hierarchical", SamFastAutomaticMaskGenerator(fast_model, hierarchical=True, **kw)),
    ]
    if fast_model is not sam and not targets:
        generators.insert(2, ("sam_fast_fp32", SamFastAutomaticMaskGenerator(sam, **kw)))
    rows, records = LiveRows(out_dir, SCRIPT), {}
    case = _case(side, pps, decoder)
    with torch.no_grad():
        for backend, gen in generators:
            records[backend] = gen.generate(image)
            m = measure(lambda: gen.generate(image), dev, cpu_reps=3, warmup_ms=50, rep_ms=500)
            precision = "bf16" if gen.predictor.model is not sam else "float32"
            note = f"{precision}, {len(records[backend])} masks; {trained}"
            if backend == "sam_fast_hierarchical":
                note += (f", agreement with dense {_agreement(records['sam_fast'], records[backend]):.3f}, "
                         f"{gen.last_stats['points_skipped']} points skipped")
            rows.append(dict(prov, op="everything", case=case, backend=backend, mode="fwd", metric="img_per_s",
                             value=1e3 / m["median_ms"], note=note, **m))
    return save_results(out_dir, SCRIPT, rows, BASELINE,
                        f"segment everything (decoder side): speedup over segment_anything ({prov['device']})")


class FixedBackbone(nn.Module):
    """Stands in for SAM 2's image encoder: returns precomputed trunk + neck outputs (fresh lists: SAM 2's
    ``forward_image`` replaces the first two levels with their projections)."""

    def __init__(self, out: dict):
        super().__init__()
        self.register_buffer("features", out["vision_features"])
        self.levels = len(out["backbone_fpn"])
        for i in range(self.levels):
            self.register_buffer(f"fpn{i}", out["backbone_fpn"][i])
            self.register_buffer(f"pos{i}", out["vision_pos_enc"][i])

    def forward(self, x):
        return {"vision_features": self.features,
                "vision_pos_enc": [getattr(self, f"pos{i}") for i in range(self.levels)],
                "backbone_fpn": [getattr(self, f"fpn{i}") for i in range(self.levels)]}


def run_sam2(out_dir: str, quick: bool = False, device: str = None):
    """SAM 2's segment everything, decoder side (module docstring)."""
    import contextlib

    from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator

    from sam_fast import SamFastAutomaticMaskGenerator
    from sam_fast.models.sam2 import tiny_sam2

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = dev.type == "cuda"
    prov = provenance(dev)
    side, pps = (1024, 16 if quick else 32) if gpu else (256, 2 if quick else 8)
    image = _photo(side)
    model = tiny_sam2().to(dev)
    with torch.no_grad():  # the image features, once; the stub serves them to every generator
        from sam2.utils.transforms import SAM2Transforms

        x = SAM2Transforms(model.image_size, 0.0)(image)[None].to(dev)
        model.image_encoder = FixedBackbone(model.image_encoder(x)).to(dev)
    # thresholds off and NMS keeping every mask: a random decoder's masks overlap, and all of them should be
    # post-processed, encoded and compared
    kw = dict(points_per_side=pps, pred_iou_thresh=-1.0, stability_score_thresh=0.0, box_nms_thresh=1.0,
              output_mode="coco_rle")
    bf16 = copy.deepcopy(model).to(torch.bfloat16) if gpu else None
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if gpu else contextlib.nullcontext
    generators = [("sam2", SAM2AutomaticMaskGenerator(model, **kw), contextlib.nullcontext, "float32"),
                  ("sam2_b256", SAM2AutomaticMaskGenerator(model, points_per_batch=256, **kw), contextlib.nullcontext,
                   "float32")]
    if gpu:
        generators.append(("sam2_autocast_bf16", SAM2AutomaticMaskGenerator(model, **kw), autocast, "autocast bf16"))
    generators.append(("sam_fast", SamFastAutomaticMaskGenerator(model, **kw), contextlib.nullcontext, "float32"))
    if gpu:
        generators += [("sam_fast_autocast_bf16", SamFastAutomaticMaskGenerator(model, **kw), autocast,
                        "autocast bf16"),
                       ("sam_fast_bf16", SamFastAutomaticMaskGenerator(bf16, **kw), contextlib.nullcontext, "bf16")]
    rows, records = LiveRows(out_dir, SCRIPT), {}
    case = f"SAM 2.1 {side}x{side} {pps}x{pps} points, random decoder"
    with torch.no_grad():
        for backend, gen, context, precision in generators:
            with context():
                records[backend] = gen.generate(image)
                m = measure(lambda: gen.generate(image), dev, cpu_reps=3, warmup_ms=50, rep_ms=500)
            note = f"{precision}, {len(records[backend])} masks"
            if backend.startswith("sam_fast"):
                same = sum(a["segmentation"] == b["segmentation"] and a["point_coords"] == b["point_coords"]
                           for a, b in zip(records["sam2"], records[backend]))
                note += f"; masks equal to Meta's float32 ones: {same} of {len(records['sam2'])}"
            rows.append(dict(prov, op="everything_sam2", case=case, backend=backend, mode="fwd", metric="img_per_s",
                             value=1e3 / m["median_ms"], note=note, **m))
    return save_results(out_dir, SCRIPT, rows, "sam2",
                        f"SAM 2 segment everything (decoder side): speedup over Meta's sam2 ({prov['device']})")


def main(argv=None):
    return bench_main(__doc__, run, BASELINE, argv, options=[
        ("--decoder", "store", "'trained' (default: a decoder trained here to segment a synthetic scene, so masks "
                               "survive and the hierarchical mode has confident masks) or 'random' weights"),
        ("--family", "store", "'sam' (default: segment_anything's generator against sam_fast's) or 'sam2' (Meta's "
                              "SAM2AutomaticMaskGenerator against sam_fast's, on a SAM 2.1 model)")])


if __name__ == "__main__":
    sys.exit(main())
