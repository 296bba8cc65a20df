"""HiPrune token selection (arXiv 2508.00553) fused into one Triton program per sample.

The rule is python/zigspark/ops/token_prune.py's: tokens are taken by priority until `keep` are chosen —
always_keep, then anchors (highest obj score), then the anchors' in-grid 4-neighbours (or the official flat
±1/±w, clamped, with WRAP), then registers (highest deep score among the rest); ties go to the lower index.

Anchors and buffers are few (n_anchor = round(keep·alpha/5)), so they are taken one at a time with argmax
reductions. Registers are many: the need-th largest deep score is found without sorting by a 32-step
bisection over the order-preserving integer image of the float32 scores, then ties at that value are
resolved by index with a cumulative sum. The chosen mask is compacted into ascending indices the same way.

The gather that follows, out[b, j] = x[b, index[b, j]], copies one kept row per program (a block of
channels at a time, any strides); its backward adds each row of the gradient back at its index into zeros,
with plain stores when the indices are unique within each sample (hiprune_select's are) and atomic adds
otherwise — in float32 for 16-bit gradients, rounded once at the end, so repeats do not round per add.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._alloc import new_output


@triton.jit
def _take(selected, count, keep, idx, candidate):
    """Select token `candidate` (a scalar index, or -1 for none) if it is new and the budget allows."""
    new = (candidate >= 0) & (count < keep) & (tl.sum(tl.where((idx == candidate) & selected, 1, 0), axis=0) == 0)
    selected = selected | ((idx == candidate) & new)
    return selected, count + tl.where(new, 1, 0)


@triton.jit
def _hiprune_kernel(OBJ, DEEP, ALWAYS, OUT, N, keep, n_always, always_stride, n_anchor, h, w,
                    WRAP: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    idx = tl.arange(0, BLOCK)
    valid = idx < N
    obj = tl.load(OBJ + b * N + idx, mask=valid, other=float("-inf")).to(tl.float32)
    deep = tl.load(DEEP + b * N + idx, mask=valid, other=float("-inf")).to(tl.float32)
    selected = idx < 0
    count = tl.sum(tl.where(selected, 1, 0), axis=0)

    for a in range(0, n_always):  # -1 pads a per-sample row: _take skips it
        selected, count = _take(selected, count, keep, idx, tl.load(ALWAYS + b * always_stride + a).to(tl.int32))

    # anchors, by obj score (ties: lower index); their rank is kept so the buffers can follow the same order
    anchor_rank = tl.full([BLOCK], BLOCK, tl.int32)
    for j in range(0, n_anchor):
        masked = tl.where(valid & (anchor_rank == BLOCK), obj, float("-inf"))
        best = tl.max(masked, axis=0)
        anchor = tl.min(tl.where(valid & (anchor_rank == BLOCK) & (masked == best), idx, BLOCK), axis=0)
        anchor_rank = tl.where(idx == anchor, j, anchor_rank)
        selected, count = _take(selected, count, keep, idx, anchor)
    # buffers: the anchors in rank order, four neighbours each
    for j in range(0, n_anchor):
        anchor = tl.min(tl.where(anchor_rank == j, idx, BLOCK), axis=0)
        r = anchor // w
        c = anchor % w
        for direction in tl.static_range(4):
            if direction == 0:
                cand, ok = anchor - w, r > 0
            elif direction == 1:
                cand, ok = anchor + w, r < h - 1
            elif direction == 2:
                cand, ok = anchor - 1, c > 0
            else:
                cand, ok = anchor + 1, c < w - 1
            if WRAP:
                cand = tl.minimum(tl.maximum(cand, 0), N - 1)
                ok = cand >= 0
            selected, count = _take(selected, count, keep, idx, tl.where(ok, cand, -1))

    # registers: the `need` highest deep scores among the rest
    need = keep - count
    cand = valid & ~selected
    bits = deep.to(tl.int32, bitcast=True)
    bits = tl.where(bits == -2147483648, 0, bits)  # -0.0 ties with +0.0, as in the reference's sort
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64)   # order-preserving image of the float
    lo = tl.full([], -2147483648, tl.int64)
    hi = tl.full([], 2147483647, tl.int64)
    for _ in range(33):  # largest t with count(key >= t) >= need
        mid = (lo + hi + 1) // 2
        enough = tl.sum(tl.where(cand & (key >= mid), 1, 0), axis=0) >= need
        lo = tl.where(enough, mid, lo)
        hi = tl.where(enough, hi, mid - 1)
    above = cand & (key > lo)
    ties = cand & (key == lo)
    rest = need - tl.sum(tl.where(above, 1, 0), axis=0)
    tie_rank = tl.cumsum(tl.where(ties, 1, 0), axis=0)
    take = above | (ties & (tie_rank <= rest))
    selected = selected | tl.where(need > 0, take, idx < 0)

    position = tl.cumsum(tl.where(selected, 1, 0), axis=0) - 1
    tl.store(OUT + b * keep + position, idx.to(tl.int64), mask=selected)


def hiprune_select(obj_scores, deep_scores, grid, keep, n_anchor, wrap_rows, always_keep):
    """always_keep: None, or (1 or batch, m) int64 rows (shared or per sample), -1 padded, deduplicated."""
    batch, n = obj_scores.shape
    out = new_output((batch, keep), torch.int64, obj_scores.device)
    always = (always_keep if always_keep is not None else torch.empty(1, 0, dtype=torch.int64)).to(
        device=obj_scores.device, dtype=torch.int64).contiguous()
    always_stride = always.shape[1] if always.shape[0] > 1 else 0
    block = max(16, triton.next_power_of_2(n))
    _hiprune_kernel[(batch,)](obj_scores.contiguous(), deep_scores.contiguous(), always if always.numel() else out,
                              out, n, keep, always.shape[1], always_stride, n_anchor, grid[0], grid[1],
                              WRAP=bool(wrap_rows), BLOCK=block, num_warps=min(16, max(4, block // 256)))
    return out


@triton.jit
def _gather_rows_kernel(X, INDEX, OUT, keep, channels, stride_xb, stride_xn, stride_xc,
                        BLOCK_C: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)                  # b·keep + j
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    inside = cols < channels
    src = tl.load(INDEX + row)
    values = tl.load(X + (row // keep) * stride_xb + src * stride_xn + cols * stride_xc, mask=inside)
    tl.store(OUT + row * channels + cols, values, mask=inside)


@triton.jit
def _scatter_rows_kernel(GRAD, INDEX, GRAD_X, keep, tokens, channels, stride_gb, stride_gk, stride_gc,
                         UNIQUE: tl.constexpr, BLOCK_C: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    inside = cols < channels
    b = row // keep
    dst = tl.load(INDEX + row)
    g = tl.load(GRAD + b * stride_gb + (row - b * keep) * stride_gk + cols * stride_gc, mask=inside)
    target = GRAD_X + (b * tokens + dst) * channels + cols
    if UNIQUE:
        tl.store(target, g.to(GRAD_X.dtype.element_ty), mask=inside)
    else:
        tl.atomic_add(target, g.to(GRAD_X.dtype.element_ty), mask=inside)


def _row_launch(rows: int, channels: int):
    block = min(1024, max(16, triton.next_power_of_2(channels)))
    return (rows, triton.cdiv(channels, block)), dict(BLOCK_C=block, num_warps=4 if block >= 512 else 1)


def prune_tokens_fwd(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (batch, N, C), any strides; index (batch, keep) in [0, N) -> (batch, keep, C) contiguous."""
    batch, _, channels = x.shape
    keep = index.shape[1]
    out = new_output((batch, keep, channels), x.dtype, x.device)
    if out.numel():
        grid, meta = _row_launch(batch * keep, channels)
        _gather_rows_kernel[grid](x, index.contiguous(), out, keep, channels, *x.stride(), **meta)
    return out


def prune_tokens_bwd(grad_out: torch.Tensor, index: torch.Tensor, tokens: int, unique: bool = False) -> torch.Tensor:
    """grad_out (batch, keep, C) -> grad_x (batch, tokens, C): grad_x[b, index[b, j]] += grad_out[b, j], zeros
    elsewhere. unique=True promises each index at most once per sample (plain stores)."""
    batch, keep, channels = grad_out.shape
    wide = grad_out.dtype in (torch.float16, torch.bfloat16) and not unique
    grad_x = torch.zeros(batch, tokens, channels, device=grad_out.device,
                         dtype=torch.float32 if wide else grad_out.dtype)
    if grad_out.numel():
        grid, meta = _row_launch(batch * keep, channels)
        _scatter_rows_kernel[grid](grad_out, index.contiguous(), grad_x, keep, tokens, channels, *grad_out.stride(),
                                   UNIQUE=bool(unique), **meta)
    return grad_x.to(grad_out.dtype) if wide else grad_x
