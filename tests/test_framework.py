"""Package install, lean import, and the backend dispatch mechanism."""

import io
import os
import subprocess
import sys
import warnings

import pytest
import torch

import sam_fast
from sam_fast._dispatch import Backend, BackendUnavailableError, Refusal, dispatch


def test_import_initialises_no_cuda():
    code = ("import torch, sam_fast, sam_fast.kernels.dilated_attention; "
            "assert not torch.cuda.is_initialized(), 'CUDA initialised at import'; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_public_names_resolve_and_are_all_exported():
    """Every lazily exported name resolves and is in ``__all__`` (``from sam_fast import *`` gets it);
    ``dir()`` lists them and the submodules, and no helper of the package's own plumbing."""
    assert set(sam_fast.__all__) == set(sam_fast._EXPORTS)
    for name in sam_fast.__all__:
        assert getattr(sam_fast, name) is not None
    listed = set(dir(sam_fast))
    assert set(sam_fast._EXPORTS) | set(sam_fast._SUBMODULES) <= listed
    assert not {n for n in listed if n.startswith("_") and not n.startswith("__")}
    assert "importlib" not in listed and "__version__" in listed
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        sam_fast.nope


def test_kernels_are_a_subpackage_not_a_top_level_module():
    import sam_fast.kernels

    assert sam_fast.kernels.__name__ == "sam_fast.kernels"
    # PyPI has a `kernels` of its own (transformers depends on it): the top-level name may exist, but is never ours
    code = "import importlib.util as u; s = u.find_spec('kernels'); print(s.origin if s else '')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert out.returncode == 0, out.stderr
    origin = out.stdout.strip()
    ours = os.path.dirname(os.path.abspath(sam_fast.kernels.__file__))
    assert not origin or (os.path.dirname(os.path.abspath(origin)) != ours
                          and not os.path.exists(os.path.join(os.path.dirname(origin), "dilated_attention")))


def test_extension_loaded_with_cpu_kernels():
    from sam_fast.ops._ext import extension_error

    assert extension_error() is None
    assert torch._C._dispatch_has_kernel_for_dispatch_key("sam_fast::resize_rel_pos", "CPU")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the extension is built with OpenMP on Linux")
def test_extension_cpu_ops_use_every_intra_op_thread():
    """The C++ CPU ops' at::parallel_for regions are compiled into the extension: built without OpenMP they would
    all run on one thread whatever torch.set_num_threads says. One parallel_for of 8 tasks runs on exactly as
    many threads as torch's intra-op setting, and on one when it is 1."""
    from sam_fast.ops._ext import extension_error

    assert extension_error() is None
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert torch.ops.sam_fast.parallel_threads(8) == 2
        torch.set_num_threads(1)
        assert torch.ops.sam_fast.parallel_threads(8) == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(RuntimeError, match="tasks must be in"):
        torch.ops.sam_fast.parallel_threads(0)


def _table(log):
    def mk(name, refusal):
        return Backend(name, lambda x, explicit: refusal, lambda x: log.append(name) or name)

    return (
        mk("triton", Refusal("head dim 200 > 128")),
        mk("cuda", Refusal("needs CUDA tensors", wrong_device=True)),
        mk("cpu", None),
        mk("reference", None),
    )


def test_auto_fallback_is_recorded_and_warned():
    log = []
    with sam_fast.record_backends() as rec, pytest.warns(sam_fast.SamFastFallbackWarning, match="head dim 200"):
        assert dispatch("demo_op", _table(log), "auto", 1) == "cpu"
    assert rec.calls == [("demo_op", "cpu")]
    assert rec.fallbacks[0].passed_over == (("triton", "head dim 200 > 128"),)


def test_wrong_device_refusal_is_not_a_fallback():
    log = []
    table = _table(log)[1:]
    with sam_fast.record_backends() as rec, warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dispatch("demo_op2", table, "auto", 1) == "cpu"
    assert rec.fallbacks == []


def test_explicit_refusal_and_no_backend_list_reasons():
    log = []
    with pytest.raises(BackendUnavailableError, match="backend='triton' refused these inputs: head dim 200"):
        dispatch("demo_op", _table(log), "triton", 1)
    none = tuple(Backend(n, lambda x, explicit, n=n: Refusal(f"{n} says no"), None) for n in ("triton", "cpu"))
    with pytest.raises(BackendUnavailableError) as info:
        dispatch("demo_op", none, "auto", 1)
    assert "triton: triton says no" in str(info.value) and "cpu: cpu says no" in str(info.value)
    with pytest.raises(BackendUnavailableError, match="not implemented for this op"):
        dispatch("demo_op", none, "cuda", 1)
    assert log == []


def test_results_csv_keeps_columns_by_name(tmp_path):
    """bench/results files grow: a run with a column the file lacks, and a merge of another machine's
    CSV (tools/merge_results.py), must not shift values under the wrong header."""
    import csv

    from sam_fast.bench.harness import append_csv
    from tools.merge_results import merge

    path = tmp_path / "into" / "bench_x.csv"
    append_csv(str(path), [dict(case="a", backend="b", median_ms=1.5)])
    append_csv(str(path), [dict(case="c", backend="d", median_ms=2.5, sqnr_db=40.0)], ["sqnr_db"])
    other = tmp_path / "gpu"
    append_csv(str(other / "bench_x.csv"), [dict(timestamp="t1", case="e", backend="f", gbps=3.0)], ["gbps"])
    merge(str(other), str(path.parent))
    merge(str(other), str(path.parent))  # the same rows again: skipped
    rows = list(csv.DictReader(open(path)))
    assert [(r["case"], r["backend"], r["median_ms"], r["sqnr_db"], r["gbps"]) for r in rows] == [
        ("a", "b", "1.5", "", ""), ("c", "d", "2.5", "40", ""), ("e", "f", "", "", "3")]


def test_live_rows_reach_the_csv_before_the_script_ends(tmp_path):
    """A GPU stage killed by its time limit keeps what it measured: LiveRows writes each row when added,
    and save_results does not write them a second time."""
    import csv

    from sam_fast.bench.harness import LiveRows, save_results

    rows = LiveRows(str(tmp_path), "bench_x", ["sqnr_db"])
    rows.append(dict(op="o", case="a", backend="base", mode="fwd", median_ms=2.0))
    path = tmp_path / "bench_x.csv"
    assert [r["case"] for r in csv.DictReader(open(path))] == ["a"]
    rows += [dict(op="o", case="a", backend="ours", mode="fwd", median_ms=1.0, sqnr_db=41.0)]
    got = list(csv.DictReader(open(path)))
    assert [(r["backend"], r["sqnr_db"]) for r in got] == [("base", ""), ("ours", "41")]
    save_results(str(tmp_path), "bench_x", rows, "base", "title")
    assert len(list(csv.DictReader(open(path)))) == 2
    assert (tmp_path / "bench_x.png").exists()


def test_progress_lines_without_a_terminal(capsys):
    """In a GPU stage's log (no terminal) progress is one flushed line per item, so a log cut short shows
    where the run was; the items pass through unchanged."""
    from sam_fast.bench.harness import progress

    assert list(progress(["x", "y"], "cases", lambda c: c.upper())) == ["x", "y"]
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("cases [1/2] X (at ") and out[1].startswith("cases [2/2] Y (at ")


def test_fresh_empty_tensors_are_poisoned_in_cpu_tests():
    """conftest fills torch.empty / empty_like / new_empty with NaN or -77 / 177, so a kernel or launcher
    reading memory it never wrote fails here as it would on a GPU (where recycled memory is garbage)."""
    assert torch.empty(4).isnan().all() and torch.empty_like(torch.ones(2, dtype=torch.bfloat16)).isnan().all()
    assert (torch.empty(3, dtype=torch.int8) == -77).all()
    assert (torch.ones(1).new_empty(2, dtype=torch.uint8) == 177).all()


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_atomically_written_files_get_the_permissions_open_gives(tmp_path, umask):
    """Everything sam_fast writes goes through write_atomic (student.pt, checkpoints, eval.json, segment output,
    dataset shards): the file must get 0o666 less the umask, as open() would give it, not mkstemp's 0o600."""
    from sam_fast._files import write_atomic
    from sam_fast.checkpoint import save_sam
    from sam_fast.models import tiny_sam

    old = os.umask(umask)
    try:
        def write(tmp):
            with open(tmp, "w") as f:
                f.write("x")

        write_atomic(str(tmp_path / "a.json"), write)
        save_sam(tiny_sam(), str(tmp_path / "b.pt"))
        with open(tmp_path / "c.txt", "w") as f:
            f.write("x")
    finally:
        os.umask(old)
    want = 0o666 & ~umask
    for name in ("a.json", "b.pt", "c.txt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == want, name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.pt", "c.txt"]  # no temporary file left


@pytest.mark.parametrize("value, off", [("0", False), ("", False), ("false", False), ("1", True), ("yes", True)])
def test_cpu_feature_flags_read_as_documented(value, off):
    """SAM_FAST_CPU_NO_AVX512 / _NO_AMX switch a path off unless empty, 0, false, no or off: '=0' used to switch
    AVX-512 off too. The C++ side (csrc/cpu/cpu.h) and Python read them alike."""
    code = ("import torch, sam_fast; from sam_fast import cpu_features as c; from sam_fast.ops._ext import "
            "extension_error; assert extension_error() is None; print(sorted(c.switched_off()), "
            "c.env_flag('SAM_FAST_CPU_NO_AVX512'), int(torch.ops.sam_fast.cpu_features(-1)))")
    env = dict(os.environ, SAM_FAST_CPU_NO_AVX512=value, SAM_FAST_CPU_NO_AMX=value)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    want = "['amx', 'avx512'] True 3" if off else "[] False 0"
    assert out.stdout.strip() == want


def test_cpu_features_switch_in_process_and_come_back():
    from sam_fast import cpu_features

    before = cpu_features.switched_off()
    with cpu_features.disable(avx512=True):
        assert "avx512" in cpu_features.switched_off() and not cpu_features.avx512()
        with cpu_features.disable(amx=True):
            assert cpu_features.switched_off() == {"avx512", "amx"} and not cpu_features.amx()
        assert cpu_features.switched_off() == before | {"avx512"}
    assert cpu_features.switched_off() == before
    with pytest.raises(TypeError, match="avx512 must be a bool"):
        with cpu_features.disable(avx512="yes"):
            pass


def test_cpu_description_names_the_instruction_sets_the_paths_choose_by(monkeypatch):
    """Benchmark rows say which CPU measured them: its model name, core count and the instruction sets that decide
    the CPU paths, as /proc/cpuinfo lists them (read from a file like it here, since CI's CPU differs)."""
    import builtins

    from sam_fast import cpu_features

    real_open = builtins.open
    info = ("processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\n"
            "flags\t\t: fpu sse avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8\n\n"
            "processor\t: 1\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\nflags\t\t: fpu\n")

    def fake_open(path, *args, **kwargs):
        if path == "/proc/cpuinfo":
            return io.StringIO(info)
        return real_open(path, *args, **kwargs)

    cpu_features.describe.cache_clear()
    monkeypatch.setattr(builtins, "open", fake_open)
    try:
        got = cpu_features.describe()
    finally:
        monkeypatch.undo()
        cpu_features.describe.cache_clear()
    assert got == f"Intel(R) Xeon(R) Platinum 8480+, {os.cpu_count()} cores; avx512 vnni avx512-bf16 amx-bf16 amx-int8"
    assert cpu_features.describe().count(";") == 1  # this machine's own line


def test_cpu_policy_is_one_frozen_checked_object():
    """The CPU policy: frozen, every field type- and range-checked, unknown fields named; ``use`` puts changes in
    force for a ``with`` block and restores the policy after it, also on an error; the paths read it per call."""
    import dataclasses

    from sam_fast import cpu_policy

    before = cpu_policy.policy()
    with pytest.raises(dataclasses.FrozenInstanceError):
        before.plain_max_tokens = 3
    with pytest.raises(TypeError, match="plain_max_tokens must be an int"):
        cpu_policy.CpuPolicy(plain_max_tokens=1.5)
    with pytest.raises(TypeError, match="int8_half_stays_float must be a bool"):
        cpu_policy.CpuPolicy(int8_half_stays_float=1)
    with pytest.raises(ValueError, match="bias_chunk_bytes must be an int >= 0"):
        cpu_policy.CpuPolicy(bias_chunk_bytes=-1)
    with pytest.raises(TypeError, match="no field 'min_keys'"):
        before.replace(min_keys=3)
    with pytest.raises(TypeError, match="must be a sam_fast.cpu_policy.CpuPolicy"):
        cpu_policy.set_policy({"plain_max_tokens": 0})
    with pytest.raises(RuntimeError, match="inside"):
        with cpu_policy.use(sam_block_min_keys=7) as p:
            assert p is cpu_policy.policy() and p.sam_block_min_keys == 7
            assert p.plain_max_tokens == before.plain_max_tokens
            raise RuntimeError("inside")
    assert cpu_policy.policy() is before
    assert cpu_policy.DEFAULT == cpu_policy.CpuPolicy() and cpu_policy.DEFAULT.plain_max_tokens == 1024


def test_every_cpu_op_has_its_stem_in_each_layer():
    """Every C++ op file's stem names its registration, its reference and its tests, and a benchmark times it (a
    file named after it, or rows with its op name): ``git ls-files '*<stem>*'`` finds each layer."""
    import glob

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    infra = {"cpu_features", "parallel_probe"}  # CPU features and the thread probe: no op of their own
    stems = sorted({os.path.basename(f)[:-4] for f in glob.glob(os.path.join(root, "csrc", "cpu", "*.cpp"))} - infra)
    assert {"rel_pos_attention", "sam_block_attention", "decomposed_bias", "linear_epilogue"} <= set(stems)
    missing = []
    for stem in stems:
        for layer in (f"sam_fast/ops/{stem}.py", f"sam_fast/reference/{stem}.py", f"tests/test_{stem}.py"):
            if not os.path.exists(os.path.join(root, layer)):
                missing.append(layer)
        benches = glob.glob(os.path.join(root, "bench", "bench_*.py"))
        if not any(stem in os.path.basename(b) or f'op="{stem}' in open(b).read() for b in benches):
            missing.append(f"a benchmark of {stem}")
    assert not missing, missing
