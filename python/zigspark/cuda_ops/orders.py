"""Scan orders as the CUDA kernels receive them (csrc/common/order.cuh, struct OrderArgs)."""

from __future__ import annotations

import torch

from .. import _cuda

KIND_INDEX, KIND_IDENTITY = 3, 4


def order_kwargs(order_params: list[int], order_index: torch.Tensor | None, length: int):
    """(keyword arguments order_kind .. order_index for a _C binding, the int64 index tensor to keep alive
    until the launch has been enqueued)."""
    if order_index is not None:
        kind, frames, h, w, path, reverse = KIND_INDEX, 1, 1, length, 0, 0
    elif not order_params:
        kind, frames, h, w, path, reverse = KIND_IDENTITY, 1, 1, length, 0, 0
    else:
        kind, frames, h, w, path, reverse = order_params
    index = None if order_index is None else order_index.to(torch.int64).contiguous()
    return dict(order_kind=kind, order_frames=frames, order_h=h, order_w=w, order_path=path,
                order_reverse=int(reverse), order_index=_cuda.ptr(index)), index
