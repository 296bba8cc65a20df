"""Embeddings of a DiT-style generator: timesteps, class labels and fixed 2-D / 3-D token positions.

Timestep (DiT, after GLIDE): with half = F/2 frequencies ω_k = P^(−k/half), k = 0..half−1, P = 10000,

    e(t) = [cos(s·t·ω_0) … cos(s·t·ω_{half−1}), sin(s·t·ω_0) … sin(s·t·ω_{half−1})],   s = 1000

so t ∈ [0, 1] spans the same phases as DiT's integer steps 0..1000; an MLP (Linear → SiLU → Linear) maps
e(t) to the model width.

Labels: a table of num_classes + 1 rows; row num_classes is the *null class* (unconditional, for
classifier-free guidance).

Positions (MAE / DiT sin-cos): a width-D embedding of one coordinate p is the 1-D code
[sin(p·ω_k), cos(p·ω_k)], ω_k = 10000^(−k/(D/2)), k = 0..D/2−1. A 2-D grid splits the width in halves —
one half codes the row, the other the column; video adds the 1-D code of the frame index, so frame f's
tokens carry spatial(r, c) + temporal(f).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, *, scale: float = 1000.0, max_period: float = 10000.0
                       ) -> torch.Tensor:
    """Sinusoidal code of t. t: (B,) float in [0, 1] → (B, dim) float32 (computed in float32 always)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (scale * t.float())[:, None] * freqs[None]
    code = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        code = torch.cat([code, torch.zeros_like(code[:, :1])], dim=-1)
    return code


class TimestepEmbedder(nn.Module):
    """t (B,) in [0, 1] → (B, width): sinusoidal code then Linear → SiLU → Linear."""

    def __init__(self, width: int, frequency_dim: int = 256):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, width), nn.SiLU(), nn.Linear(width, width))
        nn.init.normal_(self.mlp[0].weight, std=0.02)
        nn.init.normal_(self.mlp[2].weight, std=0.02)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        code = timestep_embedding(t, self.frequency_dim)
        return self.mlp(code.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """y (B,) long in 0..num_classes (num_classes = null class) → (B, width)."""

    def __init__(self, num_classes: int, width: int):
        super().__init__()
        self.num_classes = num_classes
        self.table = nn.Embedding(num_classes + 1, width)
        nn.init.normal_(self.table.weight, std=0.02)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.table(y)


def sincos_1d(width: int, positions: torch.Tensor) -> torch.Tensor:
    """(P,) positions → (P, width) float32 code [sin(p·ω_k) …, cos(p·ω_k) …]; width must be even."""
    half = width // 2
    omega = 1.0 / 10000 ** (torch.arange(half, dtype=torch.float64) / half)
    args = positions.double()[:, None] * omega[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1).float()


def sincos_2d(width: int, h: int, w: int) -> torch.Tensor:
    """(h·w, width) position code of an h×w grid in raster order: row code ‖ column code (width % 4 == 0)."""
    rows = torch.arange(h).repeat_interleave(w)
    cols = torch.arange(w).repeat(h)
    return torch.cat([sincos_1d(width // 2, rows), sincos_1d(width // 2, cols)], dim=1)


def sincos_3d(width: int, frames: int, h: int, w: int) -> torch.Tensor:
    """(frames·h·w, width) code in raster order (frame-major): spatial(r, c) + temporal(f)."""
    spatial = sincos_2d(width, h, w)
    temporal = sincos_1d(width, torch.arange(frames))
    return (temporal[:, None, :] + spatial[None, :, :]).reshape(frames * h * w, width)


class PositionEmbedding(nn.Module):
    """Adds a (L, width) position table to (B, L, width) tokens: fixed sin-cos, or learned (initialised to it)."""

    def __init__(self, table: torch.Tensor, learned: bool):
        super().__init__()
        if learned:
            self.table = nn.Parameter(table.clone())
        else:
            # fixed and recomputed from the config, so not part of the checkpoint
            self.register_buffer("table", table, persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens + self.table.to(tokens.dtype)
