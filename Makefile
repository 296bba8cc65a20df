# zigspark: the commands a newcomer and CI run. See README.md.
#   make demo       the main job: recognizer + ZigMa on digits, samples, metrics (DEMO_SIZE=full on a GPU)
#   make check      every available backend of the ops with continuous outputs vs the reference (README)
#   make test       fresh/updated .venv, install, then the cpu, build, emulate, compile, interpret (and gpu) tiers
#   make bench      run every benchmark on the present device, results into benchmarks/results/
#   make report     BENCHMARKS.md + plots + python/zigspark/auto_backends.json from the committed results
#   make gpu-check  on a GPU machine without a package registry: build in place, gpu tier, benchmarks

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The GPU machine has torch, triton, nvcc and pytest in its own python and no registry: use it as is.
GPU_PYTHON ?= python3
PYTEST_FLAGS ?= -q -ra

.PHONY: all install test test-cpu test-emulate test-compile test-interpret test-gpu demo check bench report gpu-check clean

all: test

$(VENV)/.deps: requirements/test.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet -r requirements/test.txt
	@touch $@

# Editable install; builds zigspark._C with nvcc when it is found (ZIGSPARK_CUDA=auto).
install: $(VENV)/.deps
	$(PY) -m pip install --quiet --no-build-isolation --no-deps -e .

# The gpu tier goes first: on a machine without a GPU it only lists its skips, and CI reads the closing
# line of the last pytest run, which should count the tests that ran.
test: install
	$(PY) -m zigspark env
	$(MAKE) --no-print-directory test-gpu test-cpu test-emulate test-compile test-interpret

test-cpu:
	$(PY) -m pytest $(PYTEST_FLAGS) -m "cpu or build" tests

# Own process: the CUDA kernels compiled for the CPU (csrc/emulate) stand in for zigspark._C there.
test-emulate:
	emulator="$$($(PY) scripts/build_emulator.py)" && \
	  ZIGSPARK_CUDA_EMULATOR="$$emulator" $(PY) -m pytest $(PYTEST_FLAGS) -m emulate tests

# Own process: it swaps Triton's launch for an ahead-of-time compile for sm_90a (tests/aot.py); one op per
# worker, ~4 minutes on 2 cores. COMPILE_WORKERS=0 runs it in one process and prints each op's spills.
COMPILE_WORKERS ?= auto
test-compile:
	$(PY) -m pytest $(PYTEST_FLAGS) -n $(COMPILE_WORKERS) -m compile tests

# Own process: TRITON_INTERPRET must be set before triton is imported.
test-interpret:
	TRITON_INTERPRET=1 $(PY) -m pytest $(PYTEST_FLAGS) -m interpret tests

test-gpu:
	$(PY) -m pytest $(PYTEST_FLAGS) -m gpu tests

# The main job: recognizer + ZigMa generator on digits, pruning table, samples, metrics → demo-output/.
# DEMO_SIZE=full for a GPU machine. `make check` is the kernel-vs-reference table it used to be.
demo: install
	$(PY) -m zigspark demo --out demo-output --size $(or $(DEMO_SIZE),fast)

check: install
	$(PY) -m zigspark check

bench: install
	$(PY) benchmarks/run_all.py

# BENCHMARKS.md, its plots and the auto backend table, regenerated from benchmarks/results/*.json
report: install
	$(PY) benchmarks/auto_table.py
	$(PY) benchmarks/report.py

# PART=tests or PART=bench splits it over two device calls of at most 10 minutes each.
gpu-check:
	GPU_PYTHON=$(GPU_PYTHON) RESULTS_DIR=$(RESULTS_DIR) PART=$(or $(PART),all) bash scripts/gpu_check.sh

clean:
	rm -rf build dist python/*.egg-info python/zigspark/_C*.so .pytest_cache
