"""Argument checks shared by the public ops. Errors name the argument, what was expected and what came."""

from __future__ import annotations

import math
import numbers

import torch


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def check_float_tensor(name: str, t, dtypes: tuple[torch.dtype, ...]) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        expected = ", ".join(_dtype_name(d) for d in dtypes)
        raise TypeError(f"{name} must have a floating dtype ({expected}), got {_dtype_name(t.dtype)}; "
                        f"convert it with {name}.float()")


def check_dim(name: str, dim, ndim: int) -> int:
    """Normalise a possibly negative dimension index, or raise ValueError."""
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"{name} must be an int, got {type(dim).__name__}")
    if ndim == 0:
        raise ValueError(f"{name}={dim}: the tensor is 0-dimensional; give it at least one dimension")
    if not -ndim <= dim < ndim:
        raise ValueError(f"{name}={dim} is out of range for a tensor with {ndim} dimensions "
                         f"(expected {-ndim} <= {name} < {ndim})")
    return dim % ndim


def check_same_device(**tensors: torch.Tensor | None) -> torch.device:
    """All given tensors on one device; returns it."""
    present = {k: v for k, v in tensors.items() if v is not None}
    devices = {k: v.device for k, v in present.items()}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{k} on {d}" for k, d in devices.items())
        raise ValueError(f"all tensors must be on the same device, got {listing}; move them with .to(device)")
    return next(iter(devices.values()))


def last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """t itself if its last dimension has stride 1 (what the kernels need), else a contiguous copy."""
    return t if t.dim() == 0 or t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def is_finite_real(value) -> bool:
    """Whether `value` is a finite real number (bools are not numbers here), for the float arguments' checks."""
    return not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)


def check_density(density, op: str) -> float:
    """The fraction of values kept (stat_topk, Spark FFN): a real number strictly between 0 and 1."""
    if isinstance(density, bool) or not isinstance(density, numbers.Real):
        raise TypeError(f"{op}: density must be a float in the open interval (0, 1), got "
                        f"{type(density).__name__} {density!r}")
    if not (math.isfinite(density) and 0.0 < density < 1.0):
        raise ValueError(f"{op}: density must be in the open interval (0, 1) (Spark Transformer uses 0.08), "
                         f"got {density!r}")
    return float(density)


def check_bool(name: str, value, op: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{op}: {name} must be a bool (True or False), got {type(value).__name__} {value!r}")
    return value


def check_std_correction(value, op: str) -> float:
    """Bessel-style correction of the std behind a statistical top-k threshold: σ² = Σ(x − μ)²/(n − c),
    c in [0, 1] (0: population std, the default; 1: sample std)."""
    if not is_finite_real(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{op}: std_correction must be a number in [0, 1] (0: population std, 1: sample std), "
                         f"got {value!r}")
    return float(value)


def check_int(name: str, value, minimum: int, *, optional: bool = False) -> int | None:
    """`value` as an int >= minimum (bools are not ints); None passes when `optional`."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int{' or None' if optional else ''}, got {type(value).__name__} "
                        f"{value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)
