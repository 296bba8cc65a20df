"""torch.nn modules built on zigspark's ops."""

from .attention import FlashSelfAttention, patch_attention
from .spark import GatedFFN, SparkAttention, SparkFFN
from .zigzag_mamba import ZigzagMamba

__all__ = ["FlashSelfAttention", "GatedFFN", "SparkAttention", "SparkFFN", "ZigzagMamba", "patch_attention"]
