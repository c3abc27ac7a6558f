"""Every Triton kernel compiles for the H100 (sm_90), and the A100 (sm_80), with the launch
configuration a GPU run uses.

Runs ``python -m tools.aot_compile --quick`` in a subprocess (it must not run under the
interpreter this test session uses): Triton's compiler and its bundled ptxas build the cubins on this
CPU machine; nothing is launched. Catches lowering and ptxas errors and shared-memory overflows that
the interpreter cannot; numerics stay with the interpreter tests and ``pytest -m gpu``.
"""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tools/ is imported from here

KERNELS = ("_dilated_attention_fwd_kernel", "_dilated_attention_bwd_dq_kernel", "_dilated_attention_bwd_dkdv_kernel",
           "_quantize_rows_kernel", "_layer_norm_quantize_kernel", "_int8_gemm_kernel",
           "_small_key_attention_kernel", "_upscale_mask_product_kernel", "_hiera_attention_kernel")


@pytest.mark.whole_program
@pytest.mark.parametrize("arch", [90, 80])
def test_all_triton_kernels_compile(arch):
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, "-m", "tools.aot_compile", "--quick", "--arch", str(arch)],
                          capture_output=True, text=True, env=env, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    compiled = {line.split()[0] for line in proc.stdout.splitlines() if line.startswith("_")}
    assert compiled == set(KERNELS), f"compiled {sorted(compiled)}"
    assert f"compiled for sm_{arch}" in proc.stdout


@pytest.mark.whole_program
def test_tuner_candidates_compile(tmp_path):
    """``--tune-candidates`` compiles what tools/tune_dilated_attention.py (here: one small case, its first two and
    last candidates each way: the mechanism, in a third of the time of all 30) and tools/tune_int8_linear.py (here: two
    candidates) would time, and writes one row per kernel and candidate."""
    import csv

    script = (
        "import sys\n"
        "from tools import tune_dilated_attention as T, tune_int8_linear as T8, aot_compile as A\n"
        "T.CASES = [('small D=80 window', (16, 16), 2, 80, (8, 8), True, True)]\n"
        "_all = T.candidates\n"
        "T.candidates = lambda *a, **k: (lambda c: c[:2] + c[-1:])(list(_all(*a, **k)))\n"
        "T8.candidates = lambda: iter(["
        "dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3),"
        " dict(BLOCK_M=256, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4)])\n"
        f"sys.exit(A.main(['--tune-candidates', '--out', {str(tmp_path)!r}]))\n")
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=900,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    from tools import tune_dilated_attention as T

    rows = list(csv.DictReader(open(tmp_path / "aot_tune_candidates_sm90.csv")))
    for backward, kernels in ((False, {"_dilated_attention_fwd_kernel"}),
                              (True, {"_dilated_attention_bwd_dq_kernel", "_dilated_attention_bwd_dkdv_kernel"})):
        every = list(T.candidates(80, backward))
        for cfg in every[:2] + every[-1:]:
            case = (f"tune small D=80 window {'bwd' if backward else 'fwd'} "
                    + " ".join(f"{k}={v}" for k, v in cfg.items()))
            got = {r["op"] for r in rows if r["case"] == case}
            assert got == kernels, (case, got)
            assert all(int(r["num_warps"]) == cfg["num_warps"] for r in rows if r["case"] == case)
    int8 = [r for r in rows if r["case"].startswith("tune int8 ")]
    assert {r["op"] for r in int8} == {"_int8_gemm_kernel"}
    assert {r["case"].split()[2] for r in int8} == {"1280->5120", "5120->1280"} and len(int8) == 4
    assert sorted(int(r["num_stages"]) for r in int8) == [3, 3, 4, 4]
