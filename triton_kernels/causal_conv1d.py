"""Depthwise causal conv1d along a scan order (the conv before the scan in a Mamba block), Triton.

For channel d, weight w of width K, and steps t in scan order with pos(t) their raster positions:

    pre_t = bias + Σ_{k<K} w_k·x[pos(t − (K−1) + k)]   (zero before the first step),   out[pos(t)] = act(pre_t)

Backward, with g_t = ∂L/∂out[pos(t)]·act'(pre_t):
    ∂x[pos(s)] = Σ_j w_{K−1−j}·g_{s+j},   ∂w_k = Σ_t g_t·x[pos(t − (K−1) + k)],   ∂bias = Σ_t g_t.

One program per (batch, block of channels, block of steps); the K taps are K gathered loads.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .orders import order_launch_args, order_position
from .._alloc import new_output, new_output_like


@triton.jit
def _sample_start(dim, L):
    """Offset of this program's sample (grid axis 0), b·dim·L, in int64: it can pass 2³¹ elements. Kernels
    add it to their base pointers once; within a sample d·L + position stays int32, since vectors of int64
    offsets cost registers these tiles need."""
    return tl.program_id(0).to(tl.int64) * dim * L


@triton.jit
def _conv_pre(X, W, BIAS, d, d_ok, t, dim, L, ORDER, frames, gh, gw, K: tl.constexpr, HAS_BIAS: tl.constexpr,
              KIND: tl.constexpr, PATH: tl.constexpr, REVERSE: tl.constexpr,
              BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr):
    """pre-activation at steps t for channels d of one sample (X points at its first element), (BLOCK_D, BLOCK_T)
    float32."""
    acc = tl.zeros([BLOCK_D, BLOCK_T], dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(BIAS + d, mask=d_ok, other=0.0).to(tl.float32)[:, None]
    for k in tl.static_range(K):
        tk = t - (K - 1) + k
        ok = (tk >= 0) & (tk < L)
        pos = order_position(tk, ORDER, L, frames, gh, gw, KIND, PATH, REVERSE)
        xk = tl.load(X + d[:, None] * L + pos[None, :], mask=d_ok[:, None] & ok[None, :], other=0.0)
        wk = tl.load(W + d * K + k, mask=d_ok, other=0.0).to(tl.float32)
        acc += wk[:, None] * xk.to(tl.float32)
    return acc


@triton.jit
def _conv_fwd_kernel(X, W, BIAS, OUT, ORDER, dim, L, frames, gh, gw,
                     K: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
                     KIND: tl.constexpr, PATH: tl.constexpr, REVERSE: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr):
    start = _sample_start(dim, L)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    t = tl.program_id(2) * BLOCK_T + tl.arange(0, BLOCK_T)
    d_ok = d < dim
    t_ok = t < L
    pre = _conv_pre(X + start, W, BIAS, d, d_ok, t, dim, L, ORDER, frames, gh, gw, K, HAS_BIAS, KIND, PATH, REVERSE,
                    BLOCK_D, BLOCK_T)
    if SILU:
        out = pre * tl.sigmoid(pre)
    else:
        out = pre
    pos = order_position(t, ORDER, L, frames, gh, gw, KIND, PATH, REVERSE)
    tl.store(OUT + start + d[:, None] * L + pos[None, :], out.to(OUT.dtype.element_ty),
             mask=d_ok[:, None] & t_ok[None, :])


@triton.jit
def _conv_grad_pre_kernel(X, W, BIAS, DOUT, G, ORDER, dim, L, frames, gh, gw,
                          K: tl.constexpr, HAS_BIAS: tl.constexpr,
                          KIND: tl.constexpr, PATH: tl.constexpr, REVERSE: tl.constexpr,
                          BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr):
    """g = dout·silu'(pre), written in raster layout (float32)."""
    start = _sample_start(dim, L)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    t = tl.program_id(2) * BLOCK_T + tl.arange(0, BLOCK_T)
    d_ok = d < dim
    valid = d_ok[:, None] & (t < L)[None, :]
    pre = _conv_pre(X + start, W, BIAS, d, d_ok, t, dim, L, ORDER, frames, gh, gw, K, HAS_BIAS, KIND, PATH, REVERSE,
                    BLOCK_D, BLOCK_T)
    pos = order_position(t, ORDER, L, frames, gh, gw, KIND, PATH, REVERSE)
    offs = d[:, None] * L + pos[None, :]
    sig = tl.sigmoid(pre)
    g = tl.load(DOUT + start + offs, mask=valid, other=0.0).to(tl.float32) * sig * (1.0 + pre * (1.0 - sig))
    tl.store(G + start + offs, g, mask=valid)


@triton.jit
def _conv_bwd_kernel(X, W, G, DX, DW, DBIAS, ORDER, dim, L, frames, gh, gw,
                     K: tl.constexpr, HAS_BIAS: tl.constexpr,
                     KIND: tl.constexpr, PATH: tl.constexpr, REVERSE: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr):
    start = _sample_start(dim, L)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    s = tl.program_id(2) * BLOCK_T + tl.arange(0, BLOCK_T)
    d_ok = d < dim
    s_ok = s < L
    X, G, DX = X + start, G + start, DX + start
    row = d[:, None] * L
    dx = tl.zeros([BLOCK_D, BLOCK_T], dtype=tl.float32)
    for j in tl.static_range(K):   # ∂x at step s collects g at steps s .. s+K−1
        sj = s + j
        ok = d_ok[:, None] & (sj < L)[None, :]
        pos_j = order_position(sj, ORDER, L, frames, gh, gw, KIND, PATH, REVERSE)
        gj = tl.load(G + row + pos_j[None, :], mask=ok, other=0.0).to(tl.float32)
        dx += tl.load(W + d * K + (K - 1 - j), mask=d_ok, other=0.0).to(tl.float32)[:, None] * gj
    pos = order_position(s, ORDER, L, frames, gh, gw, KIND, PATH, REVERSE)
    valid = d_ok[:, None] & s_ok[None, :]
    tl.store(DX + row + pos[None, :], dx.to(DX.dtype.element_ty), mask=valid)
    g = tl.load(G + row + pos[None, :], mask=valid, other=0.0).to(tl.float32)
    for k in tl.static_range(K):   # ∂w_k over this block of steps
        tk = s - (K - 1) + k
        ok = d_ok[:, None] & ((tk >= 0) & (tk < L))[None, :]
        pos_k = order_position(tk, ORDER, L, frames, gh, gw, KIND, PATH, REVERSE)
        xk = tl.load(X + row + pos_k[None, :], mask=ok, other=0.0).to(tl.float32)
        tl.atomic_add(DW + d * K + k, tl.sum(g * xk, axis=1), mask=d_ok)
    if HAS_BIAS:
        tl.atomic_add(DBIAS + d, tl.sum(g, axis=1), mask=d_ok)


def _grid(batch, dim, L):
    block_d = min(16, triton.next_power_of_2(dim))
    block_t = min(128, triton.next_power_of_2(L))
    return (batch, triton.cdiv(dim, block_d), triton.cdiv(L, block_t)), block_d, block_t


def causal_conv1d_fwd(x, weight, bias, silu, order_params, order_index):
    batch, dim, L = x.shape
    out = new_output_like(x)
    order, frames, gh, gw, kind, path, reverse = order_launch_args(order_params, order_index, L)
    grid, block_d, block_t = _grid(batch, dim, L)
    _conv_fwd_kernel[grid](x, weight, bias, out, order, dim, L, frames, gh, gw,
                           K=weight.shape[1], HAS_BIAS=bias is not None, SILU=bool(silu),
                           KIND=kind, PATH=path, REVERSE=reverse, BLOCK_D=block_d, BLOCK_T=block_t)
    return out


def causal_conv1d_bwd(dout, x, weight, bias, silu, order_params, order_index):
    """-> (dx, dweight, dbias or None)."""
    batch, dim, L = x.shape
    K = weight.shape[1]
    order, frames, gh, gw, kind, path, reverse = order_launch_args(order_params, order_index, L)
    grid, block_d, block_t = _grid(batch, dim, L)
    flags = dict(K=K, HAS_BIAS=bias is not None, KIND=kind, PATH=path, REVERSE=reverse, BLOCK_D=block_d,
                 BLOCK_T=block_t)
    if silu:
        g = new_output(x.shape, torch.float32, x.device)
        _conv_grad_pre_kernel[grid](x, weight, bias, dout, g, order, dim, L, frames, gh, gw, **flags)
    else:
        g = dout
    dx = new_output_like(x)
    dw = torch.zeros(weight.shape, device=x.device, dtype=torch.float32)
    db = torch.zeros(dim, device=x.device, dtype=torch.float32) if bias is not None else None
    _conv_bwd_kernel[grid](x, weight, g, dx, dw, db, order, dim, L, frames, gh, gw, **flags)
    return dx, dw.to(weight.dtype), None if db is None else db.to(bias.dtype)
