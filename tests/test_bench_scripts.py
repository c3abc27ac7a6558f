"""Every benchmark script runs end to end on this machine (``--quick``, CPU backends, Triton under the
interpreter). A GPU session has minutes; a script that breaks on a renamed import must be caught here,
not there (bench_everything once imported a helper the CLI no longer had)."""

import csv
import os
import subprocess
import sys

import numpy as np
import pytest

SCRIPTS = ["bench_dilated_attention", "bench_int8_gemm", "bench_e2e", "bench_decoder", "bench_everything",
           "bench_relpos"]  # bench_attention: tests/test_cli_bench.py runs it through `sam-fast bench`
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("script", SCRIPTS)
def test_bench_script_runs_on_cpu(script, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the script must set it itself
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", f"{script}.py"), "--quick", "--out",
                           str(tmp_path)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / f"{script}.csv")))
    assert rows, "no result rows"
    failed = [r for r in rows if r["note"].startswith("failed")]
    assert not failed, failed
    timed = [r for r in rows if r["median_ms"]]
    assert timed and all(float(r["median_ms"]) > 0 for r in timed)
    assert len({r["backend"] for r in timed}) >= 2, "a benchmark compares at least two backends"


def test_everything_agreement_is_mean_best_iou():
    """bench_everything's agreement between two mask sets: for each reference mask the best IoU with any
    other mask, averaged; checked on masks whose IoUs are known by construction."""
    import torch
    from segment_anything.utils.amg import mask_to_rle_pytorch

    from sam_fast.bench.bench_everything import _agreement

    def records(masks):  # segment_anything's uncompressed RLE records
        return [{"segmentation": r} for r in mask_to_rle_pytorch(torch.from_numpy(np.stack(masks)))]

    a = np.zeros((8, 8), bool)
    a[:4] = True  # 32 pixels
    b = np.zeros((8, 8), bool)
    b[:2] = True  # 16 pixels inside a: IoU(a, b) = 0.5
    c = np.zeros((8, 8), bool)
    c[6:] = True  # disjoint from both
    assert _agreement(records([a, c]), records([b, c])) == pytest.approx((0.5 + 1.0) / 2)
    assert _agreement(records([a]), records([a, b])) == pytest.approx(1.0)
    assert np.isnan(_agreement([], records([a])))
