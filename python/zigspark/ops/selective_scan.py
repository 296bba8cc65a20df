"""Selective scan (Mamba; mamba-ssm's selective_scan_fn semantics) along a scan order.

    Δ_t = softplus(δ_t + bias) (if delta_softplus),  h_t = exp(Δ_t·A)·h_{t−1} + Δ_t·B_t·u_t,
    y_t = C_t·h_t + D·u_t,  out_t = y_t·silu(z_t) (if z)

with the steps t visited in `order` (zigspark.orders): out = unpermute(scan(permute(inputs))), but the
order is applied where the data is read and written, never by copying the tensors into scan order.

Registered as ``zigspark::selective_scan_fwd`` / ``zigspark::selective_scan_bwd``. Backends today: the
reference (chunked PyTorch; closed-form backward that recomputes the states), Triton and CUDA (forward
and backward; the order is computed inside the kernels).
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import backends, orders
from ..reference import selective_scan as ref
from ..validation import check_float_tensor, check_same_device

_IO_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_PARAM_DTYPES = (torch.float32, torch.float64)
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
KERNEL_MAX_N = 256  # the state of a block of channels lives in registers
backends.register_op("selective_scan", {"reference": _IO_DTYPES, "triton": _KERNEL_DTYPES, "cuda": _KERNEL_DTYPES},
                     size_key="L")


def _kernels(backend: str):
    return backends.kernels(backend, "selective_scan")


def order_arguments(order, length: int, device: torch.device):
    """An `order=` argument -> (params list for the custom op, index tensor or None)."""
    order = orders.check_order(order, length, device)
    if order is None:
        return [], None
    if isinstance(order, orders.ScanOrder):
        return list(order.params), None
    return [], order


def order_index_of(order_params: list[int], order_index: Optional[torch.Tensor], length: int,
                   device: torch.device) -> Optional[torch.Tensor]:
    """Materialise the order for the reference backend (kernels compute built-in orders on the fly)."""
    if order_index is not None:
        return order_index
    if not order_params:
        return None
    return orders.order_index(torch.arange(length, device=device), *order_params)


# ---- custom ops --------------------------------------------------------------------------------------

@torch.library.custom_op("zigspark::selective_scan_fwd", mutates_args=())
def selective_scan_fwd(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                       D: Optional[torch.Tensor], z: Optional[torch.Tensor], delta_bias: Optional[torch.Tensor],
                       delta_softplus: bool, order_params: list[int], order_index: Optional[torch.Tensor],
                       backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (out (batch, dim, L) in u's dtype, last_state (batch, dim, N) in float32/float64, checkpoints:
    the state entering each chunk, (batch, dim, chunks, N), saved for the kernels' backward; empty for
    the reference)."""
    if backend != "reference":
        return _kernels(backend).selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                                    order_params, order_index)
    index = order_index_of(order_params, order_index, u.shape[-1], u.device)
    with torch.no_grad():
        out, last = ref.selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, index)
    return out, last.contiguous(), u.new_empty((0,), dtype=torch.float32)


def _n_chunks(length: int, n: int, backend: str) -> int:
    if backend == "cuda":
        from ..cuda_ops.selective_scan import chunk
    else:
        from ..triton_kernels.selective_scan import chunk_length

        def chunk():
            return chunk_length(n, length)
    return -(-length // chunk())


@selective_scan_fwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, order_params, order_index, backend):
    batch, dim, length = u.shape
    n = A.shape[1]
    last = u.new_empty((batch, dim, n), dtype=ref.compute_dtype(u.dtype))
    ckpt = (u.new_empty((batch, dim, _n_chunks(length, n, backend), n), dtype=torch.float32) if backend != "reference"
            else u.new_empty((0,), dtype=torch.float32))
    return torch.empty_like(u), last, ckpt


@torch.library.custom_op("zigspark::selective_scan_bwd", mutates_args=())
def selective_scan_bwd(dout: torch.Tensor, dlast: Optional[torch.Tensor], u: torch.Tensor, delta: torch.Tensor,
                       A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, D: Optional[torch.Tensor],
                       z: Optional[torch.Tensor], delta_bias: Optional[torch.Tensor], checkpoints: torch.Tensor,
                       delta_softplus: bool, order_params: list[int], order_index: Optional[torch.Tensor],
                       backend: str
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                  torch.Tensor, torch.Tensor]:
    """Gradients (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias); an absent input gets an empty tensor."""
    if backend != "reference":
        grads = _kernels(backend).selective_scan_bwd(dout, dlast, u, delta, A, B, C, D, z, delta_bias, checkpoints,
                                                     delta_softplus, order_params, order_index)
    else:
        index = order_index_of(order_params, order_index, u.shape[-1], u.device)
        grads = ref.selective_scan_backward(dout, dlast, u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                            index)
    return tuple(u.new_empty((0,)) if g is None else g for g in grads)


@selective_scan_bwd.register_fake
def _(dout, dlast, u, delta, A, B, C, D, z, delta_bias, checkpoints, delta_softplus, order_params, order_index,
      backend):
    empty = u.new_empty((0,))
    return tuple(empty if t is None else torch.empty_like(t) for t in (u, delta, A, B, C, D, z, delta_bias))


def _setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, order_params, order_index, backend = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, order_index, output[2])
    ctx.mark_non_differentiable(output[2])
    ctx.delta_softplus, ctx.order_params, ctx.backend = delta_softplus, order_params, backend


def _backward(ctx, dout, dlast, dcheckpoints):
    u, delta, A, B, C, D, z, delta_bias, order_index, checkpoints = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(u)
    grads = selective_scan_bwd(dout.contiguous(), None if dlast is None else dlast.contiguous(), u, delta, A, B, C,
                               D, z, delta_bias, checkpoints, ctx.delta_softplus, ctx.order_params, order_index,
                               ctx.backend)
    present = (u, delta, A, B, C, D, z, delta_bias)
    return (*[None if t is None else g for t, g in zip(present, grads)], None, None, None, None)


selective_scan_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---- public API --------------------------------------------------------------------------------------

def _check_inputs(u, delta, A, B, C, D, z, delta_bias):
    check_float_tensor("u", u, _IO_DTYPES)
    check_float_tensor("delta", delta, _IO_DTYPES)
    if u.dim() != 3:
        raise ValueError(f"u must be (batch, dim, L), got shape {tuple(u.shape)}")
    batch, dim, length = u.shape
    if length == 0 or dim == 0:
        raise ValueError(f"u must have dim >= 1 and L >= 1, got shape {tuple(u.shape)}")
    if delta.shape != u.shape:
        raise ValueError(f"delta must have u's shape {tuple(u.shape)}, got {tuple(delta.shape)}")
    if isinstance(A, torch.Tensor) and A.is_complex():
        raise TypeError("A must be real: zigspark's selective scan does not support complex A")
    check_float_tensor("A", A, _PARAM_DTYPES)
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"A must be (dim, N) = ({dim}, N), got shape {tuple(A.shape)}")
    n = A.shape[1]
    for name, M in (("B", B), ("C", C)):
        check_float_tensor(name, M, _IO_DTYPES)
        layouts = f"({dim}, {n}) constant, ({batch}, {n}, {length}) per step, or ({batch}, G, {n}, {length}) grouped"
        if M.dim() == 2 and M.shape != (dim, n) or M.dim() == 3 and M.shape != (batch, n, length):
            raise ValueError(f"{name} must be {layouts}; got shape {tuple(M.shape)}")
        if M.dim() == 4:
            if M.shape[0] != batch or M.shape[2:] != (n, length) or M.shape[1] < 1 or dim % M.shape[1]:
                raise ValueError(f"{name} must be {layouts} with dim divisible by G; got shape {tuple(M.shape)}")
        if M.dim() not in (2, 3, 4):
            raise ValueError(f"{name} must be {layouts}; got shape {tuple(M.shape)}")
    if B.dim() == 4 and C.dim() == 4 and B.shape[1] != C.shape[1]:
        raise ValueError(f"grouped B and C must have the same number of groups G, got {B.shape[1]} and {C.shape[1]}")
    for name, v in (("D", D), ("delta_bias", delta_bias)):
        if v is not None:
            check_float_tensor(name, v, _PARAM_DTYPES)
            if v.shape != (dim,):
                raise ValueError(f"{name} must be (dim,) = ({dim},), got shape {tuple(v.shape)}")
    if z is not None:
        check_float_tensor("z", z, _IO_DTYPES)
        if z.shape != u.shape:
            raise ValueError(f"z must have u's shape {tuple(u.shape)}, got {tuple(z.shape)}")
    return check_same_device(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias)


def _cuda_shape_reason(u, delta, B, C, z):
    """Why the CUDA kernels (specialised on one layout for B and C, one dtype for u/delta/z/B/C) cannot take
    these inputs, or None."""
    if B.dim() != C.dim():
        return "the cuda kernels need B and C in the same layout (both constant, both per step, or both grouped)"
    mixed = [n for n, t in (("delta", delta), ("B", B), ("C", C), ("z", z)) if t is not None and t.dtype != u.dtype]
    if mixed:
        return f"the cuda kernels need {', '.join(mixed)} in u's dtype ({str(u.dtype).replace('torch.', '')})"
    return None


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, *, order=None, backend="auto"):
    """Mamba's selective scan with mamba-ssm's shapes, along `order`.

    Args:
        u, delta: (batch, dim, L).  A: (dim, N), real float32.  D, delta_bias: (dim,) float32.
        B, C: (dim, N) constant, (batch, N, L) per step, or (batch, G, N, L) grouped (dim divisible by G).
        z: (batch, dim, L); the output is multiplied by silu(z).
        order: None (raster), a zigspark.orders.ScanOrder (e.g. orders.zigzag(h, w, path)), or a LongTensor
            permutation of 0..L−1: the steps are taken in that order; inputs and outputs stay in raster order.
        return_last_state: also return the state after the last step of the order, (batch, dim, N) in float32
            (float64 when u is float64).
        backend: "auto" | "cuda" | "triton" | "reference".

    Returns:
        out (batch, dim, L) in u's dtype [, last_state].

    Example:
        >>> import torch, zigspark
        >>> from zigspark import orders
        >>> b, d, h, w, n = 2, 8, 4, 6, 16
        >>> u, delta = torch.randn(b, d, h * w), torch.rand(b, d, h * w)
        >>> A, B, C = -torch.rand(d, n), torch.randn(b, n, h * w), torch.randn(b, n, h * w)
        >>> out = zigspark.selective_scan(u, delta, A, B, C, order=orders.zigzag(h, w, path=3))
        >>> out.shape
        torch.Size([2, 8, 24])
    """
    device = _check_inputs(u, delta, A, B, C, D, z, delta_bias)
    order_params, order_index = order_arguments(order, u.shape[-1], device)
    chosen = backends.resolve("selective_scan", backend, device, u.dtype, size=u.shape[-1])
    n = A.shape[1]
    if chosen != "reference" and n > KERNEL_MAX_N:
        if backend != "auto":
            raise ValueError(f"selective_scan: N = {n} is too large for the {chosen} kernel (at most "
                             f"{KERNEL_MAX_N}); use backend='reference'")
        chosen = "reference"
    cuda_reason = _cuda_shape_reason(u, delta, B, C, z) if chosen == "cuda" else None
    if cuda_reason:
        if backend != "auto":
            raise ValueError(f"selective_scan: {cuda_reason}; use backend='triton' or 'reference'")
        usable = backends.unavailable_reason("selective_scan", "triton", device, u.dtype) is None
        chosen = "triton" if usable else "reference"
    backends.record("selective_scan", chosen)
    if chosen != "reference":  # the kernels index u, delta, z, B, C as contiguous tensors
        u, delta, A, B, C = (t.contiguous() for t in (u, delta, A, B, C))
        D, z, delta_bias = (None if t is None else t.contiguous() for t in (D, z, delta_bias))
    out, last, _ = torch.ops.zigspark.selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias,
                                                         bool(delta_softplus), order_params, order_index, chosen)
    return (out, last) if return_last_state else out
