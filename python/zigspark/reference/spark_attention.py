"""Spark attention (Spark Transformer, arXiv 2506.06644) in PyTorch, chunked over queries.

Layout (batch, seqlen, heads, head_dim), as flash-attn. Per head, q and k split at r (predictor / rest),
a = 1/√r, c = 1/√(D − r), and the keys j visible to query i (causal: j ≤ i + S_k − S_q, bottom-right
aligned; otherwise all S_k of them), n_i of them:

    s1_ij = a·q_i[:r]·k_j[:r],   s2_ij = c·q_i[r:]·k_j[r:]
    θ_i   = mean_j s1_ij + std_j s1_ij · Φ⁻¹(1 − top_k/n_i)     (population std over the visible keys;
            θ_i = −∞, every visible key kept, when n_i ≤ top_k)
    keep_ij = visible_ij ∧ s1_ij > θ_i
    lse_i = log Σ_{j kept} exp(s1_ij),   P_ij = exp(s1_ij − lse_i) on kept keys, 0 elsewhere
    g_ij  = softplus(s2_ij),   W = P ⊙ g   (the gate is not renormalised),   o_i = Σ_j W_ij·v_j

A query that keeps no key (it sees none: causal with S_q > S_k) gets o = 0, lse = θ = −∞, kept = 0.

Backward. The mask is piecewise constant, so θ carries no gradient. With dO the incoming gradient,
dpv_ij = dO_i·v_j and Δ_i = Σ_j W_ij·dpv_ij (= dO_i·o_i):

    dV_j  = Σ_i W_ij·dO_i
    ds2   = P ⊙ dpv ⊙ sigmoid(s2)                 (∂W/∂s2 = P·softplus′(s2), softplus′ = sigmoid)
    ds1   = P ⊙ (g ⊙ dpv − Δ)                     (the softmax Jacobian applied to dP = g ⊙ dpv)
    dq_i[:r] = a·Σ_j ds1_ij·k_j[:r],   dq_i[r:] = c·Σ_j ds2_ij·k_j[r:]
    dk_j[:r] = a·Σ_i ds1_ij·q_i[:r],   dk_j[r:] = c·Σ_i ds2_ij·q_i[r:]

The backward here is closed-form (a custom op's implementation runs below autograd and cannot
differentiate itself); the tests check it against autograd of a naive loop. It recomputes s1, s2 and the
mask chunk by chunk from the saved lse and θ, and takes Δ = dO·o from the saved output, as flash attention
and reference/attention.py do: a half-precision run then carries the rounding of the stored o into Δ
exactly as the kernels do (in float64 it is exact). Computation is in float32 (float64 for float64
inputs); memory stays O(chunk·S_k) per head.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .precision import compute_dtype


def visible_counts(seqlen_q: int, seqlen_k: int, causal: bool, device) -> torch.Tensor:
    """n_i, the number of keys query i sees: (seqlen_q,) int64."""
    if not causal:
        return torch.full((seqlen_q,), seqlen_k, dtype=torch.int64, device=device)
    i = torch.arange(seqlen_q, device=device)
    return (i + (seqlen_k - seqlen_q) + 1).clamp(0, seqlen_k)


def quantile_z(n_visible: torch.Tensor, top_k: int, dtype: torch.dtype) -> torch.Tensor:
    """Φ⁻¹(1 − top_k/n_i) per query, −∞ where n_i ≤ top_k (every visible key kept). It depends only on
    the query's row, so the kernels get it as a small precomputed vector."""
    n = n_visible.to(dtype)
    frac = (top_k / n.clamp_min(1)).clamp(max=1.0)
    z = torch.special.ndtri((1 - frac).clamp(min=1e-12))
    return torch.where(n > top_k, z, torch.full_like(z, -math.inf))


def _heads(t: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    return t.transpose(1, 2).to(acc)                                   # (B, H, S, D)


def _visible(i0, i1, seqlen_q, seqlen_k, causal, device):
    if not causal:
        return torch.ones(i1 - i0, seqlen_k, dtype=torch.bool, device=device)
    i = torch.arange(i0, i1, device=device)[:, None]
    return torch.arange(seqlen_k, device=device)[None, :] <= i + (seqlen_k - seqlen_q)


def _scores(qh, kh, i0, i1, r):
    head_dim = qh.shape[-1]
    s1 = qh[:, :, i0:i1, :r] @ kh[:, :, :, :r].transpose(-1, -2) / math.sqrt(r)
    s2 = qh[:, :, i0:i1, r:] @ kh[:, :, :, r:].transpose(-1, -2) / math.sqrt(head_dim - r)
    return s1, s2


def _threshold(s1, visible, z):
    """θ per query of the chunk, (B, H, c, 1): two-pass mean and population variance over visible keys."""
    vis_f = visible.to(s1.dtype)
    n = vis_f.sum(-1).clamp_min(1)[:, None]
    mean = (s1 * vis_f).sum(-1, keepdim=True) / n
    var = (((s1 - mean) * vis_f) ** 2).sum(-1, keepdim=True) / n
    z = z[:, None]
    return torch.where(z == -math.inf, torch.full_like(mean, -math.inf), mean + z * var.sqrt())


def spark_attention_forward(q, k, v, top_k: int, r: int, causal: bool, chunk: int = 1024):
    """(out (B, S_q, H, D) in q's dtype, lse, θ (B, H, S_q) in the compute dtype, kept (B, H, S_q) int64).
    Differentiable by autograd in q, k, v (the mask is not)."""
    acc = compute_dtype(q.dtype)
    qh, kh, vh = (_heads(t, acc) for t in (q, k, v))
    seqlen_q, seqlen_k = qh.shape[2], kh.shape[2]
    z_all = quantile_z(visible_counts(seqlen_q, seqlen_k, causal, q.device), top_k, acc)
    outs, lses, thetas, kept = [], [], [], []
    for i0 in range(0, seqlen_q, chunk):
        i1 = min(seqlen_q, i0 + chunk)
        s1, s2 = _scores(qh, kh, i0, i1, r)
        visible = _visible(i0, i1, seqlen_q, seqlen_k, causal, q.device)
        theta = _threshold(s1, visible, z_all[i0:i1])
        keep = visible & (s1 > theta)
        logits = s1.masked_fill(~keep, -math.inf)
        weights = torch.softmax(logits, dim=-1).nan_to_num(0.0) * F.softplus(s2)
        outs.append(weights @ vh)
        lses.append(torch.logsumexp(logits, dim=-1))
        thetas.append(theta.squeeze(-1))
        kept.append(keep.sum(-1))
    out = torch.cat(outs, dim=2).transpose(1, 2).to(q.dtype)
    return out, torch.cat(lses, dim=2), torch.cat(thetas, dim=2), torch.cat(kept, dim=2)


def spark_attention_backward(dout, q, k, v, out, lse, theta, r: int, causal: bool, chunk: int = 1024):
    """Closed-form (dq, dk, dv) in the inputs' dtypes (formula at the top of this file)."""
    acc = compute_dtype(q.dtype)
    qh, kh, vh, do = (_heads(t, acc) for t in (q, k, v, dout))
    delta = (do * _heads(out, acc)).sum(-1, keepdim=True)                 # (B, H, S_q, 1)
    lse, theta = lse.to(acc), theta.to(acc)
    seqlen_q, seqlen_k, head_dim = qh.shape[2], kh.shape[2], qh.shape[3]
    a, c = 1 / math.sqrt(r), 1 / math.sqrt(head_dim - r)
    dq, dk, dv = torch.zeros_like(qh), torch.zeros_like(kh), torch.zeros_like(vh)
    for i0 in range(0, seqlen_q, chunk):
        i1 = min(seqlen_q, i0 + chunk)
        s1, s2 = _scores(qh, kh, i0, i1, r)
        keep = _visible(i0, i1, seqlen_q, seqlen_k, causal, q.device) & (s1 > theta[:, :, i0:i1, None])
        p = torch.exp(s1 - lse[:, :, i0:i1, None]).masked_fill(~keep, 0.0)   # inf − inf never survives
        g = F.softplus(s2)
        w = p * g
        do_c = do[:, :, i0:i1]
        dpv = do_c @ vh.transpose(-1, -2)
        ds2 = p * dpv * torch.sigmoid(s2)
        ds1 = p * (g * dpv - delta[:, :, i0:i1])
        dv += w.transpose(-1, -2) @ do_c
        dq[:, :, i0:i1, :r] = a * (ds1 @ kh[..., :r])
        dq[:, :, i0:i1, r:] = c * (ds2 @ kh[..., r:])
        dk[..., :r] += a * (ds1.transpose(-1, -2) @ qh[:, :, i0:i1, :r])
        dk[..., r:] += c * (ds2.transpose(-1, -2) @ qh[:, :, i0:i1, r:])
    return tuple(t.transpose(1, 2).to(like.dtype) for t, like in ((dq, q), (dk, k), (dv, v)))
