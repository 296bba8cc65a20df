"""zigspark: fused GPU kernels for PyTorch with pure-PyTorch fallbacks.

Every op takes ``backend="auto" | "cuda" | "triton" | "reference"``; see :func:`available_backends`.
"""

from ._version import __version__
from .backends import available_backends, last_backends
from .errors import BackendUnavailableError
from .nn.attention import patch_attention
from . import nn, orders, tuning
from .ops.attention import attention_received, flash_attention
from .ops.causal_conv1d import causal_conv1d
from .ops.selective_scan import selective_scan
from .ops.spark import spark_attention, spark_ffn
from .ops.stat_topk import stat_topk, stat_topk_threshold
from .ops.token_prune import hiprune_select, prune_tokens

__all__ = [
    "__version__",
    "available_backends",
    "last_backends",
    "BackendUnavailableError",
    "nn",
    "orders",
    "patch_attention",
    "prune_tokens",
    "attention_received",
    "causal_conv1d",
    "flash_attention",
    "hiprune_select",
    "selective_scan",
    "spark_attention",
    "spark_ffn",
    "stat_topk",
    "stat_topk_threshold",
]
