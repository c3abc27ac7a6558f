"""Benchmark: sam_fast::rel_pos_attention (C++) vs its reference, attention with the bias materialised.

Segments of the CPU dilated-attention path with SAM's decomposed rel-pos bias: ViT-B's 25 windows of 14 x 14 (12
heads of 64) and one 2-D dilated branch's 16 x 16 segments (dilation 2 on the 64 x 64 grid: 16 segments).

    python bench/bench_rel_pos_attention.py [--out bench/results] [--quick]
"""

from __future__ import annotations

import sys

import torch

from sam_fast.bench.harness import bench_main, cpu_op_bench

SCRIPT = "bench_rel_pos_attention"
CASES = (("25 windows 14 x 14, 12 x 64", 25, 12, 14, 14, 64), ("16 segments 16 x 16, 12 x 64", 16, 12, 16, 16, 64))


def cases(quick: bool):
    from sam_fast.ops.rel_pos_attention import rel_pos_attention
    from sam_fast.reference.rel_pos_attention import rel_pos_attention as reference

    for case, S, H, ay, ax, D in CASES[:1] if quick else CASES:
        gen = torch.Generator().manual_seed(0)
        L = ay * ax
        q, k, v = (torch.randn(S, H, L, D, generator=gen) for _ in range(3))
        rh, rw = torch.randn(S, H, L, ay, generator=gen), torch.randn(S, H, L, ax, generator=gen)
        args = (q, k, v, rh, rw, D ** -0.5)
        peers = {"reference": lambda a=args: reference(*a),
                 "sam_fast(cpu)": lambda a=args: rel_pos_attention(*a, backend="cpu")}
        yield case, peers, lambda a=args: reference(*(t.double() for t in a[:5]), a[5])[0], 4 * S * H * L * D * 4 / 1e9


def run(out_dir: str, quick: bool = False):
    return cpu_op_bench(SCRIPT, "rel_pos_attention", cases(quick), out_dir, quick, "rel_pos_attention (CPU)")


def main(argv=None):
    return bench_main(__doc__, run, "reference", argv)


if __name__ == "__main__":
    sys.exit(main())
