"""``torchrun --nproc_per_node 2`` (gloo, CPU) computes the same run as one process with the same global batch."""

import csv
import os
import subprocess
import sys

import numpy as np
import pytest
import skimage.data as data
import torch
from PIL import Image

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "distill_ddp_worker.py")


def _run(args, env_extra=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env_extra or {}))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _log(path):
    with open(path) as f:
        return list(csv.DictReader(f))


METHODS = ("dld", "full_stage")


@pytest.mark.whole_program
def test_two_processes_match_one(tmp_path):
    """Both methods in one launch each (one process, then torchrun with two), compared method by method."""
    images = tmp_path / "images"
    images.mkdir()
    for name in ("astronaut", "coffee", "chelsea", "rocket", "cat"):
        Image.fromarray(getattr(data, name)()).save(images / f"{name}.png")
    _run([sys.executable, WORKER, str(images), str(tmp_path / "one"), ",".join(METHODS)])
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", WORKER,
          str(images), str(tmp_path / "two"), ",".join(METHODS)])
    for method in METHODS:
        one, two = tmp_path / "one" / method, tmp_path / "two" / method
        assert sorted(f for f in os.listdir(two) if f.startswith("rank")) == ["rank0_of_2", "rank1_of_2"]
        assert [f for f in os.listdir(one) if f.startswith("rank")] == ["rank0_of_1"]
        rows1, rows2 = _log(one / "train_log.csv"), _log(two / "train_log.csv")
        assert len(rows1) == len(rows2) == (5 if method == "dld" else 3)
        for r1, r2 in zip(rows1, rows2):
            assert r1["stage"] == r2["stage"]
            for k in r1:
                if k not in ("step", "stage"):
                    np.testing.assert_allclose(float(r2[k] or 0), float(r1[k] or 0), rtol=2e-4, atol=1e-7,
                                               err_msg=f"{method} {k}")
        s1 = torch.load(one / "student.pt", weights_only=True)["model"]
        s2 = torch.load(two / "student.pt", weights_only=True)["model"]
        for k in s1:
            torch.testing.assert_close(s2[k], s1[k], rtol=1e-4, atol=1e-5, msg=f"{method} {k}")
        assert sum(not torch.equal(s1[k], v) for k, v in torch.load(one / "checkpoints" / "last.pt",
                                                                     weights_only=True)["student"].items()) == 0
