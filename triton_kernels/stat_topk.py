"""Statistical top-k (Spark Transformer, arXiv 2506.06644), Triton forward and backward.

For a row x of length d and z = Φ⁻¹(1 − k/d):

    μ = mean(x),  σ = sqrt(mean((x − μ)²)),  θ = μ + z·σ,  y = relu(x − θ),  mask = x > θ
    ∂L/∂x_i = g_i·mask_i − S·(1/d + z·(x_i − μ)/(d·σ)),   S = Σ_j g_j·mask_j

One program per row. A row of up to RESIDENT_MAX elements is loaded once into registers: x is read once
and y written once, with an exact two-pass variance on the registers. Longer rows stream in BLOCK-sized
chunks: exact per-chunk mean and M2 merged with Chan's formula, then a second pass writes (that re-read
of the row mostly hits L2, since the same program has just read it).
"""

from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl

RESIDENT_MAX = 16384
STREAM_BLOCK = 4096


@triton.jit
def _div(a, b, ACC: tl.constexpr):
    """a / b correctly rounded (plain '/' and sqrt compile to approximate PTX for float32)."""
    if ACC == tl.float32:
        q = tl.div_rn(a, b.to(ACC))
    else:
        q = a / b.to(ACC)
    return q


@triton.jit
def _sqrt(x, ACC: tl.constexpr):
    if ACC == tl.float32:
        r = tl.sqrt_rn(x)
    else:
        r = tl.sqrt(x)
    return r


@triton.jit
def _streaming_moments(x_row, d, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """(μ, σ) of a row too long for registers: exact chunk statistics merged with Chan's formula."""
    n = tl.zeros([], dtype=ACC)
    mean = tl.zeros([], dtype=ACC)
    m2 = tl.zeros([], dtype=ACC)
    for start in range(0, d, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        valid = offs < d
        x = tl.load(x_row + offs, mask=valid, other=0.0).to(ACC)
        count = tl.minimum(d - start, BLOCK).to(ACC)
        chunk_mean = _div(tl.sum(x, axis=0), count, ACC)
        dev = tl.where(valid, x - chunk_mean, 0.0)
        chunk_m2 = tl.sum(dev * dev, axis=0)
        total = n + count
        delta = chunk_mean - mean
        mean = mean + delta * _div(count, total, ACC)
        m2 = m2 + chunk_m2 + delta * delta * _div(n * count, total, ACC)
        n = total
    return mean, _sqrt(_div(m2, d, ACC), ACC)


@triton.jit
def _write_chunk(x, theta, y_ptrs, mask_ptrs, valid, WRITE_MASK: tl.constexpr):
    keep = x > theta
    diff = x - theta
    # diff != diff: a NaN in the row stays NaN, as in the reference (every comparison with NaN is false)
    tl.store(y_ptrs, tl.where(keep | (diff != diff), diff, 0.0).to(y_ptrs.dtype.element_ty), mask=valid)
    if WRITE_MASK:
        tl.store(mask_ptrs, keep.to(tl.int8), mask=valid)


@triton.jit
def _stat_topk_fwd_kernel(
    X, Y, MASK, MEAN, STD,
    d, stride_x, stride_y, stride_mask, z_hi, z_lo,
    BLOCK: tl.constexpr, RESIDENT: tl.constexpr, WRITE_MASK: tl.constexpr, ACC: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    z = (tl.zeros([], dtype=ACC) + z_hi) + z_lo  # float32 args, summed in the accumulation type
    x_row = X + row * stride_x
    y_row = Y + row * stride_y
    mask_row = MASK + row * stride_mask
    if RESIDENT:
        # The whole row lives in registers: one read, exact two-pass variance, one write.
        offs = tl.arange(0, BLOCK)
        valid = offs < d
        x = tl.load(x_row + offs, mask=valid, other=0.0).to(ACC)
        mean = _div(tl.sum(x, axis=0), d, ACC)
        dev = tl.where(valid, x - mean, 0.0)
        std = _sqrt(_div(tl.sum(dev * dev, axis=0), d, ACC), ACC)
        theta = mean + z * std
        _write_chunk(x, theta, y_row + offs, mask_row + offs, valid, WRITE_MASK)
    else:
        mean, std = _streaming_moments(x_row, d, BLOCK, ACC)
        theta = mean + z * std
        for start in range(0, d, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            valid = offs < d
            x = tl.load(x_row + offs, mask=valid, other=0.0).to(ACC)
            _write_chunk(x, theta, y_row + offs, mask_row + offs, valid, WRITE_MASK)
    tl.store(MEAN + row, mean)
    tl.store(STD + row, std)


@triton.jit
def _stat_topk_bwd_kernel(
    G, X, MEAN, STD, DX,
    d, stride_g, stride_x, stride_dx, z_hi, z_lo,
    BLOCK: tl.constexpr, ACC: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    z = (tl.zeros([], dtype=ACC) + z_hi) + z_lo  # float32 args, summed in the accumulation type
    g_row = G + row * stride_g
    x_row = X + row * stride_x
    dx_row = DX + row * stride_dx
    mean = tl.load(MEAN + row)
    std = tl.load(STD + row)
    theta = mean + z * std
    s = tl.zeros([], dtype=ACC)
    for start in range(0, d, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        valid = offs < d
        x = tl.load(x_row + offs, mask=valid, other=0.0).to(ACC)
        g = tl.load(g_row + offs, mask=valid, other=0.0).to(ACC)
        s += tl.sum(tl.where(x > theta, g, 0.0), axis=0)
    s_over_d = _div(s, d, ACC)
    z_inv_std = tl.where(std > 0, _div(z, std, ACC), 0.0)
    for start in range(0, d, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        valid = offs < d
        x = tl.load(x_row + offs, mask=valid, other=0.0).to(ACC)
        g = tl.load(g_row + offs, mask=valid, other=0.0).to(ACC)
        gm = tl.where(x > theta, g, 0.0)
        dx = gm - s_over_d * (1.0 + z_inv_std * (x - mean))
        tl.store(dx_row + offs, dx.to(DX.dtype.element_ty), mask=valid)


def _split_float(z: float) -> tuple[float, float]:
    """z as float32 hi + lo: Triton passes Python floats as float32, and float64 rows need z to ~1e-15."""
    hi = struct.unpack("f", struct.pack("f", z))[0]
    return hi, struct.unpack("f", struct.pack("f", z - hi))[0]


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _launch_config(d: int):
    resident = d <= RESIDENT_MAX
    block = triton.next_power_of_2(d) if resident else STREAM_BLOCK
    num_warps = min(16, max(4, block // 512))
    return block, resident, num_warps


def stat_topk_fwd(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None, mean: torch.Tensor,
                  std: torch.Tensor, z: float) -> None:
    """Write y, mask (if given), mean and std for the rows of the 2-D tensor x (last stride 1)."""
    rows, d = x.shape
    if rows == 0:
        return
    block, resident, num_warps = _launch_config(d)
    write_mask = mask is not None
    mask_arg = mask.view(torch.int8) if write_mask else y
    _stat_topk_fwd_kernel[(rows,)](
        x, y, mask_arg, mean, std,
        d, x.stride(0), y.stride(0), mask.stride(0) if write_mask else 0, *_split_float(z),
        BLOCK=block, RESIDENT=resident, WRITE_MASK=write_mask, ACC=_acc_dtype(x.dtype), num_warps=num_warps,
    )


def stat_topk_bwd(grad_y: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                  grad_x: torch.Tensor, z: float) -> None:
    """Write grad_x for the rows of the 2-D tensors grad_y and x (last stride 1)."""
    rows, d = x.shape
    if rows == 0:
        return
    # The backward always loops over the row (two passes): chunks of at most STREAM_BLOCK keep registers low.
    block = min(triton.next_power_of_2(d), STREAM_BLOCK)
    num_warps = min(16, max(4, block // 512))
    _stat_topk_bwd_kernel[(rows,)](
        grad_y, x, mean, std, grad_x,
        d, grad_y.stride(0), x.stride(0), grad_x.stride(0), *_split_float(z),
        BLOCK=block, ACC=_acc_dtype(x.dtype), num_warps=num_warps,
    )
