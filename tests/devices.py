"""Device parametrization shared by the op tests.

* A test that runs on every device takes the ``device`` fixture (conftest.py): its CUDA parameter carries the
  ``gpu`` marker, so ``pytest`` runs the CPU case (Triton kernels under the interpreter) and ``pytest -m gpu``
  the CUDA one.
* A test at SAM's real shapes runs on CUDA only and carries ``@gpu``.
* ``@smoke`` marks the parametrizations of the GPU smoke subset (``pytest -m "gpu and smoke"``, the first stage
  of tools/gpu_verify.py): each Triton kernel and CUDA op once at SAM's shapes, about two minutes on 8 workers.
"""

import pytest

gpu = pytest.mark.gpu
smoke = pytest.mark.smoke
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=gpu)]
