"""Spark Transformer's sparse FFN and sparse attention (arXiv 2506.06644), on statistical top-k.

Spark FFN, for a token x ∈ R^d with predictor width r, K1 ∈ R^{f×r}, K2 ∈ R^{f×(d−r)}, V ∈ R^{d×f}:

    p = K1·x[:r]                         (the cheap predictor: all f neurons, r of the d inputs)
    a = GELU(stat_topk(p, density)) ⊙ (K2·x[r:])
    y = V·a                              (only the ~density·f active neurons' K2 rows and V columns matter)

Spark attention, per head, with q, k split at r (predictor / remainder) and the keys j visible to query i:

    s1_ij = q_i[:r]·k_j[:r] / √r,    s2_ij = q_i[r:]·k_j[r:] / √(D − r)
    keep_ij = s1_ij > θ_i,  θ_i = mean_j s1_ij + std_j s1_ij·Φ⁻¹(1 − top_k/n_i)   (over the n_i visible keys;
              all visible keys are kept when n_i ≤ top_k, or when std = 0: equal scores all tie at θ;
              std ≤ 2⁻¹⁶·|mean| counts as 0, since the mean of equal scores rounds)
    w_ij = softmax_{j kept}(s1_ij) · softplus(s2_ij),    o_i = Σ_j w_ij·v_j   (o_i = 0 if i sees no key)
    (renormalize_gate=True: w_ij = softmax_{j kept}(s1_ij + log softplus(s2_ij)), i.e. w / Σ_j w)

Choices where the paper's public description is open. Configurable (arguments of the ops and of
zigspark.nn's layers), with the defaults: the predictor width r (D // 4 in attention, d_model // 4 in the
FFN), the density or top_k, causal masking, the scales of the two score parts (predictor scores by 1/√r,
gate scores by 1/√(D − r)), the std behind every threshold (std_correction=0: the population std; 1: the
sample std, for the FFN as well), and whether the softplus gate's weights are renormalised
(renormalize_gate=False: the gate multiplies the softmax weights, which then need not sum to 1). Fixed
(every kernel and the reference assume it): a query whose visible predictor scores are all equal keeps
every visible key, since s1 > θ would otherwise keep none.

The FFN trains on the dense-masked computation (exact gradients, through stat_topk's backward).
Inference can run `spark_ffn(..., sparse=True)`, which computes only the active neurons: the reference
gathers them per token; Triton (triton_kernels/spark_ffn.py) masks inactive K2 rows and Vᵀ rows out of
its loads; CUDA (csrc/spark_ffn) compacts each token's active neurons per slice of d_ff with warp ballots,
gives each active neuron a warp for its K2 dot product (16-byte loads) and adds a·Vᵀ_i in fixed order, so
it reads only the active rows and is deterministic. Both kernels read a Vᵀ copy cached until V changes.
Both also fuse the predictor and the threshold in: a predictor kernel writes p in float32 with each
token's mean and M2 per tile of neurons, and the sparse kernel merges those into θ and thresholds its own
neurons, so stat_topk costs no launch and the gate no round trip (CUDA for decode batches of up to 16
tokens and r ≤ 4096; larger ones take F.linear + stat_topk, see cuda_ops/spark_ffn.py). The fused p stays
float32 where the dense path rounds it to x's dtype, so in fp16/bf16 a neuron within rounding of θ may
differ between the two; a std below 2⁻¹⁶·|mean| counts as σ = 0 (nothing active, as stat_topk does for a
constant row, whose float32 tile means would otherwise leave a rounding-level σ); a NaN predictor value
is an inactive neuron. The sparse path is the custom op ``zigspark::spark_ffn_infer`` (x and the
weights -> out and the mask; no autograd: it is for inference); ``zigspark::spark_ffn_sparse`` is its
second half, for a caller that holds the gate already.

Spark attention is registered as ``zigspark::spark_attention_fwd`` (→ out, lse of the kept keys' softmax
logits — s1, or s1 + log softplus(s2) with renormalize_gate — θ, kept counts) and ``zigspark::spark_attention_bwd`` (→ dq, dk, dv; the mask carries no
gradient). Backends: the reference (zigspark/reference/spark_attention.py: chunked PyTorch with a
closed-form backward) and fused Triton kernels (triton_kernels/spark_attention.py: a θ statistics pass, a
forward that skips key tiles in which no key is selected and reads K[r:] and V only for the keys some
query of the tile keeps, a split-key form of both for decode (≤ 16 queries), and a FlashAttention-2-style
backward that skips the same tiles). A CUDA Spark-attention kernel is open work (#5).
"""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F

from .. import backends
from ..reference import spark_attention as ref_attn
from ..validation import (check_bool, check_density, check_float_tensor, check_int, check_same_device,
                          check_std_correction, is_finite_real, last_dim_contiguous)
from .stat_topk import stat_topk, stat_topk_fwd, survivor_quantile

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
MAX_HEAD_DIM = 256  # the Triton kernels' widest tile
backends.register_op("spark_ffn", {"reference": _DTYPES, "triton": _DTYPES[:3], "cuda": _DTYPES[:3]},
                     size_key="tokens")
backends.register_op("spark_attention", {"reference": _DTYPES, "triton": _DTYPES[:3]}, size_key="seqlen")


def _check_ffn(x, K1, K2, V, density):
    for name, t in (("x", x), ("K1", K1), ("K2", K2), ("V", V)):
        check_float_tensor(name, t, _DTYPES)
    d = x.shape[-1]
    if K1.dim() != 2 or K2.dim() != 2 or V.dim() != 2:
        raise ValueError("K1 (d_ff, r), K2 (d_ff, d_model − r) and V (d_model, d_ff) must be 2-D")
    d_ff, r = K1.shape
    if d_ff < 1:
        raise ValueError(f"K1 (d_ff, r) must have at least one neuron (d_ff ≥ 1), got shape {tuple(K1.shape)}")
    if not 0 < r < d:
        raise ValueError(f"predictor_dim r = {r} must satisfy 0 < r < d_model = {d}")
    if K2.shape != (d_ff, d - r):
        raise ValueError(f"K2 must be (d_ff, d_model − r) = ({d_ff}, {d - r}), got {tuple(K2.shape)}")
    if V.shape != (d, d_ff):
        raise ValueError(f"V must be (d_model, d_ff) = ({d}, {d_ff}), got {tuple(V.shape)}")
    check_density(density, "spark_ffn")
    return check_same_device(x=x, K1=K1, K2=K2, V=V), r


def spark_ffn(x, K1, K2, V, density=0.08, *, sparse=False, return_mask=False, std_correction=0.0,
              backend="auto"):
    """Spark FFN (formula in the module docstring). x (..., d_model) -> (..., d_model).

    sparse=False: the dense-masked computation (training; differentiable). sparse=True: only the active
    neurons' K2 rows and V columns are read (inference; not differentiable). return_mask also returns the
    (..., d_ff) boolean mask of active neurons. std_correction: the threshold's std over the d_ff
    predictor values divides by d_ff − std_correction (0, the default: population; 1: sample std).
    """
    device, r = _check_ffn(x, K1, K2, V, density)
    check_std_correction(std_correction, "spark_ffn")
    chosen = backends.resolve("spark_ffn", backend, device, x.dtype, size=x.numel() // max(1, x.shape[-1]))
    d_ff = K1.shape[0]
    if sparse:
        with torch.no_grad():
            out, mask = spark_ffn_infer(x.reshape(-1, x.shape[-1]).contiguous(), K1, K2, V,
                                        survivor_quantile(d_ff, density=density, std_correction=std_correction),
                                        return_mask, chosen)
        out = out.reshape(x.shape)
        return (out, mask.reshape(*x.shape[:-1], d_ff)) if return_mask else out
    # backend='reference' is PyTorch throughout (the tests' oracle); otherwise the threshold takes the best
    # stat_topk kernel here
    gate, mask = stat_topk(F.linear(x[..., :r], K1), density=density, return_mask=True,
                           std_correction=std_correction, backend="reference" if chosen == "reference" else "auto")
    out = F.linear(F.gelu(gate) * F.linear(x[..., r:], K2), V)
    return (out, mask) if return_mask else out


@torch.library.custom_op("zigspark::spark_ffn_infer", mutates_args=())
def spark_ffn_infer(x: torch.Tensor, K1: torch.Tensor, K2: torch.Tensor, V: torch.Tensor, z: float,
                    need_mask: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse inference from x (tokens, d_model): (out (tokens, d_model), mask (tokens, d_ff) of the active
    neurons, or an empty mask unless need_mask), with θ = mean + z·std of each token's predictor. Triton
    and CUDA fuse the predictor and the threshold into their sparse kernels (no stat_topk launch, no gate
    round trip; CUDA for up to 16 tokens and r ≤ 4096, else unfused); the reference computes the predictor
    with F.linear, the gate with stat_topk, then spark_ffn_sparse."""
    r = K1.shape[1]
    from ..cuda_ops import spark_ffn as cuda_ffn   # also Vᵀ cached across calls, not copied each time

    if backend == "triton":
        from ..triton_kernels.spark_ffn import spark_ffn_fused

        out, gate = spark_ffn_fused(x, K1.contiguous(), K2.contiguous(), cuda_ffn.transposed(V).contiguous(), z)
    elif backend == "cuda" and cuda_ffn.fusable(x.shape[0], r, x.device):
        out, gate = cuda_ffn.spark_ffn_fused(x, K1, K2, cuda_ffn.transposed(V), z)
    else:
        gate = stat_topk_fwd(F.linear(x[:, :r], K1), z, False, "reference" if backend == "reference" else
                             backends.resolve("stat_topk", "auto", x.device, x.dtype, size=K1.shape[0]))[0]
        out = spark_ffn_sparse(x, gate, K2, V, r, backend)
    return out, (gate > 0) if need_mask else gate.new_empty((0,), dtype=torch.bool)


@spark_ffn_infer.register_fake
def _(x, K1, K2, V, z, need_mask, backend):
    mask_shape = (x.shape[0], K1.shape[0]) if need_mask else (0,)
    return torch.empty_like(x), x.new_empty(mask_shape, dtype=torch.bool)


@torch.library.custom_op("zigspark::spark_ffn_sparse", mutates_args=())
def spark_ffn_sparse(x: torch.Tensor, gate: torch.Tensor, K2: torch.Tensor, V: torch.Tensor, r: int,
                     backend: str) -> torch.Tensor:
    """Sparse inference: x (tokens, d_model), gate = stat_topk(K1·x[:r]) (tokens, d_ff), zero where a neuron
    is inactive -> (tokens, d_model), from the active neurons' K2 rows and V columns only."""
    if backend in ("cuda", "triton"):
        from ..cuda_ops.spark_ffn import transposed   # Vᵀ cached across calls, not copied each time

        if backend == "cuda":
            from ..cuda_ops.spark_ffn import spark_ffn_sparse as kernel

            return kernel(x, gate, K2, transposed(V), r)
        from ..triton_kernels.spark_ffn import spark_ffn_sparse as kernel

        return kernel(x, gate, K2.contiguous(), transposed(V).contiguous(), r)
    out = torch.empty_like(x)
    for t in range(x.shape[0]):                   # one token at a time: gather the active neurons only
        active = (gate[t] > 0).nonzero().squeeze(1)
        out[t] = V[:, active] @ (F.gelu(gate[t, active]) * (K2[active] @ x[t, r:]))
    return out


@spark_ffn_sparse.register_fake
def _(x, gate, K2, V, r, backend):
    return torch.empty_like(x)


# ---- Spark attention: custom ops -----------------------------------------------------------------------

def _attn_kernels():
    from ..triton_kernels import spark_attention as kernels

    return kernels


@torch.library.custom_op("zigspark::spark_attention_fwd", mutates_args=())
def spark_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, top_k: int, r: int, scale1: float,
                        scale2: float, std_correction: float, renormalize_gate: bool, causal: bool, chunk: int,
                        backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (out (B, S_q, H, D) in q's dtype, lse and θ (B, H, S_q) float32 (float64 for float64 inputs),
    kept (B, H, S_q) int64). lse normalises W: of s1 when the gate multiplies, of s1 + log g when it is
    renormalised."""
    check_std_correction(std_correction, "spark_attention")
    if backend == "triton":
        return _attn_kernels().spark_attention_fwd(q, k, v, top_k, r, causal, scale1, scale2, std_correction,
                                                   renormalize_gate)
    with torch.no_grad():
        out, lse, theta, kept = ref_attn.spark_attention_forward(q, k, v, top_k, r, causal, chunk, (scale1, scale2),
                                                                 std_correction, renormalize_gate)
    return torch.empty_like(q).copy_(out), lse.contiguous(), theta.contiguous(), kept.contiguous()


@spark_attention_fwd.register_fake
def _(q, k, v, top_k, r, scale1, scale2, std_correction, renormalize_gate, causal, chunk, backend):
    batch, seqlen_q, heads, _ = q.shape
    stats = q.new_empty((batch, heads, seqlen_q), dtype=ref_attn.compute_dtype(q.dtype))
    return torch.empty_like(q), stats, torch.empty_like(stats), q.new_empty((batch, heads, seqlen_q),
                                                                             dtype=torch.int64)


@torch.library.custom_op("zigspark::spark_attention_bwd", mutates_args=())
def spark_attention_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                        lse: torch.Tensor, theta: torch.Tensor, r: int, scale1: float, scale2: float,
                        renormalize_gate: bool, causal: bool, chunk: int, backend: str
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dq, dk, dv) in the inputs' dtypes, from the forward's out (for Δ = dO·out), lse and θ."""
    if backend == "triton":
        return _attn_kernels().spark_attention_bwd(dout, q, k, v, out, lse, theta, r, causal, scale1, scale2,
                                                   renormalize_gate)
    grads = ref_attn.spark_attention_backward(dout, q, k, v, out, lse, theta, r, causal, chunk, (scale1, scale2),
                                              renormalize_gate)
    return tuple(torch.empty_like(t).copy_(g) for t, g in zip((q, k, v), grads))


@spark_attention_bwd.register_fake
def _(dout, q, k, v, out, lse, theta, r, scale1, scale2, renormalize_gate, causal, chunk, backend):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _attn_setup_context(ctx, inputs, output):
    q, k, v, top_k, r, scale1, scale2, std_correction, renormalize_gate, causal, chunk, backend = inputs
    out, lse, theta, kept = output
    ctx.save_for_backward(q, k, v, out, lse, theta)
    ctx.r, ctx.scales, ctx.causal, ctx.chunk, ctx.backend = r, (scale1, scale2), causal, chunk, backend
    ctx.renormalize_gate = renormalize_gate
    ctx.mark_non_differentiable(lse, theta, kept)


def _attn_backward(ctx, dout, dlse, dtheta, dkept):
    q, k, v, out, lse, theta = ctx.saved_tensors
    dout = last_dim_contiguous(dout.to(out.dtype))
    dq, dk, dv = spark_attention_bwd(dout, q, k, v, out, lse, theta, ctx.r, *ctx.scales, ctx.renormalize_gate,
                                     ctx.causal, ctx.chunk, ctx.backend)
    return dq, dk, dv, *([None] * 9)


spark_attention_fwd.register_autograd(_attn_backward, setup_context=_attn_setup_context)


# ---- Spark attention: public API -----------------------------------------------------------------------

def _check_attention(q, k, v, top_k, predictor_dim, chunk):
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float_tensor(name, t, _DTYPES)
        if t.dim() != 4:
            raise ValueError(f"{name} must be (batch, seqlen, heads, head_dim), got shape {tuple(t.shape)}")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)} and v {tuple(v.shape)} must agree in batch, "
                         "heads and head_dim (and k, v in every dimension)")
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"q, k and v must share one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}; "
                        "convert them with .to(q.dtype)")
    if 0 in q.shape or 0 in k.shape:
        raise ValueError(f"empty attention: q {tuple(q.shape)}, k {tuple(k.shape)}; every dimension must be ≥ 1")
    r = check_attention_sizes(q.shape[-1], top_k, predictor_dim)
    check_int("chunk", chunk, 1)
    return check_same_device(q=q, k=k, v=v), r


def check_attention_sizes(head_dim: int, top_k, predictor_dim) -> int:
    """-> r, the predictor width (default head_dim // 4), after checking it and top_k."""
    r = head_dim // 4 if predictor_dim is None else predictor_dim
    if isinstance(r, bool) or not isinstance(r, numbers.Integral) or not 0 < r < head_dim:
        raise ValueError(f"predictor_dim r = {r!r} must satisfy 0 < r < head_dim = {head_dim} (an int; "
                         f"the default is head_dim // 4 = {head_dim // 4})")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be a positive int, got {top_k!r}")
    return r


def _scales(head_dim: int, r: int, predictor_scale, gate_scale) -> tuple[float, float]:
    """(a, c): the given ones, checked, or 1/√r and 1/√(head_dim − r)."""
    scales = list(ref_attn.default_scales(head_dim, r))
    for i, (name, given) in enumerate((("predictor_scale", predictor_scale), ("gate_scale", gate_scale))):
        if given is None:
            continue
        if not is_finite_real(given) or given <= 0:
            raise ValueError(f"{name} must be a finite number > 0 (default {scales[i]:.4g}), got {given!r}")
        scales[i] = float(given)
    return tuple(scales)


def _resolve_attention(backend, device, q, k):
    chosen = backends.resolve("spark_attention", backend, device, q.dtype, size=k.shape[1])
    if chosen != "reference" and q.shape[-1] > MAX_HEAD_DIM:
        if backend != "auto":
            raise ValueError(f"head_dim {q.shape[-1]} is larger than the {chosen} kernel's {MAX_HEAD_DIM}; "
                             "use backend='reference'")
        chosen = "reference"
        backends.record("spark_attention", chosen)
    return chosen


def spark_attention(q, k, v, top_k=256, predictor_dim=None, *, causal=True, predictor_scale=None, gate_scale=None,
                    std_correction=0.0, renormalize_gate=False, chunk=1024, return_kept=False, backend="auto"):
    """Spark attention (formula in the module docstring): each query attends to the keys whose predictor
    score beats its statistical top-k threshold, with softmax weights gated by softplus of the rest.

    Args:
        q: (batch, seqlen_q, heads, head_dim); k, v: (batch, seqlen_k, heads, head_dim); one dtype
            (float16, bfloat16, float32; float64 on the reference backend).
        top_k: keys meant to survive per query (exactly all visible keys when a query sees ≤ top_k).
        predictor_dim: r, the leading dims of q and k that select keys; default head_dim // 4.
        causal: bottom-right aligned causal mask (query i sees keys j ≤ i + seqlen_k − seqlen_q).
        predictor_scale, gate_scale: a and c of s1 = a·q[:r]·k[:r] and s2 = c·q[r:]·k[r:]; default 1/√r and
            1/√(head_dim − r). a is the softmax temperature of the kept keys; it does not change which keys
            are kept (θ scales with it).
        std_correction: θ's std divides by n_i − std_correction: 0 (default) the population std, 1 the
            sample std (θ a little higher, fewer keys kept when n_i is small).
        renormalize_gate: False (default): W = softmax(s1) ⊙ softplus(s2), weights summing to Σ W ≠ 1;
            True: W = softmax(s1 + log softplus(s2)) over the kept keys, the gated weights renormalised to 1.
        chunk: at most this many queries per step of the reference, which also bounds each step's scores
            (memory O(chunk·seqlen_k) per head at most); kernels ignore it.
        return_kept: also return the number of keys each query kept, (batch, heads, seqlen_q) int64.
    Returns:
        out (batch, seqlen_q, heads, head_dim) in q's dtype [, kept]. Differentiable in q, k and v.

    Example:
        >>> import torch, zigspark
        >>> q = k = v = torch.randn(1, 300, 2, 64)
        >>> out, kept = zigspark.spark_attention(q, k, v, top_k=32, causal=False, return_kept=True)
        >>> out.shape, kept.shape
        (torch.Size([1, 300, 2, 64]), torch.Size([1, 2, 300]))
    """
    device, r = _check_attention(q, k, v, top_k, predictor_dim, chunk)
    scales = _scales(q.shape[-1], r, predictor_scale, gate_scale)
    correction = check_std_correction(std_correction, "spark_attention")
    check_bool("renormalize_gate", renormalize_gate, "spark_attention")
    chosen = _resolve_attention(backend, device, q, k)
    q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
    out, _, _, kept = torch.ops.zigspark.spark_attention_fwd(q, k, v, int(top_k), int(r), *scales, correction,
                                                            renormalize_gate, bool(causal), int(chunk), chosen)
    return (out, kept) if return_kept else out
