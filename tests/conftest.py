"""Test tiers (DESIGN.md §4) and shared fixtures.

  cpu        always: reference ops, bad inputs, opcheck, gradcheck, torch.compile, CLI
  interpret  Triton kernels; on the CPU only with TRITON_INTERPRET=1 set before triton is imported, so
             `make test` runs this tier in its own pytest process
  compile    every Triton kernel compiled ahead of time for Hopper (sm_90a) on the CPU, at the launch
             configurations the ops choose: compile errors, registers, spills, shared memory (tests/aot.py)
  build      the CUDA extension zigspark._C was built and imports
  emulate    the CUDA kernels of csrc/ on tiny shapes, run on the CPU by csrc/emulate (backend="cuda" on CPU
             tensors); only with ZIGSPARK_CUDA_EMULATOR set, so `make test` runs it in its own pytest process
  gpu        every backend x dtype at real sizes; skipped with the reason where there is no GPU

Every test carries exactly one tier marker; `pytest -m <tier>` selects a tier.
"""

import os
import shutil
from pathlib import Path

import pytest
import torch

from zigspark import _alloc, _cuda, backends

# Tests run the hand-picked Triton tiles: tuning would time every candidate for every test shape. The tests
# that check tuning itself, and every candidate tile, switch it on or pin the tiles themselves.
os.environ.setdefault("ZIGSPARK_AUTOTUNE", "0")

HAS_GPU = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
EMULATING = _cuda.emulating()


def pytest_collection_modifyitems(config, items):
    tiers = {"cpu", "interpret", "compile", "build", "gpu", "emulate"}
    for item in items:
        marks = tiers & {m.name for m in item.iter_markers()}
        if len(marks) != 1:
            raise pytest.UsageError(f"{item.nodeid} must carry exactly one tier marker of {sorted(tiers)}, "
                                    f"has {sorted(marks)}")
        if "gpu" in marks and not HAS_GPU:
            item.add_marker(pytest.mark.skip(reason="gpu tier: no CUDA device visible to torch on this machine"))
        if "emulate" in marks and not EMULATING:
            item.add_marker(pytest.mark.skip(
                reason="emulate tier: needs ZIGSPARK_CUDA_EMULATOR set to a built emulator (make test-emulate)"))
        if EMULATING and "emulate" not in marks:
            item.add_marker(pytest.mark.skip(reason="the CUDA emulator replaces zigspark._C: only the emulate tier runs"))
        if "interpret" in marks and not (HAS_GPU or INTERPRET):
            item.add_marker(pytest.mark.skip(
                reason="interpret tier: needs a GPU or TRITON_INTERPRET=1 set before import (make test-interpret)"))
        if "compile" in marks and INTERPRET:
            item.add_marker(pytest.mark.skip(
                reason="compile tier: the interpreter compiles nothing; run it without TRITON_INTERPRET (make test-compile)"))


@pytest.fixture(autouse=True)
def _poison_kernel_outputs():
    """Kernel outputs start as NaN, so an element a kernel fails to write cannot pass by luck."""
    with _alloc.poison_outputs(True):
        yield


@pytest.fixture
def triton_device():
    """Where Triton kernels run in the interpret tier: the GPU if there is one, else the CPU interpreter."""
    if HAS_GPU:
        return torch.device("cuda")
    assert backends.triton_interpreting()
    return torch.device("cpu")


@pytest.fixture
def small_grid(monkeypatch):
    """A grid axis of 4 programs instead of CUDA's 65535, so that tiny shapes launch the attention kernels in
    slices of the batch as a batch·heads over 65535 would."""
    from zigspark.triton_kernels import _grid

    monkeypatch.setattr(_grid, "GRID_Y_MAX", 4)


@pytest.fixture
def wide_rows(monkeypatch):
    """The attention kernels' int64 row addressing (WIDE), used from 2³¹ elements per sample on, turned on
    for every size, so that tiny shapes run it."""
    from zigspark.triton_kernels import attention

    monkeypatch.setattr(attention, "WIDE_FROM", 0)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny-tensor model tests: on a 2-core machine two threads cost more
    than they bring, and many times more when the machine is busy. Use with
    `pytestmark = [..., pytest.mark.usefixtures("one_thread")]`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


HAS_NVCC = shutil.which("nvcc") is not None or Path("/usr/local/cuda/bin/nvcc").exists()


@pytest.fixture(scope="session")
def cuda_extension():
    """zigspark._C for the build tier: a failure where nvcc exists but the extension did not build, a skip
    (with the reason) where there is no nvcc."""
    if not _cuda.is_built():
        if HAS_NVCC:
            pytest.fail(f"nvcc is installed but zigspark._C did not build or import: {_cuda.load_error()}")
        pytest.skip("build tier: no nvcc on this machine, so the CUDA extension was not built")
    return _cuda.extension()
