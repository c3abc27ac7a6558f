"""The ``sam-fast`` command.

    sam-fast bench [--ops attention,dilated,relpos,int8,e2e] [--out DIR] [--quick]

runs the op benchmarks this machine can run against their references and peers, prints a table
(op, case, backend, median time, speedup over the bench's baseline, max error), appends results with
provenance to ``DIR/<script>.csv`` and draws ``DIR/<script>.png``. On a CPU-only machine CPU backends
are timed and the Triton kernels are checked for correctness under the interpreter (not timed).
"""

from __future__ import annotations

import argparse
import os
import sys

BENCHES = {"attention": "bench_attention", "dilated": "bench_dilated_attention", "relpos": "bench_relpos",
           "int8": "bench_int8_gemm", "e2e": "bench_e2e"}


def _bench(args) -> int:
    import torch

    gpu = torch.cuda.is_available()
    if not gpu:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before sam_fast's kernels are decorated
    import importlib

    from tqdm import tqdm

    from sam_fast.bench.harness import table

    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    unknown = [o for o in ops if o not in BENCHES]
    if unknown:
        print(f"sam-fast bench: unknown op(s) {unknown}; choose from {sorted(BENCHES)}", file=sys.stderr)
        return 2
    if not gpu:
        print("No CUDA GPU: timing CPU backends on small shapes; Triton kernels are checked under the "
              "interpreter, not timed. GPU figures need a CUDA machine.\n")
    tables, plots = [], []
    for op in tqdm(ops, desc="benchmarks", unit="op", disable=not sys.stderr.isatty()):
        mod = importlib.import_module(f"sam_fast.bench.{BENCHES[op]}")
        rows, png = mod.run(args.out, quick=args.quick)
        tables.append(f"{op}: speedup over {mod.BASELINE}\n" + table(rows, mod.BASELINE))
        if png:
            plots.append(png)
    print("\n\n".join(tables))
    print(f"\nresults appended to {os.path.abspath(args.out)}/<script>.csv")
    for p in plots:
        print(f"plot: {p}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="sam-fast", description="Fast kernels for Segment Anything.")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="benchmark the ops against their references and peers")
    b.add_argument("--ops", default=",".join(BENCHES), help=f"comma-separated subset of {sorted(BENCHES)}")
    b.add_argument("--out", default="sam_fast_results", help="results directory (default: ./sam_fast_results)")
    b.add_argument("--quick", action="store_true", help="fewer cases (batch 1 only on GPU)")
    args = parser.parse_args(argv)
    if args.command == "bench":
        return _bench(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
