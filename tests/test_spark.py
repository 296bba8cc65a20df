"""Spark FFN and Spark attention (reference): formulas against naive loops, sparse = dense-masked,
densities near the target, gradients, bad inputs."""

import math
import statistics

import pytest
import torch
import torch.nn.functional as F

import zigspark
from zigspark.nn import SparkAttention, SparkFFN

from numerics import assert_by_rule, max_abs_err



def ffn_params(d=32, f=200, r=8, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g, dtype=torch.float64).to(dtype) / math.sqrt(s[-1])
            for s in ((f, r), (f, d - r), (d, f))]


@pytest.mark.cpu
def test_spark_ffn_matches_formula_and_sparse_equals_dense():
    K1, K2, V = ffn_params()
    x = torch.randn(4, 7, 32, dtype=torch.float64)
    out, mask = zigspark.spark_ffn(x, K1, K2, V, 0.1, return_mask=True)
    p = x[..., :8] @ K1.T
    z = statistics.NormalDist().inv_cdf(0.9)
    theta = p.mean(-1, keepdim=True) + z * p.std(-1, unbiased=False, keepdim=True)
    expected = (F.gelu(torch.relu(p - theta)) * (x[..., 8:] @ K2.T)) @ V.T
    assert max_abs_err(out, expected) < 1e-12
    assert torch.equal(mask, p > theta)
    x32 = x.float()
    sparse = zigspark.spark_ffn(x32, *(t.float() for t in (K1, K2, V)), 0.1, sparse=True)
    dense32 = zigspark.spark_ffn(x32, *(t.float() for t in (K1, K2, V)), 0.1)
    assert_by_rule(sparse, out, dense32, what="sparse FFN")


@pytest.mark.cpu
def test_spark_ffn_density_and_gradients():
    K1, K2, V = ffn_params(d=64, f=2000, r=16)
    x = torch.randn(64, 64, dtype=torch.float64)
    _, mask = zigspark.spark_ffn(x, K1, K2, V, 0.08, return_mask=True)
    assert abs(mask.double().mean().item() - 0.08) < 0.02
    small = [t.detach()[:50].clone() if i < 2 else t.detach()[:, :50].clone() for i, t in enumerate(ffn_params())]
    leaves = [torch.randn(3, 32, dtype=torch.float64, requires_grad=True)] + [t.requires_grad_(True) for t in small]
    assert torch.autograd.gradcheck(lambda x, a, b, c: zigspark.spark_ffn(x, a, b, c, 0.2), tuple(leaves))


@pytest.mark.cpu
def test_spark_ffn_sparse_op_opcheck_and_compiles_fullgraph():
    K1, K2, V = ffn_params(dtype=torch.float32)
    x = torch.randn(5, 32)
    gate = zigspark.stat_topk(x[:, :8] @ K1.T, density=0.1)
    torch.library.opcheck(torch.ops.zigspark.spark_ffn_sparse.default, (x, gate, K2, V, 8, "reference"))

    def sparse(t):
        return zigspark.spark_ffn(t, K1, K2, V, 0.1, sparse=True, backend="reference")

    torch.testing.assert_close(torch.compile(sparse, fullgraph=True, backend="aot_eager")(x), sparse(x))
    torch.testing.assert_close(sparse(x), zigspark.spark_ffn(x, K1, K2, V, 0.1), rtol=1e-5, atol=1e-6)
    for need_mask in (True, False):
        torch.library.opcheck(torch.ops.zigspark.spark_ffn_infer.default, (x, K1, K2, V, 1.28, need_mask, "reference"))


@pytest.mark.cpu
def test_spark_ffn_module_paths_and_dense_equivalent():
    layer = SparkFFN(32, 256, density=0.1).eval()
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        sparse = layer(x)
        layer.sparse_inference = False
        dense = layer(x)
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-6)
    baseline = layer.dense_equivalent()
    n_spark = sum(p.numel() for p in layer.parameters())
    n_dense = sum(p.numel() for p in baseline.parameters())
    assert abs(n_dense - n_spark) <= 3 * 32 and baseline(x).shape == x.shape


@pytest.mark.cpu
def test_spark_ffn_std_correction():
    """std_correction = 1: the threshold uses the sample std of the d_ff predictor values, on the dense, the
    sparse and the module path alike."""
    K1, K2, V = ffn_params(f=9)                       # few neurons: the correction moves θ visibly
    x = torch.randn(40, 32, dtype=torch.float64)
    out, mask = zigspark.spark_ffn(x, K1, K2, V, 0.25, std_correction=1, return_mask=True)
    p = x[:, :8] @ K1.T
    theta = p.mean(-1, keepdim=True) + statistics.NormalDist().inv_cdf(0.75) * p.std(-1, keepdim=True)
    assert torch.equal(mask, p > theta)
    assert not torch.equal(mask, zigspark.spark_ffn(x, K1, K2, V, 0.25, return_mask=True)[1])
    assert max_abs_err(out, (F.gelu(torch.relu(p - theta)) * (x[:, 8:] @ K2.T)) @ V.T) < 1e-12
    sparse, sparse_mask = zigspark.spark_ffn(x, K1, K2, V, 0.25, std_correction=1, sparse=True, return_mask=True)
    assert torch.equal(sparse_mask, mask) and max_abs_err(sparse, out) < 1e-12
    layer = SparkFFN(32, 9, density=0.25, predictor_dim=8, std_correction=1).double().eval()
    with torch.no_grad():
        for name, t in (("K1", K1), ("K2", K2), ("V", V)):
            getattr(layer, name).copy_(t)
        assert max_abs_err(layer(x), out) < 1e-12
    with pytest.raises(ValueError, match=r"SparkFFN: std_correction must be a number in \[0, 1\]"):
        SparkFFN(32, 64, std_correction=-1)
    with pytest.raises(ValueError, match="spark_ffn: std_correction"):
        zigspark.spark_ffn(x, K1, K2, V, 0.25, std_correction=2, sparse=True)


@pytest.mark.cpu
def test_spark_ffn_bad_inputs():
    K1, K2, V = ffn_params()
    x = torch.randn(2, 32, dtype=torch.float64)
    for density in (1.0, 0.0, -0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"spark_ffn: density must be in the open interval \(0, 1\)"):
            zigspark.spark_ffn(x, K1, K2, V, density)
        with pytest.raises(ValueError, match=r"SparkFFN: density must be in the open interval"):
            SparkFFN(32, 64, density=density)
    for density in (True, "0.1", None):
        with pytest.raises(TypeError, match=r"spark_ffn: density must be a float in the open interval"):
            zigspark.spark_ffn(x, K1, K2, V, density)
        with pytest.raises(TypeError, match=r"SparkFFN: density must be a float"):
            SparkFFN(32, 64, density=density)
    with pytest.raises(ValueError, match=r"K2 must be \(d_ff, d_model − r\)"):
        zigspark.spark_ffn(x, K1, K2[:, :5], V, 0.1)
    with pytest.raises(ValueError, match=r"V must be"):
        zigspark.spark_ffn(x, K1, K2, V.T, 0.1)
    with pytest.raises(ValueError, match=r"at least one neuron"):
        zigspark.spark_ffn(x, K1[:0], K2[:0], V[:, :0], 0.1, sparse=True)
    with pytest.raises(ValueError, match=r"predictor_dim must satisfy"):
        SparkFFN(16, 64, predictor_dim=16)


def naive_spark_attention(q, k, v, top_k, r, causal):
    b, sq, h, d = q.shape
    sk = k.shape[1]
    out = torch.zeros(b, sq, h, d, dtype=torch.float64)
    kept = torch.zeros(b, h, sq, dtype=torch.long)
    for bi in range(b):
        for hi in range(h):
            for i in range(sq):
                n = i + sk - sq + 1 if causal else sk
                if n <= 0:
                    continue
                qi, ks, vs = q[bi, i, hi].double(), k[bi, :n, hi].double(), v[bi, :n, hi].double()
                s1 = ks[:, :r] @ qi[:r] / math.sqrt(r)
                s2 = ks[:, r:] @ qi[r:] / math.sqrt(d - r)
                if n > top_k:
                    theta = s1.mean() + s1.std(unbiased=False) * statistics.NormalDist().inv_cdf(1 - top_k / n)
                    keep = s1 > theta
                else:
                    keep = torch.ones(n, dtype=torch.bool)
                w = torch.softmax(s1.masked_fill(~keep, -math.inf), 0) * F.softplus(s2)
                out[bi, i, hi] = w @ vs
                kept[bi, hi, i] = keep.sum()
    return out, kept


@pytest.mark.cpu
@pytest.mark.parametrize("causal", [True, False])
def test_spark_attention_matches_naive(causal):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 30, 2, 16, dtype=torch.float64) for _ in range(3))
    out, kept = zigspark.spark_attention(q, k, v, top_k=6, predictor_dim=4, causal=causal, chunk=7, return_kept=True)
    ref_out, ref_kept = naive_spark_attention(q, k, v, 6, 4, causal)
    assert max_abs_err(out, ref_out) < 1e-12
    assert torch.equal(kept, ref_kept)


@pytest.mark.cpu
def test_spark_attention_keeps_about_top_k_and_dense_when_short():
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 2000, 2, 32, dtype=torch.float64) for _ in range(3))
    _, kept = zigspark.spark_attention(q, k, v, top_k=64, causal=False, return_kept=True)
    assert abs(kept.double().mean().item() - 64) < 0.25 * 64
    _, kept = zigspark.spark_attention(q[:, :50], k[:, :50], v[:, :50], top_k=256, causal=True, return_kept=True)
    assert torch.equal(kept[0, 0], torch.arange(1, 51))  # top_k ≥ visible keys: every visible key is kept


@pytest.mark.cpu
def test_spark_attention_module_gradients_and_bad_inputs():
    layer = SparkAttention(32, heads=2, head_dim=16, top_k=4).double()
    x = torch.randn(1, 12, 32, dtype=torch.float64, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    q = torch.randn(1, 5, 2, 16)
    with pytest.raises(ValueError, match="predictor_dim r = 16"):
        zigspark.spark_attention(q, q, q, 4, predictor_dim=16)
    with pytest.raises(ValueError, match="top_k must be a positive int"):
        zigspark.spark_attention(q, q, q, 0)
    with pytest.raises(ValueError, match="must agree"):
        zigspark.spark_attention(q, q[:, :, :1], q, 4)


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_sparse_ffn_matches_dense(triton_device, dtype):
    K1, K2, V = (t.to(triton_device) for t in ffn_params(d=40, f=300, r=10))
    x = torch.randn(3, 40, dtype=torch.float64, device=triton_device)
    dense64 = zigspark.spark_ffn(x, K1, K2, V, 0.1, backend="reference")
    low = [t.to(dtype) for t in (x, K1, K2, V)]
    sparse = zigspark.spark_ffn(*low, 0.1, sparse=True, backend="triton")
    assert_by_rule(sparse, dense64, zigspark.spark_ffn(*low, 0.1, backend="reference"), what="triton sparse FFN", rel_floor=1e-5)


def fused_ffn_case(tokens, d, f, r, density, dtype, device, seed=0):
    """The Triton fused path (predictor and threshold inside its kernels) against the float64 reference
    and the same reference in `dtype`, with its mask checked against the reference's exact one."""
    K1, K2, V = (t.to(device) for t in ffn_params(d=d, f=f, r=r, seed=seed))
    x = torch.randn(tokens, d, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1)).to(device)
    dense64, mask64 = zigspark.spark_ffn(x, K1, K2, V, density, return_mask=True, backend="reference")
    low = [t.to(dtype) for t in (x, K1, K2, V)]
    sparse, mask = zigspark.spark_ffn(*low, density, sparse=True, return_mask=True, backend="triton")
    assert mask.shape == mask64.shape and mask.dtype == torch.bool
    assert_by_rule(sparse, dense64, zigspark.spark_ffn(*low, density, backend="reference"),
                   what=f"triton fused sparse FFN {tokens}x{d}, d_ff {f}, r {r}", rel_floor=1e-5)
    # A neuron may flip only where its predictor sits within rounding of θ: few, and none in float32.
    flips = (mask != mask64).sum().item()
    assert flips <= (0 if dtype == torch.float32 else max(2, mask.numel() // 200)), f"{flips} neurons flipped"
    return mask


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("tokens, d, f, r", [(1, 24, 40, 5), (19, 48, 333, 20), (2, 100, 130, 70), (70, 24, 40, 5)])
def test_triton_fused_sparse_ffn_thresholds_inside_the_kernels(triton_device, dtype, tokens, d, f, r):
    """Decode (1 token: a padded 16-token tile), a padded 32-token tile (19), two 64-token tiles (70), d_ff
    below one predictor tile (40) and with a ragged last tile (333, 130), a predictor width over one k block
    (70). Not bfloat16 here: the
    interpreter's tl.dot returns garbage for bfloat16 operands (the gpu tier covers it)."""
    fused_ffn_case(tokens, d, f, r, 0.1, dtype, triton_device)


@pytest.mark.interpret
@pytest.mark.parametrize("splits", [1, 2, 5, 50])
def test_triton_sparse_ffn_projection_splits(triton_device, splits):
    """The projection split over d_ff (decode) and summed in split order gives the formula's output for
    every split count, the last split ragged (d_ff 333: 2 splits of 192 and 141; 5 recount to 3 of 128, the
    last 77; 50 recount to 6 of 64, the last 13), unfused (a given gate) and fused."""
    from zigspark.cuda_ops.spark_ffn import transposed
    from zigspark.triton_kernels import spark_ffn as kernels

    K1, K2, V = (t.float().to(triton_device) for t in ffn_params(d=40, f=333, r=10, seed=2))
    x = torch.randn(3, 40, generator=torch.Generator().manual_seed(6)).to(triton_device)
    gate = zigspark.stat_topk(x[:, :10] @ K1.T, density=0.3)
    expected = (F.gelu(gate) * (x[:, 10:] @ K2.T)) @ V.T
    VT = transposed(V).contiguous()
    out = kernels.spark_ffn_sparse(x, gate, K2, VT, 10, splits=splits)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    fused, fused_gate = kernels.spark_ffn_fused(x, K1, K2, VT, statistics.NormalDist().inv_cdf(0.7), splits=splits)
    torch.testing.assert_close(fused, (F.gelu(fused_gate) * (x[:, 10:] @ K2.T)) @ V.T, rtol=1e-5, atol=1e-5)
    assert [kernels.split_plan(333, n) for n in (1, 2, 5, 50)] == [(384, 1), (192, 2), (128, 3), (64, 6)]
    assert kernels.project_splits(1, 1024, 16384, torch.device("cpu")) == 64        # decode: ~4 programs/SM
    assert kernels.project_splits(600, 1024, 16384, torch.device("cpu")) == 1       # prefill fills the GPU


@pytest.mark.interpret
def test_triton_fused_sparse_ffn_density_and_constant_predictor(triton_device):
    mask = fused_ffn_case(40, 32, 1000, 8, 0.08, torch.float32, triton_device, seed=3)
    assert abs(mask.double().mean().item() - 0.08) < 0.02
    K1, K2, V = (t.float().to(triton_device) for t in ffn_params(d=16, f=70, r=4))
    x = torch.zeros(3, 16, device=triton_device)
    x[:, 4:] = 1.0                         # p = 0 for every neuron: σ = 0, nothing exceeds θ, as the reference
    out, mask = zigspark.spark_ffn(x, K1, K2, V, 0.1, sparse=True, return_mask=True, backend="triton")
    assert not mask.any() and torch.equal(out, torch.zeros_like(out))
    check_constant_predictor(triton_device, "triton")


def check_constant_predictor(device, backend):
    """Identical K1 rows: p is one nonzero constant per token, whose float32 tile means round away from it,
    so the merged std comes out at rounding level rather than 0. At densities where z is small (or
    negative) a rounding-level θ would sit below the constant and switch every neuron on; the reference's
    σ is exactly 0 and switches none."""
    K1, K2, V = (t.float().to(device) for t in ffn_params(d=24, f=150, r=6, seed=4))   # last tile: 22
    K1 = K1[:1].expand_as(K1).contiguous() * 3.7
    x = torch.randn(12, 24, generator=torch.Generator().manual_seed(5)).to(device)
    for density in (0.08, 0.45, 0.6):
        _, ref_mask = zigspark.spark_ffn(x, K1, K2, V, density, return_mask=True, backend="reference")
        out, mask = zigspark.spark_ffn(x, K1, K2, V, density, sparse=True, return_mask=True, backend=backend)
        assert not ref_mask.any() and not mask.any(), f"density {density}: {mask.sum().item()} neurons on"
        assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 5, 64, 300])
def test_gpu_triton_fused_sparse_ffn_matches_reference(dtype, tokens):
    fused_ffn_case(tokens, 1024, 4096, 256, 0.08, dtype, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 16, 300])
def test_gpu_triton_sparse_ffn_matches_dense(dtype, tokens):
    K1, K2, V = (t.cuda() for t in ffn_params(d=1024, f=4096, r=256))
    x = torch.randn(tokens, 1024, dtype=torch.float64, device="cuda")
    dense64 = zigspark.spark_ffn(x, K1, K2, V, 0.08, backend="reference")
    low = [t.to(dtype) for t in (x, K1, K2, V)]
    sparse = zigspark.spark_ffn(*low, 0.08, sparse=True, backend="triton")
    assert_by_rule(sparse, dense64, zigspark.spark_ffn(*low, 0.08, backend="reference"), what="triton sparse FFN", rel_floor=1e-5)
