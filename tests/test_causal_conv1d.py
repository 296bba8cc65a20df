"""zigspark.causal_conv1d: reference against a loop along orders, gradients, registration, bad inputs
(cpu tier); the Triton kernels by the numerics rule (interpret and gpu tiers)."""

import pytest
import torch
import torch.nn.functional as F

import zigspark
from zigspark import orders

from numerics import assert_by_rule, max_abs_err

cpu = pytest.mark.cpu


def naive_conv(x, weight, bias=None, silu=False):
    x, weight = x.double(), weight.double()
    batch, dim, length = x.shape
    width = weight.shape[1]
    out = torch.zeros(batch, dim, length, dtype=torch.float64)
    for t in range(length):
        for k in range(width):
            s = t - (width - 1) + k
            if s >= 0:
                out[:, :, t] += weight[:, k] * x[:, :, s]
    if bias is not None:
        out += bias.double()[:, None]
    return F.silu(out) if silu else out


@cpu
@pytest.mark.parametrize("width", [2, 3, 4])
@pytest.mark.parametrize("activation", [None, "silu"])
def test_causal_conv1d_matches_loop_along_orders(width, activation):
    x = torch.randn(2, 3, 20, dtype=torch.float64)
    weight, bias = torch.randn(3, width, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    out = zigspark.causal_conv1d(x, weight, bias, activation)
    assert max_abs_err(out, naive_conv(x, weight, bias, activation is not None)) < 1e-12
    order = orders.zigzag(4, 5, 3)
    idx = order.indices()
    expected = naive_conv(x[..., idx], weight, bias, activation is not None)[..., orders.inverse(idx)]
    assert max_abs_err(zigspark.causal_conv1d(x, weight, bias, activation, order=order), expected) < 1e-12

    # the closed-form backward against autograd of the loop, for every width
    leaves = [t.clone().requires_grad_(True) for t in (x, weight, bias)]
    g = torch.randn_like(x)
    closed = torch.autograd.grad(zigspark.causal_conv1d(*leaves, activation, order=order), leaves, g)
    ordered = naive_conv(leaves[0][..., idx], leaves[1], leaves[2], activation is not None)[..., orders.inverse(idx)]
    for name, got, want in zip(("dx", "dweight", "dbias"), closed, torch.autograd.grad(ordered, leaves, g)):
        assert max_abs_err(got, want) < 1e-11, name


@cpu
def test_causal_conv1d_gradcheck_opcheck_and_bad_inputs():
    x = torch.randn(1, 2, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)
    perm = torch.randperm(6)
    assert torch.autograd.gradcheck(lambda *t: zigspark.causal_conv1d(*t, "silu", order=perm), (x, w, b))
    torch.library.opcheck(torch.ops.zigspark.causal_conv1d_fwd.default,
                          (x.detach().float(), w.detach().float(), None, True, [0, 1, 6, 1, 0, 1], None, "reference"))
    with pytest.raises(ValueError, match=r"weight must be \(dim, width\) = \(2, 2..4\)"):
        zigspark.causal_conv1d(x, torch.randn(2, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="activation must be"):
        zigspark.causal_conv1d(x, w, activation="relu")
    with pytest.raises(TypeError, match="x must have a floating dtype"):
        zigspark.causal_conv1d(x.long(), w)


def check_conv_backend(backend, device, dtype, batch, dim, length, width, activation, order=None, bias=True):
    torch.manual_seed(length * 31 + width)
    x64 = torch.randn(batch, dim, length, dtype=torch.float64, device=device)
    w64 = torch.randn(dim, width, dtype=torch.float64, device=device)
    b64 = torch.randn(dim, dtype=torch.float64, device=device) if bias else None
    g64 = torch.randn(batch, dim, length, dtype=torch.float64, device=device)

    def run(dt, which):
        leaves = [t if t is None else t.to(dt).requires_grad_(True) for t in (x64, w64, b64)]
        out = zigspark.causal_conv1d(*leaves, activation, order=order, backend=which)
        present = [t for t in leaves if t is not None]
        return [out.detach()] + list(torch.autograd.grad(out, present, g64.to(dt)))

    kernel, ref64, reflow = run(dtype, backend), run(torch.float64, "reference"), run(dtype, "reference")
    for name, a, b, c in zip(["out", "dx", "dweight", "dbias"], kernel, ref64, reflow):
        assert_by_rule(a, b, c, factor=2 if name == "out" else 3, what=f"{backend} {name}", rel_floor=1e-5)


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("width,activation,order", [
    (2, None, None), (3, "silu", orders.zigzag(4, 5, 7)), (4, "silu", torch.randperm(20)),
    (4, None, orders.temporal(2, 2, 5, backward=True))])
def test_triton_conv_matches_reference(triton_device, dtype, width, activation, order):
    check_conv_backend("triton", triton_device, dtype, 2, 3, 20, width, activation, order)
    check_conv_backend("triton", triton_device, dtype, 1, 2, 1, width, activation, bias=False)


@pytest.mark.emulate
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("width,activation,order", [
    (2, None, None), (3, "silu", orders.zigzag(4, 5, 7)), (4, "silu", torch.randperm(20)),
    (4, None, orders.temporal(2, 2, 5, backward=True))])
def test_emulated_cuda_conv_matches_reference(dtype, width, activation, order):
    check_conv_backend("cuda", torch.device("cpu"), dtype, 2, 3, 20, width, activation, order)
    check_conv_backend("cuda", torch.device("cpu"), dtype, 1, 2, 1, width, activation, bias=False)
    check_conv_backend("cuda", torch.device("cpu"), dtype, 1, 2, 1100, width, activation, orders.zigzag(25, 44, 3))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("width", [2, 3, 4])
def test_gpu_conv_matches_reference(backend, dtype, width):
    check_conv_backend(backend, torch.device("cuda"), dtype, 2, 96, 1024, width, "silu", orders.zigzag(32, 32, 5))
    check_conv_backend(backend, torch.device("cuda"), dtype, 1, 33, 4099, width, None, torch.randperm(4099))
    check_conv_backend(backend, torch.device("cuda"), dtype, 1, 8, 1, width, "silu", bias=False)
    check_conv_backend(backend, torch.device("cuda"), dtype, 2, 5, 2 * 9 * 7, width, None,
                       orders.temporal(2, 9, 7, backward=True))


# ---- every built-in order the kernels compute in closed form, against zigspark.orders' index tensors ---

# Odd, non-square, 1×N and N×1 grids; 9×15 = 135 steps spans two of the Triton kernels' 128-step blocks,
# 23×29 = 667 two of the CUDA kernels' 512-step chunks (emulate tier only: the interpreter is slow).
ORDER_GRIDS = [(1, 1), (1, 6), (6, 1), (2, 2), (3, 5), (5, 3), (4, 4), (2, 7), (9, 15)]
OTHER_ORDERS = [orders.zigzag(3, 5, p, frames=2) for p in range(8)] + [
    orders.zigzag(2, 3, 6, frames=3),
    orders.raster(3, 5), orders.raster(3, 5, reverse=True), orders.raster(2, 3, frames=2, reverse=True),
    *(orders.temporal(f, h, w, backward=b) for f, h, w in [(2, 3, 5), (3, 2, 2), (2, 1, 1), (1, 2, 3)]
      for b in (False, True))]
ORDER_GROUPS = {f"zigzag-{h}x{w}": [orders.zigzag(h, w, p) for p in range(8)] for h, w in ORDER_GRIDS}
ORDER_GROUPS["video-raster"] = OTHER_ORDERS


def check_kernel_orders(backend, device, order_list, backward=True):
    """Width 2, weight (1, 0), no bias, no activation: the output at step t is x at step t−1, and ∂x at step
    s is ∂out at step s+1. With x = ∂out = the raster positions (exact in float32), out[order[t]] = order[t−1]
    (0 at t = 0) and ∂x[order[s]] = order[s+1] (0 at the last step): every step of the kernels' order,
    forward and backward, against the materialised index tensor. backward=False checks the forward only."""
    for order in order_list:
        idx = order.indices()
        length = idx.numel()
        positions = torch.arange(length, dtype=torch.float32)
        expected_out, expected_dx = torch.zeros(length), torch.zeros(length)
        expected_out[idx[1:]] = idx[:-1].float()
        expected_dx[idx[:-1]] = idx[1:].float()
        x = positions.expand(1, 2, length).clone().to(device).requires_grad_(True)
        weight = torch.tensor([[1.0, 0.0]] * 2, device=device)
        out = zigspark.causal_conv1d(x, weight, order=order, backend=backend)
        checks = [("out", out, expected_out)]
        if backward:
            checks.append(("dx", torch.autograd.grad(out, x, positions.expand(1, 2, length).to(device))[0],
                           expected_dx))
        for name, got, want in checks:
            got = got.detach().cpu()
            bad = (got != want).any(1).nonzero()
            assert bad.numel() == 0, (f"{backend} {name} along {order}: {bad.numel()} of {length} raster positions "
                                      f"wrong, first at {bad[0, -1].item()}: got {got[0, :, bad[0, -1]].tolist()}, "
                                      f"want {want[bad[0, -1]].item()}")


@pytest.mark.interpret
@pytest.mark.parametrize("group", list(ORDER_GROUPS))
def test_triton_conv_follows_every_builtin_order(triton_device, group):
    # the backward for all 8 paths on one odd grid and for the other orders: ~0.07 s an order interpreted
    check_kernel_orders("triton", triton_device, ORDER_GROUPS[group], backward=group in ("zigzag-3x5", "video-raster"))


@pytest.mark.emulate
@pytest.mark.parametrize("group", [*ORDER_GROUPS, "zigzag-23x29"])
def test_emulated_cuda_conv_follows_every_builtin_order(group):
    order_list = ORDER_GROUPS.get(group) or [orders.zigzag(23, 29, p) for p in range(8)]
    check_kernel_orders("cuda", torch.device("cpu"), order_list)
