"""zigspark.selective_scan: the reference against a sequential loop, orders,
gradients, registration and bad inputs (cpu tier); the Triton kernels on tiny shapes (interpret tier) and
at real sizes (gpu tier)."""

import pytest
import torch

import zigspark
from zigspark import orders

from zigspark.reference.selective_scan import sequential_selective_scan

from numerics import assert_by_rule, max_abs_err

cpu = pytest.mark.cpu


def naive_scan(*args, **kw):
    """Oracle of the oracle: one step at a time in float64 (no chunking, no parallel scan)."""
    return sequential_selective_scan(*args, **kw, dtype=torch.float64)


def make_inputs(batch=2, dim=4, length=37, n=16, bc="variable", groups=1, with_z=True, with_d=True,
                with_bias=True, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    u = r(batch, dim, length).to(dtype)
    delta = (0.5 * torch.rand(batch, dim, length, generator=g, dtype=torch.float64)).to(dtype)
    A = -(0.5 + torch.rand(dim, n, generator=g, dtype=torch.float64))
    shapes = {"constant": (dim, n), "variable": (batch, n, length), "grouped": (batch, groups, n, length)}
    B, C = r(*shapes[bc]).to(dtype), r(*shapes[bc]).to(dtype)
    D = r(dim) if with_d else None
    z = r(batch, dim, length).to(dtype) if with_z else None
    bias = 0.1 * r(dim) if with_bias else None
    if dtype != torch.float64:
        A, D, bias = A.float(), None if D is None else D.float(), None if bias is None else bias.float()
    return dict(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=bias)


CASES = [
    dict(length=1),
    dict(length=37),
    dict(length=100, n=1),
    dict(length=70, n=64, dim=2),
    dict(bc="constant"),
    dict(bc="grouped", groups=2),
    dict(bc="grouped", groups=1, dim=3),
    dict(with_z=False, with_d=False, with_bias=False),
]


@cpu
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("softplus", [False, True])
def test_reference_matches_sequential_loop(case, softplus):
    x = make_inputs(**case)
    out, last = zigspark.selective_scan(**x, delta_softplus=softplus, return_last_state=True)
    ref_out, ref_last = naive_scan(**x, delta_softplus=softplus)
    assert max_abs_err(out, ref_out) < 1e-10
    assert max_abs_err(last, ref_last) < 1e-10


@cpu
@pytest.mark.parametrize("bc,groups", [("constant", 1), ("variable", 1), ("grouped", 3)])
def test_reference_in_channel_blocks_matches_sequential_loop(bc, groups, monkeypatch):
    """Wide inputs are scanned a block of channels at a time (to stay in cache); force blocks of one or two
    channels (whole groups when B and C are grouped) and compare with the loop, along an order."""
    from zigspark.reference import selective_scan as ref

    x = make_inputs(batch=2, dim=6, length=45, n=3, bc=bc, groups=groups)
    monkeypatch.setattr(ref, "_BLOCK_ELEMENTS", 2 * 45 * 3)                    # one channel per block
    per_group = 2 if bc == "grouped" else 1
    assert ref._channel_blocks(2, 6, 45, 3, per_group) == [(d, d + per_group) for d in range(0, 6, per_group)]
    order = orders.zigzag(5, 9, 4)
    out, last = zigspark.selective_scan(**x, delta_softplus=True, return_last_state=True, order=order,
                                        backend="reference")
    idx = order.indices()
    in_order = {k: v.index_select(-1, idx) if k in ("u", "delta", "z") or (k in "BC" and v.dim() > 2) else v
                for k, v in x.items()}
    ref_out, ref_last = naive_scan(**in_order, delta_softplus=True)
    assert max_abs_err(out, ref_out.index_select(-1, orders.inverse(idx))) < 1e-10
    assert max_abs_err(last, ref_last) < 1e-10


@cpu
def test_reference_work_tensors_are_not_shared_with_outputs_or_threads():
    """The reference keeps its block work tensors between calls (per thread): no output may alias them, and
    scans running at the same time on two threads must not see each other's."""
    import threading

    inputs = [make_inputs(batch=1, dim=16, length=600, n=8, seed=s) for s in range(4)]
    expected = [naive_scan(**x, delta_softplus=True)[0] for x in inputs]
    first = zigspark.selective_scan(**inputs[0], delta_softplus=True, backend="reference")
    zigspark.selective_scan(**inputs[1], delta_softplus=True, backend="reference")
    assert max_abs_err(first, expected[0]) < 1e-10

    results, barrier = {}, threading.Barrier(2)

    def worker(i):
        barrier.wait()
        for _ in range(10):
            results[i] = zigspark.selective_scan(**inputs[i], delta_softplus=True, backend="reference")

    threads = [threading.Thread(target=worker, args=(i,)) for i in (2, 3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in (2, 3):
        assert max_abs_err(results[i], expected[i]) < 1e-10


def fast_decay_case(batch=2, dim=8, length=256):
    """Inputs where exp(Δ·A) is tiny (A = −1…−16, Δ ∈ (0.5, 3)), an output gradient, and the exact dA from
    autograd of the float64 loop: a_t·h_{t−1} taken as h_t − b_t cancels there (relative errors ~1e-3 on the
    small dA entries)."""
    g = torch.Generator().manual_seed(0)
    n = 16
    u = torch.randn(batch, dim, length, generator=g)
    delta = 0.5 + 2.5 * torch.rand(batch, dim, length, generator=g)
    A = -torch.arange(1, n + 1, dtype=torch.float32).repeat(dim, 1)
    B, C = torch.randn(batch, n, length, generator=g), torch.randn(batch, n, length, generator=g)
    leaves = [t.double().requires_grad_(True) for t in (u, delta, A, B, C)]
    y, _ = sequential_selective_scan(*leaves)
    dout = torch.randn(y.shape, generator=g, dtype=torch.float64)
    exact = torch.autograd.grad(y, leaves, dout)[2]
    return (u, delta, A, B, C), dout, exact


@cpu
def test_reference_backward_is_precise_for_fast_decaying_states():
    """float32 dA entry by entry against the float64 loop's, where exp(Δ·A) is tiny."""
    from zigspark.reference import selective_scan as ref

    inputs, dout, exact = fast_decay_case()
    dA = ref.selective_scan_backward(dout.float(), None, *inputs)[2]
    assert ((dA.double() - exact).abs() / exact.abs()).max() < 1e-4


@cpu
def test_reference_works_after_a_call_under_inference_mode(monkeypatch):
    """The kept work tensors made under torch.inference_mode are inference tensors; a later training call
    on the same thread must not write into them."""
    import threading

    from zigspark.reference import selective_scan as ref

    monkeypatch.setattr(ref, "_work", threading.local())                   # none kept yet on this thread
    x = make_inputs(batch=1, dim=4, length=20, n=3, dtype=torch.float32)
    with torch.inference_mode():
        zigspark.selective_scan(**x, backend="reference")
    u = x["u"].clone().requires_grad_(True)
    zigspark.selective_scan(**{**x, "u": u}, backend="reference").sum().backward()
    assert u.grad is not None and torch.isfinite(u.grad).all()


@cpu
@pytest.mark.parametrize("bc", ["constant", "variable"])
def test_float32_within_mamba_ssm_tolerance(bc):
    x = make_inputs(length=300, bc=bc, dtype=torch.float32)
    out, last = zigspark.selective_scan(**x, delta_softplus=True, return_last_state=True)
    ref_out, ref_last = naive_scan(**x, delta_softplus=True)
    torch.testing.assert_close(out.double(), ref_out, rtol=6e-4, atol=2e-3)
    torch.testing.assert_close(last.double(), ref_last, rtol=6e-4, atol=2e-3)
    assert out.dtype == torch.float32 and last.dtype == torch.float32


@cpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_keep_dtype(dtype):
    x = make_inputs(length=50, dtype=dtype)
    out, last = zigspark.selective_scan(**x, return_last_state=True)
    assert out.dtype == dtype and last.dtype == torch.float32
    ref_out, _ = naive_scan(**x)
    # the reference computes in float32 and rounds once to the output dtype: mamba-ssm's own tolerances
    rtol, atol = {torch.float16: (3e-3, 5e-3), torch.bfloat16: (3e-2, 5e-2)}[dtype]
    torch.testing.assert_close(out.double(), ref_out, rtol=rtol, atol=atol)


def permuted_case(order_tensor, **kw):
    """Scan along `order` equals: permute every per-step input, scan in raster order, un-permute."""
    x = make_inputs(**kw)
    idx = order_tensor
    gathered = {k: (v[..., idx] if v is not None and (k in ("u", "delta", "z") or (k in ("B", "C") and v.dim() > 2))
                    else v) for k, v in x.items()}
    ref_out, ref_last = naive_scan(**gathered, delta_softplus=True)
    return x, ref_out[..., orders.inverse(idx)], ref_last


@cpu
@pytest.mark.parametrize("h,w", [(3, 5), (4, 4), (1, 7), (6, 3)])
def test_all_zigzag_paths_equal_permute_scan_unpermute(h, w):
    for path in range(8):
        order = orders.zigzag(h, w, path)
        x, expected, expected_last = permuted_case(order.indices(), length=h * w, bc="grouped", groups=2)
        out, last = zigspark.selective_scan(**x, delta_softplus=True, return_last_state=True, order=order)
        assert max_abs_err(out, expected) < 1e-10, f"path {path}"
        assert max_abs_err(last, expected_last) < 1e-10, f"path {path}"


@pytest.mark.parametrize("order", [torch.randperm(24, generator=torch.Generator().manual_seed(3)),
                                   orders.temporal(2, 3, 4), orders.temporal(2, 3, 4, backward=True),
                                   orders.zigzag(3, 4, 5, frames=2), orders.raster(24, reverse=True)],
                         ids=["random", "temporal", "temporal-back", "video-spatial", "reversed"])
@cpu
def test_other_orders(order):
    idx = order if isinstance(order, torch.Tensor) else order.indices()
    x, expected, expected_last = permuted_case(idx, length=24, bc="constant")
    out, last = zigspark.selective_scan(**x, delta_softplus=True, return_last_state=True, order=order)
    assert max_abs_err(out, expected) < 1e-10
    assert max_abs_err(last, expected_last) < 1e-10


@cpu
@pytest.mark.parametrize("bc", ["constant", "variable", "grouped"])
def test_gradcheck_float64_all_inputs(bc):
    x = make_inputs(batch=1, dim=2, length=9, n=3, bc=bc, groups=2)
    names = [k for k, v in x.items() if v is not None]
    order = orders.zigzag(3, 3, 5)

    def f(*tensors):
        kw = dict(zip(names, tensors))
        out, last = zigspark.selective_scan(**kw, delta_softplus=True, return_last_state=True, order=order)
        return out, last

    inputs = tuple(x[k].detach().requires_grad_(True) for k in names)
    assert torch.autograd.gradcheck(f, inputs)


@cpu
@pytest.mark.parametrize("blocks", ["whole", "split"])
@pytest.mark.parametrize("bc", ["constant", "variable", "grouped"])
@pytest.mark.parametrize("extras", [True, False])
def test_closed_form_backward_matches_autograd_across_chunks(bc, blocks, extras, monkeypatch):
    """L = 77 spans ten padded chunks of the reference scan (gradcheck above stays inside one); the closed
    form is checked against autograd of the step-by-step oracle run on inputs gathered into the order, with
    all channels in one block and in blocks of two (one group), with and without z, D, delta_bias and
    ∂last_state."""
    from zigspark.reference import selective_scan as ref

    if blocks == "split":
        monkeypatch.setattr(ref, "_BLOCK_ELEMENTS", 2 * 80 * 5 * 2)          # two channels per block
        assert len(ref._channel_blocks(2, 4, 80, 5, 2 if bc == "grouped" else 1)) == 2
    x = make_inputs(batch=2, dim=4, length=77, n=5, bc=bc, groups=2, with_z=extras, with_d=extras,
                    with_bias=extras)
    names = list(x)
    index = orders.zigzag(7, 11, 6).indices()
    leaves = {k: None if v is None else v.clone().requires_grad_(True) for k, v in x.items()}
    in_order = {k: v.index_select(-1, index) if v is not None and (k in ("u", "delta", "z")
                                                                    or (k in "BC" and v.dim() > 2)) else v
                for k, v in leaves.items()}
    y, last = naive_scan(**in_order, delta_softplus=True)
    out = y.index_select(-1, orders.inverse(index))
    dout, dlast = torch.randn_like(out), torch.randn_like(last)
    present = [k for k in names if leaves[k] is not None]
    wrt = (out, last) if extras else out
    auto = dict(zip(present, torch.autograd.grad(wrt, [leaves[k] for k in present], (dout, dlast) if extras
                                                 else dout)))
    closed = dict(zip(names, ref.selective_scan_backward(dout, dlast if extras else None, **x, delta_softplus=True,
                                                         order_index=index)))
    for k in present:
        assert max_abs_err(closed[k], auto[k]) < 1e-9 * max(1.0, auto[k].abs().max().item()), k


@cpu
def test_opcheck_and_compile():
    x = make_inputs(batch=1, dim=2, length=12, n=4, dtype=torch.float32)
    args = (x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["delta_bias"], True,
            list(orders.zigzag(3, 4, 2).params), None, "reference")
    torch.library.opcheck(torch.ops.zigspark.selective_scan_fwd.default, args)
    torch.library.opcheck(torch.ops.zigspark.selective_scan_fwd.default,
                          args[:9] + ([], torch.randperm(12), "reference"))
    grads = (torch.randn(1, 2, 12), torch.randn(1, 2, 4))
    torch.library.opcheck(torch.ops.zigspark.selective_scan_bwd.default,
                          grads + args[:8] + (torch.empty(0),) + args[8:])
    order = orders.zigzag(3, 4, 1)
    fn = lambda u: zigspark.selective_scan(u, x["delta"], x["A"], x["B"], x["C"], x["D"], order=order)  # noqa: E731
    torch.testing.assert_close(torch.compile(fn, fullgraph=True, backend="aot_eager")(x["u"]), fn(x["u"]))


@cpu
def test_bad_inputs():
    x = make_inputs(length=12, dtype=torch.float32)
    cases = [
        (dict(u=x["u"].long()), TypeError, "u must have a floating dtype"),
        (dict(u=x["u"][0]), ValueError, r"u must be \(batch, dim, L\)"),
        (dict(delta=x["delta"][:, :, :5]), ValueError, "delta must have u's shape"),
        (dict(A=x["A"][:, :3].contiguous().T), ValueError, r"A must be \(dim, N\)"),
        (dict(A=x["A"].to(torch.complex64)), TypeError, "A must be real"),
        (dict(B=x["B"][:, :, :5]), ValueError, "B must be"),
        (dict(C=torch.randn(2, 3, 16, 12)), ValueError, "dim divisible by G"),
        (dict(B=torch.randn(2, 4, 16, 12), C=torch.randn(2, 2, 16, 12)), ValueError, "same number of groups"),
        (dict(D=torch.randn(5)), ValueError, r"D must be \(dim,\)"),
        (dict(z=x["z"][:1]), ValueError, "z must have u's shape"),
        (dict(delta_bias=x["delta_bias"].half()), TypeError, "delta_bias must have a floating dtype"),
        (dict(A=x["A"].to("meta")), ValueError, "same device"),
    ]
    for override, exc, match in cases:
        with pytest.raises(exc, match=match):
            zigspark.selective_scan(**{**x, **override})
    with pytest.raises(ValueError, match="covers 6 positions"):
        zigspark.selective_scan(**x, order=orders.zigzag(2, 3, 0))
    with pytest.raises(ValueError, match="permutation"):
        zigspark.selective_scan(**x, order=torch.zeros(12, dtype=torch.long))
    with pytest.raises(zigspark.BackendUnavailableError, match="backend='cuda' cannot run here"):
        zigspark.selective_scan(**x, backend="cuda")


# ---- kernels: interpret tier (tiny shapes) and gpu tier (real sizes) ----------------------------------

def check_scan_backend(backend, device, dtype, order=None, dlast=True, rel_floor=2e-5, bc_float32=False,
                       delta_softplus=True, **case):
    """Kernel vs reference (float64 and the kernel's dtype) by the numerics rule, outputs and gradients.
    bc_float32: B and C stay float32 while u, Δ and z take `dtype` (the kernels cast them to u's dtype)."""
    x = {k: None if v is None else v.to(device) for k, v in make_inputs(dtype=torch.float64, **case).items()}
    in_dtype = ("u", "delta", "z") if bc_float32 else ("u", "delta", "z", "B", "C")
    lowp = {k: None if v is None else (v.to(dtype) if k in in_dtype else v.float()) for k, v in x.items()}
    names = [k for k in x if x[k] is not None]

    def run(inputs, which):
        leaves = {k: None if v is None else v.detach().clone().requires_grad_(True) for k, v in inputs.items()}
        out, last = zigspark.selective_scan(**leaves, delta_softplus=delta_softplus, return_last_state=True,
                                            order=order, backend=which)
        torch.manual_seed(7)
        g = torch.randn(out.shape, dtype=torch.float64, device=device)
        gl = torch.randn(last.shape, dtype=torch.float64, device=device) if dlast else None
        outputs, grads_out = [out], [g.to(out.dtype)]
        if dlast:
            outputs.append(last)
            grads_out.append(gl.to(last.dtype))
        grads = torch.autograd.grad(outputs, [leaves[k] for k in names], grads_out)
        return out.detach(), last.detach(), dict(zip(names, grads))

    out, last, grads = run(lowp, backend)
    out64, last64, grads64 = run(x, "reference")
    outl, lastl, gradsl = run(lowp, "reference")
    assert_by_rule(out, out64, outl, what=f"{backend} out", rel_floor=rel_floor)
    assert_by_rule(last, last64, lastl, what=f"{backend} last_state", rel_floor=rel_floor)
    for k in names:
        assert_by_rule(grads[k], grads64[k], gradsl[k], factor=3, what=f"{backend} d{k}", rel_floor=rel_floor)


INTERPRET_CASES = [
    dict(length=35, order=orders.zigzag(5, 7, 5), bc="grouped", groups=2),
    dict(length=37, order=torch.randperm(37, generator=torch.Generator().manual_seed(1)), dim=3, n=3),
    dict(length=70, order=orders.temporal(2, 5, 7, backward=True), bc="constant", dim=2),
    dict(length=1, dim=2, n=4),
    dict(length=24, order=orders.raster(24, reverse=True), with_z=False, with_d=False, with_bias=False, dim=2),
    dict(length=40, order=orders.zigzag(5, 8, 1), dim=2, n=64),     # chunks of 16 steps at N = 64
    dict(length=9, dim=1, n=256),                                   # chunks of 4 steps at N = 256
    dict(length=20, order=orders.zigzag(4, 5, 4), dim=2, n=1),
    dict(length=21, order=orders.zigzag(3, 7, 0), bc="grouped", groups=1, dim=3, n=4),
]

# delta_softplus=False: Δ + delta_bias is used as is (make_inputs keeps Δ in [0, 0.5), delta_bias ~ 0.1).
NO_SOFTPLUS_CASES = [
    dict(length=35, order=orders.zigzag(5, 7, 3), bc="grouped", groups=2, n=4),
    dict(length=24, order=orders.temporal(2, 3, 4), bc="constant", dim=2, n=8, with_z=False, with_d=False),
]


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", INTERPRET_CASES, ids=lambda c: f"L{c['length']}")
def test_triton_scan_matches_reference(triton_device, dtype, case):
    check_scan_backend("triton", triton_device, dtype, batch=1, **case)


@pytest.mark.interpret
@pytest.mark.parametrize("case", NO_SOFTPLUS_CASES, ids=lambda c: f"L{c['length']}")
def test_triton_scan_without_softplus(triton_device, case):
    check_scan_backend("triton", triton_device, torch.float32, delta_softplus=False, batch=2, **case)


@pytest.mark.interpret
def test_triton_scan_without_last_state_gradient(triton_device):
    check_scan_backend("triton", triton_device, torch.float32, dlast=False, batch=2, dim=2, length=20,
                       order=orders.zigzag(4, 5, 2))


@pytest.mark.interpret
@pytest.mark.parametrize("bc", ["constant", "variable"])
def test_triton_scan_float32_b_and_c_with_half_u(triton_device, bc):
    check_scan_backend("triton", triton_device, torch.float16, bc_float32=True, batch=1, dim=3, length=20, n=4,
                       bc=bc, order=orders.zigzag(4, 5, 1))


# The CUDA scan walks 512-step chunks with 128 threads: L 600 and 1100 cross one and two chunk boundaries.
EMULATE_CASES = [
    *INTERPRET_CASES,
    dict(length=600, order=orders.zigzag(20, 30, 6), dim=2, n=4),
    dict(length=1100, order=torch.randperm(1100, generator=torch.Generator().manual_seed(2)), dim=2, n=16,
         bc="grouped", groups=2),
    dict(length=513, bc="constant", dim=3, n=1, order=orders.zigzag(27, 19, 1)),
]


@pytest.mark.emulate
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", EMULATE_CASES, ids=lambda c: f"L{c['length']}")
def test_emulated_cuda_scan_matches_reference(dtype, case):
    check_scan_backend("cuda", torch.device("cpu"), dtype, batch=2 if case["length"] < 600 else 1, **case)


def bf16_inputs_with_float32_b_and_c(device, **case):
    """Scan inputs in bfloat16 on `device`, except B and C in float32 (A, D, bias are float32 anyway)."""
    x = {k: None if v is None else v.to(device) for k, v in make_inputs(dtype=torch.bfloat16, **case).items()}
    x["B"], x["C"] = x["B"].float(), x["C"].float()
    return x


def check_backward_precise_for_fast_decaying_states(backend, device, **sizes):
    """As the reference's test: the kernel's backward uses h_{t−1} rather than taking h_t − b_t."""
    inputs, dout, exact = fast_decay_case(**sizes)
    leaves = [t.to(device).requires_grad_(True) for t in inputs]
    out = zigspark.selective_scan(*leaves, backend=backend)
    dA = torch.autograd.grad(out, leaves[2], dout.float().to(device))[0]
    assert ((dA.double().cpu() - exact).abs() / exact.abs()).max() < 1e-4


@pytest.mark.emulate
def test_emulated_cuda_scan_backward_is_precise_for_fast_decaying_states():
    check_backward_precise_for_fast_decaying_states("cuda", torch.device("cpu"))


@pytest.mark.interpret
def test_triton_scan_backward_is_precise_for_fast_decaying_states(triton_device):
    # smaller than the other tiers' case: the interpreter takes ~50 s at that size
    check_backward_precise_for_fast_decaying_states("triton", triton_device, batch=1, dim=2, length=80)


@pytest.mark.emulate
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", NO_SOFTPLUS_CASES, ids=lambda c: f"L{c['length']}")
def test_emulated_cuda_scan_without_softplus(dtype, case):
    check_scan_backend("cuda", torch.device("cpu"), dtype, delta_softplus=False, batch=2, **case)


@pytest.mark.emulate
def test_emulated_cuda_scan_without_last_state_gradient():
    check_scan_backend("cuda", torch.device("cpu"), torch.float32, dlast=False, batch=2, dim=2, length=20,
                       order=orders.zigzag(4, 5, 2))


@pytest.mark.emulate
def test_emulated_cuda_scan_refuses_b_and_c_in_another_dtype():
    """The CUDA kernels would cast float32 B/C to u's bfloat16 and lose precision silently: they refuse."""
    x = bf16_inputs_with_float32_b_and_c(torch.device("cpu"), batch=1, dim=3, length=20, n=4)
    with pytest.raises(ValueError, match=r"need B, C in u's dtype \(bfloat16\); use backend='triton'"):
        zigspark.selective_scan(**x, backend="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", [
    dict(batch=2, dim=64, length=1024, n=16, order=orders.zigzag(32, 32, 3)),
    dict(batch=1, dim=48, length=4097, n=16, bc="grouped", groups=4, order=torch.randperm(4097)),
    dict(batch=2, dim=16, length=960, n=64, bc="constant", order=orders.zigzag(24, 40, 6)),
    dict(batch=1, dim=8, length=1, n=1),
    dict(batch=1, dim=32, length=2 * 16 * 16, n=16, order=orders.temporal(2, 16, 16)),
], ids=lambda c: f"L{c['length']}-N{c['n']}")
def test_gpu_scan_matches_reference(backend, dtype, case):
    check_scan_backend(backend, torch.device("cuda"), dtype, **case)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_scan_mixed_dtypes_and_no_last_state_grad(backend):
    """A graph that does not use last_state; fp32 B/C with bf16 u where the kernel takes them (Triton loads
    each input in its own dtype; the CUDA kernels refuse, and auto passes such calls to Triton)."""
    case = dict(batch=2, dim=32, length=600, n=16, bc="constant", order=orders.zigzag(20, 30, 1))
    check_scan_backend(backend, torch.device("cuda"), torch.bfloat16, dlast=False, bc_float32=backend == "triton",
                       **case)
    if backend == "cuda":
        x = bf16_inputs_with_float32_b_and_c(torch.device("cuda"), length=16)
        with pytest.raises(ValueError, match="in u's dtype"):
            zigspark.selective_scan(**x, backend="cuda")
        zigspark.selective_scan(**x)
        assert zigspark.last_backends()["selective_scan"] == "triton"


@pytest.mark.gpu
def test_gpu_cuda_needs_one_layout_for_b_and_c():
    x = {k: None if v is None else v.cuda() for k, v in make_inputs(dtype=torch.float32, length=16).items()}
    x["B"] = x["B"][0, :, 0].expand(x["A"].shape[0], -1).contiguous()   # constant B, per-step C
    with pytest.raises(ValueError, match="same layout"):
        zigspark.selective_scan(**x, backend="cuda")
    out = zigspark.selective_scan(**x)  # auto falls back to a backend that takes mixed layouts
    assert zigspark.last_backends()["selective_scan"] in ("cuda", "triton")
    torch.testing.assert_close(out, zigspark.selective_scan(**x, backend="reference"), rtol=1e-4, atol=1e-4)


@pytest.mark.interpret
def test_kernel_state_size_limit(triton_device):
    x = {k: None if v is None else v.to(triton_device)
         for k, v in make_inputs(dtype=torch.float32, length=4, n=300, dim=2).items()}
    with pytest.raises(ValueError, match="N = 300 is too large for the triton kernel"):
        zigspark.selective_scan(**x, backend="triton")
    zigspark.selective_scan(**x)  # auto takes the reference for such N
    assert zigspark.last_backends()["selective_scan"] == "reference"
