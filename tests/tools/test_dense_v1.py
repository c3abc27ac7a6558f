"""tools/dense_v1.py: the first dense kernel for bench_dilated_attention's ``dense_v1`` peer, from git history or,
where the checkout has no history (the GPU machine), from the file $SAM_FAST_DENSE_V1_KERNEL names."""

import os
import shutil
import subprocess

import pytest

from tools import dense_v1

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHA = "26dab31"


def _has_history():
    if shutil.which("git") is None:
        return False
    proc = subprocess.run(["git", "cat-file", "-e", f"{SHA}^{{commit}}"], cwd=ROOT, capture_output=True)
    return proc.returncode == 0


@pytest.mark.skipif(not _has_history(), reason="a checkout without the project's history (a shallow clone)")
def test_first_kernel_comes_from_git_history():
    src = dense_v1.dense_v1_source(SHA)
    assert src is not None and "def dilated_attention_fwd" in src


def test_without_history_the_named_file_is_read_or_the_row_is_left_out(tmp_path, monkeypatch, capsys):
    kernel = tmp_path / "first.py"
    kernel.write_text("def dilated_attention_fwd():\n    return 1\n")
    monkeypatch.setenv(dense_v1.DENSE_V1_ENV, str(kernel))
    assert dense_v1.dense_v1_source("0000000") == kernel.read_text()  # no such commit: the file instead
    monkeypatch.delenv(dense_v1.DENSE_V1_ENV)
    assert dense_v1.dense_v1_source("0000000") is None and dense_v1.dense_v1_kernel("0000000") is None
    assert "no dense_v1@0000000 row" in capsys.readouterr().err
