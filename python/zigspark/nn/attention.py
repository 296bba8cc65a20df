"""Self-attention modules on zigspark's flash attention, and patching Hugging Face models to use it."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.attention import flash_attention

log = logging.getLogger("zigspark")


class FlashSelfAttention(nn.Module):
    """Multi-head self-attention: qkv projection → zigspark.flash_attention → output projection.

    forward(x (batch, seqlen, dim), return_received=False, exclude_queries=None) -> out (batch, seqlen, dim)
    [, received (batch, seqlen): the attention each token receives, mean over heads].

    Example:
        >>> import torch
        >>> from zigspark.nn import FlashSelfAttention
        >>> attn = FlashSelfAttention(64, heads=4)
        >>> attn(torch.randn(2, 10, 64)).shape
        torch.Size([2, 10, 64])
    """

    def __init__(self, dim: int, heads: int, causal: bool = False, qkv_bias: bool = True, backend: str = "auto"):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} must be divisible by heads {heads}")
        self.heads, self.causal, self.backend = heads, causal, backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, return_received: bool = False, exclude_queries=None):
        batch, seqlen, dim = x.shape
        q, k, v = self.qkv(x).reshape(batch, seqlen, 3, self.heads, dim // self.heads).unbind(2)
        result = flash_attention(q, k, v, causal=self.causal, return_received=return_received,
                                 exclude_queries=exclude_queries, backend=self.backend)
        out, received = result if return_received else (result, None)
        out = self.proj(out.reshape(batch, seqlen, dim))
        return (out, received) if return_received else out


_fallback_logged = set()


def _hf_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Hugging Face attention-interface function: query/key/value (batch, heads, seqlen, head_dim)."""
    # sdpa-style masks: bool, True = attend (or additive float, 0 = attend); all-attend needs no mask
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        masked = not bool(attention_mask.all())
    else:
        masked = attention_mask is not None and bool((attention_mask != 0).any())
    dropping = module.training and dropout > 0
    if masked or dropping:  # what the kernels do not take: PyTorch's SDPA does it, said once
        reason = "an attention mask (padding)" if masked else "attention dropout in training"
        if reason not in _fallback_logged:
            _fallback_logged.add(reason)
            log.warning("zigspark.patch_attention: %s is not supported by zigspark's kernels; using PyTorch SDPA "
                        "for those calls", reason)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                             dropout_p=dropout if module.training else 0.0, scale=scaling,
                                             is_causal=getattr(module, "is_causal", False) and attention_mask is None)
        return out.transpose(1, 2).contiguous(), None
    out = flash_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                          causal=bool(getattr(module, "is_causal", False)), softmax_scale=scaling)
    return out, None


def patch_attention(model):
    """Make a Hugging Face model (BERT-, ViT-style: anything using transformers' attention interface) run
    its self-attention through zigspark.flash_attention. Returns the model.

    Attention masks with padding and attention dropout in training are not taken by the kernels; such
    calls fall back to PyTorch's SDPA with a one-time warning.
    """
    try:
        from transformers import AttentionInterface
    except ImportError as exc:
        raise ImportError("patch_attention needs the transformers package: pip install transformers") from exc
    AttentionInterface.register("zigspark", _hf_attention)
    try:  # without a mask function for our name, transformers would build no padding mask at all
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionMaskInterface.register("zigspark", sdpa_mask)
    except ImportError:  # older transformers build masks for every implementation
        pass
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("zigspark")
    else:
        model.config._attn_implementation = "zigspark"
    return model
