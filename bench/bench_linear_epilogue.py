"""Benchmark: sam_fast::linear_epilogue_ (C++) vs its reference, PyTorch's bias add, GELU and residual add; and the
whole float32 linear as the fused block paths run it (``fused_linear``).

What follows a bias-free GEMM in a SAM block on the 64 x 64 grid: ViT-B's MLP hidden layer (4096 x 3072, bias and
exact GELU) and its output projection (4096 x 768, bias and the residual). The op works in place, so its time
includes copying the GEMM output into its buffer first (one pass more than it costs in a block).

``fused_linear`` cases time the whole layer at ViT-B's shapes (qkv over 25 padded 14 x 14 windows, the MLP's two
linears): PyTorch as written (``reference``: addmm, then GELU / the residual add), ``fused_linear`` as the CPU policy
has it (``sam_fast(cpu)``: oneDNN's GEMM with post-ops where ``fp32_gemm_onednn``), and with that field off
(ATen's GEMM, then the C++ epilogue). These rows are what ``fp32_gemm_onednn`` rests on.

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
    yield from linear_cases(quick)


#: (case, rows, in, out, activation, residual): ViT-B's float32 linears on SAM's 64 x 64 grid
LINEAR_CASES = (("fused_linear: vit_b qkv 4900 x 768 -> 2304", 4900, 768, 2304, "none", False),
                ("fused_linear: vit_b mlp lin1 4096 x 768 -> 3072, gelu", 4096, 768, 3072, "gelu", False),
                ("fused_linear: vit_b mlp lin2 4096 x 3072 -> 768, residual", 4096, 3072, 768, "none", True))


def linear_cases(quick: bool):
    import torch.nn.functional as F

    from sam_fast import cpu_policy
    from sam_fast.ops.linear_epilogue import fused_linear

    def fused(lin, x, act, res, onednn):
        with torch.no_grad(), cpu_policy.use(fp32_gemm_onednn=onednn, epilogue_min_bytes=0):
            return fused_linear(lin, x, act, res)

    for case, M, K, N, act, with_res in LINEAR_CASES[2:] if quick else LINEAR_CASES:
        gen = torch.Generator().manual_seed(0)
        lin = torch.nn.Linear(K, N)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(N, K, generator=gen) / K ** 0.5)
        x = torch.randn(M, K, generator=gen)
        res = torch.randn(M, N, generator=gen) if with_res else None

        def reference(lin=lin, x=x, act=act, res=res):
            with torch.no_grad():
                y = lin(x)
                y = F.gelu(y) if act == "gelu" else y
                return y if res is None else y + res

        def exact(lin=lin, x=x, act=act, res=res):
            y = F.linear(x.double(), lin.weight.double(), lin.bias.double())
            y = F.gelu(y) if act == "gelu" else y
            return y if res is None else y + res.double()

        peers = {"reference": reference,
                 "sam_fast(cpu)": lambda lin=lin, x=x, a=act, r=res: fused(lin, x, a, r, True),
                 "sam_fast(cpu, fp32_gemm_onednn off)": lambda lin=lin, x=x, a=act, r=res: fused(lin, x, a, r, False)}
        yield case, peers, exact, (M * K + K * N + M * N * (2 if with_res else 1)) * 4 / 1e9


def run(out_dir: str, quick: bool = False):
    return cpu_op_bench(SCRIPT, "linear_epilogue_", cases(quick), out_dir, quick,
                        "linear_epilogue_ and fused_linear (CPU)")


def main(argv=None):
    return bench_main(__doc__, run, "reference", argv)


if __name__ == "__main__":
    sys.exit(main())
