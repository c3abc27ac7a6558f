#!/usr/bin/env bash
# Everything a GPU session has to run, in stages that fit the device tool's 10-minute calls:
#
#   bash bench/gpu_session.sh prepare # HERE, before the first call: offline wheels + the Foundation kernel
#                                     # into .whl/ (carry it; the device gets no .git to read history from)
#   bash bench/gpu_session.sh tests   # build, pytest -m gpu, compute-sanitizer memcheck + racecheck
#   bash bench/gpu_session.sh tune    # tune the int8 GEMM table for this GPU (kernels/tuned/int8_gemm.json)
#   bash bench/gpu_session.sh bench [script ...]   # benchmarks (default: all) into $OUT/results
#
# Run from the repository root with .whl/ carried (made by the prepare stage: segment-anything and
# pycocotools, scikit-image for the tests' sample photos, and bench_dilated_attention's Foundation
# kernel from git history). Each stage builds sam_fast first when the machine is fresh. Output goes to $OUT
# (at most 8 files come back): build.log, pytest_gpu.txt, sanitizer.txt, int8_gemm.json, results/*.csv.
set -uo pipefail
OUT=${OUT:-/tmp/sam_fast_out}
mkdir -p "$OUT"
stage=${1:-tests}
shift || true

setup() {
  if [ -d .whl ] && ! python3 -c "import segment_anything, pycocotools" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$PWD/.site" .whl/*.whl
  fi
  export PYTHONPATH="$PWD/.site${PYTHONPATH:+:$PYTHONPATH}"
  if [ -f .whl/foundation_attention.py ]; then export SAM_FAST_FOUNDATION_KERNEL="$PWD/.whl/foundation_attention.py"; fi
  if ! python3 -c "import sam_fast._C, torch; assert torch.ops.sam_fast.mask_postprocess" 2>/dev/null; then
    python3 -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
  fi
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
}

case "$stage" in
  prepare)
    ../shared/gpu/prepare-wheels.sh scikit-image scipy imageio tifffile lazy_loader networkx
    sha=$(sed -n 's/^FOUNDATION_SHA = "\([0-9a-f]*\)".*/\1/p' bench/bench_dilated_attention.py)
    git show "$sha:kernels/dilated_attention.py" > .whl/foundation_attention.py
    du -sh .whl
    ;;
  tests)
    setup
    python3 -m pytest -m gpu -q -rfE -p no:cacheprovider tests/test_gpu.py > "$OUT/pytest_gpu.txt" 2>&1
    tail -30 "$OUT/pytest_gpu.txt"
    {
      for tool in memcheck racecheck; do
        echo "== compute-sanitizer --tool $tool"
        compute-sanitizer --tool "$tool" --error-exitcode 9 python3 bench/sanitize_ops.py 2>&1 | tail -15
        echo "exit: ${PIPESTATUS[0]}"
      done
    } > "$OUT/sanitizer.txt"
    cat "$OUT/sanitizer.txt"
    ;;
  tune)
    setup
    python3 bench/tune_int8_gemm.py && cp kernels/tuned/int8_gemm.json "$OUT/"
    ;;
  bench)
    setup
    scripts=${*:-"bench_attention bench_dilated_attention bench_int8_gemm bench_e2e bench_decoder bench_everything"}
    for s in $scripts; do
      echo "== $s"
      timeout 540 python3 "bench/$s.py" --out "$OUT/results" 2>&1 | tail -40
    done
    ;;
  *)
    echo "usage: bash bench/gpu_session.sh prepare|tests|tune|bench [script ...]" >&2
    exit 2
    ;;
esac
