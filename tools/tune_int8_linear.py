"""Tune the int8 GEMM's block shapes on this GPU for SAM's linear shapes; write the checked-in table.

For every ViT-B / ViT-H linear (K, N) and M in {4096, 32768, 131072} (1, 8, 32 images of 64x64 tokens)
each configuration of a small pruned grid is timed with ``triton.testing.do_bench`` (bf16 output, bias,
per-token scales) and the fastest is stored under this GPU's architecture (e.g. ``sm_90``) in
``kernels/tuned/int8_linear.json``. The file is reviewed and committed like code; nothing is written into
an installed package at run time.

    python -m tools.tune_int8_linear [--table kernels/tuned/int8_linear.json] [--quick]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from typing import Callable, Iterable, Optional

import torch

from tools.tune_dilated_attention import Disagreement, fastest, write_table

SHAPES = [(768, 2304), (768, 768), (768, 3072), (3072, 768), (1280, 3840), (1280, 1280), (1280, 5120), (5120, 1280)]
M_VALUES = (4096, 32768, 131072)


def work_order(quick: bool = False) -> list:
    """(M, K, N) to tune, the int8 performance targets' shapes first so a run cut short by the GPU's time limit
    has tuned
    what the targets measure: the ViT-H MLP linears at B = 8 (M = 32768), then at the largest M, then the
    other ViT-H linears, then ViT-B's; smaller M before larger within each."""
    todo = [(m, k, n) for m in (M_VALUES[:1] if quick else M_VALUES) for k, n in SHAPES]

    def rank(shape):
        m, k, n = shape
        mlp_h = (k, n) in ((1280, 5120), (5120, 1280))
        return (not (mlp_h and m == 32768), not (mlp_h and m == max(M_VALUES)), 1280 not in (k, n), m, k, n)

    return sorted(todo, key=rank)


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


def tune_shape(m: int, k: int, n: int, device, bench: Callable[[Callable], float], log=print,
               cands: Optional[Iterable[dict]] = None) -> Optional[dict]:
    """Time every candidate on one GEMM shape; returns the table entry of the fastest (None when nothing
    ran). Each candidate must reproduce the heuristic configuration's int32 accumulator exactly and its bf16
    output to rounding, or the run stops (:class:`Disagreement`): a wrong kernel must not win on speed.
    ``bench(fn) -> ms`` times a callable (``triton.testing.do_bench`` on a GPU)."""
    from sam_fast.kernels import int8_linear as K

    g = torch.Generator(device=device).manual_seed(m + k + n)
    a = torch.randint(-127, 128, (m, k), device=device, dtype=torch.int8, generator=g)
    w = torch.randint(-127, 128, (n, k), device=device, dtype=torch.int8, generator=g)
    sa = torch.rand(m, device=device, generator=g) * 1e-3
    sw = torch.rand(n, device=device, generator=g) * 1e-3
    bias = torch.randn(n, device=device, generator=g).to(torch.bfloat16)

    def timed(cfg):
        return lambda: K.int8_gemm(a, sa, w, sw, bias, None, torch.bfloat16, None, cfg)

    want_acc = K.int8_gemm(a, sa, w, sw, out_dtype=torch.int32)  # the heuristic configuration
    want = timed(None)()

    def trial(cfg):
        acc = K.int8_gemm(a, sa, w, sw, out_dtype=torch.int32, config=cfg)
        if not torch.equal(acc, want_acc):
            raise Disagreement(f"M={m} {k}->{n} with {cfg}: the int32 accumulator differs from the heuristic "
                               f"configuration's in {int((acc != want_acc).sum())} places")
        if not torch.allclose(timed(cfg)().float(), want.float(), rtol=2**-7, atol=0):
            raise Disagreement(f"M={m} {k}->{n} with {cfg}: the bf16 output differs from the heuristic "
                               "configuration's by more than one rounding")
        return bench(timed(cfg))

    best = fastest(candidates() if cands is None else cands, trial, log)
    if best is None:
        return None
    base_ms = bench(timed(None))
    tops = 2 * m * n * k / (best[0] * 1e-3) / 1e12
    return {"m": K._m_bucket(m), "n": n, "k": k, "config": best[1], "ms": round(best[0], 4),
            "heuristic_ms": round(base_ms, 4), "tops": round(tops, 1)}


def _entry_key(e: dict) -> str:
    """Sorts the table by K, N, then M."""
    return f"{e['k']:06d} {e['n']:06d} {e['m']:07d}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--table",
                   default=os.path.join(os.path.dirname(__file__), "..", "kernels", "tuned", "int8_linear.json"))
    p.add_argument("--quick", action="store_true", help="M = 4096 only")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("tune_int8_linear: needs a CUDA GPU (the table is per GPU architecture)", file=sys.stderr)
        return 2
    import triton.testing
    from tqdm import tqdm

    from sam_fast.kernels import int8_linear as K

    device = torch.device("cuda")
    arch = K.device_arch(device)
    with open(args.table) as f:
        doc = json.load(f)
    entries = {_entry_key(e): e for e in doc.get("configs", {}).get(arch, [])}
    cands = list(candidates())
    todo = work_order(args.quick)

    def bench(fn):
        return triton.testing.do_bench(fn, warmup=10, rep=40)

    for m, k, n in tqdm(todo, desc=f"tuning int8 GEMM ({arch})"):
        entry = tune_shape(m, k, n, device, bench, log=tqdm.write, cands=cands)
        if entry is None:
            tqdm.write(f"M={m} {k}->{n}: no candidate ran")
            continue
        tqdm.write(f"M={m} {k}->{n}: {entry['ms']:.3f} ms, {entry['tops']:.0f} TOPS (heuristic "
                   f"{entry['heuristic_ms']:.3f} ms) with {entry['config']}")
        entries[_entry_key(entry)] = entry
        write_table(args.table, doc, arch, entries, torch.cuda.get_device_name())  # a cut-short run keeps these
    print(f"wrote {len(entries)} entries for {arch} to {os.path.abspath(args.table)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
