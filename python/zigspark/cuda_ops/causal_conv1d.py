"""Launch the CUDA causal conv1d along an order (csrc/causal_conv1d/causal_conv1d.cu) with raw pointers.

The kernels take x, out, dout and dx contiguous in x's dtype, and weight, bias, dweight and dbias as
contiguous float32 (dweight/dbias zero-filled here: the kernel accumulates them with atomics); the
gradients are cast back to weight's and bias's dtypes.
"""

from __future__ import annotations

import torch

from .. import _cuda
from .._alloc import new_output
from .orders import order_kwargs


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.to(torch.float32).contiguous()


def _common(x: torch.Tensor, weight: torch.Tensor, silu: bool, order_params, order_index):
    batch, dim, length = x.shape
    order, index = order_kwargs(order_params, order_index, length)
    args = dict(batch=batch, dim=dim, length=length, width=weight.shape[1], dtype=_cuda.dtype_code(x.dtype),
                silu=bool(silu), device=_cuda.device_index(x), stream=_cuda.stream_of(x), **order)
    return args, index


def causal_conv1d_fwd(x, weight, bias, silu, order_params, order_index):
    """-> out, (batch, dim, L) in x's dtype."""
    x = x.contiguous()
    w32, b32 = _f32(weight), _f32(bias)
    args, index = _common(x, weight, silu, order_params, order_index)
    out = new_output(x.shape, x.dtype, x.device)
    _cuda.extension().causal_conv1d_forward(
        x=_cuda.ptr(x), weight=_cuda.ptr(w32), bias=_cuda.ptr(b32), out=_cuda.ptr(out), **args)
    del index  # kept alive until the launch is enqueued
    return out


def causal_conv1d_bwd(dout, x, weight, bias, silu, order_params, order_index):
    """-> (dx in x's dtype, dweight in weight's dtype, dbias in bias's dtype or None)."""
    x = x.contiguous()
    dout = dout.to(x.dtype).contiguous()
    w32, b32 = _f32(weight), _f32(bias)
    args, index = _common(x, weight, silu, order_params, order_index)
    dx = new_output(x.shape, x.dtype, x.device)
    dw = torch.zeros(weight.shape, device=x.device, dtype=torch.float32)
    db = torch.zeros(x.shape[1], device=x.device, dtype=torch.float32) if bias is not None else None
    _cuda.extension().causal_conv1d_backward(
        dout=_cuda.ptr(dout), x=_cuda.ptr(x), weight=_cuda.ptr(w32), bias=_cuda.ptr(b32), dx=_cuda.ptr(dx),
        dweight=_cuda.ptr(dw), dbias=_cuda.ptr(db), **args)
    del index
    return dx, dw.to(weight.dtype), None if db is None else db.to(bias.dtype)
