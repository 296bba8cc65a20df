"""Output allocation for the kernel backends.

Tests switch on ``poison_outputs`` so that every output a kernel should write starts as NaN (or True for
masks): an element the kernel forgets to write then fails the comparison instead of passing by luck.
"""

import contextlib

import torch

_poison = False


@contextlib.contextmanager
def poison_outputs(enabled: bool = True):
    global _poison
    previous, _poison = _poison, enabled
    try:
        yield
    finally:
        _poison = previous


def new_output(shape, dtype: torch.dtype, device) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype, device=device)
    if _poison:
        out.fill_(float("nan") if dtype.is_floating_point else 1)
    return out


def new_output_like(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """torch.empty_like (same strides as `t`), poisoned like new_output when tests ask for it."""
    out = torch.empty_like(t, dtype=dtype)
    if _poison:
        out.fill_(float("nan") if out.dtype.is_floating_point else 1)
    return out
