"""zigspark.nn.ZigzagMamba and zigspark.compat.mamba_ssm: the layer equals permute → Mamba → unpermute,
and mamba_inner_fn equals mamba-ssm's reference composition."""

import pytest
import torch
import torch.nn.functional as F

import zigspark
from zigspark import orders
from zigspark.compat.mamba_ssm import mamba_inner_fn, selective_scan_fn
from zigspark.nn import ZigzagMamba
from zigspark.reference.selective_scan import sequential_selective_scan

cpu = pytest.mark.cpu


def mamba_inner_plain(xz, conv_w, conv_b, x_proj_w, dt_proj_w, out_w, out_b, A, D, dt_bias):
    """mamba-ssm's mamba_inner_ref written with plain torch ops and the sequential scan, raster order."""
    length = xz.shape[-1]
    dt_rank, n = dt_proj_w.shape[1], A.shape[1]
    x, z = xz.chunk(2, dim=1)
    x = F.silu(F.conv1d(x, conv_w, conv_b, padding=conv_w.shape[-1] - 1, groups=x.shape[1])[..., :length])
    x_dbl = x.transpose(1, 2) @ x_proj_w.t()
    delta = (x_dbl[..., :dt_rank] @ dt_proj_w.t()).transpose(1, 2)
    B = x_dbl[..., dt_rank:dt_rank + n].transpose(1, 2)
    C = x_dbl[..., -n:].transpose(1, 2)
    y, _ = sequential_selective_scan(x, delta, A, B, C, D, z, dt_bias, delta_softplus=True, dtype=torch.float64)
    return y.transpose(1, 2) @ out_w.t() + (0 if out_b is None else out_b)


@cpu
def test_mamba_inner_fn_matches_reference_composition():
    torch.manual_seed(0)
    layer = ZigzagMamba(16, grid=(3, 5), order=orders.raster(15), bias=True).double()
    xz = torch.randn(2, 2 * layer.d_inner, 15, dtype=torch.float64)
    A = -torch.exp(layer.A_log)
    args = (xz, layer.conv1d.weight, layer.conv1d.bias, layer.x_proj.weight, layer.dt_proj.weight,
            layer.out_proj.weight, layer.out_proj.bias, A)
    ours = mamba_inner_fn(*args, D=layer.D, delta_bias=layer.dt_proj.bias)
    plain = mamba_inner_plain(*args, layer.D, layer.dt_proj.bias)
    torch.testing.assert_close(ours, plain)


@cpu
@pytest.mark.parametrize("layer_index", [0, 3, 6, 9])
def test_layer_equals_permute_mamba_unpermute(layer_index):
    torch.manual_seed(layer_index)
    h, w = 4, 6
    zig = ZigzagMamba(16, grid=(h, w), layer_index=layer_index).double()
    raster = ZigzagMamba(16, grid=(h, w), order=orders.raster(h * w)).double()
    raster.load_state_dict(zig.state_dict())
    assert zig.order == orders.zigzag(h, w, layer_index % 8)
    x = torch.randn(2, h * w, 16, dtype=torch.float64, requires_grad=True)
    idx = orders.zigzag_path(h, w, layer_index % 8)
    expected = raster(x[:, idx])[:, orders.inverse(idx)]
    got = zig(x)
    torch.testing.assert_close(got, expected)
    (g1,) = torch.autograd.grad(got.sum(), x)
    (g2,) = torch.autograd.grad(expected.sum(), x)
    torch.testing.assert_close(g1, g2)


@cpu
def test_video_grid_and_bad_shapes():
    layer = ZigzagMamba(8, grid=(2, 3, 4), layer_index=1)
    assert layer.order == orders.zigzag(3, 4, 1, frames=2)
    assert layer(torch.randn(1, 24, 8)).shape == (1, 24, 8)
    with pytest.raises(ValueError, match="L = 24 tokens"):
        layer(torch.randn(1, 23, 8))
    with pytest.raises(ValueError, match=r"grid must be \(h, w\) or \(frames, h, w\)"):
        ZigzagMamba(8, grid=(4,))


@cpu
def test_index_order_is_a_buffer_outside_the_state_dict():
    """A tensor order moves with the module (.to) but is not saved: it comes from the constructor, as a
    built-in order does, so checkpoints of either kind load into the other."""
    perm = torch.randperm(12)
    layer = ZigzagMamba(8, grid=(3, 4), order=perm.int())
    assert torch.equal(dict(layer.named_buffers())["order"], perm) and layer.order.dtype == torch.int64
    assert "order" not in layer.state_dict()
    assert layer.double().order.dtype == torch.int64
    ZigzagMamba(8, grid=(3, 4)).load_state_dict(layer.state_dict())
    with pytest.raises(ValueError):
        ZigzagMamba(8, grid=(3, 4), order=torch.zeros(12, dtype=torch.long))   # not a permutation


@cpu
def test_selective_scan_fn_is_the_op():
    torch.manual_seed(1)
    u, delta = torch.randn(1, 4, 12), torch.rand(1, 4, 12)
    A, B, C = -torch.rand(4, 3), torch.randn(1, 3, 12), torch.randn(1, 3, 12)
    order = orders.zigzag(3, 4, 2)
    out, last = selective_scan_fn(u, delta, A, B, C, return_last_state=True, order=order)
    ref_out, ref_last = zigspark.selective_scan(u, delta, A, B, C, return_last_state=True, order=order)
    assert torch.equal(out, ref_out) and torch.equal(last, ref_last)
    with pytest.raises(NotImplementedError, match="b_rms_weight"):
        mamba_inner_fn(torch.randn(1, 8, 4), *[None] * 6, A, b_rms_weight=torch.ones(1))


@pytest.mark.interpret
def test_layer_on_triton_matches_reference(triton_device):
    torch.manual_seed(2)
    layer = ZigzagMamba(8, grid=(3, 4), layer_index=7, d_state=4).to(triton_device)
    x = torch.randn(1, 12, 8, device=triton_device)
    layer.backend = "triton"
    y_triton = layer(x)
    layer.backend = "reference"
    torch.testing.assert_close(y_triton, layer(x), rtol=1e-4, atol=1e-5)
