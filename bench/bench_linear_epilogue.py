"""Benchmark: sam_fast::linear_epilogue_ (C++) vs its reference, PyTorch's bias add, GELU and residual add.

What follows a bias-free GEMM in a SAM block on the 64 x 64 grid: ViT-B's MLP hidden layer (4096 x 3072, bias and
exact GELU) and its output projection (4096 x 768, bias and the residual). The op works in place, so its time
includes copying the GEMM output into its buffer first (one pass more than it costs in a block).

    python bench/bench_linear_epilogue.py [--out bench/results] [--quick]
"""

from __future__ import annotations

import sys

import torch

from sam_fast.bench.harness import bench_main, cpu_op_bench

SCRIPT = "bench_linear_epilogue"
CASES = (("vit_b mlp lin1 4096 x 3072, gelu", 4096, 3072, "gelu", False),
         ("vit_b proj 4096 x 768, residual", 4096, 768, "none", True))


def cases(quick: bool):
    from sam_fast.ops.linear_epilogue import linear_epilogue_
    from sam_fast.reference.linear_epilogue import linear_epilogue as reference

    for case, M, N, act, with_res in CASES[1:] if quick else CASES:
        gen = torch.Generator().manual_seed(0)
        y = torch.randn(M, N, generator=gen)
        bias = torch.randn(N, generator=gen)
        res = torch.randn(M, N, generator=gen) if with_res else None
        work = y.clone()
        peers = {"reference": lambda y=y, b=bias, a=act, r=res: reference(y, b, a, r),
                 "sam_fast(cpu)": lambda w=work, y=y, b=bias, a=act, r=res: linear_epilogue_(w.copy_(y), b, a, r,
                                                                                             backend="cpu")}

        def exact(y=y, b=bias, a=act, r=res):
            return reference(y.double(), b.double(), a, None if r is None else r.double())

        yield case, peers, exact, M * N * 4 * (3 if with_res else 2) / 1e9


def run(out_dir: str, quick: bool = False):
    return cpu_op_bench(SCRIPT, "linear_epilogue_", cases(quick), out_dir, quick, "linear_epilogue_ (CPU)")


def main(argv=None):
    return bench_main(__doc__, run, "reference", argv)


if __name__ == "__main__":
    sys.exit(main())
