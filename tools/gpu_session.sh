#!/usr/bin/env bash
# GPU verification of sam_fast in one short device call. From the repository root:
#   1 HERE:   bash tools/gpu_session.sh prepare    # .whl/: wheels, prebuilt sam_fast._C (py3.12/torch 2.11/sm_90), commit
#   2 DEVICE: run(command="OUT=$OUT bash tools/gpu_session.sh verify", carry=[".whl"], timeout_s=540)
#   3 HERE:   python -m tools.merge_results <files_at>/session.tgz   # rows into bench/results/, targets table
#   4 HERE:   commit bench/results/; put the table the call printed last (also <files_at>/verify.md) in the notes
#   5 DEVICE: >5 min left? run(command="OUT=$OUT bash tools/gpu_session.sh full", carry=[".whl"], timeout_s=600); 3-4
#
# verify (<= 480 s by its own clock, stages ordered by value, each bounded): install (prebuilt extension,
# else a build), the smoke tests (every kernel once at SAM's shapes, pytest -m "gpu and smoke"), one
# measurement per performance target against its peers (bench_*.py --targets), compute-sanitizer memcheck,
# then the verdict table as the last lines. full [STAGE ...]: all GPU tests, racecheck, every benchmark,
# torch.compile'd encoders, the tuners (kernels/tuned/*.json come back in session.tgz), in order until its
# 580 s are spent. `verify --dry-run` / `full --dry-run` print the plan and budgets and run nothing.
# tools/gpu_verify.py does the work; its docstring has the details.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-verify}
shift || true
case "$mode" in
  prepare)
    python3 -m tools.gpu_verify prepare
    ;;
  verify|full|plan)
    export OUT=${OUT:-/tmp/sam_fast_gpu}
    exec python3 -m tools.gpu_verify "$mode" "$@" --out "$OUT"
    ;;
  *)
    echo "usage: bash tools/gpu_session.sh prepare | verify [--dry-run] | full [STAGE ...] [--dry-run]" >&2
    exit 2
    ;;
esac
