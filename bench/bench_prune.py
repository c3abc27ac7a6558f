"""Benchmark: ``sam_fast.compress.prune`` on the CPU - each stage's wall time, and what each importance keeps.

A user prunes on their own machine, so this runs on the CPU, on a tiny SAM (tiny_sam: 256 px, width 64, 4 blocks)
and scikit-image's photos (8 to score and recover on, 6 others held out for the report). Per importance
(``disturbed_taylor`` - 4 noise draws per image - and ``magnitude``, the baseline), one run of
``prune(ratio=0.5, drop_attention=1)``, recovery by DLD distillation (16 steps of 2 images; --quick: 2 steps, 4 + 2
photos, one noise draw):

* op ``prune``, mode = the stage (``attention``, ``embed``, ``bottleneck``): ``median_ms`` is the stage's wall time
  (scoring, pruning and recovery; the report's ``seconds``), ``value`` its embedding SQNR (dB) on the held-out
  photos after recovery, with the SQNR before recovery and the point / box mask mIoU in their own columns.

Without --quick also op ``prune_quality``: ratio 0.5 (no attention removal) on six tiny models of each of two kinds
- ``random`` (tiny_sam, seeds 0-5) and ``lazy-mlp`` (the same with 40% of every block's MLP units switched off by
their bias, as trained ViTs have units that almost never fire) - the final held-out SQNR per importance. The plot
shows the stage times and these pairs.

    python bench/bench_prune.py [--out bench/results] [--quick]
"""

from __future__ import annotations

import os
import sys
import tempfile

import torch

from sam_fast.bench.harness import LiveRows, bench_main, progress, provenance

SCRIPT = "bench_prune"
BASELINE = "magnitude"
EXTRA_COLUMNS = ["sqnr_pruned_db", "points_miou", "boxes_miou"]
IMPORTANCES = ("disturbed_taylor", "magnitude")
TRAIN = ["astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "colorwheel",
         "retina"]
HELD = ["camera", "coins", "clock", "moon", "brick", "grass"]


def teacher(seed: int, lazy: float = 0.0):
    """tiny_sam(seed), with ``lazy`` of every block's MLP units switched off (lin1 bias -30: GELU gives ~0)."""
    from sam_fast.models import tiny_sam

    sam = tiny_sam(seed=seed).eval()
    gen = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():
        for blk in sam.image_encoder.blocks:
            n = blk.mlp.lin1.out_features
            blk.mlp.lin1.bias[torch.randperm(n, generator=gen)[:int(lazy * n)]] = -30.0
    return sam


def _prune(model, train, held, out_dir, importance, steps, draws=4, **kw):
    from sam_fast.compress import prune
    from sam_fast.distill import DistillConfig

    recover = DistillConfig(method="dld", steps=steps, batch_size=2, cache_batch_size=2, prompts_per_image=1)
    return prune(model, train, out_dir=out_dir, ratio=0.5, importance=importance, num_images=len(train), draws=draws,
                 recover=recover, eval_images=held, device="cpu", progress=False, **kw)


def _plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = [r for r in rows if r["op"] == "prune"]
    quality = [r for r in rows if r["op"] == "prune_quality"]
    fig, axes = plt.subplots(1, 2 if quality else 1, figsize=(11 if quality else 5.5, 4), squeeze=False)
    ax = axes[0][0]
    names = list(dict.fromkeys(r["mode"] for r in stages))
    for j, imp in enumerate(IMPORTANCES):
        bottom = 0.0
        for name in names:
            (r,) = [r for r in stages if r["backend"] == imp and r["mode"] == name]
            s = r["median_ms"] / 1e3
            ax.bar(j, s, bottom=bottom, color=f"C{names.index(name)}", label=name if j == 0 else None)
            ax.text(j, bottom + s / 2, f"{name}\n{r['value']:.1f} dB", ha="center", va="center", fontsize=7)
            bottom += s
    ax.set_xticks(range(len(IMPORTANCES)), IMPORTANCES)
    ax.set_ylabel("wall time (s), CPU")
    ax.set_title("prune(ratio=0.5, drop_attention=1), tiny SAM")
    if quality:
        ax = axes[0][1]
        for k, kind in enumerate(dict.fromkeys(r["case"].split()[0] for r in quality)):
            pairs = {}
            for r in quality:
                if r["case"].split()[0] == kind:
                    pairs.setdefault(r["case"], {})[r["backend"]] = r["value"]
            xs = [p["magnitude"] for p in pairs.values()]
            ys = [p["disturbed_taylor"] for p in pairs.values()]
            ax.scatter(xs, ys, color=f"C{k}", label=f"{kind} ({sum(y > x for x, y in zip(xs, ys))}/{len(xs)} above)")
        lo = min(r["value"] for r in quality) - 0.5
        hi = max(r["value"] for r in quality) + 0.5
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        ax.set_xlabel("magnitude + recovery: held-out SQNR (dB)")
        ax.set_ylabel("disturbed Taylor + recovery (dB)")
        ax.set_title("ratio 0.5, per tiny model")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run(out_dir: str, quick: bool = False):
    from sam_fast.testing import write_photos

    os.makedirs(out_dir, exist_ok=True)
    prov = provenance(torch.device("cpu"))
    rows = LiveRows(out_dir, SCRIPT, EXTRA_COLUMNS)
    steps = 2 if quick else 16
    with tempfile.TemporaryDirectory() as tmp:
        train = write_photos(os.path.join(tmp, "train"), TRAIN[:4] if quick else TRAIN)
        held = write_photos(os.path.join(tmp, "held"), HELD[:2] if quick else HELD)
        case = f"tiny-256 ratio 0.5 + 1 attention block, {steps} steps"
        for imp in progress(IMPORTANCES, "prune (stages)"):
            res = _prune(teacher(0), train, held, os.path.join(tmp, imp), imp, steps, draws=1 if quick else 4,
                         drop_attention=1)
            for st in res.stages:
                rows.append(dict(prov, op="prune", case=case, backend=imp, mode=st["stage"], metric="sqnr_db",
                                 median_ms=st["seconds"] * 1e3, value=st["recovered"]["sqnr_db"],
                                 sqnr_pruned_db=st["pruned"]["sqnr_db"], points_miou=st["recovered"]["points"],
                                 boxes_miou=st["recovered"]["boxes"],
                                 note=f"SQNR {st['pruned']['sqnr_db']:.1f} -> {st['recovered']['sqnr_db']:.1f} dB, "
                                      f"{st['params']:,} params, {st['macs'] / 1e6:.1f} M MACs"))
        if not quick:
            runs = [(kind, lazy, seed) for kind, lazy in (("random", 0.0), ("lazy-mlp", 0.4)) for seed in range(6)]
            for kind, lazy, seed in progress(runs, "prune (importance)", lambda r: f"{r[0]} seed {r[2]}"):
                for imp in IMPORTANCES:
                    res = _prune(teacher(seed, lazy), train, held, os.path.join(tmp, f"{kind}{seed}{imp}"), imp,
                                 steps)
                    last = res.stages[-1]
                    rows.append(dict(prov, op="prune_quality", case=f"{kind} seed {seed}", backend=imp,
                                     mode="ratio 0.5", metric="sqnr_db", value=last["recovered"]["sqnr_db"],
                                     sqnr_pruned_db=res.stages[0]["pruned"]["sqnr_db"],
                                     points_miou=last["recovered"]["points"], boxes_miou=last["recovered"]["boxes"],
                                     note=f"SQNR {last['recovered']['sqnr_db']:.2f} dB, {steps} recovery steps"))
    return rows, _plot(rows, os.path.join(out_dir, f"{SCRIPT}.png"))


def main(argv=None):
    return bench_main(__doc__, run, BASELINE, argv)


if __name__ == "__main__":
    sys.exit(main())
