"""tools/gpu_verify.py, the one-call GPU check, tested without a GPU: its plan fits 480 s, every performance
target has a stage that writes the rows it reads, every kernel has a smoke test, and its limits, install
staging and verdict parsing work."""

import glob
import importlib
import os
import re
import subprocess
import sys
import time

import pytest

from tools import gpu_verify as gv
from tools import targets

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_dry_run_plans_every_stage_within_480_s_and_runs_nothing(tmp_path):
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, "tools/gpu_verify.py", "verify", "--dry-run", "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    stages = gv.verify_stages(str(out / "pack"))
    assert sum(s.budget for s in stages) <= gv.VERIFY_BUDGET_S == 480
    for s in stages:
        assert re.search(rf"^{re.escape(s.name)}\s+{s.budget}s", res.stdout, re.M), s.name
    assert re.search(rf"^total\s+{sum(s.budget for s in stages)}s\s+of 480 s$", res.stdout, re.M)
    assert not out.exists()  # planned, not executed
    names = [s.name for s in stages]
    # ordered by value: install, smoke, the targets, the measurements no target reads yet (export, Hiera attention,
    # SAM 2's segment everything), the sanitizer, the table
    assert names[:2] == ["install", "smoke"]
    assert names[-5:] == ["bench_export", "bench_hiera_attention", "bench_everything_sam2", "sanitize", "report"]
    assert all(n.startswith("targets:") for n in names[2:-5])
    budget = {s.name: s.budget for s in stages}
    assert budget["smoke"] <= 120 and budget["sanitize"] <= 60


def test_full_mode_plans_and_rejects_unknown_stages(tmp_path):
    res = subprocess.run([sys.executable, "tools/gpu_verify.py", "full", "tests", "tune_int8", "--dry-run"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    planned = re.findall(r"^(\S+)\s+\d+s", res.stdout, re.M)
    assert planned == ["install", "tests", "tune_int8", "report", "total"]
    bad = subprocess.run([sys.executable, "tools/gpu_verify.py", "full", "no_such_stage", "--dry-run"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "unknown stages ['no_such_stage']" in bad.stderr


def _planned_results(script):
    """What a targets run of ``script`` would write (its planned_rows), as CSV rows of one run."""
    mod = importlib.import_module(f"sam_fast.bench.{script}")
    rows = []
    for r in mod.planned_rows(targets=True):
        rows.append(dict(r, timestamp="2026-01-01T00:00:00", device="cpu (x86_64, 16 cores)" if r.get("on_cpu")
                         else "NVIDIA H200", median_ms="1.0", value="1000", roofline_frac="0.7", peak_mem_mb="100"))
    return rows


@pytest.mark.parametrize("target", [t for t in targets.TARGETS if not t.measured_here], ids=lambda t: t.text[:48])
def test_every_target_has_a_stage_that_writes_its_rows(target):
    stages = [s for s in gv.verify_stages("/nowhere") if target.script in s.measures]
    assert stages, f"no verify stage runs {target.script}"
    assert "--targets" in stages[0].command
    verdict = targets.evaluate(target, _planned_results(target.script))
    assert verdict.status != "not measured", f"{target.script} --targets writes no row that {target.text!r} reads"


def test_targets_measured_on_the_cpu_machine_read_their_scripts_rows():
    """The CPU path's targets are measured here, by the scripts themselves: rows shaped as bench_cpu_blocks,
    bench_e2e (1024 px CPU run) and bench_int8_linear (full CPU run) write them give each a verdict, the
    figure their times make."""
    from sam_fast.bench import bench_cpu_blocks, bench_int8_linear

    here = [t for t in targets.TARGETS if t.measured_here]
    assert here and {t.script for t in here} == {"bench_cpu_blocks", "bench_e2e", "bench_int8_linear"}

    def rows(op, cases, ms):
        return [dict(op=op, case=c, backend=p, mode="fwd", median_ms=str(t), timestamp="2026-01-01T00:00:00",
                     device="cpu (x86_64, 2 cores)") for c in cases for p, t in ms.items()]

    models = [f"{m} B=1 {dt}" for m in ("vit_b", "slimsam_77", "slimsam_50") for dt in ("float32", "bfloat16")]
    written = {  # script: (rows, the figure every target of the script reads from them)
        "bench_cpu_blocks": (rows("cpu_block", [f"{b[0]} {dt} t{t}" for b in bench_cpu_blocks.BLOCKS
                                                for dt in ("float32", "bfloat16") for t in (1, 2)],
                                  {bench_cpu_blocks.BASELINE: 3.0, "sdpa_mask": 3.0, "sdpa_mask_compiled": 3.0,
                                   "sam_fast(cpu)": 2.0}), 1.5),
        "bench_e2e": (rows("image_encoder", models, {"segment_anything": 16.0, "sdpa_bias": 12.0,
                                                     "sam_fast_exact": 4.0, "sam_fast_exact_int8": 2.0}), None),
        "bench_int8_linear": (rows("int8_linear", [bench_int8_linear._case_name(m, M, K, N)
                                                   for M, m, K, N in bench_int8_linear.cases(False)],
                                   {"torch_fp32": 6.0, "int_mm+separate": 4.0, "sam_fast(cpu)": 2.0}), 3.0),
    }
    for t in here:
        script_rows, figure = written[t.script]
        if figure is None:  # bench_e2e: SlimSAM-77 against segment_anything, int8 against float
            figure = 4.0 if t.threshold > 2 else 2.0
        verdict = targets.evaluate(t, script_rows)
        assert verdict.status == "met" and verdict.worst == pytest.approx(figure), t.text


def test_targets_mode_is_smaller_than_the_full_run():
    for script in ("bench_int8_linear", "bench_dilated_attention", "bench_e2e", "bench_everything"):
        mod = importlib.import_module(f"sam_fast.bench.{script}")
        assert 0 < len(mod.planned_rows(targets=True)) < len(mod.planned_rows(targets=False)), script


def test_smoke_subset_covers_every_kernel():
    """Every Triton kernel in kernels/ and every CUDA op in csrc/ has an entry, and every test an entry
    names is collected by -m 'gpu and smoke'."""
    triton_kernels, cuda_ops = set(), set()
    for path in glob.glob(os.path.join(ROOT, "kernels", "**", "*.py"), recursive=True):
        with open(path) as f:
            triton_kernels |= set(re.findall(r"@triton\.jit\s*\ndef (_\w+_kernel)\(", f.read()))
    for path in glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")):
        with open(path) as f:
            cuda_ops |= set(re.findall(r'm\.impl\("(\w+)"', f.read()))
    assert len(triton_kernels) >= 8 and cuda_ops == {"mask_postprocess", "resize_rel_pos"}
    assert set(gv.SMOKE_KERNELS) == {f"triton {k}" for k in triton_kernels} | {f"cuda {o}" for o in cuda_ops}
    res = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu and smoke", "--collect-only", "-q",
                          "-p", "no:cacheprovider", "tests"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    collected = [line.split("::")[1] for line in res.stdout.splitlines() if "::" in line]
    names = {c.split("[")[0] for c in collected}
    for kernel, tests in gv.SMOKE_KERNELS.items():
        assert set(tests) & names, f"{kernel}: none of {tests} is in the smoke subset"
    # SAM's blocks: ViT-B global, ViT-H window at D=80, 2-D r=2, the LongNet mix with and without rel-pos
    attention = " ".join(c for c in collected if "kernel_vs_reference" in c)
    for case in ("12, 64, None", "16, 80, (14, 14), True", "D64-1br-rel0", "D64-3br-rel0", "D64-3br-rel1"):
        assert case in attention, case
    assert len(collected) <= 24  # about two minutes on 8 workers


def _junit(path, cases):
    body = []
    for name, outcome in cases:
        inner = {"passed": "", "failed": "<failure message='x'/>", "skipped": "<skipped/>"}[outcome]
        body.append(f'<testcase classname="tests.test_int8_linear" name="{name}" time="1">{inner}</testcase>')
    path.write_text(f'<testsuites><testsuite name="pytest">{"".join(body)}</testsuite></testsuites>')


def test_smoke_verdicts_read_the_junit_report(tmp_path):
    xml = tmp_path / "smoke.xml"
    _junit(xml, [("test_kernel_vs_reference_real_shapes[a]", "passed"),
                 ("test_dilated_kernel_vs_reference_real_shapes[b]", "failed"),
                 ("test_int8_gemm_real_shapes[4096-1280-5120]", "passed"),
                 ("test_int8_gemm_real_shapes[333-40-50]", "passed"),
                 ("test_layer_norm_quantize_real_shape", "skipped")])
    v = gv.smoke_verdicts(str(xml))
    assert v["triton _dilated_attention_fwd_kernel"] == "FAILED: test_dilated_kernel_vs_reference_real_shapes[b]"
    assert v["triton _int8_gemm_kernel"] == "ok (2 tests)"
    assert v["triton _layer_norm_quantize_kernel"] == "not run"
    assert v["cuda resize_rel_pos"] == "not run"
    assert all(x == "not run" for x in gv.smoke_verdicts(str(tmp_path / "missing.xml")).values())


def test_run_bounded_stops_the_whole_process_group(tmp_path):
    pid_file = tmp_path / "child.pid"
    code = ("import subprocess, sys, time\n"
            "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
            f"open({str(pid_file)!r}, 'w').write(str(p.pid))\n"
            "time.sleep(120)\n")
    t0 = time.monotonic()
    exit_code, secs = gv.run_bounded([sys.executable, "-c", code], 2.0, str(tmp_path / "log"), dict(os.environ))
    assert exit_code is None and time.monotonic() - t0 < 30
    child = int(pid_file.read_text())
    time.sleep(0.5)
    try:  # the grandchild went with its group: gone, or a zombie waiting for init to reap it
        with open(f"/proc/{child}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        state = "gone"
    assert state in ("gone", "Z", "X"), state


def test_execute_bounds_each_stage_and_skips_what_no_longer_fits(tmp_path):
    session = gv.Session(str(tmp_path), budget=26, pack=str(tmp_path / "pack"))
    session.mode = "verify"
    py = sys.executable
    stages = [gv.Stage("slow", 3, "sleeps past its budget", command=[py, "-c", "import time; time.sleep(60)"]),
              gv.Stage("quick", 2, "fits", command=[py, "-c", "print('hello')"]),
              gv.Stage("late", 100, "no longer fits", command=[py, "-c", "print('never')"]),
              gv.Stage("report", 10, "", action=None)]
    t0 = time.monotonic()
    gv.execute(session, stages)
    outcomes = dict(session.outcomes)
    assert outcomes["slow"].verdict == "timed out" and outcomes["slow"].seconds < 20
    assert outcomes["quick"].verdict == "ok"
    assert outcomes["late"].verdict == "skipped"  # 26 s less the time spent and the report's 15 s < 30 s
    assert time.monotonic() - t0 < 25
    assert "hello" in (tmp_path / "pack" / "quick.log").read_text()
    assert not (tmp_path / "pack" / "late.log").exists()


@pytest.mark.whole_program
def test_stage_package_assembles_sam_fast_from_the_working_tree(tmp_path, monkeypatch):
    """The prebuilt install path: sam_fast/ linked, kernels/ and bench/ as its subpackages, the extension
    copied in; a fresh interpreter imports it from there with its C++ ops registered."""
    built = glob.glob(os.path.join(ROOT, "sam_fast", "_C*.so"))
    if not built:  # pragma: no cover - an install without the in-place extension
        import sam_fast

        built = glob.glob(os.path.join(os.path.dirname(sam_fast.__file__), "_C*.so"))
    assert built, "the compiled extension is part of the install"
    gv.stage_package(built[0], str(tmp_path / "stage"))
    code = ("import sam_fast, sam_fast.kernels, sam_fast.bench.harness as h; "
            "from sam_fast.ops._ext import extension_error; assert extension_error() is None, extension_error(); "
            "print(sam_fast.__file__); print(sam_fast.kernels.__file__)")
    res = subprocess.run([sys.executable, "-c", code], cwd=str(tmp_path), capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(tmp_path / "stage")), timeout=120)
    assert res.returncode == 0, res.stderr
    first, second = res.stdout.split()
    assert first.startswith(str(tmp_path / "stage")) and os.path.realpath(second) == os.path.join(
        ROOT, "kernels", "__init__.py")


def test_prebuilt_extension_is_refused_when_the_sources_changed(tmp_path, monkeypatch):
    monkeypatch.setattr(gv, "PREBUILT", str(tmp_path))
    assert "none prepared" in gv._prebuilt_refusal(dict(os.environ))
    (tmp_path / "BUILD_INFO.json").write_text('{"source_sha256": "0", "python": "3.12", "torch": "2.11.0"}')
    assert "csrc/ or setup.py changed" in gv._prebuilt_refusal(dict(os.environ))
    import json

    (tmp_path / "BUILD_INFO.json").write_text(json.dumps({"source_sha256": gv.source_hash(), "python": "2.7",
                                                          "torch": "0.1"}))
    assert "prepared for Python 2.7 / torch 0.1" in gv._prebuilt_refusal(dict(os.environ))


def test_table_reports_kernels_targets_and_sanitizer(tmp_path):
    session = gv.Session(str(tmp_path), budget=480, pack=str(tmp_path / "pack"))
    session.mode = "verify"
    session.install_note = "prebuilt extension loaded in 2 s"
    _junit(tmp_path / "pack" / "smoke.xml", [("test_resize_rel_pos_cuda_matches_cpu", "passed")])
    session.outcomes = [("install", gv.Result("ok", 2)), ("smoke", gv.Result("ok", 80)),
                        ("targets:bench_e2e", gv.Result("timed out", 45, "[exit None]")),
                        ("sanitize", gv.Result("ok", 40))]
    results = {"bench_e2e": _planned_results("bench_e2e")}
    text = gv.table(session, "NVIDIA H200 | torch 2.11.0", targets.records(results))
    lines = text.splitlines()
    assert lines[0].startswith("sam_fast verify on NVIDIA H200")
    assert "| install | ok | prebuilt extension loaded in 2 s |" in lines
    assert "| smoke cuda resize_rel_pos | ok | 1 tests |" in lines
    assert "| smoke triton _int8_gemm_kernel | not run |  |" in lines
    assert "| sanitize (memcheck) | clean | exit 0 |" in lines
    assert "| stage targets:bench_e2e | timed out | [exit None] |" in lines
    target_lines = [ln for ln in lines if ln.startswith("| target: ")]
    assert len(target_lines) == len(targets.TARGETS)
    measured = [ln for ln in target_lines if "| met |" in ln or "| MISSED |" in ln]
    assert len(measured) == 1 and "| MISSED | 1.00x (vit_h B=8 bfloat16) |" in measured[0]  # equal times: 1.0x
    assert sum("| not measured | - |" in ln for ln in target_lines) == len(targets.TARGETS) - 1


def test_main_leaves_the_table_log_and_session_archive_in_out(tmp_path, monkeypatch, capsys):
    """The whole driver with two cheap stages in place of the GPU ones: $OUT gets verify.md, verify.log and
    session.tgz (the stage logs and results/ inside), and the table is the last thing printed."""
    import tarfile

    py = sys.executable
    fake = [gv.Stage("install", 5, "stand-in", action=lambda session, timeout: gv.Result("ok", 0.1)),
            gv.Stage("targets:stand-in", 20, "writes a CSV", measures=("bench_decoder",),
                     command=[py, "-c", "import os, sys; os.makedirs(sys.argv[1], exist_ok=True); "
                                        "open(os.path.join(sys.argv[1], 'bench_decoder.csv'), 'w').write('x')",
                              "RESULTS"]),
            gv.Stage("report", 10, "", action=None)]

    def stages(pack):
        fake[1].command[-1] = os.path.join(pack, "results")
        return fake

    monkeypatch.setattr(gv, "verify_stages", stages)
    out = tmp_path / "out"
    code = gv.main(["verify", "--out", str(out)])
    printed = capsys.readouterr().out.rstrip().splitlines()
    assert code == 0
    assert sorted(os.listdir(out)) == ["session.tgz", "verify.log", "verify.md"]
    table = (out / "verify.md").read_text().rstrip().splitlines()
    assert printed[-len(table):] == table and table[0].startswith("sam_fast verify on ")
    assert "| install | ok |" in table[4]
    assert sum("| not measured |" in ln for ln in table) == len(targets.TARGETS)  # 'x' is no CSV of rows
    with tarfile.open(out / "session.tgz") as tar:
        names = tar.getnames()
    assert "./results/bench_decoder.csv" in names and "./targets_stand-in.log" in names


def test_merge_results_merges_into_the_committed_results_by_default():
    from tools.merge_results import DEFAULT_INTO

    assert os.path.samefile(DEFAULT_INTO, os.path.join(ROOT, "bench", "results"))


def test_merge_results_takes_the_session_archive(tmp_path, capsys):
    import tarfile

    from sam_fast.bench.harness import append_csv
    from tools import merge_results

    pack = tmp_path / "pack"
    append_csv(str(pack / "results" / "bench_decoder.csv"),
               [dict(timestamp="t", git_sha="abc", op="mask_postprocess", case="c", backend="b", mode="fwd",
                     median_ms=1.0)])
    (pack / "targets.md").write_text("| op | target | verdict |")
    with tarfile.open(tmp_path / "session.tgz", "w:gz") as tar:
        tar.add(pack, arcname=".")
    into = tmp_path / "into"
    into.mkdir()
    assert merge_results.main([str(tmp_path / "session.tgz"), "--into", str(into)]) == 0
    printed = capsys.readouterr().out
    assert "bench_decoder.csv: 1 rows added" in printed and "| op | target | verdict |" in printed
    assert (into / "bench_decoder.csv").read_text().count("mask_postprocess") == 1
