"""Tune the int8 GEMM's block shapes on this GPU for SAM's linear shapes; write the checked-in table.

For every ViT-B / ViT-H linear (K, N) and M in {4096, 32768, 131072} (1, 8, 32 images of 64x64 tokens)
each configuration of a small pruned grid is timed with ``triton.testing.do_bench`` (bf16 output, bias,
per-token scales) and the fastest is stored under this GPU's architecture (e.g. ``sm_90``) in
``kernels/tuned/int8_gemm.json``. The file is reviewed and committed like code; nothing is written into
an installed package at run time.

    python bench/tune_int8_gemm.py [--table kernels/tuned/int8_gemm.json] [--quick]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import torch

SHAPES = [(768, 2304), (768, 768), (768, 3072), (3072, 768), (1280, 3840), (1280, 1280), (1280, 5120), (5120, 1280)]
M_VALUES = (4096, 32768, 131072)


def candidates():
    """Pruned grid: tiles of 128 x 128 .. 128 x 256 / 256 x 128 with 64- or 128-byte K steps."""
    for bm, bn, bk, warps, stages in itertools.product((64, 128, 256), (64, 128, 256), (64, 128), (4, 8), (3, 4, 5)):
        if bm * bn < 128 * 64 or bm * bn > 256 * 128:  # too small to feed the tensor cores / too many registers
            continue
        if warps == 4 and bm * bn > 128 * 128:
            continue
        if bk == 128 and stages == 5 and bm * bn > 128 * 128:  # shared memory
            continue
        yield dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=warps, num_stages=stages)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--table", default=os.path.join(os.path.dirname(__file__), "..", "kernels", "tuned", "int8_gemm.json"))
    p.add_argument("--quick", action="store_true", help="M = 4096 only")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("tune_int8_gemm: needs a CUDA GPU (the table is per GPU architecture)", file=sys.stderr)
        return 2
    import triton.testing
    from tqdm import tqdm

    from sam_fast.kernels import int8_gemm as K

    arch = K.device_arch(torch.device("cuda"))
    with open(args.table) as f:
        doc = json.load(f)
    entries = {(e["m"], e["n"], e["k"]): e for e in doc["configs"].get(arch, [])}
    cands = list(candidates())
    todo = [(m, k, n) for m in (M_VALUES[:1] if args.quick else M_VALUES) for k, n in SHAPES]
    for m, k, n in tqdm(todo, desc=f"tuning int8 GEMM ({arch})"):
        a = torch.randint(-127, 128, (m, k), device="cuda", dtype=torch.int8)
        w = torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8)
        sa, sw = torch.rand(m, device="cuda"), torch.rand(n, device="cuda")
        bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
        best = None
        for cfg in cands:
            try:
                ms = triton.testing.do_bench(lambda: K.int8_gemm(a, sa, w, sw, bias, None, torch.bfloat16, None, cfg),
                                             warmup=10, rep=40)
            except Exception as exc:  # out of shared memory / registers for this GPU: not a candidate here
                tqdm.write(f"  skip {cfg}: {type(exc).__name__}")
                continue
            if best is None or ms < best[0]:
                best = (ms, cfg)
        tops = 2 * m * n * k / (best[0] * 1e-3) / 1e12
        tqdm.write(f"M={m} {k}->{n}: {best[0]:.3f} ms, {tops:.0f} TOPS with {best[1]}")
        entries[(K._m_bucket(m), n, k)] = {"m": K._m_bucket(m), "n": n, "k": k, "config": best[1],
                                           "ms": round(best[0], 4), "tops": round(tops, 1)}
        _write(args.table, doc, arch, entries)  # after every shape: a run cut short keeps what it measured
    print(f"wrote {len(entries)} entries for {arch} to {os.path.abspath(args.table)}")
    return 0


def _write(path, doc, arch, entries):
    doc["configs"][arch] = sorted(entries.values(), key=lambda e: (e["k"], e["n"], e["m"]))
    doc.setdefault("devices", {})[arch] = torch.cuda.get_device_name()
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
