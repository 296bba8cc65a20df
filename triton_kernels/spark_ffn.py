"""Sparse Spark FFN inference (Spark Transformer, arXiv 2506.06644), Triton.

For a token x, predictor width r, z = Φ⁻¹(1 − density), K1 ∈ R^{f×r}, K2 ∈ R^{f×(d−r)}, Vᵀ ∈ R^{f×d}:

    p   = K1·x[:r]                                                      (kernel 1, all f neurons)
    θ   = mean(p) + z·std(p),   g = relu(p − θ)                         (statistical top-k, population std)
    a_j = GELU(g_j)·(K2_j·x[r:])        for active j (g_j > 0), else 0  (kernel 2: one K2 row per active j)
    y   = Σ_{j active} a_j·V_{:, j}                                     (kernel 3: one Vᵀ row per active j)

Kernel 3 splits d_ff when the batch is small (decode), so that enough programs share the Vᵀ rows: each
split's float32 sum goes to a workspace that a fourth small kernel adds up in split order (deterministic,
no atomics, no zero fill). The split count depends on the batch size and the GPU's SM count, so a token's
output is reproducible for a given batch size on a given GPU model, not across them (as CUDA's slices).

Rows of K2 and of Vᵀ belonging to inactive neurons are masked out of the loads, so memory traffic scales
with the density instead of with d_ff — the point of Spark's decode speedup.

θ needs every p of the token, which a grid of independent programs cannot share within a launch, so the
statistics are split: kernel 1 computes a tile of tokens (16–64) × 64 neurons of p and writes, beside it, each
token's exact mean and M2 over the tile's neurons; kernel 2 merges a token's tile moments (total mean
= count-weighted mean of the tile means, M2 = Σ M2_tile + Σ count·(mean_tile − mean)², no cancellation),
thresholds its own neurons and goes on to their dot products. That fuses the predictor and the statistical
top-k into the sparse kernels: p is written once in float32 and read once, and the gate costs no launch of
its own. `spark_ffn_sparse` is the unfused variant for a caller that already holds the gate.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from .. import _cuda
from .._alloc import new_output, new_output_like
from . import _grid
from .attention import _dot
from .stat_topk import _div, _sqrt

PREDICTOR_MAX_T = 64     # tokens per predictor tile: 16 (tl.dot's smallest M; decode pads to it) to 64, so
                         # that a prefill batch reads K1 once per 64 tokens rather than per 16
PREDICTOR_BLOCK_F = 64   # neurons per predictor tile: one partial moment pair per token and tile
# std ≤ this·|mean| counts as σ = 0: the tile means and M2 carry float32 rounding of ~16 ulp of the mean.
CONSTANT_SPREAD = tl.constexpr(1.0 / 65536)  # a constexpr global, so jit code may read it


@triton.jit
def _gelu(x):
    return 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))


@triton.jit
def _predictor_kernel(X, K1, P, MOM, tokens, r, d_ff, sx_t, sk1_f, sp_t, sm_t,
                      BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_R: tl.constexpr, IEEE: tl.constexpr):
    """P[t, f] = K1_f·x_t[:r] in float32 for a tile of tokens × neurons, and per token the tile's exact
    (mean, M2) of p over its valid neurons into MOM[t, tile, 0:2]."""
    pid_f = tl.program_id(1)
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    f = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    t_ok, f_ok = t < tokens, f < d_ff
    t64, f64 = t.to(tl.int64), f.to(tl.int64)   # tokens·d_ff can pass 2³¹ in a long prefill
    p = tl.zeros([BLOCK_T, BLOCK_F], dtype=tl.float32)
    for k0 in range(0, r, BLOCK_R):
        k = k0 + tl.arange(0, BLOCK_R)
        k_ok = k < r
        xs = tl.load(X + t64[:, None] * sx_t + k[None, :], mask=t_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(K1 + f64[None, :] * sk1_f + k[:, None], mask=k_ok[:, None] & f_ok[None, :], other=0.0)
        p = p + _dot(xs, w, IEEE)
    tl.store(P + t64[:, None] * sp_t + f64[None, :], p, mask=t_ok[:, None] & f_ok[None, :])
    count = tl.minimum(d_ff - pid_f * BLOCK_F, BLOCK_F).to(tl.float32)
    mean = _div(tl.sum(tl.where(f_ok[None, :], p, 0.0), axis=1), count, tl.float32)
    dev = tl.where(f_ok[None, :], p - mean[:, None], 0.0)
    m2 = tl.sum(dev * dev, axis=1)
    mom = MOM + t64 * sm_t + pid_f * 2
    tl.store(mom, mean, mask=t_ok)
    tl.store(mom + 1, m2, mask=t_ok)


@triton.jit
def _threshold(MOM, t, sm_t, d_ff, z, TILES: tl.constexpr, BLOCK_F: tl.constexpr):
    """θ = mean + z·std of token t's p from its predictor tiles' (mean, M2), merged in one step."""
    tile = tl.arange(0, TILES)
    n_tiles = tl.cdiv(d_ff, BLOCK_F)
    ok = tile < n_tiles
    count = tl.where(ok, tl.minimum(d_ff - tile * BLOCK_F, BLOCK_F), 0).to(tl.float32)
    means = tl.load(MOM + t * sm_t + tile * 2, mask=ok, other=0.0)
    m2s = tl.load(MOM + t * sm_t + tile * 2 + 1, mask=ok, other=0.0)
    n = tl.zeros([], dtype=tl.float32) + d_ff   # d_ff may arrive as a constexpr 1: no .to()
    mean = _div(tl.sum(count * means, axis=0), n, tl.float32)
    spread = tl.where(ok, means - mean, 0.0)
    m2 = tl.sum(m2s, axis=0) + tl.sum(count * spread * spread, axis=0)
    std = _sqrt(_div(m2, n, tl.float32), tl.float32)
    # A spread at the level of float32 rounding of the mean is a constant predictor (σ = 0, as the reference
    # computes it exactly): nothing is active, rather than a rounding-level θ below the constant.
    return tl.where(std <= CONSTANT_SPREAD * tl.abs(mean), float("inf"), mean + z * std)


@triton.jit
def _theta_kernel(MOM, THETA, d_ff, z, sm_t, TILES: tl.constexpr, PREDICTOR_F: tl.constexpr):
    """THETA[t] = θ of token t, once per token (prefill), instead of in every program of the token."""
    t = tl.program_id(0).to(tl.int64)
    tl.store(THETA + t, _threshold(MOM, t, sm_t, d_ff, z, TILES, PREDICTOR_F))


@triton.jit
def _active_values_kernel(X, G, MOM, K2, A, r, d_model, d_ff, z, sx_t, sg_t, sm_t, sk2_f, sa_t,
                          BLOCK_F: tl.constexpr, BLOCK_K: tl.constexpr,
                          THRESHOLD: tl.constexpr, TILES: tl.constexpr, PREDICTOR_F: tl.constexpr,
                          THETA_READY: tl.constexpr):
    """A[t, f] = GELU(g)·(K2_f·x_t[r:]) for the active neurons of a block, 0 for the others. G holds the
    gate g, or with THRESHOLD the float32 predictor p, which is thresholded here (θ from MOM) and
    overwritten by its gate relu(p − θ) (each program owns its block of G)."""
    t = tl.program_id(0).to(tl.int64)  # tokens·d_ff can pass 2³¹ in a long prefill
    f = tl.program_id(1).to(tl.int64) * BLOCK_F + tl.arange(0, BLOCK_F)
    f_ok = f < d_ff
    g = tl.load(G + t * sg_t + f, mask=f_ok, other=0.0).to(tl.float32)
    if THRESHOLD:
        if THETA_READY:  # MOM holds θ per token (_theta_kernel)
            theta = tl.load(MOM + t)
        else:
            theta = _threshold(MOM, t, sm_t, d_ff, z, TILES, PREDICTOR_F)
        g = tl.maximum(g - theta, 0.0)
        tl.store(G + t * sg_t + f, g, mask=f_ok)
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
def _project_kernel(A, VT, Y, PARTIAL, d_model, d_ff, split_size, sa_t, svt_f, sy_t, sp_t,
                    BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr, SPLIT: tl.constexpr):
    """Y[t, d] = Σ_f A[t, f]·VT[f, d] over the active f of one split of d_ff (program axis 2). With SPLIT
    the split's float32 sum goes to PARTIAL[t, split, d] for _sum_splits_kernel; else straight to Y."""
    t = tl.program_id(0).to(tl.int64)  # tokens·d_ff can pass 2³¹ in a long prefill
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    split = tl.program_id(2)
    d_ok = d < d_model
    f_begin = split.to(tl.int64) * split_size
    f_end = tl.minimum(f_begin + split_size, d_ff)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for f0 in range(f_begin, f_end, BLOCK_F):
        f = f0 + tl.arange(0, BLOCK_F)
        a = tl.load(A + t * sa_t + f, mask=f < f_end, other=0.0)
        rows = tl.load(VT + f[:, None] * svt_f + d[None, :], mask=(a != 0.0)[:, None] & d_ok[None, :], other=0.0)
        acc += tl.sum(rows.to(tl.float32) * a[:, None], axis=0)
    if SPLIT:
        tl.store(PARTIAL + (t * tl.num_programs(2) + split) * sp_t + d, acc, mask=d_ok)
    else:
        tl.store(Y + t * sy_t + d, acc.to(Y.dtype.element_ty), mask=d_ok)


@triton.jit
def _sum_splits_kernel(PARTIAL, Y, splits, d_model, sp_t, sy_t, BLOCK_D: tl.constexpr):
    """Y[t, d] = Σ_split PARTIAL[t, split, d], in split order (deterministic), rounded once."""
    t = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < d_model
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for s in range(0, splits):
        acc += tl.load(PARTIAL + (t * splits + s) * sp_t + d, mask=d_ok, other=0.0)
    tl.store(Y + t * sy_t + d, acc.to(Y.dtype.element_ty), mask=d_ok)


THETA_TOKENS = 16      # from this many tokens on, θ gets a launch of its own (_theta_kernel)
PROJECT_BLOCK_F = 64
MIN_SPLIT = 256        # neurons per split at least: four BLOCK_F steps, so a split is worth its partial row


def project_splits(tokens: int, d_model: int, d_ff: int, device: torch.device) -> int:
    """Splits of d_ff for the projection: at decode, tokens × d_model/128 programs alone leave most of the GPU
    idle (8 programs for one token at d_model 1024), each walking all of d_ff; so d_ff is split until there
    are ~4 programs per SM, each split at least MIN_SPLIT neurons. 1 once the batch fills the GPU."""
    sms = _cuda.multiprocessor_count(device)
    programs = tokens * triton.cdiv(d_model, 128)
    return max(1, min(triton.cdiv(4 * sms, max(1, programs)), triton.cdiv(d_ff, MIN_SPLIT)))


def split_plan(d_ff: int, splits: int) -> tuple[int, int]:
    """(split_size, splits) for about `splits` splits of d_ff ≥ 1: whole BLOCK_F steps per split, recounted
    so that no split is empty."""
    if splits < 1 or d_ff < 1:
        raise ValueError(f"spark_ffn (triton): need d_ff >= 1 and splits >= 1, got d_ff={d_ff}, splits={splits}")
    return _grid.split_range(d_ff, splits, PROJECT_BLOCK_F)


def _active_and_project(x, gate, moments, K2, VT, r, z, threshold, splits=None):
    tokens, d_model = x.shape
    d_ff = gate.shape[1]
    a = new_output((tokens, d_ff), torch.float32, x.device)
    block_f, block_k = 64, min(128, triton.next_power_of_2(max(d_model - r, 16)))
    tiles = triton.next_power_of_2(triton.cdiv(d_ff, PREDICTOR_BLOCK_F))
    # Every program of a token needs its θ. Merging the tile moments in each of them reads tiles² pairs per
    # token, nothing at decode but ~0.5 MB per token at d_ff 16384; from THETA_TOKENS tokens on, one more
    # launch computes θ once per token.
    theta_ready = threshold and tokens >= THETA_TOKENS
    if theta_ready:
        theta = new_output((tokens,), torch.float32, x.device)
        _theta_kernel[(tokens,)](moments, theta, d_ff, z, moments.stride(0), TILES=tiles,
                                 PREDICTOR_F=PREDICTOR_BLOCK_F)
        moments = theta
    _active_values_kernel[(tokens, triton.cdiv(d_ff, block_f))](
        x, gate, moments, K2, a, r, d_model, d_ff, z, x.stride(0), gate.stride(0), moments.stride(0),
        K2.stride(0), a.stride(0), BLOCK_F=block_f, BLOCK_K=block_k, THRESHOLD=threshold, TILES=tiles,
        PREDICTOR_F=PREDICTOR_BLOCK_F, THETA_READY=theta_ready)
    y = new_output_like(x)
    block_d = min(128, triton.next_power_of_2(d_model))
    split_size, splits = split_plan(d_ff, project_splits(tokens, d_model, d_ff, x.device) if splits is None else splits)
    # scratch, fully written by the projection before the sum reads it
    partial = torch.empty((tokens, splits, d_model), dtype=torch.float32, device=x.device) if splits > 1 else y
    _project_kernel[(tokens, triton.cdiv(d_model, block_d), splits)](
        a, VT, y, partial, d_model, d_ff, split_size, a.stride(0), VT.stride(0), y.stride(0), partial.stride(1),
        BLOCK_F=PROJECT_BLOCK_F, BLOCK_D=block_d, SPLIT=splits > 1)
    if splits > 1:
        _sum_splits_kernel[(tokens, triton.cdiv(d_model, block_d))](
            partial, y, splits, d_model, partial.stride(1), y.stride(0), BLOCK_D=block_d)
    return y


def spark_ffn_sparse(x: torch.Tensor, gate: torch.Tensor, K2: torch.Tensor, VT: torch.Tensor, r: int, *,
                     splits: int | None = None) -> torch.Tensor:
    """x (tokens, d_model), gate (tokens, d_ff) = relu(predictor − θ), K2 (d_ff, d_model − r),
    VT (d_ff, d_model) = Vᵀ contiguous -> y (tokens, d_model). `splits` overrides project_splits (tests)."""
    return _active_and_project(x, gate, gate, K2, VT, r, 0.0, threshold=False, splits=splits)


def spark_ffn_fused(x: torch.Tensor, K1: torch.Tensor, K2: torch.Tensor, VT: torch.Tensor, z: float, *,
                    splits: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole sparse FFN from x (tokens, d_model), K1 (d_ff, r), K2, VT as above and z = Φ⁻¹(1 − density)
    -> (y (tokens, d_model), gate (tokens, d_ff) float32 = relu(p − θ)). Rows with unit last stride."""
    tokens = x.shape[0]
    d_ff, r = K1.shape
    gate = new_output((tokens, d_ff), torch.float32, x.device)      # p, then the gate, in place
    tiles = triton.cdiv(d_ff, PREDICTOR_BLOCK_F)
    moments = new_output((tokens, tiles, 2), torch.float32, x.device)
    if tokens:
        block_t = min(PREDICTOR_MAX_T, max(16, triton.next_power_of_2(tokens)))
        _predictor_kernel[(triton.cdiv(tokens, block_t), tiles)](
            x, K1, gate, moments, tokens, r, d_ff, x.stride(0), K1.stride(0), gate.stride(0), moments.stride(0),
            BLOCK_T=block_t, BLOCK_F=PREDICTOR_BLOCK_F, BLOCK_R=min(64, max(16, triton.next_power_of_2(r))),
            IEEE=x.dtype == torch.float32)
        return _active_and_project(x, gate, moments, K2, VT, r, z, threshold=True, splits=splits), gate
    return new_output_like(x), gate
