"""Spark Transformer's sparse FFN and sparse attention (arXiv 2506.06644), on statistical top-k.

Spark FFN, for a token x ∈ R^d with predictor width r, K1 ∈ R^{f×r}, K2 ∈ R^{f×(d−r)}, V ∈ R^{d×f}:

    p = K1·x[:r]                         (the cheap predictor: all f neurons, r of the d inputs)
    a = GELU(stat_topk(p, density)) ⊙ (K2·x[r:])
    y = V·a                              (only the ~density·f active neurons' K2 rows and V columns matter)

Spark attention, per head, with q, k split at r (predictor / remainder) and the keys j visible to query i:

    s1_ij = q_i[:r]·k_j[:r] / √r,    s2_ij = q_i[r:]·k_j[r:] / √(D − r)
    keep_ij = s1_ij > θ_i,  θ_i = mean_j s1_ij + std_j s1_ij·Φ⁻¹(1 − top_k/n_i)   (over the n_i visible keys;
              all visible keys are kept when n_i ≤ top_k)
    w_ij = softmax_{j kept}(s1_ij) · softplus(s2_ij),    o_i = Σ_j w_ij·v_j

Choices where the paper's public description is open (configurable in zigspark.nn): the predictor scores
are scaled by 1/√r and the gate scores by 1/√(D − r); the softplus gate multiplies the softmax weights
without renormalising; the statistics of the top-k use the population std over the visible keys.

Training runs the dense-masked computation (exact gradients, through stat_topk's backward for the FFN).
Inference can run `spark_ffn(..., sparse=True)`, which computes only the active neurons: the reference
gathers them per token; Triton (triton_kernels/spark_ffn.py) masks inactive K2 rows and Vᵀ rows out of
its loads. A CUDA kernel and a fused Spark-attention kernel are open work (#5).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import backends
from ..validation import check_float_tensor, check_same_device
from .stat_topk import stat_topk

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
backends.register_op("spark_ffn", {"reference": _DTYPES, "triton": _DTYPES[:3]})
backends.register_op("spark_attention", {"reference": _DTYPES})


def _check_ffn(x, K1, K2, V, density):
    for name, t in (("x", x), ("K1", K1), ("K2", K2), ("V", V)):
        check_float_tensor(name, t, _DTYPES)
    d = x.shape[-1]
    if K1.dim() != 2 or K2.dim() != 2 or V.dim() != 2:
        raise ValueError("K1 (d_ff, r), K2 (d_ff, d_model − r) and V (d_model, d_ff) must be 2-D")
    d_ff, r = K1.shape
    if not 0 < r < d:
        raise ValueError(f"predictor_dim r = {r} must satisfy 0 < r < d_model = {d}")
    if K2.shape != (d_ff, d - r):
        raise ValueError(f"K2 must be (d_ff, d_model − r) = ({d_ff}, {d - r}), got {tuple(K2.shape)}")
    if V.shape != (d, d_ff):
        raise ValueError(f"V must be (d_model, d_ff) = ({d}, {d_ff}), got {tuple(V.shape)}")
    if not 0.0 < float(density) < 1.0:
        raise ValueError(f"density must be in the open interval (0, 1), got {density}")
    return check_same_device(x=x, K1=K1, K2=K2, V=V), r


def spark_ffn(x, K1, K2, V, density=0.08, *, sparse=False, return_mask=False, backend="auto"):
    """Spark FFN (formula in the module docstring). x (..., d_model) -> (..., d_model).

    sparse=False: the dense-masked computation (training; differentiable). sparse=True: only the active
    neurons' K2 rows and V columns are read (inference; not differentiable). return_mask also returns the
    (..., d_ff) boolean mask of active neurons.
    """
    device, r = _check_ffn(x, K1, K2, V, density)
    chosen = backends.resolve("spark_ffn", backend, device, x.dtype)
    predictor = F.linear(x[..., :r], K1)
    gate, mask = stat_topk(predictor, density=density, return_mask=True)
    if not sparse:
        out = F.linear(F.gelu(gate) * F.linear(x[..., r:], K2), V)
        return (out, mask) if return_mask else out
    if chosen == "triton":
        from ..triton_kernels.spark_ffn import spark_ffn_sparse

        with torch.no_grad():
            flat = x.reshape(-1, x.shape[-1]).contiguous()
            out = spark_ffn_sparse(flat, gate.reshape(-1, K1.shape[0]).contiguous(), K2.contiguous(),
                                   V.t().contiguous(), r)
        out = out.reshape(x.shape)
        return (out, mask) if return_mask else out
    with torch.no_grad():
        flat_x, flat_gate, flat_mask = x.reshape(-1, x.shape[-1]), gate.reshape(-1, K1.shape[0]), \
            mask.reshape(-1, K1.shape[0])
        out = torch.empty_like(flat_x)
        for t in range(flat_x.shape[0]):          # one token at a time: gather the active neurons only
            active = flat_mask[t].nonzero().squeeze(1)
            a = F.gelu(flat_gate[t, active]) * (K2[active] @ flat_x[t, r:])
            out[t] = V[:, active] @ a
        out = out.reshape(x.shape)
    return (out, mask) if return_mask else out


def spark_attention(q, k, v, top_k=256, predictor_dim=None, *, causal=True, chunk=1024, return_kept=False,
                    backend="auto"):
    """Spark attention (formula in the module docstring). q, k, v: (batch, seqlen, heads, head_dim).

    predictor_dim r defaults to head_dim // 4. Returns (batch, seqlen_q, heads, head_dim) [and the number
    of keys kept per query, (batch, heads, seqlen_q)]. The reference processes `chunk` queries at a time.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float_tensor(name, t, _DTYPES)
        if t.dim() != 4:
            raise ValueError(f"{name} must be (batch, seqlen, heads, head_dim), got shape {tuple(t.shape)}")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)} and v {tuple(v.shape)} must agree in batch, "
                         "heads and head_dim (and k, v in every dimension)")
    head_dim = q.shape[-1]
    r = head_dim // 4 if predictor_dim is None else predictor_dim
    if not 0 < r < head_dim:
        raise ValueError(f"predictor_dim r = {r} must satisfy 0 < r < head_dim = {head_dim}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be a positive int, got {top_k!r}")
    device = check_same_device(q=q, k=k, v=v)
    backends.resolve("spark_attention", backend, device, q.dtype)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    qh, kh, vh = (t.transpose(1, 2).to(acc) for t in (q, k, v))          # (B, H, S, D)
    seqlen_q, seqlen_k = qh.shape[2], kh.shape[2]
    outs, kept_counts = [], []
    for i0 in range(0, seqlen_q, chunk):
        i1 = min(seqlen_q, i0 + chunk)
        s1 = qh[:, :, i0:i1, :r] @ kh[:, :, :, :r].transpose(-1, -2) / math.sqrt(r)
        s2 = qh[:, :, i0:i1, r:] @ kh[:, :, :, r:].transpose(-1, -2) / math.sqrt(head_dim - r)
        visible = torch.ones(i1 - i0, seqlen_k, dtype=torch.bool, device=q.device)
        if causal:
            i = torch.arange(i0, i1, device=q.device)[:, None]
            visible = torch.arange(seqlen_k, device=q.device)[None, :] <= i + (seqlen_k - seqlen_q)
        n_visible = visible.sum(-1).to(acc)                               # (c,)
        vis_f = visible.to(acc)
        mean = (s1 * vis_f).sum(-1, keepdim=True) / n_visible.clamp_min(1)[:, None]
        var = (((s1 - mean) * vis_f) ** 2).sum(-1, keepdim=True) / n_visible.clamp_min(1)[:, None]
        frac = (top_k / n_visible.clamp_min(1)).clamp(max=1.0)
        z = torch.special.ndtri((1 - frac).clamp(min=1e-12))[:, None]     # −inf where every key is kept
        theta = torch.where((n_visible > top_k)[:, None], mean + z * var.sqrt(), torch.full_like(mean, -math.inf))
        keep = visible & (s1 > theta)
        logits = s1.masked_fill(~keep, float("-inf"))
        weights = torch.softmax(logits, dim=-1).nan_to_num(0.0) * F.softplus(s2)
        outs.append(weights @ vh)
        kept_counts.append(keep.sum(-1))
    out = torch.cat(outs, dim=2).transpose(1, 2).to(q.dtype)
    return (out, torch.cat(kept_counts, dim=2)) if return_kept else out
