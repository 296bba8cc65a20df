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

Fast PyTorch: the L steps are cut into L/T chunks of T ≈ √(L/2) steps and laid out (T, N, chunks, batch,
dim): step-major, so every per-step slice is contiguous, and channel-innermost, so every elementwise op runs
over long contiguous rows (an innermost N of 16 or less would make PyTorch's CPU loops crawl; per-step
scalars broadcast over the outer N). The copy into that layout is also the gather into scan order, so the
order costs no extra pass. The forward takes a_t = exp(Δ_t·A) once for every step, then scans twice:
a loop of T steps runs all chunks at once from a zero state, keeping only the running state, to get each
chunk's end state; a loop over the chunks carries the state across chunk boundaries (the decay through a
whole chunk is exp(A·Σ_chunk Δ)); and a second loop of T steps rescans every chunk in place from the state
carried into it. That is 2T + L/T Python steps instead of L, with one exp per state element, as in the loop.
Wide inputs go a block of channels at a time, which bounds the block-sized work tensors, and they
are kept per thread between calls: a fresh multi-megabyte CPU allocation is a fresh mapping whose
pages fault in again on every call. The backward, also a block of channels at a time, recomputes a_t and
the states the same way and runs the adjoint ∂h through the same two passes, backwards.
"""

from __future__ import annotations

import math
import threading

import torch
import torch.nn.functional as F

from .precision import LOG2E, compute_dtype



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
    """Raster-order tensors <-> the chunked layout (T, N or 1, chunks, batch, channels) in scan order.

    Slot (t, c) holds step c·T + t of the scan order, which is raster position order[c·T + t]: the gather
    into scan order *is* the layout copy, and the scatter back is the copy out, so no permuted copy of any
    input is made. L is padded to chunks·T; padded slots get Δ = 0 (a = 1, b = 0: the identity) and zero
    B, C and gradient, so they change nothing, and their outputs land in a spare position that is dropped.
    """

    def __init__(self, batch: int, length: int, chunk: int | None = None, order_index: torch.Tensor | None = None,
                 device: torch.device | None = None):
        self.batch, self.length = batch, length
        self.steps = chunk or max(8, int(round((length / 2) ** 0.5)))  # minimises 2T + L/T
        self.chunks = -(-length // self.steps)
        self.pad = self.chunks * self.steps - length
        src = torch.arange(length, device=device) if order_index is None else order_index.to(device)
        src = torch.cat([src, src.new_full((self.pad,), length)])          # padded steps -> spare position L
        self.slots = src.view(self.chunks, self.steps).t().reshape(-1)     # (T·chunks,): slot -> position
        self.read_slots = self.slots.clamp(max=length - 1) if self.pad else self.slots

    def _gather(self, steps_first: torch.Tensor) -> torch.Tensor:
        """(L, ...) -> (T, chunks, ...) in slot order, padded slots zero. The step-major copy first makes
        every gathered step one contiguous row (a strided gather of single elements is slower)."""
        rows = steps_first.contiguous()
        out = rows.index_select(0, self.read_slots).view(self.steps, self.chunks, *steps_first.shape[1:])
        if self.pad:
            out[self.steps - self.pad:, -1] = 0
        return out

    def _scatter(self, x: torch.Tensor, back: tuple[int, ...]) -> torch.Tensor:
        """(T, chunks, ...) -> the step-major (L, ...) rows in raster order, then permuted by `back` into
        a contiguous tensor (padded slots land in a spare row L, which is dropped)."""
        rows = x.new_empty((self.length + (1 if self.pad else 0), *x.shape[2:]))
        rows.index_copy_(0, self.slots, x.reshape(self.steps * self.chunks, *x.shape[2:]))
        return rows[:self.length].permute(back).contiguous()

    def scalars(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, d, L) -> (T, 1, chunks, batch, d)."""
        return self._gather(x.permute(2, 0, 1)).unsqueeze(1)

    def unscalars(self, y: torch.Tensor) -> torch.Tensor:
        """(T, [1,] chunks, batch, d) -> (batch, d, L)."""
        y = y.reshape(self.steps, self.chunks, self.batch, y.shape[-1])
        return self._scatter(y, (1, 2, 0))                                # (L, b, d) -> (b, d, L)

    def bc(self, M: torch.Tensor, dim: int) -> torch.Tensor:
        """B or C (raster order) for `dim` channels -> broadcastable to (T, N, chunks, batch, dim)."""
        if M.dim() == 2:                                             # (dim, N)
            return M.t()[None, :, None, None, :]
        if M.dim() == 3:                                             # (batch, N, L)
            return self._gather(M.permute(2, 1, 0)).permute(0, 2, 1, 3).unsqueeze(-1).contiguous()
        groups = M.shape[1]                                          # (batch, G, N, L)
        per_step = self._gather(M.permute(3, 2, 0, 1)).permute(0, 2, 1, 3, 4)
        return per_step.repeat_interleave(dim // groups, dim=-1)

    def reduce_bc(self, grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Sum a (T, N, chunks, batch, dim) gradient down to the layout of B or C (raster order)."""
        if like.dim() == 2:
            return grad.sum((0, 2, 3)).t()
        steps, n, chunks, batch, dim = grad.shape
        if like.dim() == 3:
            per_step = grad.sum(-1).permute(0, 2, 1, 3)                  # (T, chunks, N, batch)
            return self._scatter(per_step, (2, 1, 0))                     # (L, N, b) -> (b, N, L)
        groups = like.shape[1]
        per_step = grad.reshape(steps, n, chunks, batch, groups, dim // groups).sum(-1).permute(0, 2, 1, 3, 4)
        return self._scatter(per_step, (2, 3, 1, 0))                      # (L, N, b, G) -> (b, G, N, L)


def _inputs(u, delta, A, B, C, delta_bias, delta_softplus):
    """Compute-dtype inputs in raster order: (acc, u, pre-softplus δ, Δ, B, C). Everything before the scan
    is elementwise per step, so it is done before the gather into scan order."""
    acc = compute_dtype(u.dtype)
    pre = delta.to(acc)
    if delta_bias is not None:
        pre = pre + delta_bias.to(acc)[:, None]
    delta_ = F.softplus(pre) if delta_softplus else pre
    return acc, u.to(acc), pre, delta_, B.to(acc), C.to(acc)


# Elements of one (T, N, chunks, batch, channels) work tensor. Channels are scanned in blocks of at most this
# size (16 MiB in float32), which bounds the memory kept per thread. Much smaller blocks fit the caches
# better but lose more in Python per step: on a 2-core x86 VM at dim 256 and L 1024, blocks of 2^19
# elements took 1.5x as long as blocks of this size.
_BLOCK_ELEMENTS = 1 << 22
_work = threading.local()


def _work_tensor(slot: int, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """An uninitialised work tensor of `shape`. On CPU one of up to a block's size is kept per thread and
    slot and reused by the next call; larger ones (a single channel over a block) are not kept."""
    numel = math.prod(shape)
    if like.device.type != "cpu" or numel > _BLOCK_ELEMENTS:
        return like.new_empty(shape)
    # inference mode makes inference tensors, which may not be written outside it: one set per mode
    key = (slot, like.dtype, torch.is_inference_mode_enabled())
    buffers = _work.__dict__.setdefault("buffers", {})
    buffer = buffers.get(key)
    if buffer is None or buffer.numel() < numel:
        buffer = buffers[key] = like.new_empty(numel)
    return buffer[:numel].view(shape)


def _channel_blocks(batch: int, dim: int, length: int, n: int, per_group: int = 1):
    """(d0, d1) blocks of channels; each covers whole groups of a grouped B or C. `length` is the padded
    chunks·T, so that a block's work tensors fit the kept ones."""
    width = max(1, min(dim, _BLOCK_ELEMENTS // max(1, batch * length * n)))
    width = -(-dim // -(-dim // width))                  # the same number of blocks, of balanced widths
    width = max(per_group, width // per_group * per_group)
    return [(d0, min(dim, d0 + width)) for d0 in range(0, dim, width)]


def _bc_block(M: torch.Tensor, d0: int, d1: int, dim: int) -> torch.Tensor:
    """B or C (any layout) restricted to the channels d0:d1 (whole groups when grouped)."""
    if M.dim() == 2:
        return M[d0:d1]
    if M.dim() == 3:
        return M
    per_group = dim // M.shape[1]
    return M[:, d0 // per_group:d1 // per_group]


def _blocks_for(lay: ChunkLayout, dim: int, n: int, B: torch.Tensor, C: torch.Tensor):
    per_group = max((dim // M.shape[1] for M in (B, C) if M.dim() == 4), default=1)
    return _channel_blocks(lay.batch, dim, lay.steps * lay.chunks, n, per_group)


def scan_outputs(lay: ChunkLayout, delta: torch.Tensor, A: torch.Tensor, u: torch.Tensor, B: torch.Tensor,
                 C: torch.Tensor):
    """y_t = C_t·h_t for all t, (batch, dim, L) in raster order, and the final state (batch, dim, N), without
    materialising every state at once. Inputs in raster order; the layout applies the scan order."""
    dim = u.shape[1]
    ys, states = zip(*(_scan_block(lay, delta[:, d0:d1], A[d0:d1], u[:, d0:d1], _bc_block(B, d0, d1, dim),
                                   _bc_block(C, d0, d1, dim)) for d0, d1 in _blocks_for(lay, dim, A.shape[1], B, C)))
    y = ys[0] if len(ys) == 1 else torch.cat(ys, -1)                     # (T, chunks, batch, dim)
    return lay.unscalars(y), torch.cat(states, -1).permute(1, 2, 0).contiguous()


def _log2_decay(A: torch.Tensor) -> torch.Tensor:
    """A·log₂e as (1, N, 1, 1, d), d contiguous: exp(Δ·A) is then exp2(Δ·that), which is cheaper on CPU."""
    return (A.t() * LOG2E).contiguous()[None, :, None, None, :]


def _states(lay: ChunkLayout, dlt, A2, bu, B_l):
    """(a, h, last_state, carry): a_t = exp(Δ_t·A) and the states h_t of every step, (T, N, chunks, batch, d)
    in the work tensors 0 and 1, the state after the last step, (N, batch, d), and the state entering each
    chunk, (N, chunks, batch, d).

    Two passes of T steps: the first runs every chunk from a zero state and keeps only the running state,
    which gives each chunk's end state; a loop over chunks turns those into the state carried into each
    chunk (the decay through a whole chunk is exp(A·Σ_chunk Δ)); the second rescans every chunk in place
    from its carried-in state.
    """
    shape = (lay.steps, A2.shape[1], lay.chunks, lay.batch, dlt.shape[-1])
    a = torch.mul(dlt, A2, out=_work_tensor(0, shape, dlt)).exp2_()
    h = torch.mul(bu, B_l, out=_work_tensor(1, shape, dlt))              # b_t = Δ_t·B_t·u_t, scanned below
    h_steps, a_steps = h.unbind(0), a.unbind(0)
    end = h_steps[0].clone()
    for t in range(1, lay.steps):
        torch.addcmul(h_steps[t], a_steps[t], end, out=end)
    through = torch.mul(dlt.sum(0), A2[0]).exp2_()                       # (N, nc, b, d): Π_t a_t of a chunk
    carry = torch.zeros_like(end)                                        # state entering each chunk
    ends, throughs, carries = end.unbind(1), through.unbind(1), carry.unbind(1)
    for c in range(1, lay.chunks):
        torch.addcmul(ends[c - 1], throughs[c - 1], carries[c - 1], out=carries[c])
    last_state = torch.addcmul(ends[-1], throughs[-1], carries[-1])
    h_steps[0].addcmul_(a_steps[0], carry)
    for t in range(1, lay.steps):
        h_steps[t].addcmul_(a_steps[t], h_steps[t - 1])
    return a, h, last_state, carry


def _adjoints_(lay: ChunkLayout, a, dlt, A2, dh, dlast):
    """In place, dh = g_t·C_t becomes ∂h_t = g_t·C_t + a_{t+1}·∂h_{t+1}, with ∂last_state (N, batch, d) or None
    entering after the final step: the scan of _states run backwards. Padded steps (a = 1, g = 0) carry
    ∂last_state unchanged down to the real last step."""
    dh_steps, a_steps = dh.unbind(0), a.unbind(0)
    start = dh_steps[-1].clone()                                         # every chunk from a zero adjoint
    for t in range(lay.steps - 2, -1, -1):
        torch.addcmul(dh_steps[t], a_steps[t + 1], start, out=start)
    through = torch.mul(dlt[1:].sum(0), A2[0]).exp2_()                   # Π_{t ≥ 1} a_t of a chunk
    incoming = torch.zeros_like(start)                                   # a_{t+1}·∂h_{t+1} from the next chunk
    starts, throughs, firsts, incomings = start.unbind(1), through.unbind(1), a[0].unbind(1), incoming.unbind(1)
    if dlast is not None:
        incomings[-1].copy_(dlast)
    for c in range(lay.chunks - 2, -1, -1):
        torch.mul(firsts[c + 1], torch.addcmul(starts[c + 1], throughs[c + 1], incomings[c + 1]), out=incomings[c])
    dh_steps[-1].add_(incoming)
    for t in range(lay.steps - 2, -1, -1):
        dh_steps[t].addcmul_(a_steps[t + 1], dh_steps[t + 1])
    return dh


def _scan_block(lay: ChunkLayout, delta, A, u, B, C):
    """One block of channels: (y in the layout (T, chunks, batch, d), final state (N, batch, d))."""
    dim = u.shape[1]
    _, h, last_state, _ = _states(lay, lay.scalars(delta), _log2_decay(A), lay.scalars(delta * u),
                                  lay.bc(B, dim))
    return h.mul_(lay.bc(C, dim)).sum(1), last_state                     # Σ_n C_t·h_t


@torch.no_grad()
def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   order_index: torch.Tensor | None = None, chunk: int | None = None):
    """(out, last_state): out (batch, dim, L) in u's dtype and raster order, last_state (batch, dim, N)
    in the compute dtype — the state after the last step of the order. The scan works in place, so this
    runs without autograd: the op (zigspark::selective_scan_fwd) registers selective_scan_backward, which
    the tests check against autograd of sequential_selective_scan."""
    acc, u_, _, delta_, B_, C_ = _inputs(u, delta, A, B, C, delta_bias, delta_softplus)
    lay = ChunkLayout(u.shape[0], u.shape[-1], chunk, order_index, u.device)
    y, last_state = scan_outputs(lay, delta_, A.to(acc), u_, B_, C_)
    if D is not None:
        y.addcmul_(D.to(acc)[:, None], u_)
    if z is not None:
        y.mul_(F.silu(z.to(acc)))
    return y.to(u.dtype), last_state


def _backward_block(lay: ChunkLayout, g, dlast, u, pre, delta, A, B, C, D, z, delta_softplus):
    """Gradients of one block of channels; raster-order inputs of those channels (B and C restricted to
    them), g = ∂out. Returns (du, ddelta, dA, dB, dC, dD, dz) for the block, None for absent inputs; dB and
    dC are the block's share when B and C are shared by all channels."""
    dim = u.shape[1]
    A2, dlt, bu = _log2_decay(A), lay.scalars(delta), lay.scalars(delta * u)
    B_l, C_l = lay.bc(B, dim), lay.bc(C, dim)
    a, h, _, carry = _states(lay, dlt, A2, bu, B_l)
    dz = dD = None
    if z is not None:                                                    # out = y·silu(z)
        y = lay.unscalars(torch.mul(h, C_l, out=_work_tensor(2, h.shape, h)).sum(1))
        if D is not None:
            y.addcmul_(D[:, None], u)
        sig = torch.sigmoid(z)
        dz = g * y * sig * (1 + z * (1 - sig))
        g = g * z * sig
    g_t = lay.scalars(g)
    dh = _adjoints_(lay, a, dlt, A2, torch.mul(g_t, C_l, out=_work_tensor(2, h.shape, h)), dlast)
    # ∂a_t·a_t = ∂h_t·a_t·h_{t−1}, in a's memory (free once the adjoints are done), from views of the states
    # shifted by one step and the carried-in state at each chunk's first step: no shifted copy. (h_t − b_t
    # would do without the shift, but cancels where a_t·h_{t−1} ≪ b_t, i.e. for fast-decaying states.)
    da_a = a
    if lay.steps > 1:
        da_a[1:].mul_(h[:-1])
    da_a[0].mul_(carry)
    da_a.mul_(dh)
    dC = lay.reduce_bc(h.mul_(g_t), C)                                   # ∂C_t = Σ g_t·h_t
    dA = torch.mul(da_a, dlt, out=h).sum((0, 2, 3)).t()                  # ∂A = Σ_t ∂a_t·a_t·Δ_t
    ddelta_t = torch.mul(da_a, A.t().contiguous()[None, :, None, None, :], out=h).sum(1, keepdim=True)
    dh_B = torch.mul(dh, B_l, out=h).sum(1, keepdim=True)                # Σ_n ∂h_t·B_t
    dB = lay.reduce_bc(dh.mul_(bu), B)                                   # ∂B_t = Σ ∂h_t·Δ_t·u_t
    du = lay.unscalars(dh_B * dlt)
    ddelta = lay.unscalars(ddelta_t.add_(dh_B * lay.scalars(u)))
    if D is not None:
        du.addcmul_(D[:, None], g)
        dD = (g * u).sum((0, 2))
    if delta_softplus:
        ddelta.mul_(torch.sigmoid(pre))
    return du, ddelta, dA, dB, dC, dD, dz


def selective_scan_backward(dout, dlast, u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                            order_index: torch.Tensor | None = None, chunk: int | None = None):
    """Closed-form gradients (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias) — None for absent inputs —
    by recomputing the forward states (the formulas at the top of this file).

    A block of channels at a time, in the forward's chunked layout: _states recomputes a_t and h_t, and
    _adjoints_ runs the adjoint ∂h the same two-pass way, backwards.
    """
    acc, u_, pre, delta_, B_, C_ = _inputs(u, delta, A, B, C, delta_bias, delta_softplus)
    batch, dim, length = u_.shape
    lay = ChunkLayout(batch, length, chunk, order_index, u.device)
    g, A_, D_ = dout.to(acc), A.to(acc), None if D is None else D.to(acc)
    z_ = None if z is None else z.to(acc)
    dlast_ = None if dlast is None else dlast.to(acc).permute(2, 0, 1)  # (N, b, d)
    parts = []
    for d0, d1 in _blocks_for(lay, dim, A.shape[1], B_, C_):
        raster = lambda t: None if t is None else t[:, d0:d1]  # noqa: E731   (batch, channels, L) inputs
        parts.append(_backward_block(
            lay, raster(g), None if dlast_ is None else dlast_[..., d0:d1], raster(u_), raster(pre),
            raster(delta_), A_[d0:d1], _bc_block(B_, d0, d1, dim), _bc_block(C_, d0, d1, dim),
            None if D_ is None else D_[d0:d1], raster(z_), delta_softplus))
    du_, ddelta_, dA, dB, dC, dD, dz = zip(*parts)
    du_, ddelta_, dz = (_join(p, 1) for p in (du_, ddelta_, dz))        # per channel
    dA, dD = _join(dA, 0), _join(dD, 0)
    dB, dC = (_join(p, 0 if M.dim() == 2 else 1, shared=M.dim() == 3) for p, M in ((dB, B_), (dC, C_)))
    dbias = ddelta_.sum((0, 2)) if delta_bias is not None else None
    cast = lambda grad, like: None if like is None else grad.to(like.dtype).contiguous()  # noqa: E731
    return (cast(du_, u), cast(ddelta_, delta), cast(dA, A), cast(dB, B), cast(dC, C), cast(dD, D), cast(dz, z),
            cast(dbias, delta_bias))


def _join(parts: tuple, dim: int, shared: bool = False):
    """Per-block gradients -> one: concatenated along their channel (or group) dimension, or summed for a
    B or C shared by all channels."""
    if parts[0] is None:
        return None
    if len(parts) == 1:
        return parts[0]
    return torch.stack(parts).sum(0) if shared else torch.cat(parts, dim)


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
