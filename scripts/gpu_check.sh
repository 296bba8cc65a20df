#!/usr/bin/env bash
# Whole-project check on a GPU machine that has torch, triton, nvcc and pytest but no package registry
# (DESIGN.md §6): build the extension in place, run every test tier on the GPU, run the benchmarks, and
# copy the results (at most 8 small files) to $RESULTS_DIR when it is set. Exits non-zero if any step
# failed, but always runs every step so one failure does not hide the others.
set -u
PY=${GPU_PYTHON:-python3}
OUT=${RESULTS_DIR:-}
export PYTHONUNBUFFERED=1
status=0
log=benchmarks/results/gpu-check.log
mkdir -p benchmarks/results
: > "$log"
started=$(mktemp)   # files newer than this were written by this run
step() {
  echo "=== $*" | tee -a "$log"
  "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" -ne 0 ]; then echo "=== FAILED ($rc): $*" | tee -a "$log"; status=1; fi
}

step nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
step "$PY" -m pip install --no-build-isolation --no-deps --no-index -e .
step "$PY" -m zigspark env
step "$PY" -m pytest -q -ra -m "gpu or build or interpret" tests
step "$PY" -m pytest -q -ra -m cpu tests
step "$PY" -m zigspark check --large --dtypes float32 float16 bfloat16 --json benchmarks/results/check-gpu.json
step "$PY" benchmarks/run_all.py

if [ -n "$OUT" ]; then
  mkdir -p "$OUT"
  cp "$log" benchmarks/results/check-gpu.json "$OUT"/ 2>/dev/null
  # the result files and plots this run wrote (newer than $started)
  find benchmarks/results -maxdepth 1 -newer "$started" \( -name '*.json' -o -name '*.png' \) ! -name check-gpu.json \
    | head -6 | xargs -r cp -t "$OUT"/
  echo "copied results to $OUT:"; ls -la "$OUT"
fi
exit $status
