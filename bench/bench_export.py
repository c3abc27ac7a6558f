"""Benchmark: sam_fast's exported encoders in the runtimes users deploy with, against sam_fast itself.

CPU (op ``export_cpu``): SAM ViT-B and SlimSAM-77 at 1024 px (random weights at the released geometries), batch 1,
float32 (exact fused attention) and W8A8 int8 (dynamic per-token scales): the eager sam_fast model (the baseline),
the ONNX file :func:`sam_fast.export` writes run in ONNX Runtime (CPU execution provider) and in OpenVINO (CPU
plugin, batch fixed to 1, f32 inference precision: the file's numerics). Every runtime is timed in interleaved
rounds (one call each per round, medians) with all the machine's cores. Extra columns: the export's wall time,
the file's size and the runtime's SQNR against the eager model. --quick: a tiny 256 px ViT instead (seconds).

GPU (op ``export_gpu``, when CUDA is present; ``--targets``: the same, ViT-B only): ViT-B at 1024 px, bf16, batch
1 - eager sam_fast, ``torch.compile`` of it, and the AOTInductor package of it (``format="aoti"``); op
``cold_start``: seconds from a fresh process's start to its first embedding, for the package (torch alone: load +
first call) and for ``torch.compile`` (build, apply, compile, first call), in subprocesses.

    python bench/bench_export.py [--out bench/results] [--quick]
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import tempfile
import time

import torch

from sam_fast.bench.harness import LiveRows, bench_main, measure, progress, provenance

SCRIPT = "bench_export"
BASELINE = "sam_fast(eager)"
EXTRA_COLUMNS = ["export_s", "file_mb", "sqnr_db"]
CPU_MODELS = ("vit_b", "slimsam_77")


def _encoder(name: str):
    from sam_fast.bench.bench_e2e import _encoders

    if name == "tiny-256":
        return next(iter(_encoders(False)))[1]
    return dict(_encoders(False, wanted=(name,)))[name]


def _interleaved(fns, rounds):
    from sam_fast.bench.bench_cpu_blocks import _stats, interleaved

    return {name: _stats(ms) for name, ms in interleaved(fns, rounds).items()}


def _cpu_rows(rows, prov, quick: bool, tmp: str):
    import sam_fast
    from sam_fast import exporting

    models = ("tiny-256",) if quick else CPU_MODELS
    cases = [(m, q) for m in models for q in ("fp32", "int8")]
    for name, quant in progress(cases, "export (cpu)", lambda c: f"{c[0]} {c[1]}"):
        enc = _encoder(name)
        size = enc.img_size
        sam_fast.apply(enc, sam_fast.SamFastConfig("exact", quantize="int8" if quant == "int8" else None))
        path = os.path.join(tmp, f"{name}_{quant}.onnx")
        t0 = time.perf_counter()
        sam_fast.export(enc, path, batch=1, check=False, overwrite=True)
        export_s = time.perf_counter() - t0
        file_mb = os.path.getsize(path) / 2**20
        x = exporting.photo_input(enc, size)
        xn = x.numpy()
        session = exporting.onnx_session(path)
        compiled = exporting.openvino_model(path, batch=1)
        with torch.no_grad():
            want = enc(x)
        fns = {BASELINE: lambda enc=enc: enc(x), "onnxruntime": lambda s=session: s.run(None, {"image": xn}),
               "openvino": lambda c=compiled: c(xn)}
        outs = {"onnxruntime": torch.from_numpy(session.run(None, {"image": xn})[0]),
                "openvino": torch.from_numpy(compiled(xn)[0])}
        with torch.no_grad():
            stats = _interleaved(fns, rounds=3 if quick else 5)
        case = f"{name} {size}px {quant} batch 1"
        for backend, st in stats.items():
            sqnr = float("inf") if backend == BASELINE else exporting.sqnr_db(want, outs[backend])
            rows.append(dict(prov, op="export_cpu", case=case, backend=backend, mode=quant, metric="img_per_s",
                             value=1e3 / st["median_ms"], export_s=export_s, file_mb=file_mb, sqnr_db=sqnr,
                             note=f"{torch.get_num_threads()} threads; file {file_mb:.0f} MiB, exported in "
                                  f"{export_s:.0f} s", **st))


_COLD = """
import sys, time
t0 = time.perf_counter()
import torch
mode, path, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
x = torch.randn(1, 3, size, size, device="cuda", dtype=torch.bfloat16)
if mode == "aoti":  # the package of a CUDA model holds its kernels: torch alone loads it (no sam_fast import)
    run = torch._inductor.aoti_load_package(path, device_index=0)
    out = run(x)
else:
    import sam_fast
    from sam_fast.bench.bench_export import _encoder
    enc = _encoder("vit_b").cuda().to(torch.bfloat16)
    sam_fast.apply(enc, sam_fast.SamFastConfig("exact"))
    with torch.no_grad():
        out = torch.compile(enc)(x)
torch.cuda.synchronize()
print("COLD", time.perf_counter() - t0)
"""


def _cold(mode: str, path: str, size: int) -> float:
    proc = subprocess.run([sys.executable, "-c", _COLD, mode, path, str(size)], capture_output=True, text=True,
                          timeout=900)
    for line in proc.stdout.splitlines():
        if line.startswith("COLD "):
            return float(line.split()[1])
    raise RuntimeError(f"cold start of {mode} failed:\n{proc.stderr[-2000:]}")


def _gpu_rows(rows, prov, tmp: str):
    import sam_fast
    from sam_fast import exporting

    dev = torch.device("cuda")
    enc = _encoder("vit_b").to(dev, torch.bfloat16)
    sam_fast.apply(enc, sam_fast.SamFastConfig("exact"))
    size = enc.img_size
    x = torch.randn(1, 3, size, size, device=dev, dtype=torch.bfloat16)
    path = os.path.join(tmp, "vit_b.pt2")
    t0 = time.perf_counter()
    sam_fast.export(enc, path, format="aoti", batch=1, check=False, overwrite=True)
    export_s = time.perf_counter() - t0
    runner = exporting.load_aoti(path, device_index=0)
    compiled = torch.compile(copy.deepcopy(enc))
    with torch.no_grad():
        want = enc(x).float()
        fns = {BASELINE: lambda: enc(x), "sam_fast+compile": lambda: compiled(x), "aoti": lambda: runner(x)}
        got = {"sam_fast+compile": compiled(x).float(), "aoti": runner(x).float()}
        case = f"vit_b {size}px bf16 batch 1"
        for backend, fn in fns.items():
            st = measure(fn, dev, warmup_ms=200, rep_ms=1000)
            sqnr = float("inf") if backend == BASELINE else exporting.sqnr_db(want, got[backend])
            rows.append(dict(prov, op="export_gpu", case=case, backend=backend, mode="bf16", metric="img_per_s",
                             value=1e3 / st["median_ms"], export_s=export_s if backend == "aoti" else float("nan"),
                             file_mb=os.path.getsize(path) / 2**20 if backend == "aoti" else float("nan"),
                             sqnr_db=sqnr, **st))
    for mode in ("aoti", "compile"):
        s = _cold(mode, path, size)
        rows.append(dict(prov, op="cold_start", case=case, backend="aoti" if mode == "aoti" else "sam_fast+compile",
                         mode="bf16", metric="seconds", value=s, median_ms=s * 1e3,
                         note="process start to the first embedding"))


def _plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cpu = [r for r in rows if r["op"] == "export_cpu"]
    if not cpu:
        return None
    cases = list(dict.fromkeys(r["case"] for r in cpu))
    backends = list(dict.fromkeys(r["backend"] for r in cpu))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(cases)), 4))
    width = 0.8 / len(backends)
    for j, b in enumerate(backends):
        ys = [next((r["value"] for r in cpu if r["case"] == c and r["backend"] == b), 0.0) for c in cases]
        bars = ax.bar([i + j * width for i in range(len(cases))], ys, width, label=b, color=f"C{j}")
        for bar, y in zip(bars, ys):
            ax.text(bar.get_x() + bar.get_width() / 2, y, f"{y:.2f}", ha="center", va="bottom", fontsize=7)
    labels = [c.replace(" batch 1", "").replace("px ", "px\n") for c in cases]
    ax.set_xticks([i + width * (len(backends) - 1) / 2 for i in range(len(cases))], labels, fontsize=8)
    ax.set_ylabel("images / s (higher is better)")
    ax.set_title(f"exported encoders on the CPU ({cpu[0]['device']})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run(out_dir: str, quick: bool = False, targets: bool = False):
    os.makedirs(out_dir, exist_ok=True)
    rows = LiveRows(out_dir, SCRIPT, EXTRA_COLUMNS)
    with tempfile.TemporaryDirectory() as tmp:
        if torch.cuda.is_available():
            _gpu_rows(rows, provenance(torch.device("cuda")), tmp)
        else:
            _cpu_rows(rows, provenance(torch.device("cpu")), quick or targets, tmp)
    return rows, _plot(rows, os.path.join(out_dir, f"{SCRIPT}.png"))


def main(argv=None):
    return bench_main(__doc__, run, BASELINE, argv)


if __name__ == "__main__":
    sys.exit(main())
