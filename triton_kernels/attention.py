"""Flash attention (Dao et al.) with the attention each key receives, Triton forward and backward.

Layout (batch, seqlen, heads, head_dim); query head h reads key head h // (H / H_kv). With
s_ij = scale·q_i·k_j (causal: key j visible to query i iff j ≤ i + S_k − S_q, the bottom-right alignment):

  forward   online softmax over key blocks: m ← max(m, max_j s), l ← l·e^{m_old − m} + Σ_j e^{s − m},
            acc ← acc·e^{m_old − m} + Σ_j e^{s − m}·v_j;  o = acc / l,  lse = m + log l  (−inf, o = 0: no key)
  backward  δ_i = Σ_d dO_id·O_id;  p = e^{s − lse};  dv_j = Σ_i p_ij·dO_i;  ds = p·(dO_i·v_j − δ_i);
            dk_j = scale·Σ_i ds_ij·q_i  (one program per key block, looping over the query blocks and the
            query heads of its key head);  dq_i = scale·Σ_j ds_ij·k_j  (one program per query block).
            Both passes handle causal and non-causal attention; causal blocks with no visible pair are skipped,
            and in fp16/bf16 the tiles where every pair is visible run in a loop of their own, unmasked.
  received  r_j = Σ_i w_i·p_ij per head: one program per key block, looping over query blocks with the
            saved lse, so nothing of size S_q × S_k is ever stored.

Exponentials are taken base 2 with the scale folded into log2(e). head_dim is padded to a power of two
(≥ 16) with masked loads, so any head_dim up to 256 works. Tile sizes are timed once per shape bucket on
the GPU (_tune.py); the interpreter and ZIGSPARK_AUTOTUNE=0 run the hand-picked first candidate.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from .._alloc import new_output, new_output_like
from . import _grid, _tune
from ._tune import Blocks as B

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def _batch_head(heads, WIDE: tl.constexpr):
    """(bh, b, h) of a program whose grid axis 1 runs over batch·heads. bh and b are int64: bh·S and
    b·stride can pass 2³¹ elements; h is too when WIDE (a head-major view's head stride is S·D)."""
    bh = tl.program_id(1)
    h = bh % heads
    if WIDE:
        h = h.to(tl.int64)
    return bh.to(tl.int64), (bh // heads).to(tl.int64), h


@triton.jit
def _rows(head, row0, offs, stride, WIDE: tl.constexpr):
    """Pointers to the rows `offs` = row0 + 0..BLOCK−1 of one head. WIDE when one sample's rows span 2³¹
    elements or more (S·H·D: S = 1M at H·D = 2048): the block's first row is then reached in int64 and only
    the offsets inside the block stay int32. Otherwise all of it is int32, as the int64 form costs
    registers: ptxas spills up to 184 B per thread with it in the dK/dV kernel (sm_90a), none without."""
    if WIDE:
        return head + tl.cast(row0, tl.int64) * stride + (offs - row0) * stride
    else:
        return head + offs * stride


@triton.jit
def _visible(offs_m, offs_n, seqlen_q, seqlen_k, CAUSAL: tl.constexpr):
    ok = (offs_m[:, None] < seqlen_q) & (offs_n[None, :] < seqlen_k)
    if CAUSAL:
        ok = ok & (offs_n[None, :] <= offs_m[:, None] + (seqlen_k - seqlen_q))
    return ok


@triton.jit
def _full_key_end(pid_m, seqlen_q, seqlen_k, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr):
    """For a query block: key tiles below this end are visible to every row (no mask needed)."""
    end = seqlen_k // BLOCK_N * BLOCK_N
    if CAUSAL:  # every row sees the keys its first row sees: j ≤ first row + S_k − S_q
        end = tl.minimum(end, tl.maximum(pid_m * BLOCK_M + seqlen_k - seqlen_q + 1, 0) // BLOCK_N * BLOCK_N)
    return end


@triton.jit
def _full_query_start(pid_n, start_m, seqlen_q, seqlen_k, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr):
    """For a key block: query tiles from here on see every key of it (no mask needed). Bounds need no mask
    in these kernels: rows past S_q load lse = −inf, so their p is 0, and columns past S_k are never stored
    (nothing sums across keys)."""
    start = start_m
    if CAUSAL:  # the block's last key is visible from row n0 + BLOCK_N − 1 − (S_k − S_q) on
        first = tl.maximum(pid_n * BLOCK_N + BLOCK_N - 1 - (seqlen_k - seqlen_q), 0)
        start = tl.maximum((first + BLOCK_M - 1) // BLOCK_M * BLOCK_M, start_m)
    return start


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    """a·b; IEEE: exact float32 products (float32 inputs), rather than the TF32 tl.dot takes by default."""
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _fwd_tile(q, K_head, V_head, sk_s, sv_s, start_n, offs_m, offs_d, d_ok, m_i, l_i, acc,
              seqlen_q, seqlen_k, qk_scale_log2,
              CAUSAL: tl.constexpr, HAS_V: tl.constexpr, IEEE: tl.constexpr, MASKED: tl.constexpr,
              BLOCK_N: tl.constexpr, WIDE: tl.constexpr):
    """One key tile of the online softmax; MASKED applies the bounds and the causal mask."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    kv_ok = d_ok[None, :]
    if MASKED:
        kv_ok = kv_ok & (offs_n[:, None] < seqlen_k)
    kt = tl.load(_rows(K_head, start_n, offs_n, sk_s, WIDE)[None, :] + offs_d[:, None], mask=tl.trans(kv_ok),
                 other=0.0)
    s = _dot(q, kt, IEEE) * qk_scale_log2
    if MASKED:
        s = tl.where(_visible(offs_m, offs_n, seqlen_q, seqlen_k, CAUSAL), s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)   # a row with no visible key yet
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if HAS_V:
        v = tl.load(_rows(V_head, start_n, offs_n, sv_s, WIDE)[:, None] + offs_d[None, :], mask=kv_ok, other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
    return m_new, l_i, acc


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE,
    sq_b, sq_s, sq_h, sk_b, sk_s, sk_h, sv_b, sv_s, sv_h, so_b, so_s, so_h,
    seqlen_q, seqlen_k, heads, group, head_dim, qk_scale_log2,
    CAUSAL: tl.constexpr, HAS_V: tl.constexpr, IEEE: tl.constexpr, SPLIT: tl.constexpr,
    WIDE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh, b, h = _batch_head(heads, WIDE)
    hk = h // group
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    m_ok = offs_m < seqlen_q
    m0 = pid_m * BLOCK_M
    q = tl.load(_rows(Q + b * sq_b + h * sq_h, m0, offs_m, sq_s, WIDE)[:, None] + offs_d[None, :],
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    K_head = K + b * sk_b + hk * sk_h
    V_head = V + b * sv_b + hk * sv_h
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    end_n = seqlen_k
    if CAUSAL:
        end_n = tl.minimum(seqlen_k, (pid_m + 1) * BLOCK_M + seqlen_k - seqlen_q)
    full_end = 0
    if SPLIT:
        full_end = _full_key_end(pid_m, seqlen_q, seqlen_k, CAUSAL, BLOCK_M, BLOCK_N)
        for start_n in range(0, full_end, BLOCK_N):
            m_i, l_i, acc = _fwd_tile(q, K_head, V_head, sk_s, sv_s, start_n, offs_m, offs_d, d_ok, m_i, l_i,
                                      acc, seqlen_q, seqlen_k, qk_scale_log2, CAUSAL, HAS_V, IEEE, False, BLOCK_N, WIDE)
    for start_n in range(full_end, end_n, BLOCK_N):
        m_i, l_i, acc = _fwd_tile(q, K_head, V_head, sk_s, sv_s, start_n, offs_m, offs_d, d_ok, m_i, l_i, acc,
                                  seqlen_q, seqlen_k, qk_scale_log2, CAUSAL, HAS_V, IEEE, True, BLOCK_N, WIDE)
    has_key = l_i > 0.0
    lse = tl.where(has_key, (m_i + tl.log2(tl.where(has_key, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    tl.store(LSE + bh * seqlen_q + offs_m, lse, mask=m_ok)
    if HAS_V:
        out = acc / tl.where(has_key, l_i, 1.0)[:, None]
        tl.store(_rows(O + b * so_b + h * so_h, m0, offs_m, so_s, WIDE)[:, None] + offs_d[None, :],
                 out.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


@triton.jit
def _probs(q, kt, lse, offs_m, offs_n, seqlen_q, seqlen_k, qk_scale_log2,
           CAUSAL: tl.constexpr, IEEE: tl.constexpr, MASKED: tl.constexpr):
    """p = exp(s − lse) for a (BLOCK_M, BLOCK_N) tile; 0 where the query sees no key (lse = −inf) and, when
    MASKED, where the pair is out of bounds or not visible."""
    s = _dot(q, kt, IEEE)
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    p = tl.exp2(s * qk_scale_log2 - lse2[:, None])
    if MASKED:
        p = tl.where(_visible(offs_m, offs_n, seqlen_q, seqlen_k, CAUSAL), p, 0.0)
    return p


@triton.jit
def _dkdv_tile(Q_head, DO_head, LSE_head, DELTA_head, sq_s, sdo_s, m0, kt, vt, offs_n, offs_d, d_ok, dk, dv,
               seqlen_q, seqlen_k, qk_scale_log2,
               CAUSAL: tl.constexpr, IEEE: tl.constexpr, MASKED: tl.constexpr, BLOCK_M: tl.constexpr,
               WIDE: tl.constexpr):
    offs_m = m0 + tl.arange(0, BLOCK_M)
    m_ok = offs_m < seqlen_q
    md_mask = m_ok[:, None] & d_ok[None, :]
    q = tl.load(_rows(Q_head, m0, offs_m, sq_s, WIDE)[:, None] + offs_d[None, :], mask=md_mask, other=0.0)
    do = tl.load(_rows(DO_head, m0, offs_m, sdo_s, WIDE)[:, None] + offs_d[None, :], mask=md_mask, other=0.0)
    lse = tl.load(LSE_head + offs_m, mask=m_ok, other=float("-inf"))
    delta = tl.load(DELTA_head + offs_m, mask=m_ok, other=0.0)
    p = _probs(q, kt, lse, offs_m, offs_n, seqlen_q, seqlen_k, qk_scale_log2, CAUSAL, IEEE, MASKED)
    dv += _dot(tl.trans(p).to(do.dtype), do, IEEE)
    ds = p * (_dot(do, vt, IEEE) - delta[:, None])
    dk += _dot(tl.trans(ds).to(q.dtype), q, IEEE)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    sq_b, sq_s, sq_h, sk_b, sk_s, sk_h, sv_b, sv_s, sv_h, sdo_b, sdo_s, sdo_h,
    sdk_b, sdk_s, sdk_h, sdv_b, sdv_s, sdv_h,
    seqlen_q, seqlen_k, heads, kv_heads, group, head_dim, scale, qk_scale_log2,
    CAUSAL: tl.constexpr, IEEE: tl.constexpr, SPLIT: tl.constexpr,
    WIDE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    bhk, b, hk = _batch_head(kv_heads, WIDE)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    n_ok = offs_n < seqlen_k
    nd_mask = n_ok[:, None] & d_ok[None, :]
    n0 = pid_n * BLOCK_N
    k = tl.load(_rows(K + b * sk_b + hk * sk_h, n0, offs_n, sk_s, WIDE)[:, None] + offs_d[None, :], mask=nd_mask,
                other=0.0)
    v = tl.load(_rows(V + b * sv_b + hk * sv_h, n0, offs_n, sv_s, WIDE)[:, None] + offs_d[None, :], mask=nd_mask,
                other=0.0)
    kt = tl.trans(k)
    vt = tl.trans(v)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    start_m = 0
    if CAUSAL:  # queries that see none of these keys are skipped
        start_m = tl.maximum(pid_n * BLOCK_N - (seqlen_k - seqlen_q), 0) // BLOCK_M * BLOCK_M
    full_start = seqlen_q
    if SPLIT:
        full_start = _full_query_start(pid_n, start_m, seqlen_q, seqlen_k, CAUSAL, BLOCK_M, BLOCK_N)
    # One flat loop per kind of tile over (query head of this key head, query block) rather than a loop over
    # heads around the block loops: nested, the pair of block loops leaves ptxas too few registers under
    # GQA (the causal fp16 64×64 tile spilled 172 B per thread at sm_90a), flat it compiles as for MHA.
    n_masked = tl.cdiv(tl.minimum(full_start, seqlen_q) - start_m, BLOCK_M)
    for it in range(0, group * n_masked):
        h = hk * group + it // n_masked
        m0 = start_m + (it % n_masked) * BLOCK_M
        dk, dv = _dkdv_tile(Q + b * sq_b + h * sq_h, DO + b * sdo_b + h * sdo_h, LSE + (b * heads + h) * seqlen_q,
                            DELTA + (b * heads + h) * seqlen_q, sq_s, sdo_s, m0, kt, vt, offs_n, offs_d, d_ok, dk, dv,
                            seqlen_q, seqlen_k, qk_scale_log2, CAUSAL, IEEE, True, BLOCK_M, WIDE)
    if SPLIT:
        n_full = tl.cdiv(seqlen_q - full_start, BLOCK_M)
        for it in range(0, group * n_full):
            h = hk * group + it // n_full
            m0 = full_start + (it % n_full) * BLOCK_M
            dk, dv = _dkdv_tile(Q + b * sq_b + h * sq_h, DO + b * sdo_b + h * sdo_h,
                                LSE + (b * heads + h) * seqlen_q, DELTA + (b * heads + h) * seqlen_q, sq_s, sdo_s, m0,
                                kt, vt, offs_n, offs_d, d_ok, dk, dv, seqlen_q, seqlen_k, qk_scale_log2, CAUSAL,
                                IEEE, False, BLOCK_M, WIDE)
    tl.store(_rows(DK + b * sdk_b + hk * sdk_h, n0, offs_n, sdk_s, WIDE)[:, None] + offs_d[None, :],
             (dk * scale).to(DK.dtype.element_ty), mask=nd_mask)
    tl.store(_rows(DV + b * sdv_b + hk * sdv_h, n0, offs_n, sdv_s, WIDE)[:, None] + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=nd_mask)


@triton.jit
def _attn_bwd_delta_kernel(
    O, DO, DELTA, so_b, so_s, so_h, sdo_b, sdo_s, sdo_h, seqlen_q, heads, head_dim,
    WIDE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Δ_i = rowsum(dO_i ⊙ o_i) in fp32, (B, H, S_q): the backward's preprocessing, read from o and dO as
    stored (last dimension contiguous), without fp32 copies of either."""
    pid_m = tl.program_id(0)
    bh, b, h = _batch_head(heads, WIDE)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    inside = (offs_m[:, None] < seqlen_q) & (offs_d[None, :] < head_dim)
    m0 = pid_m * BLOCK_M
    o = tl.load(_rows(O + b * so_b + h * so_h, m0, offs_m, so_s, WIDE)[:, None] + offs_d[None, :], mask=inside,
                other=0.0)
    do = tl.load(_rows(DO + b * sdo_b + h * sdo_h, m0, offs_m, sdo_s, WIDE)[:, None] + offs_d[None, :], mask=inside,
                 other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(DELTA + bh * seqlen_q + offs_m, delta, mask=offs_m < seqlen_q)


@triton.jit
def _dq_tile(q, do, lse, delta, K_head, V_head, sk_s, sv_s, start_n, offs_m, offs_d, d_ok, dq,
             seqlen_q, seqlen_k, qk_scale_log2,
             CAUSAL: tl.constexpr, IEEE: tl.constexpr, MASKED: tl.constexpr, BLOCK_N: tl.constexpr, WIDE: tl.constexpr):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    nd_mask = d_ok[None, :]
    if MASKED:
        nd_mask = nd_mask & (offs_n[:, None] < seqlen_k)
    k = tl.load(_rows(K_head, start_n, offs_n, sk_s, WIDE)[:, None] + offs_d[None, :], mask=nd_mask, other=0.0)
    v = tl.load(_rows(V_head, start_n, offs_n, sv_s, WIDE)[:, None] + offs_d[None, :], mask=nd_mask, other=0.0)
    p = _probs(q, tl.trans(k), lse, offs_m, offs_n, seqlen_q, seqlen_k, qk_scale_log2, CAUSAL, IEEE, MASKED)
    ds = p * (_dot(do, tl.trans(v), IEEE) - delta[:, None])
    return dq + _dot(ds.to(k.dtype), k, IEEE)


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    sq_b, sq_s, sq_h, sk_b, sk_s, sk_h, sv_b, sv_s, sv_h, sdo_b, sdo_s, sdo_h, sdq_b, sdq_s, sdq_h,
    seqlen_q, seqlen_k, heads, group, head_dim, scale, qk_scale_log2,
    CAUSAL: tl.constexpr, IEEE: tl.constexpr, SPLIT: tl.constexpr,
    WIDE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh, b, h = _batch_head(heads, WIDE)
    hk = h // group
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    m_ok = offs_m < seqlen_q
    md_mask = m_ok[:, None] & d_ok[None, :]
    m0 = pid_m * BLOCK_M
    q = tl.load(_rows(Q + b * sq_b + h * sq_h, m0, offs_m, sq_s, WIDE)[:, None] + offs_d[None, :], mask=md_mask,
                other=0.0)
    do = tl.load(_rows(DO + b * sdo_b + h * sdo_h, m0, offs_m, sdo_s, WIDE)[:, None] + offs_d[None, :],
                 mask=md_mask, other=0.0)
    lse = tl.load(LSE + bh * seqlen_q + offs_m, mask=m_ok, other=float("-inf"))
    delta = tl.load(DELTA + bh * seqlen_q + offs_m, mask=m_ok, other=0.0)
    K_head = K + b * sk_b + hk * sk_h
    V_head = V + b * sv_b + hk * sv_h
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    end_n = seqlen_k
    if CAUSAL:
        end_n = tl.minimum(seqlen_k, (pid_m + 1) * BLOCK_M + seqlen_k - seqlen_q)
    full_end = 0
    if SPLIT:
        full_end = _full_key_end(pid_m, seqlen_q, seqlen_k, CAUSAL, BLOCK_M, BLOCK_N)
        for start_n in range(0, full_end, BLOCK_N):
            dq = _dq_tile(q, do, lse, delta, K_head, V_head, sk_s, sv_s, start_n, offs_m, offs_d, d_ok, dq,
                          seqlen_q, seqlen_k, qk_scale_log2, CAUSAL, IEEE, False, BLOCK_N, WIDE)
    for start_n in range(full_end, end_n, BLOCK_N):
        dq = _dq_tile(q, do, lse, delta, K_head, V_head, sk_s, sv_s, start_n, offs_m, offs_d, d_ok, dq,
                      seqlen_q, seqlen_k, qk_scale_log2, CAUSAL, IEEE, True, BLOCK_N, WIDE)
    tl.store(_rows(DQ + b * sdq_b + h * sdq_h, m0, offs_m, sdq_s, WIDE)[:, None] + offs_d[None, :],
             (dq * scale).to(DQ.dtype.element_ty), mask=md_mask)


@triton.jit
def _received_tile(Q_head, LSE_head, WEIGHT, sq_s, m0, kt, offs_n, offs_d, d_ok, received,
                   seqlen_q, seqlen_k, qk_scale_log2,
                   CAUSAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, IEEE: tl.constexpr, MASKED: tl.constexpr,
                   BLOCK_M: tl.constexpr, WIDE: tl.constexpr):
    offs_m = m0 + tl.arange(0, BLOCK_M)
    m_ok = offs_m < seqlen_q
    q = tl.load(_rows(Q_head, m0, offs_m, sq_s, WIDE)[:, None] + offs_d[None, :], mask=m_ok[:, None] & d_ok[None, :],
                other=0.0)
    lse = tl.load(LSE_head + offs_m, mask=m_ok, other=float("-inf"))
    p = _probs(q, kt, lse, offs_m, offs_n, seqlen_q, seqlen_k, qk_scale_log2, CAUSAL, IEEE, MASKED)
    if HAS_WEIGHT:
        p = p * tl.load(WEIGHT + offs_m, mask=m_ok, other=0.0)[:, None]
    return received + tl.sum(p, axis=0)


@triton.jit
def _attn_received_kernel(
    Q, K, LSE, WEIGHT, R,
    sq_b, sq_s, sq_h, sk_b, sk_s, sk_h,
    seqlen_q, seqlen_k, heads, group, head_dim, qk_scale_log2,
    CAUSAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, IEEE: tl.constexpr, SPLIT: tl.constexpr,
    WIDE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    bh, b, h = _batch_head(heads, WIDE)
    hk = h // group
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    kt = tl.load(_rows(K + b * sk_b + hk * sk_h, pid_n * BLOCK_N, offs_n, sk_s, WIDE)[None, :] + offs_d[:, None],
                 mask=(offs_n[None, :] < seqlen_k) & d_ok[:, None], other=0.0)
    Q_head = Q + b * sq_b + h * sq_h
    LSE_head = LSE + bh * seqlen_q
    received = tl.zeros([BLOCK_N], dtype=tl.float32)
    start_m = 0
    if CAUSAL:
        start_m = tl.maximum(pid_n * BLOCK_N - (seqlen_k - seqlen_q), 0) // BLOCK_M * BLOCK_M
    full_start = seqlen_q
    if SPLIT:
        full_start = _full_query_start(pid_n, start_m, seqlen_q, seqlen_k, CAUSAL, BLOCK_M, BLOCK_N)
    for m0 in range(start_m, tl.minimum(full_start, seqlen_q), BLOCK_M):
        received = _received_tile(Q_head, LSE_head, WEIGHT, sq_s, m0, kt, offs_n, offs_d, d_ok, received,
                                  seqlen_q, seqlen_k, qk_scale_log2, CAUSAL, HAS_WEIGHT, IEEE, True, BLOCK_M, WIDE)
    if SPLIT:
        for m0 in range(full_start, seqlen_q, BLOCK_M):
            received = _received_tile(Q_head, LSE_head, WEIGHT, sq_s, m0, kt, offs_n, offs_d, d_ok, received,
                                      seqlen_q, seqlen_k, qk_scale_log2, CAUSAL, HAS_WEIGHT, IEEE, False, BLOCK_M, WIDE)
    tl.store(R + bh * seqlen_k + offs_n, received, mask=offs_n < seqlen_k)


# Candidate tiles per kernel and head_dim bucket (BLOCK_D ≤ 64, 128, 256), for fp16/bf16; the first is the
# hand-picked one, the rest are timed against it on the GPU (_tune). The forward and dQ programs own a query
# block and stream key blocks; the dK/dV and received programs own a key block and stream query blocks.
_HALF_CANDIDATES = {
    "fwd": {64: [B(64, 64, 4), B(128, 64, 4), B(128, 128, 8)],
            128: [B(32, 32, 8), B(64, 64, 8), B(128, 64, 8)],
            256: [B(32, 32, 8), B(32, 64, 8, 2), B(32, 32, 4, 2)]},
    "dq": {64: [B(64, 64, 4), B(128, 64, 8), B(64, 32, 4)],
           128: [B(32, 32, 8), B(64, 32, 8), B(128, 32, 8, 2)],
           256: [B(32, 32, 8), B(32, 64, 8, 2)]},
    "dkdv": {64: [B(64, 64, 4), B(32, 64, 4), B(128, 64, 8)],
             128: [B(32, 32, 8), B(32, 64, 8), B(64, 64, 8)],
             256: [B(32, 32, 8), B(16, 32, 8, 2)]},
    "received": {64: [B(64, 64, 4), B(64, 128, 4), B(128, 128, 8)],
                 128: [B(32, 32, 8), B(64, 64, 4), B(64, 128, 8)],
                 256: [B(32, 32, 8), B(64, 64, 8, 2), B(32, 64, 8, 2)]},
}
# float32 (IEEE dot products, FMA only) keeps one smaller tile, unpipelined: at the half-precision sizes
# ptxas spills kilobytes per thread, D > 128 overflows an A100's shared memory, and at D = 256 the dK/dV
# kernel spills ~4 KB with 2 or 3 stages. Every tile here and above spills at most 16 bytes per thread in
# every kernel, causal or not, MHA or GQA (the compile tier: sm_90a, Triton 3.6 with its bundled ptxas);
# none has been timed on a GPU yet.
_FP32_BLOCKS = {64: B(32, 32, 8, 1), 128: B(16, 16, 8, 1), 256: B(16, 16, 8, 1)}


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def candidates(kernel: str, head_dim: int, seqlen_q: int, seqlen_k: int, dtype: torch.dtype) -> list:
    """The tiles `kernel` ("fwd", "dq", "dkdv", "received") may run with, fitted to the sequence lengths."""
    bucket = max(64, _block_d(head_dim))
    listed = [_FP32_BLOCKS[bucket]] if dtype == torch.float32 else _HALF_CANDIDATES[kernel][bucket]
    return _tune.fit(listed, seqlen_q, seqlen_k)


def _split(q) -> bool:
    """Whether the kernels run fully visible tiles in a loop of their own, without masks. Not for float32:
    its FMA-only dot products leave no registers for a second copy of the loop (the dK/dV kernel spills
    0.3–2 KB per thread at every float32 tile, ahead-of-time for sm_90a)."""
    return q.dtype != torch.float32


def _launch(kernel: str, q, seqlen_k: int, run, *flags) -> None:
    """Run `run(blocks)` with the tuned tile for this kernel and shape bucket."""
    batch, seqlen_q, heads, head_dim = q.shape
    key = (q.dtype, _block_d(head_dim), _tune.bucket(seqlen_q), _tune.bucket(seqlen_k),
           _tune.bucket(batch * heads), *flags)
    _tune.launch(f"attention.{kernel}", key, candidates(kernel, head_dim, seqlen_q, seqlen_k, q.dtype), run,
                 q.device)


def _strides(t):
    return t.stride(0), t.stride(1), t.stride(2)


# Element offset within one sample from which the kernels address rows in int64 (WIDE); tests lower it.
WIDE_FROM = 1 << 31


def wide(*tensors) -> bool:
    """Whether any (batch, seq, heads, dim) tensor spans WIDE_FROM elements or more within one sample."""
    return any(sum((n - 1) * abs(st) for n, st in zip(t.shape[1:], t.stride()[1:])) + 1 >= WIDE_FROM
               for t in tensors if t is not None)


def attention_fwd(q, k, v, causal: bool, scale: float, need_out: bool = True):
    """-> (out (B, S_q, H, D) or None, lse (B, H, S_q) float32). Last dims contiguous."""
    batch, seqlen_q, heads, head_dim = q.shape
    seqlen_k, kv_heads = k.shape[1], k.shape[2]
    lse = new_output((batch, heads, seqlen_q), torch.float32, q.device)
    out = new_output_like(q) if need_out else None
    vv, oo = (v, out) if need_out else (k, q)  # placeholders when only lse is wanted (HAS_V = False)

    long_rows = wide(q, k, v, out)

    def run(t):
        for s, programs in _grid.batch_slices(batch, heads):
            _attn_fwd_kernel[(triton.cdiv(seqlen_q, t.block_m), programs)](
                q[s], k[s], vv[s], oo[s], lse[s], *_strides(q), *_strides(k), *_strides(vv), *_strides(oo),
                seqlen_q, seqlen_k, heads, heads // kv_heads, head_dim, scale * LOG2E,
                CAUSAL=causal, HAS_V=need_out, IEEE=q.dtype == torch.float32, SPLIT=_split(q), WIDE=long_rows,
                BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_D=_block_d(head_dim),
                num_warps=t.num_warps, num_stages=t.num_stages,
            )

    _launch("fwd", q, seqlen_k, run, causal, need_out)
    return out, lse


def attention_bwd(dout, q, k, v, out, lse, causal: bool, scale: float):
    """-> (dq, dk, dv) in the inputs' dtypes."""
    batch, seqlen_q, heads, head_dim = q.shape
    seqlen_k, kv_heads = k.shape[1], k.shape[2]
    delta = new_output((batch, heads, seqlen_q), torch.float32, q.device)
    delta_rows = max(16, 4096 // _block_d(head_dim))   # 4096-element tiles: 32 per thread and operand
    dq, dk, dv = new_output_like(q), new_output_like(k), new_output_like(v)
    long_rows = wide(q, k, v, out, dout, dq, dk, dv)
    for s, programs in _grid.batch_slices(batch, heads):
        _attn_bwd_delta_kernel[(triton.cdiv(seqlen_q, delta_rows), programs)](
            out[s], dout[s], delta[s], *_strides(out), *_strides(dout), seqlen_q, heads, head_dim,
            WIDE=long_rows, BLOCK_M=delta_rows, BLOCK_D=_block_d(head_dim), num_warps=4)
    ieee = q.dtype == torch.float32
    group = heads // kv_heads

    def run_dkdv(t):
        for s, programs in _grid.batch_slices(batch, kv_heads):
            _attn_bwd_dkdv_kernel[(triton.cdiv(seqlen_k, t.block_n), programs)](
                q[s], k[s], v[s], dout[s], lse[s], delta[s], dk[s], dv[s],
                *_strides(q), *_strides(k), *_strides(v), *_strides(dout), *_strides(dk), *_strides(dv),
                seqlen_q, seqlen_k, heads, kv_heads, group, head_dim, scale, scale * LOG2E,
                CAUSAL=causal, IEEE=ieee, SPLIT=_split(q), WIDE=long_rows, BLOCK_M=t.block_m, BLOCK_N=t.block_n,
                BLOCK_D=_block_d(head_dim), num_warps=t.num_warps, num_stages=t.num_stages,
            )

    def run_dq(t):
        for s, programs in _grid.batch_slices(batch, heads):
            _attn_bwd_dq_kernel[(triton.cdiv(seqlen_q, t.block_m), programs)](
                q[s], k[s], v[s], dout[s], lse[s], delta[s], dq[s],
                *_strides(q), *_strides(k), *_strides(v), *_strides(dout), *_strides(dq),
                seqlen_q, seqlen_k, heads, group, head_dim, scale, scale * LOG2E,
                CAUSAL=causal, IEEE=ieee, SPLIT=_split(q), WIDE=long_rows, BLOCK_M=t.block_m, BLOCK_N=t.block_n,
                BLOCK_D=_block_d(head_dim), num_warps=t.num_warps, num_stages=t.num_stages,
            )

    # the dK/dV programs each loop over the `group` query heads of their key head: tune per group size
    _launch("dkdv", q, seqlen_k, run_dkdv, causal, group)
    _launch("dq", q, seqlen_k, run_dq, causal)
    return dq, dk, dv


def attention_received(q, k, lse, causal: bool, scale: float, query_weight=None):
    """-> (B, H, S_k) float32: per head, Σ_i w_i·p_ij."""
    batch, seqlen_q, heads, head_dim = q.shape
    seqlen_k, kv_heads = k.shape[1], k.shape[2]
    received = new_output((batch, heads, seqlen_k), torch.float32, q.device)
    weight = None if query_weight is None else query_weight.to(torch.float32).contiguous()
    long_rows = wide(q, k)

    def run(t):
        for s, programs in _grid.batch_slices(batch, heads):
            _attn_received_kernel[(triton.cdiv(seqlen_k, t.block_n), programs)](
                q[s], k[s], lse[s], weight if weight is not None else lse, received[s], *_strides(q), *_strides(k),
                seqlen_q, seqlen_k, heads, heads // kv_heads, head_dim, scale * LOG2E,
                CAUSAL=causal, HAS_WEIGHT=weight is not None, IEEE=q.dtype == torch.float32, SPLIT=_split(q),
                WIDE=long_rows,
                BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_D=_block_d(head_dim),
                num_warps=t.num_warps, num_stages=t.num_stages,
            )

    _launch("received", q, seqlen_k, run, causal, weight is not None)
    return received
