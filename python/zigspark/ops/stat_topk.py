"""Statistical top-k (Spark Transformer, arXiv 2506.06644): linear-time sparsity without a sort.

For each slice x of length d along `dim`, keeping about k values (k = density·d):

    θ = mean(x) + std(x)·Φ⁻¹(1 − k/d)        (statistics in ≥ float32)
    std(x)² = Σ(x − mean)² / (d − std_correction)   (std_correction 0, the default: population std; 1: sample)
    stat_topk(x) = relu(x − θ)               (x's dtype),   mask = x > θ

For Gaussian-like x about k values survive, in one read and one write of x instead of torch.topk's
selection. The gradient flows through θ too (see zigspark/reference/stat_topk.py for the closed form).

Registered as the custom ops ``zigspark::stat_topk_fwd`` and ``zigspark::stat_topk_bwd`` (fake tensors and
autograd registered), so ``torch.compile(fullgraph=True)`` and ``torch.library.opcheck`` work.
"""

from __future__ import annotations

import numbers
import statistics

import torch

from .. import backends
from .._alloc import new_output
from ..reference import stat_topk as ref
from ..validation import check_density, check_dim, check_float_tensor, check_std_correction, last_dim_contiguous

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
backends.register_op("stat_topk", {"reference": _DTYPES, "triton": _DTYPES, "cuda": _DTYPES}, size_key="d")


@torch.compiler.assume_constant_result
def _normal_quantile(p: float) -> float:
    return statistics.NormalDist().inv_cdf(p)


def survivor_quantile(d: int, k=None, density=None, std_correction=0.0) -> float:
    """z = Φ⁻¹(1 − k/d) for exactly one of k (1 ≤ k < d) or density (0 < density < 1), times
    √(d/(d − std_correction)): the kernels compute the population std, and σ_pop·z is then the corrected
    std's threshold (exactly, gradient included: θ is linear in σ_pop)."""
    if (k is None) == (density is None):
        raise ValueError("stat_topk: give exactly one of k (number of values to keep) and density (fraction to "
                         f"keep), got k={k!r}, density={density!r}")
    if k is not None:
        if isinstance(k, bool) or not isinstance(k, numbers.Integral):
            raise TypeError(f"stat_topk: k must be an int, got {type(k).__name__}; for a fraction use density=")
        if not 1 <= k < d:
            raise ValueError(f"stat_topk: k must satisfy 1 <= k < d = {d} (the size of dim), got k={k}")
        fraction = int(k) / d
    else:
        fraction = check_density(density, "stat_topk")
    correction = check_std_correction(std_correction, "stat_topk")
    if correction and d <= 1:
        raise ValueError(f"stat_topk: std_correction={correction} needs at least 2 values per slice, got d = {d}")
    return _normal_quantile(1.0 - fraction) * ((d / (d - correction)) ** 0.5 if correction else 1.0)


# ---- custom ops --------------------------------------------------------------------------------------

def _stat_outputs(x: torch.Tensor, need_mask: bool):
    rows, d = x.shape
    stat = ref.stat_dtype(x.dtype)
    y = new_output((rows, d), x.dtype, x.device)
    mask = new_output((rows, d) if need_mask else (0,), torch.bool, x.device)
    mean = new_output((rows,), stat, x.device)
    std = new_output((rows,), stat, x.device)
    return y, mask, mean, std


def _kernels(backend: str):
    return backends.kernels(backend, "stat_topk")


@torch.library.custom_op("zigspark::stat_topk_fwd", mutates_args=())
def stat_topk_fwd(x: torch.Tensor, z: float, need_mask: bool, backend: str
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of the 2-D x (last stride 1) -> (y, mask or empty, mean, std)."""
    if backend == "reference":
        with torch.no_grad():
            y, mask, mean, std = ref.stat_topk_forward(x, z, need_mask)
        return y, mask, mean, std
    y, mask, mean, std = _stat_outputs(x, need_mask)
    _kernels(backend).stat_topk_fwd(x, y, mask if need_mask else None, mean, std, z)
    return y, mask, mean, std


@stat_topk_fwd.register_fake
def _(x, z, need_mask, backend):
    rows, d = x.shape
    stat = ref.stat_dtype(x.dtype)
    return (x.new_empty((rows, d)), x.new_empty((rows, d) if need_mask else (0,), dtype=torch.bool),
            x.new_empty((rows,), dtype=stat), x.new_empty((rows,), dtype=stat))


@torch.library.custom_op("zigspark::stat_topk_bwd", mutates_args=())
def stat_topk_bwd(grad_y: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, z: float,
                  backend: str) -> torch.Tensor:
    """∂L/∂x for the rows of the 2-D x from ∂L/∂y and the saved statistics."""
    if backend == "reference":
        return ref.stat_topk_backward(grad_y, x, mean, std, z)
    grad_x = new_output(x.shape, x.dtype, x.device)
    _kernels(backend).stat_topk_bwd(grad_y, x, mean, std, grad_x, z)
    return grad_x


@stat_topk_bwd.register_fake
def _(grad_y, x, mean, std, z, backend):
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output):
    x, z, _, backend = inputs
    _, mask, mean, std = output
    ctx.save_for_backward(x, mean, std)
    ctx.z = z
    ctx.backend = backend
    ctx.mark_non_differentiable(mask, mean, std)


def _backward(ctx, grad_y, grad_mask, grad_mean, grad_std):
    x, mean, std = ctx.saved_tensors
    if grad_y is None:
        return None, None, None, None
    grad_x = stat_topk_bwd(last_dim_contiguous(grad_y), x, mean, std, ctx.z, ctx.backend)
    return grad_x, None, None, None


stat_topk_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---- public API --------------------------------------------------------------------------------------

def stat_topk(x: torch.Tensor, k: int | None = None, *, density: float | None = None, dim: int = -1,
              return_mask: bool = False, std_correction: float = 0.0, backend: str = "auto"):
    """Keep about the k largest values of each slice along `dim`, in linear time.

    Args:
        x: floating tensor (float32, float16, bfloat16 or float64), any shape, on CPU or CUDA.
        k: values to keep per slice, 1 ≤ k < d where d = x.shape[dim]. Exclusive with `density`.
        density: fraction to keep, 0 < density < 1 (k = density·d). Exclusive with `k`.
        dim: the dimension the statistics run over.
        return_mask: also return the boolean mask x > θ.
        std_correction: the std divides by d − std_correction: 0 (default) population, 1 sample std.
        backend: "auto" | "cuda" | "triton" | "reference" (see zigspark.available_backends()).

    Returns:
        relu(x − θ) with θ = mean + std·Φ⁻¹(1 − k/d), same shape and dtype as x (and the mask if asked).
        Differentiable with respect to x, through θ as well.

    Example:
        >>> import torch, zigspark
        >>> x = torch.randn(4, 4096)
        >>> y, mask = zigspark.stat_topk(x, density=0.08, return_mask=True)
        >>> y.shape, round(mask.float().mean().item(), 2)   # about 8% survive  # doctest: +SKIP
        (torch.Size([4, 4096]), 0.08)

    Moving `dim` to the last position costs a copy when dim is not already the last contiguous dimension.
    """
    check_float_tensor("x", x, _DTYPES)
    dim = check_dim("dim", dim, x.dim())
    d = x.shape[dim] if x.dim() > 0 else 0
    if d == 0:
        raise ValueError(f"stat_topk: dimension {dim} of x is empty (x.shape = {tuple(x.shape)}); the statistics "
                         "need at least 2 values per slice")
    z = survivor_quantile(d, k, density, std_correction)
    chosen = backends.resolve("stat_topk", backend, x.device, x.dtype, size=d)
    moved = x.movedim(dim, -1)
    rows = last_dim_contiguous(moved.reshape(-1, d))
    y, mask, _, _ = torch.ops.zigspark.stat_topk_fwd(rows, z, bool(return_mask), chosen)
    y = y.reshape(moved.shape).movedim(-1, dim)
    if return_mask:
        return y, mask.reshape(moved.shape).movedim(-1, dim)
    return y


def stat_topk_threshold(x: torch.Tensor, k: int | None = None, *, density: float | None = None, dim: int = -1,
                        keepdim: bool = False, std_correction: float = 0.0) -> torch.Tensor:
    """θ = mean + std·Φ⁻¹(1 − k/d) of each slice along `dim` (float32, or float64 for float64 x).

    Differentiable. `stat_topk(x, k)` equals relu(x − θ) with this θ (up to the dtype cast).
    """
    check_float_tensor("x", x, _DTYPES)
    dim = check_dim("dim", dim, x.dim())
    d = x.shape[dim] if x.dim() > 0 else 0
    if d == 0:
        raise ValueError(f"stat_topk_threshold: dimension {dim} of x is empty (x.shape = {tuple(x.shape)})")
    z = survivor_quantile(d, k, density, std_correction)
    theta = ref.stat_topk_threshold(x.movedim(dim, -1), z).movedim(-1, dim)
    return theta if keepdim else theta.squeeze(dim)
