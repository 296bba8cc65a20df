"""torch.nn modules built on zigspark's ops."""

from .attention import FlashSelfAttention, patch_attention
from .zigzag_mamba import ZigzagMamba

__all__ = ["FlashSelfAttention", "ZigzagMamba", "patch_attention"]
