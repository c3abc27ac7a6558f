"""``sam-fast bench`` on a machine without a GPU: the README's main command. It must switch the Triton
kernels to the interpreter itself, before anything imports them (a CLI import that loaded a kernel
module first once broke it)."""

import os
import subprocess
import sys


def test_bench_command_checks_triton_under_the_interpreter(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = "import sys; from sam_fast.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.run([sys.executable, "-c", code, "bench", "--quick", "--ops", "attention", "--out",
                           str(tmp_path)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "triton" in proc.stdout and "speedup over" in proc.stdout
    assert (tmp_path / "bench_attention.csv").exists() and (tmp_path / "bench_attention.png").exists()
