"""Spark Transformer layers (arXiv 2506.06644): SparkFFN and SparkAttention on statistical top-k.

The math, and the choices made where the paper's public description is open, are in
zigspark/ops/spark.py. In training mode, and whenever gradients are on, the layers run the dense-masked
computation (exact gradients); in eval mode under torch.no_grad() or torch.inference_mode(), SparkFFN runs
the sparse path that touches only the active neurons (`sparse_inference=False` keeps the dense path).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..ops.spark import check_attention_sizes, spark_attention, spark_ffn
from ..validation import check_bool, check_density, check_std_correction


class SparkFFN(nn.Module):
    """y = V·(GELU(stat_topk(K1·x[:r], density)) ⊙ (K2·x[r:])), about `density`·d_ff neurons active.

    Args:
        d_model, d_ff: widths. density: target fraction of active neurons (paper: 0.08).
        predictor_dim: r, the input dimensions that feed the predictor (default d_model // 4).
        std_correction: the threshold's std divides by d_ff − std_correction (0: population, 1: sample).
    """

    def __init__(self, d_model: int, d_ff: int, density: float = 0.08, predictor_dim: int | None = None,
                 sparse_inference: bool = True, std_correction: float = 0.0, backend: str = "auto"):
        super().__init__()
        self.r = d_model // 4 if predictor_dim is None else predictor_dim
        if not 0 < self.r < d_model:
            raise ValueError(f"predictor_dim must satisfy 0 < r < d_model = {d_model}, got {self.r}")
        check_density(density, "SparkFFN")
        self.std_correction = check_std_correction(std_correction, "SparkFFN")
        self.d_model, self.d_ff, self.density = d_model, d_ff, density
        self.sparse_inference, self.backend = sparse_inference, backend
        bound_in, bound_out = 1 / math.sqrt(d_model), 1 / math.sqrt(d_ff)
        self.K1 = nn.Parameter(torch.empty(d_ff, self.r).uniform_(-bound_in, bound_in))
        self.K2 = nn.Parameter(torch.empty(d_ff, d_model - self.r).uniform_(-bound_in, bound_in))
        self.V = nn.Parameter(torch.empty(d_model, d_ff).uniform_(-bound_out, bound_out))

    def forward(self, x: torch.Tensor, return_mask: bool = False):
        sparse = self.sparse_inference and not self.training and not torch.is_grad_enabled()
        return spark_ffn(x, self.K1, self.K2, self.V, self.density, sparse=sparse, return_mask=return_mask,
                         std_correction=self.std_correction, backend=self.backend)

    def dense_equivalent(self) -> nn.Module:
        """A standard gated (GEGLU) FFN with the same parameter count, for comparison."""
        hidden = round(2 * self.d_model * self.d_ff / (3 * self.d_model))
        return GatedFFN(self.d_model, hidden)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_ff={self.d_ff}, density={self.density}, predictor_dim={self.r}, "
                f"std_correction={self.std_correction}")


class GatedFFN(nn.Module):
    """y = W_out·(GELU(W_gate·x) ⊙ W_up·x): the dense baseline of SparkFFN.dense_equivalent()."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.gate = nn.Linear(d_model, hidden, bias=False)
        self.up = nn.Linear(d_model, hidden, bias=False)
        self.out = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x):
        return self.out(nn.functional.gelu(self.gate(x)) * self.up(x))


class SparkAttention(nn.Module):
    """Multi-head Spark attention: each query keeps about `top_k` keys chosen by statistical top-k of the
    predictor scores (the first r dimensions of q and k), and the values are gated by softplus of the
    remaining dimensions' scores. x (batch, seqlen, d_model) -> (batch, seqlen, d_model).
    std_correction and renormalize_gate: see zigspark.spark_attention."""

    def __init__(self, d_model: int, heads: int, head_dim: int, top_k: int = 256, predictor_dim: int | None = None,
                 causal: bool = True, predictor_scale: float | None = None, gate_scale: float | None = None,
                 std_correction: float = 0.0, renormalize_gate: bool = False, backend: str = "auto"):
        super().__init__()
        self.heads, self.head_dim, self.top_k, self.causal, self.backend = heads, head_dim, top_k, causal, backend
        self.predictor_scale, self.gate_scale = predictor_scale, gate_scale
        self.std_correction = check_std_correction(std_correction, "SparkAttention")
        self.renormalize_gate = check_bool("renormalize_gate", renormalize_gate, "SparkAttention")
        self.r = check_attention_sizes(head_dim, top_k, predictor_dim)
        self.qkv = nn.Linear(d_model, 3 * heads * head_dim, bias=False)
        self.out = nn.Linear(heads * head_dim, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seqlen, _ = x.shape
        q, k, v = self.qkv(x).reshape(batch, seqlen, 3, self.heads, self.head_dim).unbind(2)
        o = spark_attention(q, k, v, self.top_k, self.r, causal=self.causal, predictor_scale=self.predictor_scale,
                            gate_scale=self.gate_scale, std_correction=self.std_correction,
                            renormalize_gate=self.renormalize_gate, backend=self.backend)
        return self.out(o.reshape(batch, seqlen, self.heads * self.head_dim))
