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

Fast PyTorch: the L steps are cut into L/T chunks of T ≈ √L steps and laid out (T, N, batch, chunks, dim):
step-major, so every per-step slice is contiguous, and channel-innermost, so every elementwise op runs
over long contiguous rows (an innermost N of 16 or less would make PyTorch's CPU loops crawl; per-step
scalars broadcast over the outer N). A loop of T steps runs all chunks at once from a zero state (giving
y's local part and each chunk's end state and decay); a loop over the chunks carries the state across
chunk boundaries; a second loop of T steps adds C_t·(Π_{s ≤ t in chunk} a_s)·h_carry to y. That is
2T + L/T Python steps instead of L, no state tensor in the forward, and only products of factors in
(0, 1] (no exp of positive numbers, so no overflow). The backward materialises the states once and runs
the adjoint the same way, backwards.
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


class ChunkLayout:
    """(batch, dim, L) tensors <-> the chunked layout (T, N or 1, batch, chunks, dim), L padded to chunks·T.

    Padded steps get Δ = 0 (a = 1, b = 0: the identity) and zero B, C and gradient, so they change nothing.
    """

    def __init__(self, batch: int, dim: int, length: int, chunk: int | None = None):
        self.batch, self.dim, self.length = batch, dim, length
        self.steps = chunk or max(8, int(round(length ** 0.5)))
        self.chunks = -(-length // self.steps)
        self.pad = self.chunks * self.steps - length

    def scalars(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, dim, L) -> (T, 1, batch, chunks, dim)."""
        if self.pad:
            x = F.pad(x, (0, self.pad))
        x = x.reshape(self.batch, self.dim, self.chunks, self.steps)
        return x.permute(3, 0, 2, 1).unsqueeze(1).contiguous()

    def unscalars(self, x: torch.Tensor) -> torch.Tensor:
        """(T, [1,] batch, chunks, dim) -> (batch, dim, L)."""
        x = x.reshape(self.steps, self.batch, self.chunks, self.dim).permute(1, 3, 2, 0)
        return x.reshape(self.batch, self.dim, -1)[..., :self.length]

    def bc(self, M: torch.Tensor) -> torch.Tensor:
        """B or C (already in scan order) -> broadcastable to (T, N, batch, chunks, dim)."""
        if M.dim() == 2:                                             # (dim, N)
            return M.t()[None, :, None, None, :]
        if self.pad:
            M = F.pad(M, (0, self.pad))
        if M.dim() == 3:                                             # (batch, N, L)
            M = M.reshape(self.batch, -1, self.chunks, self.steps)
            return M.permute(3, 1, 0, 2).unsqueeze(-1).contiguous()
        groups, n = M.shape[1], M.shape[2]                           # (batch, G, N, L)
        M = M.reshape(self.batch, groups, n, self.chunks, self.steps).repeat_interleave(self.dim // groups, dim=1)
        return M.permute(4, 2, 0, 3, 1).contiguous()

    def reduce_bc(self, grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Sum a (T, N, batch, chunks, dim) gradient down to the layout of B or C (in scan order)."""
        if like.dim() == 2:
            return grad.sum((0, 2, 3)).t()
        steps, n, batch, chunks, dim = grad.shape
        if like.dim() == 3:
            per_step = grad.sum(-1)                                  # (T, N, batch, chunks)
            per_step = per_step.permute(2, 1, 3, 0)                  # (batch, N, chunks, T)
        else:
            groups = like.shape[1]
            per_step = grad.reshape(steps, n, batch, chunks, groups, dim // groups).sum(-1)
            per_step = per_step.permute(2, 4, 1, 3, 0)               # (batch, G, N, chunks, T)
        return per_step.reshape(*per_step.shape[:-2], -1)[..., :self.length]


def _pick(M: torch.Tensor, t: int) -> torch.Tensor:
    """Step t of a chunked B/C, which is constant over steps when its leading size is 1."""
    return M[t if M.shape[0] > 1 else 0]


def _inputs(u, delta, A, B, C, delta_bias, delta_softplus, order_index):
    """Scan-order, compute-dtype inputs: (acc, u_s, pre-softplus δ, Δ, B_s, C_s), B_s/C_s in their layouts."""
    acc = compute_dtype(u.dtype)
    u_s = permute_steps(u, order_index).to(acc)
    pre = permute_steps(delta, order_index).to(acc)
    if delta_bias is not None:
        pre = pre + delta_bias.to(acc)[:, None]
    delta_s = F.softplus(pre) if delta_softplus else pre
    B_s = (B if B.dim() == 2 else permute_steps(B, order_index)).to(acc)
    C_s = (C if C.dim() == 2 else permute_steps(C, order_index)).to(acc)
    return acc, u_s, pre, delta_s, B_s, C_s


def scan_outputs(delta_s: torch.Tensor, A: torch.Tensor, u_s: torch.Tensor, B_s: torch.Tensor, C_s: torch.Tensor,
                 chunk: int | None = None):
    """y_t = C_t·h_t for all t (batch, dim, L) and the final state (batch, dim, N), without materialising
    every state. Δ and u are (batch, dim, L) in scan order, A (dim, N), B_s/C_s in scan order."""
    batch, dim, length = u_s.shape
    lay = ChunkLayout(batch, dim, length, chunk)
    dlt = lay.scalars(delta_s)                                          # (T, 1, b, nc, d)
    a_all = torch.exp(dlt * A.t()[None, :, None, None, :])              # (T, N, b, nc, d), one pass
    b_all = lay.scalars(delta_s * u_s) * lay.bc(B_s)
    C_t = lay.bc(C_s)
    h = b_all[0]
    decay = a_all[0].clone()
    y_local = [(h * _pick(C_t, 0)).sum(0)]
    for t in range(1, lay.steps):                                        # all chunks from a zero state
        h = torch.addcmul(b_all[t], a_all[t], h)
        decay.mul_(a_all[t])
        y_local.append((h * _pick(C_t, t)).sum(0))
    carry = [torch.zeros_like(h[:, :, 0])]
    for c in range(lay.chunks):                                          # state entering chunk c + 1
        carry.append(torch.addcmul(h[:, :, c], decay[:, :, c], carry[-1]))
    last_state = carry.pop()                                             # (N, b, d)
    p = torch.stack(carry, dim=2)                                        # state entering each chunk
    y = []
    for t in range(lay.steps):                                           # add the carried-in state
        p = p * a_all[t]
        y.append(y_local[t] + (p * _pick(C_t, t)).sum(0))
    return lay.unscalars(torch.stack(y)), last_state.permute(1, 2, 0).contiguous()


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   order_index: torch.Tensor | None = None, chunk: int | None = None):
    """(out, last_state): out (batch, dim, L) in u's dtype and raster order, last_state (batch, dim, N)
    in the compute dtype — the state after the last step of the order. Differentiable by autograd."""
    acc, u_s, _, delta_s, B_s, C_s = _inputs(u, delta, A, B, C, delta_bias, delta_softplus, order_index)
    y, last_state = scan_outputs(delta_s, A.to(acc), u_s, B_s, C_s, chunk)
    if D is not None:
        y = y + D.to(acc)[:, None] * u_s
    if z is not None:
        y = y * F.silu(permute_steps(z, order_index).to(acc))
    if order_index is not None:                          # back to raster: out[order[t]] = y[t]
        y = y.index_select(-1, inverse(order_index))
    return y.to(u.dtype), last_state


def selective_scan_backward(dout, dlast, u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                            order_index: torch.Tensor | None = None, chunk: int | None = None):
    """Closed-form gradients (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias) — None for absent inputs —
    by recomputing the forward states (the formulas at the top of this file).

    In the forward's chunked layout: the states h_t are materialised once; the adjoint ∂h runs backwards
    the same way — a loop over T for all chunks at once from a zero adjoint, a loop over chunks for the
    adjoint entering each chunk from the right, and the fix-up ∂h_t += (Π_{s>t in chunk} a_s)·carry.
    """
    acc, u_s, pre, delta_s, B_s, C_s = _inputs(u, delta, A, B, C, delta_bias, delta_softplus, order_index)
    batch, dim, length = u_s.shape
    lay = ChunkLayout(batch, dim, length, chunk)
    A_t = A.to(acc).t()[None, :, None, None, :]                          # (1, N, 1, 1, d)
    dlt, u_t = lay.scalars(delta_s), lay.scalars(u_s)                    # (T, 1, b, nc, d)
    B_t, C_t = lay.bc(B_s), lay.bc(C_s)
    a = torch.exp(dlt * A_t)                                             # (T, N, b, nc, d)
    bu = dlt * u_t

    # forward states: local scan of every chunk, then the state carried into each chunk
    states, decay = torch.empty_like(a), torch.empty_like(a)    # decay: Π_{s≤t in chunk} a_s (cumprod is slower)
    torch.mul(bu[0], B_t[0], out=states[0])
    decay[0] = a[0]
    for t in range(1, lay.steps):
        torch.addcmul(bu[t] * _pick(B_t, t), a[t], states[t - 1], out=states[t])
        torch.mul(decay[t - 1], a[t], out=decay[t])
    carry = [torch.zeros_like(states[0, :, :, 0])]
    for c in range(lay.chunks - 1):
        carry.append(torch.addcmul(states[-1, :, :, c], decay[-1, :, :, c], carry[-1]))
    states.addcmul_(decay, torch.stack(carry, dim=2))                    # h_t
    del decay

    g = permute_steps(dout, order_index).to(acc)
    dz = None
    if z is not None:
        z_s = permute_steps(z, order_index).to(acc)
        y = lay.unscalars((states * C_t).sum(1))
        if D is not None:
            y = y + D.to(acc)[:, None] * u_s
        sig = torch.sigmoid(z_s)
        dz = g * y * sig * (1 + z_s * (1 - sig))
        g = g * z_s * sig
    g_t = lay.scalars(g)

    # adjoint ∂h_t = g_t·C_t + a_{t+1}·∂h_{t+1}, backwards
    dh = torch.empty_like(a)
    torch.mul(g_t[-1], _pick(C_t, lay.steps - 1), out=dh[-1])
    if dlast is not None and lay.pad == 0:
        dh[-1, :, :, -1] += dlast.to(acc).permute(2, 0, 1)
    for t in range(lay.steps - 2, -1, -1):
        torch.addcmul(g_t[t] * _pick(C_t, t), a[t + 1], dh[t + 1], out=dh[t])
        if dlast is not None and t == (length - 1) % lay.steps and lay.pad:
            dh[t, :, :, -1] += dlast.to(acc).permute(2, 0, 1)
    after = torch.empty_like(a)                                          # Π_{s>t in chunk} a_s
    after[-1] = 1
    for t in range(lay.steps - 2, -1, -1):
        torch.mul(after[t + 1], a[t + 1], out=after[t])
    carry = [torch.zeros_like(dh[0, :, :, 0])]                           # adjoint entering chunk c from c+1
    for c in range(lay.chunks - 1, 0, -1):
        carry.append(a[0, :, :, c] * torch.addcmul(dh[0, :, :, c], after[0, :, :, c], carry[-1]))
    dh.addcmul_(after, torch.stack(carry[::-1], dim=2))
    del after

    h_prev = torch.empty_like(states)                                    # h_{t−1}, zero before the first step
    h_prev[1:] = states[:-1]
    h_prev[0, :, :, 1:] = states[-1, :, :, :-1]
    h_prev[0, :, :, 0] = 0
    da_a = h_prev.mul_(a).mul_(dh)                                       # ∂a_t·a_t
    dh_B = (dh * B_t).sum(1, keepdim=True)                               # Σ_n ∂h_t·B_t  (T, 1, b, nc, d)
    ddelta_t = (da_a * A_t).sum(1, keepdim=True) + dh_B * u_t
    du_t = dh_B * dlt
    dA = (da_a * dlt).sum((0, 2, 3)).t()
    dB = lay.reduce_bc(dh.mul_(bu), B)
    dC = lay.reduce_bc(states.mul_(g_t), C)
    ddelta_s, du_s = lay.unscalars(ddelta_t), lay.unscalars(du_t)
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
    cast = lambda grad, like: None if like is None else grad.to(like.dtype).contiguous()  # noqa: E731
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
