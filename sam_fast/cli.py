"""The ``sam-fast`` command.

    sam-fast bench [--ops attention,dilated,relpos,int8,e2e,decoder,everything,distill,prune,export] [--out DIR]
                   [--full]
    sam-fast segment IMAGE... --checkpoint PATH --model-type vit_b|vit_l|vit_h|slimsam_50|slimsam_77|vit_t|auto|tiny
                     [--points x,y[,label] ...] [--box x0,y0,x1,y1] [--everything [--hierarchical]]
                     [--points-per-side N] [--device cpu|cuda] --out DIR [--overwrite]
    sam-fast inspect CHECKPOINT [--model-type auto] [--decoder-heads N]
    sam-fast distill --teacher CKPT --student dilated|CKPT [--pattern 64x64:2x2] [--blocks global|all|i,j,...]
                     --images DIR --out DIR [--method dld|embedding|full_stage] [--steps N] [--decoder-steps N]
                     [--batch-size N] [--lr LR] [--no-resume] ...
    sam-fast distill-eval --teacher CKPT --student CKPT --images DIR [--prompts points,boxes] [--out DIR]
    sam-fast prune --checkpoint CKPT --images DIR --out DIR [--ratio R [--mode uniform|global] | --widths W]
                   [--drop-attention K] [--importance disturbed_taylor|magnitude] [--eval-images N|DIR] [--resume]
    sam-fast export --checkpoint CKPT --out FILE [--format onnx|aoti] [--parts encoder|decoder|both]
                    [--attention exact|none | --pattern P [--blocks B]] [--int8 [--calibration DIR]]
                    [--batch N|dynamic] [--image-size S] [--overwrite] [--no-check]
    sam-fast segment-dataset SRC --out DST --checkpoint CKPT [--shard RANK/WORLD | --ray-address ADDR]
                     [--num-gpus N | --num-workers N] [--shard-size 64] [--boxes PROMPTS.json] ...

``bench`` runs the op benchmarks this machine can run against their references and peers (their quick
cases, about a minute on a 2-core CPU; ``--full`` for every case), appends results with provenance to
``DIR/<script>.csv``, draws ``DIR/<script>.png``, writes every table (op, case, backend, median time,
speedup over the bench's baseline, max error) to ``DIR/bench_tables.txt`` and ends with a one-screen
summary. On a CPU-only machine CPU backends
are timed and the Triton kernels are checked for correctness under the interpreter (not timed).

``segment`` writes, per image, ``DIR/<name>.json`` (COCO-style annotations with compressed RLE, area,
bbox, predicted IoU, stability score) and ``DIR/<name>.png`` (the masks over the image), with a
progress bar over images. Before any work it checks that no output would overwrite an input and that
no output exists yet (``--overwrite`` replaces them); inputs sharing a name get distinct outputs
(``photo_png``, ``photo_jpg``; then ``_2``, ``_3``); each file is written whole or not at all. Prompts
(``--points`` / ``--box``) are in the image's pixel coordinates;
``--everything`` runs :class:`sam_fast.SamFastAutomaticMaskGenerator` (``--hierarchical``: TinySAM's
two-round mode).

``inspect`` loads a checkpoint (by default reading its geometry from the file) and prints its parameter
counts, model family (SAM ViT-B/L/H, SlimSAM uniform or per-block pruned, DC-ViT-compressed, TinyViT),
the per-block geometry (attention kind, heads, head dim, MLP width), the dilated pattern a distilled
student was trained for, and what ``sam_fast.apply`` would swap into it.

``distill`` trains a student to reproduce a teacher on a folder of images (:func:`sam_fast.distill.distill`):
``--student dilated`` is the teacher with ``--pattern`` in ``--blocks``; a checkpoint path is any other
student. It writes ``OUT/student.pt`` (which ``segment``, ``inspect`` and ``load_sam`` read, pattern
included), ``OUT/train_log.csv`` and checkpoints; rerunning the same command resumes. Under
``torchrun --nproc_per_node N sam-fast distill ...`` it trains on N processes (DistributedDataParallel).
``distill-eval`` prints the student's mask mIoU against the teacher, embedding SQNR and encoder speed
(:func:`sam_fast.distill.evaluate`) and writes ``OUT/eval.json`` and ``OUT/eval.png``.

``prune`` compresses a checkpoint's image encoder in stages (:func:`sam_fast.compress.prune`): the attention of
``--drop-attention`` blocks, the embedding width, then head dims and MLP widths (``--ratio`` or ``--widths``), each
recovered by distillation and written to ``OUT/<stage>/pruned.pth``; it prints the report (parameters, MACs, SQNR
and point / box mIoU against the original before and after each recovery, wall time). ``--resume`` continues an
interrupted run in ``OUT``.

``export`` writes a checkpoint's image encoder (and / or its prompt encoder + mask decoder) as an ONNX file or an
AOTInductor package (:func:`sam_fast.export`), with the kernels ``--attention`` / ``--pattern`` / ``--int8`` choose
swapped in first (a distilled student's own pattern by default; ``--calibration DIR``: static int8 scales calibrated
on those images). It refuses an existing output without ``--overwrite`` and prints the file's size, its operators
and, unless ``--no-check``, its difference from PyTorch on a photo.

``segment-dataset`` segments every image of a folder (recursively) into per-shard COCO JSON files in ``DST``
(:mod:`sam_fast.segment_dataset`): with ``--shard RANK/WORLD`` this process takes its exact part of the shards (for
torchrun / SLURM ranks); otherwise Ray Data runs the shards on an actor pool (``--num-gpus N``: N actors of one
GPU each; ``--ray-address``: an existing cluster). Reruns skip finished shards; a folder holding shards of another
run (other images, boxes, settings or shard size) is refused with what changed (``--overwrite`` redoes those
shards); unreadable images become error entries. ``--boxes FILE``: a JSON ``{image: [[x0, y0, x1, y1], ...]}``
(e.g. a detector's; keys are paths, absolute or relative to SRC or the working directory, or file names one image
has; a key naming no image is refused, an image without a key is an error entry), one mask per box.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

from ._files import write_atomic, write_json_atomic

BENCHES = {"attention": "bench_dilated_attention_sam", "dilated": "bench_dilated_attention",
           "relpos": "bench_resize_rel_pos",
           "int8": "bench_int8_linear", "e2e": "bench_e2e", "decoder": "bench_decoder",
           "everything": "bench_everything", "distill": "bench_distill", "prune": "bench_prune",
           "export": "bench_export", "runtimes": "bench_cpu_runtimes"}


def _interpreter_for_bench(argv) -> None:
    """``bench`` on a machine without a GPU checks the Triton kernels under the interpreter, which must be
    chosen before anything imports a kernel module (the parser's imports included): done first of all."""
    if argv[:1] == ["bench"]:
        from .kernels._interpreter import use_interpreter_without_gpu

        use_interpreter_without_gpu()


#: benchmarks that need an optional extra: op -> (modules, the extra)
BENCH_EXTRAS = {"export": (("onnx", "onnxscript", "onnxruntime", "openvino"), "export"),
                "runtimes": (("onnx", "onnxscript", "onnxruntime", "openvino"), "runtimes")}


def _missing_extras(ops) -> dict:
    """{op: what to install} for the chosen benchmarks whose optional extra is not installed."""
    import importlib.util

    out = {}
    for op in ops:
        modules, extra = BENCH_EXTRAS.get(op, ((), None))
        absent = [m for m in modules if importlib.util.find_spec(m) is None]
        if absent:
            out[op] = f"{', '.join(absent)}: pip install 'sam_fast[{extra}]'"
    return out


def _bench(args) -> int:
    import time

    import torch

    gpu = torch.cuda.is_available()
    import importlib

    from tqdm import tqdm

    from sam_fast.bench.harness import table

    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    unknown = [o for o in ops if o not in BENCHES]
    if unknown:
        print(f"sam-fast bench: unknown op(s) {unknown}; choose from {sorted(BENCHES)}", file=sys.stderr)
        return 2
    missing = _missing_extras(ops)
    if missing:
        named = [o for o in missing if o in args.ops_given]
        if named:
            print(f"sam-fast bench: --ops {','.join(named)} needs {'; '.join(missing[o] for o in named)}",
                  file=sys.stderr)
            return 2
        for o in missing:  # the default list: a benchmark of an optional extra is left out, and said so
            print(f"sam-fast bench: leaving out {o} ({missing[o]})")
        ops = [o for o in ops if o not in missing]
    quick = not args.full
    if not gpu:
        print("No CUDA GPU: timing the CPU backends on small shapes; the Triton kernels are\n"
              "checked under the interpreter, not timed.\n")
    t0 = time.perf_counter()
    tables, plots, results = [], [], []
    for op in tqdm(ops, desc="benchmarks", unit="op", disable=not sys.stderr.isatty()):
        mod = importlib.import_module(f"sam_fast.bench.{BENCHES[op]}")
        rows, png = mod.run(args.out, quick=quick)
        tables.append(f"{op}: speedup over {mod.BASELINE}\n" + table(rows, mod.BASELINE))
        results.append((op, mod.BASELINE, rows))
        if png:
            plots.append(png)
    os.makedirs(args.out, exist_ok=True)
    tables_path = os.path.join(args.out, "bench_tables.txt")
    with open(tables_path, "w") as f:
        f.write("\n\n".join(tables) + "\n")
    print(bench_summary(results, time.perf_counter() - t0, os.path.abspath(args.out), tables_path, plots, quick))
    return 0


def bench_summary(results, seconds: float, out_dir: str, tables_path: str, plots, quick: bool) -> str:
    """One screen, 80 columns: per op, sam_fast's speedup over the script's baseline (median and range over
    the cases, best sam_fast backend per case), the kernels checked but not timed, where the files are."""
    import statistics

    lines = [f"sam-fast bench: {len(results)} benchmark(s) in {seconds:.0f} s", "",
             f"{'op':<12}{'sam_fast vs':<24}{'speedup, median':>16}{'range':>16}{'cases':>7}"]
    checked, worst_err = 0, 0.0
    for op, baseline, rows in results:
        base = {(r["op"], r["case"], r["mode"]): float(r["median_ms"]) for r in rows
                if r.get("backend") == baseline and _timed(r)}
        best = {}
        for r in rows:
            key = (r["op"], r["case"], r["mode"])
            if str(r.get("backend", "")).startswith("sam_fast") and _timed(r) and key in base:
                best[key] = max(best.get(key, 0.0), base[key] / float(r["median_ms"]))
            elif (str(r.get("backend", "")).startswith("sam_fast") and not _timed(r)
                  and r.get("max_err") not in ("", None)):
                checked += 1
                worst_err = max(worst_err, float(r["max_err"]))
        if best:
            v = sorted(best.values())
            lines.append(f"{op:<12}{baseline[:23]:<24}{statistics.median(v):>15.2f}x"
                         f"{f'{v[0]:.2f}-{v[-1]:.2f}x':>16}{len(v):>7}")
        else:
            lines.append(f"{op:<12}{baseline[:23]:<24}{'-':>16}{'':>16}{0:>7}")
    if checked:
        lines += ["", f"{checked} kernel check(s) under the Triton interpreter (correctness, not timed):",
                  f"  largest error against the reference {worst_err:.1e}"]
    lines += ["", "CSVs (appended, with provenance), PNG plots and every table are in", f"  {out_dir}",
              f"  ({len(plots)} plot(s); the tables: {os.path.basename(tables_path)})"]
    if quick:
        lines.append("every case: sam-fast bench --full")
    return "\n".join(lines)


def _timed(row) -> bool:
    med = row.get("median_ms")
    try:
        return med not in ("", None) and math.isfinite(float(med)) and float(med) > 0
    except (TypeError, ValueError):
        return False


def _numbers(text: str, count, what: str) -> list:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise SystemExit(f"sam-fast segment: {what} must be comma-separated numbers, got {text!r}")
    if len(values) not in count:
        raise SystemExit(f"sam-fast segment: {what} needs {' or '.join(map(str, count))} numbers, got {text!r}")
    if not all(math.isfinite(v) for v in values):
        raise SystemExit(f"sam-fast segment: {what} must be finite numbers, got {text!r}")
    return values


def _point(text: str) -> list:
    """x,y[,label]: label 1 (foreground, the default) or 0 (background)."""
    values = _numbers(text, (2, 3), "--points")
    if len(values) == 3:
        if values[2] not in (0.0, 1.0):
            raise SystemExit(f"sam-fast segment: a --points label must be 1 (foreground) or 0 (background), "
                             f"got {text!r}")
        values[2] = int(values[2])
    return values


def _overlay(image, masks):
    import numpy as np

    out = image.astype(np.float32)
    rng = np.random.default_rng(0)
    for m in sorted(masks, key=lambda m: -int(m.sum())):  # small masks drawn last, on top
        color = rng.integers(40, 255, size=3)
        out[m] = 0.45 * out[m] + 0.55 * color
    return out.clip(0, 255).astype(np.uint8)


def _output_names(images) -> list:
    """One output stem per input, distinct: the file's stem, its extension added when two inputs share a
    stem (photo.png, photo.jpg -> photo_png, photo_jpg), then a number (a/photo.png, b/photo.png)."""
    stems = [os.path.splitext(os.path.basename(p)) for p in images]
    count = {}
    for stem, _ in stems:
        count[stem] = count.get(stem, 0) + 1
    names = [stem if count[stem] == 1 else f"{stem}_{ext.lstrip('.') or 'noext'}" for stem, ext in stems]
    seen, out = {}, []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
    return out


def _plan_outputs(images, out_dir: str, overwrite: bool):
    """[(image, json path, overlay path)] checked before any work: no output may be an input, and existing
    outputs are replaced only with --overwrite. SystemExit naming the files otherwise."""
    plan = [(img, os.path.join(out_dir, f"{n}.json"), os.path.join(out_dir, f"{n}.png"))
            for img, n in zip(images, _output_names(images))]
    inputs = {os.path.realpath(p): p for p in images}
    for img, *outs in plan:
        for o in outs:
            if os.path.realpath(o) in inputs:
                raise SystemExit(f"sam-fast segment: the output {o} would overwrite the input "
                                 f"{inputs[os.path.realpath(o)]}; choose another --out")
    existing = [o for _, *outs in plan for o in outs if os.path.exists(o)]
    if existing and not overwrite:
        more = f" and {len(existing) - 3} more" if len(existing) > 3 else ""
        raise SystemExit(f"sam-fast segment: {', '.join(existing[:3])}{more} already exist; pass --overwrite to "
                         "replace them, or choose another --out")
    return plan


def _segment(args) -> int:

    import numpy as np
    import torch
    from PIL import Image
    from tqdm import tqdm

    from sam_fast.checkpoint import is_sam2_model, load_sam
    from sam_fast.images import read_rgb
    from sam_fast.predictor import check_image_size

    prompts = bool(args.points or args.box)
    if args.everything == prompts:
        print("sam-fast segment: give --points and/or --box, or --everything (not both)", file=sys.stderr)
        return 2
    if args.hierarchical and not args.everything:
        print("sam-fast segment: --hierarchical needs --everything", file=sys.stderr)
        return 2
    if args.points_per_side < 1:
        print(f"sam-fast segment: --points-per-side must be at least 1, got {args.points_per_side}", file=sys.stderr)
        return 2
    for path in args.images:
        if os.path.isdir(path):
            print(f"sam-fast segment: image {path} is a directory; give image files", file=sys.stderr)
            return 2
        if not os.path.isfile(path):
            print(f"sam-fast segment: image {path} does not exist", file=sys.stderr)
            return 2
    try:
        points = [_point(p) for p in args.points or []]
        box = _numbers(args.box, (4,), "--box") if args.box else None
    except SystemExit as exc:
        print(exc, file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("sam-fast segment: --device cuda, but this machine has no CUDA GPU that torch can use "
              f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); use --device cpu",
              file=sys.stderr)
        return 2
    try:
        os.makedirs(args.out, exist_ok=True)
        if not os.access(args.out, os.W_OK | os.X_OK):
            raise PermissionError(f"cannot write to {args.out}")
        plan = _plan_outputs(args.images, args.out, args.overwrite)
    except SystemExit as exc:
        print(exc, file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"sam-fast segment: --out {args.out}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    try:
        sam = load_sam(args.checkpoint, args.model_type, decoder_heads=args.decoder_heads)
    except Exception as exc:  # every load failure is a message, never a traceback
        print(f"sam-fast segment: {_load_error(exc)}", file=sys.stderr)
        return 2
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    sam.to(device)
    sam2 = is_sam2_model(sam)
    if getattr(sam, "sam_fast_config", None) is not None:
        print(f"{args.checkpoint}: a distilled student; running the dilated attention it was trained for in blocks "
              f"{list(sam.sam_fast_config.chosen_blocks())}")
    from sam_fast.ops.mask_postprocess import coco_to_mask

    if args.everything:
        from sam_fast import SamFastAutomaticMaskGenerator

        engine = SamFastAutomaticMaskGenerator(sam, points_per_side=args.points_per_side, output_mode="coco_rle",
                                               hierarchical=args.hierarchical)
    else:
        from sam_fast import SamFastPredictor

        engine = SamFastPredictor(sam)
    written, failed = 0, []
    for path, json_path, png_path in tqdm(plan, desc="sam-fast segment", unit="image"):
        try:
            image = read_rgb(path)
        except Exception as exc:
            failed.append(path)
            print(f"sam-fast segment: cannot read image {path} ({type(exc).__name__}: {exc})", file=sys.stderr)
            continue
        H, W = image.shape[:2]
        try:  # SAM resizes the long side to its input size: a thin image can vanish (SAM 2: to a square)
            check_image_size((H, W), None if sam2 else sam.image_encoder.img_size)
        except ValueError as exc:
            failed.append(path)
            print(f"sam-fast segment: cannot segment {path}: {exc}", file=sys.stderr)
            continue
        if args.everything:
            records = engine.generate(image)
        else:
            engine.set_image_batch([image]) if sam2 else engine.set_images([image])
            prompt = {}
            if points:
                prompt["point_coords"] = np.array([[p[:2] for p in points]], dtype=np.float64)
                prompt["point_labels"] = np.array([[p[2] if len(p) == 3 else 1 for p in points]])
            if box is not None:
                prompt["boxes"] = np.array([box], dtype=np.float64)
            records = engine.coco_records([prompt], multimask_output=len(points) == 1 and box is None)[0]
        masks = [coco_to_mask(r["segmentation"]) for r in records]
        annotations = [dict(r, id=i + 1, image_id=1) for i, r in enumerate(records)]
        coco = {"images": [{"id": 1, "file_name": os.path.basename(path), "height": H, "width": W}],
                "annotations": annotations}

        try:
            write_json_atomic(json_path, coco)
            write_atomic(png_path, lambda tmp, o=_overlay(image, masks): Image.fromarray(o).save(tmp, format="PNG"))
        except OSError as exc:
            print(f"sam-fast segment: cannot write {json_path} ({exc.strerror or exc})", file=sys.stderr)
            return 2
        written += 1
    renamed = [(p, os.path.basename(j)) for p, j, _ in plan
               if os.path.splitext(os.path.basename(p))[0] != os.path.splitext(os.path.basename(j))[0]]
    for src, name in renamed:
        print(f"{src} -> {name} (another input has the same name)")
    print(f"wrote {written} of {len(plan)} image(s) to {os.path.abspath(args.out)}"
          + (f"; {len(failed)} failed: {', '.join(failed[:3])}{' ...' if len(failed) > 3 else ''}" if failed else ""))
    return 0 if not failed else 1


def _load_error(exc: BaseException) -> str:
    """One line for a failed load_sam: its own messages as they are, anything else with its type."""
    if isinstance(exc, (ValueError, OSError)) and str(exc):
        text = str(exc)
    else:
        text = f"loading the checkpoint failed ({type(exc).__name__}: {exc})"
    return text


def _inspect(args) -> int:
    from sam_fast.checkpoint import load_sam
    from sam_fast.models.sam import known_model_type
    from sam_fast.models.tinyvit import TinyViT
    from sam_fast.models.vit import encoder_geometry
    from sam_fast.nn.tinyvit import tinyvit_fast_modules
    from sam_fast.surgery import eligible_linears, too_narrow, vit_blocks

    try:
        sam = load_sam(args.checkpoint, args.model_type, decoder_heads=args.decoder_heads)
    except Exception as exc:  # every load failure is a message, never a traceback
        print(f"sam-fast inspect: {_load_error(exc)}", file=sys.stderr)
        return 2
    from sam_fast.checkpoint import is_sam2_model

    if is_sam2_model(sam):
        return _inspect_sam2(args.checkpoint, sam)
    enc = sam.image_encoder

    def millions(module):
        return sum(p.numel() for p in module.parameters()) / 1e6

    print(f"checkpoint {args.checkpoint}: {millions(sam):.2f} M parameters (image encoder {millions(enc):.2f} M, "
          f"prompt encoder + mask decoder {millions(sam.prompt_encoder) + millions(sam.mask_decoder):.2f} M)")
    if isinstance(enc, TinyViT):
        print(f"family: TinyViT (vit_t: MobileSAM / TinySAM), input {enc.img_size} x {enc.img_size}")
        print(f"{'stage':>5} {'blocks':>6} {'width':>6} {'heads':>5} {'window':>6}")
        for n, layer in enumerate(enc.layers):
            blk = layer.blocks[0]
            if n == 0:
                print(f"{n:>5} {len(layer.blocks):>6} {blk.conv1.c.in_channels:>6} {'MBConv':>12}")
            else:
                print(f"{n:>5} {len(layer.blocks):>6} {blk.attn.qkv.in_features:>6} {blk.attn.num_heads:>5} "
                      f"{blk.window_size:>6}")
    else:
        geom = encoder_geometry(sam.state_dict())
        known = known_model_type(geom)
        family = known or ("DC-ViT-compressed SAM ViT (blocks without attention)"
                           if any(not b.has_attention for b in geom.blocks) else
                           "per-block pruned SAM ViT (SlimSAM-style)" if not geom.uniform
                           else "SAM ViT (custom widths)")
        from sam_fast.compress import encoder_macs

        print(f"family: {family}, input {geom.img_size} x {geom.img_size}, patch {geom.patch_size}, "
              f"embed {geom.embed_dim}, {len(geom.blocks)} blocks, {encoder_macs(sam) / 1e9:.4g} GMACs per image")
        print(f"{'block':>5} {'attention':>16} {'heads':>5} {'head dim':>8} {'MLP':>6}")
        for n, b in enumerate(geom.blocks):
            kind = ("none (DC-ViT)" if not b.has_attention else
                    "global" if b.window_size == 0 else f"window {b.window_size}")
            print(f"{n:>5} {kind:>16} {b.num_heads:>5} {b.head_dim:>8} {b.mlp_dim:>6}")
    recorded = getattr(sam, "sam_fast_config", None)
    if recorded is not None:
        print("distilled student: trained for dilated attention (load_sam applies it):")
        for index, pattern in sorted(recorded.dilated.pattern.items()):
            print(f"  block {index}: " + ", ".join(f"segment {b.segment} dilation {b.dilation}" for b in pattern))
    blocks = vit_blocks(sam)
    slots = eligible_linears(sam)
    narrow = [s.key for s in slots if too_narrow(s.module)]
    if blocks:
        dims = sorted({blk.attn.qkv.out_features // 3 // blk.attn.num_heads for *_, blk, _ in blocks})
        print(f'sam_fast: attention="exact" / "dilated" fuse the attention of {len(blocks)} blocks (head dims {dims})')
    elif tinyvit_fast_modules(sam):
        print('sam_fast: TinyViT encoder: attention="exact" swaps in its fast forms (fused window attention with its '
              'bias, BatchNorms folded into the convolutions, fused MLP epilogues); no dilated patterns')
    else:
        print('sam_fast: no SAM ViT attention blocks; use attention="none" (the encoder keeps its own attention)')
    print(f'sam_fast: quantize="int8" swaps {len(slots) - len(narrow)} of {len(slots)} linears for W8A8'
          + (f"; {len(narrow)} stay float as too narrow" if narrow else "")
          + "; calibrate(...) may keep outlier-heavy ones float too")
    return 0


def _inspect_sam2(checkpoint: str, sam) -> int:
    """``sam-fast inspect`` of a SAM 2 checkpoint: its model, parts, Hiera stages and what sam_fast does with it."""
    from sam_fast.models.sam2 import sam2_model_type
    from sam_fast.nn.hiera import hiera_blocks

    def millions(module):
        return sum(p.numel() for p in module.parameters()) / 1e6

    trunk = sam.image_encoder.trunk
    decoder = millions(sam.sam_prompt_encoder) + millions(sam.sam_mask_decoder)
    print(f"checkpoint {checkpoint}: {millions(sam):.2f} M parameters (image encoder {millions(sam.image_encoder):.2f} "
          f"M, prompt encoder + mask decoder {decoder:.2f} M, memory and video parts "
          f"{millions(sam) - millions(sam.image_encoder) - decoder:.2f} M)")
    print(f"family: SAM 2 ({sam2_model_type(sam.state_dict())}), Hiera image encoder, input {sam.image_size} x "
          f"{sam.image_size}")
    if getattr(sam, "sam_fast_image_only", False):
        print("source: a transformers Sam2Model directory (the image model): the memory and video parts are not in "
              "it and keep their initialisation; for images only (predictor, segment everything)")
    print(f"{'stage':>5} {'blocks':>6} {'width':>6} {'heads':>5} {'head dim':>8} {'window':>6} {'global blocks':>14}")
    start = 0
    for n, end in enumerate(trunk.stage_ends):
        blocks = trunk.blocks[start:end + 1]
        last = blocks[-1]
        globals_ = [i for i in range(start, end + 1) if trunk.blocks[i].window_size == 0]
        print(f"{n:>5} {len(blocks):>6} {last.dim_out:>6} {last.attn.num_heads:>5} "
              f"{last.dim_out // last.attn.num_heads:>8} {last.window_size:>6} {str(globals_ or '-'):>14}")
        start = end + 1
    print(f'sam_fast: attention="exact" swaps {len(hiera_blocks(sam))} Hiera blocks for their fast form (C++ attention '
          'pooling queries in place, fused linear epilogues; CPU); no dilated patterns or int8 for Hiera yet')
    return 0


def _parse_blocks(text: str):
    if text in ("global", "all"):
        return text
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items or not all(t.isascii() and t.isdigit() for t in items):
        raise ValueError(f"--blocks must be 'global', 'all' or block indices (from 0) like 2,5,8,11, got {text!r}")
    return [int(t) for t in items]


def _load_for(path: str, args):
    from sam_fast.checkpoint import load_sam, refuse_sam2

    return refuse_sam2(load_sam(path, args.model_type, decoder_heads=args.decoder_heads), f"sam-fast {args.command}")


def _checkpoint_for(command: str, args):
    """``--checkpoint`` loaded for ``sam-fast command``, or None after saying why on stderr (never a traceback)."""
    try:
        return _load_for(args.checkpoint, args)
    except Exception as exc:
        print(f"sam-fast {command}: --checkpoint: {_load_error(exc)}", file=sys.stderr)
        return None


def _parse_widths(text: str) -> dict:
    """``embed=384,head_dim=32,mlp=1536`` -> the widths dict of ``sam_fast.compress.prune``."""
    out = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in ("embed", "head_dim", "mlp") or key in out:
            raise ValueError(f"--widths must be embed=N,head_dim=N,mlp=N (any of them, once each), got {text!r}")
        if not (value.strip().isascii() and value.strip().isdigit()):
            raise ValueError(f"--widths: {key} must be a positive integer, got {value!r}")
        out[key] = int(value)
    return out


def _eval_images(text: str):
    """``--eval-images``: a count of the training images, or a folder of held-out ones."""
    return int(text) if text.isascii() and text.isdigit() else text


def _prune(args) -> int:
    import warnings

    from sam_fast.compress import prune
    from sam_fast.distill import DistillConfig

    try:
        if args.ratio is not None and args.widths is not None:
            raise ValueError("give --ratio or --widths, not both")
        if args.ratio is None and args.widths is None and not args.drop_attention:
            raise ValueError("nothing to compress: give --ratio, --widths or --drop-attention")
        widths = None if args.widths is None else _parse_widths(args.widths)
        recover = DistillConfig(method=args.method, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                seed=args.seed)
    except (ValueError, TypeError) as exc:  # the arguments: no checkpoint is involved
        print(f"sam-fast prune: {exc}", file=sys.stderr)
        return 2
    model = _checkpoint_for("prune", args)
    if model is None:
        return 2
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        try:
            result = prune(model, args.images, out_dir=args.out, ratio=args.ratio, widths=widths, mode=args.mode,
                           importance=args.importance, drop_attention=args.drop_attention,
                           num_images=args.num_images, draws=args.draws, recover=recover,
                           eval_images=_eval_images(args.eval_images), resume=args.resume, device=args.device,
                           progress=not args.no_progress)
        except (ValueError, TypeError, OSError) as exc:
            print(f"sam-fast prune: {exc}", file=sys.stderr)
            return 2
    print(result.summary())
    print(f"pruned model: {result.stages[-1]['checkpoint']} (sam_fast.load_sam reads it; sam-fast inspect shows it)")
    return 0


def _export(args) -> int:
    import warnings

    from sam_fast import Dilated, Int8, SamFastConfig, apply
    from sam_fast.exporting import export
    from sam_fast.images import list_images, read_rgb
    from sam_fast.pattern import parse_pattern
    from sam_fast.surgery import vit_blocks

    try:
        batch = args.batch if args.batch == "dynamic" else int(args.batch)
    except ValueError:
        print(f"sam-fast export: --batch must be a number or 'dynamic', got {args.batch!r}", file=sys.stderr)
        return 2
    try:
        if args.calibration is not None and not args.int8:
            raise ValueError("--calibration needs --int8")
        if args.pattern is not None and args.attention != "exact":
            raise ValueError("--pattern replaces --attention: give one of them")
        pattern = None if args.pattern is None else parse_pattern(args.pattern)
        blocks = _parse_blocks(args.blocks)
        calibration = None if args.calibration is None else list_images(args.calibration, "--calibration")
    except (ValueError, TypeError, OSError) as exc:
        print(f"sam-fast export: {exc}", file=sys.stderr)
        return 2
    sam = _checkpoint_for("export", args)
    if sam is None:
        return 2
    sam.eval()
    recorded = getattr(sam, "sam_fast_config", None)
    if pattern is not None:
        attention = Dilated(pattern, blocks)
    elif recorded is not None and args.attention == "exact":
        attention = recorded.attention  # a distilled student: the pattern it was trained for
        print(f"{args.checkpoint}: a distilled student; exporting the dilated attention it was trained for")
    else:
        # (a TinyViT is exported as written: ONNX Runtime and OpenVINO fold its BatchNorms themselves)
        attention = args.attention if vit_blocks(sam) else "none"
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        try:
            quantize = None
            if args.int8:
                cal = None
                if calibration is not None:
                    from sam_fast.quantize import calibrate

                    handle = apply(sam, SamFastConfig(attention))  # calibrated with the attention it will run
                    cal = calibrate(sam, [read_rgb(p) for p in calibration], num_images=len(calibration))
                    handle.undo()
                quantize = Int8(cal)
            apply(sam, SamFastConfig(attention, quantize=quantize))
            result = export(sam, args.out, format=args.format, parts=args.parts, image_size=args.image_size,
                            batch=batch, overwrite=args.overwrite, check=not args.no_check)
        except (ValueError, TypeError, OSError, ImportError) as exc:
            print(f"sam-fast export: {exc}", file=sys.stderr)
            return 2
    print(result.summary())
    if args.format == "aoti":
        print("run it with sam_fast.exporting.load_aoti(path) (or torch.ops.load_library on sam_fast's _C library, "
              "then torch._inductor.aoti_load_package(path))")
    return 0


def _distill(args) -> int:
    import warnings

    from sam_fast.distill import distill
    from sam_fast.distill.students import dilated_student
    from sam_fast.pattern import parse_pattern

    try:
        teacher = _load_for(args.teacher, args)
    except Exception as exc:
        print(f"sam-fast distill: --teacher: {_load_error(exc)}", file=sys.stderr)
        return 2
    try:
        if args.student == "dilated":
            if not args.pattern:
                raise ValueError("--student dilated needs --pattern (e.g. 64x64:2x2)")
            student = dilated_student(teacher, parse_pattern(args.pattern), _parse_blocks(args.blocks))
        elif args.pattern:
            raise ValueError("--pattern applies to --student dilated only (a student checkpoint records its own)")
    except (ValueError, TypeError) as exc:  # the arguments: no checkpoint is involved
        print(f"sam-fast distill: {exc}", file=sys.stderr)
        return 2
    if args.student != "dilated":
        try:
            student = _load_for(args.student, args)
        except Exception as exc:
            print(f"sam-fast distill: --student: {_load_error(exc)}", file=sys.stderr)
            return 2
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        try:
            result = distill(teacher, student, args.images, out_dir=args.out, method=args.method, steps=args.steps,
                             epochs=args.epochs,
                             decoder_steps=args.decoder_steps, batch_size=args.batch_size, lr=args.lr,
                             accumulate=args.accumulate, checkpoint_every=args.checkpoint_every, seed=args.seed,
                             resume=not args.no_resume, device=args.device, precision=args.precision,
                             activation_checkpointing=args.activation_checkpointing,
                             prompts_per_image=args.prompts_per_image)
        except (ValueError, TypeError, OSError) as exc:
            print(f"sam-fast distill: {exc}", file=sys.stderr)
            return 2
    if int(os.environ.get("RANK", "0")) == 0:
        where = f" (resumed at step {result.resumed_from})" if result.resumed_from is not None else ""
        print(f"trained {result.steps} steps{where} on {result.images} images; final loss "
              f"{result.losses.get('loss', float('nan')):.4g}\nstudent: {result.checkpoint}\nlog: {result.log}")
    return 0


def _distill_eval(args) -> int:

    from sam_fast.distill import evaluate, plot_results

    out = args.out or os.path.dirname(os.path.abspath(args.student))
    try:  # where the results go is checked before any work
        os.makedirs(out, exist_ok=True)
        if not os.access(out, os.W_OK | os.X_OK):
            raise PermissionError(f"cannot write to {out}")
    except OSError as exc:
        print(f"sam-fast distill-eval: --out {out}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    try:
        teacher = _load_for(args.teacher, args)
        student = _load_for(args.student, args)
    except Exception as exc:
        print(f"sam-fast distill-eval: {_load_error(exc)}", file=sys.stderr)
        return 2
    prompts = tuple(p.strip() for p in args.prompts.split(",") if p.strip())
    try:
        result = evaluate(student, teacher, args.images, prompts=prompts, prompts_per_image=args.prompts_per_image,
                          device=args.device)
    except (ValueError, TypeError, OSError) as exc:
        print(f"sam-fast distill-eval: {exc}", file=sys.stderr)
        return 2
    print(result.table())
    data = dict(result.as_dict(), teacher=os.path.abspath(args.teacher), student=os.path.abspath(args.student))
    write_json_atomic(os.path.join(out, "eval.json"), data, indent=1)
    png = plot_results({os.path.basename(args.student): result}, os.path.join(out, "eval.png"),
                       title=f"{os.path.basename(args.student)} vs {os.path.basename(args.teacher)}")
    print(f"wrote {os.path.join(out, 'eval.json')} and {png}")
    return 0


def _segment_dataset(args) -> int:
    import json

    from sam_fast import SamFastConfig
    from sam_fast.images import list_images
    from sam_fast.segment_dataset import SegmentWorker, match_box_keys, parse_shard, run_ray, run_shards

    missing = []
    try:
        files = list_images(args.src, "SRC")
        shard = parse_shard(args.shard) if args.shard else None
        if args.shard_size < 1:
            raise ValueError(f"--shard-size must be at least 1, got {args.shard_size}")
        prompts = None
        if args.boxes is not None:
            with open(args.boxes) as f:
                try:
                    raw = json.load(f)
                except ValueError as exc:
                    raise ValueError(f"--boxes {args.boxes} is not JSON ({exc})") from None
            if not isinstance(raw, dict):
                raise ValueError(f"--boxes {args.boxes}: expected a JSON object {{path: [[x0, y0, x1, y1], ...]}}, "
                                 f"got a {type(raw).__name__}")
            files = [os.path.abspath(p) for p in files]
            prompts, unmatched, missing = match_box_keys(raw, files, args.src)
            if unmatched:
                raise ValueError(f"--boxes {args.boxes}: {len(unmatched)} of its {len(raw)} keys name no image under "
                                 f"{args.src} (e.g. {unmatched[0]!r}); keys may be paths (absolute, or relative to "
                                 "SRC or to the working directory) or file names that one image has")
    except (OSError, ValueError, TypeError) as exc:
        print(f"sam-fast segment-dataset: {exc}", file=sys.stderr)
        return 2
    if missing:
        print(f"sam-fast segment-dataset: {len(missing)} of {len(files)} images have no --boxes entry (e.g. "
              f"{missing[0]}): each is an error row, with no masks", file=sys.stderr)
    # the default (exact attention where the encoder has ViT blocks; a distilled student keeps its own) unless asked
    config = None if args.attention == "exact" and not args.int8 else \
        SamFastConfig(attention=args.attention, quantize="int8" if args.int8 else None)
    worker_kwargs = dict(checkpoint=os.path.abspath(args.checkpoint), model_type=args.model_type, config=config,
                         mode="boxes" if prompts is not None else "everything", decoder_heads=args.decoder_heads,
                         device=args.device, generator_kwargs={"points_per_side": args.points_per_side,
                                                               "hierarchical": args.hierarchical})
    try:
        if shard is not None:
            summary = run_shards(SegmentWorker(**worker_kwargs), files, args.out, shard_size=args.shard_size,
                                 rank=shard[0], world=shard[1], prompts=prompts, overwrite=args.overwrite)
        else:
            workers = args.num_gpus or args.num_workers
            summary = run_ray(files, args.out, worker_kwargs, shard_size=args.shard_size, num_workers=workers,
                              num_gpus_per_worker=1.0 if args.num_gpus else 0.0, prompts=prompts,
                              address=args.ray_address, overwrite=args.overwrite)
    except (ImportError, ValueError, OSError) as exc:
        print(f"sam-fast segment-dataset: {_load_error(exc) if isinstance(exc, ValueError) else exc}", file=sys.stderr)
        return 2
    print(f"{args.out}: {summary}")
    return 0


def main(argv=None) -> int:
    _interpreter_for_bench(list(sys.argv[1:] if argv is None else argv))
    parser = argparse.ArgumentParser(prog="sam-fast", description="Fast kernels for Segment Anything.")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="benchmark the ops against their references and peers")
    b.add_argument("--ops", default=None, help=f"comma-separated subset of {sorted(BENCHES)} (default: all; those "
                                               f"whose optional extra is not installed are left out)")
    b.add_argument("--out", default="sam_fast_results", help="results directory (default: ./sam_fast_results)")
    b.add_argument("--full", action="store_true",
                   help="every case of every script (minutes on a CPU); default: the quick cases")
    b.add_argument("--quick", action="store_true", help=argparse.SUPPRESS)  # the default; kept for old scripts
    from sam_fast.models.sam import MODEL_TYPES

    s = sub.add_parser("segment", help="segment images with a SAM checkpoint (prompts or everything mode)")
    s.add_argument("images", nargs="+", metavar="IMAGE")
    s.add_argument("--checkpoint", required=True, help="SAM checkpoint (official state_dict format)")
    s.add_argument("--model-type", required=True, choices=MODEL_TYPES,
                   help="the checkpoint's model; auto reads the encoder's geometry from the checkpoint "
                        "(SlimSAM's globally pruned encoders)")
    s.add_argument("--points", action="append", metavar="x,y[,label]", help="a point prompt (repeatable)")
    s.add_argument("--box", metavar="x0,y0,x1,y1", help="a box prompt")
    s.add_argument("--everything", action="store_true", help="segment everything (automatic mask generator)")
    s.add_argument("--hierarchical", action="store_true", help="TinySAM's two-round everything mode")
    s.add_argument("--points-per-side", type=int, default=32, help="everything mode grid (default 32)")
    s.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    s.add_argument("--decoder-heads", type=int, default=None,
                   help="mask decoder heads, for a decoder narrower or wider than SAM's 256 (auto only)")
    s.add_argument("--out", required=True, help="output directory (<name>.json and <name>.png per image)")
    s.add_argument("--overwrite", action="store_true", help="replace outputs that already exist in --out")
    i = sub.add_parser("inspect", help="what a checkpoint holds: model family, per-block geometry, what sam_fast "
                                       "swaps into it")
    i.add_argument("checkpoint")
    i.add_argument("--model-type", default="auto", choices=MODEL_TYPES, help="default: auto (read from the file)")
    i.add_argument("--decoder-heads", type=int, default=None,
                   help="mask decoder heads, for a decoder narrower or wider than SAM's 256 (auto only)")
    d = sub.add_parser("distill", help="train a faster student (dilated, pruned, TinyViT) to reproduce a teacher")
    d.add_argument("--teacher", required=True, help="teacher checkpoint")
    d.add_argument("--student", required=True, help="'dilated' (the teacher with --pattern) or a student checkpoint")
    d.add_argument("--pattern", help="dilated pattern: branches SEG[:DIL], 2-D sizes as HxW, e.g. 64x64:2x2 or "
                                     "14x14,64x64:2x2")
    d.add_argument("--blocks", default="global", help="blocks that get the pattern: global (default), all, or 2,5,8")
    d.add_argument("--images", required=True, help="folder of JPEG / PNG images (searched recursively)")
    d.add_argument("--out", required=True, help="run directory (cache, log, checkpoints, student.pt)")
    d.add_argument("--method", default="dld", choices=("dld", "embedding", "full_stage"))
    d.add_argument("--steps", type=int, default=None, help="encoder distillation steps (default 1000)")
    d.add_argument("--epochs", type=float, default=None, help="instead of --steps: passes over the images")
    d.add_argument("--decoder-steps", type=int, default=0, help="decoder alignment steps afterwards (default 0)")
    d.add_argument("--batch-size", type=int, default=8, help="images per step over all processes (default 8)")
    d.add_argument("--lr", type=float, default=1e-4, help="peak AdamW learning rate (default 1e-4)")
    d.add_argument("--accumulate", type=int, default=1, help="micro-batches per step (default 1)")
    d.add_argument("--prompts-per-image", type=int, default=4, help="objects per image for the prompt losses")
    d.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints (default 100)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"))
    d.add_argument("--activation-checkpointing", action="store_true", help="recompute blocks in backward")
    d.add_argument("--no-resume", action="store_true", help="start afresh even if --out holds a run")
    d.add_argument("--device", help="default: cuda:LOCAL_RANK when available, else cpu")
    r = sub.add_parser("prune", help="prune a SAM's image encoder the SlimSAM way, recovering by distillation")
    r.add_argument("--checkpoint", required=True, help="the model to prune (any checkpoint load_sam reads)")
    r.add_argument("--images", required=True, help="folder of JPEG / PNG images: importance, recovery, SQNR")
    r.add_argument("--out", required=True, help="run directory (each stage's checkpoint and distillation run)")
    r.add_argument("--ratio", type=float, default=None, help="fraction of channels removed, e.g. 0.5")
    r.add_argument("--widths", default=None, help="instead of --ratio: embed=N,head_dim=N,mlp=N")
    r.add_argument("--mode", default="uniform", choices=("uniform", "global"), help="one width per kind (default) "
                                                                                  "or ranked across blocks")
    r.add_argument("--importance", default="disturbed_taylor", choices=("disturbed_taylor", "magnitude"))
    r.add_argument("--drop-attention", type=int, default=0, metavar="K",
                   help="first remove the attention of the K blocks that need it least (DC-ViT; default 0)")
    r.add_argument("--num-images", type=int, default=64, help="images for the importance scores (default 64)")
    r.add_argument("--draws", type=int, default=1, help="noise draws per image for disturbed Taylor (default 1)")
    r.add_argument("--eval-images", default="4", help="the report's images: N of --images (default 4), or a "
                                                      "folder of held-out images")
    r.add_argument("--resume", action="store_true", help="continue the run in --out (without it, an --out that "
                                                         "holds a run is refused)")
    r.add_argument("--method", default="dld", choices=("dld", "embedding", "full_stage"), help="recovery")
    r.add_argument("--steps", type=int, default=None, help="recovery steps per stage (default 1000)")
    r.add_argument("--batch-size", type=int, default=8, help="recovery images per step (default 8)")
    r.add_argument("--lr", type=float, default=1e-4, help="recovery peak learning rate (default 1e-4)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    r.add_argument("--device", help="where the recovery trains (default: cuda when available, else cpu)")
    e = sub.add_parser("distill-eval", help="a student's mask mIoU against its teacher, embedding SQNR, speed")
    e.add_argument("--teacher", required=True)
    e.add_argument("--student", required=True)
    e.add_argument("--images", required=True, help="folder of held-out images")
    e.add_argument("--prompts", default="points,boxes", help="points, boxes or both (default)")
    e.add_argument("--prompts-per-image", type=int, default=8)
    e.add_argument("--out", help="where eval.json / eval.png go (default: the student's folder)")
    e.add_argument("--device", help="default: cuda when available")
    x = sub.add_parser("export", help="an encoder / decoder as an ONNX file or an AOTInductor package")
    x.add_argument("--checkpoint", required=True, help="any checkpoint load_sam reads")
    x.add_argument("--out", required=True, help="the file (.onnx / .pt2); with --parts both a folder")
    x.add_argument("--format", default="onnx", choices=("onnx", "aoti"))
    x.add_argument("--parts", default="encoder", choices=("encoder", "decoder", "both"),
                   help="decoder: segment_anything's SamOnnxModel interface (ONNX only)")
    x.add_argument("--attention", default="exact", choices=("exact", "none"), help="fused attention (default)")
    x.add_argument("--pattern", help="dilated pattern instead, e.g. 64x64:2x2 (see distill)")
    x.add_argument("--blocks", default="global", help="blocks that get --pattern (default: global)")
    x.add_argument("--int8", action="store_true", help="W8A8 linears (dynamic scales, or --calibration)")
    x.add_argument("--calibration", metavar="DIR", help="calibrate static int8 scales on these images")
    x.add_argument("--batch", default="1", help="the encoder's batch: a number or 'dynamic' (default 1)")
    x.add_argument("--image-size", type=int, default=None, help="the encoder's input side (default: the model's)")
    x.add_argument("--overwrite", action="store_true", help="replace an existing output")
    x.add_argument("--no-check", action="store_true", help="skip the run on a photo against PyTorch")
    g = sub.add_parser("segment-dataset", help="segment a folder of images into per-shard COCO JSON (Ray or ranks)")
    g.add_argument("src", help="folder of JPEG / PNG images (searched recursively)")
    g.add_argument("--out", required=True, help="output folder (shard-<k>.json files)")
    g.add_argument("--checkpoint", required=True, help="SAM checkpoint (file or transformers directory)")
    g.add_argument("--shard", help="RANK/WORLD: this process's exact part of the shards, without Ray")
    g.add_argument("--ray-address", default=None, help="an existing Ray cluster (default: start a local one)")
    g.add_argument("--num-gpus", type=int, default=0, help="Ray: N actors with one GPU each")
    g.add_argument("--num-workers", type=int, default=1, help="Ray without GPUs: N CPU actors (default 1)")
    g.add_argument("--shard-size", type=int, default=64, help="images per output shard (default 64)")
    g.add_argument("--boxes", help="JSON {image: [[x0, y0, x1, y1], ...]} (keys: paths, absolute or relative to SRC, "
                                   "or file names): one mask per box instead of everything")
    g.add_argument("--overwrite", action="store_true",
                   help="redo the shards in --out that another run wrote (other images, boxes or settings)")
    g.add_argument("--points-per-side", type=int, default=32, help="everything mode grid (default 32)")
    g.add_argument("--hierarchical", action="store_true", help="TinySAM's two-round everything mode")
    g.add_argument("--attention", default="exact", choices=("exact", "none"), help="fused attention (default)")
    g.add_argument("--int8", action="store_true", help="W8A8 linears (dynamic scales)")
    g.add_argument("--device", help="default: cuda when available")
    for p in (d, e, g, r, x):
        p.add_argument("--model-type", default="auto", choices=MODEL_TYPES, help="the checkpoints' model type")
        p.add_argument("--decoder-heads", type=int, default=None,
                       help="mask decoder heads of a decoder narrower or wider than SAM's 256 (auto only)")
    args = parser.parse_args(argv)
    if args.command == "distill":
        return _distill(args)
    if args.command == "distill-eval":
        return _distill_eval(args)
    if args.command == "prune":
        return _prune(args)
    if args.command == "segment-dataset":
        return _segment_dataset(args)
    if args.command == "export":
        return _export(args)
    if args.command == "bench":
        args.ops_given = [] if args.ops is None else [o.strip() for o in args.ops.split(",")]
        args.ops = args.ops or ",".join(BENCHES)
        return _bench(args)
    if args.command == "segment":
        return _segment(args)
    if args.command == "inspect":
        return _inspect(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
