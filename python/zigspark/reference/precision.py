"""The dtype the references compute in: float64 for float64 inputs (the oracle), float32 for everything else."""

from __future__ import annotations

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32
