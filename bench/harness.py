"""Shared benchmark harness: timing, provenance, CSV results, tables and plots.

Every row is one measured backend on one case, with its provenance (docs/maintainers/design.md, "Benchmarks"),
appended to ``<out>/<script>.csv``. On CUDA, times come from ``triton.testing.do_bench`` (CUDA events, L2 flushed,
median and 20th/80th percentiles); on CPU from ``time.perf_counter`` over repeated calls.
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import os
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch


def progress(items, desc: str, label: Callable[[object], str] = str):
    """Iterate ``items`` with a progress bar on a terminal; elsewhere (a GPU stage's log) one flushed line
    per item with the seconds so far, so a log cut off by a time limit shows where the run was."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        yield from tqdm(items, desc=desc)
        return
    items = list(items)
    t0 = time.perf_counter()
    for i, item in enumerate(items):
        print(f"{desc} [{i + 1}/{len(items)}] {label(item)} (at {time.perf_counter() - t0:.0f} s)", flush=True)
        yield item


def raise_recompile_limit(limit: int = 256) -> None:
    """Let dynamo keep one specialised graph per benchmark case. Past its default limit (8 graphs per
    function) it silently falls back to eager - for FlexAttention that materialises the whole score
    matrix - and the peer would be timed on a path no user of it runs."""
    for knob in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, max(limit, getattr(torch._dynamo.config, knob)))


# The peer that runs sam_fast's attention kernels with the head dim padded to a power of two (80 -> 128)
# instead of split into two slices (64 + 16): the same-run measure of what the split buys.
PADDED_D = "sam_fast(triton,padded-D)"


def padded_head_dim_for(backend: str):
    """The context a peer's calls and timing run in: padded head dim for :data:`PADDED_D`, else nothing."""
    if backend != PADDED_D:
        return contextlib.nullcontext()
    from sam_fast.kernels.dilated_attention import padded_head_dim

    return padded_head_dim()


def bench_main(doc: str, run: Callable, baseline: str, argv=None, options=()) -> int:
    """Command line of a bench script: ``--out DIR [--quick]`` plus the script's own ``options``
    ((flag, argparse action, help), passed to ``run`` as keywords); runs, prints the table and the plot path."""
    import argparse

    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--out", default="bench/results", help="results directory (CSV appended, PNG rewritten)")
    p.add_argument("--quick", action="store_true", help="fewer cases (batch 1 only on GPU)")
    import inspect

    if "targets" in inspect.signature(run).parameters:
        p.add_argument("--targets", action="store_true",
                       help="only the cases and peers the performance targets read (tools/targets.py), for a "
                            "short GPU check; the script's planned_rows() lists them")
    for flag, action, help_text in options:
        p.add_argument(flag, action=action, help=help_text, **({} if action == "store_true" else {"default": ""}))
    args = vars(p.parse_args(argv))
    out, quick = args.pop("out"), args.pop("quick")
    rows, png = run(out, quick=quick, **args)
    if rows and not any(r["backend"] == baseline for r in rows):  # an option chose another family of peers
        baseline = rows[0]["backend"]
    print(table(rows, baseline))
    if png:
        print(f"\nplot: {png}")
    return 0


COLUMNS = ["timestamp", "git_sha", "device", "torch", "triton", "cuda", "op", "case", "backend", "mode",
           "median_ms", "p20_ms", "p80_ms", "metric", "value", "max_err", "peak_mem_mb", "note"]


def git_sha() -> str:
    """The commit measured: $SAM_FAST_GIT_SHA (a GPU machine gets the working tree without .git;
    ``tools/gpu_session.sh prepare`` records the commit for it), else git, else the release version."""
    if os.environ.get("SAM_FAST_GIT_SHA"):
        return os.environ["SAM_FAST_GIT_SHA"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                             cwd=os.path.dirname(os.path.abspath(__file__)), timeout=10)
        sha = out.stdout.strip()
        if sha:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                   text=True, cwd=os.path.dirname(os.path.abspath(__file__)), timeout=10).stdout.strip()
            return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    import sam_fast

    return f"release-{sam_fast.__version__}"


def provenance(device: torch.device) -> Dict[str, str]:
    import triton

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:  # the model and its instruction sets: which CPU path ran depends on them
        from sam_fast.cpu_features import describe

        name = f"cpu ({describe()})"
    return {
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_sha": git_sha(),
        "device": name,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda or "none",
    }


def measure(fn: Callable[[], object], device: torch.device, *, warmup_ms: float = 25, rep_ms: float = 100,
            cpu_reps: int = 5) -> Dict[str, float]:
    """Median and 20/80th percentile milliseconds of ``fn()``, plus peak memory (CUDA)."""
    if device.type == "cuda":
        import triton.testing

        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        med, p20, p80 = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        return {"median_ms": med, "p20_ms": p20, "p80_ms": p80, "peak_mem_mb": peak}
    fn()  # warm-up
    times = []
    for _ in range(cpu_reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    q = statistics.quantiles(times, n=5) if len(times) > 1 else [times[0]] * 4
    return {"median_ms": statistics.median(times), "p20_ms": q[0], "p80_ms": q[3], "peak_mem_mb": float("nan")}


def read_csv(path: str):
    """A results CSV as ``(rows as dicts, header)``."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader), list(reader.fieldnames or [])


def append_csv(path: str, rows: List[Dict[str, object]], extra_columns: Sequence[str] = ()) -> None:
    """Append rows to ``path`` (header written when the file is new); a script may add its own columns
    after the shared ones. Rows are written under the file's own header: columns it lacks are added at
    its end (the file is rewritten once, older rows blank there), so no row lands under the wrong name."""
    columns = COLUMNS + [c for c in extra_columns if c not in COLUMNS]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if os.path.exists(path):
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            header = list(reader.fieldnames or [])
            missing = [c for c in columns if c not in header]
            old = list(reader) if missing else None
        if missing:
            header += missing
            with open(path, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=header)
                w.writeheader()
                w.writerows(old)
        columns = header
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({c: _fmt(r.get(c, "")) for c in columns})


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


def table(rows: List[Dict[str, object]], baseline: Optional[str] = None) -> str:
    """Text table: op, case, mode, backend, median, speedup vs ``baseline`` backend, max error."""
    base = {}
    for r in rows:
        if r.get("backend") == baseline and r.get("median_ms") not in ("", None):
            base[(r["op"], r["case"], r["mode"])] = float(r["median_ms"])
    head = f"{'op':<18} {'case':<34} {'mode':<8} {'backend':<22} {'median ms':>10} {'speedup':>8} {'max err':>9}  note"
    lines = [head, "-" * len(head)]
    for r in rows:
        med = r.get("median_ms")
        b = base.get((r["op"], r["case"], r["mode"]))
        timed = med not in ("", None) and not (isinstance(med, float) and med != med)
        speed = f"{b / float(med):.2f}x" if timed and b else "-"
        err = r.get("max_err", "")
        err_s = f"{float(err):.1e}" if err not in ("", None) else "-"
        med_s = f"{float(med):.3f}" if timed else "-"
        lines.append(f"{r['op']:<18} {r['case']:<34} {r['mode']:<8} {r['backend']:<22} {med_s:>10} {speed:>8} "
                     f"{err_s:>9}  {r.get('note', '')}")
    return "\n".join(lines)


class LiveRows(list):
    """A bench script's result rows, each appended to ``out_dir/<script>.csv`` the moment it is added.

    A GPU stage runs under a time limit (``tools/gpu_session.sh``): a script killed half way keeps every
    row measured before the kill instead of losing them all to a write at the end. Add complete rows:
    later changes to a row reach the printed table, not the CSV."""

    def __init__(self, out_dir: str, script: str, extra_columns: Sequence[str] = ()):
        super().__init__()
        self.path = os.path.join(out_dir, f"{script}.csv")
        self.extra_columns = list(extra_columns)

    def append(self, row: Dict[str, object]) -> None:
        append_csv(self.path, [row], self.extra_columns)
        super().append(row)

    def extend(self, rows) -> None:
        for r in rows:
            self.append(r)

    def __iadd__(self, rows):
        self.extend(rows)
        return self


def save_results(out_dir: str, script: str, rows: List[Dict[str, object]], baseline: str, title: str,
                 extra_columns: Sequence[str] = (), plot_rows: Optional[List[Dict[str, object]]] = None):
    """A bench script's ending: append ``rows`` to ``out_dir/<script>.csv`` (unless they are
    :class:`LiveRows`, written as they came) and draw the speedups over ``baseline`` (of ``plot_rows``,
    default all rows) to ``out_dir/<script>.png``. Returns (rows, png)."""
    if not isinstance(rows, LiveRows):
        append_csv(os.path.join(out_dir, f"{script}.csv"), rows, extra_columns)
    png = plot_speedups(rows if plot_rows is None else plot_rows, baseline, os.path.join(out_dir, f"{script}.png"),
                        title)
    return rows, png


def plot_speedups(rows: List[Dict[str, object]], baseline: str, path: str, title: str) -> Optional[str]:
    """Grouped bars: speedup of every backend over ``baseline`` per (case, mode). Returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [r for r in rows if r.get("median_ms") not in ("", None)]
    groups = []
    for r in timed:
        key = (r["case"], r["mode"])
        if key not in groups:
            groups.append(key)
    base = {(r["case"], r["mode"]): float(r["median_ms"]) for r in timed if r["backend"] == baseline}
    backends = [b for b in dict.fromkeys(r["backend"] for r in timed)]
    if not groups or not base:
        return None
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(groups) * max(1, len(backends)) / 2), 4.5))
    width = 0.8 / max(1, len(backends))
    for i, b in enumerate(backends):
        xs, ys = [], []
        for j, g in enumerate(groups):
            r = next((r for r in timed if (r["case"], r["mode"]) == g and r["backend"] == b), None)
            if r is not None and g in base:
                xs.append(j + i * width)
                ys.append(base[g] / float(r["median_ms"]))
        ax.bar(xs, ys, width, label=b)
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))])
    ax.set_xticklabels([f"{c}\n{m}" for c, m in groups], fontsize=7)
    ax.set_ylabel(f"speedup over {baseline}")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def cpu_op_bench(script: str, op: str, cases, out_dir: str, quick: bool, title: str):
    """The run of a benchmark of one CPU op's backends: ``cases`` yields ``(case, {backend: fn}, exact, gbytes)``
    (``exact()`` the float64 result, ``gbytes`` the op's memory traffic in GB, for the GB/s column); every backend of
    a case is timed (median of 20 calls, 5 with ``quick``) and compared with ``exact``. The baseline is
    ``"reference"``. Returns (rows, png), as :func:`save_results`."""
    dev = torch.device("cpu")
    prov = provenance(dev)
    rows = []
    for case, peers, exact, gbytes in cases:
        want = exact()
        for name, fn in peers.items():
            m = measure(fn, dev, cpu_reps=5 if quick else 20)
            got = fn()
            got = got[0] if isinstance(got, tuple) else got
            rows.append(dict(prov, op=op, case=case, backend=name, mode="fwd", metric="gbps",
                             value=gbytes / (m["median_ms"] * 1e-3), max_err=float((got.double() - want).abs().max()),
                             **m))
    return save_results(out_dir, script, rows, "reference", title)
