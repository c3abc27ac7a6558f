"""Benchmark: sam_fast::sam_block_attention (C++) vs its reference, segment_anything's partition and SDPA with the
bias as its mask.

SAM's block attention read from the qkv tensor on the 64 x 64 grid of a 1024 px image: ViT-B (12 heads of 64) and
SlimSAM-77 (12 heads of 14), a window-14 block (the grid padded to 70 x 70) and a global block. Whole blocks, with
segment_anything's own as the baseline and compiled peers, are bench_cpu_blocks.py.

    python bench/bench_sam_block_attention.py [--out bench/results] [--quick]
"""

from __future__ import annotations

import sys

import torch

from sam_fast.bench.harness import bench_main, cpu_op_bench

SCRIPT = "bench_sam_block_attention"
CASES = (("slimsam77 window 14", 12, 14, 14), ("vit_b window 14", 12, 64, 14), ("vit_b global", 12, 64, 0))


def cases(quick: bool):
    from sam_fast.ops.sam_block_attention import sam_block_attention
    from sam_fast.reference.sam_block_attention import sam_block_attention as reference

    for case, heads, D, window in CASES[:1] if quick else CASES:
        gen = torch.Generator().manual_seed(0)
        seg = window or 64
        qkv = torch.randn(1, 64, 64, 3 * heads * D, generator=gen)
        th, tw = (torch.randn(2 * seg - 1, D, generator=gen) * 0.2 for _ in range(2))
        bias = torch.randn(3 * heads * D, generator=gen)
        pad = tuple(bias.view(3, heads, D)[1:])
        args = (qkv, heads, window, th, tw)
        peers = {"reference": lambda a=args, p=pad: reference(*a, None, *p, D ** -0.5),
                 "sam_fast(cpu)": lambda a=args, p=pad: sam_block_attention(*a, p, D ** -0.5, backend="cpu")}

        def exact(a=args, p=pad):
            return reference(a[0].double(), *a[1:3], *(t.double() for t in a[3:]), None,
                             *(t.double() for t in p), D ** -0.5)

        yield case, peers, exact, 4 * qkv.numel() / 3 * 4 / 1e9


def run(out_dir: str, quick: bool = False):
    return cpu_op_bench(SCRIPT, "sam_block_attention", cases(quick), out_dir, quick, "sam_block_attention (CPU)")


def main(argv=None):
    return bench_main(__doc__, run, "reference", argv)


if __name__ == "__main__":
    sys.exit(main())
