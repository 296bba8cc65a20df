#!/usr/bin/env bash
# Whole-project check on a GPU machine that has torch, triton, nvcc and pytest but no package registry
# (DESIGN.md §6): build the extension in place, run the gpu, interpret and build test tiers on the GPU, run the
# `zigspark check` table and the benchmarks, and copy the results (at most 8 small files) to $RESULTS_DIR
# as they are produced, so a run cut off by a time limit still returns what it finished.
#
#   PART=all (default) | tests | bench | more   split the work over calls of at most 10 minutes each
#                                         (more: scaling and end-to-end benchmarks, the demo at full size)
#   GPU_CHECK_BUDGET                      seconds for the whole script: 420 for tests, 360 for bench, else
#                                         540 (a device call may run 600; tests + bench fit 15 minutes of
#                                         device time with the machine's start)
#   ZIGSPARK_COMMIT                       the commit being checked, for the result files (no .git travels)
#
# Every step has its own time limit, cut to what is left of the budget; a step that no longer fits is
# skipped and said so. The script exits non-zero if any step failed or was skipped.
set -u
PY=${GPU_PYTHON:-python3}
OUT=${RESULTS_DIR:-}
PART=${PART:-all}
export PYTHONUNBUFFERED=1
status=0
case "$PART" in tests) default_budget=420 ;; bench) default_budget=360 ;; *) default_budget=540 ;; esac
budget=${GPU_CHECK_BUDGET:-$default_budget}
t0=$(date +%s)
mkdir -p benchmarks/results
# the log goes straight to $RESULTS_DIR when there is one, so a call killed from outside still returns it
if [ -n "$OUT" ]; then mkdir -p "$OUT"; log=$OUT/gpu-check-$PART.log; else log=benchmarks/results/gpu-check-$PART.log; fi
: > "$log"
started=$(mktemp)   # result files newer than this were written by this run

publish() {  # copy the log and this run's result files to $RESULTS_DIR (at most 8 files in all)
  [ -n "$OUT" ] || return 0
  find benchmarks/results -maxdepth 1 -newer "$started" \( -name '*.json' -o -name '*.png' \) | head -7 \
    | xargs -r cp -t "$OUT"/
}

step() {  # step SECONDS command...
  local limit=$1
  shift
  local left=$(( budget - ($(date +%s) - t0) - 15 ))
  if [ "$left" -lt 20 ]; then
    echo "=== SKIPPED (time budget of ${budget}s spent): $*" | tee -a "$log"; status=1; publish; return 1
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "=== [$(date +%T)] $* (limit ${limit}s)" | tee -a "$log"
  # SIGINT first, so a pytest cut off by the limit still prints which tests failed and the totals
  timeout -s INT -k 20 "$limit" "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" -ne 0 ]; then echo "=== FAILED ($rc$([ "$rc" = 124 ] && echo ': time limit')): $*" | tee -a "$log"; status=1; fi
  publish
  return "$rc"
}

step 30 nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv
# Build for the GPU that is here only (one nvcc target instead of three: the build is on the clock).
if [ -z "${ZIGSPARK_CUDA_ARCHS:-}" ]; then
  cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' ')
  case "$cap" in
    9.0) export ZIGSPARK_CUDA_ARCHS=9.0a ;;
    [0-9]*.[0-9]) export ZIGSPARK_CUDA_ARCHS="$cap+PTX" ;;
  esac
fi
echo "=== ZIGSPARK_CUDA_ARCHS=${ZIGSPARK_CUDA_ARCHS:-default}" | tee -a "$log"
export ZIGSPARK_CUDA=1   # a GPU check without the extension is no check: fail the build rather than skip it
# A second call on the same (warm) machine reuses the extension the first one built, when the CUDA sources,
# the build script, the targets and the Python are the same (the tree is copied afresh, so mtimes tell nothing).
stamp=build/gpu-check-extension.stamp
sources=$( (cat setup.py $(find csrc -type f | sort); echo "${ZIGSPARK_CUDA_ARCHS:-} $("$PY" -V 2>&1)") | sha256sum)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$sources" ] && "$PY" -c "import zigspark._C" 2>/dev/null; then
  echo "=== extension already built here from these sources: not rebuilt" | tee -a "$log"
else
  step 240 "$PY" -m pip install --no-build-isolation --no-deps --no-index -e . && mkdir -p build \
    && echo "$sources" > "$stamp"
fi
step 60 "$PY" -m zigspark env
if [ "$PART" = all ] || [ "$PART" = tests ]; then
  # The tiers' time goes mostly to Triton compiles (~500 for the gpu tier, ~380 for the interpret tier, 0.5-2 s
  # each, CPU-bound): run the tests in parallel where pytest-xdist is installed. The workers share the GPU
  # and Triton's on-disk cache.
  workers=$("$PY" -c 'import xdist' 2>/dev/null && echo "-n ${GPU_CHECK_WORKERS:-12}")
  # the build tier is a few seconds: first, so the long tiers cannot crowd it out; then the gpu tier; then the
  # interpret tier, which on a GPU runs the real kernels at tiny shapes
  step 60 "$PY" -m pytest -q -ra -m build tests
  # loadgroup: the tests that need most of the GPU's memory (xdist_group "gpu-memory") share one worker
  step 300 "$PY" -m pytest -q -ra $workers $([ -n "$workers" ] && echo --dist loadgroup) -m gpu tests
  step 150 "$PY" -m pytest -q -ra $workers -m interpret tests
fi
if [ "$PART" = all ] || [ "$PART" = bench ]; then
  # a numerics table, not a timing: the hand-picked Triton tiles, no tuning
  step 90 env ZIGSPARK_AUTOTUNE=0 "$PY" -m zigspark check --large --dtypes float32 float16 bfloat16 --json benchmarks/results/check-gpu.json
  # The limits add up to more than the budget: the short benchmarks go first, so that every op gets its
  # figures, and bench_attention, whose candidate-tile timing takes a minute of compiles, takes what is left
  # (a benchmark cut off by its limit still writes the rows it measured).
  step 60 "$PY" benchmarks/bench_stat_topk.py
  step 60 "$PY" benchmarks/bench_spark.py
  step 45 "$PY" benchmarks/bench_token_prune.py
  step 100 "$PY" benchmarks/bench_selective_scan.py
  step 240 "$PY" benchmarks/bench_attention.py
fi
if [ "$PART" = all ] || [ "$PART" = more ]; then
  step 120 "$PY" benchmarks/bench_scaling.py
  step 180 "$PY" benchmarks/bench_e2e.py
  # the demo's digits ship with scikit-learn, which a machine without a registry may lack
  if "$PY" -c "import sklearn" 2>/dev/null; then
    step 240 "$PY" -m zigspark demo --size full --out demo-output/gpu
    cp demo-output/gpu/summary.json benchmarks/results/demo-summary-gpu.json 2>/dev/null && publish
  else
    echo "=== not run: zigspark demo (scikit-learn is not installed here; it holds the digits)" | tee -a "$log"
  fi
fi
echo "=== [$(date +%T)] done, status $status" | tee -a "$log"
publish
exit $status
