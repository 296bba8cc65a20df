"""Selective scan (Mamba, Gu & Dao 2023; mamba-ssm semantics) along a scan order, in plain PyTorch.

For each batch b and channel d, with state h ∈ R^N and steps t = 0..L−1 taken in scan order:

    Δ_t = softplus(δ_t + bias) if delta_softplus else δ_t + bias
    h_t = exp(Δ_t·A)·h_{t−1} + Δ_t·B_t·u_t,        h_{−1} = 0
    y_t = C_t·h_t + D·u_t,       out_t = y_t·silu(z_t) if z is given

B and C are (dim, N) constants, (batch, N, L) per step, or (batch, G, N, L) shared by dim/G channels.

Backward (g = ∂L/∂y after the gate; a_t = exp(Δ_t·A), b_t = Δ_t·B_t·u_t):

    ∂h_t = g_t·C_t + a_{t+1}·∂h_{t+1}   (a reverse scan; ∂h_{L−1} also receives ∂last_state)
    ∂C_t = g_t·h_t,  ∂a_t = ∂h_t·h_{t−1},  ∂b_t = ∂h_t
    ∂Δ_t = Σ_n (∂a_t·a_t·A + ∂h_t·B_t·u_t),  ∂A = Σ_t ∂a_t·a_t·Δ_t,  ∂B_t = ∂h_t·Δ_t·u_t
    ∂u_t = Σ_n ∂h_t·B_t·Δ_t + D·g_t,  ∂D = Σ_t g_t·u_t,  ∂δ = ∂Δ·sigmoid(δ + bias) with softplus

Fast PyTorch: the L steps are cut into chunks of T. One loop of T steps runs every chunk at once from a
zero state; one loop over the L/T chunks carries the state across chunk boundaries; then
h_t = h_t^local + (Π_{s ≤ t in chunk} a_s)·h_carry. That is T + L/T Python steps instead of L, with
only products of factors in (0, 1] (no exp of positive numbers, so no overflow).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..orders import inverse


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def expand_bc(M: torch.Tensor, batch: int, dim: int) -> torch.Tensor:
    """B or C in any of its three layouts -> broadcastable to (batch, dim, L, N)."""
    if M.dim() == 2:                                   # (dim, N): constant over steps
        return M[None, :, None, :]
    if M.dim() == 3:                                   # (batch, N, L): shared by all channels
        return M.transpose(1, 2)[:, None]
    groups = M.shape[1]                                # (batch, G, N, L): dim/G channels per group
    return M.transpose(2, 3).repeat_interleave(dim // groups, dim=1)


def permute_steps(t: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    """Gather the last (step) dimension into scan order."""
    return t if index is None else t.index_select(-1, index)


def chunked_linear_scan(a: torch.Tensor, b: torch.Tensor, chunk: int = 32) -> torch.Tensor:
    """All states of h_t = a_t·h_{t−1} + b_t (h_{−1} = 0) along dim 2 of (batch, dim, L, N) tensors."""
    batch, dim, length, n = a.shape
    chunks = -(-length // chunk)
    pad = chunks * chunk - length
    if pad:
        a = F.pad(a, (0, 0, 0, pad), value=1.0)
        b = F.pad(b, (0, 0, 0, pad), value=0.0)
    a = a.reshape(batch, dim, chunks, chunk, n)
    b = b.reshape(batch, dim, chunks, chunk, n)
    h = torch.zeros_like(b[:, :, :, 0])
    local = []
    for t in range(chunk):                              # every chunk at once, from a zero state
        h = a[:, :, :, t] * h + b[:, :, :, t]
        local.append(h)
    local = torch.stack(local, dim=3)
    decay = torch.cumprod(a, dim=3)
    carry = [torch.zeros_like(h[:, :, 0])]
    for c in range(chunks - 1):                          # state entering chunk c+1
        carry.append(decay[:, :, c, -1] * carry[-1] + local[:, :, c, -1])
    carry = torch.stack(carry, dim=2)
    states = local + decay * carry[:, :, :, None]
    return states.reshape(batch, dim, chunks * chunk, n)[:, :, :length]


def reduce_bc(grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Sum a (batch, dim, L, N) gradient down to the layout of B or C (the inverse of expand_bc)."""
    if like.dim() == 2:
        return grad.sum((0, 2))
    if like.dim() == 3:
        return grad.sum(1).transpose(1, 2)
    batch, dim, length, n = grad.shape
    groups = like.shape[1]
    return grad.reshape(batch, groups, dim // groups, length, n).sum(2).transpose(2, 3)


def _prepare(u, delta, A, B, C, delta_bias, delta_softplus, order_index):
    acc = compute_dtype(u.dtype)
    batch, dim, _ = u.shape
    u_s = permute_steps(u, order_index).to(acc)
    pre = permute_steps(delta, order_index).to(acc)
    if delta_bias is not None:
        pre = pre + delta_bias.to(acc)[:, None]
    delta_s = F.softplus(pre) if delta_softplus else pre
    B_s = expand_bc(B if B.dim() == 2 else permute_steps(B, order_index), batch, dim).to(acc)
    C_s = expand_bc(C if C.dim() == 2 else permute_steps(C, order_index), batch, dim).to(acc)
    a = torch.exp(delta_s[..., None] * A.to(acc)[:, None, :])
    return acc, u_s, pre, delta_s, B_s, C_s, a


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   order_index: torch.Tensor | None = None, chunk: int = 32):
    """(out, last_state): out (batch, dim, L) in u's dtype and raster order, last_state (batch, dim, N)
    in the compute dtype — the state after the last step of the order. Differentiable by autograd."""
    acc, u_s, _, delta_s, B_s, C_s, a = _prepare(u, delta, A, B, C, delta_bias, delta_softplus, order_index)
    b = (delta_s * u_s)[..., None] * B_s
    states = chunked_linear_scan(a, b, chunk)
    y = (states * C_s).sum(-1)
    if D is not None:
        y = y + D.to(acc)[:, None] * u_s
    if z is not None:
        y = y * F.silu(permute_steps(z, order_index).to(acc))
    if order_index is not None:                          # back to raster: out[order[t]] = y[t]
        y = y.index_select(-1, inverse(order_index))
    return y.to(u.dtype), states[:, :, -1]


def selective_scan_backward(dout, dlast, u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                            order_index: torch.Tensor | None = None, chunk: int = 32):
    """Closed-form gradients (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias) — None for absent inputs —
    by recomputing the forward states (the formulas at the top of this file)."""
    acc, u_s, pre, delta_s, B_s, C_s, a = _prepare(u, delta, A, B, C, delta_bias, delta_softplus, order_index)
    states = chunked_linear_scan(a, (delta_s * u_s)[..., None] * B_s, chunk)
    g = permute_steps(dout, order_index).to(acc)
    dz = None
    if z is not None:
        z_s = permute_steps(z, order_index).to(acc)
        y = (states * C_s).sum(-1) + (0 if D is None else D.to(acc)[:, None] * u_s)
        sig = torch.sigmoid(z_s)
        dz = g * y * sig * (1 + z_s * (1 - sig))
        g = g * z_s * sig
    gC = g[..., None] * C_s
    if dlast is not None:
        gC[:, :, -1] += dlast.to(acc)
    a_next = torch.cat([a[:, :, 1:], torch.ones_like(a[:, :, :1])], dim=2)
    dh = chunked_linear_scan(a_next.flip(2), gC.flip(2), chunk).flip(2)
    h_prev = torch.cat([torch.zeros_like(states[:, :, :1]), states[:, :, :-1]], dim=2)
    da_a = dh * h_prev * a
    dh_B = dh * B_s
    A_acc = A.to(acc)[:, None, :]
    ddelta_s = (da_a * A_acc).sum(-1) + (dh_B * u_s[..., None]).sum(-1)
    dA = (da_a * delta_s[..., None]).sum((0, 2))
    du_s = (dh_B * delta_s[..., None]).sum(-1)
    dB = reduce_bc(dh * (delta_s * u_s)[..., None], B)
    dC = reduce_bc(g[..., None] * states, C)
    dD = None
    if D is not None:
        du_s = du_s + D.to(acc)[:, None] * g
        dD = (g * u_s).sum((0, 2))
    if delta_softplus:
        ddelta_s = ddelta_s * torch.sigmoid(pre)
    dbias = ddelta_s.sum((0, 2)) if delta_bias is not None else None

    unpermute = (lambda t: t) if order_index is None else (lambda t: t.index_select(-1, inverse(order_index)))
    du, ddelta = unpermute(du_s), unpermute(ddelta_s)
    if B.dim() > 2:
        dB = unpermute(dB)
    if C.dim() > 2:
        dC = unpermute(dC)
    if dz is not None:
        dz = unpermute(dz)
    cast = lambda grad, like: None if like is None else grad.to(like.dtype)  # noqa: E731
    return (cast(du, u), cast(ddelta, delta), cast(dA, A), cast(dB, B), cast(dC, C), cast(dD, D), cast(dz, z),
            cast(dbias, delta_bias))


def sequential_selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                              dtype=None):
    """The textbook loop, one step at a time in raster order (what mamba-ssm's selective_scan_ref does):
    the tests' oracle of the oracle (in float64) and the benchmarks' baseline. Returns (out, last_state)."""
    dtype = dtype or compute_dtype(u.dtype)
    u, delta, A, B, C = (t.to(dtype) for t in (u, delta, A, B, C))
    batch, dim, length = u.shape
    if delta_bias is not None:
        delta = delta + delta_bias.to(dtype)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    B_all, C_all = expand_bc(B, batch, dim), expand_bc(C, batch, dim)

    def at(M, t):  # (batch or 1, dim, N) at step t
        return M[:, :, 0] if M.shape[2] == 1 else M[:, :, t]

    h = u.new_zeros(batch, dim, A.shape[1])
    ys = []
    for t in range(length):
        h = torch.exp(delta[:, :, t, None] * A) * h + (delta[:, :, t] * u[:, :, t])[..., None] * at(B_all, t)
        ys.append((h * at(C_all, t)).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + D.to(dtype)[:, None] * u
    if z is not None:
        y = y * F.silu(z.to(dtype))
    return y, h
