"""The C++ CPU ops under AddressSanitizer and UndefinedBehaviorSanitizer.

    python -m tools.sanitize_cpu_ops                 # build, then the C++ op tests (about 10 min on 2 cores)
    python -m tools.sanitize_cpu_ops -k int8 -x      # extra arguments go to pytest

Builds ``sam_fast._C`` from ``csrc/`` (CPU sources only) with ``SAM_FAST_SANITIZE=1`` (setup.py:
``-fsanitize=address,undefined``, every report fatal) into ``.stage-asan/``, assembles a package around it from the
working tree (links, as the GPU check does), and runs the tests of the C++ ops with the sanitizers' runtimes
preloaded into Python. Any heap or stack overflow, use after free or undefined behaviour in an op aborts the run
with the report; the exit status is pytest's (or the build's). Run it once per change to ``csrc/``.
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import time

from tools.gpu_verify import ROOT, stage_package

STAGE = os.path.join(ROOT, ".stage-asan")
BUILD_TMP = os.path.join(ROOT, "build", "asan")

#: the tests that call the C++ ops (directly, and through the paths that reach them)
TESTS = ["tests/test_cpu_ops_fuzz.py", "tests/test_sam_block_attention.py", "tests/test_rel_pos_attention.py",
         "tests/test_decomposed_bias.py", "tests/test_linear_epilogue.py", "tests/test_dilated_attention_cpu.py",
         "tests/test_int8_linear.py", "tests/test_mask_postprocess.py", "tests/test_resize_rel_pos.py",
         "tests/test_nonfinite.py", "tests/test_grad_modes.py",
         "tests/test_framework.py::test_extension_cpu_ops_use_every_intra_op_thread"]


def _runtime(name: str) -> str:
    path = subprocess.run(["gcc", f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
    if not os.path.isabs(path):
        raise SystemExit(f"sanitize_cpu_ops: gcc does not know {name} (install gcc's sanitizer runtimes)")
    return path


def build() -> str:
    """The sanitized extension's path (built in ``build/asan``)."""
    env = dict(os.environ, SAM_FAST_BUILD_CUDA="0", SAM_FAST_SANITIZE="1")
    out = os.path.join(BUILD_TMP, "lib")
    cmd = [sys.executable, "setup.py", "-q", "build_ext", "--build-lib", out, "--build-temp",
           os.path.join(BUILD_TMP, "tmp")]
    subprocess.run(cmd, cwd=ROOT, env=env, check=True)
    found = glob.glob(os.path.join(out, "sam_fast", "_C*.so"))
    if not found:
        raise SystemExit(f"sanitize_cpu_ops: the build left no extension in {out}")
    return found[0]


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    t0 = time.monotonic()
    so = build()
    stage_package(so, STAGE)
    print(f"built and staged in {time.monotonic() - t0:.0f} s: {so}", flush=True)
    env = dict(os.environ,
               PYTHONPATH=os.pathsep.join([STAGE, os.environ.get("PYTHONPATH", ""), ROOT]),
               PYTHONSAFEPATH="1",
               LD_PRELOAD=" ".join([_runtime("libasan.so"), _runtime("libubsan.so")]),
               # Python's own allocations are not instrumented and leak by design at exit
               ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=1",
               UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1")
    code = ("import torch, sam_fast; from sam_fast.ops._ext import extension_error; err = extension_error(); "
            "assert err is None, err; import sam_fast._C; print(sam_fast._C.__file__)")
    check = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    if check.returncode != 0 or not check.stdout.startswith(STAGE):
        print(check.stdout + check.stderr, file=sys.stderr)
        raise SystemExit("sanitize_cpu_ops: the staged, sanitized extension did not load")
    t1 = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS, *argv], cwd=ROOT,
                         env=env)
    print(f"tests under ASan + UBSan: {time.monotonic() - t1:.0f} s (exit {res.returncode})")
    return res.returncode


if __name__ == "__main__":
    sys.exit(main())
