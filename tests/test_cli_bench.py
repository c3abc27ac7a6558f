"""``sam-fast bench``, the README's main command, run once as a fresh install would run it.

- ``pip install .`` (no dev extra) must bring everything it imports. CI installs the dev extra, so a module that
  only the extra brings (pycocotools once) passed CI while a user's ``pip install . && sam-fast bench`` died.
  Installing into a fresh virtual environment would cost several minutes per run (torch and its CUDA libraries);
  instead the command runs with every import refused unless it comes from the standard library or from the
  closure of ``[project] dependencies`` over the installed distributions' own requirements: what a fresh install
  would have.
- On a machine without a GPU it must switch the Triton kernels to the interpreter itself, before anything imports
  them (a CLI import that loaded a kernel module first once broke it).
- Every benchmark it runs writes rows that compare backends. These are the same ``run`` functions the bench
  scripts' command lines call, so tests/test_bench_scripts.py runs as scripts only the ones this run leaves out.
"""

import os
import subprocess
import sys
import textwrap

import pytest
from bench_checks import check_bench_rows

from sam_fast.cli import BENCH_EXTRAS, BENCHES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BLOCKER = textwrap.dedent('''
    import importlib.abc, importlib.metadata as md, re, sys, tomllib
    from packaging.requirements import Requirement

    def canon(name):
        return re.sub(r"[-_.]+", "-", name).lower()

    with open(sys.argv[1], "rb") as f:
        roots = tomllib.load(f)["project"]["dependencies"]
    allowed, todo = set(), [(Requirement(r), ()) for r in roots]
    while todo:
        req, extras = todo.pop()
        if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in extras or ("",)):
            continue
        name = canon(req.name)
        if name in allowed:
            continue
        allowed.add(name)
        try:
            dist = md.distribution(req.name)
        except md.PackageNotFoundError:
            continue
        todo += [(Requirement(r), tuple(req.extras)) for r in dist.requires or []]
    allowed.add("sam-fast")
    owners = md.packages_distributions()

    refused = set()

    class Gate(importlib.abc.MetaPathFinder):
        """The import system as a fresh install would have it: modules of other distributions are absent
        (find_spec probes get None, as for a module that is not installed; imports fail)."""
        def __init__(self, finders):
            self.finders = finders

        def find_spec(self, fullname, path=None, target=None):
            top = fullname.split(".")[0]
            if top not in sys.stdlib_module_names and top in owners and \
                    not any(canon(d) in allowed for d in owners[top]):
                refused.add(f"{top} (from {', '.join(owners[top])})")
                return None
            for finder in self.finders:
                spec = finder.find_spec(fullname, path, target) if hasattr(finder, "find_spec") else None
                if spec is not None:
                    return spec
            return None

    sys.meta_path[:] = [Gate(list(sys.meta_path))]

    def report():
        if refused:  # what was asked for and, on a fresh install, would not be there
            print("absent on a fresh install: " + "; ".join(sorted(refused)), file=sys.stderr)

    import atexit
    atexit.register(report)
    from sam_fast.cli import main
    sys.exit(main(sys.argv[2:]))
''')



@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    """(process, out dir) of ``sam-fast bench`` behind the gate, without TRITON_INTERPRET in its environment."""
    out = tmp_path_factory.mktemp("bench")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", BLOCKER, os.path.join(ROOT, "pyproject.toml"), "bench", "--out",
                           str(out)], capture_output=True, text=True, env=env, timeout=900, cwd=str(out))
    return proc, out


@pytest.mark.whole_program
def test_sam_fast_bench_imports_only_what_pip_install_brings(bench_run):
    proc, _ = bench_run
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    # the benchmarks of optional extras (export: onnxruntime, openvino) are left out, and said so
    for op, (_, extra) in BENCH_EXTRAS.items():
        assert f"leaving out {op}" in proc.stdout and f"sam_fast[{extra}]" in proc.stdout
    assert f"sam-fast bench: {len(BENCHES) - len(BENCH_EXTRAS)} benchmark(s)" in proc.stdout


@pytest.mark.whole_program
@pytest.mark.parametrize("op", [op for op in BENCHES if op not in BENCH_EXTRAS])
def test_every_benchmark_writes_rows_comparing_backends(bench_run, op):
    proc, out = bench_run
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    check_bench_rows(out / f"{BENCHES[op]}.csv")


@pytest.mark.whole_program
def test_bench_checks_triton_under_the_interpreter_and_ends_with_a_summary(bench_run):
    proc, out = bench_run
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    tables = (out / "bench_tables.txt").read_text()
    assert "triton" in tables and "speedup over" in tables
    assert (out / "bench_dilated_attention_sam.png").exists()
    # the run ends with a one-screen summary that fits an 80-column terminal
    summary = proc.stdout[proc.stdout.index(f"sam-fast bench: {len(BENCHES) - len(BENCH_EXTRAS)} benchmark(s)"):]
    summary = summary.splitlines()
    assert len(summary) <= 24 and all(len(line) <= 80 for line in summary if str(out) not in line)
    assert any(line.startswith("attention   segment_anything") and line.rstrip().endswith("3") for line in summary)
    assert "kernel check(s) under the Triton interpreter" in proc.stdout
    assert "every case: sam-fast bench --full" in proc.stdout


@pytest.mark.whole_program
def test_the_gate_refuses_a_dev_only_module(tmp_path):
    """The check can fail: pytest-benchmark comes with the dev extra only."""
    code = BLOCKER.replace("from sam_fast.cli import main\nsys.exit(main(sys.argv[2:]))",
                           "import pytest_benchmark")
    assert code != BLOCKER
    proc = subprocess.run([sys.executable, "-c", code, os.path.join(ROOT, "pyproject.toml")], capture_output=True,
                          text=True, timeout=120, cwd=str(tmp_path))
    assert proc.returncode != 0 and "No module named 'pytest_benchmark'" in proc.stderr
    assert "absent on a fresh install: pytest_benchmark (from pytest-benchmark)" in proc.stderr


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
