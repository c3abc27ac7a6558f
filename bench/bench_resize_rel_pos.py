"""Benchmark: sam_fast::resize_rel_pos (C++/CUDA) vs segment_anything's F.interpolate resize.

SAM resizes a rel-pos table whenever the image size differs from the one it was trained at; the cases
are ViT-H head dim 80 tables going 27 -> 127 rows (window table used globally) and 127 -> 191 rows
(1024 px -> 1536 px input).

    python bench/bench_resize_rel_pos.py [--out bench/results]
"""

from __future__ import annotations

import os
import sys

import torch

from sam_fast.bench.harness import append_csv, bench_main, measure, provenance

SCRIPT = "bench_resize_rel_pos"
BASELINE = "segment_anything"


CASES = ((27, 127), (127, 191))  # (table length, resized length): ViT-B/H window tables to the global grid


def workload(L, length, dev):
    """One case: (case name, table, {peer: callable}) - the definition this script times and
    tools/test_microbench.py benchmarks."""
    import sam_fast
    from sam_fast.reference.resize_rel_pos import resize_rel_pos as resize_rel_pos_reference

    t = torch.randn(L, 80, device=dev)
    return f"{L}->{length} x80", t, {
        BASELINE: lambda: resize_rel_pos_reference(t, length),
        f"sam_fast({dev.type})": lambda: sam_fast.resize_rel_pos(t, length, backend=dev.type)}


def run(out_dir: str, quick: bool = False, device: str = None):
    from sam_fast.reference.resize_rel_pos import resize_rel_pos as resize_rel_pos_reference

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    prov = provenance(dev)
    rows = []
    for L, length in CASES:
        case, t, peers = workload(L, length, dev)
        ref = resize_rel_pos_reference(t.double(), length)
        for name, fn in peers.items():
            m = measure(fn, dev, cpu_reps=50)
            rows.append(dict(prov, op="resize_rel_pos", case=case, backend=name, mode="fwd",
                             metric="gbps", value=(L + length) * 80 * 4 / (m["median_ms"] * 1e-3) / 1e9,
                             max_err=float((fn().double() - ref).abs().max()), **m))
    append_csv(os.path.join(out_dir, f"{SCRIPT}.csv"), rows)
    return rows, None


def main(argv=None):
    return bench_main(__doc__, run, BASELINE, argv)


if __name__ == "__main__":
    sys.exit(main())
