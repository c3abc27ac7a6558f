"""``pip install .`` (no dev extra) must bring everything the README's main job imports.

CI installs the dev extra, so a module that only the extra brings (pycocotools once) passed CI while a
user's ``pip install . && sam-fast bench`` died. Installing into a fresh virtual environment would cost
several minutes per run (torch and its CUDA libraries); instead ``sam-fast bench`` runs here with every
import of a module refused unless it comes from the standard library or from the closure of
``[project] dependencies`` over the installed distributions' own requirements - what a fresh install
would have.
"""

import os
import subprocess
import sys
import textwrap

import pytest

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


@pytest.mark.whole_program
def test_sam_fast_bench_imports_only_what_pip_install_brings(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", BLOCKER, os.path.join(ROOT, "pyproject.toml"), "bench", "--out",
                           str(tmp_path)], capture_output=True, text=True, env=env, timeout=900, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    from sam_fast.cli import BENCH_EXTRAS, BENCHES

    # the benchmarks of optional extras (export: onnxruntime, openvino) are left out, and said so
    for op, (_, extra) in BENCH_EXTRAS.items():
        assert f"leaving out {op}" in proc.stdout and f"sam_fast[{extra}]" in proc.stdout
    assert f"sam-fast bench: {len(BENCHES) - len(BENCH_EXTRAS)} benchmark(s)" in proc.stdout


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
