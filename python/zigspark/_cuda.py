"""Loading the optional CUDA extension ``zigspark._C`` and translating tensors into its raw arguments.

_C includes no torch header: it receives data pointers, sizes, strides, a dtype code, the device index
and the stream handle. Everything torch-specific (validation, allocation, streams) happens here.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os

import torch

# Mirrors csrc/common/dtype.h.
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}

REBUILD_HINT = (
    "rebuild zigspark with the CUDA toolkit on PATH: `ZIGSPARK_CUDA=1 pip install --no-build-isolation .` "
    "(or `make install`); see `python -m zigspark env`"
)

# The emulate test tier sets this to a zigspark._C_emulated built by scripts/build_emulator.py: the same
# kernels compiled for the CPU (csrc/emulate), so backend="cuda" runs them on CPU tensors, as
# TRITON_INTERPRET=1 runs the Triton kernels. Only for tests: it is thousands of times slower than a GPU.
EMULATOR_ENV = "ZIGSPARK_CUDA_EMULATOR"
_emulator_path = os.environ.get(EMULATOR_ENV) or None  # read once: it decides which module _load imports

_module = None
_load_error: str | None = None
_loaded = False


def emulating() -> bool:
    """True when backend="cuda" runs the CPU emulation of the CUDA kernels (tests only)."""
    return _emulator_path is not None


def _on_emulator(device: torch.device) -> bool:
    return device.type == "cpu" and _emulator_path is not None


def _import_emulator(path: str):
    spec = importlib.util.spec_from_file_location("zigspark._C_emulated", path)
    if spec is None or not os.path.exists(path):
        raise ImportError(f"{EMULATOR_ENV}={path!r} is not a built module; build it with "
                          "`python scripts/build_emulator.py` (make test-emulate does)")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _load():
    global _module, _load_error, _loaded
    if not _loaded:
        _loaded = True
        try:
            _module = _import_emulator(_emulator_path) if _emulator_path else importlib.import_module("zigspark._C")
        except ImportError as exc:
            _load_error = f"{type(exc).__name__}: {exc}"
    return _module


def extension():
    """The _C module, or raise an error that says why it is missing and how to build it."""
    module = _load()
    if module is None:
        raise ImportError(f"zigspark._C is not available ({_load_error}); {REBUILD_HINT}")
    return module


def is_built() -> bool:
    return _load() is not None


def load_error() -> str | None:
    _load()
    return _load_error


def compiled_archs() -> list[str]:
    module = _load()
    return [a for a in module.compiled_archs().split(";") if a] if module else []


def supports_device(device: torch.device) -> str | None:
    """None if _C has code that runs on `device`, else the reason."""
    if emulating():
        return None if device.type == "cpu" else f"the CUDA emulator ({EMULATOR_ENV}) runs on CPU tensors only"
    archs = compiled_archs()
    major, minor = torch.cuda.get_device_capability(device)
    cc = major * 10 + minor
    for arch in archs:
        kind, _, num = arch.partition("_")
        base = int("".join(ch for ch in num if ch.isdigit()))
        arch_specific = num[-1:] in ("a", "f")
        if kind == "sm" and (base == cc or (not arch_specific and base // 10 == cc // 10 and base <= cc)):
            return None
        if kind == "compute" and base <= cc and not arch_specific:
            return None
    return (f"zigspark._C was compiled for {archs or 'no architecture'} but the GPU is sm_{cc}; rebuild with "
            f"ZIGSPARK_CUDA_ARCHS='{major}.{minor}' pip install --no-build-isolation .")


def dtype_code(dtype: torch.dtype) -> int:
    return DTYPE_CODES[dtype]


def ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def device_index(t: torch.Tensor) -> int:
    """The CUDA device a tensor lives on (a CUDA tensor's device always carries its index)."""
    return 0 if _on_emulator(t.device) else t.device.index


def stream_of(t: torch.Tensor) -> int:
    if _on_emulator(t.device):
        return 0  # the emulator runs every launch synchronously
    return torch.cuda.current_stream(t.device).cuda_stream


@functools.lru_cache(maxsize=None)
def _optin_bytes(index: int) -> int:
    props = torch.cuda.get_device_properties(index)
    return int(getattr(props, "shared_memory_per_block_optin", 48 * 1024))


def shared_memory_optin(device: torch.device) -> int:
    """Bytes of shared memory a block may opt in to on `device` (the emulator models an H100: 227 KiB)."""
    if _on_emulator(device):
        return 227 * 1024
    return _optin_bytes(torch.cuda.current_device() if device.index is None else device.index)


def multiprocessor_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 132  # the CUDA emulator and Triton's interpreter stand in for an H100 SXM
    return torch.cuda.get_device_properties(device).multi_processor_count
