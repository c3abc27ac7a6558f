"""Benchmark: sam_fast::decomposed_bias (C++) vs its reference, PyTorch's broadcasting add.

The CPU attention paths write SAM's decomposed rel-pos bias out in full for PyTorch's fused kernel; the cases are a
chunk of SAM's 14 x 14 window bias (ViT-B, 12 heads) and of a global block's 64-wide rows.

    python bench/bench_decomposed_bias.py [--out bench/results] [--quick]
"""

from __future__ import annotations

import sys

import torch

from sam_fast.bench.harness import bench_main, cpu_op_bench

SCRIPT = "bench_decomposed_bias"
CASES = (("windows 16 x 12 heads, 14 x 14", (16, 12, 196), 14, 14), ("global rows 12 heads, 64 x 64", (12, 64), 64, 64))


def cases(quick: bool):
    from sam_fast.ops.decomposed_bias import decomposed_bias
    from sam_fast.reference.decomposed_bias import decomposed_bias as reference

    for case, lead, ay, ax in CASES[:1] if quick else CASES:
        gen = torch.Generator().manual_seed(0)
        rh, rw = torch.randn(*lead, ay, generator=gen), torch.randn(*lead, ax, generator=gen)
        out = rh.new_empty(*lead, ay * ax)
        peers = {"reference": lambda rh=rh, rw=rw: reference(rh, rw),
                 "sam_fast(cpu)": lambda rh=rh, rw=rw, out=out: decomposed_bias(rh, rw, out, backend="cpu")}
        yield case, peers, lambda rh=rh, rw=rw: reference(rh.double(), rw.double()), out.numel() * 4 / 1e9


def run(out_dir: str, quick: bool = False):
    return cpu_op_bench(SCRIPT, "decomposed_bias", cases(quick), out_dir, quick, "decomposed_bias (CPU)")


def main(argv=None):
    return bench_main(__doc__, run, "reference", argv)


if __name__ == "__main__":
    sys.exit(main())
