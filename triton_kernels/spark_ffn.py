"""Sparse Spark FFN inference (Spark Transformer, arXiv 2506.06644), Triton.

Given the statistical top-k gate g = relu(K1·x[:r] − θ) of each token (zigspark.stat_topk, ~density·f
nonzero), the FFN output needs only the active neurons j (g_j > 0):

    a_j = GELU(g_j)·(K2_j·x[r:])        for active j, 0 otherwise       (kernel 1: one K2 row per active j)
    y   = Σ_{j active} a_j·V_{:, j}                                     (kernel 2: one Vᵀ row per active j)

Rows of K2 and of Vᵀ belonging to inactive neurons are masked out of the loads, so memory traffic scales
with the density instead of with d_ff — the point of Spark's decode speedup.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from .._alloc import new_output, new_output_like


@triton.jit
def _gelu(x):
    return 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))


@triton.jit
def _active_values_kernel(X, G, K2, A, r, d_model, d_ff, sx_t, sg_t, sk2_f, sa_t,
                          BLOCK_F: tl.constexpr, BLOCK_K: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)  # tokens·d_ff can pass 2³¹ in a long prefill
    f = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    f_ok = f < d_ff
    g = tl.load(G + t * sg_t + f, mask=f_ok, other=0.0).to(tl.float32)
    active = g > 0.0
    dot = tl.zeros([BLOCK_F], dtype=tl.float32)
    width = d_model - r
    for k0 in range(0, width, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < width
        x2 = tl.load(X + t * sx_t + r + k, mask=k_ok, other=0.0).to(tl.float32)
        rows = tl.load(K2 + f[:, None] * sk2_f + k[None, :], mask=active[:, None] & k_ok[None, :], other=0.0)
        dot += tl.sum(rows.to(tl.float32) * x2[None, :], axis=1)
    a = tl.where(active, _gelu(g) * dot, 0.0)
    tl.store(A + t * sa_t + f, a, mask=f_ok)


@triton.jit
def _project_kernel(A, VT, Y, d_model, d_ff, sa_t, svt_f, sy_t,
                    BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)  # tokens·d_ff can pass 2³¹ in a long prefill
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < d_model
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for f0 in range(0, d_ff, BLOCK_F):
        f = f0 + tl.arange(0, BLOCK_F)
        a = tl.load(A + t * sa_t + f, mask=f < d_ff, other=0.0)
        rows = tl.load(VT + f[:, None] * svt_f + d[None, :], mask=(a != 0.0)[:, None] & d_ok[None, :], other=0.0)
        acc += tl.sum(rows.to(tl.float32) * a[:, None], axis=0)
    tl.store(Y + t * sy_t + d, acc.to(Y.dtype.element_ty), mask=d_ok)


def spark_ffn_sparse(x: torch.Tensor, gate: torch.Tensor, K2: torch.Tensor, VT: torch.Tensor, r: int) -> torch.Tensor:
    """x (tokens, d_model), gate (tokens, d_ff) = relu(predictor − θ), K2 (d_ff, d_model − r),
    VT (d_ff, d_model) = Vᵀ contiguous -> y (tokens, d_model)."""
    tokens, d_model = x.shape
    d_ff = gate.shape[1]
    a = new_output((tokens, d_ff), torch.float32, x.device)
    block_f, block_k = 64, min(128, triton.next_power_of_2(max(d_model - r, 16)))
    _active_values_kernel[(tokens, triton.cdiv(d_ff, block_f))](
        x, gate, K2, a, r, d_model, d_ff, x.stride(0), gate.stride(0), K2.stride(0), a.stride(0),
        BLOCK_F=block_f, BLOCK_K=block_k)
    y = new_output_like(x)
    block_d = min(128, triton.next_power_of_2(d_model))
    _project_kernel[(tokens, triton.cdiv(d_model, block_d))](
        a, VT, y, d_model, d_ff, a.stride(0), VT.stride(0), y.stride(0), BLOCK_F=64, BLOCK_D=block_d)
    return y
