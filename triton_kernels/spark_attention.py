"""Spark attention (Spark Transformer, arXiv 2506.06644), fused Triton forward and backward.

Layout (batch, seqlen, heads, head_dim), last dimension contiguous. Per head, q and k split at r (the
predictor dims) and the rest e = D − r; a and c scale them (1/√r and 1/√e unless the op is given
predictor_scale, gate_scale); key j is visible to query i when
j ≤ i + S_k − S_q (causal, bottom-right aligned) or always (non-causal); n_i keys are visible.

    s1_ij = a·q_i[:r]·k_j[:r]                  s2_ij = c·q_i[r:]·k_j[r:]
    θ_i   = μ_i + σ_i·z_i,  z_i = Φ⁻¹(1 − top_k/n_i)·√(n_i/(n_i − std_correction))   (μ, σ: mean and
            population std of s1 over the visible keys, so that σ·z is the corrected std's; θ_i = −∞,
            every visible key kept, when n_i ≤ top_k (z_i = −∞) or σ_i = 0)
    keep  = visible ∧ s1 > θ,   g = softplus(s2),   t = s1 (RENORM: s1 + log g)
    lse_i = log Σ_{j kept} e^{t_ij},   W = e^{t − lse} ⊙ g (RENORM: e^{t − lse}, the gate renormalised)
    o_i   = Σ_j W_ij·v_j

Backward (θ gets no gradient: the mask is piecewise constant). With dpv_ij = dO_i·v_j and
Δ_i = Σ_j W_ij·dpv_ij = dO_i·o_i:

    dV = Wᵀ·dO
    gate multiplies (P = e^{s1 − lse}):
      ∂W_ij/∂s2_ij = P_ij·sigmoid(s2_ij)              → ds2 = P ⊙ dpv ⊙ sigmoid(s2)
      dP = g ⊙ dpv, softmax Jacobian P(dP − Σ P·dP)   → ds1 = P ⊙ (g ⊙ dpv − Δ)       (Σ_j P g dpv = Δ)
    RENORM (W a softmax over t):   ds1 = W ⊙ (dpv − Δ),   ds2 = ds1 ⊙ sigmoid(s2)/g
    dq[:r] = a·ds1·k[:r],  dq[r:] = c·ds2·k[r:],  dk[:r] = a·ds1ᵀ·q[:r],  dk[r:] = c·ds2ᵀ·q[r:]

Kernels (one program per (query or key block, batch·head)):

  _stats      θ per query: s1 tiles over the visible key blocks (only the r predictor dims are read);
              each tile's count, mean and M2 = Σ(s1 − mean)² are merged with Chan's parallel formula,
              which stays accurate where a raw Σs1² − n·μ² would cancel. z comes precomputed (host).
  _fwd        per query block: s1 and the mask for each visible key block; a tile with no kept key is
              skipped before s2 or V are touched, and in any other tile only the rows of keys that some
              query of the block keeps are loaded from K[r:] and V (row-masked loads). Then an online
              softmax over the kept t (running max m and sum l, as in flash attention), acc += w·V.
              Writes o = acc/l, lse = m + log l, kept.
  _split_*    decode (≤ 16 queries): the same two passes with the keys split across programs, the chunks'
              moments and partial softmaxes merged in chunk order (section "decode" below).
  _delta      Δ_i = dO_i·o_i from the stored o (rounded to the output dtype, as in flash attention).
  _bwd_dkdv   per key block, loop over query blocks: recompute s1, mask, P = e^{s1 − lse}, s2; a tile with
              no kept pair is skipped before q[r:] and dO are loaded, and otherwise only the rows of
              queries that keep some key of the block are.
  _bwd_dq     per query block, loop over key blocks: the same recomputation; an empty tile is skipped
              before K[r:] and V are loaded, and otherwise only kept keys' rows are.

Tiles: the predictor part is padded to BLOCK_R = max(16, 2^⌈log2 r⌉) and the rest to BLOCK_E, with masked
zero loads, so any r in 1..D−1 and any D up to 256 works and s1 costs r, not D, multiply-adds per pair.
Half-precision inputs feed tl.dot directly with fp32 accumulation; fp32 inputs use IEEE dot products
(not TF32: the mask compares s1 against θ, and TF32's 10-bit mantissa would flip many of them). Each pass
has its own tile sizes (_TILES, sized so that ptxas does not spill); a query that sees no key gets
o = 0, lse = −∞, kept = 0.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _cuda
from .._alloc import new_output, new_output_like
from . import _grid
# flash attention's mask, Δ pass and row addressing
from .attention import _attn_bwd_delta_kernel, _batch_head, _dot, _rows, _visible, wide
from .spark_ffn import CONSTANT_SPREAD  # σ ≤ this·|μ| is σ = 0 (reference: TIED_SPREAD)

LOG2E = tl.constexpr(1.4426950408889634)  # a constexpr global, so jit code may read it


# ---- small pieces shared by every kernel -----------------------------------------------------------------

@triton.jit
def _tile_rows(base, row0, rows, row_stride, row_ok, col0, cols, n_cols, WIDE: tl.constexpr):
    """base[rows, col0 + cols] as a (rows, cols) tile, zero where not row_ok or col ≥ n_cols (those rows
    are not read at all); rows are row0 + 0..BLOCK−1, addressed as flash attention's _rows does (int64
    from the first row when WIDE)."""
    return tl.load(_rows(base, row0, rows, row_stride, WIDE)[:, None] + col0 + cols[None, :],
                   mask=row_ok[:, None] & (cols[None, :] < n_cols), other=0.0)


@triton.jit
def _tile_t_rows(base, row0, rows, row_stride, row_ok, col0, cols, n_cols, WIDE: tl.constexpr):
    """The same block loaded transposed, (cols, rows): the kᵀ operand of q·kᵀ."""
    return tl.load(_rows(base, row0, rows, row_stride, WIDE)[None, :] + col0 + cols[:, None],
                   mask=row_ok[None, :] & (cols[:, None] < n_cols), other=0.0)


@triton.jit
def _tile(base, row0, rows, row_stride, n_rows, col0, cols, n_cols, WIDE: tl.constexpr):
    return _tile_rows(base, row0, rows, row_stride, rows < n_rows, col0, cols, n_cols, WIDE)


@triton.jit
def _tile_t(base, row0, rows, row_stride, n_rows, col0, cols, n_cols, WIDE: tl.constexpr):
    return _tile_t_rows(base, row0, rows, row_stride, rows < n_rows, col0, cols, n_cols, WIDE)


@triton.jit
def _last_key(pid_m, seqlen_q, seqlen_k, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr):
    """One past the last key any query of block pid_m sees."""
    if CAUSAL:
        return tl.minimum(seqlen_k, (pid_m + 1) * BLOCK_M + (seqlen_k - seqlen_q))
    else:
        return seqlen_k


@triton.jit
def _predictor(q1, k1t, theta, offs_m, offs_n, seqlen_q, seqlen_k, scale1,
               CAUSAL: tl.constexpr, IEEE: tl.constexpr):
    """s1 (natural units, as θ is) and the mask of one tile. Every pass does the same arithmetic here (one
    dot over the padded r dims, then the scale), so the backward recomputes the forward's mask; different
    tile shapes could at most round a score differently in its last bit (a flip only within an ulp of θ)."""
    s1 = _dot(q1, k1t, IEEE) * scale1
    keep = _visible(offs_m, offs_n, seqlen_q, seqlen_k, CAUSAL) & (s1 > theta[:, None])
    return s1, keep


LOG_GATE_CUTOFF = tl.constexpr(-80.0)  # the reference's: log softplus(x) = x below it


@triton.jit
def _softplus(x):
    """log(1 + eˣ) = max(x, 0) + log1p(e^{−|x|}), with log1p(t) = log(u)·t/(u − 1), u = 1 + t (exact to a
    few ulp even where u rounds: a plain log(1 + t) loses every digit of t below 2⁻²⁴)."""
    t = tl.exp(-tl.abs(x))
    u = 1.0 + t
    log1p = tl.where(u == 1.0, t, tl.log(u) * (t / tl.where(u == 1.0, 1.0, u - 1.0)))
    return tl.maximum(x, 0.0) + log1p


@triton.jit
def _log_gate(x):
    """log softplus(x), = x below the cutoff, where softplus would soon underflow to 0 and its log to −∞."""
    return tl.where(x < LOG_GATE_CUTOFF, x, tl.log(_softplus(x)))


# ---- θ: mean and std of s1 over the visible keys, merged tile by tile --------------------------------------

@triton.jit
def _chan_merge(count, mean, m2, count_b, mean_b, m2_b):
    """Chan et al.: n = n_a + n_b, δ = μ_b − μ_a, μ = μ_a + δ·n_b/n, M2 = M2_a + M2_b + δ²·n_a·n_b/n (correctly
    rounded division: a plain one compiles to approximate PTX, and the reference divides exactly)."""
    n_new = count + count_b
    delta = mean_b - mean
    frac = tl.div_rn(count_b, tl.maximum(n_new, 1.0))
    return n_new, mean + delta * frac, m2 + m2_b + delta * delta * count * frac


@triton.jit
def _moments(q1, k_base, key_start, key_end, offs_m, sk_s, seqlen_q, seqlen_k, scale1,
             r, CAUSAL: tl.constexpr, IEEE: tl.constexpr, WIDE: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """(count, mean, M2) of s1 over the visible keys in [key_start, key_end) (key_start a multiple of
    BLOCK_N), each tile's exact moments merged in with Chan's formula, which stays accurate where a raw
    Σs1² − n·μ² would cancel."""
    offs_r = tl.arange(0, BLOCK_R)
    count = tl.zeros([BLOCK_M], dtype=tl.float32)
    mean = tl.zeros([BLOCK_M], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start_n in range(key_start, key_end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        s1 = _dot(q1, _tile_t(k_base, start_n, offs_n, sk_s, seqlen_k, 0, offs_r, r, WIDE), IEEE) * scale1
        vis = _visible(offs_m, offs_n, seqlen_q, seqlen_k, CAUSAL)
        n_t = tl.sum(vis.to(tl.float32), axis=1)
        mean_t = tl.div_rn(tl.sum(tl.where(vis, s1, 0.0), axis=1), tl.maximum(n_t, 1.0))
        dev = tl.where(vis, s1 - mean_t[:, None], 0.0)
        count, mean, m2 = _chan_merge(count, mean, m2, n_t, mean_t, tl.sum(dev * dev, axis=1))
    return count, mean, m2


@triton.jit
def _theta(count, mean, m2, z):
    """θ = μ + σ·z; −∞ (keep every visible key) where n_i ≤ top_k (z = −∞) or all scores are equal (σ = 0:
    s1 > θ would keep none; σ ≤ 2⁻¹⁶·|μ| counts as 0, as in the reference: equal scores leave a
    rounding-level σ)."""
    std = tl.sqrt_rn(tl.div_rn(m2, tl.maximum(count, 1.0)))
    dense = (z == float("-inf")) | (std <= CONSTANT_SPREAD * tl.abs(mean))
    return tl.where(dense, float("-inf"), mean + std * tl.where(dense, 0.0, z))


@triton.jit
def _stats_kernel(
    Q, K, Z, THETA,
    sq_b, sq_s, sq_h, sk_b, sk_s, sk_h,
    seqlen_q, seqlen_k, heads, r, scale1,
    CAUSAL: tl.constexpr, IEEE: tl.constexpr,
    WIDE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh, b, h = _batch_head(heads, WIDE)
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    q1 = _tile(Q + b * sq_b + h * sq_h, m0, offs_m, sq_s, seqlen_q, 0, tl.arange(0, BLOCK_R), r, WIDE)
    count, mean, m2 = _moments(q1, K + b * sk_b + h * sk_h, 0, _last_key(pid_m, seqlen_q, seqlen_k, CAUSAL, BLOCK_M),
                               offs_m, sk_s, seqlen_q, seqlen_k, scale1, r, CAUSAL, IEEE, WIDE,
                               BLOCK_M, BLOCK_N, BLOCK_R)
    m_ok = offs_m < seqlen_q
    z = tl.load(Z + offs_m, mask=m_ok, other=float("-inf"))
    tl.store(THETA + bh * seqlen_q + offs_m, _theta(count, mean, m2, z), mask=m_ok)


# ---- forward ----------------------------------------------------------------------------------------------

@triton.jit
def _attend(q1, q2, theta, k_base, v_base, key_start, key_end, offs_m, m_i, l_i, kept, acc,
            sk_s, sv_s, seqlen_q, seqlen_k, r, head_dim, scale1, scale2,
            CAUSAL: tl.constexpr, IEEE: tl.constexpr, RENORM: tl.constexpr, WIDE: tl.constexpr,
            BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr):
    """The online softmax over the kept keys in [key_start, key_end): (m, l, kept, acc) updated. A tile
    nobody keeps never reads K[r:] or V; in any other tile only the rows of keys some query keeps are
    read (masked loads fetch nothing for the others), which at decode is the selection itself."""
    rest = head_dim - r
    offs_r = tl.arange(0, BLOCK_R)
    offs_e = tl.arange(0, BLOCK_E)
    offs_d = tl.arange(0, BLOCK_D)
    for start_n in range(key_start, key_end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        s1, keep = _predictor(q1, _tile_t(k_base, start_n, offs_n, sk_s, seqlen_k, 0, offs_r, r, WIDE), theta,
                              offs_m, offs_n, seqlen_q, seqlen_k, scale1, CAUSAL, IEEE)
        kept_t = tl.sum(keep.to(tl.int32), axis=1)
        kept += kept_t
        if tl.sum(kept_t, axis=0) > 0:
            used = tl.max(keep.to(tl.int32), axis=0) > 0        # keys some query of the block keeps
            s2 = _dot(q2, _tile_t_rows(k_base, start_n, offs_n, sk_s, used, r, offs_e, rest, WIDE), IEEE) * scale2
            if RENORM:  # the softmax runs over t = s1 + log g: the gated weights sum to 1
                t = tl.where(keep, s1 + _log_gate(s2), float("-inf"))
            else:
                t = tl.where(keep, s1, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(t, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)     # rows that have kept nothing yet
            p = tl.where(keep, tl.exp2((t - m_safe[:, None]) * LOG2E), 0.0)
            alpha = tl.exp2((m_i - m_safe) * LOG2E)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = _tile_rows(v_base, start_n, offs_n, sv_s, used, 0, offs_d, head_dim, WIDE)
            w = p if RENORM else p * _softplus(s2)
            acc = acc * alpha[:, None] + _dot(w.to(v.dtype), v, IEEE)
            m_i = m_new
    return m_i, l_i, kept, acc


@triton.jit
def _finish(m_i, l_i, kept, acc, offs_m, offs_d, m_ok, bh, seqlen_q, head_dim, o_rows, LSE, KEPT):
    """Write o = acc/l, lse = m + log l and kept; a query that kept nothing gets o = 0, lse = −∞."""
    has_key = l_i > 0.0
    l_safe = tl.where(has_key, l_i, 1.0)
    lse = tl.where(has_key, m_i + tl.log(l_safe), float("-inf"))
    tl.store(LSE + bh * seqlen_q + offs_m, lse, mask=m_ok)
    tl.store(KEPT + bh * seqlen_q + offs_m, kept.to(tl.int64), mask=m_ok)
    tl.store(o_rows[:, None] + offs_d[None, :], (acc / l_safe[:, None]).to(o_rows.dtype.element_ty),
             mask=m_ok[:, None] & (offs_d[None, :] < head_dim))


@triton.jit
def _fwd_kernel(
    Q, K, V, THETA, O, LSE, KEPT,
    sq_b, sq_s, sq_h, sk_b, sk_s, sk_h, sv_b, sv_s, sv_h, so_b, so_s, so_h,
    seqlen_q, seqlen_k, heads, r, head_dim, scale1, scale2,
    CAUSAL: tl.constexpr, IEEE: tl.constexpr, RENORM: tl.constexpr,
    WIDE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh, b, h = _batch_head(heads, WIDE)
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < seqlen_q
    q_base = Q + b * sq_b + h * sq_h
    q1 = _tile(q_base, m0, offs_m, sq_s, seqlen_q, 0, tl.arange(0, BLOCK_R), r, WIDE)
    q2 = _tile(q_base, m0, offs_m, sq_s, seqlen_q, r, tl.arange(0, BLOCK_E), head_dim - r, WIDE)
    theta = tl.load(THETA + bh * seqlen_q + offs_m, mask=m_ok, other=float("inf"))
    m_i, l_i, kept, acc = _attend(
        q1, q2, theta, K + b * sk_b + h * sk_h, V + b * sv_b + h * sv_h,
        0, _last_key(pid_m, seqlen_q, seqlen_k, CAUSAL, BLOCK_M), offs_m,
        tl.full([BLOCK_M], float("-inf"), dtype=tl.float32), tl.zeros([BLOCK_M], dtype=tl.float32),
        tl.zeros([BLOCK_M], dtype=tl.int32), tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32),
        sk_s, sv_s, seqlen_q, seqlen_k, r, head_dim, scale1, scale2,
        CAUSAL, IEEE, RENORM, WIDE, BLOCK_N, BLOCK_R, BLOCK_E, BLOCK_D)
    _finish(m_i, l_i, kept, acc, offs_m, offs_d, m_ok, bh, seqlen_q, head_dim,
            _rows(O + b * so_b + h * so_h, m0, offs_m, so_s, WIDE), LSE, KEPT)


# ---- decode: the keys split across programs (flash-decoding) ---------------------------------------------
#
# A handful of queries against a long key sequence gives the kernels above batch·heads programs, each
# walking every key: most of the GPU idles. Here the keys are cut into `splits` chunks of whole BLOCK_N
# tiles and every (chunk, batch·head) is a program; all the queries (≤ BLOCK_M) share one block.
#   1. _split_stats_kernel: each chunk's (count, mean, M2) of s1 per query;
#   2. _split_fwd_kernel: every program merges all chunks' moments in chunk order (so all of them agree
#      on θ; chunk 0 stores it), then runs _attend over its chunk and stores (m, l, kept, acc);
#   3. _split_merge_kernel: M = max_c m_c, l = Σ_c l_c·e^{m_c − M}, acc = Σ_c acc_c·e^{m_c − M}, then
#      _finish. The backward is the usual one: it reads the θ and lse these write.

@triton.jit
def _split_stats_kernel(
    Q, K, COUNT, MEAN, M2,
    sq_b, sq_s, sq_h, sk_b, sk_s, sk_h,
    seqlen_q, seqlen_k, heads, r, scale1, chunk, splits,
    CAUSAL: tl.constexpr, IEEE: tl.constexpr,
    WIDE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    split = tl.program_id(0)
    bh, b, h = _batch_head(heads, WIDE)
    offs_m = tl.arange(0, BLOCK_M)
    q1 = _tile(Q + b * sq_b + h * sq_h, 0, offs_m, sq_s, seqlen_q, 0, tl.arange(0, BLOCK_R), r, WIDE)
    key_start = split * chunk
    key_end = tl.minimum(key_start + chunk, _last_key(0, seqlen_q, seqlen_k, CAUSAL, BLOCK_M))
    count, mean, m2 = _moments(q1, K + b * sk_b + h * sk_h, key_start, key_end, offs_m, sk_s, seqlen_q, seqlen_k,
                               scale1, r, CAUSAL, IEEE, WIDE, BLOCK_M, BLOCK_N, BLOCK_R)
    at = (bh * splits + split) * seqlen_q + offs_m
    m_ok = offs_m < seqlen_q
    tl.store(COUNT + at, count, mask=m_ok)
    tl.store(MEAN + at, mean, mask=m_ok)
    tl.store(M2 + at, m2, mask=m_ok)


@triton.jit
def _split_fwd_kernel(
    Q, K, V, Z, COUNT, MEAN, M2, THETA, PART_M, PART_L, PART_KEPT, PART_ACC,
    sq_b, sq_s, sq_h, sk_b, sk_s, sk_h, sv_b, sv_s, sv_h,
    seqlen_q, seqlen_k, heads, r, head_dim, scale1, scale2, chunk, splits,
    CAUSAL: tl.constexpr, IEEE: tl.constexpr, RENORM: tl.constexpr,
    WIDE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr,
):
    split = tl.program_id(0)
    bh, b, h = _batch_head(heads, WIDE)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < seqlen_q
    count = tl.zeros([BLOCK_M], dtype=tl.float32)
    mean = tl.zeros([BLOCK_M], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_M], dtype=tl.float32)
    for c in range(0, splits):
        at = (bh * splits + c) * seqlen_q + offs_m
        count, mean, m2 = _chan_merge(count, mean, m2, tl.load(COUNT + at, mask=m_ok, other=0.0),
                                      tl.load(MEAN + at, mask=m_ok, other=0.0), tl.load(M2 + at, mask=m_ok, other=0.0))
    theta = _theta(count, mean, m2, tl.load(Z + offs_m, mask=m_ok, other=float("-inf")))
    if split == 0:
        tl.store(THETA + bh * seqlen_q + offs_m, theta, mask=m_ok)
    theta = tl.where(m_ok, theta, float("inf"))
    q_base = Q + b * sq_b + h * sq_h
    q1 = _tile(q_base, 0, offs_m, sq_s, seqlen_q, 0, tl.arange(0, BLOCK_R), r, WIDE)
    q2 = _tile(q_base, 0, offs_m, sq_s, seqlen_q, r, tl.arange(0, BLOCK_E), head_dim - r, WIDE)
    key_start = split * chunk
    key_end = tl.minimum(key_start + chunk, _last_key(0, seqlen_q, seqlen_k, CAUSAL, BLOCK_M))
    m_i, l_i, kept, acc = _attend(
        q1, q2, theta, K + b * sk_b + h * sk_h, V + b * sv_b + h * sv_h, key_start, key_end, offs_m,
        tl.full([BLOCK_M], float("-inf"), dtype=tl.float32), tl.zeros([BLOCK_M], dtype=tl.float32),
        tl.zeros([BLOCK_M], dtype=tl.int32), tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32),
        sk_s, sv_s, seqlen_q, seqlen_k, r, head_dim, scale1, scale2,
        CAUSAL, IEEE, RENORM, WIDE, BLOCK_N, BLOCK_R, BLOCK_E, BLOCK_D)
    at = (bh * splits + split) * seqlen_q + offs_m
    tl.store(PART_M + at, m_i, mask=m_ok)
    tl.store(PART_L + at, l_i, mask=m_ok)
    tl.store(PART_KEPT + at, kept, mask=m_ok)
    tl.store(PART_ACC + at[:, None] * BLOCK_D + offs_d[None, :], acc, mask=m_ok[:, None])


@triton.jit
def _split_merge_kernel(
    PART_M, PART_L, PART_KEPT, PART_ACC, O, LSE, KEPT,
    so_b, so_s, so_h, seqlen_q, heads, head_dim, splits,
    WIDE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    bh, b, h = _batch_head(heads, WIDE)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < seqlen_q
    m_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for c in range(0, splits):
        m_max = tl.maximum(m_max, tl.load(PART_M + (bh * splits + c) * seqlen_q + offs_m, mask=m_ok,
                                          other=float("-inf")))
    m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    kept = tl.zeros([BLOCK_M], dtype=tl.int32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for c in range(0, splits):   # in chunk order: deterministic
        at = (bh * splits + c) * seqlen_q + offs_m
        scale = tl.exp2((tl.load(PART_M + at, mask=m_ok, other=float("-inf")) - m_safe) * LOG2E)
        l_i += tl.load(PART_L + at, mask=m_ok, other=0.0) * scale
        kept += tl.load(PART_KEPT + at, mask=m_ok, other=0)
        acc += tl.load(PART_ACC + at[:, None] * BLOCK_D + offs_d[None, :], mask=m_ok[:, None], other=0.0) * scale[:, None]
    _finish(m_max, l_i, kept, acc, offs_m, offs_d, m_ok, bh, seqlen_q, head_dim,
            _rows(O + b * so_b + h * so_h, 0, offs_m, so_s, WIDE), LSE, KEPT)


# ---- backward --------------------------------------------------------------------------------------------

@triton.jit
def _score_grads(s1, keep, s2, lse, delta, dpv, RENORM: tl.constexpr):
    """From a tile's scores: W (for dV), ds1 and ds2 (formula at the top of the file)."""
    g = _softplus(s2)
    if RENORM:
        w = tl.where(keep, tl.exp2((s1 + _log_gate(s2) - lse[:, None]) * LOG2E), 0.0)
        ds1 = w * (dpv - delta[:, None])
        # sigmoid/softplus → 1 as s2 → −∞; below the cutoff softplus may already be 0
        ds2 = ds1 * tl.where(s2 < LOG_GATE_CUTOFF, 1.0, tl.sigmoid(s2) / g)
        return w, ds1, ds2
    else:
        p = tl.where(keep, tl.exp2((s1 - lse[:, None]) * LOG2E), 0.0)   # lse is finite wherever keep holds
        ds2 = p * dpv * tl.sigmoid(s2)
        ds1 = p * (g * dpv - delta[:, None])
        return p * g, ds1, ds2


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, THETA, LSE, DELTA, DK, DV,
    sq_b, sq_s, sq_h, sk_b, sk_s, sk_h, sv_b, sv_s, sv_h, sdo_b, sdo_s, sdo_h,
    sdk_b, sdk_s, sdk_h, sdv_b, sdv_s, sdv_h,
    seqlen_q, seqlen_k, heads, r, head_dim, scale1, scale2,
    CAUSAL: tl.constexpr, IEEE: tl.constexpr, RENORM: tl.constexpr,
    WIDE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    bh, b, h = _batch_head(heads, WIDE)
    rest = head_dim - r
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    offs_e = tl.arange(0, BLOCK_E)
    offs_d = tl.arange(0, BLOCK_D)
    q_base = Q + b * sq_b + h * sq_h
    do_base = DO + b * sdo_b + h * sdo_h
    k_base = K + b * sk_b + h * sk_h
    k1t = _tile_t(k_base, n0, offs_n, sk_s, seqlen_k, 0, offs_r, r, WIDE)        # (R, N), as the forward loads it
    k2t = _tile_t(k_base, n0, offs_n, sk_s, seqlen_k, r, offs_e, rest, WIDE)     # (E, N)
    vt = _tile_t(V + b * sv_b + h * sv_h, n0, offs_n, sv_s, seqlen_k, 0, offs_d, head_dim, WIDE)
    dk1 = tl.zeros([BLOCK_N, BLOCK_R], dtype=tl.float32)
    dk2 = tl.zeros([BLOCK_N, BLOCK_E], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    start_m = 0
    if CAUSAL:  # queries before this one see none of the block's keys
        start_m = tl.maximum(pid_n * BLOCK_N - (seqlen_k - seqlen_q), 0) // BLOCK_M * BLOCK_M
    for m0 in range(start_m, seqlen_q, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_ok = offs_m < seqlen_q
        q1 = _tile(q_base, m0, offs_m, sq_s, seqlen_q, 0, offs_r, r, WIDE)
        theta = tl.load(THETA + bh * seqlen_q + offs_m, mask=m_ok, other=float("inf"))
        s1, keep = _predictor(q1, k1t, theta, offs_m, offs_n, seqlen_q, seqlen_k, scale1, CAUSAL, IEEE)
        if tl.sum(tl.sum(keep.to(tl.int32), axis=1), axis=0) > 0:
            active = tl.max(keep.to(tl.int32), axis=1) > 0    # queries keeping some key of the block: the
            q2 = _tile_rows(q_base, m0, offs_m, sq_s, active, r, offs_e, rest, WIDE)   # only q[r:], dO rows read
            do = _tile_rows(do_base, m0, offs_m, sdo_s, active, 0, offs_d, head_dim, WIDE)
            lse = tl.load(LSE + bh * seqlen_q + offs_m, mask=m_ok, other=0.0)
            delta = tl.load(DELTA + bh * seqlen_q + offs_m, mask=m_ok, other=0.0)
            s2 = _dot(q2, k2t, IEEE) * scale2
            w, ds1, ds2 = _score_grads(s1, keep, s2, lse, delta, _dot(do, vt, IEEE), RENORM)
            dv += _dot(tl.trans(w).to(do.dtype), do, IEEE)
            dk1 += _dot(tl.trans(ds1).to(q1.dtype), q1, IEEE)
            dk2 += _dot(tl.trans(ds2).to(q2.dtype), q2, IEEE)
    n_ok = offs_n < seqlen_k
    dk_rows = _rows(DK + b * sdk_b + h * sdk_h, n0, offs_n, sdk_s, WIDE)[:, None]
    tl.store(dk_rows + offs_r[None, :], (dk1 * scale1).to(DK.dtype.element_ty),
             mask=n_ok[:, None] & (offs_r[None, :] < r))
    tl.store(dk_rows + r + offs_e[None, :], (dk2 * scale2).to(DK.dtype.element_ty),
             mask=n_ok[:, None] & (offs_e[None, :] < rest))
    tl.store(_rows(DV + b * sdv_b + h * sdv_h, n0, offs_n, sdv_s, WIDE)[:, None] + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=n_ok[:, None] & (offs_d[None, :] < head_dim))


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, THETA, LSE, DELTA, DQ,
    sq_b, sq_s, sq_h, sk_b, sk_s, sk_h, sv_b, sv_s, sv_h, sdo_b, sdo_s, sdo_h, sdq_b, sdq_s, sdq_h,
    seqlen_q, seqlen_k, heads, r, head_dim, scale1, scale2,
    CAUSAL: tl.constexpr, IEEE: tl.constexpr, RENORM: tl.constexpr,
    WIDE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh, b, h = _batch_head(heads, WIDE)
    rest = head_dim - r
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    offs_e = tl.arange(0, BLOCK_E)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < seqlen_q
    q_base = Q + b * sq_b + h * sq_h
    k_base = K + b * sk_b + h * sk_h
    v_base = V + b * sv_b + h * sv_h
    q1 = _tile(q_base, m0, offs_m, sq_s, seqlen_q, 0, offs_r, r, WIDE)
    q2 = _tile(q_base, m0, offs_m, sq_s, seqlen_q, r, offs_e, rest, WIDE)
    do = _tile(DO + b * sdo_b + h * sdo_h, m0, offs_m, sdo_s, seqlen_q, 0, offs_d, head_dim, WIDE)
    theta = tl.load(THETA + bh * seqlen_q + offs_m, mask=m_ok, other=float("inf"))
    lse = tl.load(LSE + bh * seqlen_q + offs_m, mask=m_ok, other=0.0)
    delta = tl.load(DELTA + bh * seqlen_q + offs_m, mask=m_ok, other=0.0)
    dq1 = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    dq2 = tl.zeros([BLOCK_M, BLOCK_E], dtype=tl.float32)
    for start_n in range(0, _last_key(pid_m, seqlen_q, seqlen_k, CAUSAL, BLOCK_M), BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k1t = _tile_t(k_base, start_n, offs_n, sk_s, seqlen_k, 0, offs_r, r, WIDE)
        s1, keep = _predictor(q1, k1t, theta, offs_m, offs_n, seqlen_q, seqlen_k, scale1, CAUSAL, IEEE)
        if tl.sum(tl.sum(keep.to(tl.int32), axis=1), axis=0) > 0:
            used = tl.max(keep.to(tl.int32), axis=0) > 0      # keys some query keeps: the only K[r:], V rows read
            k2t = _tile_t_rows(k_base, start_n, offs_n, sk_s, used, r, offs_e, rest, WIDE)
            vt = _tile_t_rows(v_base, start_n, offs_n, sv_s, used, 0, offs_d, head_dim, WIDE)
            s2 = _dot(q2, k2t, IEEE) * scale2
            _, ds1, ds2 = _score_grads(s1, keep, s2, lse, delta, _dot(do, vt, IEEE), RENORM)
            dq1 += _dot(ds1.to(k1t.dtype), tl.trans(k1t), IEEE)
            dq2 += _dot(ds2.to(k2t.dtype), tl.trans(k2t), IEEE)
    dq_rows = _rows(DQ + b * sdq_b + h * sdq_h, m0, offs_m, sdq_s, WIDE)[:, None]
    tl.store(dq_rows + offs_r[None, :], (dq1 * scale1).to(DQ.dtype.element_ty),
             mask=m_ok[:, None] & (offs_r[None, :] < r))
    tl.store(dq_rows + r + offs_e[None, :], (dq2 * scale2).to(DQ.dtype.element_ty),
             mask=m_ok[:, None] & (offs_e[None, :] < rest))


# ---- launchers -------------------------------------------------------------------------------------------

# (BLOCK_M, BLOCK_N, num_warps) of each pass, by input class and padded head_dim. Picked by ahead-of-time
# compiles for sm_90 (and checked for sm_80), Triton 3.6, at the worst predictor split of each width
# (BLOCK_R = BLOCK_D/2 beside BLOCK_E = BLOCK_D): the largest tiles ptxas did not spill, except fp32 at
# D > 128, whose forward and dQ pass spill ~300 bytes/thread at every size tried (an IEEE fp32 dot is an FMA
# loop that keeps whole operand rows of K = BLOCK_E in registers). The θ pass runs on the forward's grid.
# "decode" (the split-key passes) was checked at r = D/4 only: 16×64 half tiles spilled 4 B at D = 128.
_TILES = {
    # fp16 / bf16: tensor-core dots
    (False, 64): {"fwd": (64, 64, 4), "dkdv": (64, 32, 4), "dq": (64, 32, 4), "decode": (16, 64, 4)},
    (False, 128): {"fwd": (32, 32, 4), "dkdv": (32, 32, 4), "dq": (32, 32, 4), "decode": (16, 32, 4)},
    (False, 256): {"fwd": (16, 32, 4), "dkdv": (16, 16, 4), "dq": (16, 32, 4), "decode": (16, 32, 4)},
    # fp32: IEEE dots (TF32 would flip the s1 > θ comparisons)
    (True, 64): {"fwd": (16, 32, 8), "dkdv": (32, 32, 8), "dq": (16, 32, 8), "decode": (16, 32, 8)},
    (True, 128): {"fwd": (16, 16, 8), "dkdv": (16, 16, 8), "dq": (16, 16, 8), "decode": (16, 16, 8)},
    (True, 256): {"fwd": (16, 16, 8), "dkdv": (16, 16, 8), "dq": (16, 16, 8), "decode": (16, 16, 8)},
}
DECODE_MAX_QUERIES = 16     # the split-key forward holds all the queries in one block of 16 rows
MIN_KEYS_PER_SPLIT = 256    # a chunk shorter than this costs more in its partials than it saves


def split_keys(batch: int, heads: int, seqlen_q: int, seqlen_k: int, cfg: dict, device) -> tuple[int, int]:
    """(chunk, splits) of the keys for the split-key forward: about 4 programs per SM over batch·heads·splits,
    each chunk whole BLOCK_N tiles and at least MIN_KEYS_PER_SPLIT keys; (seqlen_k, 1) — no split — when
    there are more queries than one block of the decode tiles holds (the split kernels have no query-block
    axis) or the batch already fills the GPU."""
    if seqlen_q > min(DECODE_MAX_QUERIES, cfg["BLOCK_M"]):
        return seqlen_k, 1
    wanted = triton.cdiv(4 * _cuda.multiprocessor_count(device), batch * heads)
    splits = max(1, min(wanted, seqlen_k // MIN_KEYS_PER_SPLIT))
    if splits == 1:
        return seqlen_k, 1
    return _grid.split_range(seqlen_k, splits, cfg["BLOCK_N"])


def _config(head_dim: int, r: int, seqlen_q: int, seqlen_k: int, fp32: bool, phase: str) -> dict:
    """Launch meta-parameters of one pass ("fwd", "dkdv" or "dq"): tiles no longer than the (padded)
    sequences, the predictor / rest / full widths padded to powers of two ≥ 16 (tl.dot's minimum)."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_m, block_n, num_warps = _TILES[(fp32, max(64, block_d))][phase]
    return dict(
        BLOCK_M=min(block_m, max(16, triton.next_power_of_2(seqlen_q))),
        BLOCK_N=min(block_n, max(16, triton.next_power_of_2(seqlen_k))),
        BLOCK_R=max(16, triton.next_power_of_2(r)),
        BLOCK_E=max(16, triton.next_power_of_2(head_dim - r)),
        BLOCK_D=block_d,
        num_warps=num_warps,
    )


def _strides(t):
    return t.stride(0), t.stride(1), t.stride(2)


def quantile_z(seqlen_q: int, seqlen_k: int, top_k: int, causal: bool, device, std_correction: float = 0.0
               ) -> torch.Tensor:
    """z_i = Φ⁻¹(1 − top_k/n_i)·√(n_i/(n_i − std_correction)) (−∞ where n_i ≤ top_k), (seqlen_q,) float32:
    it depends on the row only, so the host computes it once (torch.special.ndtri), as the reference does."""
    from ..reference.spark_attention import quantile_z as z_of, visible_counts

    return z_of(visible_counts(seqlen_q, seqlen_k, causal, device), top_k, torch.float32,
                std_correction).contiguous()


def spark_attention_fwd(q, k, v, top_k: int, r: int, causal: bool, scale1: float, scale2: float,
                        std_correction: float = 0.0, renormalize_gate: bool = False):
    """-> (out (B, S_q, H, D) in q's dtype, lse, θ (B, H, S_q) float32, kept (B, H, S_q) int64).
    q, k, v: one dtype (fp16, bf16 or fp32), same heads, last dimension contiguous. A few queries against
    many keys take the split-key kernels (decode); the result is the same up to the rounding of the
    merges."""
    batch, seqlen_q, heads, head_dim = q.shape
    seqlen_k = k.shape[1]
    ieee = q.dtype == torch.float32
    theta = new_output((batch, heads, seqlen_q), torch.float32, q.device)
    lse = new_output((batch, heads, seqlen_q), torch.float32, q.device)
    kept = new_output((batch, heads, seqlen_q), torch.int64, q.device)
    out = new_output_like(q)
    z = quantile_z(seqlen_q, seqlen_k, top_k, causal, q.device, std_correction)
    long_rows = wide(q, k, v, out)
    flags = dict(CAUSAL=causal, IEEE=ieee, WIDE=long_rows)
    decode = _config(head_dim, r, seqlen_q, seqlen_k, ieee, "decode")
    chunk, splits = split_keys(batch, heads, seqlen_q, seqlen_k, decode, q.device)
    if splits > 1:
        _split_fwd(q, k, v, z, theta, out, lse, kept, r, scale1, scale2, chunk, splits, bool(renormalize_gate),
                   decode, flags)
        return out, lse, theta, kept
    cfg = _config(head_dim, r, seqlen_q, seqlen_k, ieee, "fwd")
    for s, programs in _grid.batch_slices(batch, heads):
        grid = (triton.cdiv(seqlen_q, cfg["BLOCK_M"]), programs)
        _stats_kernel[grid](
            q[s], k[s], z, theta[s], *_strides(q), *_strides(k), seqlen_q, seqlen_k, heads, r, scale1,
            **flags, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_R=cfg["BLOCK_R"],
            num_warps=cfg["num_warps"],
        )
        _fwd_kernel[grid](
            q[s], k[s], v[s], theta[s], out[s], lse[s], kept[s], *_strides(q), *_strides(k), *_strides(v),
            *_strides(out), seqlen_q, seqlen_k, heads, r, head_dim, scale1, scale2, RENORM=bool(renormalize_gate),
            **flags, **cfg,
        )
    return out, lse, theta, kept


def _split_fwd(q, k, v, z, theta, out, lse, kept, r, scale1, scale2, chunk, splits, renorm, cfg, flags):
    """The split-key forward (see the decode section above) into theta, out, lse and kept."""
    batch, seqlen_q, heads, head_dim = q.shape
    seqlen_k = k.shape[1]
    parts = (batch, heads, splits, seqlen_q)
    count, mean, m2, part_m, part_l = (new_output(parts, torch.float32, q.device) for _ in range(5))
    part_kept = new_output(parts, torch.int32, q.device)
    part_acc = new_output(parts + (cfg["BLOCK_D"],), torch.float32, q.device)
    for s, programs in _grid.batch_slices(batch, heads):
        grid = (splits, programs)
        _split_stats_kernel[grid](
            q[s], k[s], count[s], mean[s], m2[s], *_strides(q), *_strides(k), seqlen_q, seqlen_k, heads, r, scale1,
            chunk, splits, **flags, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_R=cfg["BLOCK_R"],
            num_warps=cfg["num_warps"],
        )
        _split_fwd_kernel[grid](
            q[s], k[s], v[s], z, count[s], mean[s], m2[s], theta[s], part_m[s], part_l[s], part_kept[s],
            part_acc[s], *_strides(q), *_strides(k), *_strides(v), seqlen_q, seqlen_k, heads, r, head_dim,
            scale1, scale2, chunk, splits, RENORM=renorm, **flags, **cfg,
        )
        _split_merge_kernel[(1, programs)](
            part_m[s], part_l[s], part_kept[s], part_acc[s], out[s], lse[s], kept[s], *_strides(out), seqlen_q,
            heads, head_dim, splits, WIDE=flags["WIDE"], BLOCK_M=cfg["BLOCK_M"], BLOCK_D=cfg["BLOCK_D"],
            num_warps=4,
        )


def spark_attention_bwd(dout, q, k, v, out, lse, theta, r: int, causal: bool, scale1: float, scale2: float,
                        renormalize_gate: bool = False):
    """-> (dq, dk, dv) in the inputs' dtypes, recomputing P from the saved lse and θ."""
    batch, seqlen_q, heads, head_dim = q.shape
    seqlen_k = k.shape[1]
    ieee = q.dtype == torch.float32
    kv_cfg = _config(head_dim, r, seqlen_q, seqlen_k, ieee, "dkdv")
    q_cfg = _config(head_dim, r, seqlen_q, seqlen_k, ieee, "dq")
    delta = new_output((batch, heads, seqlen_q), torch.float32, q.device)
    dq, dk, dv = new_output_like(q), new_output_like(k), new_output_like(v)
    long_rows = wide(q, k, v, out, dout, dq, dk, dv)
    for s, programs in _grid.batch_slices(batch, heads):
        q_grid = (triton.cdiv(seqlen_q, q_cfg["BLOCK_M"]), programs)
        _attn_bwd_delta_kernel[q_grid](
            out[s], dout[s], delta[s], *_strides(out), *_strides(dout), seqlen_q, heads, head_dim,
            WIDE=long_rows, BLOCK_M=q_cfg["BLOCK_M"], BLOCK_D=q_cfg["BLOCK_D"], num_warps=4,
        )
        _bwd_dkdv_kernel[(triton.cdiv(seqlen_k, kv_cfg["BLOCK_N"]), programs)](
            q[s], k[s], v[s], dout[s], theta[s], lse[s], delta[s], dk[s], dv[s],
            *_strides(q), *_strides(k), *_strides(v), *_strides(dout), *_strides(dk), *_strides(dv),
            seqlen_q, seqlen_k, heads, r, head_dim, scale1, scale2, CAUSAL=causal, IEEE=ieee,
            RENORM=bool(renormalize_gate), WIDE=long_rows, **kv_cfg,
        )
        _bwd_dq_kernel[q_grid](
            q[s], k[s], v[s], dout[s], theta[s], lse[s], delta[s], dq[s],
            *_strides(q), *_strides(k), *_strides(v), *_strides(dout), *_strides(dq),
            seqlen_q, seqlen_k, heads, r, head_dim, scale1, scale2, CAUSAL=causal, IEEE=ieee,
            RENORM=bool(renormalize_gate), WIDE=long_rows, **q_cfg,
        )
    return dq, dk, dv
