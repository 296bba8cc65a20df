"""Spark FFN sparse inference on the CUDA backend (csrc/spark_ffn/spark_ffn.cu).

gpu tier: the sparse CUDA path against the dense-masked computation by the numerics rule (float64 reference,
≤ 2× the error of the same reference in the kernel's dtype), at decode and prefill token counts, for
d_model − r and d_model both multiples and not multiples of the 16-byte pack; tokens with no and with every
neuron active; every slice plan; determinism. build tier: the extension exposes the kernels and fails
clearly without a GPU. cpu tier: the cached Vᵀ and the backend error off the GPU. emulate tier: the same
kernels on the CPU emulator for small layers.
"""

import functools
import math
import statistics

import pytest
import torch
import torch.nn.functional as F

import zigspark
from zigspark import BackendUnavailableError
from zigspark.cuda_ops import spark_ffn as cuda_ffn
from zigspark.nn import SparkFFN

from numerics import assert_by_rule

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (d_model, r): pack-aligned rows; d_model − r = 390 and 412, not multiples of 8 (K2 rows peel heads and
# tails, r = 100 and 130 not multiples of 8); d_model = 1030, not a multiple of 8 (Vᵀ columns run scalar).
SHAPES = [(512, 128), (1024, 256), (2048, 512), (520, 130), (512, 100), (1030, 257)]


@functools.lru_cache(maxsize=None)
def ffn_weights(d, r, seed=0, device="cuda"):
    """float64 K1 (f, r), K2 (f, d − r), V (d, f) on `device`, f = 4d, scaled like nn.Linear's init."""
    f = 4 * d
    g = torch.Generator(device=device).manual_seed(seed)
    return tuple(torch.randn(*s, generator=g, device=device, dtype=torch.float64) / math.sqrt(s[-1])
                 for s in ((f, r), (f, d - r), (d, f)))


def formula(x, gate, K2, VT, r):
    """out = (GELU(g)·(x[:, r:]·K2ᵀ))·Vᵀ in the inputs' dtype: the dense-masked computation from a given gate."""
    return (F.gelu(gate) * (x[:, r:] @ K2.T)) @ VT


# ---- gpu tier ---------------------------------------------------------------------------------------------

def check_sparse_matches_dense(device, d, r, density, tokens, dtype):
    K1, K2, V = ffn_weights(d, r, device=device)
    gen = torch.Generator(device).manual_seed(tokens)
    x = torch.randn(tokens, d, dtype=torch.float64, device=device, generator=gen)
    dense64 = zigspark.spark_ffn(x, K1, K2, V, density, backend="reference")
    low = [t.to(dtype) for t in (x, K1, K2, V)]
    sparse, mask = zigspark.spark_ffn(*low, density, sparse=True, return_mask=True, backend="cuda")
    assert sparse.dtype == dtype and sparse.shape == x.shape
    assert 0.5 * density < mask.double().mean().item() < 1.5 * density
    assert_by_rule(sparse, dense64, zigspark.spark_ffn(*low, density, backend="reference"), what=f"cuda sparse FFN {dtype}",
                   rel_floor=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).replace("torch.", ""))
@pytest.mark.parametrize("tokens", [1, 4, 16, 64, 300])
@pytest.mark.parametrize("density", [0.08, 0.3])
@pytest.mark.parametrize("d,r", SHAPES)
def test_gpu_cuda_sparse_ffn_matches_dense(d, r, density, tokens, dtype):
    check_sparse_matches_dense("cuda", d, r, density, tokens, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).replace("torch.", ""))
@pytest.mark.parametrize("tokens", [1, 16, 300])
@pytest.mark.parametrize("d,r", [(1024, 256), (520, 130), (4200, 4096)])
def test_gpu_cuda_fused_predictor(d, r, tokens, dtype):
    check_fused_predictor("cuda", d, r, tokens, None, dtype)


# ---- emulate tier: the same kernels on the CPU emulator, small layers ---------------------------------------

@pytest.mark.emulate
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).replace("torch.", ""))
@pytest.mark.parametrize("tokens", [1, 5])
@pytest.mark.parametrize("d,r", [(64, 16), (130, 33), (104, 24)])
def test_emulated_cuda_sparse_ffn_matches_dense(d, r, tokens, dtype):
    check_sparse_matches_dense("cpu", d, r, 0.3, tokens, dtype)


@pytest.mark.emulate
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).replace("torch.", ""))
@pytest.mark.parametrize("slices", [None, 1, 3])
def test_emulated_cuda_sparse_ffn_extreme_gates_and_slice_plans(slices, dtype):
    check_extreme_gates_and_slice_plans("cpu", 130, 33, slices, dtype)


@pytest.mark.emulate
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).replace("torch.", ""))
def test_emulated_cuda_sparse_ffn_strided_weights(dtype):
    check_strided_weights("cpu", dtype, d=66, r=13, f=70, tokens=3, batched_d=64)


@pytest.mark.emulate
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).replace("torch.", ""))
@pytest.mark.parametrize("tokens, slices", [(9, None), (3, 1), (17, 3), (2, None), (1, 2)])
def test_emulated_cuda_fused_predictor(tokens, slices, dtype):
    check_fused_predictor("cpu", 130, 33, tokens, slices, dtype)


@pytest.mark.emulate
def test_emulated_cuda_fused_predictor_constant_and_dispatch():
    """A constant nonzero predictor switches no neuron on (as the reference); the op picks the fused kernels
    for decode batches only, and passes opcheck either way."""
    from test_spark import check_constant_predictor, ffn_params

    check_constant_predictor("cpu", "cuda")
    cpu = torch.device("cpu")
    assert cuda_ffn.fusable(16, 4096, cpu) and not cuda_ffn.fusable(17, 256, cpu)
    assert not cuda_ffn.fusable(1, 4097, cpu)
    K1, K2, V = (t.float() for t in ffn_params(d=40, f=150, r=9))
    for tokens in (3, 20):                      # fused, then F.linear + stat_topk + the sparse kernel
        x = torch.randn(tokens, 40)
        torch.library.opcheck(torch.ops.zigspark.spark_ffn_infer.default, (x, K1, K2, V, 1.28, True, "cuda"))
        out, mask = torch.ops.zigspark.spark_ffn_infer(x, K1, K2, V, 1.28, True, "cuda")
        ref, ref_mask = torch.ops.zigspark.spark_ffn_infer(x, K1, K2, V, 1.28, True, "reference")
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        assert (mask != ref_mask).sum() <= 1


@pytest.mark.emulate
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).replace("torch.", ""))
@pytest.mark.parametrize("tokens", [1, 3, 9])
def test_emulated_cuda_fused_predictor_vector_loads(tokens, dtype):
    """A contiguous K1 with r a multiple of the 16-byte pack: the predictor's vector path (K1 in packs, x read
    from shared memory a float4 at a time), with 8 rows at a time (one token) and 4 (three and nine), and a
    last tile of 16 neurons (d_ff 4·d = 272)."""
    check_fused_predictor("cpu", 68, 16, tokens, None, dtype, padded_k1=False)


def check_fused_predictor(device, d, r, tokens, slices, dtype, padded_k1=True):
    """The predictor and threshold computed inside the CUDA kernels: the gate it returns against stat_topk's
    on the same rounded weights (continuous in θ, so a tolerance), the output against the formula from that
    gate and by the numerics rule against the float64 reference, for a K1 with padded rows (row stride > r)
    or contiguous ones, a token with constant predictor (σ = 0: nothing active) when there are several,
    over 8 tokens (two predictor tiles) and d_ff not a multiple of the 64-neuron tile."""
    K1, K2, V = ffn_weights(d, r, device=device)
    gen = torch.Generator(device).manual_seed(tokens)
    x = torch.randn(tokens, d, dtype=torch.float64, device=device, generator=gen)
    constant = tokens > 1                  # with one token, keep it informative: no σ = 0 token then
    if constant:
        x[0, :r] = 0.0                                              # p = 0 for every neuron of token 0
    wide = torch.zeros(K1.shape[0], r + 7 if padded_k1 else r, dtype=dtype, device=device)
    wide[:, :r] = K1.to(dtype)
    low = [t.to(dtype) for t in (x, K1, K2, V)]
    z = statistics.NormalDist().inv_cdf(1 - 0.2)
    out, gate = cuda_ffn.spark_ffn_fused(low[0], wide[:, :r], low[2], low[3].T.contiguous(), z, slices=slices)
    assert gate.dtype == torch.float32 and gate.any()
    if constant:
        assert not gate[0].any() and torch.equal(out[0], torch.zeros_like(out[0]))
    p = low[0][:, :r].float() @ low[1].float().T
    expected_gate = zigspark.stat_topk(p, density=0.2, backend="reference")
    torch.testing.assert_close(gate, expected_gate, rtol=0, atol=1e-5 * p.abs().max().item())
    ref64 = formula(low[0].double(), gate.double(), low[2].double(), low[3].T.double(), r)
    assert_by_rule(out, ref64, formula(low[0], gate.to(dtype), low[2], low[3].T, r), what="cuda fused FFN",
                   rel_floor=1e-5)
    dense64 = zigspark.spark_ffn(x, K1, K2, V, 0.2, backend="reference")
    assert_by_rule(out, dense64, zigspark.spark_ffn(*low, 0.2, backend="reference"), what="cuda fused FFN vs dense",
                   rel_floor=1e-5)


def check_extreme_gates_and_slice_plans(device, d, r, slices, dtype):
    """Row 0: no neuron active (out exactly 0); row 1: every neuron active; row 2: about half; then tokens
    at the usual density. Direct call with a given gate, for every slice plan (one slice writes out itself)."""
    _, K2, V = ffn_weights(d, r, device=device)
    f = K2.shape[0]
    gen = torch.Generator(device).manual_seed(1)
    x = torch.randn(6, d, dtype=torch.float64, device=device, generator=gen)
    gate = torch.rand(6, f, dtype=torch.float64, device=device, generator=gen) + 0.01
    gate[0] = 0.0
    gate[2] *= torch.rand(f, device=device, generator=gen) < 0.5
    gate[3:] *= torch.rand(3, f, device=device, generator=gen) < 0.08
    low = [t.to(dtype) for t in (x, gate, K2, V.T)]
    out = cuda_ffn.spark_ffn_sparse(low[0], low[1], low[2], low[3].contiguous(), r, slices=slices)  # NaN-poisoned
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    ref64 = formula(*(t.double() for t in low), r)
    assert_by_rule(out, ref64, formula(low[0], low[1], low[2], low[3], r), what="cuda sparse FFN extreme gates",
                   rel_floor=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).replace("torch.", ""))
@pytest.mark.parametrize("slices", [None, 1, 3, 64])
@pytest.mark.parametrize("d,r", [(512, 128), (520, 130), (1030, 257)])
def test_gpu_cuda_sparse_ffn_extreme_gates_and_slice_plans(d, r, slices, dtype):
    check_extreme_gates_and_slice_plans("cuda", d, r, slices, dtype)


def check_strided_weights(device, dtype, d=520, r=100, f=1500, tokens=40, batched_d=512):
    """K2 and Vᵀ as row-strided views of wider buffers (K2 rows start at every 16-byte phase; Vᵀ rows once
    aligned, once not), x non-contiguous with batch dimensions."""
    gen = torch.Generator(device).manual_seed(2)
    K2 = (torch.randn(f, d - r + 3, device=device, dtype=torch.float64, generator=gen) / 20)[:, 1:d - r + 1]
    gate = torch.relu(torch.randn(tokens, f, device=device, dtype=torch.float64, generator=gen) - 1.4)
    x = torch.randn(tokens, d, device=device, dtype=torch.float64, generator=gen)
    for pad in (8, 1):
        VT = (torch.randn(f, d + pad, device=device, dtype=torch.float64, generator=gen) / 40)[:, :d]
        low = [t.to(dtype) for t in (x, gate, K2, VT)]
        low[2] = torch.empty(f, d - r + 3, device=device, dtype=dtype)[:, 1:d - r + 1].copy_(low[2])
        low[3] = torch.empty(f, d + pad, device=device, dtype=dtype)[:, :d].copy_(low[3])
        assert low[2].stride(0) == d - r + 3 and low[3].stride(0) == d + pad
        out = cuda_ffn.spark_ffn_sparse(*low, r)
        assert_by_rule(out, formula(*(t.double() for t in low), r), formula(*low, r),
                       what=f"cuda sparse FFN strided (pad {pad})", rel_floor=1e-5)
    weights64 = ffn_weights(batched_d, batched_d // 4, device=device)
    weights = [t.to(dtype) for t in weights64]
    xb = torch.randn(3, 7, 2 * batched_d, device=device, dtype=torch.float64, generator=gen).to(dtype)[..., ::2]
    out = zigspark.spark_ffn(xb, *weights, 0.08, sparse=True, backend="cuda")
    assert out.shape == xb.shape == (3, 7, batched_d)
    assert_by_rule(out, zigspark.spark_ffn(xb.double(), *weights64, 0.08, backend="reference"),
                   zigspark.spark_ffn(xb, *weights, 0.08, backend="reference"),
                   what="cuda sparse FFN, strided 3-D x", rel_floor=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).replace("torch.", ""))
def test_gpu_cuda_sparse_ffn_strided_weights(dtype):
    check_strided_weights("cuda", dtype)


@pytest.mark.gpu
def test_gpu_cuda_sparse_ffn_inactive_tokens_deterministic_and_cached_vt():
    K1, K2, V = (t.to(torch.bfloat16) for t in ffn_weights(1024, 256))
    x = torch.randn(33, 1024, device="cuda", dtype=torch.bfloat16)
    x[5, :256] = 0.0  # predictor all 0: σ = 0, θ = μ = 0, nothing is > θ, so no neuron is active
    runs = [zigspark.spark_ffn(x, K1, K2, V, 0.08, sparse=True, backend="cuda") for _ in range(3)]
    assert all(torch.equal(runs[0], r) for r in runs[1:]), "not deterministic"
    assert torch.equal(runs[0][5], torch.zeros_like(runs[0][5]))
    with torch.no_grad():
        V.mul_(2)  # in place: the cached Vᵀ must follow
    doubled = zigspark.spark_ffn(x, K1, K2, V, 0.08, sparse=True, backend="cuda")
    torch.testing.assert_close(doubled, 2 * runs[0], rtol=0, atol=0)


@pytest.mark.gpu
def test_gpu_auto_picks_cuda_for_sparse_ffn():
    layer = SparkFFN(256, 1024).cuda().half().eval()
    x = torch.randn(4, 256, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        layer(x)
    assert zigspark.last_backends()["spark_ffn"] == "cuda"


@pytest.mark.gpu
def test_gpu_cuda_sparse_ffn_bad_inputs():
    K1, K2, V = (t.float() for t in ffn_weights(512, 128))
    x = torch.randn(2, 512, device="cuda")
    gate = torch.relu(torch.randn(2, 2048, device="cuda"))
    with pytest.raises(TypeError, match="share one dtype"):
        cuda_ffn.spark_ffn_sparse(x, gate.half(), K2, V.T.contiguous(), 128)
    with pytest.raises(ValueError, match="do not fit"):
        cuda_ffn.spark_ffn_sparse(x, gate, K2, V.T.contiguous(), 100)
    with pytest.raises(BackendUnavailableError, match="float32, float16, bfloat16"):
        zigspark.spark_ffn(x.double(), K1.double(), K2.double(), V.double(), 0.08, sparse=True, backend="cuda")


# ---- build tier ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def C(cuda_extension):
    return cuda_extension


def _launch_args(**overrides):
    args = dict(x=256, gate=256, k2=256, vt=256, out=256, partial=0, tokens=1, d_model=64, d_ff=256, r=16,
                x_row_stride=64, gate_row_stride=256, k2_row_stride=48, vt_row_stride=64, out_row_stride=64,
                slices=1, dtype=0, device=0, stream=0)
    args.update(overrides)
    return args


@pytest.mark.build
def test_extension_exposes_spark_ffn_and_plans_slices(C):
    assert hasattr(C, "spark_ffn_forward") and hasattr(C, "spark_ffn_slices")
    for sms in (1, 108, 132):
        for d_ff in (1, 100, 4096, 16384, 65536):
            for tokens in (1, 4, 16, 64, 300, 2048, 100000):
                n = C.spark_ffn_slices(tokens, d_ff, sms)
                size = ((d_ff + n - 1) // n + 31) // 32 * 32          # the kernel's slice size
                assert 1 <= n <= max(1, -(-d_ff // 128)) and (n - 1) * size < d_ff <= n * size, (tokens, d_ff, n)
                if tokens >= 4 * sms:
                    assert n == 1          # prefill: one block per token writes out directly
    assert C.spark_ffn_slices(1, 16384, 132) == 128 and C.spark_ffn_slices(0, 16384, 132) == 1


@pytest.mark.build
def test_spark_ffn_validates_before_launch(C):
    with pytest.raises(ValueError, match="unsupported dtype float64"):
        C.spark_ffn_forward(**_launch_args(dtype=3))
    with pytest.raises(ValueError, match="0 < r < d_model"):
        C.spark_ffn_forward(**_launch_args(r=64))
    with pytest.raises(ValueError, match="workspace"):
        C.spark_ffn_forward(**_launch_args(slices=4))
    with pytest.raises(ValueError, match="K2 row stride 40 is shorter"):
        C.spark_ffn_forward(**_launch_args(k2_row_stride=40))
    C.spark_ffn_forward(**_launch_args(tokens=0))  # nothing to do: returns without touching the device
    fused = _launch_args(k1=256, moments=0, k1_row_stride=16, z=1.4)
    with pytest.raises(ValueError, match="needs the float32 moments workspace"):
        C.spark_ffn_forward(**fused)
    with pytest.raises(ValueError, match="K1 row stride 8 is shorter"):
        C.spark_ffn_forward(**dict(fused, moments=256, k1_row_stride=8))
    with pytest.raises(ValueError, match="z must be finite"):
        C.spark_ffn_forward(**dict(fused, moments=256, z=float("inf")))
    with pytest.raises(ValueError, match="takes r ≤ 4096"):
        C.spark_ffn_forward(**dict(fused, moments=256, d_model=5000, r=4100, x_row_stride=5000, k1_row_stride=4100,
                                   k2_row_stride=900, vt_row_stride=5000, out_row_stride=5000))
    assert C.spark_ffn_predictor_tiles(1) == 1 and C.spark_ffn_predictor_tiles(130) == 3


@pytest.mark.build
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU; the gpu tier covers launches")
def test_spark_ffn_launch_without_gpu_raises_clear_error(C):
    with pytest.raises(RuntimeError, match="no CUDA device is available.*backend='reference'"):
        C.spark_ffn_forward(**_launch_args())


# ---- cpu tier -------------------------------------------------------------------------------------------------

@pytest.mark.cpu
def test_transposed_v_is_cached_until_v_changes():
    V = torch.randn(8, 32)
    vt = cuda_ffn.transposed(V)
    assert vt.is_contiguous() and torch.equal(vt, V.T)
    assert cuda_ffn.transposed(V) is vt          # no copy on the second call
    V.add_(1)                                    # in place: the version counter moves
    vt2 = cuda_ffn.transposed(V)
    assert vt2 is not vt and torch.equal(vt2, V.T)
    stored = torch.randn(32, 8)                  # V given as the transpose of a contiguous Vᵀ: a view, no copy
    assert cuda_ffn.transposed(stored.T).data_ptr() == stored.data_ptr()
    with torch.inference_mode():
        inf = torch.randn(8, 32)
        assert torch.equal(cuda_ffn.transposed(inf), inf.T)


@pytest.mark.cpu
def test_cuda_backend_off_the_gpu_names_the_cause():
    K1, K2, V = torch.randn(64, 8), torch.randn(64, 24), torch.randn(32, 64)
    with pytest.raises(BackendUnavailableError, match="backend='cuda'"):
        zigspark.spark_ffn(torch.randn(2, 32), K1, K2, V, 0.1, sparse=True, backend="cuda")
