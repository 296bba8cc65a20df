"""Launch the CUDA selective scan (csrc/selective_scan/selective_scan.cu) with raw pointers.

The kernels take u, delta, z, B and C in one dtype (u's) and A, D, delta_bias in float32, all contiguous;
this module converts, allocates the outputs and gradient buffers, and reduces the per-batch partial sums.
"""

from __future__ import annotations

import torch

from .. import _cuda
from .orders import order_kwargs
from .._alloc import new_output, new_output_like

BC_MODES = {2: 0, 3: 1, 4: 2}  # B/C.dim() -> layout code: constant, per step, grouped


def chunk() -> int:
    return _cuda.extension().selective_scan_chunk()


def _common(u, A, B, C, order_params, order_index):
    batch, dim, length = u.shape
    groups = next((M.shape[1] for M in (B, C) if M.dim() == 4), 1)
    order, index = order_kwargs(order_params, order_index, length)
    args = dict(batch=batch, dim=dim, length=length, dstate=A.shape[1], groups=groups,
                chunks=-(-length // chunk()), b_mode=BC_MODES[B.dim()], c_mode=BC_MODES[C.dim()],
                dtype=_cuda.dtype_code(u.dtype), device=_cuda.device_index(u), stream=_cuda.stream_of(u), **order)
    return args, index


def _as_kernel_inputs(u, delta, A, B, C, D, z, delta_bias):
    io = lambda t: None if t is None else t.to(u.dtype).contiguous()           # noqa: E731
    f32 = lambda t: None if t is None else t.to(torch.float32).contiguous()    # noqa: E731
    return u.contiguous(), io(delta), f32(A), io(B), io(C), f32(D), io(z), f32(delta_bias)


def _pointers(**tensors) -> dict:
    return {k: _cuda.ptr(v) for k, v in tensors.items() if v is not None}


def selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, order_params, order_index):
    """-> (out, last_state float32 (batch, dim, N), checkpoints float32 (batch, dim, chunks, N))."""
    u, delta, A, B, C, D, z, delta_bias = _as_kernel_inputs(u, delta, A, B, C, D, z, delta_bias)
    args, index = _common(u, A, B, C, order_params, order_index)
    batch, dim, _ = u.shape
    out = new_output_like(u)
    last = new_output((batch, dim, A.shape[1]), torch.float32, u.device)
    ckpt = new_output((batch, dim, args["chunks"], A.shape[1]), torch.float32, u.device)
    _cuda.extension().selective_scan_forward(
        **args, delta_softplus=bool(delta_softplus),
        **_pointers(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias, out=out, last_state=last,
                    checkpoints=ckpt))
    del index  # kept alive until the launch is enqueued
    return out, last, ckpt


def selective_scan_bwd(dout, dlast, u, delta, A, B, C, D, z, delta_bias, ckpt, delta_softplus, order_params,
                       order_index):
    """-> (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias) in the inputs' dtypes, None for absent inputs."""
    originals = (u, delta, A, B, C, D, z, delta_bias)
    u, delta, A, B, C, D, z, delta_bias = _as_kernel_inputs(*originals)
    args, index = _common(u, A, B, C, order_params, order_index)
    batch, dim, length = u.shape
    n = A.shape[1]
    f32 = dict(device=u.device, dtype=torch.float32)
    du, ddelta = (new_output((batch, dim, length), torch.float32, u.device) for _ in range(2))
    dA = new_output((batch, dim, n), torch.float32, u.device)
    dB = torch.zeros((batch, dim, n) if B.dim() == 2 else B.shape, **f32)
    dC = torch.zeros((batch, dim, n) if C.dim() == 2 else C.shape, **f32)
    dD = torch.empty(batch, dim, **f32) if D is not None else None
    dz = new_output_like(z) if z is not None else None
    _cuda.extension().selective_scan_backward(
        **args, delta_softplus=bool(delta_softplus),
        **_pointers(dout=dout.to(u.dtype).contiguous(), dlast=None if dlast is None else dlast.float().contiguous(),
                    u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias, checkpoints=ckpt, du=du,
                    ddelta=ddelta, dA=dA, dB=dB, dC=dC, dD=dD, dz=dz))
    del index
    grads = (du, ddelta, dA.sum(0), dB.sum(0) if B.dim() == 2 else dB, dC.sum(0) if C.dim() == 2 else dC,
             None if D is None else dD.sum(0), dz, None if delta_bias is None else ddelta.sum((0, 2)))
    return tuple(None if g is None else g.to(t.dtype) for g, t in zip(grads, originals))
