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


def run(out_dir: str, quick: bool = False, device: str = None):
    import sam_fast
    from sam_fast.ops.resize_rel_pos import resize_rel_pos_reference

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    prov = provenance(dev)
    rows = []
    for L, length in ((27, 127), (127, 191)):
        t = torch.randn(L, 80, device=dev)
        ref = resize_rel_pos_reference(t.double(), length)
        for name, fn in ((BASELINE, lambda: resize_rel_pos_reference(t, length)),
                         (f"sam_fast({dev.type})", lambda: sam_fast.resize_rel_pos(t, length, backend=dev.type))):
            m = measure(fn, dev, cpu_reps=50)
            rows.append(dict(prov, op="resize_rel_pos", case=f"{L}->{length} x80", backend=name, mode="fwd",
                             metric="gbps", value=(L + length) * 80 * 4 / (m["median_ms"] * 1e-3) / 1e9,
                             max_err=float((fn().double() - ref).abs().max()), **m))
    append_csv(os.path.join(out_dir, f"{SCRIPT}.csv"), rows)
    return rows, None


def main(argv=None):
    return bench_main(__doc__, run, BASELINE, argv)


if __name__ == "__main__":
    sys.exit(main())
