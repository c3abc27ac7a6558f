#!/usr/bin/env bash
# Everything a GPU session has to run, as stages that several fit into one 10-minute device call.
#
# HERE, once per session (CPU machine, in the repository root):
#   bash bench/gpu_session.sh prepare
#       offline wheels (segment-anything, pycocotools) and bench_dilated_attention's Foundation kernel
#       (from git history: the device receives the working tree without .git) into .whl/; carry .whl
# ON THE DEVICE (command: OUT=$OUT bash bench/gpu_session.sh STAGE [STAGE ...]); tests+sanitize runs the
# two side by side (neither times anything), the benchmarks always run alone:
#   tests        pytest -m gpu on tests/test_gpu.py, 8 workers (Triton compiles in parallel)
#   sanitize     compute-sanitizer memcheck on every CUDA and Triton op, racecheck on the CUDA ops
#   tune         the int8 GEMM and attention tables for this GPU (kernels/tuned/int8_gemm.json, attention.json)
#   bench        every benchmark script; or name scripts one by one: bench_dilated_attention ...
#   bench_e2e_compile  ViT-B/H encoders with torch.compile: segment-anything-fast's method vs sam_fast
# The plan for a 30-minute loan (device time counts from the asking, start-up included; a machine left
# idle 30 s is given back, and a fresh one rebuilds sam_fast, so issue the calls back to back):
#   call 1: tests+sanitize
#   call 2: bench_dilated_attention bench_int8_gemm
#   call 3: bench_everything bench_e2e bench_decoder
#   then, while time is left: bench_attention, bench_e2e_compile, tune
# Each stage has its own time limit, so a slow one cannot take the others' results with it. Output: text
# logs in $OUT and everything else packed into $OUT/session.tgz (the device returns at most 8 files);
# HERE: tar xzf .../session.tgz -C /tmp/gpu && python bench/merge_results.py /tmp/gpu/results
#       python bench/targets.py --detail     (each issue target: met / MISSED / not measured, worst case)
# Time: one device call may run 600 s. Every stage is given what is left of CALL_LIMIT_S (default 580 s,
# counted from the script's start, the build included) less a margin for packing, at most STAGE_LIMIT_S;
# a stage with under a minute left is skipped and says so. The bench scripts write each CSV row as it is
# measured and run the issues' target cases first, so a stage cut short keeps what it measured.
set -uo pipefail
OUT=${OUT:-/tmp/sam_fast_out}
mkdir -p "$OUT/pack/results"
T0=$SECONDS
LIMIT=${STAGE_LIMIT_S:-540}
CALL_LIMIT=${CALL_LIMIT_S:-580}

left() {  # seconds the next step may run: what remains of the call, less 15 s for packing, at most LIMIT
  local s=$((CALL_LIMIT - (SECONDS - T0) - 15))
  s=$((s < LIMIT ? s : LIMIT))
  echo $((s < 1 ? 1 : s))
}

setup() {
  if [ -d .whl ] && ! python3 -c "import segment_anything, pycocotools" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$PWD/.site" .whl/*.whl
  fi
  export PYTHONPATH="$PWD/.site${PYTHONPATH:+:$PYTHONPATH}"
  if [ -f .whl/foundation_attention.py ]; then export SAM_FAST_FOUNDATION_KERNEL="$PWD/.whl/foundation_attention.py"; fi
  if [ -f .whl/GIT_SHA ]; then export SAM_FAST_GIT_SHA="$(cat .whl/GIT_SHA)"; fi
  if ! python3 -c "import torch, sam_fast._C; assert torch.ops.sam_fast.mask_postprocess" 2>/dev/null; then
    local t0=$SECONDS
    python3 -m pip install --no-build-isolation --no-deps -e . > "$OUT/pack/build.log" 2>&1 \
      || { tail -50 "$OUT/pack/build.log"; exit 1; }
    echo "built sam_fast in $((SECONDS - t0)) s"
  fi
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
}

pack() {
  tar czf "$OUT/session.tgz" -C "$OUT/pack" . && echo "packed: $(tar tzf "$OUT/session.tgz" | grep -vc '/$') files"
}

run_stage() {
  local stage=$1 t0=$SECONDS lim
  lim=$(left)
  if [ "$lim" -lt 60 ]; then
    echo "== $stage SKIPPED: ${lim} s left of this call's ${CALL_LIMIT} s; run it in the next call"
    return 0
  fi
  echo "== $stage (limit ${lim} s)"
  case "$stage" in
    tests)
      local par=()
      python3 -c "import xdist" 2>/dev/null && par+=(-n 8)
      python3 -c "import pytest_timeout" 2>/dev/null && par+=(--timeout 400)
      timeout -k 10 "$lim" python3 -m pytest -m gpu -q -rfE ${par[@]+"${par[@]}"} -p no:cacheprovider tests/test_gpu.py \
        > "$OUT/pytest_gpu.txt" 2>&1
      echo "exit: $?" >> "$OUT/pytest_gpu.txt"
      tail -40 "$OUT/pytest_gpu.txt"
      ;;
    sanitize)
      {
        echo "== compute-sanitizer --tool memcheck (CUDA and Triton ops)"
        timeout -k 10 "$(left)" compute-sanitizer --tool memcheck --error-exitcode 9 python3 bench/sanitize_ops.py --triton 2>&1 | tail -25
        echo "exit: ${PIPESTATUS[0]}"
        echo "== compute-sanitizer --tool racecheck (CUDA ops)"
        timeout -k 10 "$(left)" compute-sanitizer --tool racecheck --error-exitcode 9 python3 bench/sanitize_ops.py 2>&1 | tail -15
        echo "exit: ${PIPESTATUS[0]}"
      } > "$OUT/sanitizer.txt"
      cat "$OUT/sanitizer.txt"
      ;;
    tune)  # both tuners write their table after every shape / case, so a cut-off run keeps what it measured
      timeout -k 10 "$(( lim / 2 ))" python3 bench/tune_int8_gemm.py
      echo "exit: $?"
      cp kernels/tuned/int8_gemm.json "$OUT/pack/"
      timeout -k 10 "$(left)" python3 bench/tune_attention.py
      echo "exit: $?"
      cp kernels/tuned/attention.json "$OUT/pack/"
      ;;
    bench)
      for s in bench_attention bench_dilated_attention bench_int8_gemm bench_e2e bench_decoder bench_everything; do
        run_stage "$s"
      done
      ;;
    bench_e2e_compile)  # segment-anything-fast's SDPA + torch.compile vs sam_fast (+ compile), ViT-B and ViT-H
      timeout -k 10 "$lim" python3 bench/bench_e2e.py --compile --models vit_b,vit_h --out "$OUT/pack/results" \
        > "$OUT/pack/$stage.log" 2>&1
      echo "exit: $?" >> "$OUT/pack/$stage.log"
      tail -40 "$OUT/pack/$stage.log"
      ;;
    bench_*)
      PYTHONUNBUFFERED=1 timeout -k 10 "$lim" python3 "bench/$stage.py" --out "$OUT/pack/results" > "$OUT/pack/$stage.log" 2>&1
      echo "exit: $?" >> "$OUT/pack/$stage.log"
      tail -40 "$OUT/pack/$stage.log"
      ;;
    *)
      echo "unknown stage $stage; usage: bash bench/gpu_session.sh prepare | tests|sanitize|tune|bench|bench_<name> ..." >&2
      return 2
      ;;
  esac
  echo "== $stage took $((SECONDS - t0)) s"
}

if [ "${1:-}" = prepare ]; then
  ../shared/gpu/prepare-wheels.sh  # segment-anything, pycocotools; the device image has scikit-image and scipy
  sha=$(sed -n 's/^FOUNDATION_SHA = "\([0-9a-f]*\)".*/\1/p' bench/bench_dilated_attention.py)
  git show "$sha:kernels/dilated_attention.py" > .whl/foundation_attention.py
  # the commit the device measures (it gets no .git); re-run prepare after committing
  echo "$(git rev-parse --short=12 HEAD)$(git status --porcelain --untracked-files=no | grep -q . && echo -dirty)" \
    > .whl/GIT_SHA
  echo "results will be stamped $(cat .whl/GIT_SHA)"
  du -sh .whl
  exit 0
fi
[ $# -gt 0 ] || set -- tests
setup
for stage in "$@"; do
  if [[ "$stage" == *+* ]]; then  # a+b: stages that time nothing run side by side (tests+sanitize)
    IFS=+ read -ra together <<< "$stage"
    for s in "${together[@]}"; do
      case "$s" in tests|sanitize) ;; *) echo "only tests and sanitize may run side by side, not $s" >&2; exit 2;; esac
      run_stage "$s" > "$OUT/pack/$s.stage.log" 2>&1 &
    done
    wait
    for s in "${together[@]}"; do cat "$OUT/pack/$s.stage.log"; done
  else
    run_stage "$stage"
  fi
done
pack
