"""Test setup: on a machine without a CUDA GPU, Triton kernels run under the interpreter.

TRITON_INTERPRET must be set before triton.jit decorates the kernels, i.e. before sam_fast is imported.
GPU tests carry ``@pytest.mark.gpu`` and run with ``pytest -m gpu``.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


def pytest_configure(config):
    config.addinivalue_line("markers", "no_sanitizer: a test that races or reads out of bounds on purpose")


@pytest.fixture(autouse=True)
def _interpreter_sanitizer(request):
    """Every test's Triton launches under the interpreter run inside :func:`interp_sanitizer.interpreter_sanitizer`:
    a global-memory race or an access outside the launch's tensors fails the test (at teardown), which the
    interpreter's in-order, unchecked execution would otherwise hide."""
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0") or request.node.get_closest_marker("no_sanitizer"):
        yield
        return
    from interp_sanitizer import interpreter_sanitizer

    with interpreter_sanitizer() as accesses:
        yield
    assert accesses.findings() == [], f"Triton launches with races or out-of-bounds accesses: {accesses.findings()}"
