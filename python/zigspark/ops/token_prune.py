"""HiPrune token selection (arXiv 2508.00553) and the gather that follows, batched.

For each sample with N = h·w patch tokens in raster order, a budget `keep`, and two attention-received
score vectors (a middle "object" layer and a deep layer):

    n_anchor = max(1, round(keep·alpha / 5))
    anchors  = the n_anchor tokens with the highest obj_scores
    buffers  = the 4-neighbours (up, down, left, right) of every anchor inside the grid — no neighbour
               across a left/right edge (wrap_rows=True: the official code's flat ±1 / ±w, clamped to [0, N−1])
    registers = the highest deep_scores among the rest, filling the budget to exactly `keep`

Tokens are taken by priority until the budget is full: `always_keep` (all of them), anchors (by
obj score), buffers (by their anchor's rank, then up, down, left, right), registers (by deep score). All
ties go to the lower index, so the selection is deterministic. The result is sorted ascending.

Baselines with the same interface: strategy="attention" keeps the `keep` highest deep_scores (FastV /
EViT-style), strategy="random" a uniform random subset; both keep `always_keep` first as well.
`always_keep` is a 1-D index list shared by the batch, or a (batch, m) tensor with one list per sample,
padded with −1 where samples keep different numbers of tokens; repeated indices count once against the
budget, and every sample's distinct ones must fit in it.

Backends: reference (vectorised PyTorch), Triton (one fused program per sample, N ≤ 4096) and CUDA
(csrc/token_prune: one block per sample, radix select instead of sorts, any N; float32/16/bf16 scores). The
baselines always run in PyTorch. The selection is the custom op zigspark::hiprune_select (its value checks
run inside it, so a caller compiles with fullgraph=True). prune_tokens (zigspark::prune_tokens_fwd / _bwd)
runs index_select and scatter_add on the reference backend, and gather/scatter kernels on the Triton and
cuda backends (CUDA: 16-byte row copies; both backwards add into zeros with atomics, since indices may
repeat). For prune_tokens, `auto` keeps the reference first until a benchmark shows a kernel ahead;
hiprune_select follows the usual order (cuda, triton, reference).
"""

from __future__ import annotations

import numbers
from typing import Optional

import torch

from .. import backends
from ..validation import check_float_tensor, check_same_device, is_finite_real

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
backends.register_op("hiprune_select", {"reference": _DTYPES, "triton": _DTYPES[:3], "cuda": _DTYPES[:3]},
                     size_key="N")
backends.register_op("prune_tokens", {"reference": _DTYPES, "triton": _DTYPES, "cuda": _DTYPES}, size_key="N")
STRATEGIES = ("hiprune", "attention", "random")
TRITON_MAX_N = 4096  # one program holds the sample; beyond this ptxas spills (ahead-of-time compile, sm_90)


def _descending_rank(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, rank): order[b, i] = index of the i-th highest score (ties: lower index first)."""
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    return order, rank


def _neighbours(anchors: torch.Tensor, h: int, w: int, wrap_rows: bool):
    """[(index, valid)] for up, down, left, right of every anchor."""
    n = h * w
    if wrap_rows:
        return [((anchors + step).clamp(0, n - 1), torch.ones_like(anchors, dtype=torch.bool))
                for step in (-w, w, -1, 1)]
    r, c = anchors // w, anchors % w
    return [(anchors - w, r > 0), (anchors + w, r < h - 1), (anchors - 1, c > 0), (anchors + 1, c < w - 1)]


def hiprune_select(obj_scores, deep_scores, grid, keep, *, alpha=0.1, wrap_rows=False, always_keep=None,
                   strategy="hiprune", generator=None, backend="auto"):
    """Indices of the tokens to keep, (batch, keep) int64, ascending (rule in the module docstring).

    Args:
        obj_scores, deep_scores: (batch, N) attention received at the object and the deep layer (e.g. from
            zigspark.attention_received), N = h·w.
        grid: (h, w).  keep: tokens to keep, 1 ≤ keep ≤ N.  alpha: anchor share (paper: 0.1).
        always_keep: indices kept first (the distinct ones count against the budget), e.g. register/CLS
            tokens mapped by the caller: 1-D, shared by every sample, or (batch, m), one row per sample; in
            a tensor −1 entries are padding (a flat list with a negative index is refused: it would not
            count from the end).
        strategy: "hiprune" | "attention" | "random".  generator: for "random".
    """
    check_float_tensor("obj_scores", obj_scores, _DTYPES)
    check_float_tensor("deep_scores", deep_scores, _DTYPES)
    if obj_scores.dim() != 2 or deep_scores.shape != obj_scores.shape:
        raise ValueError(f"obj_scores and deep_scores must both be (batch, N), got {tuple(obj_scores.shape)} and "
                         f"{tuple(deep_scores.shape)}")
    batch, n = obj_scores.shape
    h, w = _check_grid(grid)
    if h * w != n:
        raise ValueError(f"grid {(h, w)} has {h * w} tokens but the scores have N = {n}")
    if isinstance(keep, bool) or not isinstance(keep, int) or not 1 <= keep <= n:
        raise ValueError(f"keep must be an int with 1 <= keep <= N = {n}, got {keep!r}")
    _check_alpha(alpha)
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    device = check_same_device(obj_scores=obj_scores, deep_scores=deep_scores)
    # the kernels read both rows in one dtype: the wider of the two decides what a backend must support
    chosen = backends.resolve("hiprune_select", backend, device, torch.promote_types(obj_scores.dtype,
                                                                                      deep_scores.dtype))
    always = None if always_keep is None else _as_always(always_keep, batch, n, device)

    if strategy in ("random", "attention"):
        # the baselines run in PyTorch, outside the op: they check always_keep here
        always = None if always is None else _unique_always(always, n, keep)
        if strategy == "random":
            noise = torch.rand(batch, n, generator=generator,
                               device="cpu" if generator is None else generator.device).to(device)
            if always is None:
                return torch.sort(torch.topk(noise, keep, dim=1).indices, dim=1).values
            rank = _descending_rank(noise)[1]
        else:
            _check_finite(obj_scores, deep_scores)
            rank = _descending_rank(deep_scores)[1]
        return _keep_by_key(rank + n, always, keep)  # ranks + n: above the always_keep keys 0..n-1

    n_anchor = min(n, max(1, round(keep * alpha / 5)))
    if chosen == "triton" and n > TRITON_MAX_N:
        if backend != "auto":
            raise ValueError(f"hiprune_select: N = {n} is larger than the triton kernel's {TRITON_MAX_N} tokens; "
                             "use backend='reference'")
        chosen = "reference"
        backends.record("hiprune_select", chosen)
    return hiprune_select_op(obj_scores, deep_scores, h, w, keep, n_anchor, wrap_rows, always, chosen)


def _check_grid(grid) -> tuple[int, int]:
    """(h, w) as ints; non-positive sides get their own message (their product can match N, e.g. (-3, -4))."""
    try:
        h, w = grid
    except (TypeError, ValueError):
        raise ValueError(f"grid must be a pair (h, w) of patch rows and columns, got {grid!r}") from None
    if any(isinstance(s, bool) or not isinstance(s, (numbers.Integral, torch.SymInt)) or s < 1 for s in (h, w)):
        raise ValueError(f"grid must be (h, w) with positive int sides, got {tuple(grid)!r}")
    return tuple(int(s) if isinstance(s, numbers.Integral) else s for s in (h, w))


def _check_alpha(alpha) -> None:
    """alpha >= 0 and finite: round(keep·alpha/5) fails on NaN / inf with an error that does not name alpha."""
    if not is_finite_real(alpha) or alpha < 0:
        raise ValueError(f"alpha (the anchor share of the budget) must be a finite number >= 0, got {alpha!r}; "
                         "the paper uses 0.1")


def _as_always(always_keep, batch: int, n: int, device) -> torch.Tensor:
    """always_keep as an int64 (1, m) (shared) or (batch, m) (per sample) tensor; values are checked later,
    inside the op, where they are. A flat Python list is checked here: a negative index in it is more likely
    meant to count from the end, as Python's do, than to be padding."""
    if isinstance(always_keep, (list, tuple)) and any(isinstance(i, numbers.Integral) and not isinstance(i, bool)
                                                     and i < 0 for i in always_keep):
        raise ValueError(f"always_keep indices must be in [0, {n}), got {list(always_keep)}: negative indices do not "
                         f"count from the end here (-1 is the padding of per-sample rows); write {n - 1} for the "
                         "last token")
    always = torch.as_tensor(always_keep, device=device)
    if always.numel() and (always.dtype == torch.bool or always.is_floating_point() or always.is_complex()):
        raise TypeError(f"always_keep must hold integer token indices, got {always.dtype}")
    if always.dim() <= 1:
        return always.long().reshape(1, -1)
    if always.dim() == 2 and always.shape[0] in (1, batch):
        return always.long()
    raise ValueError(f"always_keep must be 1-D indices shared by every sample or (batch, m) = ({batch}, m) with one "
                     f"row per sample (-1 pads a row), got shape {tuple(always.shape)}")


def _unique_always(always: torch.Tensor, n: int, keep: int) -> Optional[torch.Tensor]:
    """(rows, m) always_keep (rows 1: shared) checked against N and deduplicated per row -> (rows, m') with
    each row's distinct indices first and −1 after them, m' the largest distinct count, or None when no row
    keeps anything. Only distinct indices count against the budget; their order does not matter: all of them
    are kept, ahead of every other tier."""
    always = always.reshape(1, -1) if always.dim() == 1 else always
    if always.numel() and (always.min() < -1 or always.max() >= n):
        bad = always[(always < -1) | (always >= n)]
        raise ValueError(f"always_keep indices must be in [0, {n}) (-1 entries are padding), got "
                         f"{bad.unique().tolist()[:8]}")
    ordered = torch.sort(always, dim=1, descending=True).values   # -1 padding last, repeats adjacent
    repeat = torch.zeros_like(ordered, dtype=torch.bool)
    repeat[:, 1:] = ordered[:, 1:] == ordered[:, :-1]
    ordered = torch.where(repeat, -1, ordered)
    ordered = torch.sort(ordered, dim=1, descending=True).values
    counts = (ordered >= 0).sum(dim=1)
    most = int(counts.max()) if counts.numel() else 0
    if most > keep:
        row = int(counts.argmax())
        where = "" if always.shape[0] == 1 else f" in sample {row}"
        raise ValueError(f"always_keep has {most} distinct indices{where} but keep is {keep}; raise keep or pass "
                         "fewer always_keep indices")
    return ordered[:, :most].contiguous() if most else None


def _keep_by_key(key: torch.Tensor, always: Optional[torch.Tensor], keep: int) -> torch.Tensor:
    """The keep tokens with the smallest key, ascending. always_keep ((rows, m), −1 padded) get the keys
    0..m-1, so the caller's keys must all be >= N for them to come first."""
    if always is not None and always.numel():
        batch = key.shape[0]
        always = always.expand(batch, -1)
        slot = torch.arange(always.shape[1], device=key.device).expand(batch, -1)
        # padding scatters the largest key into token 0, which leaves token 0's own key as it was
        key = key.scatter_reduce(1, always.clamp(min=0), torch.where(always >= 0, slot, torch.iinfo(key.dtype).max),
                                 reduce="amin")
    kept = torch.sort(key, dim=1, stable=True).indices[:, :keep]
    return torch.sort(kept, dim=1).values


def _check_finite(obj_scores, deep_scores):
    if torch.isnan(obj_scores).any() or torch.isnan(deep_scores).any():
        raise ValueError("obj_scores / deep_scores contain NaN; scores must be finite (check the attention maps)")


@torch.library.custom_op("zigspark::hiprune_select", mutates_args=())
def hiprune_select_op(obj_scores: torch.Tensor, deep_scores: torch.Tensor, h: int, w: int, keep: int,
                      n_anchor: int, wrap_rows: bool, always: Optional[torch.Tensor], backend: str) -> torch.Tensor:
    """The HiPrune selection (module docstring) -> (batch, keep) int64 ascending. The value checks (NaN
    scores, always_keep in range) live here, where the values are, so that callers can be compiled."""
    _check_finite(obj_scores, deep_scores)
    batch, n = obj_scores.shape
    if always is not None:
        if always.dim() == 2 and always.shape[0] not in (1, batch):
            raise ValueError(f"always_keep has {always.shape[0]} rows but the batch is {batch}; give one row per "
                             "sample or one shared row")
        always = _unique_always(always, n, keep)
    if backend == "cuda":
        from ..cuda_ops.token_prune import hiprune_select as kernel

        return kernel(obj_scores, deep_scores, (h, w), keep, n_anchor, wrap_rows, always)
    if backend == "triton":
        from ..triton_kernels.token_prune import hiprune_select as kernel

        return kernel(obj_scores, deep_scores, (h, w), keep, n_anchor, wrap_rows, always)

    # priority key per token: tier·stride + rank inside the tier; the keep smallest keys win
    device = obj_scores.device
    stride = 4 * n + 4
    _, deep_rank = _descending_rank(deep_scores)
    key = 3 * stride + deep_rank                                           # registers
    anchors = _descending_rank(obj_scores)[0][:, :n_anchor]
    anchor_rank = torch.arange(n_anchor, device=device).expand(batch, -1)
    for direction, (idx, valid) in enumerate(_neighbours(anchors, h, w, wrap_rows)):
        value = torch.where(valid, 2 * stride + 4 * anchor_rank + direction, torch.full_like(idx, 4 * stride))
        key = key.scatter_reduce(1, torch.where(valid, idx, anchors), value, reduce="amin")
    key = key.scatter_reduce(1, anchors, stride + anchor_rank, reduce="amin")
    return _keep_by_key(key, always, keep)


@hiprune_select_op.register_fake
def _(obj_scores, deep_scores, h, w, keep, n_anchor, wrap_rows, always, backend):
    return obj_scores.new_empty((obj_scores.shape[0], keep), dtype=torch.int64)


@torch.library.custom_op("zigspark::prune_tokens_fwd", mutates_args=())
def prune_tokens_fwd(x: torch.Tensor, keep_idx: torch.Tensor, backend: str) -> torch.Tensor:
    """(batch, N, C), (batch, keep) int64 -> (batch, keep, C): out[b, j] = x[b, keep_idx[b, j]]."""
    if backend != "reference":
        return backends.kernels(backend, "token_prune").prune_tokens_fwd(x, keep_idx)
    # whole rows by index_select on (batch·N, C): 6x faster on CPU than torch.gather's element-wise index
    batch, tokens, channels = x.shape
    rows = (keep_idx + torch.arange(batch, device=x.device)[:, None] * tokens).reshape(-1)
    return x.reshape(batch * tokens, channels).index_select(0, rows).view(batch, keep_idx.shape[1], channels)


@prune_tokens_fwd.register_fake
def _(x, keep_idx, backend):
    return x.new_empty((x.shape[0], keep_idx.shape[1], x.shape[2]))


@torch.library.custom_op("zigspark::prune_tokens_bwd", mutates_args=())
def prune_tokens_bwd(grad_out: torch.Tensor, keep_idx: torch.Tensor, tokens: int, backend: str) -> torch.Tensor:
    """grad_x (batch, tokens, C): the kept rows' gradients added back at their indices, zeros elsewhere."""
    if backend != "reference":
        return backends.kernels(backend, "token_prune").prune_tokens_bwd(grad_out, keep_idx, tokens, unique=False)
    grad_x = grad_out.new_zeros((grad_out.shape[0], tokens, grad_out.shape[2]))
    return grad_x.scatter_add_(1, keep_idx[..., None].expand(-1, -1, grad_out.shape[2]), grad_out)


@prune_tokens_bwd.register_fake
def _(grad_out, keep_idx, tokens, backend):
    return grad_out.new_empty((grad_out.shape[0], tokens, grad_out.shape[2]))


def _prune_setup(ctx, inputs, output):
    x, keep_idx, backend = inputs
    ctx.save_for_backward(keep_idx)
    ctx.tokens, ctx.backend = x.shape[1], backend


def _prune_backward(ctx, grad_out):
    (keep_idx,) = ctx.saved_tensors
    return prune_tokens_bwd(grad_out.contiguous(), keep_idx, ctx.tokens, ctx.backend), None, None


prune_tokens_fwd.register_autograd(_prune_backward, setup_context=_prune_setup)


def prune_tokens(x: torch.Tensor, keep_idx: torch.Tensor, positions: torch.Tensor | None = None, *,
                 backend: str = "auto"):
    """Gather the kept tokens: x (batch, N, C) -> (batch, keep, C) (and positions (batch or 1, N, P) the
    same way, by torch.gather). Differentiable: the backward scatters the gradient back to the kept rows
    (adding where an index repeats)."""
    if x.dim() != 3:
        raise ValueError(f"x must be (batch, N, C), got shape {tuple(x.shape)}")
    if keep_idx.dim() != 2 or keep_idx.shape[0] != x.shape[0] or keep_idx.dtype != torch.int64:
        raise ValueError(f"keep_idx must be an int64 (batch, keep) tensor with batch {x.shape[0]}, got "
                         f"{keep_idx.dtype} {tuple(keep_idx.shape)}")
    if keep_idx.numel() and (keep_idx.min() < 0 or keep_idx.max() >= x.shape[1]):
        raise ValueError(f"keep_idx must be in [0, {x.shape[1]})")
    check_same_device(x=x, keep_idx=keep_idx)
    if x.is_floating_point():
        chosen = backends.resolve("prune_tokens", backend, x.device, x.dtype, size=x.shape[1])
        out = prune_tokens_fwd(x, keep_idx, chosen)
    else:  # integer features (no gradient): torch.gather
        out = torch.gather(x, 1, keep_idx[..., None].expand(-1, -1, x.shape[2]))
    if positions is None:
        return out
    if not isinstance(positions, torch.Tensor):
        raise TypeError(f"positions must be a torch.Tensor, got {type(positions).__name__}")
    # (batch or 1, N, P): one row per token, gathered like x; a (batch, N) tensor needs its P axis
    if (positions.dim() != 3 or positions.shape[0] not in (1, x.shape[0]) or positions.shape[1] != x.shape[1]):
        raise ValueError(f"positions must be (batch or 1, N, P) = ({x.shape[0]} or 1, {x.shape[1]}, P) like x, got "
                         f"shape {tuple(positions.shape)}; add a trailing axis to (batch, N) positions with "
                         "positions[..., None]")
    check_same_device(x=x, positions=positions)
    pos = positions.expand(x.shape[0], -1, -1)
    return out, torch.gather(pos, 1, keep_idx[..., None].expand(-1, -1, pos.shape[2]))
