"""Flash attention with the attention each key receives (for token pruning: HiPrune, FastV, EViT).

    out_i = Σ_j softmax_j(scale·q_i·k_j)·v_j,   lse_i = log Σ_j exp(scale·q_i·k_j),
    received_j = Σ_{i not excluded} softmax_j(scale·q_i·k_j)      (per head, or reduced over heads)

Layout (batch, seqlen, heads, head_dim) as flash-attn; GQA/MQA when k and v have fewer heads; causal
masking aligned to the bottom-right corner. Nothing of size seqlen_q × seqlen_k is ever materialised by the
kernels (the reference chunks over queries).

Registered as ``zigspark::attention_fwd`` / ``attention_bwd`` / ``attention_received``. Backends today:
reference and Triton for everything; CUDA for the forward (its backward and the received sums run the
Triton kernels on the CUDA forward's out and lse).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .. import backends
from ..reference import attention as ref
from ..validation import check_float_tensor, check_same_device, last_dim_contiguous

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_HEAD_DIM = 256
backends.register_op("flash_attention", {"reference": _DTYPES, "triton": _DTYPES[:3], "cuda": _DTYPES[:3]},
                     size_key="seqlen")
backends.register_op("attention_received", {"reference": _DTYPES, "triton": _DTYPES[:3]}, size_key="seqlen")


def _kernels():
    from ..triton_kernels import attention as kernels

    return kernels


def _cuda_kernels():
    from ..cuda_ops import attention as kernels

    return kernels


# ---- custom ops --------------------------------------------------------------------------------------

@torch.library.custom_op("zigspark::attention_fwd", mutates_args=())
def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float, backend: str
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (out (B, S_q, H, D) in q's dtype, lse (B, H, S_q) float32, or float64 for float64 inputs)."""
    if backend == "triton":
        return _kernels().attention_fwd(q, k, v, causal, scale)
    if backend == "cuda":
        return _cuda_kernels().attention_fwd(q, k, v, causal, scale)
    with torch.no_grad():
        out, lse = ref.attention_forward(q, k, v, causal, scale)
    return torch.empty_like(q).copy_(out), lse.contiguous()  # q's strides, as the kernels and the fake give


@attention_fwd.register_fake
def _(q, k, v, causal, scale, backend):
    batch, seqlen_q, heads, _ = q.shape
    return torch.empty_like(q), q.new_empty((batch, heads, seqlen_q), dtype=ref.compute_dtype(q.dtype))


_warned_cuda_without_triton: set = set()


def _triton_stands_in_for_cuda(op: str, part: str, q: torch.Tensor) -> bool:
    """backend='cuda' has no kernel for `part` (the backward, the received sums): Triton's runs instead when it
    can; otherwise the reference does, and a warning says so once per op and device type."""
    reason = backends.unavailable_reason(op, "triton", q.device, q.dtype)
    if reason is not None and (op, q.device.type) not in _warned_cuda_without_triton:
        _warned_cuda_without_triton.add((op, q.device.type))
        backends.log.warning("zigspark.%s: backend='cuda' has no kernel for %s and Triton cannot run here (%s); "
                             "%s runs the PyTorch reference", op, part, reason, part)
    return reason is None


@torch.library.custom_op("zigspark::attention_bwd", mutates_args=())
def attention_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                  lse: torch.Tensor, causal: bool, scale: float, backend: str
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if backend == "triton" or (backend == "cuda" and _triton_stands_in_for_cuda("flash_attention", "the backward", q)):
        return _kernels().attention_bwd(dout, q, k, v, out, lse, causal, scale)
    grads = ref.attention_backward(dout, q, k, v, out, lse, causal, scale)
    return tuple(torch.empty_like(t).copy_(g) for t, g in zip((q, k, v), grads))


@attention_bwd.register_fake
def _(dout, q, k, v, out, lse, causal, scale, backend):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, causal, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.causal, ctx.scale, ctx.backend = causal, scale, backend
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = attention_bwd(last_dim_contiguous(dout), q, k, v, out, lse, ctx.causal, ctx.scale, ctx.backend)
    return dq, dk, dv, None, None, None


attention_fwd.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("zigspark::attention_received", mutates_args=())
def attention_received_op(q: torch.Tensor, k: torch.Tensor, lse: Optional[torch.Tensor], causal: bool,
                          scale: float, query_weight: Optional[torch.Tensor], backend: str) -> torch.Tensor:
    """(B, H, S_k) float32 (float64 for float64 inputs): Σ_i w_i·p_ij per head; lse recomputed if absent."""
    if backend == "triton" or (backend == "cuda" and _triton_stands_in_for_cuda("attention_received",
                                                                              "the received sums", q)):
        kernels = _kernels()
        if lse is None:
            _, lse = kernels.attention_fwd(q, k, None, causal, scale, need_out=False)
        return kernels.attention_received(q, k, lse, causal, scale, query_weight)
    with torch.no_grad():
        return ref.attention_received(q, k, lse, causal, scale, query_weight)


@attention_received_op.register_fake
def _(q, k, lse, causal, scale, query_weight, backend):
    return q.new_empty((q.shape[0], q.shape[2], k.shape[1]), dtype=ref.compute_dtype(q.dtype))


# ---- public API --------------------------------------------------------------------------------------

def _check_qkv(q, k, v=None):
    check_float_tensor("q", q, _DTYPES)
    check_float_tensor("k", k, _DTYPES)
    tensors = {"q": q, "k": k} if v is None else {"q": q, "k": k, "v": v}
    if v is not None:
        check_float_tensor("v", v, _DTYPES)
    for name, t in tensors.items():
        if t.dim() != 4:
            raise ValueError(f"{name} must be (batch, seqlen, heads, head_dim), got shape {tuple(t.shape)}")
        if t.dtype != q.dtype:
            raise TypeError(f"q, k and v must share one dtype, got q {q.dtype} and {name} {t.dtype}")
    batch, seqlen_q, heads, head_dim = q.shape
    if k.shape[0] != batch:
        raise ValueError(f"k has batch {k.shape[0]} but q has batch {batch}")
    if k.shape[3] != head_dim:
        raise ValueError(f"k has head_dim {k.shape[3]} but q has head_dim {head_dim}")
    if k.shape[2] < 1 or heads % k.shape[2]:
        raise ValueError(f"q's {heads} heads must be a multiple of k's {k.shape[2]} heads (GQA/MQA)")
    if v is not None and v.shape != k.shape:
        raise ValueError(f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    if seqlen_q == 0 or k.shape[1] == 0 or head_dim == 0 or batch == 0 or heads == 0:
        raise ValueError(f"empty attention: q {tuple(q.shape)}, k {tuple(k.shape)}")
    return check_same_device(**tensors)


def _resolve(op, backend, q, k):
    chosen = backends.resolve(op, backend, q.device, q.dtype, size=k.shape[1])
    if chosen != "reference" and q.shape[-1] > MAX_HEAD_DIM:
        if backend != "auto":
            raise ValueError(f"head_dim {q.shape[-1]} is larger than the {chosen} kernel's {MAX_HEAD_DIM}; "
                             "use backend='reference'")
        chosen = "reference"
        backends.record(op, chosen)
    return chosen


def _query_weight(exclude_queries, seqlen_q, device):
    if exclude_queries is None:
        return None
    index = torch.as_tensor(exclude_queries, device=device)
    if index.dtype == torch.bool:
        if index.shape != (seqlen_q,):
            raise ValueError(f"exclude_queries as a mask must have shape ({seqlen_q},), got {tuple(index.shape)}")
        excluded = index
    else:
        index = index.reshape(-1).long()
        if index.numel() and (index.min() < -seqlen_q or index.max() >= seqlen_q):
            raise ValueError(f"exclude_queries indices must be in [-{seqlen_q}, {seqlen_q}), got {index.tolist()}")
        excluded = torch.zeros(seqlen_q, dtype=torch.bool, device=device)
        excluded[index] = True
    return (~excluded).to(torch.float32)


def _reduce(received, reduce_heads):
    if reduce_heads is None:
        return received
    if reduce_heads == "mean":
        return received.mean(1)
    if reduce_heads == "sum":
        return received.sum(1)
    raise ValueError(f"reduce_heads must be 'mean', 'sum' or None, got {reduce_heads!r}")


def _scale(q, softmax_scale):
    return 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)


def flash_attention(q, k, v, *, causal=False, softmax_scale=None, return_lse=False, return_received=False,
                    exclude_queries=None, reduce_heads="mean", backend="auto"):
    """Attention that never materialises the seqlen_q × seqlen_k matrix, with flash-attn's layout.

    Args:
        q: (batch, seqlen_q, heads, head_dim); k, v: (batch, seqlen_k, kv_heads, head_dim), heads a multiple
            of kv_heads (GQA/MQA). float16, bfloat16 (float32 and float64 accepted).
        causal: bottom-right aligned causal mask (query i sees keys j ≤ i + seqlen_k − seqlen_q).
        softmax_scale: default 1/√head_dim.
        return_lse: also return the log-sum-exp (batch, heads, seqlen_q), float32.
        return_received: also return the attention each key receives (see attention_received), from the
            same call's lse.
    Returns:
        out (batch, seqlen_q, heads, head_dim) [, lse] [, received].

    Example:
        >>> import torch, zigspark
        >>> q = k = v = torch.randn(2, 197, 6, 64)
        >>> out, received = zigspark.flash_attention(q, k, v, return_received=True, exclude_queries=[0])
        >>> out.shape, received.shape
        (torch.Size([2, 197, 6, 64]), torch.Size([2, 197]))
    """
    _check_qkv(q, k, v)
    scale = _scale(q, softmax_scale)
    chosen = _resolve("flash_attention", backend, q, k)
    q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
    out, lse = torch.ops.zigspark.attention_fwd(q, k, v, bool(causal), scale, chosen)
    results = [out]
    if return_lse:
        results.append(lse)
    if return_received:
        weight = _query_weight(exclude_queries, q.shape[1], q.device)
        received = torch.ops.zigspark.attention_received(q.detach(), k.detach(), lse, bool(causal), scale, weight,
                                                         chosen)
        results.append(_reduce(received, reduce_heads))
    return results[0] if len(results) == 1 else tuple(results)


def attention_received(q, k, *, causal=False, softmax_scale=None, exclude_queries=None, reduce_heads="mean",
                       backend="auto"):
    """For each key, the sum over queries of its softmax probability, in O(seqlen) memory.

    Args:
        q: (batch, seqlen_q, heads, head_dim); k: (batch, seqlen_k, kv_heads, head_dim).
        exclude_queries: query indices (or a bool mask of length seqlen_q) left out of the sum, e.g. [0] for
            a CLS token.
        reduce_heads: "mean" (default) -> (batch, seqlen_k); "sum"; None -> (batch, heads, seqlen_k).
    Returns:
        float32 tensor (float64 for float64 inputs); not differentiable (a score for selection).
    """
    _check_qkv(q, k)
    scale = _scale(q, softmax_scale)
    chosen = _resolve("attention_received", backend, q, k)
    q, k = (last_dim_contiguous(t.detach()) for t in (q, k))
    weight = _query_weight(exclude_queries, q.shape[1], q.device)
    received = torch.ops.zigspark.attention_received(q, k, None, bool(causal), scale, weight, chosen)
    return _reduce(received, reduce_heads)
