"""Scaled dot-product attention and the attention each key receives, in PyTorch, chunked over queries.

Layout (batch, seqlen, heads, head_dim) as flash-attn. Query head h reads key/value head h // (H / H_kv)
(GQA/MQA). With s = scale·q_i·k_j and causal masking aligned to the bottom-right corner (query i sees keys
j ≤ i + S_k − S_q):

    lse_i = log Σ_j exp(s_ij),   p_ij = exp(s_ij − lse_i),   o_i = Σ_j p_ij·v_j
    received_j = Σ_{i not excluded} p_ij                                  (per head)

A query that sees no key (causal, S_q > S_k) gets o = 0 and lse = −inf. Backward, with
δ_i = Σ_d dO_id·O_id:  dv_j = Σ_i p_ij·dO_i,  ds_ij = p_ij·(dO_i·v_j − δ_i),  dq_i = scale·Σ_j ds_ij·k_j,
dk_j = scale·Σ_i ds_ij·q_i (GQA: dk, dv summed over the query heads that share a key head).

Memory stays bounded: queries are processed a chunk at a time, chunks of about _CHUNK_SCORES scores across
all heads (more on a GPU, where each chunk costs kernel launches), and of at most `chunk` query rows when
it is given. Each chunk's scores live in one tensor that the softmax,
its backward and the received sums update in place: on CPU every fresh score-sized tensor costs a pass of
page faults and cache misses of its own.
"""

from __future__ import annotations

import torch

from .precision import compute_dtype, exp_

_CHUNK_SCORES = 1 << 20          # 4 MiB of float32 scores
_CHUNK_SCORES_GPU = 1 << 26
_INF = float("inf")


def _heads(q, k, v=None):
    """(B, S, H, D) -> (B, H, S, D) in the compute dtype, key/value heads repeated to the query heads."""
    acc = compute_dtype(q.dtype)
    group = q.shape[2] // k.shape[2]
    qh = q.transpose(1, 2).to(acc)
    kh = k.transpose(1, 2).to(acc).repeat_interleave(group, dim=1)
    vh = None if v is None else v.transpose(1, 2).to(acc).repeat_interleave(group, dim=1)
    return qh, kh, vh, group


def query_chunks(seqlen_q: int, scores_per_query: int, device: torch.device, chunk: int | None = None):
    """(i0, i1) query ranges of about the device's score budget each (scores_per_query = batch·heads·S_k),
    and of at most `chunk` rows when it is given."""
    budget = _CHUNK_SCORES if device.type == "cpu" else _CHUNK_SCORES_GPU
    rows = max(1, min(chunk or seqlen_q, budget // max(1, scores_per_query)))
    return [(i0, min(seqlen_q, i0 + rows)) for i0 in range(0, seqlen_q, rows)]


def _query_chunks(qh, kh, chunk):
    batch, heads, seqlen_q, _ = qh.shape
    return query_chunks(seqlen_q, batch * heads * kh.shape[2], qh.device, chunk)


def _scores(q_scaled, kh, i0, i1, causal, seqlen_q):
    """s = scale·q_i·k_j for the queries i0:i1 (q already scaled), masked to −inf where causal hides the key."""
    s = torch.matmul(q_scaled[:, :, i0:i1], kh.transpose(-1, -2))
    if causal:
        seqlen_k = kh.shape[2]
        i = torch.arange(i0, i1, device=s.device)[:, None]
        j = torch.arange(seqlen_k, device=s.device)[None, :]
        s.masked_fill_(j > i + (seqlen_k - seqlen_q), -_INF)
    return s


def softmax_(s):
    """In place, s -> exp(s − max) (unnormalised p; exp as exp2, see precision.py); returns (row sums l clamped to ≥ 1, lse). A row that
    sees no key (all −inf) gets p = 0, lse = −inf; any other row has l ≥ 1, so the clamp only touches
    those rows and 1/l never divides by zero."""
    if s.shape[-1] == 0:                                                 # no keys at all
        return s.new_ones(s.shape[:-1] + (1,)), s.new_full(s.shape[:-1], -_INF)
    m = s.amax(-1, keepdim=True)
    m.masked_fill_(m == -_INF, 0.0)
    l = exp_(s.sub_(m)).sum(-1, keepdim=True)
    lse = (m + l.log()).squeeze(-1)
    return l.clamp_min_(1.0), lse


def _probs_(s, lse):
    """In place, s -> p = exp(s − lse); rows with lse = −inf (no key seen) become 0, not NaN."""
    return exp_(s.sub_(lse.masked_fill(lse == -_INF, _INF)[..., None]))


def attention_forward(q, k, v, causal=False, scale=None, chunk=None):
    """(out (B, S_q, H, D) in q's dtype, lse (B, H, S_q) in the compute dtype)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    qh, kh, vh, _ = _heads(q, k, v)
    seqlen_q, q_scaled = qh.shape[2], qh * scale
    outs, lses = [], []
    for i0, i1 in _query_chunks(qh, kh, chunk):
        p = _scores(q_scaled, kh, i0, i1, causal, seqlen_q)
        l, lse = softmax_(p)
        outs.append(torch.matmul(p, vh).div_(l))
        lses.append(lse)
    out = torch.cat(outs, dim=2) if outs else qh.new_zeros(qh.shape[:3] + (vh.shape[-1],))
    lse = torch.cat(lses, dim=2) if lses else qh.new_zeros(qh.shape[:3])
    return out.transpose(1, 2).to(q.dtype), lse


def attention_backward(dout, q, k, v, out, lse, causal=False, scale=None, chunk=None):
    """Closed-form (dq, dk, dv) in the inputs' dtypes, recomputing p chunk by chunk from lse."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    qh, kh, vh, group = _heads(q, k, v)
    acc = qh.dtype
    do = dout.transpose(1, 2).to(acc)
    delta = (do * out.transpose(1, 2).to(acc)).sum(-1, keepdim=True)
    seqlen_q, q_scaled, lse = qh.shape[2], qh * scale, lse.to(acc)
    dq = torch.empty_like(qh)
    dk = torch.zeros_like(kh)
    dv = torch.zeros_like(vh)
    for i0, i1 in _query_chunks(qh, kh, chunk):
        p = _probs_(_scores(q_scaled, kh, i0, i1, causal, seqlen_q), lse[:, :, i0:i1])
        dv += torch.matmul(p.transpose(-1, -2), do[:, :, i0:i1])
        ds = torch.matmul(do[:, :, i0:i1], vh.transpose(-1, -2)).sub_(delta[:, :, i0:i1]).mul_(p)
        dq[:, :, i0:i1] = torch.matmul(ds, kh).mul_(scale)
        dk += torch.matmul(ds.transpose(-1, -2), q_scaled[:, :, i0:i1])
    b, h, sk, d = dk.shape
    dk = dk.reshape(b, h // group, group, sk, d).sum(2)
    dv = dv.reshape(b, h // group, group, sk, dv.shape[-1]).sum(2)
    return dq.transpose(1, 2).to(q.dtype), dk.transpose(1, 2).to(k.dtype), dv.transpose(1, 2).to(v.dtype)


def attention_received(q, k, lse=None, causal=False, scale=None, query_weight=None, chunk=None):
    """Per head and key, Σ_i weight_i·p_ij: (B, H, S_k) in the compute dtype. `query_weight` (S_q,) is 1 for
    the queries that count and 0 for excluded ones (None: all count). lse is recomputed when not given."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    qh, kh, _, _ = _heads(q, k)
    seqlen_q, q_scaled = qh.shape[2], qh * scale
    received = qh.new_zeros(qh.shape[:2] + (kh.shape[2],))
    for i0, i1 in _query_chunks(qh, kh, chunk):
        p = _scores(q_scaled, kh, i0, i1, causal, seqlen_q)
        if lse is None:
            p.div_(softmax_(p)[0])
        else:
            _probs_(p, lse[:, :, i0:i1].to(qh.dtype))
        if query_weight is not None:
            p.mul_(query_weight[i0:i1].to(p.dtype)[:, None])
        received += p.sum(2)
    return received
