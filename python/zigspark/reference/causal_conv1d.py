"""Depthwise causal convolution (the conv1d before the scan in a Mamba block), along a scan order.

For channel d with weight w_d of width K and steps t in scan order (x_{t<0} = 0):

    out_t = bias_d + Σ_{k=0}^{K−1} w_{d,k}·x_{t−(K−1)+k},      then silu(out) if activation is "silu"

matching causal-conv1d's causal_conv1d_fn(x, weight, bias, activation). Backward, with g = ∂L/∂out
before the activation:  ∂x_s = Σ_k w_k·g_{s+K−1−k},  ∂w_k = Σ_t g_t·x_{t−(K−1)+k},  ∂bias = Σ_t g_t.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..orders import inverse
from .precision import compute_dtype
from .selective_scan import permute_steps


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, silu: bool = False,
                  order_index: torch.Tensor | None = None) -> torch.Tensor:
    """x (batch, dim, L), weight (dim, K), bias (dim,) -> (batch, dim, L) in x's dtype, raster order."""
    acc = compute_dtype(x.dtype)
    width = weight.shape[-1]
    xs = permute_steps(x, order_index).to(acc)
    out = F.conv1d(F.pad(xs, (width - 1, 0)), weight.to(acc)[:, None, :],
                   None if bias is None else bias.to(acc), groups=x.shape[1])
    if silu:
        out = F.silu(out)
    if order_index is not None:
        out = out.index_select(-1, inverse(order_index))
    return out.to(x.dtype)


def causal_conv1d_backward(dout, x, weight, bias=None, silu=False, order_index=None):
    """Closed-form (dx, dweight, dbias or None)."""
    acc = compute_dtype(x.dtype)
    width = weight.shape[-1]
    xs = permute_steps(x, order_index).to(acc)
    w = weight.to(acc)
    g = permute_steps(dout, order_index).to(acc)
    if silu:
        pre = F.conv1d(F.pad(xs, (width - 1, 0)), w[:, None, :], None if bias is None else bias.to(acc),
                       groups=x.shape[1])
        sig = torch.sigmoid(pre)
        g = g * sig * (1 + pre * (1 - sig))
    length, padded = xs.shape[-1], F.pad(xs, (width - 1, 0))
    dweight = torch.stack([torch.linalg.vecdot(g, padded[..., k:k + length]).sum(0) for k in range(width)], -1)
    # ∂x_s = Σ_j w_{K−1−j}·g_{s+j}: the same depthwise convolution, of g padded on the right, flipped weights
    dx = F.conv1d(F.pad(g, (0, width - 1)), w.flip(-1)[:, None, :], groups=x.shape[1])
    if order_index is not None:
        dx = dx.index_select(-1, inverse(order_index))
    dbias = None if bias is None else g.sum((0, 2)).to(bias.dtype)
    return dx.to(x.dtype), dweight.to(weight.dtype), dbias
