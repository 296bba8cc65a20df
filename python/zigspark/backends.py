"""Backend selection: which implementation of an op runs, and why.

Every public op takes ``backend="auto" | "cuda" | "triton" | "reference"``.

* An explicit backend either runs or raises :class:`BackendUnavailableError` naming the cause and the fix —
  never a silent fallback.
* ``auto`` walks the preference list for the tensors' device type in ``auto_backends.json`` (written from
  benchmark results; see that file's provenance) and takes the first backend that can run; it logs once per
  (op, device type) which one it picked. :func:`last_backends` tells which backend each op last used.
* Where the results showed a different winner at different sizes, the table also holds size ranges
  (``by_size``: the op's size key, e.g. the sequence length, and an order per range up to a bound); an op
  passes its size to :func:`resolve` and ``auto`` takes the order of the range that holds it.

Each backend answers ``unavailable_reason(op, device, dtype)`` (None when it can run), in the spirit of
xformers' ``not_supported_reasons``, so "why did auto not pick the GPU kernel" always has an answer.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import os
from importlib import resources

import torch

from . import _cuda
from .errors import BackendUnavailableError

log = logging.getLogger("zigspark")

BACKENDS = ("cuda", "triton", "reference")
CHOICES = ("auto", *BACKENDS)

# dtypes each backend's kernels are written for, per op (ops register themselves here).
_OP_DTYPES: dict[str, dict[str, tuple[torch.dtype, ...]]] = {}
_SIZE_KEYS: dict[str, str] = {}
_logged: set[tuple[str, str, str]] = set()
_last: dict[str, str] = {}
_table_cache: dict | None = None


def register_op(op: str, dtypes: dict[str, tuple[torch.dtype, ...]], size_key: str | None = None) -> None:
    """Declare an op, the dtypes each of its backends supports, and the name of the size it passes to
    :func:`resolve` — the field of its benchmark rows that auto_backends.json's size ranges are cut along."""
    _OP_DTYPES[op] = dtypes
    if size_key is not None:
        _SIZE_KEYS[op] = size_key


def size_key(op: str) -> str | None:
    return _SIZE_KEYS.get(op)


def ops() -> list[str]:
    return sorted(_OP_DTYPES)


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _triton_reason(device: torch.device) -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed; install it with `pip install triton` (Linux + NVIDIA GPU)"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and triton_interpreting():
        return None
    return (f"Triton kernels run on CUDA tensors, these are on {device.type}; move them with .cuda(), or use "
            "backend='reference' (tests run Triton on the CPU with TRITON_INTERPRET=1 set before import)")


def _cuda_reason(device: torch.device) -> str | None:
    if not _cuda.is_built():
        return f"the CUDA extension zigspark._C is not built ({_cuda.load_error()}); {_cuda.REBUILD_HINT}"
    if _cuda.emulating():
        return _cuda.supports_device(device)
    if device.type != "cuda":
        return (f"backend='cuda' needs CUDA tensors, these are on {device.type}; move them with .cuda(), or use "
                "backend='reference'")
    return _cuda.supports_device(device)


def unavailable_reason(op: str, backend: str, device: torch.device, dtype: torch.dtype | None = None) -> str | None:
    """None if `backend` can run `op` on tensors of this device and dtype, else why not (with the fix)."""
    if backend not in CHOICES[1:]:
        raise ValueError(f"backend must be one of {CHOICES}, got {backend!r}")
    implemented = _OP_DTYPES.get(op)
    if implemented is not None and backend not in implemented:
        return (f"zigspark.{op} has no {backend} backend yet (it has: {', '.join(implemented)}); "
                "use backend='reference' or 'auto'")
    if backend == "reference":
        reason = None
    elif backend == "triton":
        reason = _triton_reason(device)
    else:
        reason = _cuda_reason(device)
    if reason is None and dtype is not None:
        supported = _OP_DTYPES.get(op, {}).get(backend)
        if supported is not None and dtype not in supported:
            names = ", ".join(str(d).replace("torch.", "") for d in supported)
            reason = f"the {backend} backend of {op} supports {names}, not {str(dtype).replace('torch.', '')}"
    return reason


_KERNEL_PACKAGES = {"triton": "triton_kernels", "cuda": "cuda_ops"}


def kernels(backend: str, module: str):
    """The module of `module`'s kernels for a kernel backend (zigspark.triton_kernels.<module> or
    zigspark.cuda_ops.<module>), imported on first use, so that zigspark imports without triton."""
    return importlib.import_module(f"{__package__}.{_KERNEL_PACKAGES[backend]}.{module}")


def auto_table() -> dict:
    """The committed preference table (python/zigspark/auto_backends.json)."""
    global _table_cache
    if _table_cache is None:
        text = resources.files("zigspark").joinpath("auto_backends.json").read_text()
        _table_cache = json.loads(text)
    return _table_cache


def auto_order(op: str, device: torch.device, size: int | None = None) -> list[str]:
    """The preference order for `op` on this device type, for an input of `size` (the op's size key)."""
    entry = auto_table()["ops"].get(op, {})
    by_size = (entry.get("by_size") or {}).get(device.type)
    if by_size and size is not None:
        for bound in by_size["ranges"]:
            if bound["up_to"] is None or size <= bound["up_to"]:
                return list(bound["order"])
    return list(entry.get(device.type, entry.get("default", ["reference"])))


@torch.compiler.assume_constant_result
def resolve(op: str, backend: str, device: torch.device, dtype: torch.dtype | None = None,
            size: int | None = None) -> str:
    """The backend that will run `op`: validates an explicit choice, or picks one for 'auto' (by the size
    range that holds `size`, where the table has ranges for this op and device type).

    Under torch.compile this runs once at trace time and its answer is a constant of the graph (the device
    and dtype it depends on are guarded by the compiled graph anyway).
    """
    if backend not in CHOICES:
        raise ValueError(f"zigspark.{op}: backend must be one of {CHOICES}, got {backend!r}")
    if backend != "auto":
        reason = unavailable_reason(op, backend, device, dtype)
        if reason is not None:
            raise BackendUnavailableError(f"zigspark.{op}: backend={backend!r} cannot run here: {reason}")
        chosen = backend
    else:
        tried = []
        for candidate in auto_order(op, device, size):
            reason = unavailable_reason(op, candidate, device, dtype)
            if reason is None:
                chosen = candidate
                break
            tried.append(f"{candidate}: {reason}")
        else:
            chosen = "reference"
        key = (op, device.type, chosen)
        if key not in _logged:
            _logged.add(key)
            skipped = f" (skipped {'; '.join(tried)})" if tried else ""
            log.info("zigspark.%s on %s: backend='auto' runs %s%s", op, device.type, chosen, skipped)
    _last[op] = chosen
    return chosen


def record(op: str, backend: str) -> None:
    """Correct the record when an op changes the resolved backend for a shape it cannot run."""
    if _last.get(op) != backend and not torch.compiler.is_compiling():
        log.info("zigspark.%s: running %s for this shape (instead of %s)", op, backend, _last.get(op))
    _last[op] = backend


def last_backends() -> dict[str, str]:
    """{op: backend} of the most recent call of each op in this process."""
    return dict(_last)


def available_backends(device: str | torch.device | None = None) -> dict[str, dict[str, str | None]]:
    """For each op, each backend -> None if it can run on `device` (default: cuda if present, else cpu),
    else the reason it cannot."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    return {op: {b: unavailable_reason(op, b, device) for b in BACKENDS} for op in ops()}
