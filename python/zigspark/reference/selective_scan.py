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

Fast PyTorch: the L steps are cut into L/T chunks of T ≈ √L steps, laid out step-major so every slice is
contiguous. A loop of T steps runs all chunks at once from a zero state (giving y's local part and each
chunk's end state and decay); a loop over the chunks carries the state across chunk boundaries; a second
loop of T steps adds C_t·(Π_{s ≤ t in chunk} a_s)·h_carry to y. That is 2T + L/T Python steps instead of
L, no (batch, dim, L, N) state tensor in the forward, and only products of factors in (0, 1] (no exp of
positive numbers, so no overflow).
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


def _prepare(u, delta, A, B, C, delta_bias, delta_softplus, order_index, need_a=True):
    acc = compute_dtype(u.dtype)
    batch, dim, _ = u.shape
    u_s = permute_steps(u, order_index).to(acc)
    pre = permute_steps(delta, order_index).to(acc)
    if delta_bias is not None:
        pre = pre + delta_bias.to(acc)[:, None]
    delta_s = F.softplus(pre) if delta_softplus else pre
    B_s = expand_bc(B if B.dim() == 2 else permute_steps(B, order_index), batch, dim).to(acc)
    C_s = expand_bc(C if C.dim() == 2 else permute_steps(C, order_index), batch, dim).to(acc)
    a = torch.exp(delta_s[..., None] * A.to(acc)[:, None, :]) if need_a else None
    return acc, u_s, pre, delta_s, B_s, C_s, a


def _step_major(t: torch.Tensor, chunks: int, chunk: int) -> torch.Tensor:
    """(..., L or 1, N) with L = chunks·chunk -> (chunk, ..., chunks or 1, N): slice [t] is contiguous."""
    lead = t.shape[:-2]
    if t.shape[-2] == 1:
        return t.unsqueeze(0)
    t = t.reshape(*lead, chunks, chunk, t.shape[-1])
    return t.movedim(-2, 0).contiguous()


def scan_outputs(a_log_rate: torch.Tensor, A: torch.Tensor, bu: torch.Tensor, B_s: torch.Tensor,
                 C_s: torch.Tensor, chunk: int | None = None):
    """y_t = C_t·h_t for all t and the final state, without materialising every state.

    a_log_rate = Δ (batch, dim, L), bu = Δ·u (batch, dim, L), A (dim, N), B_s/C_s as from expand_bc.
    """
    batch, dim, length = a_log_rate.shape
    chunk = chunk or max(8, int(round(length ** 0.5)))
    chunks = -(-length // chunk)
    pad = chunks * chunk - length
    if pad:  # padded steps have Δ = 0: a = 1, b = 0, the identity
        a_log_rate, bu = F.pad(a_log_rate, (0, pad)), F.pad(bu, (0, pad))
        B_s = B_s if B_s.shape[2] == 1 else F.pad(B_s, (0, 0, 0, pad))
        C_s = C_s if C_s.shape[2] == 1 else F.pad(C_s, (0, 0, 0, pad))
    delta_t = _step_major(a_log_rate[..., None], chunks, chunk)        # (T, b, d, nc, 1)
    bu_t = _step_major(bu[..., None], chunks, chunk)
    B_t, C_t = _step_major(B_s, chunks, chunk), _step_major(C_s, chunks, chunk)
    a_all = torch.exp(delta_t * A[:, None, :])                         # (T, b, d, nc, N), one pass
    b_all = bu_t * B_t
    pick = lambda M, t: M[t if M.shape[0] > 1 else 0]                   # noqa: E731  (constant B/C)
    h = b_all[0]
    decay = a_all[0]
    y_local = [torch.linalg.vecdot(h, pick(C_t, 0))]
    for t in range(1, chunk):                                            # all chunks from a zero state
        h = torch.addcmul(b_all[t], a_all[t], h)
        decay = decay * a_all[t]
        y_local.append(torch.linalg.vecdot(h, pick(C_t, t)))
    carry = [torch.zeros_like(h[:, :, 0])]
    for c in range(chunks):                                              # state entering chunk c + 1
        carry.append(torch.addcmul(h[:, :, c], decay[:, :, c], carry[-1]))
    last_state = carry.pop()
    p = torch.stack(carry, dim=2)                                        # state entering each chunk
    y = []
    for t in range(chunk):                                               # add the carried-in state
        p = p * a_all[t]
        y.append(y_local[t] + torch.linalg.vecdot(p, pick(C_t, t)))
    y = torch.stack(y, dim=-1).reshape(batch, dim, chunks * chunk)[:, :, :length]
    return y, last_state


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   order_index: torch.Tensor | None = None, chunk: int | None = None):
    """(out, last_state): out (batch, dim, L) in u's dtype and raster order, last_state (batch, dim, N)
    in the compute dtype — the state after the last step of the order. Differentiable by autograd."""
    acc, u_s, _, delta_s, B_s, C_s, _ = _prepare(u, delta, A, B, C, delta_bias, delta_softplus, order_index,
                                                 need_a=False)
    y, last_state = scan_outputs(delta_s, A.to(acc), delta_s * u_s, B_s, C_s, chunk)
    if D is not None:
        y = y + D.to(acc)[:, None] * u_s
    if z is not None:
        y = y * F.silu(permute_steps(z, order_index).to(acc))
    if order_index is not None:                          # back to raster: out[order[t]] = y[t]
        y = y.index_select(-1, inverse(order_index))
    return y.to(u.dtype), last_state


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
    # As mamba-ssm's selective_scan_ref: the factors of every step first, then one short step per t.
    a_all = torch.exp(delta[..., None] * A[:, None, :])                  # (batch, dim, L, N)
    b_all = (delta * u)[..., None] * expand_bc(B, batch, dim)
    C_all = expand_bc(C, batch, dim)
    h = u.new_zeros(batch, dim, A.shape[1])
    ys = []
    for t in range(length):
        h = a_all[:, :, t] * h + b_all[:, :, t]
        ys.append(torch.linalg.vecdot(h, C_all[:, :, t if C_all.shape[2] > 1 else 0]))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + D.to(dtype)[:, None] * u
    if z is not None:
        y = y * F.silu(z.to(dtype))
    return y, h
