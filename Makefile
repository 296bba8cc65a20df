# zigspark: the commands a newcomer and CI run. See README.md.
#   make demo       check every available backend of every op against the reference (main job)
#   make test       fresh/updated .venv, install, then the cpu, build, interpret (and gpu) test tiers
#   make bench      run every benchmark on the present device, results into benchmarks/results/
#   make gpu-check  on a GPU machine without a package registry: build in place, gpu tier, benchmarks

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The GPU machine has torch, triton, nvcc and pytest in its own python and no registry: use it as is.
GPU_PYTHON ?= python3
PYTEST_FLAGS ?= -q -ra

.PHONY: all install test test-cpu test-interpret test-gpu demo bench gpu-check clean

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
	$(MAKE) --no-print-directory test-gpu test-cpu test-interpret

test-cpu:
	$(PY) -m pytest $(PYTEST_FLAGS) -m "cpu or build" tests

# Own process: TRITON_INTERPRET must be set before triton is imported.
test-interpret:
	TRITON_INTERPRET=1 $(PY) -m pytest $(PYTEST_FLAGS) -m interpret tests

test-gpu:
	$(PY) -m pytest $(PYTEST_FLAGS) -m gpu tests

demo: install
	$(PY) -m zigspark check

bench: install
	$(PY) benchmarks/run_all.py

# PART=tests or PART=bench splits it over two device calls of at most 10 minutes each.
gpu-check:
	GPU_PYTHON=$(GPU_PYTHON) RESULTS_DIR=$(RESULTS_DIR) PART=$(or $(PART),all) bash scripts/gpu_check.sh

clean:
	rm -rf build dist python/*.egg-info python/zigspark/_C*.so .pytest_cache
