"""Numerics the references share: the dtype they compute in (float64 for float64 inputs, the oracle; float32
for everything else), and exp as exp2.

torch's CPU exp takes a slow path wherever float32 underflows (x < −87.3): 10–30× slower per element on
the development machine, and a softmax with masked or far-below-max scores is full of such elements.
exp2 has no slow path there and is also cheaper in range, so the references take exp(x) = 2^(x·log₂e).
"""

from __future__ import annotations

import math

import torch

LOG2E = 1.0 / math.log(2.0)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def exp_(t: torch.Tensor) -> torch.Tensor:
    """In place, t -> exp(t), computed as 2^(t·log₂e)."""
    return t.mul_(LOG2E).exp2_()
