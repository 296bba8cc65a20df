"""Depthwise causal conv1d (the convolution before the scan in a Mamba block) along a scan order.

    out_t = bias + Σ_k w_k·x_{t−(K−1)+k}   (steps t in `order`, zero before the first step),
    then silu(out) if activation is "silu"/"swish"

Same semantics as causal-conv1d's causal_conv1d_fn; the order is applied where data is read and written.
Registered as ``zigspark::causal_conv1d_fwd`` / ``_bwd``; backends today: reference (closed-form backward)
Triton and CUDA (forward and backward, the order computed in-kernel).

Not fused into the scan, by choice: in a Mamba block x_proj reads the conv's output, so it reaches memory
either way (docs/ARCHITECTURE.md, selective scan). bench_selective_scan's "conv+scan" rows time the two
back to back along the order.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import backends
from ..reference import causal_conv1d as ref
from ..validation import check_float_tensor, check_same_device
from .selective_scan import order_arguments, order_index_of

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
backends.register_op("causal_conv1d", {"reference": _DTYPES, "triton": _DTYPES[:3], "cuda": _DTYPES}, size_key="L")


def _kernels(backend: str):
    return backends.kernels(backend, "causal_conv1d")


@torch.library.custom_op("zigspark::causal_conv1d_fwd", mutates_args=())
def causal_conv1d_fwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], silu: bool,
                      order_params: list[int], order_index: Optional[torch.Tensor], backend: str) -> torch.Tensor:
    if backend != "reference":
        return _kernels(backend).causal_conv1d_fwd(x, weight, bias, silu, order_params, order_index)
    index = order_index_of(order_params, order_index, x.shape[-1], x.device)
    with torch.no_grad():
        return ref.causal_conv1d(x, weight, bias, silu, index)


@causal_conv1d_fwd.register_fake
def _(x, weight, bias, silu, order_params, order_index, backend):
    return torch.empty_like(x)


@torch.library.custom_op("zigspark::causal_conv1d_bwd", mutates_args=())
def causal_conv1d_bwd(dout: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                      silu: bool, order_params: list[int], order_index: Optional[torch.Tensor], backend: str
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweight, dbias or empty)."""
    if backend != "reference":
        dx, dweight, dbias = _kernels(backend).causal_conv1d_bwd(dout, x, weight, bias, silu, order_params,
                                                                 order_index)
    else:
        index = order_index_of(order_params, order_index, x.shape[-1], x.device)
        dx, dweight, dbias = ref.causal_conv1d_backward(dout, x, weight, bias, silu, index)
    return dx, dweight, x.new_empty((0,)) if dbias is None else dbias


@causal_conv1d_bwd.register_fake
def _(dout, x, weight, bias, silu, order_params, order_index, backend):
    return torch.empty_like(x), torch.empty_like(weight), (x.new_empty((0,)) if bias is None else
                                                           torch.empty_like(bias))


def _setup_context(ctx, inputs, output):
    x, weight, bias, silu, order_params, order_index, backend = inputs
    ctx.save_for_backward(x, weight, bias, order_index)
    ctx.silu, ctx.order_params, ctx.backend = silu, order_params, backend


def _backward(ctx, dout):
    x, weight, bias, order_index = ctx.saved_tensors
    dx, dw, db = causal_conv1d_bwd(dout.contiguous(), x, weight, bias, ctx.silu, ctx.order_params, order_index,
                                   ctx.backend)
    return dx, dw, (db if bias is not None else None), None, None, None, None


causal_conv1d_fwd.register_autograd(_backward, setup_context=_setup_context)


def causal_conv1d(x, weight, bias=None, activation=None, *, order=None, backend="auto"):
    """Depthwise causal convolution along `order` (kernel width 2–4), as causal_conv1d_fn.

    Args:
        x: (batch, dim, L).  weight: (dim, width), 2 ≤ width ≤ 4.  bias: (dim,) or None.
        activation: None, "silu" or "swish".
        order: None (raster), a zigspark.orders.ScanOrder, or a LongTensor permutation of 0..L−1.
    Returns:
        (batch, dim, L) in x's dtype, raster order.
    """
    check_float_tensor("x", x, _DTYPES)
    check_float_tensor("weight", weight, _DTYPES)
    if x.dim() != 3 or x.shape[-1] == 0:
        raise ValueError(f"x must be (batch, dim, L) with L >= 1, got shape {tuple(x.shape)}")
    if weight.dim() != 2 or weight.shape[0] != x.shape[1] or not 2 <= weight.shape[1] <= 4:
        raise ValueError(f"weight must be (dim, width) = ({x.shape[1]}, 2..4), got shape {tuple(weight.shape)}")
    if bias is not None:
        check_float_tensor("bias", bias, _DTYPES)
        if bias.shape != (x.shape[1],):
            raise ValueError(f"bias must be (dim,) = ({x.shape[1]},), got shape {tuple(bias.shape)}")
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"activation must be None, 'silu' or 'swish', got {activation!r}")
    device = check_same_device(x=x, weight=weight, bias=bias)
    order_params, order_index = order_arguments(order, x.shape[-1], device)
    chosen = backends.resolve("causal_conv1d", backend, device, x.dtype, size=x.shape[-1])
    if chosen != "reference":  # the kernels index contiguous tensors
        x, weight = x.contiguous(), weight.contiguous()
        bias = None if bias is None else bias.contiguous()
    return torch.ops.zigspark.causal_conv1d_fwd(x, weight, bias, activation is not None, order_params, order_index,
                                                chosen)
