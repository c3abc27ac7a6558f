"""Benchmark: sam_fast's Hiera attention (SAM 2's image encoder) vs SAM 2's own way, partition + pool + SDPA.

The attention of one Hiera block, read from its qkv tensor, at SAM 2.1's real grids for a 1024 px image: Hiera-T's
stages (windows 8 and 4 with the stage changes pooling their queries, window 14 on the padded 64 x 64 grid, a global
block, window 7 on the padded 32 x 32 grid; head dim 96) and Hiera-L's window-16 stage (head dim 72). Peers:

* ``reference`` - SAM 2's partition into padded windows, the query max-pool and PyTorch's SDPA (its fused kernels:
  flash attention on a GPU), then the unpartition (the baseline);
* ``sam_fast(triton)`` on a GPU (bf16): one launch for every window, queries pooled as they are loaded;
* ``sam_fast(cpu)`` on the CPU (float32): the C++ kernel reading the windows in place.

``max_err`` is against the float64 reference; ``value`` is GB/s over qkv read once and the output written once.

    python bench/bench_hiera_attention.py [--out bench/results] [--quick]
"""

from __future__ import annotations

import sys

import torch

from sam_fast.bench.harness import bench_main, measure, progress, provenance, save_results

SCRIPT = "bench_hiera_attention"
BASELINE = "reference"
# (name, grid side, heads, head dim, window (0: global), query stride); the first is the quick case
CASES = (("hiera_t stage 4 window 7", 32, 8, 96, 7, 1), ("hiera_t stage 1 window 8", 256, 1, 96, 8, 1),
         ("hiera_t stage 2 first block (pooled)", 256, 2, 96, 8, 2), ("hiera_t stage 2 window 4", 128, 2, 96, 4, 1),
         ("hiera_t stage 3 window 14", 64, 4, 96, 14, 1), ("hiera_t global", 64, 4, 96, 0, 1),
         ("hiera_l stage 3 window 16", 64, 8, 72, 16, 1))


def run(out_dir: str, quick: bool = False, device: str = None):
    from sam_fast.ops.hiera_attention import hiera_attention

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = dev.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    ours = "sam_fast(triton)" if gpu else "sam_fast(cpu)"
    prov = provenance(dev)
    rows = []
    for name, grid, heads, D, window, stride in progress(CASES[:1] if quick else CASES, "hiera attention",
                                                         lambda c: c[0]):
        gen = torch.Generator().manual_seed(0)
        qkv = torch.randn(1, grid, grid, 3 * heads * D, generator=gen).to(device=dev, dtype=dtype)
        pad = tuple(torch.randn(heads, D, generator=gen).to(device=dev, dtype=dtype) for _ in range(2))
        want = hiera_attention(qkv.double(), heads, window, stride, tuple(p.double() for p in pad), backend="reference")
        gbytes = (qkv.numel() + want.numel()) * qkv.element_size() / 1e9
        peers = {BASELINE: lambda: hiera_attention(qkv, heads, window, stride, pad, backend="reference"),
                 ours: lambda: hiera_attention(qkv, heads, window, stride, pad, backend="triton" if gpu else "cpu")}
        for peer, fn in peers.items():
            with torch.no_grad():
                m = measure(fn, dev, cpu_reps=3 if quick else 10)
                err = float((fn().double() - want).abs().max())
            rows.append(dict(prov, op="hiera_attention", case=f"{name} {str(dtype)[6:]}", backend=peer, mode="fwd",
                             metric="gbps", value=gbytes / (m["median_ms"] * 1e-3), max_err=err, **m))
    return save_results(out_dir, SCRIPT, rows, BASELINE, f"Hiera attention ({'GPU' if gpu else 'CPU'})")


def main(argv=None):
    return bench_main(__doc__, run, BASELINE, argv)


if __name__ == "__main__":
    sys.exit(main())
