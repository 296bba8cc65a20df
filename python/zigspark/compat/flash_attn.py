"""flash-attn's flash_attn_func on zigspark's kernels: `from zigspark.compat.flash_attn import flash_attn_func`.

Arguments that zigspark does not support raise NotImplementedError naming the argument, rather than being
silently ignored.
"""

from __future__ import annotations

from ..ops.attention import flash_attention


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False, *, backend="auto"):
    """flash_attn.flash_attn_func: q (batch, seqlen_q, heads, head_dim), k/v (batch, seqlen_k, kv_heads,
    head_dim). With return_attn_probs, returns (out, softmax_lse, None) — the probabilities themselves are
    never materialised (use zigspark.attention_received for per-key sums)."""
    if dropout_p:
        raise NotImplementedError(f"flash_attn_func: dropout_p={dropout_p} is not supported by zigspark (use 0.0)")
    if tuple(window_size) != (-1, -1):
        raise NotImplementedError(f"flash_attn_func: window_size={tuple(window_size)} (local attention) is not "
                                  "supported by zigspark")
    if softcap:
        raise NotImplementedError(f"flash_attn_func: softcap={softcap} is not supported by zigspark")
    if alibi_slopes is not None:
        raise NotImplementedError("flash_attn_func: alibi_slopes is not supported by zigspark")
    if return_attn_probs:
        out, lse = flash_attention(q, k, v, causal=causal, softmax_scale=softmax_scale, return_lse=True,
                                   backend=backend)
        return out, lse, None
    return flash_attention(q, k, v, causal=causal, softmax_scale=softmax_scale, backend=backend)
