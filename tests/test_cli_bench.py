"""``sam-fast bench`` on a machine without a GPU: the README's main command. It must switch the Triton
kernels to the interpreter itself, before anything imports them (a CLI import that loaded a kernel
module first once broke it)."""

import os
import subprocess
import sys

import pytest


@pytest.mark.whole_program
def test_bench_command_checks_triton_under_the_interpreter(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = "import sys; from sam_fast.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.run([sys.executable, "-c", code, "bench", "--quick", "--ops", "attention", "--out",
                           str(tmp_path)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    tables = (tmp_path / "bench_tables.txt").read_text()
    assert "triton" in tables and "speedup over" in tables
    assert (tmp_path / "bench_dilated_attention_sam.csv").exists()
    assert (tmp_path / "bench_dilated_attention_sam.png").exists()
    # the run ends with a one-screen summary that fits an 80-column terminal
    summary = proc.stdout[proc.stdout.index("sam-fast bench: 1 benchmark(s)"):].splitlines()
    assert len(summary) <= 24 and all(len(line) <= 80 for line in summary if str(tmp_path) not in line)
    assert any(line.startswith("attention   segment_anything") and line.rstrip().endswith("3") for line in summary)
    assert "kernel check(s) under the Triton interpreter" in proc.stdout
    assert "every case: sam-fast bench --full" in proc.stdout


def test_bench_summary_reads_speedups_and_checks():
    from sam_fast.cli import bench_summary

    rows = [dict(op="x", case="a", mode="fwd", backend="base", median_ms=4.0),
            dict(op="x", case="a", mode="fwd", backend="sam_fast(cpu)", median_ms=2.0),
            dict(op="x", case="a", mode="fwd", backend="sam_fast(other)", median_ms=1.0),  # the best one counts
            dict(op="x", case="b", mode="fwd", backend="base", median_ms=3.0),
            dict(op="x", case="b", mode="fwd", backend="sam_fast(cpu)", median_ms=6.0),
            dict(op="x", case="c", mode="fwd", backend="sam_fast(triton)", median_ms="", max_err=3e-7)]
    text = bench_summary([("xop", "base", rows)], 12.0, "/out", "/out/bench_tables.txt", [], quick=False)
    line = next(ln for ln in text.splitlines() if ln.startswith("xop"))
    assert line.split()[-3:] == ["2.25x", "0.50-4.00x", "2"]  # median of 4.0x and 0.5x
    assert "1 kernel check(s)" in text and "3.0e-07" in text and "--full" not in text
