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
