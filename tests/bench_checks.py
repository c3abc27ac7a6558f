"""What every benchmark's CSV must hold, for the tests that run benchmarks."""

import csv


def check_bench_rows(path) -> None:
    """Rows, none failed, positive times, and at least two backends compared."""
    rows = list(csv.DictReader(open(path)))
    assert rows, f"no result rows in {path}"
    failed = [r for r in rows if r["note"].startswith("failed")]
    assert not failed, failed
    timed = [r for r in rows if r["median_ms"]]
    assert timed and all(float(r["median_ms"]) > 0 for r in timed)
    assert len({r["backend"] for r in timed}) >= 2, f"a benchmark compares at least two backends: {path}"
