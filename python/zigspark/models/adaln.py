"""adaLN-Zero blocks of ZigMa (DiT's conditioning, Mamba mixer in place of attention + MLP).

One block, with c the conditioning vector (timestep + class embedding) and x the (B, L, D) tokens:

    (shift, scale, gate) = Linear(SiLU(c))                       Linear zero-initialised
    x ← x + gate · Mixer( LayerNorm(x) · (1 + scale) + shift )    LayerNorm without affine

With the modulation zero-initialised, gate = 0 and every block starts as the identity (adaLN-Zero).
The mixer is a ZigzagMamba scanning along the block's order (zigzag path i mod 8 for block i).

Final layer: (shift, scale) = Linear(SiLU(c)); out = Linear(LayerNorm(x)·(1 + scale) + shift), both
linears zero-initialised, so the untrained model predicts 0.

Precision: LayerNorm runs in float32 (autocast keeps it there); the residual stream keeps the dtype of the
tokens that enter the stack (float32 under bf16 autocast), because the gated mixer output is added to it.
"""

from __future__ import annotations

import torch
from torch import nn

from ..nn.zigzag_mamba import ZigzagMamba


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (B, L, D), shift/scale (B, D) → x·(1 + scale) + shift, broadcast over the L tokens."""
    return x * (1 + scale[:, None]) + shift[:, None]


def zero_linear(width_in: int, width_out: int) -> nn.Linear:
    linear = nn.Linear(width_in, width_out)
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)
    return linear


class ZigMaBlock(nn.Module):
    """LayerNorm → adaLN-Zero modulation → ZigzagMamba along `order` → gated residual.

    Args:
        width: token width D.
        grid: (h, w) or (frames, h, w) token grid (for the mixer's shape checks).
        order: the mixer's zigspark.orders order.
        mamba: keyword arguments of ZigzagMamba (d_state, d_conv, expand, backend).
    """

    def __init__(self, width: int, grid, order, **mamba):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.modulation = nn.Sequential(nn.SiLU(), zero_linear(width, 3 * width))
        self.mixer = ZigzagMamba(width, grid, order=order, **mamba)

    @property
    def order(self):
        return self.mixer.order

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x (B, L, D), c (B, D) → (B, L, D)."""
        shift, scale, gate = self.modulation(c).chunk(3, dim=-1)
        return x + gate[:, None] * self.mixer(modulate(self.norm(x), shift, scale))


class FinalLayer(nn.Module):
    """LayerNorm → adaLN (shift, scale) → Linear to out_width; zero-initialised."""

    def __init__(self, width: int, out_width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.modulation = nn.Sequential(nn.SiLU(), zero_linear(width, 2 * width))
        self.linear = zero_linear(width, out_width)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x (B, L, D), c (B, D) → (B, L, out_width)."""
        shift, scale = self.modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))
