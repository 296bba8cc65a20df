"""zigspark.flash_attention and zigspark.attention_received: the reference against a naive full-matrix
softmax (cpu tier), the Triton kernels by the numerics rule (interpret: tiny shapes; gpu: real sizes)."""

import contextlib
import math

import pytest
import torch

import zigspark
from zigspark.reference import attention as ref

from numerics import assert_by_rule, max_abs_err

cpu = pytest.mark.cpu


def naive_attention(q, k, v, causal, scale):
    """Oracle of the oracle: the whole score matrix, float64, one head at a time."""
    batch, seqlen_q, heads, _ = q.shape
    seqlen_k, kv_heads = k.shape[1], k.shape[2]
    group = heads // kv_heads
    out = torch.zeros(batch, seqlen_q, heads, v.shape[-1], dtype=torch.float64)
    lse = torch.full((batch, heads, seqlen_q), float("-inf"), dtype=torch.float64)
    probs = torch.zeros(batch, heads, seqlen_q, seqlen_k, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            s = q[b, :, h].double() @ k[b, :, h // group].double().T * scale
            if causal:
                for i in range(seqlen_q):
                    s[i, max(0, i + seqlen_k - seqlen_q + 1):] = float("-inf")
            for i in range(seqlen_q):
                if torch.isinf(s[i]).all():
                    continue
                lse[b, h, i] = torch.logsumexp(s[i], 0)
                probs[b, h, i] = torch.softmax(s[i], 0)
            out[b, :, h] = probs[b, h] @ v[b, :, h // group].double()
    return out, lse, probs


def differentiable_naive_attention(q, k, v, causal, scale):
    """The same oracle written without in-place updates, so autograd can differentiate it."""
    group = q.shape[2] // k.shape[2]
    kh, vh = (t.repeat_interleave(group, dim=2) for t in (k, v))
    s = torch.einsum("bihd,bjhd->bhij", q, kh) * scale
    seqlen_q, seqlen_k = q.shape[1], k.shape[1]
    hidden = torch.zeros(seqlen_q, seqlen_k, dtype=torch.bool)
    if causal:
        hidden = torch.arange(seqlen_k)[None, :] > torch.arange(seqlen_q)[:, None] + (seqlen_k - seqlen_q)
    p = torch.softmax(s.masked_fill(hidden, float("-inf")), -1)
    p = torch.where(hidden.all(-1, keepdim=True), 0.0, p)              # a query that sees no key: o = 0
    return torch.einsum("bhij,bjhd->bihd", p, vh)


def finite(t):
    return t.masked_fill(torch.isinf(t), 0.0)


CASES = [  # batch, seqlen_q, seqlen_k, heads, kv_heads, head_dim, causal
    (1, 17, 17, 2, 2, 16, False),
    (2, 9, 23, 4, 2, 40, True),       # seqlen_q < seqlen_k, GQA 2
    (1, 23, 9, 8, 1, 24, True),       # seqlen_q > seqlen_k: early queries see no key; MQA
    (1, 1, 7, 2, 1, 16, False),
    (2, 40, 40, 2, 1, 64, True),
]


@cpu
@pytest.mark.parametrize("case", CASES, ids=str)
def test_reference_matches_naive(case):
    b, sq, sk, h, hk, d, causal = case
    q, k, v = torch.randn(b, sq, h, d), torch.randn(b, sk, hk, d), torch.randn(b, sk, hk, d)
    scale = 0.3
    out, lse = ref.attention_forward(q.double(), k.double(), v.double(), causal, scale, chunk=8)
    n_out, n_lse, n_p = naive_attention(q, k, v, causal, scale)
    assert max_abs_err(out, n_out) < 1e-12
    assert torch.equal(torch.isinf(lse), torch.isinf(n_lse)) and max_abs_err(finite(lse), finite(n_lse)) < 1e-12
    weight = torch.ones(sq, dtype=torch.float64)
    weight[0] = 0.0
    received = ref.attention_received(q.double(), k.double(), None, causal, scale, weight, chunk=5)
    assert max_abs_err(received, (n_p * weight[:, None]).sum(2)) < 1e-12


@cpu
@pytest.mark.parametrize("case", CASES, ids=str)
def test_closed_form_backward_matches_autograd(case):
    """The reference's closed-form backward (chunk by chunk, in place) against autograd of the naive oracle."""
    b, sq, sk, h, hk, d, causal = case
    q, k, v = (torch.randn(b, s, n, d, dtype=torch.float64, requires_grad=True)
               for s, n in ((sq, h), (sk, hk), (sk, hk)))
    out, lse = ref.attention_forward(q.detach(), k.detach(), v.detach(), causal, 0.25, chunk=8)
    g = torch.randn_like(out)
    expected = differentiable_naive_attention(q, k, v, causal, 0.25)
    assert max_abs_err(out, expected) < 1e-12
    auto = torch.autograd.grad(expected, (q, k, v), g)
    closed = ref.attention_backward(g, q.detach(), k.detach(), v.detach(), out, lse, causal, 0.25, chunk=8)
    for a, c in zip(auto, closed):
        assert max_abs_err(a, c) < 1e-12


@cpu
def test_reference_without_keys():
    """S_k = 0 (the public ops reject it, the reference does not): o = 0, lse = −inf, zero gradients."""
    q, k, v = torch.randn(1, 3, 2, 8), torch.randn(1, 0, 2, 8), torch.randn(1, 0, 2, 8)
    out, lse = ref.attention_forward(q, k, v)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()
    assert ref.attention_received(q, k).shape == (1, 2, 0)
    dq, dk, dv = ref.attention_backward(torch.randn_like(out), q, k, v, out, lse)
    assert torch.equal(dq, torch.zeros_like(q)) and dk.shape == k.shape and dv.shape == v.shape


@cpu
def test_gradcheck_opcheck_compile():
    q = torch.randn(1, 5, 2, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 6, 1, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 6, 1, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: zigspark.flash_attention(*t, causal=True), (q, k, v))
    args = (q.detach().float(), k.detach().float(), v.detach().float(), True, 0.3, "reference")
    torch.library.opcheck(torch.ops.zigspark.attention_fwd.default, args)
    out, lse = torch.ops.zigspark.attention_fwd(*args)
    torch.library.opcheck(torch.ops.zigspark.attention_bwd.default, (torch.randn_like(out), *args[:3], out, lse,
                                                                     True, 0.3, "reference"))
    torch.library.opcheck(torch.ops.zigspark.attention_received.default, (*args[:2], None, True, 0.3, None,
                                                                          "reference"))
    fn = lambda t: zigspark.flash_attention(t, t, t, causal=True)  # noqa: E731
    x = torch.randn(1, 6, 2, 8)
    torch.testing.assert_close(torch.compile(fn, fullgraph=True, backend="aot_eager")(x), fn(x))


@cpu
def test_received_options_and_return_values():
    q, k, v = torch.randn(2, 10, 4, 16), torch.randn(2, 12, 2, 16), torch.randn(2, 12, 2, 16)
    out, lse, received = zigspark.flash_attention(q, k, v, return_lse=True, return_received=True)
    assert out.shape == q.shape and lse.shape == (2, 4, 10) and received.shape == (2, 12)
    per_head = zigspark.attention_received(q, k, reduce_heads=None)
    torch.testing.assert_close(per_head.sum(-1), torch.full((2, 4), 10.0))  # each query's row sums to 1
    torch.testing.assert_close(received, per_head.mean(1))
    mask = torch.zeros(10, dtype=torch.bool)
    mask[[0, 3]] = True
    by_index = zigspark.attention_received(q, k, exclude_queries=[0, 3], reduce_heads="sum")
    by_mask = zigspark.attention_received(q, k, exclude_queries=mask, reduce_heads="sum")
    torch.testing.assert_close(by_index, by_mask)
    torch.testing.assert_close(by_index.sum(-1), torch.full((2,), 8.0 * 4))
    empty_rows_out, empty_lse = zigspark.flash_attention(q, k[:, :3], v[:, :3], causal=True, return_lse=True)
    assert torch.isinf(empty_lse[:, :, :7]).all() and (empty_rows_out[:, :7] == 0).all()


@cpu
def test_bad_inputs():
    q, k, v = torch.randn(2, 10, 4, 16), torch.randn(2, 12, 2, 16), torch.randn(2, 12, 2, 16)
    cases = [
        (dict(q=q[0]), ValueError, r"q must be \(batch, seqlen, heads, head_dim\)"),
        (dict(k=torch.randn(3, 12, 2, 16)), ValueError, "k has batch 3 but q has batch 2"),
        (dict(k=torch.randn(2, 12, 2, 8)), ValueError, "head_dim 8 but q has head_dim 16"),
        (dict(k=torch.randn(2, 12, 3, 16)), ValueError, "multiple of k's 3 heads"),
        (dict(v=torch.randn(2, 11, 2, 16)), ValueError, "v must have k's shape"),
        (dict(q=q.half()), TypeError, "share one dtype"),
        (dict(q=q.long()), TypeError, "q must have a floating dtype"),
        (dict(k=k.to("meta"), v=v.to("meta")), ValueError, "same device"),
        (dict(q=q[:, :0]), ValueError, "empty attention"),
    ]
    for override, exc, match in cases:
        args = {"q": q, "k": k, "v": v, **override}
        with pytest.raises(exc, match=match):
            zigspark.flash_attention(args["q"], args["k"], args["v"])
    with pytest.raises(ValueError, match="reduce_heads"):
        zigspark.attention_received(q, k, reduce_heads="max")
    with pytest.raises(ValueError, match=r"indices must be in \[-10, 10\)"):
        zigspark.attention_received(q, k, exclude_queries=[10])
    with pytest.raises(zigspark.BackendUnavailableError, match="backend='triton' cannot run here|cuda"):
        if not zigspark.backends.triton_interpreting():
            zigspark.flash_attention(q, k, v, backend="triton")
        else:
            zigspark.flash_attention(q, k, v, backend="cuda")


@cpu
def test_grid_slices_and_their_limit():
    """The Triton launchers' batch slices cover the batch once, each within the grid axis; one sample with
    more heads than the axis holds is refused by name rather than failing inside the launch."""
    from zigspark.triton_kernels import _grid

    slices = _grid.batch_slices(10, 16000)
    assert [(s.start, s.stop) for s, _ in slices] == [(0, 4), (4, 8), (8, 10)]
    assert [programs for _, programs in slices] == [64000, 64000, 32000]
    with pytest.raises(ValueError, match="70000 heads"):
        _grid.batch_slices(1, 70000)


# ---- kernels ---------------------------------------------------------------------------------------------

def check_attention_backend(backend, device, dtype, case, rel_floor=1e-4, exact=torch.float64):
    """`backend` in `dtype` against the reference in `exact` (float64, or float32 where float64 copies would
    not fit) by the numerics rule: out, lse, received (from the forward and alone), dq, dk, dv."""
    b, sq, sk, h, hk, d, causal = case
    torch.manual_seed(sq * 131 + sk)
    q64, k64, v64 = (torch.randn(b, s, n, d, dtype=exact, device=device)
                     for s, n in ((sq, h), (sk, hk), (sk, hk)))
    g64 = torch.randn(b, sq, h, d, dtype=exact, device=device)
    exclude = [0] if sq > 1 else None

    def run(dt, which):
        q, k, v = (t.to(dt).requires_grad_(True) for t in (q64, k64, v64))
        out, lse, received = zigspark.flash_attention(q, k, v, causal=causal, return_lse=True, return_received=True,
                                                      exclude_queries=exclude, reduce_heads=None, backend=which)
        grads = torch.autograd.grad(out, (q, k, v), g64.to(dt))
        # attention_received has no CUDA kernel: with the CUDA forward, auto takes the Triton one (reference
        # on the CPU emulator)
        alone = zigspark.attention_received(q, k, causal=causal, exclude_queries=exclude, reduce_heads=None,
                                            backend="auto" if which == "cuda" else which)
        return [out.detach(), lse, received, alone, *grads]

    kernel, ref64, reflow = run(dtype, backend), run(exact, "reference"), run(dtype, "reference")
    assert torch.equal(torch.isinf(kernel[1]), torch.isinf(ref64[1])), "queries without keys differ"
    for result in (kernel, ref64, reflow):
        result[1] = finite(result[1])
    for name, a, r64, rlo in zip(["out", "lse", "received", "received alone", "dq", "dk", "dv"], kernel, ref64,
                                 reflow):
        assert_by_rule(a, r64, rlo, factor=3 if name.startswith("d") else 2, what=f"{backend} {name}",
                       rel_floor=rel_floor)


INTERPRET_CASES = [(1, 17, 17, 2, 1, 16, False), (1, 9, 23, 2, 2, 40, True), (1, 23, 9, 4, 2, 16, True),
                   (1, 1, 5, 2, 2, 16, False), (1, 20, 20, 2, 2, 64, True),
                   (1, 17, 17, 8, 1, 128, False)]  # GQA 8: one dK/dV program loops over 8 query heads


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", INTERPRET_CASES, ids=str)
def test_triton_attention_matches_reference(triton_device, dtype, case):
    check_attention_backend("triton", triton_device, dtype, case)


@pytest.mark.interpret
def test_triton_refuses_head_dim_over_256(triton_device):
    q = torch.randn(1, 5, 2, 272, device=triton_device)
    with pytest.raises(ValueError, match="head_dim 272 is larger than the triton kernel's 256"):
        zigspark.flash_attention(q, q, q, backend="triton")


@pytest.mark.interpret
@pytest.mark.parametrize("case", [(3, 20, 24, 2, 1, 16, True), (3, 17, 17, 3, 3, 16, False)], ids=str)
def test_triton_attention_in_batch_slices(triton_device, small_grid, case):
    """batch·heads over the grid limit: every kernel runs once per slice of the batch (two programs per
    launch here), and the results are still the reference's."""
    check_attention_backend("triton", triton_device, torch.float16, case)


@pytest.mark.interpret
@pytest.mark.parametrize("case", [(2, 70, 80, 2, 1, 16, True), (1, 67, 130, 2, 2, 40, False)], ids=str)
def test_triton_attention_wide_rows(triton_device, wide_rows, case):
    """The int64 row addressing that samples of 2³¹ elements or more take gives the reference's results
    (over 64 rows, so that blocks start past row 0)."""
    check_attention_backend("triton", triton_device, torch.float16, case)


@pytest.mark.interpret
@pytest.mark.parametrize("head_dim, causal", [(16, False), (16, True), (96, True), (256, False)])
def test_triton_attention_every_tile_candidate(triton_device, head_dim, causal):
    """Every tile the GPU's tuning may pick gives the reference's results: forward, both backward kernels and
    the received sums, each pinned to its i-th candidate in turn. Lengths over 128 keep the 128-row tiles."""
    from zigspark.triton_kernels import _tune, attention as kernels

    case = (1, 130, 150, 2, 1, head_dim, causal)
    names = ("fwd", "dq", "dkdv", "received")
    lists = {n: kernels.candidates(n, head_dim, case[1], case[2], torch.float16) for n in names}
    assert any(b.block_m == 128 for b in lists["fwd"]) or head_dim > 128
    for i in range(max(map(len, lists.values()))):
        with contextlib.ExitStack() as pins:
            for n in names:
                pins.enter_context(_tune.pinned(f"attention.{n}", lists[n][i % len(lists[n])]))
            check_attention_backend("triton", triton_device, torch.float16, case)


# (batch, S_q, S_k, heads, kv heads, head_dim, causal): every head_dim bucket (32, 64, 128, 256), more than
# one 64-query block and key tile, GQA, causal with S_q < and > S_k (queries that see no key).
EMULATE_CASES = [*INTERPRET_CASES, (1, 70, 70, 2, 2, 64, True), (2, 65, 130, 2, 1, 128, False),
                 (1, 33, 20, 1, 1, 256, True), (1, 20, 20, 2, 2, 96, False), (1, 80, 40, 4, 1, 32, True)]


@pytest.mark.emulate
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("case", EMULATE_CASES, ids=str)
def test_emulated_cuda_attention_matches_reference(dtype, case):
    """The CUDA forward (out, lse) on the emulator; its backward and received sums are Triton's, so here the
    reference's (TRITON_INTERPRET is not set in this tier)."""
    check_attention_backend("cuda", torch.device("cpu"), dtype, case)


@pytest.mark.emulate
def test_emulated_cuda_backward_without_triton_says_it_runs_the_reference(caplog):
    """The CUDA backend's backward is Triton's; where Triton cannot run (here: no GPU, no interpreter) the
    reference runs it, and a warning says so, once."""
    from zigspark.ops import attention as attention_op

    attention_op._warned_cuda_without_triton.clear()
    q, k, v = (torch.randn(1, 9, 2, 16, requires_grad=True) for _ in range(3))
    with caplog.at_level("WARNING", logger="zigspark"):
        for _ in range(2):
            zigspark.flash_attention(q, k, v, backend="cuda").sum().backward()
    warnings = [r.getMessage() for r in caplog.records if "has no kernel for the backward" in r.getMessage()]
    assert len(warnings) == 1 and "runs the PyTorch reference" in warnings[0], warnings


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_attention_batch_heads_over_the_grid_limit(backend):
    """batch·heads = 65600 programs on the grid's second axis, over CUDA's 65535: the Triton kernels launch
    per slice of the batch (the CUDA forward's grid is 1-D)."""
    check_attention_backend(backend, torch.device("cuda"), torch.float16, (4100, 9, 9, 16, 16, 16, True))


@pytest.mark.gpu
@pytest.mark.xdist_group("gpu-memory")  # ~60 GB each: one at a time (make gpu-check runs --dist loadgroup)
@pytest.mark.parametrize("long_side", ["queries", "keys"])
def test_gpu_attention_rows_past_2_31_within_a_head(long_side):
    """One sample whose q (or k and v) holds more than 2³¹ elements: 2²⁰ + 300 rows at H·D = 2048, so the
    row offsets inside a head pass int32 in the last tiles (the Triton kernels' WIDE path; the CUDA forward
    keeps every offset in int64, and the device minutes are few). The other side is short, so the reference
    fits; it runs in float32, since a float64 copy of a long tensor alone takes 17 GB."""
    backend = "triton"
    heads, head_dim = 64, 32
    long = (1 << 31) // (heads * head_dim) + 300
    sq, sk = (long, 8) if long_side == "queries" else (4, long)
    check_attention_backend(backend, torch.device("cuda"), torch.float16, (1, sq, sk, heads, heads, head_dim, False),
                            exact=torch.float32)
    torch.cuda.empty_cache()


GPU_CASES = [(2, 1, 1, 4, 4, 64, False), (2, 17, 17, 4, 2, 40, True), (1, 128, 128, 8, 1, 128, True),
             (2, 1000, 1000, 4, 4, 64, False), (1, 1000, 777, 8, 8, 256, True), (1, 300, 1000, 8, 2, 16, True),
             (1, 512, 512, 4, 4, 96, False), (1, 300, 1000, 8, 2, 64, False)]


@pytest.mark.gpu
def test_gpu_auto_takes_the_reference_over_head_dim_256():
    q = torch.randn(1, 64, 2, 272, device="cuda", dtype=torch.float16)
    ours = zigspark.flash_attention(q, q, q)
    torch.testing.assert_close(ours, zigspark.flash_attention(q, q, q, backend="reference"))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
def test_gpu_attention_matches_reference(backend, dtype, case):
    check_attention_backend(backend, torch.device("cuda"), dtype, case)


@pytest.mark.gpu
def test_gpu_attention_tuned_tiles(monkeypatch):
    """With tuning on (as outside the test tiers), each Triton kernel times its candidates once per shape
    bucket, and what it picks still gives the reference's results."""
    from zigspark.triton_kernels import _tune

    monkeypatch.setenv(_tune.ENV, "1")
    monkeypatch.setattr(_tune, "_best", {})
    check_attention_backend("triton", torch.device("cuda"), torch.bfloat16, (2, 1000, 1000, 4, 2, 64, True))
    picked = {key.split()[0] for key in _tune.chosen()}
    assert picked == {"attention.fwd", "attention.dq", "attention.dkdv", "attention.received"}, _tune.chosen()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_attention_against_sdpa(backend):
    q, k, v = (torch.randn(2, 1024, 8, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    ours = zigspark.flash_attention(q, k, v, causal=True, backend=backend)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                            is_causal=True).transpose(1, 2)
    assert (ours.float() - sdpa.float()).abs().max().item() < 2e-2
    assert math.isfinite(ours.float().sum().item())
