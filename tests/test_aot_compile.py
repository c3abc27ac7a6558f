"""Every Triton kernel compiles for the H100 (sm_90), and the A100 (sm_80), with the launch
configuration a GPU run uses.

Runs ``python -m sam_fast.bench.aot_compile --quick`` in a subprocess (it must not run under the
interpreter this test session uses): Triton's compiler and its bundled ptxas build the cubins on this
CPU machine; nothing is launched. Catches lowering and ptxas errors and shared-memory overflows that
the interpreter cannot; numerics stay with the interpreter tests and ``pytest -m gpu``.
"""

import os
import subprocess
import sys

import pytest

KERNELS = ("_dilated_attention_fwd_kernel", "_dilated_attention_bwd_dq_kernel", "_dilated_attention_bwd_dkdv_kernel",
           "_quantize_rows_kernel", "_layer_norm_quantize_kernel", "_int8_gemm_kernel",
           "_small_key_attention_kernel", "_upscale_mask_product_kernel")


@pytest.mark.parametrize("arch", [90, 80])
def test_all_triton_kernels_compile(arch):
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, "-m", "sam_fast.bench.aot_compile", "--quick", "--arch", str(arch)],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    compiled = {line.split()[0] for line in proc.stdout.splitlines() if line.startswith("_")}
    assert compiled == set(KERNELS), f"compiled {sorted(compiled)}"
    assert f"compiled for sm_{arch}" in proc.stdout
