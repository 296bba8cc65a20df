"""Launch the CUDA HiPrune selection and the token gather (csrc/token_prune/token_prune.cu) with raw pointers.

hiprune_select takes (batch, N) scores in float32, float16 or bfloat16 (two different dtypes are both widened
to float32, which is exact, so the order is unchanged); it returns (batch, keep) int64 indices, ascending.
A sample is staged in shared memory when it fits; otherwise _C asks for a global workspace, allocated here.

prune_tokens_fwd / prune_tokens_bwd move rows of (batch, N, C) tensors with a contiguous last dimension; the
backward writes into zeros, with plain stores when the indices are unique within each sample (hiprune_select's
are) and atomics otherwise.
"""

from __future__ import annotations

import torch

from .. import _cuda
from .._alloc import new_output
from ..validation import last_dim_contiguous

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
GATHER_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def hiprune_select(obj_scores, deep_scores, grid, keep, n_anchor, wrap_rows, always_keep, force_workspace=False):
    """-> (batch, keep) int64. always_keep: None or (1 or batch, m) int64 rows, shared or per sample, -1 padded
    (validated and deduplicated by the caller).
    force_workspace=True runs the global-memory path even where shared memory would do (tests)."""
    if obj_scores.dtype not in DTYPES or deep_scores.dtype not in DTYPES:
        raise TypeError(f"CUDA hiprune_select takes float32, float16 or bfloat16 scores, got {obj_scores.dtype} and "
                        f"{deep_scores.dtype}")
    if obj_scores.dtype != deep_scores.dtype:
        obj_scores, deep_scores = obj_scores.float(), deep_scores.float()
    obj, deep = obj_scores.contiguous(), deep_scores.contiguous()
    batch, n = obj.shape
    device = _cuda.device_index(obj)
    ext = _cuda.extension()
    out = new_output((batch, keep), torch.int64, obj.device)
    always = (always_keep if always_keep is not None else torch.empty(1, 0, dtype=torch.int64)).to(
        device=obj.device, dtype=torch.int64).contiguous()
    ws_bytes = ext.hiprune_select_workspace(batch=batch, n=n, n_anchor=n_anchor, device=device,
                                            force_workspace=bool(force_workspace))
    workspace = torch.empty(ws_bytes, dtype=torch.uint8, device=obj.device) if ws_bytes else None
    ext.hiprune_select(
        obj=_cuda.ptr(obj), deep=_cuda.ptr(deep), always=_cuda.ptr(always) if always.numel() else 0,
        out=_cuda.ptr(out), workspace=_cuda.ptr(workspace), workspace_bytes=ws_bytes, batch=batch, n=n,
        h=grid[0], w=grid[1], keep=keep, n_anchor=n_anchor, n_always=always.shape[1],
        always_sample_stride=always.shape[1] if always.shape[0] > 1 else 0, wrap_rows=bool(wrap_rows),
        dtype=_cuda.dtype_code(obj.dtype), device=device, stream=_cuda.stream_of(obj))
    return out


def _check(x: torch.Tensor, index: torch.Tensor):
    if x.dtype not in GATHER_DTYPES:
        raise TypeError(f"CUDA prune_tokens takes float32, float16, bfloat16 or float64, got {x.dtype}")
    return index.to(torch.int64).contiguous()


def prune_tokens_fwd(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (batch, N, C) (a batch stride of 0 is fine: expanded positions), index (batch, keep) in [0, N)
    -> (batch, keep, C) contiguous, out[b, j] = x[b, index[b, j]]."""
    index = _check(x, index)
    x = last_dim_contiguous(x)
    batch, n, c = x.shape
    keep = index.shape[1]
    out = new_output((batch, keep, c), x.dtype, x.device)
    _cuda.extension().prune_tokens_forward(
        x=_cuda.ptr(x), index=_cuda.ptr(index), out=_cuda.ptr(out), batch=batch, tokens=n, keep=keep, channels=c,
        x_batch_stride=x.stride(0), x_row_stride=x.stride(1), out_batch_stride=out.stride(0),
        out_row_stride=out.stride(1), dtype=_cuda.dtype_code(x.dtype), device=_cuda.device_index(x),
        stream=_cuda.stream_of(x))
    return out


def prune_tokens_bwd(grad_out: torch.Tensor, index: torch.Tensor, tokens: int, unique: bool = False) -> torch.Tensor:
    """grad_out (batch, keep, C) -> grad_x (batch, tokens, C): grad_x[b, index[b, j]] += grad_out[b, j], zeros
    elsewhere. unique=True promises each index at most once per sample (plain stores); otherwise atomics."""
    index = _check(grad_out, index)
    grad_out = last_dim_contiguous(grad_out)
    batch, keep, c = grad_out.shape
    grad_x = torch.zeros(batch, tokens, c, dtype=grad_out.dtype, device=grad_out.device)
    _cuda.extension().prune_tokens_backward(
        grad_out=_cuda.ptr(grad_out), index=_cuda.ptr(index), grad_x=_cuda.ptr(grad_x), batch=batch, tokens=tokens,
        keep=keep, channels=c, grad_out_batch_stride=grad_out.stride(0), grad_out_row_stride=grad_out.stride(1),
        grad_x_batch_stride=grad_x.stride(0), grad_x_row_stride=grad_x.stride(1), unique_index=bool(unique),
        dtype=_cuda.dtype_code(grad_out.dtype), device=_cuda.device_index(grad_out), stream=_cuda.stream_of(grad_out))
    return grad_x
