"""Selective scan along a scan order (Mamba; ZigMa's zigzag paths), Triton forward and backward.

Per batch b, channel d, state h ∈ R^N, with the steps t taken in scan order and pos(t) the raster position
of step t (computed in-kernel, triton_kernels/orders.py):

    Δ_t = softplus(δ[pos] + bias) (or δ[pos] + bias),  a_t = exp(Δ_t·A),  b_t = Δ_t·B_t·u[pos]
    h_t = a_t·h_{t−1} + b_t,   y[pos] = (C_t·h_t + D·u[pos])·silu(z[pos])

Forward: one program per (batch, block of channels) walks the sequence in chunks of T steps; inside a
chunk the recurrence is an associative scan over (a, b) pairs, (a1, b1)∘(a2, b2) = (a1·a2, a2·b1 + b2),
seeded with the state carried from the previous chunk. The state entering each chunk is saved (batch,
dim, chunks, N) so the backward recomputes inside chunks instead of storing every state.

Backward, chunks in reverse, with g = ∂L/∂y (after the gate) and the adjoint of the state
    ∂h_t = g_t·C_t + a_{t+1}·∂h_{t+1}   (a reverse associative scan; a_{t+1} read at step t+1's position)
gives ∂b_t = ∂h_t and, with h_{t−1} the recomputed states shifted by one step,
    ∂Δ_t = Σ_n ∂h_t·a_t·h_{t−1}·A + Σ_n ∂h_t·B_t·u_t,   ∂A = Σ_t ∂h_t·a_t·h_{t−1}·Δ_t,
    ∂u_t = Σ_n ∂h_t·B_t·Δ_t + D·g_t,   ∂B_t = ∂h_t·Δ_t·u_t,   ∂C_t = g_t·h_t.
∂B and ∂C of shared (per-step or grouped) B/C are summed over channels with atomic adds.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .orders import order_launch_args, order_position
from .._alloc import new_output, new_output_like

BC_CONSTANT, BC_VARIABLE, BC_GROUPED = 0, 1, 2


@triton.jit
def _combine(a1, b1, a2, b2):
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _softplus(x):
    return tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))))


@triton.jit
def _bc_offsets(b, d, n, pos, dim, N, L, groups, MODE: tl.constexpr):
    """Offsets of B or C at (channel d, state n, step at pos) as a (BLOCK_D, N_PAD, T) block."""
    if MODE == 0:
        off = d[:, None, None] * N + n[None, :, None] + pos[None, None, :] * 0
    elif MODE == 1:
        off = b * N * L + n[None, :, None] * L + pos[None, None, :] + d[:, None, None] * 0
    else:
        g = d // (dim // groups)
        off = b * groups * N * L + g[:, None, None] * N * L + n[None, :, None] * L + pos[None, None, :]
    return off


@triton.jit
def _chunk_inputs(U, DELTA, DBIAS, b, d, d_ok, pos, t_ok, dim, L,
                  HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """u, Δ (0 on padded steps) and the pre-softplus Δ of one chunk, (BLOCK_D, T) in float32."""
    offs = b * dim * L + d[:, None] * L + pos[None, :]
    valid = d_ok[:, None] & t_ok[None, :]
    u = tl.load(U + offs, mask=valid, other=0.0).to(tl.float32)
    pre = tl.load(DELTA + offs, mask=valid, other=0.0).to(tl.float32)
    if HAS_BIAS:
        pre += tl.load(DBIAS + d, mask=d_ok, other=0.0).to(tl.float32)[:, None]
    if SOFTPLUS:
        delta = _softplus(pre)
    else:
        delta = pre
    delta = tl.where(valid, delta, 0.0)  # padded steps: a = 1, b = 0, the identity
    return offs, valid, u, delta, pre


@triton.jit
def _chunk_states(B, C, A_dn, u, delta, h0, b, d, n, pos, dn_ok, t_ok, dim, N, L, groups,
                  B_MODE: tl.constexpr, C_MODE: tl.constexpr):
    """B, C and every state of one chunk from the state h0 entering it: an associative scan of (a, b)."""
    bc_mask = dn_ok[:, :, None] & t_ok[None, None, :]
    b_offs = _bc_offsets(b, d, n, pos, dim, N, L, groups, B_MODE)
    c_offs = _bc_offsets(b, d, n, pos, dim, N, L, groups, C_MODE)
    Bt = tl.load(B + b_offs, mask=bc_mask, other=0.0).to(tl.float32)
    Ct = tl.load(C + c_offs, mask=bc_mask, other=0.0).to(tl.float32)
    a = tl.exp(delta[:, None, :] * A_dn[:, :, None])
    bterm = (delta * u)[:, None, :] * Bt
    a_cum, b_cum = tl.associative_scan((a, bterm), axis=2, combine_fn=_combine)
    return bc_mask, b_offs, c_offs, Bt, Ct, a, a_cum * h0[:, :, None] + b_cum


@triton.jit
def _selective_scan_fwd_kernel(
    U, DELTA, A, B, C, D, Z, DBIAS, OUT, LAST, CKPT, ORDER,
    dim, L, N, groups, n_chunks, frames, grid_h, grid_w,
    B_MODE: tl.constexpr, C_MODE: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    KIND: tl.constexpr, PATH: tl.constexpr, REVERSE: tl.constexpr,
    BLOCK_D: tl.constexpr, N_PAD: tl.constexpr, T: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)  # b·dim·L and the checkpoints' b·dim·chunks·N can pass 2³¹
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < dim
    n = tl.arange(0, N_PAD)
    n_ok = n < N
    dn_ok = d_ok[:, None] & n_ok[None, :]
    A_dn = tl.load(A + d[:, None] * N + n[None, :], mask=dn_ok, other=0.0).to(tl.float32)
    step = tl.arange(0, T)
    h = tl.zeros([BLOCK_D, N_PAD], dtype=tl.float32)
    ckpt = CKPT + (b * dim + d[:, None]) * n_chunks * N + n[None, :]
    for c in range(0, n_chunks):
        tl.store(ckpt + c * N, h, mask=dn_ok)
        t = c * T + step
        t_ok = t < L
        pos = order_position(t, ORDER, L, frames, grid_h, grid_w, KIND, PATH, REVERSE)
        offs, valid, u, delta, _ = _chunk_inputs(U, DELTA, DBIAS, b, d, d_ok, pos, t_ok, dim, L, HAS_BIAS, SOFTPLUS)
        _, _, _, Bt, Ct, _, hs = _chunk_states(B, C, A_dn, u, delta, h, b, d, n, pos, dn_ok, t_ok, dim, N, L,
                                                groups, B_MODE, C_MODE)
        y = tl.sum(hs * Ct, axis=1)
        if HAS_D:
            y += tl.load(D + d, mask=d_ok, other=0.0).to(tl.float32)[:, None] * u
        if HAS_Z:
            zv = tl.load(Z + offs, mask=valid, other=0.0).to(tl.float32)
            y *= zv * tl.sigmoid(zv)
        tl.store(OUT + offs, y.to(OUT.dtype.element_ty), mask=valid)
        h = tl.sum(tl.where(step[None, None, :] == T - 1, hs, 0.0), axis=2)
    tl.store(LAST + (b * dim + d[:, None]) * N + n[None, :], h, mask=dn_ok)


@triton.jit
def _selective_scan_bwd_kernel(
    DOUT, DLAST, U, DELTA, A, B, C, D, Z, DBIAS, CKPT, ORDER,
    DU, DDELTA, DA, DB, DC, DD, DZ,
    dim, L, N, groups, n_chunks, frames, grid_h, grid_w,
    B_MODE: tl.constexpr, C_MODE: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_DLAST: tl.constexpr,
    KIND: tl.constexpr, PATH: tl.constexpr, REVERSE: tl.constexpr,
    BLOCK_D: tl.constexpr, N_PAD: tl.constexpr, T: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)  # b·dim·L and the checkpoints' b·dim·chunks·N can pass 2³¹
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < dim
    n = tl.arange(0, N_PAD)
    n_ok = n < N
    dn_ok = d_ok[:, None] & n_ok[None, :]
    dn_offs = (b * dim + d[:, None]) * N + n[None, :]
    A_dn = tl.load(A + d[:, None] * N + n[None, :], mask=dn_ok, other=0.0).to(tl.float32)
    step = tl.arange(0, T)
    if HAS_DLAST:
        dh_next = tl.load(DLAST + dn_offs, mask=dn_ok, other=0.0).to(tl.float32)
    else:
        dh_next = tl.zeros([BLOCK_D, N_PAD], dtype=tl.float32)
    dA = tl.zeros([BLOCK_D, N_PAD], dtype=tl.float32)
    dB_const = tl.zeros([BLOCK_D, N_PAD], dtype=tl.float32)
    dC_const = tl.zeros([BLOCK_D, N_PAD], dtype=tl.float32)
    dD = tl.zeros([BLOCK_D], dtype=tl.float32)
    ckpt = CKPT + (b * dim + d[:, None]) * n_chunks * N + n[None, :]
    for cc in range(0, n_chunks):
        c = n_chunks - 1 - cc
        t = c * T + step
        t_ok = t < L
        pos = order_position(t, ORDER, L, frames, grid_h, grid_w, KIND, PATH, REVERSE)
        offs, valid, u, delta, pre = _chunk_inputs(U, DELTA, DBIAS, b, d, d_ok, pos, t_ok, dim, L, HAS_BIAS,
                                                   SOFTPLUS)
        # recompute the chunk's states from the saved state entering it
        h0 = tl.load(ckpt + c * N, mask=dn_ok, other=0.0)
        bc_mask, b_offs, c_offs, Bt, Ct, a, hs = _chunk_states(B, C, A_dn, u, delta, h0, b, d, n, pos, dn_ok, t_ok,
                                                                   dim, N, L, groups, B_MODE, C_MODE)
        # a_t·h_{t−1} from the states shifted by one step (h0 before the chunk's first): h_t − b_t would
        # cancel where the state decays fast (a_t ≪ 1) and cost dA and ∂Δ most of their precision there
        shift = tl.broadcast_to(tl.maximum(step - 1, 0)[None, None, :], (BLOCK_D, N_PAD, T))
        ah = a * tl.where(step[None, None, :] == 0, h0[:, :, None], tl.gather(hs, shift, axis=2))
        g = tl.load(DOUT + offs, mask=valid, other=0.0).to(tl.float32)
        if HAS_Z:
            y = tl.sum(hs * Ct, axis=1)
            if HAS_D:
                y += tl.load(D + d, mask=d_ok, other=0.0).to(tl.float32)[:, None] * u
            zv = tl.load(Z + offs, mask=valid, other=0.0).to(tl.float32)
            sig = tl.sigmoid(zv)
            tl.store(DZ + offs, (g * y * sig * (1.0 + zv * (1.0 - sig))).to(DZ.dtype.element_ty), mask=valid)
            g = g * zv * sig
        # a_{t+1}, read at the position of step t + 1 (1 past the end: the adjoint of last_state enters)
        t_next = t + 1
        next_ok = t_next < L
        pos_next = order_position(t_next, ORDER, L, frames, grid_h, grid_w, KIND, PATH, REVERSE)
        _, _, _, delta_next, _ = _chunk_inputs(U, DELTA, DBIAS, b, d, d_ok, pos_next, next_ok, dim, L, HAS_BIAS,
                                               SOFTPLUS)
        a_next = tl.exp(delta_next[:, None, :] * A_dn[:, :, None])
        gC = g[:, None, :] * Ct
        r_cum, s_cum = tl.associative_scan((a_next, gC), axis=2, combine_fn=_combine, reverse=True)
        dh = r_cum * dh_next[:, :, None] + s_cum
        dh_next = tl.sum(tl.where(step[None, None, :] == 0, dh, 0.0), axis=2)
        dh_ah = dh * ah
        dh_B = tl.sum(dh * Bt, axis=1)
        ddelta = tl.sum(dh_ah * A_dn[:, :, None], axis=1) + dh_B * u
        dA += tl.sum(dh_ah * delta[:, None, :], axis=2)
        du = dh_B * delta
        if HAS_D:
            du += tl.load(D + d, mask=d_ok, other=0.0).to(tl.float32)[:, None] * g
            dD += tl.sum(g * u, axis=1)
        if SOFTPLUS:
            ddelta = ddelta * tl.sigmoid(pre)
        tl.store(DU + offs, du, mask=valid)
        tl.store(DDELTA + offs, ddelta, mask=valid)
        dBt = dh * (delta * u)[:, None, :]
        dCt = g[:, None, :] * hs
        if B_MODE == 0:
            dB_const += tl.sum(dBt, axis=2)
        else:
            tl.atomic_add(DB + b_offs, dBt, mask=bc_mask)
        if C_MODE == 0:
            dC_const += tl.sum(dCt, axis=2)
        else:
            tl.atomic_add(DC + c_offs, dCt, mask=bc_mask)
    # per-(batch, channel) partial sums; the launcher reduces them over the batch
    tl.store(DA + dn_offs, dA, mask=dn_ok)
    if B_MODE == 0:
        tl.store(DB + dn_offs, dB_const, mask=dn_ok)
    if C_MODE == 0:
        tl.store(DC + dn_offs, dC_const, mask=dn_ok)
    if HAS_D:
        tl.store(DD + b * dim + d, dD, mask=d_ok)


def _bc_mode(M: torch.Tensor) -> int:
    return {2: BC_CONSTANT, 3: BC_VARIABLE, 4: BC_GROUPED}[M.dim()]


def _groups(B: torch.Tensor, C: torch.Tensor) -> int:
    for M in (B, C):
        if M.dim() == 4:
            return M.shape[1]
    return 1


# The backward keeps about 15 (BLOCK_D, N_PAD, T) float32 tensors live (states, their shift, decays, B, C,
# the adjoint scan and its products), so its tile is a quarter of the forward's: at 2048 elements per
# program ptxas spills 112–132 B per thread under the video orders and 350–480 B at N = 256, at 1024 it
# spills nothing (ahead-of-time compiles for sm_90a, 8 warps; 4 warps spill at every size).
_FWD_TILE = 4096
_BWD_TILE = 1024
_BWD_WARPS = 8


class _Tiles(NamedTuple):
    block_d_fwd: int
    block_d_bwd: int
    n_pad: int
    chunk: int      # steps per chunk, and between the saved states the backward restarts from


def _tiles(dim: int, N: int, L: int) -> _Tiles:
    """Tiles of both passes. The chunk is shared (the backward restarts from the forward's checkpoints), as
    long as 64 steps and short enough for one channel's backward tile to fit: N_PAD·T ≤ _BWD_TILE; the
    channel blocks then fill each pass's tile, at most 16 channels."""
    n_pad = max(triton.next_power_of_2(N), 2)
    chunk = min(64, max(2, triton.next_power_of_2(L)), max(2, _BWD_TILE // n_pad))
    block_d_cap = min(triton.next_power_of_2(dim), 16)
    return _Tiles(max(1, min(block_d_cap, _FWD_TILE // (n_pad * chunk))),
                  max(1, min(block_d_cap, _BWD_TILE // (n_pad * chunk))), n_pad, chunk)


def chunk_length(N: int, L: int) -> int:
    """Steps between the checkpoints the forward saves for the backward."""
    return _tiles(1, N, L).chunk


def selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, order_params, order_index):
    """-> (out, last_state (batch, dim, N) float32, checkpoints (batch, dim, chunks, N) float32)."""
    batch, dim, L = u.shape
    N = A.shape[1]
    block_d, _, n_pad, chunk = _tiles(dim, N, L)
    n_chunks = triton.cdiv(L, chunk)
    out = new_output_like(u)
    last = new_output((batch, dim, N), torch.float32, u.device)
    ckpt = new_output((batch, dim, n_chunks, N), torch.float32, u.device)
    order, frames, gh, gw, kind, path, reverse = order_launch_args(order_params, order_index, L)
    grid = (batch, triton.cdiv(dim, block_d))
    _selective_scan_fwd_kernel[grid](
        u, delta, A, B, C, D, z, delta_bias, out, last, ckpt, order,
        dim, L, N, _groups(B, C), n_chunks, frames, gh, gw,
        B_MODE=_bc_mode(B), C_MODE=_bc_mode(C), HAS_D=D is not None, HAS_Z=z is not None,
        HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(delta_softplus),
        KIND=kind, PATH=path, REVERSE=reverse, BLOCK_D=block_d, N_PAD=n_pad, T=chunk,
    )
    return out, last, ckpt


def selective_scan_bwd(dout, dlast, u, delta, A, B, C, D, z, delta_bias, ckpt, delta_softplus, order_params,
                       order_index):
    """-> (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias), None for absent inputs."""
    batch, dim, L = u.shape
    N = A.shape[1]
    _, block_d, n_pad, chunk = _tiles(dim, N, L)
    n_chunks = ckpt.shape[2]
    f32 = dict(device=u.device, dtype=torch.float32)
    du = new_output((batch, dim, L), torch.float32, u.device)
    ddelta = new_output((batch, dim, L), torch.float32, u.device)
    dA = new_output((batch, dim, N), torch.float32, u.device)
    dB = new_output((batch, dim, N), torch.float32, u.device) if B.dim() == 2 else torch.zeros(B.shape, **f32)
    dC = new_output((batch, dim, N), torch.float32, u.device) if C.dim() == 2 else torch.zeros(C.shape, **f32)
    dD = new_output((batch, dim), torch.float32, u.device) if D is not None else None
    dz = new_output_like(z) if z is not None else None
    order, frames, gh, gw, kind, path, reverse = order_launch_args(order_params, order_index, L)
    grid = (batch, triton.cdiv(dim, block_d))
    _selective_scan_bwd_kernel[grid](
        dout, dlast, u, delta, A, B, C, D, z, delta_bias, ckpt, order,
        du, ddelta, dA, dB, dC, dD, dz,
        dim, L, N, _groups(B, C), n_chunks, frames, gh, gw,
        B_MODE=_bc_mode(B), C_MODE=_bc_mode(C), HAS_D=D is not None, HAS_Z=z is not None,
        HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(delta_softplus), HAS_DLAST=dlast is not None,
        KIND=kind, PATH=path, REVERSE=reverse, BLOCK_D=block_d, N_PAD=n_pad, T=chunk,
        num_warps=_BWD_WARPS,
    )
    dbias = ddelta.sum((0, 2)).to(delta_bias.dtype) if delta_bias is not None else None
    return (du.to(u.dtype), ddelta.to(delta.dtype), dA.sum(0).to(A.dtype),
            (dB.sum(0) if B.dim() == 2 else dB).to(B.dtype), (dC.sum(0) if C.dim() == 2 else dC).to(C.dtype),
            None if D is None else dD.sum(0).to(D.dtype), dz, dbias)
