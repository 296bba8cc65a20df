"""Statistical top-k (Spark Transformer, arXiv 2506.06644) in plain PyTorch.

For each row x of length d, with k the number of values meant to survive and z = Φ⁻¹(1 − k/d):

    μ = mean(x),   σ = sqrt(mean((x − μ)²))   (population std),   θ = μ + z·σ
    y = relu(x − θ),   mask = x > θ

If x is roughly Gaussian, about k of the d values exceed θ: a top-k in O(d) without sorting.
Statistics are computed in float32 (float64 for float64 input); y has x's dtype.

Backward, with g = ∂L/∂y and S = Σ_j g_j·mask_j (θ depends on every x_i through μ and σ):

    ∂θ/∂x_i = 1/d + z·(x_i − μ)/(d·σ),     ∂L/∂x_i = g_i·mask_i − S·∂θ/∂x_i

When σ = 0 every mask is 0, so S = 0 and the gradient is 0 (the σ term is taken as 0, not 0/0).

All functions here work on the last dimension; the public op moves `dim` there first.
"""

from __future__ import annotations

import torch


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype the statistics are computed in: float64 stays float64, everything else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _moments(x: torch.Tensor):
    xs = x.to(stat_dtype(x.dtype))
    if xs.numel() == 0:  # no rows: nothing to reduce (and var_mean would warn)
        return xs, xs.new_zeros(*xs.shape[:-1], 1), xs.new_zeros(*xs.shape[:-1], 1)
    var, mean = torch.var_mean(xs, dim=-1, correction=0, keepdim=True)  # one fused pass
    return xs, mean, var.sqrt()


def stat_topk_threshold(x: torch.Tensor, z: float) -> torch.Tensor:
    """θ = μ + z·σ per row (last dimension kept, size 1). Differentiable."""
    _, mean, std = _moments(x)
    return mean + z * std


def stat_topk_forward(x: torch.Tensor, z: float, need_mask: bool = True):
    """(y, mask, mean, std) along the last dimension; differentiable by autograd through μ and σ.

    mean and std have shape x.shape[:-1] in the statistics dtype; mask is empty when not needed.
    """
    xs, mean, std = _moments(x)
    theta = mean + z * std
    y = (xs - theta).clamp_min_(0).to(x.dtype)
    mask = xs > theta if need_mask else x.new_empty((0,), dtype=torch.bool)
    return y, mask, mean.squeeze(-1), std.squeeze(-1)


def stat_topk_backward(grad_y: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, z: float):
    """Closed-form ∂L/∂x from the saved statistics (the formula at the top of this file)."""
    acc = stat_dtype(x.dtype)
    xs, g = x.to(acc), grad_y.to(acc)
    mean, std = mean.unsqueeze(-1), std.unsqueeze(-1)
    theta = mean + z * std
    d = x.shape[-1]
    gm = torch.where(xs > theta, g, torch.zeros((), dtype=acc, device=x.device))
    s_over_d = gm.sum(-1, keepdim=True) / d
    inv_std = torch.where(std > 0, 1.0 / std, torch.zeros((), dtype=acc, device=x.device))
    return (gm - s_over_d * (1 + z * inv_std * (xs - mean))).to(x.dtype)
