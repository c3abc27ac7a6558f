"""The project's first dense attention kernel, for the ``dense_v1@<sha>`` peer of bench/bench_dilated_attention.py: it
measures "no regression from generality" against the kernel the project started from. Maintainer tooling (reads git
history; not installed): the benchmark loads this file from the checkout when it is there.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile

DENSE_V1_ENV = "SAM_FAST_DENSE_V1_KERNEL"


def dense_v1_source(sha: str):
    """The first dense kernel's source text: from git history, else from the file named by
    $SAM_FAST_DENSE_V1_KERNEL (a GPU machine receives the working tree without .git; ``bash
    tools/gpu_session.sh prepare`` writes that file). None, with the reason on stderr, if neither works."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        src = subprocess.run(["git", "show", f"{sha}:kernels/dilated_attention.py"], cwd=root,
                             capture_output=True, text=True, timeout=20)
        if src.returncode == 0:
            return src.stdout
    except (OSError, subprocess.SubprocessError):
        pass
    path = os.environ.get(DENSE_V1_ENV)
    if path and os.path.isfile(path):
        with open(path) as f:
            return f.read()
    print(f"dense_v1: no dense_v1@{sha} row - not a git checkout and "
          f"${DENSE_V1_ENV} names no file", file=sys.stderr)
    return None


def dense_v1_kernel(sha: str):
    """The project's first dense kernel's attention launcher as a module (None when its source is unavailable)."""
    src = dense_v1_source(sha)
    if src is None:
        return None
    path = os.path.join(tempfile.mkdtemp(prefix="sam_fast_dense_v1_"), "dense_v1_attention.py")
    with open(path, "w") as f:
        f.write(src)
    spec = importlib.util.spec_from_file_location("dense_v1_attention", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
