"""Every benchmark script runs end to end on this machine (``--quick``, CPU backends, Triton under the
interpreter). A GPU session has minutes; a script that breaks on a renamed import must be caught here,
not there (bench_everything once imported a helper the CLI no longer had)."""

import csv
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from bench_checks import check_bench_rows

# `sam-fast bench` runs the other scripts' `run` functions (tests/test_cli_bench.py), which is all their command
# lines do (bench/harness.py:bench_main). Run here as scripts: those it leaves out (an optional extra), those it does
# not run, and those whose command line chooses the Triton interpreter before importing anything.
SCRIPTS = ["bench_dilated_attention_sam", "bench_dilated_attention", "bench_distill", "bench_segment_dataset",
           "bench_cpu_blocks", "bench_export", "bench_cpu_runtimes"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.whole_program
@pytest.mark.parametrize("script", SCRIPTS)
def test_bench_script_runs_on_cpu(script, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the script must set it itself
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", f"{script}.py"), "--quick", "--out",
                           str(tmp_path)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    check_bench_rows(tmp_path / f"{script}.csv")


CPU_OP_BENCHES = ["bench_decomposed_bias", "bench_linear_epilogue", "bench_rel_pos_attention",
                  "bench_sam_block_attention", "bench_hiera_attention"]


def test_every_bench_script_is_run_somewhere():
    """Each script runs here as a script, through `sam-fast bench`, or in process below; a script run only through
    `sam-fast bench` has a command line that is bench_main's and nothing more."""
    import glob

    from sam_fast.cli import BENCH_EXTRAS, BENCHES

    by_cli = {BENCHES[op] for op in BENCHES if op not in BENCH_EXTRAS}
    covered = set(SCRIPTS) | by_cli | set(CPU_OP_BENCHES) | {"bench_sam2"}  # (tests/test_hiera.py runs it)
    scripts = {os.path.basename(f)[:-3] for f in glob.glob(os.path.join(ROOT, "bench", "bench_*.py"))}
    assert scripts == covered, scripts ^ covered
    for name in by_cli - set(SCRIPTS):
        text = open(os.path.join(ROOT, "bench", f"{name}.py")).read()
        script_only = 'if __name__ == "__main__":\n    use_interpreter_without_gpu()' in text
        assert "return bench_main(__doc__, run, BASELINE, argv" in text and not script_only, \
            f"{name}'s command line does more than bench_main: run it in SCRIPTS"


@pytest.mark.parametrize("script", CPU_OP_BENCHES)
def test_cpu_op_benchmark_times_both_backends(script, tmp_path):
    """The CPU ops' benchmarks (C++ against the reference; in process: they need no interpreter) time both backends
    and agree with float64."""
    import importlib

    mod = importlib.import_module(f"sam_fast.bench.{script}")
    rows, png = mod.run(str(tmp_path), quick=True)
    assert {"reference", "sam_fast(cpu)"} <= {r["backend"] for r in rows}
    assert all(r["median_ms"] > 0 and r["value"] > 0 and r["max_err"] < 1e-4 for r in rows), rows
    assert list(csv.DictReader(open(tmp_path / f"{script}.csv")))


@pytest.mark.whole_program
def test_e2e_released_geometry_on_cpu_interleaves_its_peers(tmp_path):
    """bench_e2e's CPU run of a released geometry at 1024 px (MobileSAM's TinyViT, the quickest): every config on
    its own copy of the encoder, timed in interleaved rounds, with the SQNR beside it."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_e2e.py"), "--quick", "--models",
                           "vit_t", "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "bench_e2e.csv")))
    assert [r["backend"] for r in rows] == ["segment_anything", "sam_fast_exact", "sam_fast_exact_int8"]
    assert all(r["case"] == "vit_t B=1 float32" and float(r["median_ms"]) > 0 for r in rows)
    assert all("interleaved rounds" in r["note"] for r in rows[1:])
    assert float(rows[1]["sqnr_db"]) > 100 and 25 < float(rows[2]["sqnr_db"]) < 100  # the same function; W8A8


def test_everything_agreement_is_mean_best_iou():
    """bench_everything's agreement between two mask sets: for each reference mask the best IoU with any
    other mask, averaged; checked on masks whose IoUs are known by construction."""
    import torch
    from segment_anything.utils.amg import mask_to_rle_pytorch

    from sam_fast.bench.bench_everything import _agreement

    def records(masks):  # segment_anything's uncompressed RLE records
        return [{"segmentation": r} for r in mask_to_rle_pytorch(torch.from_numpy(np.stack(masks)))]

    a = np.zeros((8, 8), bool)
    a[:4] = True  # 32 pixels
    b = np.zeros((8, 8), bool)
    b[:2] = True  # 16 pixels inside a: IoU(a, b) = 0.5
    c = np.zeros((8, 8), bool)
    c[6:] = True  # disjoint from both
    assert _agreement(records([a, c]), records([b, c])) == pytest.approx((0.5 + 1.0) / 2)
    assert _agreement(records([a]), records([a, b])) == pytest.approx(1.0)
    assert np.isnan(_agreement([], records([a])))


def test_voronoi_scene_and_its_embedding():
    """The synthetic scene of bench_everything: every pixel belongs to its nearest seed's cell, and every
    embedding position carries the code of the cell at its centre (same cell, same code)."""
    import torch

    from sam_fast.bench.synthetic_segments import region_embedding, voronoi_labels

    labels = voronoi_labels(32, 6, seed=3)
    assert labels.shape == (32, 32) and labels.dtype == torch.int64
    g = torch.Generator().manual_seed(3)
    seeds = torch.rand(6, 2, generator=g)
    for y, x in [(0, 0), (5, 30), (17, 9), (31, 31)]:
        p = torch.tensor([(y + 0.5) / 32, (x + 0.5) / 32])
        assert int(labels[y, x]) == int(((seeds - p) ** 2).sum(1).argmin())
    assert torch.equal(voronoi_labels(32, 6, seed=3), labels)  # the same scene on every run
    emb = region_embedding(labels, channels=16, grid=8)
    assert emb.shape == (1, 16, 8, 8)
    centre = labels[2::4, 2::4]
    flat, cells = emb[0].flatten(1).T, centre.flatten()
    for i in range(64):
        for j in range(64):
            assert torch.equal(flat[i], flat[j]) == bool(cells[i] == cells[j])
    with pytest.raises(ValueError, match="n_regions"):
        voronoi_labels(8, 0)
    with pytest.raises(ValueError, match="multiple"):
        region_embedding(labels, 4, grid=5)


def test_segmenting_decoder_learns_the_scene():
    """A few hundred steps turn the random tiny decoder into one whose best mask overlaps the cell under
    the point (what makes masks survive and hierarchical mode skip points in bench_everything)."""
    from sam_fast.bench.synthetic_segments import train_segmenting_decoder
    from sam_fast.models import tiny_sam

    untrained = train_segmenting_decoder(tiny_sam(), n_regions=8, steps=10, points_per_step=16, lr=1e-9)
    trained = train_segmenting_decoder(tiny_sam(), n_regions=8, steps=200, points_per_step=32)
    assert trained["embedding"].shape == (1, 32, 16, 16) and trained["labels"].shape == (64, 64)
    assert untrained["mean_iou"] < 0.25 < 0.5 < trained["mean_iou"], (untrained["mean_iou"], trained["mean_iou"])


def test_padded_head_dim_peer_is_timed_where_the_kernels_split(monkeypatch):
    """On a GPU, cases whose head dim the kernels split (ViT-H's 80 = 64 + 16) also time sam_fast with
    the head dim padded (80 -> 128) in the same run, forward and backward: its calls and its timing run
    inside ``padded_head_dim_for``, which pads exactly for that peer."""
    import torch

    from sam_fast import Branch
    from sam_fast.bench import bench_dilated_attention, bench_dilated_attention_sam
    from sam_fast.bench.harness import PADDED_D, padded_head_dim_for
    from sam_fast.kernels.dilated_attention import tuning as kernel

    cuda = torch.device("cuda")
    names = lambda peers: [p[0] for p in peers]  # noqa: E731
    pattern = [Branch((4, 4), 2)]
    for mode in ("fwd", "fwd+bwd"):
        assert PADDED_D in names(bench_dilated_attention._peers("p", pattern, 1, 64, 2, 80, (8, 8), cuda, mode))
        assert PADDED_D in names(bench_dilated_attention_sam.peers(cuda, 80, mode))
    assert PADDED_D not in names(bench_dilated_attention._peers("p", pattern, 1, 64, 2, 64, (8, 8), cuda))
    assert PADDED_D not in names(bench_dilated_attention_sam.peers(cuda, 64))

    from attn_helpers import record_launch_configs

    configs = record_launch_configs(monkeypatch)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 64, 2, 80, generator=g).requires_grad_() for _ in range(3))
    fn = bench_dilated_attention._sam_fast(pattern, (8, 8), "triton")
    split = fn(q, k, v, 0.1)
    split.sum().backward()
    assert configs and all(c["TAIL"] for c in configs)  # forward, dK/dV and dQ launches all split
    grads = [t.grad.clone() for t in (q, k, v)]
    configs.clear()
    for t in (q, k, v):
        t.grad = None
    with padded_head_dim_for(PADDED_D):
        padded = fn(q, k, v, 0.1)
        padded.sum().backward()
    assert configs and not any(c["TAIL"] for c in configs)
    with padded_head_dim_for("sam_fast(triton)"):
        assert kernel.SPLIT_HEAD_DIM
    torch.testing.assert_close(split, padded, atol=2e-6, rtol=2e-6)
    for g_split, t in zip(grads, (q, k, v)):
        torch.testing.assert_close(g_split, t.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.whole_program
def test_microbenchmark_suite_collects_and_runs(tmp_path):
    """tools/test_microbench.py (pytest-benchmark) runs every case once with timing disabled, and the default
    test run does not collect it."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "tools/test_microbench.py", "--benchmark-disable", "-q",
                           "-p", "no:cacheprovider"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ran = re.search(r"(\d+) passed", proc.stdout)
    assert ran and int(ran.group(1)) >= 20, proc.stdout[-2000:]
    import tomllib  # the default run collects tests/ alone (a full collection to see it costs 10 s of the suite)

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        assert tomllib.load(f)["tool"]["pytest"]["ini_options"]["testpaths"] == ["tests"]


def test_distill_peer_blocks_compute_the_students_function():
    """bench_distill's gather->SDPA->scatter block is the dilated student's block, rel-pos bias included:
    same embedding, same gradients (so its step time is the same work)."""
    import torch

    from sam_fast import Branch
    from sam_fast.bench.bench_distill import PeerBlock, with_peer
    from sam_fast.distill import dilated_student
    from sam_fast.models import tiny_sam

    teacher = tiny_sam()
    student = dilated_student(teacher, [Branch((16, 16), (2, 1))], backend="reference")
    peer = with_peer(student, "gather_sdpa_scatter")
    assert [isinstance(b, PeerBlock) for b in peer.image_encoder.blocks] == [False, True, False, True]
    x = torch.randn(2, 3, 256, 256)
    a, b = student.image_encoder(x), peer.image_encoder(x)
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    a.square().sum().backward()
    b.square().sum().backward()
    ga = student.image_encoder.blocks[1].attn.rel_pos_h.grad
    gb = peer.image_encoder.blocks[1].attn.rel_pos_h.grad
    assert ga.abs().max() > 0
    torch.testing.assert_close(gb, ga, rtol=1e-3, atol=1e-4)


def test_everything_sam2_times_metas_generator_and_ours(tmp_path):
    """bench_everything --family sam2 (in process, --quick): Meta's SAM2AutomaticMaskGenerator and sam_fast's on the
    same model and features, every mask kept, and the note counting the masks equal to Meta's."""
    pytest.importorskip("sam2")
    from sam_fast.bench.bench_everything import run

    rows, png = run(str(tmp_path), quick=True, family="sam2")
    assert [r["backend"] for r in rows] == ["sam2", "sam2_b256", "sam_fast"]
    assert all(r["op"] == "everything_sam2" and r["median_ms"] > 0 for r in rows)
    masks = int(re.search(r"(\d+) masks", rows[0]["note"]).group(1))
    same = re.search(r"masks equal to Meta's float32 ones: (\d+) of (\d+)", rows[2]["note"])
    assert masks == 12 and int(same.group(2)) == masks and int(same.group(1)) >= masks - 2
    check_bench_rows(tmp_path / "bench_everything.csv")
