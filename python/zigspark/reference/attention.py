"""Scaled dot-product attention and the attention each key receives, in PyTorch, chunked over queries.

Layout (batch, seqlen, heads, head_dim) as flash-attn. Query head h reads key/value head h // (H / H_kv)
(GQA/MQA). With s = scale·q_i·k_j and causal masking aligned to the bottom-right corner (query i sees keys
j ≤ i + S_k − S_q):

    lse_i = log Σ_j exp(s_ij),   p_ij = exp(s_ij − lse_i),   o_i = Σ_j p_ij·v_j
    received_j = Σ_{i not excluded} p_ij                                  (per head)

A query that sees no key (causal, S_q > S_k) gets o = 0 and lse = −inf. Backward, with
δ_i = Σ_d dO_id·O_id:  dv_j = Σ_i p_ij·dO_i,  ds_ij = p_ij·(dO_i·v_j − δ_i),  dq_i = scale·Σ_j ds_ij·k_j,
dk_j = scale·Σ_i ds_ij·q_i (GQA: dk, dv summed over the query heads that share a key head).

Memory stays O(chunk·S_k) per head: queries are processed `chunk` at a time.
"""

from __future__ import annotations

import torch

from .precision import compute_dtype


def _heads(q, k, v=None):
    """(B, S, H, D) -> (B, H, S, D) in the compute dtype, key/value heads repeated to the query heads."""
    acc = compute_dtype(q.dtype)
    group = q.shape[2] // k.shape[2]
    qh = q.transpose(1, 2).to(acc)
    kh = k.transpose(1, 2).to(acc).repeat_interleave(group, dim=1)
    vh = None if v is None else v.transpose(1, 2).to(acc).repeat_interleave(group, dim=1)
    return qh, kh, vh, group


def _scores(qh, kh, i0, i1, scale, causal, seqlen_q):
    s = torch.matmul(qh[:, :, i0:i1], kh.transpose(-1, -2)) * scale
    if causal:
        seqlen_k = kh.shape[2]
        i = torch.arange(i0, i1, device=s.device)[:, None]
        j = torch.arange(seqlen_k, device=s.device)[None, :]
        s = s.masked_fill(j > i + (seqlen_k - seqlen_q), float("-inf"))
    return s


def _probs(s, lse):
    """exp(s − lse) with rows that see no key (lse = −inf) giving 0, not NaN."""
    return torch.exp(s - lse[..., None]).nan_to_num(0.0)


def attention_forward(q, k, v, causal=False, scale=None, chunk=1024):
    """(out (B, S_q, H, D) in q's dtype, lse (B, H, S_q) in the compute dtype)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    qh, kh, vh, _ = _heads(q, k, v)
    seqlen_q = qh.shape[2]
    outs, lses = [], []
    for i0 in range(0, seqlen_q, chunk):
        i1 = min(seqlen_q, i0 + chunk)
        s = _scores(qh, kh, i0, i1, scale, causal, seqlen_q)
        lse = torch.logsumexp(s, dim=-1)
        outs.append(torch.matmul(_probs(s, lse), vh))
        lses.append(lse)
    out = torch.cat(outs, dim=2) if outs else qh.new_zeros(qh.shape[:3] + (vh.shape[-1],))
    lse = torch.cat(lses, dim=2) if lses else qh.new_zeros(qh.shape[:3])
    return out.transpose(1, 2).to(q.dtype), lse


def attention_backward(dout, q, k, v, out, lse, causal=False, scale=None, chunk=1024):
    """Closed-form (dq, dk, dv) in the inputs' dtypes, recomputing p chunk by chunk from lse."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    qh, kh, vh, group = _heads(q, k, v)
    acc = qh.dtype
    do = dout.transpose(1, 2).to(acc)
    delta = (do * out.transpose(1, 2).to(acc)).sum(-1)
    seqlen_q = qh.shape[2]
    dq = torch.zeros_like(qh)
    dk = torch.zeros_like(kh)
    dv = torch.zeros_like(vh)
    for i0 in range(0, seqlen_q, chunk):
        i1 = min(seqlen_q, i0 + chunk)
        p = _probs(_scores(qh, kh, i0, i1, scale, causal, seqlen_q), lse[:, :, i0:i1].to(acc))
        dv += torch.matmul(p.transpose(-1, -2), do[:, :, i0:i1])
        ds = p * (torch.matmul(do[:, :, i0:i1], vh.transpose(-1, -2)) - delta[:, :, i0:i1, None])
        dq[:, :, i0:i1] = torch.matmul(ds, kh) * scale
        dk += torch.matmul(ds.transpose(-1, -2), qh[:, :, i0:i1]) * scale
    b, h, sk, d = dk.shape
    dk = dk.reshape(b, h // group, group, sk, d).sum(2)
    dv = dv.reshape(b, h // group, group, sk, -1).sum(2)
    return dq.transpose(1, 2).to(q.dtype), dk.transpose(1, 2).to(k.dtype), dv.transpose(1, 2).to(v.dtype)


def attention_received(q, k, lse=None, causal=False, scale=None, query_weight=None, chunk=1024):
    """Per head and key, Σ_i weight_i·p_ij: (B, H, S_k) in the compute dtype. `query_weight` (S_q,) is 1 for
    the queries that count and 0 for excluded ones (None: all count). lse is recomputed when not given."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    qh, kh, _, _ = _heads(q, k)
    seqlen_q = qh.shape[2]
    received = qh.new_zeros(qh.shape[:2] + (kh.shape[2],))
    for i0 in range(0, seqlen_q, chunk):
        i1 = min(seqlen_q, i0 + chunk)
        s = _scores(qh, kh, i0, i1, scale, causal, seqlen_q)
        chunk_lse = torch.logsumexp(s, dim=-1) if lse is None else lse[:, :, i0:i1].to(qh.dtype)
        p = _probs(s, chunk_lse)
        if query_weight is not None:
            p = p * query_weight[i0:i1].to(p.dtype)[:, None]
        received += p.sum(2)
    return received
