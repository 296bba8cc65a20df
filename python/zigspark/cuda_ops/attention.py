"""Launch the CUDA flash attention forward (csrc/attention/attention.cu) with raw pointers.

Same contract as ``triton_kernels.attention.attention_fwd``: q (B, S_q, H, D), k and v (B, S_k, H_kv, D)
with H a multiple of H_kv and the last dimension contiguous (other strides are passed through, in
elements); returns out (B, S_q, H, D) in q's dtype with q's layout (``torch.empty_like``) and lse
(B, H, S_q) float32 (natural log; −inf and out = 0 for a query that sees no key). float16 and bfloat16
run on tensor cores (sm_80+), float32 on CUDA cores; float64 is not taken (the caller routes it elsewhere).
"""

from __future__ import annotations

import torch

from .. import _cuda
from .._alloc import new_output, new_output_like
from ..validation import last_dim_contiguous

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


def _strides(prefix: str, t: torch.Tensor | None) -> dict:
    s = (0, 0, 0) if t is None else t.stride()[:3]
    return {f"{prefix}_stride_b": s[0], f"{prefix}_stride_s": s[1], f"{prefix}_stride_h": s[2]}


def attention_fwd(q, k, v, causal: bool, scale: float, need_out: bool = True):
    """-> (out (B, S_q, H, D) or None, lse (B, H, S_q) float32). With need_out=False, v may be None and only
    lse is computed (no P·V)."""
    if q.dtype not in DTYPES:
        raise TypeError(f"CUDA attention takes float16, bfloat16 or float32, got {q.dtype}")
    q, k = last_dim_contiguous(q), last_dim_contiguous(k)
    batch, seqlen_q, heads, head_dim = q.shape
    seqlen_k, kv_heads = k.shape[1], k.shape[2]
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"CUDA attention takes head_dim 1..{MAX_HEAD_DIM}, got {head_dim}")
    lse = new_output((batch, heads, seqlen_q), torch.float32, q.device)
    if need_out:
        v = last_dim_contiguous(v)
        out = new_output_like(q)
    else:
        v = out = None
    _cuda.extension().attention_forward(
        q=_cuda.ptr(q), k=_cuda.ptr(k), v=_cuda.ptr(v), out=_cuda.ptr(out), lse=_cuda.ptr(lse),
        batch=batch, seqlen_q=seqlen_q, seqlen_k=seqlen_k, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
        **_strides("q", q), **_strides("k", k), **_strides("v", v), **_strides("out", out),
        scale=float(scale), causal=bool(causal), dtype=_cuda.dtype_code(q.dtype), device=_cuda.device_index(q),
        stream=_cuda.stream_of(q))
    return out, lse
