"""Verify sam_fast on a GPU in one short device call: build, smoke-test every kernel, measure every
performance target once, run compute-sanitizer, and print one verdict table.

Run through ``tools/gpu_session.sh`` (whose header has the five commands a session needs):

    python -m tools.gpu_verify prepare              on the CPU machine: wheels, prebuilt extension -> .whl/
    python -m tools.gpu_verify verify [--dry-run]   on the GPU machine: <= 480 s, stages below
    python -m tools.gpu_verify full [STAGE ...]     on the GPU machine: the long stages, <= 580 s

``verify`` runs its stages in order of value, each bounded by its own budget (time a stage leaves unused
passes to the next ones) and the whole by its own clock, so a run cut short keeps the most important
answers: the install, the kernels' smoke verdicts, one measurement per performance target against its
peers, the sanitizer. Output: progress lines, then the verdict table as the last lines; under ``$OUT``
``verify.md`` (the table; ``full.md`` for full), ``verify.log`` (everything printed) and ``session.tgz``
(``results/`` with the benchmark CSVs and plots, every stage's log, the junit XML of the tests, the targets'
table, tuned tables) - three files, under the device's eight.

``--dry-run`` plans every stage, prints its budget and command and executes nothing (the CPU test suite
checks that the budgets add up to at most 480 s and that every target of ``tools/targets.py`` has a stage
that writes the rows it reads).

This file imports only the standard library, so it runs before sam_fast is installed.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.machinery
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from typing import Callable, Dict, List, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable or "python3"
VERIFY_BUDGET_S = 480  # the whole verify call, by its own clock (the device call allows 600)
FULL_BUDGET_S = 580
CARRY = os.path.join(ROOT, ".whl")  # what prepare writes and the device call carries
PREBUILT = os.path.join(CARRY, "prebuilt")
STAGE_DIR = os.path.join(ROOT, ".stage")  # sam_fast assembled from the working tree + the prebuilt _C

# Each kernel of the package and the smoke tests (test functions in the op test files, the parametrizations
# marked ``smoke``) that run it on a GPU against its reference. The CPU test suite checks that every Triton
# kernel in kernels/ and every CUDA op in csrc/ is listed, and that every test named here is collected by
# ``-m "gpu and smoke"``.
_ATTENTION_TESTS = ("test_kernel_vs_reference_real_shapes", "test_dilated_kernel_vs_reference_real_shapes")
SMOKE_KERNELS: Dict[str, Sequence[str]] = {
    "triton _dilated_attention_fwd_kernel": _ATTENTION_TESTS,
    "triton _dilated_attention_bwd_dkdv_kernel": _ATTENTION_TESTS,
    "triton _dilated_attention_bwd_dq_kernel": _ATTENTION_TESTS,
    "triton _quantize_rows_kernel": ("test_int8_gemm_real_shapes",),
    "triton _layer_norm_quantize_kernel": ("test_layer_norm_quantize_real_shape",),
    "triton _int8_gemm_kernel": ("test_int8_gemm_real_shapes",),
    "triton _small_key_attention_kernel": ("test_small_key_attention_sam_shapes",),
    "triton _upscale_mask_product_kernel": ("test_upscale_mask_product_sam_shapes",),
    "triton _hiera_attention_kernel": ("test_triton_kernel_at_sam2_shapes",),
    "cuda mask_postprocess": ("test_mask_postprocess_cuda_matches_cpu",),
    "cuda resize_rel_pos": ("test_resize_rel_pos_cuda_matches_cpu",),
}


@dataclasses.dataclass
class Result:
    verdict: str  # "ok", "FAILED", "timed out", "skipped", "not run"
    seconds: float = 0.0
    detail: str = ""


@dataclasses.dataclass
class Stage:
    name: str
    budget: int  # seconds
    what: str
    command: Optional[List[str]] = None  # a subprocess (timeout = budget + time saved earlier)
    action: Optional[Callable[["Session", float], Result]] = None  # or an in-process step
    measures: Sequence[str] = ()  # bench scripts whose rows (for tools/targets.py) it writes
    log: str = ""


class Session:
    """One verify/full run: its clock, output folders, environment and stage results."""

    def __init__(self, out: str, budget: int, dry: bool = False, pack: Optional[str] = None):
        self.out = out
        # what session.tgz holds, kept outside $OUT: the device returns at most 8 files from there
        self.pack = pack or tempfile.mkdtemp(prefix="sam_fast_pack_")
        self.results = os.path.join(self.pack, "results")
        self.t0 = time.monotonic()
        self.budget = budget
        self.dry = dry
        self.saved = 0.0
        self.outcomes: List[tuple] = []  # (stage, Result)
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.install_note = ""
        if not dry:
            os.makedirs(self.results, exist_ok=True)
            self._log = open(os.path.join(out, "verify.log"), "a")

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def say(self, text: str) -> None:
        print(text, flush=True)
        if not self.dry:
            self._log.write(text + "\n")
            self._log.flush()


# ------------------------------------------------------------------------------------------------
# Running commands with a hard limit
# ------------------------------------------------------------------------------------------------


def run_bounded(cmd: List[str], timeout: float, log_path: str, env: dict) -> tuple:
    """Run ``cmd`` in its own process group, output to ``log_path``; on timeout the whole group (pytest's
    xdist workers, compute-sanitizer's child) is terminated. Returns (exit code or None, seconds)."""
    t0 = time.monotonic()
    with open(log_path, "ab") as log:
        log.write(f"$ {' '.join(cmd)}\n".encode())
        log.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
                try:
                    os.killpg(proc.pid, sig)
                    proc.wait(timeout=wait)
                    break
                except (subprocess.TimeoutExpired, ProcessLookupError):
                    continue
            code = None
        log.write(f"\n[exit {code} after {time.monotonic() - t0:.0f} s]\n".encode())
    return code, time.monotonic() - t0


def _tail(path: str, lines: int = 15) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def _has_module(name: str, env: dict) -> bool:
    return subprocess.run([PY, "-c", f"import {name}"], env=env, capture_output=True).returncode == 0


# ------------------------------------------------------------------------------------------------
# Install: prebuilt extension when it matches, else a build
# ------------------------------------------------------------------------------------------------


def source_hash() -> str:
    """What the compiled extension depends on: csrc/ and setup.py, by content."""
    h = hashlib.sha256()
    files = [os.path.join(ROOT, "setup.py")]
    for base, _, names in os.walk(os.path.join(ROOT, "csrc")):
        files += [os.path.join(base, n) for n in names]
    for path in sorted(files):
        h.update(os.path.relpath(path, ROOT).encode())
        with open(path, "rb") as f:
            h.update(f.read())
    return h.hexdigest()


def stage_package(so_path: str, stage_dir: str = STAGE_DIR) -> None:
    """``<stage_dir>/sam_fast``: the working tree's sam_fast/ (links), kernels/ as sam_fast.kernels and bench/ as
    sam_fast.bench (setup.py's package_dir), and the prebuilt extension - an install in a second that
    always runs the current Python sources. Used with PYTHONSAFEPATH=1, so that the repository root's own
    sam_fast/ (no kernels/ or extension inside) does not shadow it from the current directory."""
    pkg = os.path.join(stage_dir, "sam_fast")
    shutil.rmtree(stage_dir, ignore_errors=True)
    os.makedirs(pkg)
    src = os.path.join(ROOT, "sam_fast")
    for name in os.listdir(src):
        if name == "__pycache__" or name.startswith("_C.") or name in ("kernels", "bench"):
            continue
        os.symlink(os.path.join(src, name), os.path.join(pkg, name))
    os.symlink(os.path.join(ROOT, "kernels"), os.path.join(pkg, "kernels"))
    os.symlink(os.path.join(ROOT, "bench"), os.path.join(pkg, "bench"))
    shutil.copyfile(so_path, os.path.join(pkg, "_C" + importlib.machinery.EXTENSION_SUFFIXES[0]))


_LOAD_CHECK = ("import torch, sam_fast; from sam_fast.ops._ext import extension_error, has_cuda_kernels; "
               "err = extension_error(); assert err is None, err; "
               "assert has_cuda_kernels(), 'built without CUDA sources'; print(sam_fast.__file__)")


def install(session: Session, timeout: float) -> Result:
    env = session.env
    t0 = time.monotonic()
    notes = []
    wheels = sorted(f for f in os.listdir(CARRY) if f.endswith(".whl")) if os.path.isdir(CARRY) else []
    site = os.path.join(ROOT, ".site")
    if wheels and not all(_has_module(m, env) for m in ("segment_anything", "pycocotools", "sam2")):
        code = subprocess.run([PY, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                               "--target", site] + [os.path.join(CARRY, w) for w in wheels],
                              capture_output=True, text=True)
        notes.append(f"{len(wheels)} wheels" + ("" if code.returncode == 0 else " (pip FAILED)"))
    paths = [site] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    first_kernel = os.path.join(CARRY, "dense_v1_attention.py")  # the dense-pattern peer (no .git there)
    if os.path.isfile(first_kernel):
        env["SAM_FAST_DENSE_V1_KERNEL"] = first_kernel
    sha = os.path.join(CARRY, "GIT_SHA")
    if os.path.isfile(sha):
        with open(sha) as f:
            env["SAM_FAST_GIT_SHA"] = f.read().strip()
    # 1. the prebuilt extension, when it was built from these sources for this Python and torch
    why = _prebuilt_refusal(env)
    if why is None:
        so = [f for f in os.listdir(PREBUILT) if f.startswith("_C") and f.endswith(".so")][0]
        stage_package(os.path.join(PREBUILT, so))
        # PYTHONSAFEPATH: no cwd or script folder ahead of the stage (the repository root's sam_fast/ has neither
        # kernels/ nor the extension inside it); the root itself comes last, for `python -m tools.<name>`
        staged = dict(env, PYTHONPATH=os.pathsep.join([STAGE_DIR, env["PYTHONPATH"], ROOT]), PYTHONSAFEPATH="1")
        check = subprocess.run([PY, "-c", _LOAD_CHECK], env=staged, capture_output=True, text=True)
        if check.returncode == 0:
            session.env = staged
            session.install_note = f"prebuilt extension loaded in {time.monotonic() - t0:.0f} s"
            return Result("ok", time.monotonic() - t0, "; ".join(notes + [session.install_note]))
        why = "it did not load: " + (check.stderr.strip().splitlines() or ["?"])[-1][:160]
    # 2. build: sm_90 only, every core
    log = os.path.join(session.pack, "build.log")
    build_env = dict(env, TORCH_CUDA_ARCH_LIST=env.get("TORCH_CUDA_ARCH_LIST", "9.0"),
                     MAX_JOBS=str(os.cpu_count() or 8), SAM_FAST_BUILD_CUDA="1")
    code, secs = run_bounded([PY, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", "."],
                             timeout - (time.monotonic() - t0), log, build_env)
    session.install_note = f"built from source in {secs:.0f} s (prebuilt not used: {why})"
    if code != 0:
        return Result("FAILED" if code is not None else "timed out", time.monotonic() - t0,
                      session.install_note + "\n" + _tail(log))
    check = subprocess.run([PY, "-c", _LOAD_CHECK], env=env, capture_output=True, text=True)
    if check.returncode != 0:
        return Result("FAILED", time.monotonic() - t0, "built but " + check.stderr.strip()[-300:])
    return Result("ok", time.monotonic() - t0, "; ".join(notes + [session.install_note]))


def _prebuilt_refusal(env: dict) -> Optional[str]:
    info_path = os.path.join(PREBUILT, "BUILD_INFO.json")
    if not os.path.isfile(info_path):
        return "none prepared (bash tools/gpu_session.sh prepare)"
    with open(info_path) as f:
        info = json.load(f)
    if info.get("source_sha256") != source_hash():
        return "csrc/ or setup.py changed since prepare"
    here = subprocess.run([PY, "-c", "import sys, torch; print(f'{sys.version_info[0]}.{sys.version_info[1]}', "
                                     "torch.__version__)"], env=env, capture_output=True, text=True).stdout.split()
    if here != [info.get("python"), info.get("torch")]:
        return f"prepared for Python {info.get('python')} / torch {info.get('torch')}, this is {' / '.join(here)}"
    return None


# ------------------------------------------------------------------------------------------------
# Stages
# ------------------------------------------------------------------------------------------------

# Per-script budgets of the targets stage (seconds), in order of value: int8 and dilated attention carry
# most targets; the CPU post-processing target runs on the GPU machine's CPU (segment_anything's path takes
# 25 s a call on 2 cores for its 1024 masks; measured with one warm-up and one timed call).
# bench_distill (one ViT-B training step per backend, its fwd and bwd kernels compiled on first use) comes last:
# it also gets whatever the stages before it saved. bench_e2e's targets run also times the two pruned ViT-B
# geometries (sam_fast.compress; odd per-block head dims). The export stage after them (ViT-B as an AOTInductor
# package vs eager and torch.compile, cold starts in subprocesses) is measured only, no target reads it yet; it runs
# on whatever the stages before it saved. None of these budgets has been measured on a GPU yet.
TARGET_SCRIPTS = (("bench_int8_linear", 30), ("bench_dilated_attention", 75), ("bench_e2e", 40),
                  ("bench_everything", 25), ("bench_decoder", 20), ("bench_distill", 20))


def _pytest(marker: str, junit: str, timeout_each: int) -> List[str]:
    """8 workers: Triton compiles each worker's kernels in parallel (16 cores on the GPU machine)."""
    return [PY, "-m", "pytest", "-m", marker, "-q", "-rfE", "-p", "no:cacheprovider", "--junitxml", junit,
            "-n", "8", f"--timeout={timeout_each}", "tests"]


def verify_stages(pack: str) -> List[Stage]:
    results = os.path.join(pack, "results")
    stages = [
        Stage("install", 65, "sam_fast importable with its CUDA ops (prebuilt extension, else a build)",
              action=install),
        Stage("smoke", 110, "every Triton kernel and CUDA op once at SAM's shapes vs its reference "
                            "(pytest -m 'gpu and smoke', 8 workers)",
              command=_pytest("gpu and smoke", os.path.join(pack, "smoke.xml"), 100)),
    ]
    for script, budget in TARGET_SCRIPTS:
        stages.append(Stage(f"targets:{script}", budget, f"the performance targets' cases of {script}",
                            command=[PY, f"bench/{script}.py", "--targets", "--out", results],
                            measures=(script,)))
    stages += [
        Stage("bench_export", 15, "ViT-B bf16 as an AOTInductor package vs eager vs torch.compile, and both cold "
                                  "starts (bench_export.py)",
              command=[PY, "bench/bench_export.py", "--targets", "--out", results], measures=("bench_export",)),
        Stage("bench_hiera_attention", 10, "SAM 2's Hiera attention at SAM 2.1's grids: the Triton kernel vs SAM 2's "
                                           "partition + SDPA (bench_hiera_attention.py)",
              command=[PY, "bench/bench_hiera_attention.py", "--out", results], measures=("bench_hiera_attention",)),
        Stage("bench_everything_sam2", 15, "SAM 2's segment everything, decoder side: Meta's generator (float32, "
                                           "autocast bf16) vs sam_fast's, 16 x 16 points (bench_everything.py "
                                           "--family sam2 --quick)",
              command=[PY, "bench/bench_everything.py", "--family", "sam2", "--quick", "--out", results],
              measures=("bench_everything",)),
        Stage("sanitize", 50, "compute-sanitizer memcheck: every CUDA op and Triton kernel on small ragged inputs",
              command=["compute-sanitizer", "--tool", "memcheck", "--error-exitcode", "9", PY,
                       "-m", "tools.sanitize_ops", "--triton"]),
        Stage("report", 5, "the targets' verdicts from this run's rows, and the table", action=None),
    ]
    return stages


def full_stages(pack: str) -> List[Stage]:
    results = os.path.join(pack, "results")
    stages = [Stage("tests", 240, "every GPU test (pytest -m gpu, 8 workers)",
                    command=_pytest("gpu", os.path.join(pack, "tests.xml"), 300)),
              Stage("racecheck", 90, "compute-sanitizer racecheck on the CUDA ops",
                    command=["compute-sanitizer", "--tool", "racecheck", "--error-exitcode", "9", PY,
                             "-m", "tools.sanitize_ops"])]
    for script, budget in (("bench_dilated_attention", 200), ("bench_int8_linear", 120),
                           ("bench_dilated_attention_sam", 150), ("bench_e2e", 150), ("bench_everything", 100),
                           ("bench_decoder", 60), ("bench_distill", 120), ("bench_segment_dataset", 90),
                           ("bench_hiera_attention", 30)):
        stages.append(Stage(script, budget, f"every case of {script}",
                            command=[PY, f"bench/{script}.py", "--out", results], measures=(script,)))
    stages += [
        Stage("bench_everything_sam2", 60, "SAM 2's segment everything, decoder side, 32 x 32 points: Meta's generator "
                                           "vs sam_fast's (bench_everything.py --family sam2)",
              command=[PY, "bench/bench_everything.py", "--family", "sam2", "--out", results],
              measures=("bench_everything",)),
        Stage("bench_export", 150, "ViT-B bf16 as an AOTInductor package vs eager vs torch.compile, cold starts",
              command=[PY, "bench/bench_export.py", "--out", results], measures=("bench_export",)),
        Stage("bench_e2e_compile", 200, "ViT-B/H and pruned ViT-B encoders under torch.compile: SDPA+bias vs "
                                        "sam_fast",
              command=[PY, "bench/bench_e2e.py", "--compile", "--models", "vit_b,vit_h,vit_b_global_50,slimsam_50_dc2",
                       "--out", results]),
        Stage("tune_int8", 200, "tune the int8 GEMM table (kernels/tuned/int8_linear.json)",
              command=[PY, "-m", "tools.tune_int8_linear"]),
        Stage("tune_dilated_attention", 250, "tune the attention table (kernels/tuned/dilated_attention.json)",
              command=[PY, "-m", "tools.tune_dilated_attention"]),
        Stage("report", 10, "the targets' verdicts from this run's rows, and the table", action=None),
    ]
    return stages


# ------------------------------------------------------------------------------------------------
# Verdicts and the table
# ------------------------------------------------------------------------------------------------


def smoke_verdicts(junit: str) -> Dict[str, str]:
    """Per kernel of :data:`SMOKE_KERNELS`: "ok (n tests)", "FAILED: test ids" or "not run"."""
    cases = {}
    if os.path.isfile(junit):
        try:
            for tc in ET.parse(junit).getroot().iter("testcase"):
                name = tc.get("name", "")
                bad = tc.find("failure") is not None or tc.find("error") is not None
                skipped = tc.find("skipped") is not None
                cases[name] = "failed" if bad else ("skipped" if skipped else "passed")
        except ET.ParseError:
            pass
    out = {}
    for kernel, patterns in SMOKE_KERNELS.items():
        mine = {n: v for n, v in cases.items() if n.split("[")[0] in patterns}
        failed = sorted(n for n, v in mine.items() if v == "failed")
        passed = [n for n, v in mine.items() if v == "passed"]
        if failed:
            out[kernel] = "FAILED: " + ", ".join(failed)[:150]
        elif passed:
            out[kernel] = f"ok ({len(passed)} tests)"
        else:
            out[kernel] = "not run"
    return out


def target_verdicts(session: Session) -> List[dict]:
    """tools/targets.py over this run's CSVs (in a subprocess: it needs sam_fast)."""
    path = os.path.join(session.pack, "targets.json")
    subprocess.run([PY, "-m", "tools.targets", "--results", session.results, "--json", path, "--detail",
                    "--out", os.path.join(session.pack, "targets.md")],
                   cwd=ROOT, env=session.env, capture_output=True, text=True, timeout=60)
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return json.load(f)


def _sanitizer_verdict(result: Result, log: str) -> tuple:
    if result.verdict == "ok":
        return "clean", "exit 0"
    if result.verdict in ("skipped", "not run", "timed out"):
        return result.verdict, result.detail.strip().splitlines()[-1][:150] if result.detail.strip() else ""
    errors = [ln.strip() for ln in _tail(log, 40).splitlines() if "ERROR SUMMARY" in ln]
    return "ERRORS", errors[-1] if errors else "see the stage's log in session.tgz"


def _split(verdict: str) -> tuple:
    """A smoke verdict as (verdict, detail) cells."""
    if verdict.startswith("FAILED: "):
        return "FAILED", verdict[len("FAILED: "):]
    if verdict.startswith("ok ("):
        return "ok", verdict[4:-1]
    return verdict, ""


def table(session: Session, device: str, verdicts: List[dict]) -> str:
    """The verdict table: install, each kernel's smoke verdict, each target with its worst figure, the
    sanitizer, and any stage that did not finish."""
    rows = ["| check | verdict | detail |", "|---|---|---|"]
    by_name = dict(session.outcomes)
    if "install" in by_name:
        inst = by_name["install"]
        note = session.install_note or (inst.detail.strip().splitlines() or [""])[0][:150]
        rows.append(f"| install | {inst.verdict} | {note} |")
    if "smoke" in by_name:
        for kernel, v in smoke_verdicts(os.path.join(session.pack, "smoke.xml")).items():
            rows.append("| smoke {} | {} | {} |".format(kernel, *_split(v)))
    if "tests" in by_name:
        for kernel, v in smoke_verdicts(os.path.join(session.pack, "tests.xml")).items():
            rows.append("| GPU tests {} | {} | {} |".format(kernel, *_split(v)))
    for v in verdicts:
        rows.append(f"| target: {v['text']} (need {v['need']}) | {v['status']} | {v.get('worst_text', '-')} |")
    for name, tool in (("sanitize", "memcheck"), ("racecheck", "racecheck")):
        if name in by_name:
            rows.append("| {} ({}) | {} | {} |".format(name, tool, *_sanitizer_verdict(
                by_name[name], os.path.join(session.pack, f"{name}.log"))))
    for name, res in session.outcomes:
        if res.verdict != "ok" and name not in ("install", "smoke", "tests", "sanitize", "racecheck"):
            last = res.detail.strip().splitlines()[-1][:150] if res.detail.strip() else ""
            rows.append(f"| stage {name} | {res.verdict} | {last} |")
    head = (f"sam_fast {session.mode} on {device}, commit {session.env.get('SAM_FAST_GIT_SHA', 'unknown')}, "
            f"{session.elapsed():.0f} s of {session.budget} s")
    return head + "\n\n" + "\n".join(rows)


# ------------------------------------------------------------------------------------------------
# prepare: on the CPU machine, what the device call carries in .whl/
# ------------------------------------------------------------------------------------------------

# The GPU machine's Python and torch (its image): the prebuilt extension is built for these.
DEVICE_PYTHON = "3.12"
DEVICE_TORCH = "2.11.0"
DEVICE_ARCH = "9.0"
PREP_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "sam_fast_gpu_prepare")


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, **kw)


def _device_python() -> Optional[str]:
    """A working Python of the device's minor version on this machine (pyenv's, then PATH's), or None."""
    candidates = []
    pyenv = os.path.join(os.path.expanduser("~"), ".pyenv", "versions")
    if os.path.isdir(pyenv):
        candidates += [os.path.join(pyenv, v, "bin", f"python{DEVICE_PYTHON}") for v in sorted(os.listdir(pyenv))
                       if v.startswith(DEVICE_PYTHON + ".")]
    candidates.append(shutil.which(f"python{DEVICE_PYTHON}"))
    for cand in filter(None, candidates):
        if os.path.isfile(cand) and subprocess.run([cand, "-c", "import venv"], capture_output=True).returncode == 0:
            return cand
    return None


def _nvidia_lib_path() -> str:
    """This machine's CUDA runtime libraries from its torch's pip dependencies (enough for the device torch
    to import here: nothing runs on a GPU)."""
    import glob
    import site

    dirs = []
    for sp in site.getsitepackages():
        dirs += sorted(glob.glob(os.path.join(sp, "nvidia", "*", "lib")))
    return os.pathsep.join(dirs)


def build_prebuilt() -> str:
    """Build sam_fast._C for the device (Python 3.12, torch 2.11 cu130, sm_90) into .whl/prebuilt/: a venv
    with the device's torch in PREP_CACHE, a wheel of the working tree built in it, its extension
    extracted, then loaded here through that torch to check that it registers the CUDA kernels."""
    py = _device_python()
    if py is None:
        return f"skipped: no python{DEVICE_PYTHON} here (the device will build, about a minute)"
    venv = os.path.join(PREP_CACHE, f"venv{DEVICE_PYTHON.replace('.', '')}-torch{DEVICE_TORCH}")
    vpy = os.path.join(venv, "bin", "python")
    if not os.path.isfile(os.path.join(venv, ".ready")):
        shutil.rmtree(venv, ignore_errors=True)
        _run([py, "-m", "venv", venv])
        _run([vpy, "-m", "pip", "install", "-q", "--no-deps", f"torch=={DEVICE_TORCH}"])
        _run([vpy, "-m", "pip", "install", "-q", "typing-extensions", "filelock", "sympy", "networkx", "jinja2",
              "fsspec", "setuptools<82", "wheel", "ninja", "numpy"])
        open(os.path.join(venv, ".ready"), "w").close()
    env = dict(os.environ, LD_LIBRARY_PATH=_nvidia_lib_path(), SAM_FAST_BUILD_CUDA="1",
               TORCH_CUDA_ARCH_LIST=DEVICE_ARCH, MAX_JOBS=str(os.cpu_count() or 2))
    torch_version = _run([vpy, "-c", "import torch; print(torch.__version__)"], env=env, capture_output=True,
                         text=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        files = _run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                     capture_output=True).stdout.split(b"\0")
        src = os.path.join(tmp, "src")
        for rel in filter(None, (f.decode() for f in files)):
            if os.path.isfile(os.path.join(ROOT, rel)):
                os.makedirs(os.path.dirname(os.path.join(src, rel)), exist_ok=True)
                shutil.copy2(os.path.join(ROOT, rel), os.path.join(src, rel))
        t0 = time.monotonic()
        _run([vpy, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps", "-w", os.path.join(tmp, "w"),
              src], env=env)
        built = time.monotonic() - t0
        import zipfile

        wheel = os.path.join(tmp, "w", os.listdir(os.path.join(tmp, "w"))[0])
        with zipfile.ZipFile(wheel) as z:
            name = next(n for n in z.namelist() if n.startswith("sam_fast/_C") and n.endswith(".so"))
            shutil.rmtree(PREBUILT, ignore_errors=True)
            os.makedirs(PREBUILT)
            with z.open(name) as f, open(os.path.join(PREBUILT, os.path.basename(name)), "wb") as g:
                shutil.copyfileobj(f, g)
    so = os.path.join(PREBUILT, os.path.basename(name))
    check = ("import importlib.util, sys, torch; spec = importlib.util.spec_from_file_location('_C', sys.argv[1]); "
             "spec.loader.exec_module(importlib.util.module_from_spec(spec)); "
             "assert torch._C._dispatch_has_kernel_for_dispatch_key('sam_fast::mask_postprocess', 'CUDA')")
    _run([vpy, "-c", check, so], env=env)
    with open(os.path.join(PREBUILT, "BUILD_INFO.json"), "w") as f:
        json.dump({"source_sha256": source_hash(), "python": DEVICE_PYTHON, "torch": torch_version,
                   "arch": DEVICE_ARCH, "build_seconds_here": round(built)}, f, indent=1)
    return f"{os.path.basename(so)} for Python {DEVICE_PYTHON} / torch {torch_version} / sm_90 ({built:.0f} s here)"


def prepare() -> int:
    """Fill .whl/ (git-ignored) with what the offline GPU machine lacks: segment-anything, pycocotools,
    pytest-timeout (pyproject's `timeout` option) and Meta's sam2 (with hydra-core, omegaconf, iopath) wheels for
    its Python, the first attention kernel's source (the
    dense-pattern peer, from git history; the device gets no .git), the commit being measured, and the prebuilt
    extension."""
    os.makedirs(CARRY, exist_ok=True)
    _run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
          DEVICE_PYTHON, "--implementation", "cp", "--platform", "manylinux_2_28_x86_64", "--platform",
          "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64", "-d", CARRY, "segment-anything",
          "pycocotools", "pytest-timeout"])
    # Meta's SAM 2 (the reference of the SAM 2 tests and the peer of its benchmarks) and its pure-Python
    # dependencies; sam2 is an sdist: built here without its optional CUDA extension (a py3-none-any wheel)
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", CARRY, "sam2==1.1.0",
          "antlr4-python3-runtime==4.9.3", "omegaconf>=2.2,<2.4", "hydra-core>=1.3.2", "iopath>=0.1.10",
          "portalocker"], env=dict(os.environ, SAM2_BUILD_CUDA="0"))
    sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True,
                         text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                           text=True).stdout.strip()
    with open(os.path.join(CARRY, "GIT_SHA"), "w") as f:
        f.write(sha + ("-dirty" if dirty else "") + "\n")
    import re

    with open(os.path.join(ROOT, "bench", "bench_dilated_attention.py")) as f:
        first = re.search(r'^DENSE_V1_SHA = "([0-9a-f]+)"', f.read(), re.M).group(1)
    src = _run(["git", "show", f"{first}:kernels/dilated_attention.py"], cwd=ROOT, capture_output=True).stdout
    with open(os.path.join(CARRY, "dense_v1_attention.py"), "wb") as f:
        f.write(src)
    print("prebuilt extension:", build_prebuilt())
    size = sum(os.path.getsize(os.path.join(b, n)) for b, _, ns in os.walk(CARRY) for n in ns)
    print(f".whl/ ready ({size / 2**20:.1f} MiB), results will be stamped {sha}{'-dirty' if dirty else ''}"
          + (" - commit first, then prepare again" if dirty else ""))
    return 0


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------


def plan_text(stages: Sequence[Stage], budget: int) -> str:
    lines = [f"{'stage':<34} {'budget':>6}  what / command"]
    for s in stages:
        cmd = " ".join(s.command) if s.command else ("(in-process)" if s.action else "(report)")
        lines.append(f"{s.name:<34} {s.budget:>5}s  {s.what}")
        lines.append(f"{'':<42}{cmd}")
    total = sum(s.budget for s in stages)
    lines.append(f"{'total':<34} {total:>5}s  of {budget} s"
                 + ("" if total <= budget else ": stages run in order until the time is spent, the rest are "
                                               "skipped and say so (name stages to choose)"))
    return "\n".join(lines)


def _usable(cmd: List[str], env: dict) -> List[str]:
    """A pytest command without the plugins this machine lacks (xdist's -n, pytest-timeout's --timeout)."""
    if cmd[1:3] != ["-m", "pytest"]:
        return cmd
    out = list(cmd)
    if "-n" in out and not _has_module("xdist", env):
        i = out.index("-n")
        del out[i:i + 2]
    if not _has_module("pytest_timeout", env):
        out = [c for c in out if not c.startswith("--timeout=")]
    return out


def execute(session: Session, stages: Sequence[Stage]) -> None:
    for stage in stages:
        if stage.name == "report":
            break
        left = session.budget - session.elapsed() - 15  # keep the report's time
        timeout = min(stage.budget + session.saved, left)
        if timeout < min(30, stage.budget):
            session.outcomes.append((stage.name, Result("skipped", 0, f"{left:.0f} s left of the call")))
            session.say(f"== {stage.name}: skipped, {left:.0f} s left")
            continue
        session.say(f"== {stage.name} (limit {timeout:.0f} s): {stage.what}")
        if stage.action is not None:
            res = stage.action(session, timeout)
        elif shutil.which(stage.command[0]) is None and not os.path.isfile(stage.command[0]):
            res = Result("skipped", 0, f"{stage.command[0]} is not installed here")
        else:
            log = os.path.join(session.pack, f"{stage.name.replace(':', '_')}.log")
            code, secs = run_bounded(_usable(stage.command, session.env), timeout, log, session.env)
            verdict = "ok" if code == 0 else ("timed out" if code is None else "FAILED")
            res = Result(verdict, secs, _tail(log, 8))
        session.saved = max(0.0, timeout - res.seconds) if res.verdict == "ok" else 0.0
        session.outcomes.append((stage.name, res))
        session.say(f"   {stage.name}: {res.verdict} in {res.seconds:.0f} s")
        if res.verdict != "ok" and res.detail:
            session.say("   " + res.detail.strip().replace("\n", "\n   ")[-1200:])
        if stage.name == "install" and res.verdict != "ok":
            session.say("   install failed: nothing else can run")
            break


def _device_name(env: dict) -> str:
    out = subprocess.run([PY, "-c", "import torch, triton; print(torch.cuda.get_device_name(0) if "
                                    "torch.cuda.is_available() else 'no GPU', '| torch', torch.__version__, "
                                    "'| triton', triton.__version__)"], env=env, capture_output=True, text=True)
    return out.stdout.strip() or "unknown device"


def pack(session: Session) -> None:
    """session.tgz in $OUT: the pack folder, plus the tuned tables when a tuner ran."""
    if any(name.startswith("tune") for name, _ in session.outcomes):
        os.makedirs(os.path.join(session.pack, "tuned"), exist_ok=True)
        for name in ("dilated_attention.json", "int8_linear.json"):
            src = os.path.join(ROOT, "kernels", "tuned", name)
            if os.path.isfile(src):
                shutil.copyfile(src, os.path.join(session.pack, "tuned", name))
    with tarfile.open(os.path.join(session.out, "session.tgz"), "w:gz") as tar:
        tar.add(session.pack, arcname=".")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("mode", choices=["verify", "full", "prepare", "plan"])
    ap.add_argument("stages", nargs="*", help="full: run only these stages (names as --dry-run prints them)")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and budgets, execute nothing")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/sam_fast_gpu"), help="output folder ($OUT)")
    args = ap.parse_args(argv)
    if args.mode == "prepare":
        return prepare()
    budget = VERIFY_BUDGET_S if args.mode == "verify" else FULL_BUDGET_S
    out = os.path.abspath(args.out)
    pack_dir = tempfile.mkdtemp(prefix="sam_fast_pack_") if not (args.dry_run or args.mode == "plan") else "PACK"
    stages = verify_stages(pack_dir) if args.mode == "verify" else full_stages(pack_dir)
    if args.mode == "full":
        install_stage = verify_stages(pack_dir)[0]
        chosen = [s for s in stages if not args.stages or s.name in args.stages or s.name == "report"]
        unknown = set(args.stages) - {s.name for s in stages}
        if unknown:
            ap.error(f"unknown stages {sorted(unknown)}; full has {[s.name for s in stages]}")
        stages = [install_stage] + chosen
    if args.dry_run or args.mode == "plan":
        print(plan_text(stages, budget))
        return 0
    os.makedirs(out, exist_ok=True)
    session = Session(out, budget, pack=pack_dir)
    session.mode = args.mode
    session.say(plan_text(stages, budget))
    try:
        execute(session, stages)
    finally:  # whatever happened, the rows measured so far and the table come back
        device = _device_name(session.env)
        verdicts = target_verdicts(session) if any(s.measures for s in stages) else []
        text = table(session, device, verdicts)
        with open(os.path.join(out, f"{args.mode}.md"), "w") as f:
            f.write(text + "\n")
        pack(session)
        session.say("\n" + text)
    return 0 if all(r.verdict == "ok" for _, r in session.outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
