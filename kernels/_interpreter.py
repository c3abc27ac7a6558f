"""Whether sam_fast's Triton kernels run under Triton's interpreter (``TRITON_INTERPRET=1``, on CPU
tensors, slowly): the one module that sets or reads that variable.

``triton.jit`` reads the variable when it *decorates* a kernel, so the choice must be made before any
kernel module is imported: :func:`use_interpreter_without_gpu` is called first thing by the test suite's
conftest, ``sam-fast bench`` and the ``bench_*.py`` scripts, :func:`compile_for_gpu` by the AOT compiler.
Importing this module imports neither Triton nor a kernel.
"""

from __future__ import annotations

import os
import sys

ENV = "TRITON_INTERPRET"


def interpreting() -> bool:
    """True when Triton kernels defined from now on run under the interpreter."""
    return os.environ.get(ENV, "0") not in ("", "0")


def use_interpreter_without_gpu() -> bool:
    """On a machine without a CUDA GPU choose the interpreter (unless the environment already chose);
    returns :func:`interpreting`. Call before anything imports sam_fast's kernels."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault(ENV, "1")
    return interpreting()


def compile_for_gpu() -> None:
    """Compile kernels for a GPU even on a machine without one (ahead-of-time compilation)."""
    os.environ[ENV] = "0"


def kernels_defined_for_gpu() -> bool:
    """Whether a loaded sam_fast Triton kernel was defined without the interpreter, so that setting
    ``TRITON_INTERPRET=1`` now does not reach it."""
    for name, mod in list(sys.modules.items()):
        if mod is not None and name.startswith("sam_fast.kernels."):
            if any(type(v).__name__ == "JITFunction" for v in list(vars(mod).values())):
                return True
    return False
