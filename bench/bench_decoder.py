"""Benchmark: SAM's decoder side - mask post-processing and the batched mask decoder.

``mask_postprocess`` cases: P low-resolution (256 x 256) logits to a 1024 x 1024 image (and, on the
GPU, a 1500 x 2250 one): the two bilinear resizes, threshold, stability score, box and COCO RLE.

* ``segment_anything`` (baseline): ``Sam.postprocess_masks`` + ``calculate_stability_score`` +
  ``batched_mask_to_box`` + ``mask_to_rle_pytorch`` on chunks of 192 masks (the automatic mask
  generator's 64 points x 3 masks; all 1024 at once would need 8 GB of float masks);
* ``sam_fast_cpu`` / ``sam_fast_cuda``: ``sam_fast.mask_postprocess``, all masks in one call.

``decoder`` cases: prompt encoder + mask decoder for P single-point prompts on one image (multimask),
``segment_anything`` (its ``MaskDecoder``, which repeats the image embedding per prompt) vs
``sam_fast`` (``BatchedMaskDecoder``). On the GPU: SAM's decoder (width 256) at bf16 on a 64 x 64
embedding, P = 1024; on a CPU the tiny test model's decoder.

Logits are smooth random fields (bicubic upsampling of 12 x 12 noise), about as many RLE runs per mask
as real SAM masks of cluttered scenes; ``max_err`` is 0 when every mask's area, box and RLE equal the
baseline's.

    python bench/bench_decoder.py [--out bench/results] [--quick | --targets]
"""

from __future__ import annotations

import copy
import sys

from sam_fast.kernels._interpreter import use_interpreter_without_gpu

use_interpreter_without_gpu()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from sam_fast.bench.harness import LiveRows, bench_main, measure, provenance, save_results  # noqa: E402

SCRIPT = "bench_decoder"
BASELINE = "segment_anything"
CHUNK = 192


def _logits(P, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(P, 1, 12, 12, generator=g) * 8
    return F.interpolate(coarse, (256, 256), mode="bicubic", align_corners=False)[:, 0].contiguous().to(device)


def postprocess_geometries(gpu, targets=False):
    """(name, input_size, original_size): a square image, and on a GPU a portrait photo's resize."""
    out = [("1024x1024", (1024, 1024), (1024, 1024))]
    if gpu and not targets:
        out.append(("1500x2250", (683, 1024), (1500, 2250)))
    return out


def postprocess_workload(P, geometry, dev):
    """One case: (case name, logits, kwargs, {peer: callable}) - the definition this script times and
    tools/test_microbench.py benchmarks. The baseline is segment_anything's path, in its batches of 192."""
    from sam_fast.ops.mask_postprocess import mask_postprocess

    name, input_size, original = geometry
    logits = _logits(P, dev)
    kw = dict(input_size=input_size, original_size=original)
    ours_backend = "cuda" if dev.type == "cuda" else "cpu"

    def baseline():
        return [mask_postprocess(logits[i:i + CHUNK], backend="reference", **kw) for i in range(0, P, CHUNK)]

    return f"P={P} 256->{name}", logits, kw, {
        BASELINE: baseline,
        f"sam_fast_{ours_backend}": lambda: mask_postprocess(logits, backend=ours_backend, **kw)}


def _postprocess_rows(dev, prov, quick, rows, targets=False):
    from sam_fast.ops.mask_postprocess import mask_postprocess

    gpu = dev.type == "cuda"
    P = 256 if quick else 1024
    for geometry in postprocess_geometries(gpu, targets):
        case, logits, kw, peers = postprocess_workload(P, geometry, dev)
        baseline = peers[BASELINE]
        ours_backend = "cuda" if gpu else "cpu"
        ours = mask_postprocess(logits, backend=ours_backend, **kw)
        ref = baseline()
        ref_area = torch.cat([r.area for r in ref])
        ref_boxes = torch.cat([r.boxes for r in ref])
        ref_counts = torch.cat([r.rle_counts for r in ref])
        same = (torch.equal(ref_area, ours.area) and torch.equal(ref_boxes, ours.boxes)
                and torch.equal(ref_counts, ours.rle_counts))
        mismatched = int((ref_area != ours.area).sum())
        for backend, fn in peers.items():
            m = measure(fn, dev, cpu_reps=3 if backend != BASELINE else 1, rep_ms=500)
            rows.append(dict(prov, op="mask_postprocess", case=case, backend=backend, mode="fwd",
                             metric="masks_per_s", value=P / (m["median_ms"] * 1e-3),
                             max_err=0.0 if backend == BASELINE or same else float(mismatched), **m))
    return rows


def _decoder_rows(dev, prov, quick, rows):
    from sam_fast.models import sam_decoder, tiny_sam
    from sam_fast.nn.decoder import BatchedMaskDecoder

    gpu = dev.type == "cuda"
    sam = (sam_decoder() if gpu else tiny_sam()).to(dev)
    dtype = torch.bfloat16 if gpu else torch.float32
    sam = sam.to(dtype)
    P = (256 if quick else 1024) if gpu else 64
    C = sam.mask_decoder.transformer_dim
    h, w = sam.prompt_encoder.image_embedding_size
    side = sam.image_encoder.img_size
    g = torch.Generator(device=dev).manual_seed(0)
    emb = torch.randn(1, C, h, w, device=dev, generator=g, dtype=dtype)
    coords = torch.rand(P, 1, 2, device=dev, generator=g) * side
    labels = torch.ones(P, 1, dtype=torch.int, device=dev)
    dec = BatchedMaskDecoder.from_sam(sam)
    # segment_anything's prompt encoder fails in bf16 (its positional encoding multiplies float32
    # coordinates by the cast Gaussian matrix): the baseline encodes prompts with a float32 copy.
    prompt32 = copy.deepcopy(sam.prompt_encoder).float()

    def baseline():
        sparse, dense = prompt32(points=(coords, labels), boxes=None, masks=None)
        return sam.mask_decoder(emb, prompt32.get_dense_pe().to(dtype), sparse.to(dtype), dense.to(dtype), True)

    def ours():
        return dec(emb, torch.zeros(P, dtype=torch.int64, device=dev), coords, labels, multimask_output=True)

    with torch.no_grad():
        ref = baseline()[0].float()
        err = (ours()[0].float() - ref).abs().max().item()
        for backend, fn in ((BASELINE, baseline), ("sam_fast", ours)):
            m = measure(fn, dev, cpu_reps=3)
            rows.append(dict(prov, op="decoder", case=f"P={P} C={C} {str(dtype)[6:]}", backend=backend, mode="fwd",
                             metric="prompts_per_s", value=P / (m["median_ms"] * 1e-3),
                             max_err=0.0 if backend == BASELINE else err, **m))
    return rows


def planned_rows(targets=True):
    """The (op, case, backend, mode, on_cpu) rows a targets run writes, without running it: the CPU target,
    1024 masks of a 1024 x 1024 image post-processed on the CPU (whatever machine runs it)."""
    return [dict(op="mask_postprocess", case="P=1024 256->1024x1024", backend=b, mode="fwd", on_cpu=True)
            for b in (BASELINE, "sam_fast_cpu")]


def run(out_dir: str, quick: bool = False, device: str = None, targets: bool = False):
    """``targets``: only what the performance targets read, the CPU post-processing case (on the CPU of
    whatever machine runs it, also a GPU machine)."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() and not targets else "cpu"))
    prov = provenance(dev)
    rows = LiveRows(out_dir, SCRIPT)
    _postprocess_rows(dev, prov, quick, rows, targets)
    if not targets:
        _decoder_rows(dev, prov, quick, rows)
    _, png = save_results(out_dir, SCRIPT, rows, BASELINE,
                          f"SAM decoder side: speedup over segment_anything ({prov['device']})")
    for r in rows:
        r["note"] = f"{r['value']:.0f} {r['metric'].replace('_per_s', '')}/s"
    return rows, png


def main(argv=None):
    return bench_main(__doc__, run, BASELINE, argv)


if __name__ == "__main__":
    sys.exit(main())
