"""Build tier: the CUDA extension was compiled, imports without a GPU and without torch, and fails
clearly when asked to launch without one. Skipped (with the reason) only where nvcc is absent."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

from zigspark import _cuda

pytestmark = pytest.mark.build

@pytest.fixture(scope="module")
def C(cuda_extension):
    return cuda_extension


def _requested_archs(spec: str) -> list[str]:
    """The names zigspark._C reports for a ZIGSPARK_CUDA_ARCHS spec such as '8.0+PTX;9.0a'."""
    names = []
    for item in filter(None, (s.strip() for s in spec.replace(",", ";").split(";"))):
        ptx = item.upper().endswith("+PTX")
        num = item[:-4] if ptx else item
        num = num.replace("sm_", "").replace("compute_", "").replace(".", "")
        names += [f"sm_{num}"] + ([f"compute_{num}"] if ptx else [])
    return names


def test_compiled_for_the_requested_archs(C):
    """By default for Ampere and Hopper with PTX for newer GPUs; with ZIGSPARK_CUDA_ARCHS set (make
    gpu-check builds for the GPU it runs on) exactly for what was asked."""
    archs = _cuda.compiled_archs()
    spec = os.environ.get("ZIGSPARK_CUDA_ARCHS")
    if spec:
        assert archs == _requested_archs(spec), (spec, archs)
        return
    assert "sm_80" in archs and "sm_90a" in archs, archs
    assert any(a.startswith("compute_") for a in archs), f"no PTX for forward compatibility in {archs}"
    assert _requested_archs("8.0+PTX;9.0a") == ["sm_80", "compute_80", "sm_90a"]


def test_imports_without_torch(C):
    code = "import sys, importlib.util, importlib.machinery as m\n" \
           f"spec = importlib.util.spec_from_file_location('zigspark._C', {C.__file__!r})\n" \
           "mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)\n" \
           "assert 'torch' not in sys.modules\nprint(mod.cuda_runtime_version())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) >= 12000


def test_links_no_torch_and_no_shared_cudart(C):
    readelf = shutil.which("readelf")
    if readelf is None:
        pytest.skip("readelf (binutils) not installed")
    dynamic = subprocess.run([readelf, "-d", C.__file__], capture_output=True, text=True, check=True).stdout
    needed = [line for line in dynamic.splitlines() if "(NEEDED)" in line]
    for forbidden in ("libtorch", "libc10", "libcudart"):
        assert not any(forbidden in line for line in needed), f"_C depends on {forbidden}: {needed}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU; the gpu tier covers launches")
def test_launch_without_gpu_raises_clear_error(C):
    assert C.device_count() == 0
    with pytest.raises(RuntimeError, match="no CUDA device is available.*backend='reference'"):
        C.stat_topk_forward(x=1, y=1, mask=0, mean=1, std=1, rows=1, d=4, x_row_stride=4, y_row_stride=4,
                            mask_row_stride=0, dtype=0, z=1.0, device=0, stream=0)
    with pytest.raises(RuntimeError, match="no CUDA device is available"):
        C.stat_topk_backward(grad_y=1, x=1, mean=1, std=1, grad_x=1, rows=1, d=4, grad_y_row_stride=4,
                             x_row_stride=4, grad_x_row_stride=4, dtype=0, z=1.0, device=0, stream=0)


def test_bad_dtype_code_is_rejected(C):
    if not torch.cuda.is_available():
        pytest.skip("the dtype code is checked after the device check; needs a GPU")
    with pytest.raises(ValueError, match="unsupported dtype code 9"):
        C.stat_topk_forward(x=1, y=1, mask=0, mean=1, std=1, rows=1, d=4, x_row_stride=4, y_row_stride=4,
                            mask_row_stride=0, dtype=9, z=1.0, device=0, stream=0)
