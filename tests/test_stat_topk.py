"""zigspark.stat_topk in every tier: reference vs a naive loop, gradients, registration, bad inputs,
the Triton kernels (interpret tier) and every backend x dtype on a GPU (gpu tier)."""

import math
import statistics

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import zigspark
from zigspark import BackendUnavailableError
from zigspark.ops import stat_topk as op
from zigspark.reference import stat_topk as ref

from numerics import assert_by_rule, max_abs_err

cpu = pytest.mark.cpu
interpret = pytest.mark.interpret
gpu = pytest.mark.gpu


def naive_stat_topk(rows, k):
    """Oracle of the oracle: Python floats, one row at a time."""
    out = []
    for row in rows.tolist():
        d = len(row)
        mean = sum(row) / d
        std = math.sqrt(sum((v - mean) ** 2 for v in row) / d)
        theta = mean + std * statistics.NormalDist().inv_cdf(1 - k / d)
        out.append([max(v - theta, 0.0) for v in row])
    return torch.tensor(out, dtype=torch.float64)


# ---- cpu tier: the reference ---------------------------------------------------------------------------

@cpu
@pytest.mark.parametrize("d,k", [(2, 1), (7, 3), (100, 8), (1000, 80)])
def test_reference_matches_naive_loop(d, k):
    x = torch.randn(5, d, dtype=torch.float64)
    y = zigspark.stat_topk(x, k, backend="reference")
    assert max_abs_err(y, naive_stat_topk(x, k)) < 1e-12


@cpu
def test_density_equals_k_over_d():
    x = torch.randn(3, 200)
    torch.testing.assert_close(zigspark.stat_topk(x, 16), zigspark.stat_topk(x, density=16 / 200))


@cpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_keeps_dtype_and_computes_statistics_in_float32(dtype):
    x = torch.randn(4, 300).to(dtype)
    y, mask = zigspark.stat_topk(x, 30, return_mask=True, backend="reference")
    assert y.dtype == dtype and mask.dtype == torch.bool
    xs = x.float()
    theta = xs.mean(-1, keepdim=True) + xs.std(-1, unbiased=False, keepdim=True) * op.survivor_quantile(300, 30)
    torch.testing.assert_close(y, torch.relu(xs - theta).to(dtype))
    assert zigspark.stat_topk_threshold(x, 30).dtype == torch.float32
    assert torch.equal(mask, xs > zigspark.stat_topk_threshold(x, 30, keepdim=True))


@cpu
def test_mask_matches_threshold_and_output():
    x = torch.randn(6, 500, dtype=torch.float64)
    y, mask = zigspark.stat_topk(x, 40, return_mask=True)
    theta = zigspark.stat_topk_threshold(x, 40, keepdim=True)
    assert torch.equal(mask, x > theta)
    assert torch.equal(mask, y > 0)
    assert zigspark.stat_topk_threshold(x, 40).shape == (6,)


@cpu
@pytest.mark.parametrize("shape,dim", [((37,), 0), ((2, 3, 50), 1), ((2, 3, 50), -1), ((50, 4), 0), ((1, 2), 1)])
def test_any_dim_and_shape(shape, dim):
    x = torch.randn(*shape, dtype=torch.float64)
    d = x.shape[dim]
    k = max(1, d // 4)
    y = zigspark.stat_topk(x, k, dim=dim)
    expected = naive_stat_topk(x.movedim(dim, -1).reshape(-1, d), k).reshape(x.movedim(dim, -1).shape)
    assert max_abs_err(y, expected.movedim(-1, dim)) < 1e-12


@cpu
def test_non_contiguous_and_empty_batch():
    x = torch.randn(40, 30, dtype=torch.float64).t()  # last dim has stride 30
    torch.testing.assert_close(zigspark.stat_topk(x, 5), zigspark.stat_topk(x.contiguous(), 5))
    empty = torch.randn(0, 16)
    assert zigspark.stat_topk(empty, 4).shape == (0, 16)


@cpu
def test_constant_row_gives_zero_output_and_gradient():
    x = torch.full((2, 64), 3.0, dtype=torch.float64, requires_grad=True)
    y = zigspark.stat_topk(x, 8)
    assert torch.equal(y, torch.zeros_like(y))
    y.backward(torch.randn_like(y))
    assert torch.equal(x.grad, torch.zeros_like(x))


@cpu
@pytest.mark.parametrize("dim", [-1, 0])
def test_gradcheck_float64(dim):
    x = torch.randn(5, 23, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: zigspark.stat_topk(t, 4, dim=dim), (x,))


@cpu
def test_closed_form_backward_matches_autograd_through_reference():
    x = torch.randn(7, 300, dtype=torch.float64, requires_grad=True)
    g = torch.randn(7, 300, dtype=torch.float64)
    z = op.survivor_quantile(300, 25)
    y, _, mean, std = ref.stat_topk_forward(x, z)
    (autograd_grad,) = torch.autograd.grad(y, x, g)
    closed = ref.stat_topk_backward(g, x.detach(), mean.detach(), std.detach(), z)
    assert max_abs_err(closed, autograd_grad) < 1e-12


@cpu
@pytest.mark.parametrize("d", [7, 300])
def test_std_correction_gives_the_corrected_std_threshold(d):
    """std_correction = c: θ = mean + z·sqrt(Σ(x − mean)²/(d − c)), forward, mask and the gradient through θ."""
    x = torch.randn(5, d, dtype=torch.float64, requires_grad=True)
    k = max(1, d // 5)
    z = statistics.NormalDist().inv_cdf(1 - k / d)
    for c in (0.0, 0.5, 1.0):
        xs = x.detach()
        theta = xs.mean(-1, keepdim=True) + z * xs.var(-1, correction=c, keepdim=True).sqrt()
        y, mask = zigspark.stat_topk(x, k, std_correction=c, return_mask=True)
        assert max_abs_err(y, torch.relu(xs - theta)) < 1e-12 and torch.equal(mask, xs > theta)
        assert max_abs_err(zigspark.stat_topk_threshold(xs, k, std_correction=c, keepdim=True), theta) < 1e-12
        g = torch.randn(5, d, dtype=torch.float64)
        expected = torch.autograd.grad(torch.relu(x - x.mean(-1, keepdim=True) - z * x.var(-1, correction=c,
                                                                                    keepdim=True).sqrt()), x, g)[0]
        assert max_abs_err(torch.autograd.grad(y, x, g)[0], expected) < 1e-12
    assert torch.autograd.gradcheck(lambda t: zigspark.stat_topk(t, k, std_correction=1), (x,))
    for bad in (-0.1, 1.5, float("nan"), "1", None):
        with pytest.raises(ValueError, match=r"stat_topk: std_correction must be a number in \[0, 1\]"):
            zigspark.stat_topk(x, k, std_correction=bad)


@cpu
def test_threshold_is_differentiable():
    x = torch.randn(3, 40, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: zigspark.stat_topk_threshold(t, density=0.2), (x,))


@cpu
@pytest.mark.parametrize("need_mask", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_opcheck(need_mask, dtype):
    x = torch.randn(4, 33).to(dtype)
    z = op.survivor_quantile(33, 5)
    torch.library.opcheck(torch.ops.zigspark.stat_topk_fwd.default, (x, z, need_mask, "reference"))
    stat = ref.stat_dtype(dtype)
    mean, std = x.to(stat).mean(-1), x.to(stat).std(-1, unbiased=False)
    torch.library.opcheck(torch.ops.zigspark.stat_topk_bwd.default, (torch.randn(4, 33).to(dtype), x, mean, std, z,
                                                                      "reference"))


@cpu
def test_torch_compile_fullgraph():
    x = torch.randn(8, 128, requires_grad=True)

    def f(t):
        return zigspark.stat_topk(t, density=0.1).square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    (grad,) = torch.autograd.grad(out, x)
    x2 = x.detach().requires_grad_(True)
    (grad2,) = torch.autograd.grad(f(x2), x2)
    torch.testing.assert_close(out, f(x2))
    torch.testing.assert_close(grad, grad2)


@cpu
def test_torch_compile_inductor():
    x = torch.randn(8, 128)
    compiled = torch.compile(lambda t: zigspark.stat_topk(t, 12) * 2, fullgraph=True)
    torch.testing.assert_close(compiled(x), zigspark.stat_topk(x, 12) * 2)


# Over Gaussian rows the survivors' share must be within 15% (relative) of k/d plus 5 binomial standard
# errors: θ uses the sample mean and std, so the share is not exactly k/d, but close.
@cpu
@settings(max_examples=30, deadline=None)
@given(d=st.integers(256, 4096), density=st.floats(0.02, 0.5), seed=st.integers(0, 2**31 - 1))
def test_survivor_fraction_property(d, density, seed):
    rows = 32
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, d, generator=gen, dtype=torch.float64) * 3.0 + 1.5
    _, mask = zigspark.stat_topk(x, density=density, return_mask=True)
    frac = mask.double().mean().item()
    tolerance = 0.15 * density + 5 * math.sqrt(density * (1 - density) / (rows * d))
    assert abs(frac - density) <= tolerance, (frac, density, tolerance)


# ---- cpu tier: bad inputs ------------------------------------------------------------------------------

@cpu
@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(k=0), ValueError, r"1 <= k < d = 10"),
    (dict(k=10), ValueError, r"1 <= k < d = 10"),
    (dict(k=-3), ValueError, r"1 <= k < d"),
    (dict(k=2.5), TypeError, r"k must be an int"),
    (dict(k=True), TypeError, r"k must be an int"),
    (dict(), ValueError, r"exactly one of k"),
    (dict(k=2, density=0.2), ValueError, r"exactly one of k"),
    (dict(density=0.0), ValueError, r"open interval \(0, 1\)"),
    (dict(density=1.0), ValueError, r"open interval"),
    (dict(density=float("nan")), ValueError, r"open interval"),
    (dict(density="0.1"), TypeError, r"density must be a float"),
    (dict(density=True), TypeError, r"density must be a float"),
    (dict(density=float("inf")), ValueError, r"open interval"),
    (dict(k=2, dim=2), ValueError, r"dim=2 is out of range .* 2 dimensions"),
    (dict(k=2, dim=-3), ValueError, r"out of range"),
    (dict(k=2, dim=1.0), TypeError, r"dim must be an int"),
    (dict(k=2, backend="gpu"), ValueError, r"backend must be one of"),
])
def test_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        zigspark.stat_topk(torch.randn(3, 10), **kwargs)


@cpu
@pytest.mark.parametrize("bad,exc,match", [
    (torch.arange(10).reshape(2, 5), TypeError, r"x must have a floating dtype .* got int64; convert"),
    (torch.ones(2, 5, dtype=torch.bool), TypeError, r"floating dtype"),
    (torch.randn(2, 5, dtype=torch.complex64), TypeError, r"floating dtype"),
    ([1.0, 2.0], TypeError, r"x must be a torch.Tensor, got list"),
    (torch.randn(3, 0), ValueError, r"dimension 1 of x is empty"),
    (torch.tensor(1.0), ValueError, r"0-dimensional"),
])
def test_bad_tensors(bad, exc, match):
    with pytest.raises(exc, match=match):
        zigspark.stat_topk(bad, 1)
    with pytest.raises(exc, match=match):
        zigspark.stat_topk_threshold(bad, 1)


@cpu
def test_explicit_backend_on_wrong_device_names_cause_and_fix():
    x = torch.randn(2, 16)
    with pytest.raises(BackendUnavailableError, match=r"backend='cuda' cannot run here: .*(needs CUDA tensors|not built)"):
        zigspark.stat_topk(x, 3, backend="cuda")
    if not zigspark.backends.triton_interpreting():
        with pytest.raises(BackendUnavailableError, match=r"backend='triton' cannot run here: .*(on cpu|not installed)"):
            zigspark.stat_topk(x, 3, backend="triton")


# ---- interpret tier: the Triton kernels ----------------------------------------------------------------

def _run(x, k, backend, grad_out, dim=-1):
    x = x.detach().clone().requires_grad_(True)
    y, mask = zigspark.stat_topk(x, k, dim=dim, return_mask=True, backend=backend)
    (gx,) = torch.autograd.grad(y, x, grad_out)
    return y.detach(), mask, gx


def check_backend_against_reference(backend, device, dtype, rows, d, dim=-1, make=None):
    torch.manual_seed(rows * 7919 + d)
    shape = (rows, d) if dim == -1 else (d, rows)
    x = (make(shape) if make else torch.randn(*shape)).to(device=device, dtype=dtype)
    g = torch.randn(*shape).to(device=device, dtype=dtype)
    k = max(1, d // 12)
    y, mask, gx = _run(x, k, backend, g, dim)
    y64, mask64, gx64 = _run(x.double(), k, "reference", g.double(), dim)
    ylo, masklo, gxlo = _run(x, k, "reference", g, dim)
    assert_by_rule(y, y64, ylo, factor=2, what=f"{backend} forward")
    assert_by_rule(gx, gx64, gxlo, factor=3, what=f"{backend} backward")
    # Masks may differ from the reference's only right at θ, within a few roundings of the row's values. (A
    # count would not do: rows of 1000 ± 0.01 in float32 hold dozens of equal values per ulp near θ, all of
    # which flip when θ moves by one ulp.)
    x64 = x.double()
    theta64 = torch.where(mask64, x64 - y64, -math.inf).amax(dim, keepdim=True)   # θ = x − y where kept
    tol = 8 * torch.finfo(dtype).eps * x64.abs().amax(dim, keepdim=True)
    flipped = mask != masklo
    far = flipped & ((x64 - theta64).abs() > tol)
    assert not far.any(), (f"{far.sum().item()} of {flipped.sum().item()} mask flips are further than {tol.max():.3g} "
                           f"from the threshold")


# No bfloat16 here: the Triton 3.6 interpreter converts float32 to bfloat16 by truncation, not rounding to
# nearest as the GPU does, so its bf16 outputs carry up to 2x the reference's error by construction. The
# gpu tier covers bfloat16 on real hardware.
@interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize("rows,d", [(1, 2), (3, 7), (2, 100), (5, 1000), (2, 16384 + 13)])
def test_triton_matches_reference(triton_device, dtype, rows, d):
    check_backend_against_reference("triton", triton_device, dtype, rows, d)


@interpret
def test_triton_dim0_and_strided_rows(triton_device):
    check_backend_against_reference("triton", triton_device, torch.float32, 3, 50, dim=0)
    x = torch.randn(4, 70, device=triton_device)[:, 3:]  # rows not starting at a multiple of 16 bytes
    torch.testing.assert_close(zigspark.stat_topk(x, 6, backend="triton"), zigspark.stat_topk(x, 6, backend="reference"))


@interpret
def test_triton_nan_in_a_row_propagates_like_the_reference(triton_device):
    x = torch.randn(3, 64, device=triton_device)
    x[1, 5] = float("nan")
    y_ref, y = zigspark.stat_topk(x, 6, backend="reference"), zigspark.stat_topk(x, 6, backend="triton")
    assert torch.isnan(y_ref[1]).all() and not torch.isnan(y_ref[[0, 2]]).any()
    assert torch.equal(torch.isnan(y), torch.isnan(y_ref))


# ---- emulate tier: the CUDA kernels on the CPU emulator (csrc/emulate) ----------------------------------

# Aligned rows of up to 16384 take the register-resident kernels; 4001 (unaligned) and 20000 (too long) stream.
@pytest.mark.emulate
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("rows,d", [(1, 2), (3, 7), (2, 100), (2, 4000), (2, 4001), (1, 20000)])
def test_emulated_cuda_matches_reference(dtype, rows, d):
    check_backend_against_reference("cuda", torch.device("cpu"), dtype, rows, d)


@pytest.mark.emulate
@pytest.mark.parametrize("d", [4000, 20000], ids=["resident", "streaming"])
def test_emulated_cuda_offset_rows(d):
    check_backend_against_reference("cuda", torch.device("cpu"), torch.float32, 2, d, make=offset_rows)


@pytest.mark.emulate
def test_emulated_cuda_dim0_unaligned_and_nan():
    check_backend_against_reference("cuda", torch.device("cpu"), torch.float32, 3, 50, dim=0)
    x = torch.randn(4, 70)[:, 3:]  # rows not starting at a multiple of 16 bytes: the scalar path
    torch.testing.assert_close(zigspark.stat_topk(x, 6, backend="cuda"), zigspark.stat_topk(x, 6, backend="reference"))
    x = torch.randn(3, 64)
    x[1, 5] = float("nan")
    y_ref, y = zigspark.stat_topk(x, 6, backend="reference"), zigspark.stat_topk(x, 6, backend="cuda")
    assert torch.equal(torch.isnan(y), torch.isnan(y_ref))


# ---- gpu tier: every backend x dtype at real sizes -----------------------------------------------------

GPU_BACKENDS = ["cuda", "triton"]


@gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("rows,d", [(1, 2), (3, 7), (4096, 1000), (512, 4096), (256, 16384), (64, 65536 + 3),
                                    (8, 200_000)])
def test_gpu_backend_matches_reference(backend, dtype, rows, d):
    check_backend_against_reference(backend, torch.device("cuda"), dtype, rows, d)


@gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_unaligned_strided_and_dim0(backend, dtype):
    check_backend_against_reference(backend, torch.device("cuda"), dtype, 300, 4001, dim=0)
    x = torch.randn(64, 5000, device="cuda", dtype=dtype)[:, 3:]   # unaligned rows: scalar path
    y = zigspark.stat_topk(x, 400, backend=backend)
    assert_by_rule(y, zigspark.stat_topk(x.double(), 400, backend="reference"),
                   zigspark.stat_topk(x, 400, backend="reference"))


def offset_rows(shape):
    """Rows with a tiny spread far from zero: a one-pass E[x²] − E[x]² would cancel to noise."""
    return torch.randn(*shape) * 0.01 + 1000.0


@gpu
def test_gpu_heavy_tailed_and_offset_rows():
    """Streaming Welford statistics stay exact for rows far from zero mean."""
    for backend in ("cuda", "triton"):
        check_backend_against_reference(backend, torch.device("cuda"), torch.float32, 16, 100_000, make=offset_rows)


@gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_nan_propagates_and_device_is_restored(backend):
    x = torch.randn(3, 4096, device="cuda")
    x[1, 5] = float("nan")
    y = zigspark.stat_topk(x, 100, backend=backend)
    assert torch.equal(torch.isnan(y), torch.isnan(zigspark.stat_topk(x, 100, backend="reference")))
    if torch.cuda.device_count() > 1:  # a launch on cuda:1 must not move torch's current device
        with torch.cuda.device(0):
            zigspark.stat_topk(x.to("cuda:1"), 100, backend=backend)
            assert torch.cuda.current_device() == 0


@gpu
def test_gpu_auto_uses_a_kernel_and_compiles():
    x = torch.randn(64, 4096, device="cuda", requires_grad=True)
    y = torch.compile(lambda t: zigspark.stat_topk(t, density=0.08), fullgraph=True)(x)
    y.sum().backward()
    assert zigspark.last_backends()["stat_topk"] in ("cuda", "triton")
    torch.testing.assert_close(y, zigspark.stat_topk(x.detach(), density=0.08, backend="reference"))
