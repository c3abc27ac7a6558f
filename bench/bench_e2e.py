"""Benchmark: whole SAM image encoders, images/s, with the embedding's SQNR beside the speed.

Backends per encoder (same weights, same input batch, one run):

* ``segment_anything``: the original encoder in bf16 (the baseline);
* ``sam_fast_exact``: ``SamFastConfig(attention="exact")`` - fused attention, bf16 linears;
* ``sam_fast_exact_int8``: plus ``quantize="int8"`` calibrated on 8 of scikit-image's photos - W8A8
  linears with LayerNorm-fused quantization and the re-quantizing MLP epilogue;
* with ``--compile`` (ViT encoders): ``sdpa_bias+compile`` - segment-anything-fast's method without its
  int8 / sparsity steps: segment_anything's blocks with the rel-pos bias handed to SDPA as ``attn_mask``,
  bf16, ``torch.compile`` of the whole encoder - and ``sam_fast_exact+compile``, sam_fast's fused
  attention under the same ``torch.compile`` (its ops are opaque custom ops to the compiler);
* TinyViT (MobileSAM / TinySAM, ``vit_t``): ``segment_anything`` is sam_fast's TinyViT module as written
  (the same computation as MobileSAM's code, with SDPA for its biased window attention), ``sam_fast_exact``
  its fast forms (``attention="exact"``: the fused attention kernel, folded BatchNorms, channels-last
  convolutions, fused MLP epilogues) and ``sam_fast_exact_int8`` those with W8A8 linears.

``sqnr_db`` is each output's SQNR against the bf16 segment_anything embedding. On the GPU the encoders
are ViT-B, ViT-H, SlimSAM-50 and SlimSAM-77 shaped (uniform pruning), two that ``sam_fast.compress.prune``
makes from ViT-B (``vit_b_global_50``: ratio 0.5 in global mode, per-block head dims and MLP widths, here
ranked by weight magnitude on random weights; ``slimsam_50_dc2``: SlimSAM-50's widths with the attention of
blocks 0 and 1 removed, as ``drop_attention=2`` might choose) and MobileSAM's TinyViT, with
random weights (no checkpoint can be downloaded here, so the SQNR figures describe random weights, not
a trained SAM), batch 8 (1 with --quick). On a CPU the CPU backends run a small encoder, a small per-block
pruned one and that one with one block's attention removed, or with ``--models`` the released (and the two
pruned) geometries at 1024 px, one image at a time (``--dtypes float32,bfloat16``; int8 calibrated on 2
photos), with ``sdpa_bias`` (the same SDPA-with-mask attention, not compiled) as a further peer. On a CPU,
``quantize="int8"`` keeps linears with fewer than 256 input channels in float (all of SlimSAM-77's, TinyViT's
first stages): the ``calibration:`` note counts them.

    python bench/bench_e2e.py [--out bench/results] [--quick | --targets] [--compile] [--models vit_b,vit_h]
                              [--dtypes float32,bfloat16]
"""

from __future__ import annotations

import sys

from sam_fast.kernels._interpreter import use_interpreter_without_gpu

use_interpreter_without_gpu()

import torch  # noqa: E402

from sam_fast.bench.harness import LiveRows, bench_main, measure, provenance, save_results  # noqa: E402

SCRIPT = "bench_e2e"
BASELINE = "segment_anything"


def _images(n):
    import skimage.data

    names = ["astronaut", "coffee", "chelsea", "rocket", "cat", "retina", "immunohistochemistry", "hubble_deep_field"]
    out = []
    for name in names[:n]:
        im = getattr(skimage.data, name)()
        out.append(im if im.ndim == 3 else im[..., None].repeat(3, -1))
    return out


def _sdpa_bias_forward(self, x):
    """segment_anything's ``Attention.forward`` with the decomposed rel-pos bias given to SDPA as
    ``attn_mask`` (segment-anything-fast's attention step), on (B, H, W, C) input."""
    from sam_fast.bench.bench_dilated_attention_sam import _rel_hw

    B, Hg, Wg, _ = x.shape
    N = Hg * Wg
    q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, -1).unbind(2)  # (B, N, nH, D)
    mask = None
    if self.use_rel_pos:
        rel_h, rel_w = _rel_hw(q, self.rel_pos_h, self.rel_pos_w, (Hg, Wg))
        mask = (rel_h[..., :, None] + rel_w[..., None, :]).reshape(B, self.num_heads, N, N).to(q.dtype)
    out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                           attn_mask=mask, scale=self.scale)
    return self.proj(out.transpose(1, 2).reshape(B, Hg, Wg, -1))


class _SdpaBias:
    """Context: every segment_anything ``Attention`` of ``enc`` runs :func:`_sdpa_bias_forward`."""

    def __init__(self, enc):
        from segment_anything.modeling.image_encoder import Attention

        self.attns = [m for m in enc.modules() if isinstance(m, Attention)]

    def __enter__(self):
        import types

        for a in self.attns:
            a.forward = types.MethodType(_sdpa_bias_forward, a)
        return self

    def __exit__(self, *exc):
        for a in self.attns:
            del a.forward  # back to the class's forward


#: geometries sam_fast.compress.prune makes from ViT-B (module docstring)
PRUNED_MODELS = ("vit_b_global_50", "slimsam_50_dc2")


def _without_attention(geom, blocks):
    """``geom`` with the attention of ``blocks`` removed (DC-ViT's MLP-only blocks)."""
    import dataclasses

    from sam_fast.models import BlockGeometry

    return dataclasses.replace(geom, blocks=tuple(BlockGeometry(0, 0, b.mlp_dim, 0) if i in blocks else b
                                                  for i, b in enumerate(geom.blocks)))


def _pruned_geometry(name):
    from sam_fast.models.vit import slimsam_uniform_geometry

    if name == "slimsam_50_dc2":
        return _without_attention(slimsam_uniform_geometry("slimsam_50"), (0, 1))
    if name == "vit_b_global_50":  # what prune(ratio=0.5, mode="global") plans, on random ViT-B weights
        from sam_fast.compress import plan_widths, prune_to_widths
        from sam_fast.compress.prune import geometry
        from sam_fast.models import build_image_encoder, released_geometry

        torch.manual_seed(0)
        vit_b = build_image_encoder(released_geometry("vit_b"))
        return geometry(prune_to_widths(vit_b, **plan_widths(vit_b, 0.5, "global")))
    raise ValueError(f"unknown pruned geometry {name!r}")


def _encoders(gpu: bool, wanted=()):
    """(name, encoder) pairs, built one at a time; with ``wanted`` only those names are built."""
    from sam_fast.models import BlockGeometry, EncoderGeometry, build_image_encoder, released_geometry

    released = ("vit_h", "vit_b", "slimsam_77", "slimsam_50")
    every = released + PRUNED_MODELS
    if not gpu and wanted and all(w in every + ("vit_t",) for w in wanted):
        # the released and pruned geometries on the CPU (--models): 1024 px, B=1; MobileSAM's TinyViT for vit_t
        geoms = [(name, released_geometry(name) if name in released else _pruned_geometry(name))
                 for name in every if name in wanted]
        tinyvit = {}
    elif not gpu:
        from sam_fast.models import tiny_image_encoder

        yield "tiny-256", tiny_image_encoder(img_size=256, embed_dim=128, num_heads=4, depth=4, window_size=4,
                                             out_chans=64)
        # SlimSAM-style per-block pruned widths (head dims 14 and 32, MLPs of their own)
        pruned = EncoderGeometry(img_size=256, patch_size=16, embed_dim=84, out_chans=64, blocks=(
            BlockGeometry(6, 14, 300, 4), BlockGeometry(4, 14, 240, 0), BlockGeometry(2, 32, 200, 4),
            BlockGeometry(6, 14, 160, 0)))
        geoms = [("tiny-pruned-256", pruned), ("tiny-pruned-dc-256", _without_attention(pruned, (1,)))]
        tinyvit = dict(img_size=256, embed_dims=(32, 64, 80, 160), depths=(1, 2, 2, 1), num_heads=(1, 2, 5, 5),
                       window_sizes=(7, 7, 7, 7))
    else:
        # random weights at the released geometries: SAM ViT-B / ViT-H and SlimSAM's uniform 50% / 77%
        # (head dim 32 / 14; SlimSAM-77's 4096-token global attention at head dim 14 is its hot spot)
        geoms = [(name, released_geometry(name) if name in released else _pruned_geometry(name))
                 for name in every if not wanted or name in wanted]
        tinyvit = {}  # MobileSAM's / TinySAM's TinyViT-5M
    gen = torch.Generator().manual_seed(0)
    for name, geom in geoms:
        if wanted and name not in wanted:
            continue
        enc = build_image_encoder(geom)
        with torch.no_grad():
            for pname, p in enc.named_parameters():
                if "rel_pos" in pname or "pos_embed" in pname:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
        yield name, enc.eval()
    if wanted and ("vit_t" if not tinyvit else "tiny-tinyvit-256") not in wanted:
        return
    from sam_fast.models import TinyViT

    enc = TinyViT(**tinyvit)
    with torch.no_grad():
        for pname, p in enc.named_parameters():
            if "attention_biases" in pname:
                p.copy_(torch.randn(p.shape, generator=gen))
    yield ("vit_t" if not tinyvit else "tiny-tinyvit-256"), enc.eval()


def _interleaved_cpu_rows(enc, x, configs, cal, prov, name, batch, dtype, rounds):
    """The CPU's 1024 px rows: every config on its own copy of ``enc``, timed one call each per round (after a
    first call that also gives the SQNR), medians of the rounds."""
    import copy

    import sam_fast
    from sam_fast.bench.bench_cpu_blocks import _stats, interleaved
    from sam_fast.quantize import sqnr_db

    fns, outs = {}, {}
    with torch.no_grad():
        for backend, cfg in configs:
            model = copy.deepcopy(enc)
            if cfg == "sdpa":
                _SdpaBias(model).__enter__()  # the copy is dropped afterwards, never restored
            elif cfg is not None:
                sam_fast.apply(model, cfg)
            if backend.endswith("+compile"):
                torch._dynamo.reset()
                model = torch.compile(model)
            outs[backend] = model(x).float()  # the first call compiles
            fns[backend] = lambda model=model: model(x)
        times = interleaved(fns, rounds)
    ref = outs[BASELINE]
    rows = []
    for backend, _ in configs:
        m = _stats(times[backend])
        note = (f"calibration: embedding SQNR {cal.embedding_sqnr_db:.1f} dB, {len(cal.left_float)} float"
                if "int8" in backend else "")
        rows.append(dict(prov, op="image_encoder", case=f"{name} B={batch} {str(dtype)[6:]}", backend=backend,
                         mode="fwd", metric="img_per_s", value=batch / (m["median_ms"] * 1e-3),
                         sqnr_db=sqnr_db(ref, outs[backend]), note=note + f" ({rounds} interleaved rounds)", **m))
    return rows


# What the performance targets read (tools/targets.py): ViT-H at batch 8, W8A8 + fused attention against
# fused attention alone (segment_anything's encoder beside them for the SQNR reference).
# The targets run also times the pruned geometries (no target reads them yet: their GPU figures for the record).
TARGET_MODELS = ("vit_h",)
TARGET_BACKENDS = (BASELINE, "sam_fast_exact", "sam_fast_exact_int8")


def planned_rows(targets=True):
    """The (op, case, backend, mode) rows a GPU run of the ViT encoders writes, without running it."""
    models = (TARGET_MODELS if targets else ("vit_h", "vit_b", "slimsam_77", "slimsam_50")) + PRUNED_MODELS
    return [dict(op="image_encoder", case=f"{name} B=8 bfloat16", backend=backend, mode="fwd")
            for name in models for backend in TARGET_BACKENDS]


def run(out_dir: str, quick: bool = False, device: str = None, compile: bool = False, models: str = "",
        targets: bool = False, dtypes: str = ""):
    import sam_fast
    from sam_fast import SamFastConfig
    from sam_fast.quantize import calibrate, sqnr_db

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = dev.type == "cuda"
    prov = provenance(dev)
    names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    wanted_dtypes = [d.strip() for d in dtypes.split(",") if d.strip()]
    for d in wanted_dtypes:
        if d not in names:
            raise ValueError(f"--dtypes: {d!r} is not one of {sorted(names)}")
    dtype_list = [names[d] for d in wanted_dtypes] or [torch.bfloat16 if gpu else torch.float32]
    wanted = [m.strip() for m in models.split(",") if m.strip()] or (list(TARGET_MODELS + PRUNED_MODELS) if targets
                                                                      else [])
    full_cpu = not gpu and bool(wanted)  # released geometries on the CPU: one 1024 px image at a time
    batch = (1 if quick else 8) if gpu else (1 if full_cpu else 2)
    rows = LiveRows(out_dir, SCRIPT, ["sqnr_db"])
    images = _images(8)
    for (name, enc), dtype in ((e, d) for e in _encoders(gpu, wanted) for d in dtype_list):
        enc = enc.to(device=dev, dtype=dtype)
        x = torch.randn(batch, 3, enc.img_size, enc.img_size, device=dev, generator=torch.Generator(device=dev)
                        .manual_seed(0)).to(dtype)
        # (2 images at 1024 px on a CPU, 1 with --quick: calibration runs the float encoder three times per image)
        cal = calibrate(enc, images, num_images=(1 if quick else 2) if full_cpu else 8)
        if hasattr(enc, "blocks"):
            configs = [(BASELINE, None), ("sam_fast_exact", SamFastConfig(attention="exact")),
                       ("sam_fast_exact_int8", SamFastConfig(attention="exact", quantize="int8", calibration=cal))]
            if not gpu:  # on the CPU the plain peer runs too (the GPU one is pinned to the memory-efficient kernel)
                configs.insert(1, ("sdpa_bias", "sdpa"))
            if compile:
                configs += [("sdpa_bias+compile", "sdpa"), ("sam_fast_exact+compile", SamFastConfig(attention="exact"))]
        else:  # TinyViT: its fast forms (sam_fast.nn.tinyvit), then with W8A8 linears
            configs = [(BASELINE, None), ("sam_fast_exact", SamFastConfig(attention="exact")),
                       ("sam_fast_exact_int8", SamFastConfig(attention="exact", quantize="int8", calibration=cal))]
        if full_cpu:  # seconds per call on a shared 2-core machine: the peers interleaved, round by round
            rows += _interleaved_cpu_rows(enc, x, configs, cal, prov, name, batch, dtype, rounds=1 if quick else 3)
            continue
        ref = None
        for backend, cfg in configs:
            if cfg == "sdpa":
                handle = _SdpaBias(enc)
                handle.__enter__()
            else:
                handle = sam_fast.apply(enc, cfg) if cfg is not None else None
            fn = enc
            if backend.endswith("+compile"):
                torch._dynamo.reset()
                fn = torch.compile(enc)
            with torch.no_grad():
                out = fn(x).float()  # the first call compiles
                ref = out if ref is None else ref
                m = measure(lambda: fn(x), dev, cpu_reps=1 if full_cpu and quick else 3, rep_ms=300)
            if isinstance(handle, _SdpaBias):
                handle.__exit__(None, None, None)
            elif handle is not None:
                handle.undo()
            note = (f"calibration: embedding SQNR {cal.embedding_sqnr_db:.1f} dB, {len(cal.left_float)} float"
                    if "int8" in backend else "")
            rows.append(dict(prov, op="image_encoder", case=f"{name} B={batch} {str(dtype)[6:]}", backend=backend,
                             mode="fwd", metric="img_per_s", value=batch / (m["median_ms"] * 1e-3),
                             sqnr_db=sqnr_db(ref, out), note=note, **m))
    _, png = save_results(out_dir, SCRIPT, rows, BASELINE,
                          f"SAM image encoder img/s vs segment_anything ({prov['device']})", ["sqnr_db"])
    for r in rows:
        r["note"] = f"{r['value']:.2f} img/s, SQNR {r['sqnr_db']:.1f} dB" + (f"; {r['note']}" if r.get("note") else "")
    return rows, png


def main(argv=None):
    return bench_main(__doc__, run, BASELINE, argv, options=[
        ("--compile", "store_true", "also time torch.compile'd encoders (segment-anything-fast's SDPA + compile, "
                                    "and sam_fast's)"),
        ("--models", "store", "comma-separated subset of the encoders, e.g. vit_b,vit_h (on a CPU: these at 1024 px)"),
        ("--dtypes", "store", "comma-separated dtypes, e.g. float32,bfloat16 (default: bfloat16 on a GPU, float32 "
                              "on a CPU)")])


if __name__ == "__main__":
    sys.exit(main())
