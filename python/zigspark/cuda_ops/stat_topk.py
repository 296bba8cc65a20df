"""Launch the CUDA statistical top-k kernels (csrc/stat_topk/stat_topk.cu) on 2-D row-major tensors."""

from __future__ import annotations

import torch

from .. import _cuda


def stat_topk_fwd(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None, mean: torch.Tensor,
                  std: torch.Tensor, z: float) -> None:
    rows, d = x.shape
    _cuda.extension().stat_topk_forward(
        x=_cuda.ptr(x), y=_cuda.ptr(y), mask=_cuda.ptr(mask), mean=_cuda.ptr(mean), std=_cuda.ptr(std),
        rows=rows, d=d, x_row_stride=x.stride(0), y_row_stride=y.stride(0),
        mask_row_stride=mask.stride(0) if mask is not None else 0,
        dtype=_cuda.dtype_code(x.dtype), z=float(z), device=_cuda.device_index(x), stream=_cuda.stream_of(x),
    )


def stat_topk_bwd(grad_y: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                  grad_x: torch.Tensor, z: float) -> None:
    rows, d = x.shape
    _cuda.extension().stat_topk_backward(
        grad_y=_cuda.ptr(grad_y), x=_cuda.ptr(x), mean=_cuda.ptr(mean), std=_cuda.ptr(std),
        grad_x=_cuda.ptr(grad_x), rows=rows, d=d, grad_y_row_stride=grad_y.stride(0),
        x_row_stride=x.stride(0), grad_x_row_stride=grad_x.stride(0),
        dtype=_cuda.dtype_code(x.dtype), z=float(z), device=_cuda.device_index(x), stream=_cuda.stream_of(x),
    )
