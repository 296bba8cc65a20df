"""mamba-ssm's functional API on zigspark's ops, plus a keyword-only `order=` for zigzag (ZigMa) scans.

An existing Mamba model changes one import:

    from zigspark.compat.mamba_ssm import selective_scan_fn, mamba_inner_fn

The mamba_inner_fn path (mamba-ssm's ``mamba_inner_ref`` semantics):

    x, z = xz.chunk(2, dim=1);  x = silu(causal_conv1d(x));  x_dbl = x_projᵀ·x
    δ = dt_projᵀ·x_dbl[:dt_rank];  B, C = x_dbl[dt_rank:dt_rank+N], x_dbl[−N:]  (unless given)
    y = selective_scan(x, δ, A, B, C, D, z, delta_bias, delta_softplus);  out = out_proj(y)

with the convolution and the scan both following `order`.
"""

from __future__ import annotations

import torch.nn.functional as F

from ..ops.causal_conv1d import causal_conv1d
from ..ops.selective_scan import selective_scan


def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                      return_last_state=False, *, order=None, backend="auto"):
    """mamba_ssm.ops.selective_scan_interface.selective_scan_fn, optionally along a scan `order`."""
    return selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, order=order,
                          backend=backend)


def mamba_inner_fn(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, out_proj_weight,
                   out_proj_bias, A, B=None, C=None, D=None, delta_bias=None, B_proj_bias=None, C_proj_bias=None,
                   delta_softplus=True, checkpoint_lvl=1, b_rms_weight=None, c_rms_weight=None, dt_rms_weight=None,
                   b_c_dt_rms_eps=1e-6, *, order=None, backend="auto"):
    """mamba_ssm's mamba_inner_fn: conv → x_proj → dt_proj → selective scan → out_proj, along `order`.

    xz: (batch, 2·d_inner, L). Returns (batch, L, d_model). `checkpoint_lvl` is accepted for signature
    compatibility (the scan's backward always recomputes inside chunks).
    """
    for name, value in (("b_rms_weight", b_rms_weight), ("c_rms_weight", c_rms_weight),
                        ("dt_rms_weight", dt_rms_weight)):
        if value is not None:
            raise NotImplementedError(f"mamba_inner_fn: {name} (RMS-normalised B/C/dt) is not supported by zigspark")
    if A.is_complex():
        raise NotImplementedError("mamba_inner_fn: complex A is not supported by zigspark")
    length = xz.shape[-1]
    dt_rank = delta_proj_weight.shape[1]
    d_state = A.shape[-1]
    x, z = xz.chunk(2, dim=1)
    x = causal_conv1d(x, conv1d_weight.reshape(conv1d_weight.shape[0], -1), conv1d_bias, "silu", order=order,
                      backend=backend)
    x_dbl = F.linear(x.transpose(1, 2), x_proj_weight)                  # (batch, L, dt_rank + 2N)
    delta = F.linear(x_dbl[..., :dt_rank], delta_proj_weight).transpose(1, 2)
    if B is None:
        B = x_dbl[..., dt_rank:dt_rank + d_state]
        if B_proj_bias is not None:
            B = B + B_proj_bias.to(B.dtype)
        B = B.transpose(1, 2).contiguous()                               # (batch, N, L)
    if C is None:
        C = x_dbl[..., -d_state:]
        if C_proj_bias is not None:
            C = C + C_proj_bias.to(C.dtype)
        C = C.transpose(1, 2).contiguous()
    assert delta.shape[-1] == length
    y = selective_scan(x, delta.contiguous(), A, B, C, D, z, delta_bias, delta_softplus, order=order,
                       backend=backend)
    return F.linear(y.transpose(1, 2), out_proj_weight, out_proj_bias)
