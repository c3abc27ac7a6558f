"""Benchmark: the whole SAM image encoder on the CPU, sam_fast against the runtimes CPU users deploy with.

Per model (SAM ViT-B, SlimSAM-77, SlimSAM-50 and MobileSAM's TinyViT: random weights at the released geometries,
1024 px, batch 1) and thread count (1 and 2), every contender is timed in interleaved rounds (one call each per
round; medians of 5) on a real photo, with its SQNR against sam_fast's fp32 output beside the time:

* **fp32**: sam_fast (``SamFastConfig("exact")``); ONNX Runtime (CPU execution provider, every graph optimisation;
  its threads sleep between runs rather than spin, which would slow whatever runs next) and OpenVINO
  (``INFERENCE_PRECISION_HINT`` f32) on the plain model's ONNX file (what a user exports from the original encoder,
  no sam_fast op in it).
* **bf16**: sam_fast on the bf16 model; OpenVINO with the bf16 hint (its default on CPUs with bf16 arithmetic).
* **int8**: sam_fast W8A8 (dynamic per-token activations; layers its CPU policy keeps float stay float);
  ONNX Runtime's own ``quantize_dynamic`` (int8 weights, per-tensor dynamic activations); NNCF's post-training int8
  (``nncf.quantize``, transformer preset, calibrated on four other photos; run in a child process, which NNCF
  otherwise slows: see ``_Contenders._nncf``) in OpenVINO, at the f32 hint and at the bf16 hint (its default where
  the CPU has bf16).

Rows record the CPU's model and instruction sets (``device``), so figures from machines with and without AMX stay
apart. Needs ``pip install 'sam_fast[export]'`` and ``nncf`` (both in ``[dev]``; a contender whose package is
missing is left out and said so). --quick: the tiny 256 px ViT, one round at the last thread count (seconds; what
the test suite runs).

    python bench/bench_cpu_runtimes.py [--out bench/results] [--quick] [--models vit_b,slimsam_77] [--threads 1,2]
"""

from __future__ import annotations

import copy
import importlib.util
import os
import subprocess
import sys
import tempfile
import time

import torch

from sam_fast.bench.bench_export import _encoder, _interleaved
from sam_fast.bench.harness import LiveRows, bench_main, progress, provenance

SCRIPT = "bench_cpu_runtimes"
BASELINE = "sam_fast"
EXTRA_COLUMNS = ["precision", "threads", "sqnr_db", "prepare_s"]
MODELS = ("vit_b", "slimsam_77", "slimsam_50", "vit_t")
THREADS = (1, 2)
PRECISIONS = ("fp32", "bf16", "int8")


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _bf16_hardware() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX): OpenVINO's bf16 hint means something
    there, and only there."""
    from sam_fast.ops.dilated_attention_cpu import compute_dtype

    return compute_dtype(torch.bfloat16) == torch.bfloat16


class _Contenders:
    """The contenders of one model, built once (exports, quantisation) and called per thread count."""

    def __init__(self, name: str, tmp: str):
        import sam_fast
        from sam_fast import exporting

        self.notes = []
        enc = _encoder(name)
        self.size = enc.img_size
        photos = exporting.photo_input(enc, self.size, batch=5)
        self.x, calibration = photos[:1], photos[1:]  # timed on the astronaut, calibrated on the four others
        self.xn = self.x.numpy()
        self.prepare = {}

        def timed(label, fn):
            t0 = time.perf_counter()
            out = fn()
            self.prepare[label] = time.perf_counter() - t0
            return out

        # SAM's ViT blocks take the fused attention, a TinyViT its fast forms
        attention = "exact"
        self.models = {}
        fp32 = copy.deepcopy(enc)
        sam_fast.apply(fp32, sam_fast.SamFastConfig(attention))
        self.models["fp32"] = fp32
        bf16 = copy.deepcopy(enc).to(torch.bfloat16)
        sam_fast.apply(bf16, sam_fast.SamFastConfig(attention))
        self.models["bf16"] = bf16
        int8 = copy.deepcopy(enc)
        sam_fast.apply(int8, sam_fast.SamFastConfig(attention, quantize="int8"))
        self.models["int8"] = int8
        with torch.no_grad():
            self.reference = fp32(self.x)

        self.onnx = None
        if _has("onnx") and _has("onnxscript"):
            self.onnx = os.path.join(tmp, f"{name}.onnx")
            timed("onnx", lambda: sam_fast.export(enc, self.onnx, batch=1, check=False, overwrite=True))
        else:
            self.notes.append("ONNX Runtime and OpenVINO left out: pip install 'sam_fast[export]'")
        self.ort_int8 = None
        if self.onnx and _has("onnxruntime"):
            from onnxruntime.quantization import QuantType, quantize_dynamic

            self.ort_int8 = os.path.join(tmp, f"{name}_ort_int8.onnx")
            timed("ort_int8", lambda: quantize_dynamic(self.onnx, self.ort_int8, weight_type=QuantType.QInt8))
        self.nncf = None
        if self.onnx and _has("openvino"):
            if _has("nncf"):
                self.nncf = timed("nncf", lambda: self._nncf(calibration))
            else:
                self.notes.append("NNCF int8 left out: pip install nncf")

    def _nncf(self, calibration):
        """NNCF's int8 model, quantised in a child process: after nncf.quantize ran in this one, sam_fast's int8
        encoder took 0.62 s or 0.9 s by turns instead of 0.62 s (SlimSAM-77, 2 threads), whatever NNCF leaves
        behind competing for the cores; the timings would measure that, not the contenders."""
        import numpy as np
        import openvino as ov

        folder = os.path.dirname(self.onnx)
        photos, xml = os.path.join(folder, "calibration.npy"), self.onnx[:-5] + "_nncf.xml"
        np.save(photos, calibration.numpy())
        subprocess.run([sys.executable, "-c", _NNCF, self.onnx, photos, xml], check=True, capture_output=True,
                       text=True, timeout=3600)
        return ov.Core().read_model(xml)

    def calls(self, precision: str, threads: int):
        """{contender: (callable, output -> torch.Tensor, prepare seconds)} at ``threads`` threads."""
        from sam_fast import exporting

        x = self.x.to(torch.bfloat16) if precision == "bf16" else self.x
        model = self.models[precision]
        out = {BASELINE: (lambda: model(x), lambda y: y, 0.0)}

        def ort(path, key):
            session = exporting.onnx_session(path, threads=threads, spinning=False)
            return (lambda: session.run(None, {"image": self.xn}), lambda y: torch.from_numpy(y[0]),
                    self.prepare.get(key, 0.0))

        def ov(model_or_path, hint, key):
            compiled = exporting.openvino_model(model_or_path, batch=1, precision=hint, threads=threads)
            return lambda: compiled(self.xn), lambda y: torch.from_numpy(y[0]), self.prepare.get(key, 0.0)

        if self.onnx and precision == "fp32":
            if _has("onnxruntime"):
                out["onnxruntime"] = ort(self.onnx, "onnx")
            if _has("openvino"):
                out["openvino"] = ov(self.onnx, "f32", "onnx")
        if self.onnx and precision == "bf16" and _has("openvino") and _bf16_hardware():
            out["openvino"] = ov(self.onnx, "bf16", "onnx")
        if precision == "int8":
            if self.ort_int8:
                out["onnxruntime_int8"] = ort(self.ort_int8, "ort_int8")
            if self.nncf is not None:
                out["openvino_nncf"] = ov(self.nncf, "f32", "nncf")
                if _bf16_hardware():
                    out["openvino_nncf_bf16"] = ov(self.nncf, "bf16", "nncf")
        return out


_NNCF = """
import sys
import nncf
import numpy as np
import openvino as ov

onnx_path, photos, xml = sys.argv[1:4]
x = np.load(photos)
data = nncf.Dataset([x[i:i + 1] for i in range(len(x))])
model = nncf.quantize(ov.Core().read_model(onnx_path), data, model_type=nncf.ModelType.TRANSFORMER, subset_size=len(x))
ov.save_model(model, xml, compress_to_fp16=False)
"""


def _rows(rows, prov, quick: bool, models, threads, tmp: str):
    names = ("tiny-256",) if quick else models
    rounds = 1 if quick else 5
    threads = threads[-1:] if quick else threads
    saved = torch.get_num_threads()
    try:
        for name in progress(names, "cpu runtimes", str):
            contenders = _Contenders(name, tmp)
            for note in contenders.notes:
                print(f"{name}: {note}", file=sys.stderr)
            for t in threads:
                torch.set_num_threads(t)
                for precision in PRECISIONS:
                    calls = contenders.calls(precision, t)
                    with torch.no_grad():
                        outs = {k: conv(fn()).float() for k, (fn, conv, _) in calls.items()}
                        stats = _interleaved({k: fn for k, (fn, _, _) in calls.items()}, rounds)
                    from sam_fast.metrics import sqnr_db

                    case = f"{name} {contenders.size}px batch 1"
                    for backend, st in stats.items():
                        sqnr = sqnr_db(contenders.reference.float(), outs[backend])
                        rows.append(dict(prov, op="cpu_runtimes", case=case, backend=backend,
                                         mode=f"{precision} {t}t", metric="s_per_img", value=st["median_ms"] / 1e3,
                                         precision=precision, threads=t, sqnr_db=sqnr,
                                         prepare_s=calls[backend][2],
                                         note=f"{precision}, {t} threads, SQNR {sqnr:.1f} dB vs sam_fast fp32",
                                         **st))
    finally:
        torch.set_num_threads(saved)


def _plot(rows, path):
    """Seconds per image (lower is better): one panel per precision, a group of bars per model and thread count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = [r for r in rows if r["op"] == "cpu_runtimes"]
    if not data:
        return None
    precisions = [p for p in PRECISIONS if any(r["precision"] == p for r in data)]
    fig, axes = plt.subplots(1, len(precisions), figsize=(5.5 * len(precisions), 4.2), squeeze=False)
    for ax, precision in zip(axes[0], precisions):
        sub = [r for r in data if r["precision"] == precision]
        groups = list(dict.fromkeys((r["case"].split()[0], r["threads"]) for r in sub))
        backends = list(dict.fromkeys(r["backend"] for r in sub))
        width = 0.8 / len(backends)
        for j, b in enumerate(backends):
            ys = [next((r["value"] for r in sub if (r["case"].split()[0], r["threads"]) == g and r["backend"] == b),
                       0.0) for g in groups]
            bars = ax.bar([i + j * width for i in range(len(groups))], ys, width, label=b, color=f"C{j}")
            for bar, y in zip(bars, ys):
                if y:
                    ax.text(bar.get_x() + bar.get_width() / 2, y, f"{y:.2f}", ha="center", va="bottom", fontsize=6)
        ax.set_xticks([i + width * (len(backends) - 1) / 2 for i in range(len(groups))],
                      [f"{m}\n{t} thr" for m, t in groups], fontsize=8)
        ax.set_title(precision, fontsize=10)
        ax.set_ylabel("seconds / image (lower is better)")
        ax.legend(fontsize=7)
    fig.suptitle(f"SAM image encoders on the CPU, 1024 px ({data[0]['device']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _names(text: str, allowed, what: str, convert=str):
    if not text:
        return tuple(allowed)
    got = tuple(convert(v.strip()) for v in text.split(",") if v.strip())
    if not got:
        raise ValueError(f"--{what}: name at least one")
    return got


def run(out_dir: str, quick: bool = False, models: str = "", threads: str = ""):
    models_ = _names(models, MODELS, "models")
    unknown = sorted(set(models_) - set(MODELS))
    if unknown:
        raise ValueError(f"--models: unknown {unknown}; choose among {MODELS}")
    threads_ = _names(threads, THREADS, "threads", int)
    if any(t < 1 for t in threads_):
        raise ValueError(f"--threads: counts must be at least 1, got {threads_}")
    os.makedirs(out_dir, exist_ok=True)
    rows = LiveRows(out_dir, SCRIPT, EXTRA_COLUMNS)
    with tempfile.TemporaryDirectory() as tmp:
        _rows(rows, provenance(torch.device("cpu")), quick, models_, threads_, tmp)
    return rows, _plot(rows, os.path.join(out_dir, f"{SCRIPT}.png"))


def main(argv=None):
    return bench_main(__doc__, run, BASELINE, argv,
                      options=(("--models", "store", f"comma-separated, among {','.join(MODELS)} (default: all)"),
                               ("--threads", "store", "comma-separated thread counts (default: 1,2)")))


if __name__ == "__main__":
    sys.exit(main())
