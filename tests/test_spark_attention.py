"""zigspark.spark_attention: the custom-op reference against a naive per-query oracle (forward, closed-form
backward, gradcheck, opcheck, bad inputs) in the cpu tier; the Triton kernels by the numerics rule in the
interpret tier (tiny shapes) and the gpu tier (real sizes), including the skip of key tiles nobody keeps.

The mask keep = s1 > θ is discontinuous, so a precision rule needs care at ties: where the kernel and the
reference in the same dtype disagree on a query's kept count (a score within rounding of θ, computed in a
different order), that query's row is left out of the output comparison and its dO is zeroed for the
gradients (every gradient term of query i is proportional to dO_i), and the number of such rows is bounded.
"""

import math
import statistics

import pytest
import torch
import torch.nn.functional as F

import zigspark
from zigspark.nn import SparkAttention
from zigspark.reference import spark_attention as ref_attn

from numerics import assert_by_rule, max_abs_err

cpu = pytest.mark.cpu


def naive_spark_attention(q, k, v, top_k, r, causal, scales=None, std_correction=0.0, renormalize_gate=False):
    """Oracle of the oracle: one query at a time, float64, straight from the formula. Differentiable.
    -> (out, lse, θ, kept)."""
    batch, seqlen_q, heads, head_dim = q.shape
    seqlen_k = k.shape[1]
    rows = []
    lse = torch.full((batch, heads, seqlen_q), -math.inf, dtype=torch.float64)
    theta = torch.full((batch, heads, seqlen_q), -math.inf, dtype=torch.float64)
    kept = torch.zeros(batch, heads, seqlen_q, dtype=torch.long)
    for b in range(batch):
        for h in range(heads):
            for i in range(seqlen_q):
                n = min(max(i + seqlen_k - seqlen_q + 1, 0), seqlen_k) if causal else seqlen_k
                if n == 0:
                    rows.append(torch.zeros(head_dim, dtype=torch.float64))
                    continue
                qi, ks, vs = q[b, i, h].double(), k[b, :n, h].double(), v[b, :n, h].double()
                a, c = scales or (1 / math.sqrt(r), 1 / math.sqrt(head_dim - r))
                s1 = ks[:, :r] @ qi[:r] * a
                s2 = ks[:, r:] @ qi[r:] * c
                if n > top_k:
                    std = ((s1 - s1.mean()).square().sum() / (n - std_correction)).sqrt()
                    th = s1.mean() + std * statistics.NormalDist().inv_cdf(1 - top_k / n)
                    keep = s1 > th
                    theta[b, h, i] = th.detach()
                else:
                    keep = torch.ones(n, dtype=torch.bool)
                w = torch.softmax(s1.masked_fill(~keep, -math.inf), 0) * F.softplus(s2)
                if renormalize_gate:
                    w = w / w.sum()
                    lse[b, h, i] = torch.logsumexp((s1 + F.softplus(s2).log())[keep], 0).detach()
                else:
                    lse[b, h, i] = torch.logsumexp(s1[keep], 0).detach()
                rows.append(w @ vs)
                kept[b, h, i] = keep.sum()
    out = torch.stack(rows).reshape(batch, heads, seqlen_q, head_dim).transpose(1, 2)
    return out, lse, theta, kept


def finite(t):
    return t.masked_fill(torch.isinf(t), 0.0)


def fwd_op(q, k, v, top_k, r, causal, backend, chunk=1024, std_correction=0.0, renormalize_gate=False):
    scales = ref_attn.default_scales(q.shape[-1], r)
    return torch.ops.zigspark.spark_attention_fwd(q, k, v, top_k, r, *scales, std_correction, renormalize_gate,
                                                  causal, chunk, backend)


OPTIONS = [dict(), dict(std_correction=1.0), dict(renormalize_gate=True), dict(std_correction=0.5,
                                                                              renormalize_gate=True)]


CPU_CASES = [  # batch, seqlen_q, seqlen_k, heads, head_dim, r, top_k, causal
    (1, 13, 13, 2, 16, 4, 3, False),
    (2, 9, 20, 2, 12, 5, 4, True),       # seqlen_q < seqlen_k, odd r
    (1, 20, 9, 2, 16, 4, 2, True),       # seqlen_q > seqlen_k: the first queries see no key
    (1, 1, 7, 1, 8, 1, 2, False),        # one query, r = 1
    (1, 11, 11, 1, 16, 15, 30, True),    # top_k above every n_i: dense; r = D − 1
]


def inputs(case, dtype=torch.float64, seed=0, requires_grad=False):
    b, sq, sk, h, d = case[:5]
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, s, h, d, generator=g, dtype=torch.float64).to(dtype).requires_grad_(requires_grad)
            for s in (sq, sk, sk)]


@cpu
@pytest.mark.parametrize("options", OPTIONS, ids=str)
@pytest.mark.parametrize("case", CPU_CASES, ids=str)
def test_reference_op_matches_naive(case, options):
    *_, r, top_k, causal = case
    q, k, v = inputs(case)
    out, lse, theta, kept = fwd_op(q, k, v, top_k, r, causal, "reference", chunk=4, **options)
    n_out, n_lse, n_theta, n_kept = naive_spark_attention(q, k, v, top_k, r, causal, **options)
    assert max_abs_err(out, n_out) < 1e-12
    assert torch.equal(kept, n_kept)
    for name, a, e in (("lse", lse, n_lse), ("theta", theta, n_theta)):
        assert torch.equal(torch.isinf(a), torch.isinf(e)), f"{name}: −∞ pattern differs"
        assert max_abs_err(finite(a), finite(e)) < 1e-12, name
    public, public_kept = zigspark.spark_attention(q, k, v, top_k, r, causal=causal, chunk=4, return_kept=True,
                                                   **options)
    assert torch.equal(public, out) and torch.equal(public_kept, kept)


@cpu
@pytest.mark.parametrize("options", OPTIONS, ids=str)
@pytest.mark.parametrize("case", CPU_CASES, ids=str)
def test_reference_backward_matches_autograd_of_naive(case, options):
    *_, r, top_k, causal = case
    q, k, v = inputs(case, requires_grad=True)
    out = zigspark.spark_attention(q, k, v, top_k, r, causal=causal, chunk=4, backend="reference", **options)
    g = torch.randn_like(out)
    closed = torch.autograd.grad(out, (q, k, v), g)
    auto = torch.autograd.grad(naive_spark_attention(q, k, v, top_k, r, causal, **options)[0], (q, k, v), g)
    for name, c, a in zip("qkv", closed, auto):
        assert max_abs_err(c, a) < 1e-10, f"d{name}"


@cpu
@pytest.mark.parametrize("renormalize_gate", [False, True])
@pytest.mark.parametrize("causal", [True, False])
def test_gradcheck_float64(causal, renormalize_gate):
    q, k, v = inputs((1, 6, 7, 2, 8), requires_grad=True, seed=3)
    assert torch.autograd.gradcheck(
        lambda *t: zigspark.spark_attention(*t, top_k=2, predictor_dim=3, causal=causal, chunk=4,
                                            renormalize_gate=renormalize_gate), (q, k, v))


@cpu
def test_options_change_what_they_should():
    """std_correction = 1 scales σ·z by √(n/(n − 1)): where z > 0 (n > 2·top_k) θ rises, so fewer keys are
    kept, never more; a renormalised gate gives weights summing to 1 (v = 1 returns 1 wherever a key is
    kept), also when every gate underflows."""
    q, k, v = inputs((1, 30, 30, 2, 16), seed=7)
    _, kept = zigspark.spark_attention(q, k, v, 6, 4, causal=True, return_kept=True)
    _, sample_kept = zigspark.spark_attention(q, k, v, 6, 4, causal=True, std_correction=1, return_kept=True)
    above, below = sample_kept[..., 12:], kept[..., 12:]          # query i sees i + 1 > 12 keys
    assert (above <= below).all() and (above < below).any()
    ones = torch.ones_like(v)
    assert max_abs_err(zigspark.spark_attention(q, k, ones, 6, 4, renormalize_gate=True), ones) < 1e-12
    assert max_abs_err(zigspark.spark_attention(q, k, ones, 6, 4), ones) > 0.1      # the default's sums ≠ 1
    # gates far below softplus's underflow: log g = s2 there, so W = softmax(s1 + s2) over the kept keys
    q2, cold, s2 = underflowing_gates(q, k)
    out, kept = zigspark.spark_attention(q2, cold, v, 6, 4, causal=False, renormalize_gate=True, return_kept=True)
    n_out = naive_spark_attention(q2, cold, v, 6, 4, False)[0]       # the default, whose weights all underflow
    assert n_out.abs().max() < 1e-30
    s1 = torch.einsum("bihd,bjhd->bhij", q2[..., :4], cold[..., :4]) / 2
    theta = fwd_op(q2, cold, v, 6, 4, False, "reference")[2]
    keep = s1 > theta[..., None]
    w = torch.softmax((s1 + s2).masked_fill(~keep, -math.inf), -1)
    assert max_abs_err(out, (w @ v.transpose(1, 2)).transpose(1, 2)) < 1e-10
    without_gate = torch.softmax(s1.masked_fill(~keep, -math.inf), -1)   # what a gate lost to 0/0 would give
    assert max_abs_err(out, (without_gate @ v.transpose(1, 2)).transpose(1, 2)) > 0.05
    assert torch.equal(kept, keep.sum(-1))


def underflowing_gates(q, k, r=4, seed=0):
    """q, k whose gate scores s2_ij = −(100 + 3·u_j), u_j uniform per key: every softplus(s2) below float32's
    normal range, yet the gates differ by up to e³ between keys. -> (q, k, s2 (B, H, S_q, S_k))."""
    g = torch.Generator().manual_seed(seed)
    head_dim = q.shape[-1]
    q2, k2 = q.clone(), k.clone()
    q2[..., r:] = 0.0
    q2[..., r] = 1.0
    k2[..., r:] = 0.0
    u = torch.rand(k.shape[1], generator=g, dtype=torch.float64).to(k.dtype)
    k2[..., r] = -(100 + 3 * u)[None, :, None] * math.sqrt(head_dim - r)
    s2 = -(100 + 3 * u).expand(q.shape[0], q.shape[2], q.shape[1], -1)
    return q2, k2, s2


@cpu
def test_tied_scores_keep_every_key():
    """Identical keys: the mean of equal scores rounds, leaving a rounding-level σ; it counts as σ = 0, so
    every visible key is kept (not none, and not an arbitrary few)."""
    for dtype in (torch.float64, torch.float32):
        q, k, v = inputs((1, 9, 333, 2, 16), dtype=dtype, seed=12)
        k[:] = k[:, :1]                                          # one key, repeated
        _, kept = zigspark.spark_attention(q, k, v, 7, 4, causal=False, return_kept=True)
        assert (kept == 333).all(), (dtype, kept)


@cpu
def test_opcheck_and_compile():
    q, k, v = inputs((1, 5, 6, 2, 8), dtype=torch.float32, seed=1)
    for correction, renorm in ((0.0, False), (1.0, True)):
        args = (q, k, v, 2, 3, 0.5, 0.4, correction, renorm, True, 4, "reference")
        torch.library.opcheck(torch.ops.zigspark.spark_attention_fwd.default, args)
        out, lse, theta, _ = torch.ops.zigspark.spark_attention_fwd(*args)
        torch.library.opcheck(torch.ops.zigspark.spark_attention_bwd.default,
                              (torch.randn_like(out), q, k, v, out, lse, theta, 3, 0.5, 0.4, renorm, True, 4,
                               "reference"))
    fn = lambda t: zigspark.spark_attention(t, t, t, top_k=3, causal=True)  # noqa: E731
    x = torch.randn(1, 9, 2, 16)
    torch.testing.assert_close(torch.compile(fn, fullgraph=True, backend="aot_eager")(x), fn(x))


@cpu
@pytest.mark.parametrize("causal", [True, False])
def test_top_k_at_least_seqlen_is_dense(causal):
    q, k, v = inputs((1, 10, 12, 2, 16), seed=2)
    out, kept = zigspark.spark_attention(q, k, v, top_k=12, predictor_dim=4, causal=causal, return_kept=True)
    n = torch.arange(10) + 3 if causal else torch.full((10,), 12)
    assert torch.equal(kept, n.expand(1, 2, 10))  # every visible key kept
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
    s1 = qh[..., :4] @ kh[..., :4].transpose(-1, -2) / 2
    s2 = qh[..., 4:] @ kh[..., 4:].transpose(-1, -2) / math.sqrt(12)
    if causal:
        s1 = s1.masked_fill(torch.ones(10, 12, dtype=torch.bool).triu(3), -math.inf)
    dense = (torch.softmax(s1, -1) * F.softplus(s2)) @ vh
    assert max_abs_err(out, dense.transpose(1, 2)) < 1e-12


def check_equal_scores_keep_every_key(device, backend):
    """Queries whose predictor part is zero score every key alike (σ = 0): they keep every visible key, as if
    top_k covered them all, rather than none (s1 > θ = mean would fail for every key)."""
    q, k, v = (t.to(device) for t in inputs((1, 20, 20, 2, 16), dtype=torch.float32, seed=4))
    q[:, ::3, :, :4] = 0.0                                   # queries 0, 3, 6, …: all their s1 are 0
    out, kept = zigspark.spark_attention(q, k, v, top_k=4, predictor_dim=4, causal=True, return_kept=True,
                                         backend=backend)
    tied = torch.arange(0, 20, 3)
    assert torch.equal(kept[0, :, tied].cpu(), (tied + 1).expand(2, -1)), kept[0, :, tied]
    assert (kept[0, :, 1::3] < torch.arange(1, 20, 3) + 1).any(), "the other queries should be sparse"
    return out


@cpu
def test_equal_scores_keep_every_key():
    check_equal_scores_keep_every_key(torch.device("cpu"), "reference")


@pytest.mark.interpret
@pytest.mark.parametrize("split", [False, True])
def test_triton_tied_scores_keep_every_key(triton_device, monkeypatch, split):
    from zigspark.triton_kernels import spark_attention as kernels

    monkeypatch.setattr(kernels, "MIN_KEYS_PER_SPLIT", 16 if split else 10**9)
    q, k, v = (t.to(triton_device) for t in inputs((1, 9, 333, 2, 16), dtype=torch.float32, seed=12))
    k[:] = k[:, :1]                       # 333: a ragged last tile, whose mean leaves a rounding-level M2
    _, kept = zigspark.spark_attention(q, k, v, 7, 4, causal=False, return_kept=True, backend="triton")
    assert (kept == 333).all(), kept


@pytest.mark.interpret
def test_triton_equal_scores_keep_every_key(triton_device):
    ours = check_equal_scores_keep_every_key(triton_device, "triton")
    ref = check_equal_scores_keep_every_key(triton_device, "reference")
    assert max_abs_err(ours, ref) < 1e-5


@cpu
@pytest.mark.parametrize("causal", [True, False])
def test_custom_scales_match_naive(causal):
    """predictor_scale and gate_scale replace 1/√r and 1/√(D − r) in the forward and the closed-form backward;
    the kept keys do not depend on predictor_scale (θ scales with the scores)."""
    q, k, v = inputs((1, 12, 14, 2, 16), requires_grad=True, seed=5)
    out, kept = zigspark.spark_attention(q, k, v, top_k=4, predictor_dim=4, causal=causal, predictor_scale=0.9,
                                         gate_scale=0.3, chunk=5, return_kept=True)
    n_out, _, _, n_kept = naive_spark_attention(q, k, v, 4, 4, causal, scales=(0.9, 0.3))
    assert max_abs_err(out, n_out) < 1e-12 and torch.equal(kept, n_kept)
    _, default_kept = zigspark.spark_attention(q, k, v, top_k=4, predictor_dim=4, causal=causal, return_kept=True)
    assert torch.equal(kept, default_kept)
    g = torch.randn_like(out)
    for name, a, e in zip("qkv", torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(n_out, (q, k, v), g)):
        assert max_abs_err(a, e) < 1e-10, f"d{name}"
    layer = SparkAttention(32, 2, 16, top_k=4, predictor_scale=0.9, gate_scale=0.3).double()
    x = torch.randn(1, 12, 32, dtype=torch.float64)
    qkv = layer.qkv(x).reshape(1, 12, 3, 2, 16).unbind(2)
    expected = zigspark.spark_attention(*qkv, 4, 4, causal=True, predictor_scale=0.9, gate_scale=0.3)
    torch.testing.assert_close(layer(x), layer.out(expected.reshape(1, 12, 32)))
    for bad in (0.0, -1.0, float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="predictor_scale must be a finite number > 0"):
            zigspark.spark_attention(q, k, v, 4, 4, predictor_scale=bad)
        with pytest.raises(ValueError, match="gate_scale must be a finite number > 0"):
            zigspark.spark_attention(q, k, v, 4, 4, gate_scale=bad)


@cpu
def test_layer_checks_its_arguments_when_built():
    with pytest.raises(ValueError, match="predictor_dim r = 16 must satisfy"):
        SparkAttention(32, 2, 16, predictor_dim=16)
    with pytest.raises(ValueError, match="top_k must be a positive int"):
        SparkAttention(32, 2, 16, top_k=0)
    with pytest.raises(ValueError, match=r"SparkAttention: std_correction must be a number in \[0, 1\]"):
        SparkAttention(32, 2, 16, std_correction=2)
    with pytest.raises(TypeError, match="SparkAttention: renormalize_gate must be a bool"):
        SparkAttention(32, 2, 16, renormalize_gate="yes")
    layer = SparkAttention(32, 2, 16, top_k=3, std_correction=1, renormalize_gate=True).double()
    x = torch.randn(1, 9, 32, dtype=torch.float64)
    qkv = layer.qkv(x).reshape(1, 9, 3, 2, 16).unbind(2)
    expected = zigspark.spark_attention(*qkv, 3, 4, causal=True, std_correction=1, renormalize_gate=True)
    torch.testing.assert_close(layer(x), layer.out(expected.reshape(1, 9, 32)))


@cpu
def test_bad_inputs():
    q = torch.randn(2, 5, 2, 16)
    cases = [
        (dict(predictor_dim=16), ValueError, r"predictor_dim r = 16 must satisfy 0 < r < head_dim = 16"),
        (dict(predictor_dim=0), ValueError, r"predictor_dim r = 0"),
        (dict(predictor_dim=2.5), ValueError, r"predictor_dim r = 2.5"),
        (dict(top_k=0), ValueError, "top_k must be a positive int, got 0"),
        (dict(top_k=-3), ValueError, "top_k must be a positive int"),
        (dict(top_k=True), ValueError, "top_k must be a positive int"),
        (dict(k=q[:, :, :1]), ValueError, "must agree in batch, heads and head_dim"),
        (dict(k=q[..., :8], v=q[..., :8]), ValueError, "must agree"),
        (dict(v=q[:, :4]), ValueError, "must agree"),
        (dict(k=q[:1], v=q[:1]), ValueError, "must agree"),
        (dict(q=q[0]), ValueError, r"q must be \(batch, seqlen, heads, head_dim\)"),
        (dict(v=q.double()), TypeError, "share one dtype"),
        (dict(q=q.long()), TypeError, "q must have a floating dtype"),
        (dict(q=q[:, :0]), ValueError, "empty attention"),
        (dict(chunk=0), ValueError, "chunk must be >= 1"),
        (dict(std_correction=-0.1), ValueError, r"std_correction must be a number in \[0, 1\]"),
        (dict(std_correction=1.5), ValueError, "std_correction"), (dict(std_correction=float("nan")), ValueError,
                                                                    "std_correction"),
        (dict(std_correction="1"), ValueError, "std_correction"),
        (dict(renormalize_gate=1), TypeError, "renormalize_gate must be a bool"),
        (dict(backend="fast"), ValueError, "backend must be one of"),
    ]
    for override, exc, match in cases:
        args = {"q": q, "k": q, "v": q, "top_k": 4, **override}
        with pytest.raises(exc, match=match):
            zigspark.spark_attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)
    if not zigspark.backends.triton_interpreting():
        with pytest.raises(zigspark.BackendUnavailableError, match="backend='triton' cannot run here"):
            zigspark.spark_attention(q, q, q, 4, backend="triton")
    with pytest.raises(zigspark.BackendUnavailableError, match="no cuda backend"):
        zigspark.spark_attention(q, q, q, 4, backend="cuda")


# ---- kernels ---------------------------------------------------------------------------------------------

def tie_rows_allowed(rows: int) -> int:
    """A handful of queries may keep one key more or fewer than the reference in the same dtype: those whose
    θ lands within rounding of a score (the kernel sums s1 and θ in another order than PyTorch)."""
    return 2 + rows // 1000


def check_spark_backend(device, dtype, case, rel_floor=0.0, **options):
    """Kernel vs the reference in float64 by the numerics rule: out, θ, lse, dq, dk, dv; kept counts vs the
    reference run from the same low-precision inputs. options: std_correction, renormalize_gate."""
    b, sq, sk, h, d, r, top_k, causal = case
    torch.manual_seed(sq * 131 + sk * 7 + d)
    q64, k64, v64, g64 = (torch.randn(b, s, h, d, dtype=torch.float64, device=device) for s in (sq, sk, sk, sq))

    def forward(dt, backend):
        leaves = [t.to(dt).requires_grad_(True) for t in (q64, k64, v64)]
        return leaves, fwd_op(*leaves, top_k, r, causal, backend, **options)

    kernel, ref64, reflow = forward(dtype, "triton"), forward(torch.float64, "reference"), forward(dtype, "reference")
    k_kept, lo_kept = kernel[1][3], reflow[1][3]
    tie = k_kept != lo_kept                                                          # (B, H, S_q)
    assert tie.sum().item() <= tie_rows_allowed(tie.numel()), \
        f"kept counts differ from the {dtype} reference in {tie.sum().item()} of {tie.numel()} queries"
    assert ((k_kept - lo_kept).abs() <= 1).all(), "a kept count differs by more than one key"
    assert torch.equal(torch.isinf(kernel[1][1]), torch.isinf(ref64[1][1])), "queries without keys differ"
    keep_row = ~tie.transpose(1, 2)[..., None]                                       # (B, S_q, H, 1)
    dout = g64 * keep_row
    results = []
    for leaves, (out, lse, theta, _) in (kernel, ref64, reflow):
        grads = torch.autograd.grad(out, leaves, dout.to(out.dtype))
        results.append([(out * keep_row).detach(), finite(lse.masked_fill(tie, 0.0)), finite(theta), *grads])
    for name, a, r64, rlo in zip(["out", "lse", "theta", "dq", "dk", "dv"], *results):
        assert_by_rule(a, r64, rlo, factor=3 if name.startswith("d") else 2, what=f"triton {name}",
                       rel_floor=rel_floor)
    return tie.sum().item()


@pytest.fixture
def small_tiles(monkeypatch):
    """16×16 tiles in every pass, so that tiny interpreter shapes still loop over several key and query
    blocks (the online softmax, Chan's merge, the causal bounds of each pass)."""
    from zigspark.triton_kernels import spark_attention as kernels

    monkeypatch.setattr(kernels, "_TILES", {key: {phase: (16, 16, 4) for phase in phases}
                                            for key, phases in kernels._TILES.items()})


INTERPRET_CASES = [  # batch, seqlen_q, seqlen_k, heads, head_dim, r, top_k, causal
    (1, 17, 17, 2, 16, 4, 5, False),
    (1, 9, 23, 2, 40, 10, 4, True),      # seqlen_q < seqlen_k; D = 40, r = 10: both parts padded
    (1, 23, 9, 2, 16, 3, 3, True),       # seqlen_q > seqlen_k: queries without keys
    (1, 1, 7, 2, 16, 4, 2, False),       # one query
    (1, 1, 1, 1, 16, 5, 1, True),        # seqlen 1
    (2, 40, 40, 1, 40, 10, 6, True),
    (1, 40, 33, 1, 16, 1, 50, False),    # top_k above the seqlen: dense; r = 1
    (1, 33, 40, 1, 40, 39, 8, False),    # r = D − 1
]


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("case", INTERPRET_CASES, ids=str)
def test_triton_matches_reference(triton_device, dtype, case):
    check_spark_backend(triton_device, dtype, case)


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("case", [INTERPRET_CASES[i] for i in (0, 1, 2, 5)], ids=str)
def test_triton_matches_reference_small_tiles(triton_device, small_tiles, dtype, case):
    check_spark_backend(triton_device, dtype, case)


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("case", [INTERPRET_CASES[i] for i in (0, 1, 2, 5)], ids=str)
def test_triton_renormalized_gate_and_sample_std(triton_device, small_tiles, dtype, case):
    check_spark_backend(triton_device, dtype, case, std_correction=1.0, renormalize_gate=True)


@pytest.mark.interpret
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # sigmoid/g where g = 0, unselected
def test_triton_renormalized_gate_underflow(triton_device):
    """Every gate below softplus's underflow, differing per key: the kernels' log g = s2 gives
    W = softmax(s1 + s2), finite, as the reference does."""
    q, k, v = inputs((1, 20, 20, 2, 16), dtype=torch.float32, seed=8)
    q, k, _ = underflowing_gates(q, k)
    q, k, v = (t.to(triton_device) for t in (q, k, v))
    leaves = [t.requires_grad_(True) for t in (q, k, v)]
    results = []
    for backend in ("triton", "reference"):
        out = zigspark.spark_attention(*leaves, 5, 4, causal=True, renormalize_gate=True, backend=backend)
        results.append((out, torch.autograd.grad(out, leaves, torch.ones_like(out))))
    (out, grads), (r_out, r_grads) = results
    assert torch.isfinite(out).all() and r_out.abs().max() > 0.01
    assert max_abs_err(out, r_out) < 1e-4
    for a, e in zip(grads, r_grads):
        assert torch.isfinite(a).all() and max_abs_err(a, e) < 1e-3 * max(1.0, e.abs().max().item())


DECODE_CASES = [  # batch, seqlen_q, seqlen_k, heads, head_dim, r, top_k, causal
    (1, 1, 300, 2, 16, 4, 8, False),     # one query, many chunks
    (2, 3, 200, 2, 40, 10, 6, True),     # causal: the queries see different key counts; padded parts
    (1, 16, 130, 1, 16, 3, 4, True),     # a full block of queries; the last chunk short
    (1, 5, 70, 2, 16, 4, 80, False),     # top_k above seqlen_k: dense
]


@pytest.fixture
def split_decode(monkeypatch):
    """Chunks of at least 16 keys, so that interpreter-sized decode shapes take the split-key kernels."""
    from zigspark.triton_kernels import spark_attention as kernels

    monkeypatch.setattr(kernels, "MIN_KEYS_PER_SPLIT", 16)
    return kernels


def decode_splits(kernels, case, dtype, device):
    b, sq, sk, h, d, r, *_ = case
    cfg = kernels._config(d, r, sq, sk, dtype == torch.float32, "decode")
    return kernels.split_keys(b, h, sq, sk, cfg, device)[1]


@pytest.mark.interpret
@pytest.mark.parametrize("options", [dict(), dict(std_correction=1.0, renormalize_gate=True)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("case", DECODE_CASES, ids=str)
def test_triton_split_key_decode_matches_reference(triton_device, split_decode, dtype, case, options):
    """The split-key forward (θ from merged chunk moments, partial softmaxes merged) against the reference;
    the backward then runs the usual kernels on the θ and lse it wrote."""
    assert decode_splits(split_decode, case, dtype, triton_device) > 1, "construction: the case must split"
    check_spark_backend(triton_device, dtype, case, **options)


@pytest.mark.interpret
def test_triton_split_key_decode_in_batch_slices_and_wide_rows(triton_device, split_decode, small_grid, wide_rows):
    """The split-key kernels launched per slice of the batch (grid limit) and with int64 row addressing."""
    case = (3, 2, 150, 2, 16, 4, 5, True)
    assert decode_splits(split_decode, case, torch.float16, triton_device) > 1
    check_spark_backend(triton_device, torch.float16, case, renormalize_gate=True)


@pytest.mark.interpret
@pytest.mark.parametrize("split", [False, True])
def test_triton_reads_only_kept_rows(triton_device, monkeypatch, split):
    """Within a tile that some query keeps, only the kept keys' K[r:] and V rows are read: poisoning every
    other key's with NaN changes nothing (at decode, where one query keeps top_k of many keys, that is
    the selection itself)."""
    from zigspark.triton_kernels import spark_attention as kernels

    monkeypatch.setattr(kernels, "MIN_KEYS_PER_SPLIT", 16 if split else 10**9)
    causal = False
    q, k, v = (t.float().to(triton_device) for t in inputs((1, 2, 200, 2, 16), seed=9))
    out, _, theta, kept = fwd_op(q, k, v, 6, 4, causal, "triton")
    s1 = torch.einsum("bihd,bjhd->bhij", q[..., :4], k[..., :4]) / 2
    used = (s1 > theta[..., None]).any(dim=2)                       # (B, H, S_k): kept by some query
    assert (~used).sum() > 100, "construction: most keys should be unselected"
    poisoned_k, poisoned_v = k.clone(), v.clone()
    poisoned_k[..., 4:].masked_fill_(~used.transpose(1, 2)[..., None], float("nan"))
    poisoned_v.masked_fill_(~used.transpose(1, 2)[..., None], float("nan"))
    again, _, _, again_kept = fwd_op(q, poisoned_k, poisoned_v, 6, 4, causal, "triton")
    assert torch.equal(again, out) and torch.equal(again_kept, kept)
    assert max_abs_err(out, fwd_op(q, k, v, 6, 4, causal, "reference")[0]) < 1e-5


@pytest.mark.interpret
def test_triton_in_batch_slices(triton_device, small_grid):
    """batch·heads over the grid limit: the kernels run once per slice of the batch, results unchanged."""
    check_spark_backend(triton_device, torch.float16, (3, 17, 17, 2, 16, 4, 5, True))


@pytest.mark.interpret
def test_triton_custom_scales(triton_device):
    """The kernels take predictor_scale and gate_scale as the reference does, forward and backward."""
    q, k, v = (t.to(triton_device).float().requires_grad_(True) for t in inputs((1, 20, 24, 2, 32), seed=6))
    results = []
    for backend in ("triton", "reference"):
        out, kept = zigspark.spark_attention(q, k, v, 5, 8, causal=True, predictor_scale=0.7, gate_scale=0.2,
                                             return_kept=True, backend=backend)
        results.append((out, kept, torch.autograd.grad(out, (q, k, v), torch.ones_like(out))))
    (out, kept, grads), (r_out, r_kept, r_grads) = results
    assert torch.equal(kept, r_kept)
    assert max_abs_err(out, r_out) < 1e-5
    for a, e in zip(grads, r_grads):
        assert max_abs_err(a, e) < 1e-4


@pytest.mark.interpret
def test_triton_wide_rows(triton_device, wide_rows, small_tiles):
    """The int64 row addressing of samples with 2³¹ elements or more gives the reference's results (16-row
    tiles, so that blocks start past row 0)."""
    check_spark_backend(triton_device, torch.float16, (2, 17, 17, 2, 16, 4, 5, True))


@pytest.mark.gpu
def test_gpu_batch_heads_over_the_grid_limit():
    """batch·heads = 65600 programs on the grid's second axis, over CUDA's 65535: launched per batch slice."""
    check_spark_backend(torch.device("cuda"), torch.float16, (4100, 17, 17, 16, 16, 4, 5, True))


def cold_block_inputs(device, seqlen, cold, r, head_dim=16, heads=2):
    """Inputs in which no query keeps any key of `cold` (a range of whole key tiles): all q[:, :, :, 0] are
    large and positive, those keys' k[..., 0] large and negative, so their s1 lies far below every θ."""
    torch.manual_seed(11)
    q, k, v = (torch.randn(1, seqlen, heads, head_dim, dtype=torch.float64, device=device) for _ in range(3))
    q[..., 0] = 3.0 + 0.1 * q[..., 0]
    k[:, cold, :, 0] = -3.0 + 0.1 * k[:, cold, :, 0]
    return q, k, v


def check_cold_tiles_skipped(device, dtype, seqlen, cold, r, top_k, causal):
    """Poison K[r:] and V of the cold keys with NaN: a kernel that read them for a tile nobody keeps would
    produce NaN (0·NaN = NaN). The result must equal the clean run bit for bit, and the reference."""
    q64, k64, v64 = cold_block_inputs(device, seqlen, cold, r)
    _, _, theta, _ = fwd_op(q64, k64, v64, top_k, r, causal, "reference")
    s1 = torch.einsum("bihd,bjhd->bhij", q64[..., :r], k64[..., :r]) / math.sqrt(r)
    visible = torch.ones(seqlen, seqlen, dtype=torch.bool, device=device)
    if causal:
        visible = visible.tril()
    below = (s1 < theta[..., None]) | ~visible
    assert below[..., cold].all(), "construction: some query would keep a cold key"
    poisoned_k, poisoned_v = k64.clone(), v64.clone()
    poisoned_k[:, cold, :, r:] = float("nan")
    poisoned_v[:, cold] = float("nan")
    g = torch.randn_like(q64)

    def run(k, v):
        leaves = [t.to(dtype).requires_grad_(True) for t in (q64, k, v)]
        out, kept = zigspark.spark_attention(*leaves, top_k, r, causal=causal, return_kept=True, backend="triton")
        return [out, kept, *torch.autograd.grad(out, leaves, g.to(dtype))]

    clean, poisoned = run(k64, v64), run(poisoned_k, poisoned_v)
    for name, a, c in zip(["out", "kept", "dq", "dk", "dv"], poisoned, clean):
        assert torch.equal(a, c), f"{name} changed when skipped tiles were poisoned"
    assert (clean[3][:, cold] == 0).all() and (clean[4][:, cold] == 0).all(), "cold keys got a gradient"
    ref = zigspark.spark_attention(q64, k64, v64, top_k, r, causal=causal, backend="reference")
    assert_by_rule(clean[0], ref, zigspark.spark_attention(q64.to(dtype), k64.to(dtype), v64.to(dtype), top_k, r,
                                                           causal=causal, backend="reference"), what="out")


@pytest.mark.interpret
@pytest.mark.parametrize("causal", [True, False])
def test_triton_skips_tiles_nobody_keeps(triton_device, small_tiles, causal):
    check_cold_tiles_skipped(triton_device, torch.float32, 48, slice(16, 32), 4, 4, causal)


@pytest.mark.interpret
def test_triton_module_and_head_dim_limit(triton_device):
    torch.manual_seed(5)
    layer = SparkAttention(32, heads=2, head_dim=16, top_k=4, backend="triton").to(triton_device)
    twin = SparkAttention(32, heads=2, head_dim=16, top_k=4, backend="reference").to(triton_device)
    twin.load_state_dict(layer.state_dict())
    x = torch.randn(2, 12, 32, device=triton_device, requires_grad=True)
    y, y_ref = layer(x), twin(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    (gx,) = torch.autograd.grad(y.square().sum(), x)
    (gx_ref,) = torch.autograd.grad(y_ref.square().sum(), x)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-4, atol=1e-5)
    wide = torch.randn(1, 3, 1, 272, device=triton_device)
    with pytest.raises(ValueError, match="head_dim 272 is larger than the triton kernel's 256"):
        zigspark.spark_attention(wide, wide, wide, 2, backend="triton")
    assert zigspark.spark_attention(wide, wide, wide, 2).shape == wide.shape  # auto: the reference runs


GPU_CASES = [  # batch, seqlen_q, seqlen_k, heads, head_dim, r, top_k, causal
    (2, 1, 1, 2, 64, 16, 4, False),
    (2, 17, 17, 4, 40, 10, 4, True),
    (2, 1000, 1000, 4, 64, 16, 64, True),
    (1, 1000, 777, 4, 128, 32, 100, False),
    (1, 300, 1000, 4, 128, 37, 32, True),
    (1, 1000, 300, 2, 256, 64, 16, True),
    (1, 4096, 4096, 2, 128, 32, 256, True),
    (1, 4096, 4096, 1, 64, 16, 5000, False),   # top_k above the seqlen: dense
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
def test_gpu_triton_matches_reference(dtype, case):
    check_spark_backend(torch.device("cuda"), dtype, case, rel_floor=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("case", [GPU_CASES[i] for i in (1, 2, 4)], ids=str)
def test_gpu_triton_renormalized_gate_and_sample_std(dtype, case):
    check_spark_backend(torch.device("cuda"), dtype, case, rel_floor=1e-4, std_correction=1.0,
                        renormalize_gate=True)


GPU_DECODE_CASES = [  # batch, seqlen_q, seqlen_k, heads, head_dim, r, top_k, causal: the split-key forward
    (1, 1, 4096, 8, 128, 32, 256, True),
    (4, 1, 32768, 8, 128, 32, 256, True),
    (2, 16, 8192, 4, 64, 16, 256, True),
    (1, 7, 5000, 2, 256, 64, 100, False),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_gpu_triton_split_key_decode_renormalized_gate(dtype):
    check_spark_backend(torch.device("cuda"), dtype, GPU_DECODE_CASES[1], rel_floor=1e-4, std_correction=1.0,
                        renormalize_gate=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("case", GPU_DECODE_CASES, ids=str)
def test_gpu_triton_split_key_decode_matches_reference(dtype, case):
    from zigspark.triton_kernels import spark_attention as kernels

    assert decode_splits(kernels, case, dtype, torch.device("cuda")) > 1, "construction: the case must split"
    check_spark_backend(torch.device("cuda"), dtype, case, rel_floor=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)  # fp32: the interpret tier
@pytest.mark.parametrize("causal", [True, False])
def test_gpu_triton_skips_tiles_nobody_keeps(dtype, causal):
    check_cold_tiles_skipped(torch.device("cuda"), dtype, 256, slice(64, 128), 4, 8, causal)
