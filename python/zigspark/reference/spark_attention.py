"""Spark attention (Spark Transformer, arXiv 2506.06644) in PyTorch, chunked over queries.

Layout (batch, seqlen, heads, head_dim), as flash-attn. Per head, q and k split at r (predictor / rest),
scales a, c (default 1/√r and 1/√(D − r)), and the keys j visible to query i (causal: j ≤ i + S_k − S_q, bottom-right
aligned; otherwise all S_k of them), n_i of them:

    s1_ij = a·q_i[:r]·k_j[:r],   s2_ij = c·q_i[r:]·k_j[r:]
    θ_i   = mean_j s1_ij + σ_i · Φ⁻¹(1 − top_k/n_i),   σ_i² = Σ_j (s1_ij − mean)² / (n_i − std_correction)
            (over the visible keys; std_correction 0: the population std, 1: the sample std;
            θ_i = −∞, every visible key kept, when n_i ≤ top_k, and when σ = 0: all the scores tie
            at the mean, and s1 > θ would keep none of them; σ ≤ 2⁻¹⁶·|mean| counts as 0, since the
            mean of equal scores rounds and leaves a rounding-level σ)
    keep_ij = visible_ij ∧ s1_ij > θ_i,   g_ij = softplus(s2_ij)
    gate multiplies (default):   lse_i = log Σ_{j kept} exp(s1_ij),   P_ij = exp(s1_ij − lse_i),   W = P ⊙ g
    gate renormalised:           t = s1 + log g,   lse_i = log Σ_{j kept} exp(t_ij),   W_ij = exp(t_ij − lse_i)
                                 (W = P ⊙ g / Σ_j P ⊙ g: the weights sum to 1 again)
    o_i = Σ_j W_ij·v_j   (W, P are 0 on keys not kept)

A query that keeps no key (it sees none: causal with S_q > S_k) gets o = 0, lse = θ = −∞, kept = 0.
log g is taken as s2 below s2 = −80, where softplus(s2) = e^{s2}(1 − O(e^{s2})) would underflow next.

Backward. The mask is piecewise constant, so θ carries no gradient. With dO the incoming gradient,
dpv_ij = dO_i·v_j and Δ_i = Σ_j W_ij·dpv_ij (= dO_i·o_i):

    dV_j  = Σ_i W_ij·dO_i
    gate multiplies:
      ds2 = P ⊙ dpv ⊙ sigmoid(s2)                 (∂W/∂s2 = P·softplus′(s2), softplus′ = sigmoid)
      ds1 = P ⊙ (g ⊙ dpv − Δ)                     (the softmax Jacobian applied to dP = g ⊙ dpv)
    gate renormalised (a softmax over t):
      ds1 = W ⊙ (dpv − Δ),   ds2 = ds1 ⊙ sigmoid(s2)/g   (∂t/∂s2 = softplus′/softplus; 1 below −80)
    dq_i[:r] = a·Σ_j ds1_ij·k_j[:r],   dq_i[r:] = c·Σ_j ds2_ij·k_j[r:]
    dk_j[:r] = a·Σ_i ds1_ij·q_i[:r],   dk_j[r:] = c·Σ_i ds2_ij·q_i[r:]

The backward here is closed-form (a custom op's implementation runs below autograd and cannot
differentiate itself); the tests check it against autograd of a naive loop. It recomputes s1, s2 and the
mask chunk by chunk from the saved lse and θ, and takes Δ = dO·o from the saved output, as flash attention
and reference/attention.py do: a half-precision run then carries the rounding of the stored o into Δ
exactly as the kernels do (in float64 it is exact). Computation is in float32 (float64 for float64
inputs). Memory stays bounded: queries go a chunk at a time (at most `chunk` rows, and about as many
scores as reference/attention.py allows), and each chunk's score tensors are updated in place.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .attention import query_chunks, softmax_
from .precision import compute_dtype, exp_


def visible_counts(seqlen_q: int, seqlen_k: int, causal: bool, device) -> torch.Tensor:
    """n_i, the number of keys query i sees: (seqlen_q,) int64."""
    if not causal:
        return torch.full((seqlen_q,), seqlen_k, dtype=torch.int64, device=device)
    i = torch.arange(seqlen_q, device=device)
    return (i + (seqlen_k - seqlen_q) + 1).clamp(0, seqlen_k)


def quantile_z(n_visible: torch.Tensor, top_k: int, dtype: torch.dtype, std_correction: float = 0.0) -> torch.Tensor:
    """Φ⁻¹(1 − top_k/n_i)·√(n_i/(n_i − std_correction)) per query, −∞ where n_i ≤ top_k (every visible key
    kept). The factor turns the population std the passes compute into the corrected one (n_i ≥ 2 wherever
    it is used, and std_correction ≤ 1). It depends only on the query's row, so the kernels get it as a
    small precomputed vector."""
    n = n_visible.to(dtype)
    frac = (top_k / n.clamp_min(1)).clamp(max=1.0)
    z = torch.special.ndtri((1 - frac).clamp(min=1e-12))
    if std_correction:
        z = z * (n / (n - std_correction).clamp_min(1e-12)).sqrt()
    return torch.where(n > top_k, z, torch.full_like(z, -math.inf))


TIED_SPREAD = 2.0 ** -16  # σ ≤ this·|mean|: the scores are equal up to rounding (the kernels use the same)
LOG_GATE_CUTOFF = -80.0  # below it log softplus(s2) = s2 to far below any ulp, and softplus nears underflow


def log_gate(s2: torch.Tensor) -> torch.Tensor:
    """log softplus(s2), without the −∞ that log of an underflowed softplus gives."""
    return torch.where(s2 < LOG_GATE_CUTOFF, s2, F.softplus(s2).log())


def gate_ratio(s2: torch.Tensor) -> torch.Tensor:
    """softplus′/softplus = sigmoid(s2)/softplus(s2), 1 below the cutoff (both are e^{s2} there)."""
    return torch.where(s2 < LOG_GATE_CUTOFF, torch.ones_like(s2), s2.sigmoid() / F.softplus(s2))


def _heads(t: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    return t.transpose(1, 2).to(acc)                                   # (B, H, S, D)


def _visible(i0, i1, seqlen_q, seqlen_k, causal, device):
    """(c, S_k) bool: the keys each query of the chunk sees; None when it sees all of them."""
    if not causal:
        return None
    i = torch.arange(i0, i1, device=device)[:, None]
    return torch.arange(seqlen_k, device=device)[None, :] <= i + (seqlen_k - seqlen_q)


def default_scales(head_dim: int, r: int) -> tuple[float, float]:
    """(a, c) = (1/√r, 1/√(D − r)): each score part scaled by its own width, as attention scales by 1/√D."""
    return r ** -0.5, (head_dim - r) ** -0.5


def _scaled(qh, r, scales):
    """Contiguous q[:r]·a and q[r:]·c, so that the score matmuls need no scaling pass and no copy."""
    a, c = scales
    return qh[..., :r] * a, qh[..., r:] * c


def _split(kh, r):
    """Contiguous k[:r]ᵀ and k[r:]ᵀ, made once: a matmul with a strided slice would copy it per chunk."""
    return kh[..., :r].transpose(-1, -2).contiguous(), kh[..., r:].transpose(-1, -2).contiguous()


def _scores(q1, q2, k1t, k2t, i0, i1):
    return q1[:, :, i0:i1] @ k1t, q2[:, :, i0:i1] @ k2t


def _threshold(s1, visible, z):
    """θ per query of the chunk, (B, H, c, 1): mean and population variance (two-pass) over visible keys."""
    if visible is None:                          # (torch.var_mean is ~10x slower than this on CPU)
        mean = s1.mean(-1, keepdim=True)
        var = (s1 - mean).square_().mean(-1, keepdim=True)
    else:
        vis_f = visible.to(s1.dtype)
        n = vis_f.sum(-1).clamp_min(1)[:, None]
        mean = (s1 * vis_f).sum(-1, keepdim=True) / n
        var = (s1 - mean).mul_(vis_f).square_().sum(-1, keepdim=True) / n
    z = z[:, None]
    dense = (z == -math.inf) | (var <= (TIED_SPREAD * mean).square())
    return torch.where(dense, torch.full_like(mean, -math.inf), mean + z * var.sqrt())


def _kept(s1, theta, visible):
    keep = s1 > theta
    return keep if visible is None else keep.logical_and_(visible)


def spark_attention_forward(q, k, v, top_k: int, r: int, causal: bool, chunk: int = 1024, scales=None,
                            std_correction: float = 0.0, renormalize_gate: bool = False):
    """(out (B, S_q, H, D) in q's dtype, lse, θ (B, H, S_q) in the compute dtype, kept (B, H, S_q) int64).
    The score tensors are updated in place, so this is not differentiable by autograd: the op registers
    spark_attention_backward."""
    acc = compute_dtype(q.dtype)
    qh, kh, vh = (_heads(t, acc) for t in (q, k, v))
    (batch, heads, seqlen_q, _), seqlen_k = qh.shape, kh.shape[2]
    scales = scales or default_scales(qh.shape[-1], r)
    (q1, q2), (k1t, k2t) = _scaled(qh, r, scales), _split(kh, r)
    z_all = quantile_z(visible_counts(seqlen_q, seqlen_k, causal, q.device), top_k, acc, std_correction)
    outs, lses, thetas, kept = [], [], [], []
    for i0, i1 in query_chunks(seqlen_q, batch * heads * seqlen_k, q.device, chunk):
        s1, s2 = _scores(q1, q2, k1t, k2t, i0, i1)
        visible = _visible(i0, i1, seqlen_q, seqlen_k, causal, q.device)
        theta = _threshold(s1, visible, z_all[i0:i1])
        keep = _kept(s1, theta, visible)
        if renormalize_gate:
            l, lse = softmax_(s1.add_(log_gate(s2)).masked_fill_(~keep, -math.inf))   # s1 -> unnormalised W
            outs.append((s1 @ vh).div_(l))
        else:
            l, lse = softmax_(s1.masked_fill_(~keep, -math.inf))            # s1 -> unnormalised P
            outs.append((F.softplus(s2).mul_(s1) @ vh).div_(l))              # W = P ⊙ softplus(s2)
        lses.append(lse)
        thetas.append(theta.squeeze(-1))
        kept.append(keep.sum(-1))
    out = torch.cat(outs, dim=2).transpose(1, 2).to(q.dtype)
    return out, torch.cat(lses, dim=2), torch.cat(thetas, dim=2), torch.cat(kept, dim=2)


def spark_attention_backward(dout, q, k, v, out, lse, theta, r: int, causal: bool, chunk: int = 1024,
                             scales=None, renormalize_gate: bool = False):
    """Closed-form (dq, dk, dv) in the inputs' dtypes (formula at the top of this file)."""
    acc = compute_dtype(q.dtype)
    qh, kh, vh, do = (_heads(t, acc) for t in (q, k, v, dout))
    delta = (do * _heads(out, acc)).sum(-1, keepdim=True)                 # (B, H, S_q, 1)
    lse, theta = lse.to(acc), theta.to(acc)
    (batch, heads, seqlen_q, _), seqlen_k = qh.shape, kh.shape[2]
    scales = scales or default_scales(qh.shape[-1], r)
    (q1, q2), (k1t, k2t) = _scaled(qh, r, scales), _split(kh, r)
    k1, k2 = _scaled(kh, r, scales)
    vt = vh.transpose(-1, -2).contiguous()
    dq, dk1, dk2, dv = torch.empty_like(qh), torch.zeros_like(k1), torch.zeros_like(k2), torch.zeros_like(vh)
    for i0, i1 in query_chunks(seqlen_q, batch * heads * seqlen_k, q.device, chunk):
        s1, s2 = _scores(q1, q2, k1t, k2t, i0, i1)
        keep = _kept(s1, theta[:, :, i0:i1, None], _visible(i0, i1, seqlen_q, seqlen_k, causal, q.device))
        do_c = do[:, :, i0:i1]
        dpv = do_c @ vt
        if renormalize_gate:
            w = exp_(s1.add_(log_gate(s2)).sub_(lse[:, :, i0:i1, None])).masked_fill_(~keep, 0.0)
            dv += w.transpose(-1, -2) @ do_c
            ds1 = dpv.sub_(delta[:, :, i0:i1]).mul_(w)                   # W ⊙ (dpv − Δ)
            ds2 = gate_ratio(s2).mul_(ds1)                               # ds1 ⊙ sigmoid(s2)/g
        else:
            p = exp_(s1.sub_(lse[:, :, i0:i1, None])).masked_fill_(~keep, 0.0)  # inf − inf never survives
            g = F.softplus(s2)
            dv += (g * p).transpose(-1, -2) @ do_c                       # W = P ⊙ g
            ds1 = g.mul_(dpv).sub_(delta[:, :, i0:i1]).mul_(p)           # P ⊙ (g ⊙ dpv − Δ)
            ds2 = s2.sigmoid_().mul_(dpv).mul_(p)                        # P ⊙ dpv ⊙ sigmoid(s2)
        dq[:, :, i0:i1, :r] = ds1 @ k1
        dq[:, :, i0:i1, r:] = ds2 @ k2
        dk1 += ds1.transpose(-1, -2) @ q1[:, :, i0:i1]
        dk2 += ds2.transpose(-1, -2) @ q2[:, :, i0:i1]
    dk = torch.cat([dk1, dk2], -1)
    return tuple(t.transpose(1, 2).to(like.dtype) for t, like in ((dq, q), (dk, k), (dv, v)))
