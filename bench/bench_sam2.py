"""Benchmark: SAM 2.1's image encoders on the CPU - sam_fast vs Meta's sam2 as shipped, and its torch.compile.

The whole image encoder (Hiera trunk and FPN neck, as Meta's ``sam2`` package builds it from SAM 2.1's released
configurations; random weights: :func:`sam_fast.models.sam2.build_sam2_image_encoder`) on one 1024 px image, in each
dtype: float32, and bfloat16 where the CPU has bf16 matmul instructions (AVX512-BF16 or AMX). Peers in the same run:

* ``sam2`` - Meta's encoder as shipped (the baseline);
* ``sam2_compiled`` - ``torch.compile`` of it (left out with ``--quick`` or ``--no-compile``: compiling a Hiera takes
  minutes on a small CPU);
* ``sam_fast(cpu)`` - the encoder after ``sam_fast.apply`` (its Hiera blocks in their fast form: the C++ attention
  kernel pooling queries in place, the linears' epilogues fused).

The peers are interleaved (one call of each per round, the median of 5 rounds, 3 with ``--quick``), at the machine's
thread count. ``max_err`` is the largest difference of the lowest-resolution features (``vision_features``) from
Meta's float32 encoder, relative to their largest magnitude. Needs ``pip install sam_fast[sam2]``.

    python bench/bench_sam2.py [--out bench/results] [--quick] [--no-compile] [--models hiera_t,hiera_b+] [--size 1024]
"""

from __future__ import annotations

import copy
import sys

import torch

from sam_fast.bench.bench_cpu_blocks import _stats, fast_bf16, interleaved
from sam_fast.bench.harness import bench_main, progress, provenance, save_results

SCRIPT = "bench_sam2"
BASELINE = "sam2"
MODELS = ("hiera_t", "hiera_s", "hiera_b+", "hiera_l")


def _features(out) -> torch.Tensor:
    return out["vision_features"]


def run(out_dir: str, quick: bool = False, device: str = None, no_compile: bool = False, models: str = "",
        size="1024"):
    import sam_fast
    from sam_fast.models.sam2 import build_sam2_image_encoder

    if device not in (None, "cpu"):
        raise ValueError(f"device: this benchmark times the CPU path, got {device!r}")
    names = [m.strip() for m in models.split(",") if m.strip()] if models else list(MODELS[:1] if quick else MODELS)
    unknown = sorted(set(names) - set(MODELS))
    if unknown:
        raise ValueError(f"--models: {unknown} are not among {list(MODELS)}")
    size = int(size or 1024)
    if size <= 0 or size % 32:
        raise ValueError(f"--size must be a positive multiple of 32 (Hiera's coarsest stride), got {size}")
    prov = provenance(torch.device("cpu"))
    dtypes = [torch.float32] + ([torch.bfloat16] if fast_bf16() else [])
    rounds = 3 if quick else 5
    threads = torch.get_num_threads()
    rows = []
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    for name, dtype in progress([(n, d) for n in names for d in dtypes], "sam2 encoders",
                                lambda c: f"{c[0]} {str(c[1])[6:]}"):
        base = build_sam2_image_encoder(name)
        with torch.no_grad():
            ref = _features(base(x))
        ours = copy.deepcopy(base).to(dtype)
        sam_fast.apply(ours, sam_fast.SamFastConfig())
        peers = {BASELINE: base.to(dtype)}
        if not (quick or no_compile):
            peers["sam2_compiled"] = torch.compile(copy.deepcopy(peers[BASELINE]), dynamic=False)
        peers["sam_fast(cpu)"] = ours
        xd = x.to(dtype)
        fns, errs = {}, {}
        for peer, mod in peers.items():
            def call(mod=mod):
                with torch.no_grad():
                    return mod(xd)
            try:
                got = _features(call())  # (the compiled peer compiles here)
                errs[peer] = float((got.double() - ref.double()).abs().max() / ref.abs().max())
                fns[peer] = call
            except Exception as exc:  # a peer that cannot run this case (e.g. a compile failure) says so
                rows.append(dict(prov, op="sam2_encoder", case=f"{name} {str(dtype)[6:]}", backend=peer, mode="fwd",
                                 median_ms="", metric="img_per_s", value="",
                                 note=f"failed: {type(exc).__name__}: {str(exc)[:120]}"))
        times = interleaved(fns, rounds, warmup=False)  # (each peer ran once above: its warm-up)
        for peer, ms in times.items():
            st = _stats(ms)
            rows.append(dict(prov, op="sam2_encoder", case=f"{name} {size}px {str(dtype)[6:]}", backend=peer,
                             mode="fwd", metric="img_per_s", value=1e3 / st["median_ms"], max_err=errs[peer],
                             note=f"{threads} thread(s), {rounds} interleaved rounds", **st))
    return save_results(out_dir, SCRIPT, rows, BASELINE, "SAM 2.1 image encoders on the CPU (B=1)")


def main(argv=None):
    return bench_main(__doc__, run, BASELINE, argv, options=(
        ("--no-compile", "store_true", "leave out the torch.compile peer (it takes minutes per model)"),
        ("--models", "store", f"comma-separated encoders among {', '.join(MODELS)} (default: all; --quick: the "
                              "first)"),
        ("--size", "store", "image side in pixels (default 1024, SAM 2's)")))


if __name__ == "__main__":
    sys.exit(main())
