"""tools/targets.py: the project's performance targets read from benchmark CSVs (synthetic runs here)."""

import pytest

from sam_fast.bench.harness import append_csv
from tools import targets

H100 = "NVIDIA H100 80GB HBM3"
CPU = "cpu (x86_64, 2 cores)"


def _row(ts, device, op, case, backend, ms, mode="fwd", **extra):
    return dict(timestamp=ts, git_sha="abc", device=device, op=op, case=case, backend=backend, mode=mode,
                median_ms=ms, **extra)


def _verdicts(results):
    return {t.text: targets.evaluate(t, results.get(t.script, [])) for t in targets.TARGETS}


def _dilated(ts, speed, dense_v1_ms=1.0, ours_dense_ms=1.0, roofline="0.7"):
    rows = []
    for case, pattern in (("N=4096 D=64 B=8 2d(32,32)r2", "2d(32,32)r2"),
                          ("N=4096 D=80 B=1 2d(64,64)r4", "2d(64,64)r4")):
        for mode in ("fwd", "fwd+bwd"):
            rows += [_row(ts, H100, "dilated_attention", case, "gather_sdpa_scatter", 10.0, mode, pattern=pattern),
                     _row(ts, H100, "dilated_attention", case, "flex_attention(mask_mod)", 20.0, mode, pattern=pattern),
                     _row(ts, H100, "dilated_attention", case, "sam_fast(triton)", 10.0 / speed[case], mode,
                          pattern=pattern, roofline_frac=roofline)]
    dense = "N=4096 D=64 B=1 dense"
    rows += [_row(ts, H100, "dilated_attention", dense, "dense_v1@1234", dense_v1_ms, pattern="dense"),
             _row(ts, H100, "dilated_attention", dense, "sam_fast(triton)", ours_dense_ms, pattern="dense"),
             # a CPU run, newer: must not stand in for the GPU
             _row("2099-01-01T00:00:00+00:00", CPU, "dilated_attention", "N=256 D=32 B=1 2d(8,8)r2", "sam_fast(cpu)",
                  1.0, pattern="2d(8,8)r2")]
    return rows


def test_speedups_worst_case_decides_and_names_it(tmp_path):
    rows = _dilated("2026-12-01T00:00:00+00:00",
                    {"N=4096 D=64 B=8 2d(32,32)r2": 4.0, "N=4096 D=80 B=1 2d(64,64)r4": 2.5})
    append_csv(str(tmp_path / "bench_dilated_attention.csv"), rows, ["pattern", "roofline_frac"])
    v = _verdicts(targets.read_results(str(tmp_path)))
    gather = v["forward >= 3x gather->flash->scatter, single-branch r >= 2"]
    assert gather.status == "MISSED" and gather.worst == pytest.approx(2.5) and gather.best == pytest.approx(4.0)
    assert gather.worst_case == "N=4096 D=80 B=1 2d(64,64)r4" and H100 in gather.run
    flex = v["forward >= 5x FlexAttention with mask_mod, single-branch r >= 2"]
    assert flex.status == "met" and flex.worst == pytest.approx(5.0)
    both = v["forward+backward >= 2x gather->flash->scatter, single-branch r >= 2"]
    assert both.status == "met" and all(mode == "fwd+bwd" for _, mode, _ in both.cases)
    roof = v["2-D r=2 at batch 8 within 1/0.6 of roofline (roofline_frac >= 0.6)"]
    assert roof.status == "met" and [c[0] for c in roof.cases] == ["N=4096 D=64 B=8 2d(32,32)r2"]
    dense = v["dense pattern within 5% of dense_v1, the first dense kernel (its time / ours >= 0.95)"]
    assert dense.status == "met" and dense.worst == pytest.approx(1.0)
    # nothing else was measured, and a target without rows is never met
    assert v[">= 1.6x bf16 cuBLAS on the ViT-H MLP linears at B=8, quantization included"].status == "not measured"


def test_newest_run_decides_and_peers_come_from_the_same_run(tmp_path):
    old = _dilated("2026-12-01T00:00:00+00:00",
                   {"N=4096 D=64 B=8 2d(32,32)r2": 9.0, "N=4096 D=80 B=1 2d(64,64)r4": 9.0})
    new = _dilated("2026-12-02T00:00:00+00:00",
                   {"N=4096 D=64 B=8 2d(32,32)r2": 3.5, "N=4096 D=80 B=1 2d(64,64)r4": 3.5},
                   dense_v1_ms=1.0, ours_dense_ms=1.2)
    # the new run's gather peer is missing for one case: that case is skipped, not paired with the old run's peer
    new = [r for r in new if not (r["backend"] == "gather_sdpa_scatter" and "D=80" in r["case"] and r["mode"] == "fwd")]
    path = str(tmp_path / "bench_dilated_attention.csv")
    append_csv(path, old + new, ["pattern", "roofline_frac"])
    v = _verdicts(targets.read_results(str(tmp_path)))
    gather = v["forward >= 3x gather->flash->scatter, single-branch r >= 2"]
    assert gather.run.startswith("2026-12-02") and [c[0] for c in gather.cases] == ["N=4096 D=64 B=8 2d(32,32)r2"]
    dense = v["dense pattern within 5% of dense_v1, the first dense kernel (its time / ours >= 0.95)"]
    assert dense.status == "MISSED" and dense.worst == pytest.approx(1 / 1.2)


def test_int8_absolute_target_reads_only_the_largest_shape(tmp_path):
    ts = "2026-12-01T00:00:00+00:00"
    rows = []
    for case, tops in (("vit_h M=131072 1280->5120", 950.0), ("vit_h M=131072 5120->1280", 880.0),
                       ("vit_b M=4096 768->768", 100.0)):
        rows += [_row(ts, H100, "int8_linear", case, "sam_fast", 1.0, metric="tops", value=tops),
                 _row(ts, H100, "int8_linear", case, "int_mm+separate", 1.3, metric="tops")]
    rows += [_row(ts, H100, "int8_linear", "vit_h M=32768 1280->5120", "sam_fast", 1.0),
             _row(ts, H100, "int8_linear", "vit_h M=32768 1280->5120", "cublas_bf16", 1.7),
             _row(ts, H100, "int8_linear", "vit_h M=32768 1280->3840", "cublas_bf16", 1.0),
             _row(ts, H100, "int8_linear", "vit_h M=32768 1280->3840", "sam_fast", 1.0)]
    append_csv(str(tmp_path / "bench_int8_linear.csv"), rows)
    v = _verdicts(targets.read_results(str(tmp_path)))
    tops = v[">= 900 TOPS on the largest shape"]
    assert tops.status == "MISSED" and tops.worst == 880.0 and tops.best == 950.0
    assert sorted(c[0] for c in tops.cases) == ["vit_h M=131072 1280->5120", "vit_h M=131072 5120->1280"]
    cublas = v[">= 1.6x bf16 cuBLAS on the ViT-H MLP linears at B=8, quantization included"]
    assert cublas.status == "met" and [c[0] for c in cublas.cases] == ["vit_h M=32768 1280->5120"]  # not the qkv shape
    assert v[">= 1.25x torch._int_mm + separate kernels on every shape"].status == "met"


def test_report_and_command_line(tmp_path, capsys):
    append_csv(str(tmp_path / "bench_decoder.csv"), [
        _row("2026-12-01T00:00:00+00:00", CPU, "mask_postprocess", "P=1024 256->1024x1024", "segment_anything", 100.0),
        _row("2026-12-01T00:00:00+00:00", CPU, "mask_postprocess", "P=1024 256->1024x1024", "sam_fast_cpu", 25.0)])
    out = tmp_path / "targets.md"
    assert targets.main(["--results", str(tmp_path), "--out", str(out), "--detail"]) == 0
    text = out.read_text()
    assert text.strip() == capsys.readouterr().out.strip()
    line = next(s for s in text.splitlines() if s.startswith("| mask_postprocess | CPU"))
    assert "| MISSED | 4.00x (P=1024 256->1024x1024) |" in line  # 4x < the 5x asked
    assert sum(" not measured " in s for s in text.splitlines()) == len(targets.TARGETS) - 1
    with pytest.raises(SystemExit, match="no results folder"):
        targets.read_results(str(tmp_path / "missing"))


def test_memory_target_reads_the_peak_memory_ratio():
    """A target with ratio_of="peak_mem_mb" compares the peer's peak memory with ours, not the times."""
    mem = next(t for t in targets.TARGETS if t.ratio_of == "peak_mem_mb")
    run = dict(timestamp="t", device="NVIDIA H200", op="distill_step", case="vit_b dilated-global b8",
               mode="fwd+bwd+adamw")
    rows = [dict(run, backend="sam_fast(triton)", median_ms="10", peak_mem_mb="1000"),
            dict(run, backend="gather_sdpa_scatter", median_ms="10", peak_mem_mb="1400")]
    v = targets.evaluate(mem, rows)
    assert v.status == "MISSED" and v.worst == pytest.approx(1.4)
    rows[1]["peak_mem_mb"] = "1600"
    assert targets.evaluate(mem, rows).status == "met"
