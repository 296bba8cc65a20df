"""`python -m zigspark env`: what zigspark can use on this machine, and why not where it cannot."""

from __future__ import annotations

import importlib.metadata
import platform

import torch

from . import __version__, _cuda, backends
from .triton_kernels import _tune


def _version_of(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def report() -> dict:
    """A JSON-serialisable description of the environment (also used as benchmark provenance)."""
    gpu = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu = {"name": props.name, "capability": f"{props.major}.{props.minor}",
               "memory_gib": round(props.total_memory / 2**30, 1), "count": torch.cuda.device_count()}
    ext = None
    if _cuda.is_built():
        C = _cuda.extension()
        ext = {"path": C.__file__, "archs": _cuda.compiled_archs(), "cuda_runtime": C.cuda_runtime_version(),
               "cuda_driver": C.cuda_driver_version(), "devices_seen": C.device_count()}
    return {
        "zigspark": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version_of("triton"),
        "triton_interpret": backends.triton_interpreting(),
        "triton_autotune": _tune.enabled(),
        "gpu": gpu,
        "extension": ext,
        "extension_error": None if ext else _cuda.load_error(),
        "backends": backends.available_backends(),
    }


def format_report(info: dict) -> str:
    lines = [
        f"zigspark {info['zigspark']}  python {info['python']}  ({info['platform']})",
        f"torch {info['torch']} (CUDA {info['torch_cuda'] or 'none'})   triton {info['triton'] or 'not installed'}"
        + ("   TRITON_INTERPRET=1" if info["triton_interpret"] else "")
        + ("" if info["triton_autotune"] else f"   {_tune.ENV}=0 (hand-picked Triton tiles)"),
    ]
    gpu = info["gpu"]
    lines.append(f"GPU: {gpu['name']} (sm {gpu['capability']}, {gpu['memory_gib']} GiB) x{gpu['count']}" if gpu
                 else "GPU: none visible to torch")
    ext = info["extension"]
    if ext:
        lines.append(f"zigspark._C: built for {', '.join(ext['archs'])}; CUDA runtime {ext['cuda_runtime']}, "
                     f"driver {ext['cuda_driver'] or 'none'}, {ext['devices_seen']} device(s)")
    else:
        lines.append(f"zigspark._C: not built ({info['extension_error']})")
    device = "cuda" if gpu else "cpu"
    lines.append(f"backends on {device} (ok, or why not):")
    for op, table in info["backends"].items():
        lines.append(f"  {op}:")
        for backend, reason in table.items():
            lines.append(f"    {backend:<9} {'ok' if reason is None else reason}")
    return "\n".join(lines)
