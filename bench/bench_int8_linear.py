"""Benchmark: sam_fast.int8_linear (W8A8, activation quantization included) vs bf16 cuBLAS and torch._int_mm.

Cases: M = B * 4096 tokens (B = 1, 8, 32) times the (K, N) of SAM ViT-B (768->2304, 768->768, 768->3072,
3072->768) and ViT-H (1280->3840, 1280->1280, 1280->5120, 5120->1280) linears, bf16 in and out, with bias.
Peers in the same run:

* ``cublas_bf16``: ``F.linear`` in bf16 (the baseline);
* ``int_mm+separate``: torchao's eager path - per-token quantization in PyTorch ops, ``torch._int_mm``,
  then a separate dequantize + bias kernel;
* ``int_mm+compile``: the same function under ``torch.compile`` (inductor fuses the elementwise parts);
* ``sam_fast``: :func:`sam_fast.int8_linear` on the bf16 input: the per-token quantization kernel plus
  the int8 GEMM with the fused epilogue (quantization counted in the time);
* ``sam_fast_gemm_only``: the GEMM on already quantized input (what a LayerNorm-fused or re-quantizing
  producer leaves), to show the kernel's own throughput.

Columns: ``tops`` = 2 M N K / time (int8 dense peak on H100 SXM: 1979 TOPS), and ``sqnr_db`` of each
backend's output against the fp32 ``F.linear`` of the same float weights beside the speed.
On a CPU-only machine the peers are ``torch_fp32`` (``F.linear`` in float32, the baseline), ``int_mm+separate``
and ``sam_fast(cpu)`` (the C++ quantisation and epilogue around ``torch._int_mm``), in float32, at M = 4096 and
1024 rows for the linears of SlimSAM-77, TinyViT's last two stages, SlimSAM-50 and ViT-B (M = 256, ViT-B only,
with --quick); the Triton kernels are checked for correctness under the interpreter (not timed, M = 64).

    python bench/bench_int8_linear.py [--out bench/results] [--quick | --targets]
"""

from __future__ import annotations

import sys

from sam_fast.kernels._interpreter import use_interpreter_without_gpu

use_interpreter_without_gpu()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from sam_fast.bench.harness import LiveRows, bench_main, measure, provenance, raise_recompile_limit, save_results  # noqa: E402

SCRIPT = "bench_int8_linear"
BASELINE = "cublas_bf16" if torch.cuda.is_available() else "torch_fp32"
VIT_B = [(768, 2304), (768, 768), (768, 3072), (3072, 768)]
VIT_H = [(1280, 3840), (1280, 1280), (1280, 5120), (5120, 1280)]
# the CPU's full run: the narrower families too, where int8 may lose to float (sam_fast keeps layers with
# fewer than cpu_policy int8_min_in_features input channels float on a CPU; these rows are what that rests on)
CPU_FAMILIES = [("slimsam_77", [(168, 504), (168, 168), (168, 696), (696, 168)]),
                ("tinyvit_s3", [(160, 480), (160, 640), (640, 160)]),
                ("tinyvit_s4", [(320, 960), (320, 1280), (1280, 320)]),
                ("slimsam_50", [(384, 1152), (384, 384), (384, 1536), (1536, 384)]),
                ("vit_b", VIT_B)]
CPU_TOKENS = (4096, 1024)  # a 1024 px image's 64 x 64 tokens; TinyViT's later stages see 32 x 32 and fewer


def int_mm_separate(x, wq_t, ws, bias):
    """torchao-style eager W8A8: quantize (PyTorch ops), torch._int_mm, dequantize + bias."""
    scale = (x.abs().amax(dim=-1, keepdim=True).float() / 127).clamp_min(1e-12)
    xq = torch.round(x.float() / scale).clamp_(-127, 127).to(torch.int8)
    acc = torch._int_mm(xq, wq_t)
    return (acc.float() * scale * ws + bias).to(x.dtype)


def _sqnr(ref, y):
    from sam_fast.metrics import sqnr_db

    return sqnr_db(ref, y.float())


# What the performance targets read (tools/targets.py): the ViT-H MLP pair at batch 8 against cuBLAS and
# _int_mm + separate kernels, and the largest shape (ViT-H MLP at batch 32) for its TOPS.
TARGET_CASES = [(8, "vit_h", 1280, 5120), (8, "vit_h", 5120, 1280), (32, "vit_h", 1280, 5120)]
TARGET_PEERS = ("cublas_bf16", "int_mm+separate", "sam_fast")


def cases(gpu: bool, quick: bool = False, targets: bool = False):
    """(B, model, K, N) in the order they run: on a GPU the targets' cases first (ViT-H at B=8, then the
    largest M), so a stage cut short by its time limit has measured what the targets read."""
    if targets:
        return list(TARGET_CASES)
    if not gpu:  # B stands for M here: the rows of one call
        if quick:
            return [(256, "vit_b", K, N) for K, N in VIT_B]
        return [(M, model, K, N) for M in CPU_TOKENS for model, shapes in CPU_FAMILIES for K, N in shapes]
    batches = (1,) if quick else (8, 32, 1)
    shapes = [("vit_h", kn) for kn in VIT_H] + [("vit_b", kn) for kn in VIT_B]
    return [(B, model, K, N) for B in batches for model, (K, N) in shapes]


def peer_names(gpu: bool, targets: bool = False):
    if targets:
        return list(TARGET_PEERS)
    if gpu:
        return ["cublas_bf16", "int_mm+separate", "int_mm+compile", "sam_fast", "sam_fast_gemm_only"]
    return ["torch_fp32", "int_mm+separate", "sam_fast(cpu)"]


def _case_name(model, M, K, N):
    return f"{model} M={M} {K}->{N}"


def planned_rows(targets: bool = True):
    """The (op, case, backend, mode) rows a GPU run writes, without running it."""
    return [dict(op="int8_linear", case=_case_name(model, B * 4096, K, N), backend=name, mode="fwd")
            for B, model, K, N in cases(True, targets=targets) for name in peer_names(True, targets)]


def workload(B, model, K, N, dev, g, names, compiled=None):
    """One case: (case name, M, x, w, b, ref, {peer: callable}) for the peers ``names`` - the definition
    this script times and tools/test_microbench.py benchmarks."""
    import sam_fast

    M = B * 4096 if dev.type == "cuda" else B  # on the CPU, B is M (see cases())
    x = torch.randn(M, K, device=dev, generator=g).to(torch.bfloat16 if dev.type == "cuda" else torch.float32)
    w = torch.randn(N, K, device=dev, generator=g) / K**0.5
    b = torch.randn(N, device=dev, generator=g) * 0.1
    wq, ws = sam_fast.quantize.quantize_weight(w)
    wq_t = wq.t()  # (K, N) view of the K-major weight: the layout _int_mm wants for its B operand
    xq, xs = sam_fast.quantize_per_token(x)
    wl, bl = w.to(x.dtype), b.to(x.dtype)
    make = {
        "cublas_bf16": lambda: F.linear(x, wl, bl),
        "torch_fp32": lambda: F.linear(x, wl, bl),
        "int_mm+separate": lambda: int_mm_separate(x, wq_t, ws, b),
        "int_mm+compile": lambda: compiled(x, wq_t, ws, b),
        "sam_fast": lambda: sam_fast.int8_linear(x, wq, ws, b),
        "sam_fast_gemm_only": lambda: sam_fast.int8_linear(xq, wq, ws, b, act_scale=xs, out_dtype=x.dtype),
        "sam_fast(cpu)": lambda: sam_fast.int8_linear(x, wq, ws, b, backend="cpu"),
    }
    return _case_name(model, M, K, N), M, (x, w, b, wq, ws), {name: make[name] for name in names}


def _interleaved_cpu(peers, rounds: int = 15):
    """{peer: measure()-style stats} on the CPU: one call of each peer per round (a shared machine's slow
    spells hit every peer alike), medians of the rounds."""
    from sam_fast.bench.bench_cpu_blocks import _stats, interleaved

    return {name: _stats(ms) for name, ms in interleaved(peers, rounds).items()}


def run(out_dir: str, quick: bool = False, device: str = None, targets: bool = False):
    import sam_fast

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    prov = provenance(dev)
    gpu = dev.type == "cuda"
    names = peer_names(gpu, targets)
    compiled = None
    if "int_mm+compile" in names:
        raise_recompile_limit()  # one specialised graph per shape (24 shapes)
        compiled = torch.compile(int_mm_separate, dynamic=False)
    rows = LiveRows(out_dir, SCRIPT, ["sqnr_db"])
    g = torch.Generator(device=dev).manual_seed(0)
    for B, model, K, N in cases(gpu, quick, targets):
        case, M, (x, w, b, wq, ws), peers = workload(B, model, K, N, dev, g, names, compiled)
        ref = F.linear(x.float(), w, b)
        timed = {name: measure(fn, dev) for name, fn in peers.items()} if gpu else _interleaved_cpu(peers)
        for name, fn in peers.items():
            m = timed[name]
            tops, sqnr = 2 * M * N * K / (m["median_ms"] * 1e-3) / 1e12, _sqnr(ref, fn())
            note = f"{tops:.0f} TOPS, SQNR {sqnr:.1f} dB" if gpu else f"SQNR {sqnr:.1f} dB"
            rows.append(dict(prov, op="int8_linear", case=case, backend=name, mode="fwd", metric="tops",
                             value=tops, sqnr_db=sqnr, note=note, **m))
        if not gpu and B == cases(gpu, quick)[0][0]:  # the Triton kernels once per (K, N), for correctness only
            y = sam_fast.int8_linear(x[:64], wq, ws, b, backend="triton")
            y_ref = sam_fast.int8_linear(x[:64], wq, ws, b, backend="reference")
            rows.append(dict(prov, op="int8_linear", case=case, backend="sam_fast(triton-interp)", mode="fwd",
                             max_err=float((y - y_ref).abs().max()), sqnr_db=_sqnr(ref[:64], y),
                             note="interpreter: correctness only, not timed"))
    return save_results(out_dir, SCRIPT, rows, BASELINE, f"W8A8 linear vs {BASELINE} ({prov['device']})",
                        ["sqnr_db"])


def main(argv=None):
    return bench_main(__doc__, run, BASELINE, argv)


if __name__ == "__main__":
    sys.exit(main())
