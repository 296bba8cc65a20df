"""HiPrune selection against a straightforward per-sample reference; prune_tokens; baselines; bad inputs."""

import pytest
import torch

import zigspark



def naive_hiprune(obj, deep, h, w, keep, alpha=0.1, wrap_rows=False, always=()):
    """One sample, Python lists and sets, in the priority order of the rule."""
    n = h * w
    by_score = lambda s: sorted(range(n), key=lambda i: (-s[i], i))  # noqa: E731
    n_anchor = min(n, max(1, round(keep * alpha / 5)))
    anchors = by_score(obj)[:n_anchor]
    order = list(always) + anchors
    for a in anchors:
        r, c = divmod(a, w)
        if wrap_rows:
            cands = [min(max(a + s, 0), n - 1) for s in (-w, w, -1, 1)]
        else:
            cands = [a - w if r > 0 else None, a + w if r < h - 1 else None,
                     a - 1 if c > 0 else None, a + 1 if c < w - 1 else None]
        order += [x for x in cands if x is not None]
    order += by_score(deep)
    chosen = []
    for i in order:
        if i not in chosen:
            chosen.append(i)
        if len(chosen) == keep:
            break
    return sorted(chosen)


@pytest.mark.cpu
@pytest.mark.parametrize("h,w", [(1, 9), (9, 1), (3, 5), (7, 7), (6, 11), (24, 24)])
@pytest.mark.parametrize("wrap_rows", [False, True])
def test_matches_naive_reference(h, w, wrap_rows):
    g = torch.Generator().manual_seed(h * 100 + w)
    n = h * w
    obj, deep = torch.rand(3, n, generator=g), torch.rand(3, n, generator=g)
    obj[:, :3] = obj[:, 3:6]  # ties: the lower index must win
    for keep in sorted({1, 2, 5, n // 3 or 1, n // 2 or 1, n}):
        got = zigspark.hiprune_select(obj, deep, (h, w), keep, wrap_rows=wrap_rows)
        assert got.shape == (3, keep)
        for b in range(3):
            expected = naive_hiprune(obj[b].tolist(), deep[b].tolist(), h, w, keep, wrap_rows=wrap_rows)
            assert got[b].tolist() == expected, (h, w, keep, b)


@pytest.mark.cpu
@pytest.mark.parametrize("h,w", [(1, 7), (3, 5)])
def test_matches_naive_reference_every_keep_alpha_and_always_keep(h, w):
    """keep = 1..N with alpha up to 5 (anchors and buffers overflow the budget) and always_keep with a repeat."""
    g = torch.Generator().manual_seed(h * 10 + w)
    n = h * w
    obj = torch.randint(0, 4, (2, n), generator=g).float()     # integer-valued: many ties
    deep = torch.randint(0, 6, (2, n), generator=g) / 2
    for keep in range(1, n + 1):
        for alpha in (0.1, 1.0, 5.0):
            for wrap_rows in (False, True):
                for always in ((), (n - 1, 0, n - 1, 3)):
                    always = always if len(set(always)) <= keep else always[:1]
                    got = zigspark.hiprune_select(obj, deep, (h, w), keep, alpha=alpha, wrap_rows=wrap_rows,
                                                  always_keep=list(always) or None)
                    for b in range(2):
                        expected = naive_hiprune(obj[b].tolist(), deep[b].tolist(), h, w, keep, alpha, wrap_rows,
                                                 always)
                        assert got[b].tolist() == expected, (h, w, keep, alpha, wrap_rows, always, b)
                rows = per_sample_always(2, n, keep, seed=keep)
                got = zigspark.hiprune_select(obj, deep, (h, w), keep, alpha=alpha, always_keep=rows)
                for b in range(2):
                    mine = [i for i in rows[b].tolist() if i >= 0]
                    expected = naive_hiprune(obj[b].tolist(), deep[b].tolist(), h, w, keep, alpha, False, mine)
                    assert got[b].tolist() == expected, (h, w, keep, alpha, rows[b].tolist(), b)


def per_sample_always(batch, n, keep, seed=0, width=4):
    """(batch, width) always_keep rows, -1 padded, with repeats, a row of padding only, and no row holding more
    distinct indices than keep."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(-1, n, (batch, width), generator=g)
    rows[0, 1] = rows[0, 0]                  # a repeat
    rows[-1] = -1                            # a sample that keeps nothing extra (when batch > 1)
    for row in rows:
        seen = []
        for j, i in enumerate(row.tolist()):
            if i >= 0 and i not in seen and len(seen) == keep:
                row[j] = -1
            elif i >= 0 and i not in seen:
                seen.append(i)
    return rows


@pytest.mark.cpu
def test_always_keep_repeats_count_once_and_baselines_honour_it():
    obj, deep = torch.rand(2, 16), torch.rand(2, 16)
    sel = zigspark.hiprune_select(obj, deep, (4, 4), 2, always_keep=[1, 1, 1])
    assert sel.shape == (2, 2) and (sel == 1).any(dim=1).all()
    assert zigspark.hiprune_select(obj, deep, (4, 4), 2, always_keep=torch.tensor([5, 3, 5]))[0].tolist() == [3, 5]
    att = zigspark.hiprune_select(obj, deep, (4, 4), 5, strategy="attention", always_keep=[15, 0, 15])
    for b in range(2):
        rest = [i for i in torch.argsort(deep[b], descending=True, stable=True).tolist() if i not in (0, 15)]
        assert att[b].tolist() == sorted([0, 15] + rest[:3])
    g = torch.Generator().manual_seed(0)
    rnd = zigspark.hiprune_select(obj, deep, (4, 4), 5, strategy="random", always_keep=[15, 0, 15], generator=g)
    assert rnd.shape == (2, 5) and (rnd.diff(dim=1) > 0).all()
    assert ((rnd == 0).any(dim=1) & (rnd == 15).any(dim=1)).all()
    only = zigspark.hiprune_select(obj, deep, (4, 4), 2, strategy="random", always_keep=[15, 0], generator=g)
    assert only.tolist() == [[0, 15], [0, 15]]
    for strategy in ("attention", "random"):
        with pytest.raises(ValueError, match=r"always_keep indices must be in \[0, 16\)"):
            zigspark.hiprune_select(obj, deep, (4, 4), 5, strategy=strategy, always_keep=[16])
        with pytest.raises(ValueError, match="3 distinct indices but keep is 2"):
            zigspark.hiprune_select(obj, deep, (4, 4), 2, strategy=strategy, always_keep=[0, 1, 2, 1])
        # per sample: each row honoured in its own sample, -1 pads
        rows = torch.tensor([[15, 0, 15], [-1, 7, -1]])
        picked = zigspark.hiprune_select(obj, deep, (4, 4), 3, strategy=strategy, always_keep=rows, generator=g)
        assert {0, 15} <= set(picked[0].tolist()) and 7 in picked[1].tolist()
        if strategy == "attention":
            rest = [i for i in torch.argsort(deep[1], descending=True, stable=True).tolist() if i != 7]
            assert picked[1].tolist() == sorted([7] + rest[:2])


@pytest.mark.cpu
def test_no_neighbour_across_row_edges_and_always_keep():
    h, w = 4, 5
    obj = torch.zeros(1, 20)
    obj[0, 9] = 10.0  # right edge of row 1: its "right" neighbour 10 is on the next row
    deep = -torch.arange(20.0)[None]  # registers prefer low indices
    sel = zigspark.hiprune_select(obj, deep, (h, w), 20, alpha=0.1)
    assert sel.shape == (1, 20)
    few = zigspark.hiprune_select(obj, deep, (h, w), 4, alpha=0.5)  # 1 anchor + up, down, left
    assert few[0].tolist() == [4, 8, 9, 14]
    wrapped = zigspark.hiprune_select(obj, deep, (h, w), 5, alpha=0.5, wrap_rows=True)
    assert wrapped[0].tolist() == [4, 8, 9, 10, 14]  # the official code's flat +1 crosses the edge
    kept = zigspark.hiprune_select(obj, deep, (h, w), 3, always_keep=[19, 0])
    assert kept[0].tolist() == [0, 9, 19]


@pytest.mark.cpu
def test_batch_samples_select_independently_and_baselines():
    obj = torch.stack([torch.arange(16.0), torch.arange(16.0).flip(0)])
    deep = torch.rand(2, 16)
    sel = zigspark.hiprune_select(obj, deep, (4, 4), 4, alpha=1.0)
    assert sel[0].tolist() != sel[1].tolist()
    att = zigspark.hiprune_select(obj, deep, (4, 4), 5, strategy="attention")
    assert att[0].tolist() == sorted(torch.argsort(deep[0], descending=True)[:5].tolist())
    rnd = zigspark.hiprune_select(obj, deep, (4, 4), 5, strategy="random", generator=torch.Generator().manual_seed(0))
    assert rnd.shape == (2, 5) and (rnd.diff(dim=1) > 0).all()


@pytest.mark.cpu
def test_prune_tokens_gathers_and_scatters_gradients():
    x = torch.randn(2, 10, 4, requires_grad=True)
    idx = torch.tensor([[0, 3, 9], [1, 2, 5]])
    pos = torch.arange(10.0)[None, :, None]
    out, p = zigspark.prune_tokens(x, idx, pos)
    assert torch.equal(out[1, 2], x[1, 5]) and p[1, :, 0].tolist() == [1.0, 2.0, 5.0]
    out.sum().backward()
    expected = torch.zeros(2, 10, 4)
    expected[0, [0, 3, 9]] = 1
    expected[1, [1, 2, 5]] = 1
    assert torch.equal(x.grad, expected)


@pytest.mark.cpu
def test_prune_tokens_op_gradcheck_opcheck_repeats_and_integer_features():
    x = torch.randn(2, 7, 3, dtype=torch.float64, requires_grad=True)
    idx = torch.tensor([[0, 3, 3, 6], [5, 1, 2, 2]])                  # repeats add up in the backward
    assert torch.autograd.gradcheck(lambda t: zigspark.prune_tokens(t, idx, backend="reference"), (x,))
    torch.library.opcheck(torch.ops.zigspark.prune_tokens_fwd.default, (x.detach().float(), idx, "reference"))
    torch.library.opcheck(torch.ops.zigspark.prune_tokens_bwd.default, (torch.randn(2, 4, 3), idx, 7, "reference"))
    labels = torch.arange(14).view(2, 7, 1)
    assert zigspark.prune_tokens(labels, idx)[:, :, 0].tolist() == [[0, 3, 3, 6], [12, 8, 9, 9]]
    with pytest.raises(zigspark.BackendUnavailableError, match="cuda"):
        zigspark.prune_tokens(x, idx, backend="cuda")


@pytest.mark.cpu
def test_hiprune_select_op_opcheck_and_compiles_fullgraph():
    g = torch.Generator().manual_seed(0)
    obj, deep = torch.rand(3, 30, generator=g), torch.rand(3, 30, generator=g)
    for always in (None, torch.tensor([4, 0]), torch.tensor([[4, 0], [-1, 7], [-1, -1]])):
        torch.library.opcheck(torch.ops.zigspark.hiprune_select.default,
                              (obj, deep, 5, 6, 9, 2, False, always, "reference"))

    def select(o, d):
        return zigspark.hiprune_select(o, d, (5, 6), 9, alpha=1.0, always_keep=[4, 0], backend="reference")

    assert torch.equal(torch.compile(select, fullgraph=True, backend="aot_eager")(obj, deep), select(obj, deep))
    with pytest.raises(ValueError, match="NaN"):            # value checks run inside the op
        torch.compile(select, fullgraph=True, backend="aot_eager")(torch.full_like(obj, float("nan")), deep)


@pytest.mark.cpu
def test_bad_inputs():
    obj, deep = torch.rand(2, 12), torch.rand(2, 12)
    cases = [
        (dict(keep=0), "1 <= keep <= N = 12"), (dict(keep=13), "1 <= keep <= N"),
        (dict(grid=(3, 5)), r"grid \(3, 5\) has 15 tokens but the scores have N = 12"),
        (dict(deep_scores=torch.rand(3, 12)), "must both be"),
        (dict(obj_scores=torch.full((2, 12), float("nan"))), "NaN"),
        (dict(strategy="best"), "strategy must be one of"),
        (dict(always_keep=[12]), r"always_keep indices must be in \[0, 12\)"),
        (dict(deep_scores=torch.rand(2, 12).index_fill(1, torch.tensor([3]), float("nan"))), "NaN"),
        (dict(deep_scores=torch.full((2, 12), float("nan")), strategy="attention"), "NaN"),
        (dict(alpha=float("nan")), "alpha .* finite number >= 0, got nan"),
        (dict(alpha=float("inf")), "alpha .* finite number >= 0"), (dict(alpha=-0.1), "alpha .* got -0.1"),
        (dict(alpha="0.1x"), "alpha"),
        (dict(grid=(-3, -4)), r"grid must be \(h, w\) with positive int sides, got \(-3, -4\)"),
        (dict(grid=(12,)), r"grid must be a pair \(h, w\)"), (dict(grid=(3.0, 4)), "positive int sides"),
        (dict(always_keep=[0, 1, 2, 3, 4, 0]), "5 distinct indices but keep is 4"),
        (dict(always_keep=[[0, 1], [2, 3], [4, 5]]),
         r"always_keep must be 1-D .* or \(batch, m\) = \(2, m\) .* got shape \(3, 2\)"),
        (dict(always_keep=torch.zeros(2, 1, 1, dtype=torch.long), strategy="random"), "always_keep must be 1-D"),
        (dict(always_keep=torch.tensor([-2])), r"always_keep indices must be in \[0, 12\) \(-1 entries are padding\), got \[-2\]"),
        (dict(always_keep=[[0, 1, 2, 3, 4], [0, -1, -1, -1, 0]]), "5 distinct indices in sample 0 but keep is 4"),
        (dict(always_keep=[[0, -1], [1, 2, 3, 4, 5, 6][:2]], keep=1, strategy="attention"),
         "2 distinct indices in sample 1 but keep is 1"),
    ]
    for override, match in cases:
        args = {**dict(obj_scores=obj, deep_scores=deep, grid=(3, 4), keep=4), **override}
        with pytest.raises(ValueError, match=match):
            zigspark.hiprune_select(args.pop("obj_scores"), args.pop("deep_scores"), args.pop("grid"),
                                    args.pop("keep"), **args)
    with pytest.raises(ValueError, match=r"in \[0, 12\), got \[0, -1\]: negative indices do not count from the end .* "
                                         "write 11 for the last token"):
        zigspark.hiprune_select(obj, deep, (3, 4), 4, always_keep=[0, -1])
    padded = zigspark.hiprune_select(obj, deep, (3, 4), 4, always_keep=torch.tensor([5, -1]))   # a tensor: padding
    assert torch.equal(padded, zigspark.hiprune_select(obj, deep, (3, 4), 4, always_keep=[5]))
    shared = zigspark.hiprune_select(obj, deep, (3, 4), 4, always_keep=torch.tensor([[5, 2]]))  # (1, m): every sample
    assert torch.equal(shared, zigspark.hiprune_select(obj, deep, (3, 4), 4, always_keep=[2, 5]))
    for always in ([0.5], torch.tensor([True]), [[1.0]]):
        with pytest.raises(TypeError, match="always_keep must hold integer token indices"):
            zigspark.hiprune_select(obj, deep, (3, 4), 4, always_keep=always)
    with pytest.raises(ValueError, match="always_keep has 3 rows but the batch is 2"):   # the op itself checks
        torch.ops.zigspark.hiprune_select(obj, deep, 3, 4, 4, 1, False, torch.zeros(3, 1, dtype=torch.long),
                                          "reference")
    with pytest.raises(ValueError, match="keep_idx must be"):
        zigspark.prune_tokens(torch.randn(2, 5, 3), torch.tensor([[7]]))
    x, idx = torch.randn(2, 5, 3), torch.tensor([[0, 4], [1, 2]])
    for pos in (torch.randn(2, 5), torch.randn(2, 4, 2), torch.randn(3, 5, 2), torch.randn(5, 2)):
        with pytest.raises(ValueError, match=r"positions must be \(batch or 1, N, P\) = \(2 or 1, 5, P\)"):
            zigspark.prune_tokens(x, idx, pos)
    with pytest.raises(TypeError, match="positions must be a torch.Tensor"):
        zigspark.prune_tokens(x, idx, [[0.0]])
    assert zigspark.prune_tokens(x, idx, torch.arange(5.0).view(1, 5, 1))[1][:, :, 0].tolist() == [[0, 4], [1, 2]]


def _compare_backends(backend, device, grids, batch=3):
    for h, w in grids:
        n = h * w
        g = torch.Generator().manual_seed(h * 100 + w)
        obj, deep = torch.rand(batch, n, generator=g).to(device), torch.rand(batch, n, generator=g).to(device)
        obj[:, :3] = obj[:, 3:6]   # ties in both scores: the lower index must win
        deep[:, 1:4] = deep[:, 4:7]
        for wrap in (False, True):
            for keep in sorted({1, 2, 5, n // 9 or 1, n // 3 or 1, n}):
                for always in (None, [n - 1, 0, n - 1]):   # a repeat: deduplicated before any kernel
                    if always and keep < 2:
                        continue
                    args = (obj, deep, (h, w), keep)
                    kw = dict(wrap_rows=wrap, always_keep=always)
                    got = zigspark.hiprune_select(*args, **kw, backend=backend)
                    expected = zigspark.hiprune_select(*args, **kw, backend="reference")
                    assert torch.equal(got, expected), (h, w, wrap, keep, always)
                rows = per_sample_always(batch, n, keep, seed=keep).to(device)
                got = zigspark.hiprune_select(obj, deep, (h, w), keep, wrap_rows=wrap, always_keep=rows,
                                              backend=backend)
                expected = zigspark.hiprune_select(obj, deep, (h, w), keep, wrap_rows=wrap, always_keep=rows,
                                                   backend="reference")
                assert torch.equal(got, expected), (h, w, wrap, keep, rows.tolist())


@pytest.mark.interpret
def test_triton_selection_equals_reference(triton_device):
    _compare_backends("triton", triton_device, [(1, 9), (3, 5), (7, 7), (6, 11)])


def _signed_zero_case(device):
    """Registers tied at zero with different signs: -0.0 == +0.0, so the lower index wins."""
    obj = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 5.0]], device=device)   # anchor 5, buffer 4
    deep = torch.tensor([[-0.0, 0.0, -1.0, -1.0, -1.0, -1.0]], device=device)
    return obj, deep


@pytest.mark.cpu
def test_signed_zeros_tie_by_index():
    obj, deep = _signed_zero_case("cpu")
    assert zigspark.hiprune_select(obj, deep, (1, 6), 3)[0].tolist() == [0, 4, 5]
    assert naive_hiprune(obj[0].tolist(), deep[0].tolist(), 1, 6, 3) == [0, 4, 5]


@pytest.mark.interpret
def test_triton_signed_zeros_tie_by_index(triton_device):
    obj, deep = _signed_zero_case(triton_device)
    assert zigspark.hiprune_select(obj, deep, (1, 6), 3, backend="triton")[0].tolist() == [0, 4, 5]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_signed_zeros_tie_by_index(backend):
    obj, deep = _signed_zero_case("cuda")
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        got = zigspark.hiprune_select(obj.to(dtype), deep.to(dtype), (1, 6), 3, backend=backend)
        assert got[0].tolist() == [0, 4, 5], dtype


@pytest.mark.gpu
def test_gpu_triton_selection_equals_reference():
    _compare_backends("triton", torch.device("cuda"), [(24, 24), (48, 60), (64, 64), (1, 577)], batch=16)


# ---- CUDA kernels (csrc/token_prune) ----------------------------------------------------------------------

def _cuda_matches_reference(obj, deep, grid, keep, **kw):
    got = zigspark.hiprune_select(obj, deep, grid, keep, **kw, backend="cuda")
    expected = zigspark.hiprune_select(obj, deep, grid, keep, **kw, backend="reference")
    assert got.dtype == torch.int64 and got.shape == expected.shape
    assert torch.equal(got, expected), (grid, keep, kw, (got != expected).nonzero()[:5].tolist())


@pytest.mark.build
def test_extension_exposes_token_prune_kernels(cuda_extension):
    C = cuda_extension
    for name in ("hiprune_select", "hiprune_select_workspace", "prune_tokens_forward", "prune_tokens_backward"):
        assert callable(getattr(C, name, None)), name
    select = dict(obj=1, deep=1, always=0, out=1, workspace=0, workspace_bytes=0, batch=1, n=4, h=2, w=2, keep=2,
                  n_anchor=1, n_always=0, always_sample_stride=0, wrap_rows=False, dtype=0, device=0, stream=0)
    # sizes are checked before the device is touched
    with pytest.raises(ValueError, match=r"keep must be in \[1, N\]"):
        C.hiprune_select(**{**select, "keep": 5})
    with pytest.raises(ValueError, match="grid h·w must equal N"):
        C.hiprune_select(**{**select, "w": 3})
    with pytest.raises(ValueError, match="unsupported dtype float64"):
        C.hiprune_select(**{**select, "dtype": 3})
    with pytest.raises(ValueError, match="always_sample_stride must be 0 .* or at least n_always"):
        C.hiprune_select(**{**select, "always": 1, "n_always": 2, "always_sample_stride": 1})
    assert C.hiprune_select_workspace(batch=3, n=100, n_anchor=2, device=0, force_workspace=True) % 16 == 0
    if not torch.cuda.is_available():
        move = dict(index=1, batch=1, tokens=4, keep=2, channels=8, dtype=0, device=0, stream=0)
        with pytest.raises(RuntimeError, match="no CUDA device is available.*backend='reference'"):
            C.hiprune_select(**select)
        with pytest.raises(RuntimeError, match="no CUDA device is available"):
            C.hiprune_select_workspace(batch=1, n=4, n_anchor=1, device=0)
        with pytest.raises(RuntimeError, match="no CUDA device is available"):
            C.prune_tokens_forward(x=1, out=1, x_batch_stride=32, x_row_stride=8, out_batch_stride=16,
                                   out_row_stride=8, **move)
        with pytest.raises(RuntimeError, match="no CUDA device is available"):
            C.prune_tokens_backward(grad_out=1, grad_x=1, grad_out_batch_stride=16, grad_out_row_stride=8,
                                    grad_x_batch_stride=32, grad_x_row_stride=8, unique_index=True, **move)


@pytest.mark.cpu
def test_cuda_backend_is_registered_and_explains_itself():
    from zigspark import backends

    assert backends.auto_order("hiprune_select", torch.device("cuda"))[0] == "cuda"
    reason = backends.unavailable_reason("hiprune_select", "cuda", torch.device("cpu"), torch.float32)
    assert reason is not None and ("CUDA tensors" in reason or "not built" in reason)
    with pytest.raises(zigspark.BackendUnavailableError, match="backend='cuda' cannot run here"):
        zigspark.hiprune_select(torch.rand(1, 12), torch.rand(1, 12), (3, 4), 4, backend="cuda")


@pytest.mark.gpu
def test_gpu_cuda_selection_equals_reference():
    _cuda_matches_reference(torch.rand(3, 1, device="cuda"), torch.rand(3, 1, device="cuda"), (1, 1), 1)
    _compare_backends("cuda", torch.device("cuda"), [(1, 9), (9, 1), (3, 5), (7, 7), (6, 11), (13, 17),
                                                     (24, 24), (48, 60), (64, 64), (1, 577), (1, 4096)], batch=16)
    # staged in shared memory just under 48 KB (N ≈ 5043–5359), where a launch without the opt-in fails
    _compare_backends("cuda", torch.device("cuda"), [(72, 72), (73, 73)], batch=4)


def check_every_keep_and_tight_budgets(device, h, w, keep_step=1):
    """keep = 1..N (every keep_step-th); alpha up to 5 makes the anchors and buffers overflow the budget
    (structural cut)."""
    n = h * w
    g = torch.Generator().manual_seed(n)
    obj = torch.randint(0, 4, (4, n), generator=g).float().to(device)   # integer-valued: many ties
    deep = torch.randint(0, 6, (4, n), generator=g).to(device) / 2
    for keep in range(1, n + 1, keep_step):
        for alpha in (0.1, 1.0, 5.0):
            for wrap in (False, True):
                _cuda_matches_reference(obj, deep, (h, w), keep, alpha=alpha, wrap_rows=wrap)
        _cuda_matches_reference(obj, deep, (h, w), keep, alpha=1.0, always_keep=[n - 1, 0, n - 1][:keep])
        _cuda_matches_reference(obj, deep, (h, w), keep, alpha=1.0, always_keep=per_sample_always(4, n, keep, keep))


GRIDS_FOR_EVERY_KEEP = [(1, 2), (2, 1), (1, 13), (3, 5), (7, 7), (6, 11)]


@pytest.mark.gpu
@pytest.mark.parametrize("h,w", GRIDS_FOR_EVERY_KEEP)
def test_gpu_cuda_every_keep_and_tight_budgets(h, w):
    check_every_keep_and_tight_budgets("cuda", h, w)


@pytest.mark.emulate
@pytest.mark.parametrize("h,w", GRIDS_FOR_EVERY_KEEP)
def test_emulated_cuda_every_keep_and_tight_budgets(h, w):
    check_every_keep_and_tight_budgets("cpu", h, w, keep_step=1 if h * w < 20 else 4)


@pytest.mark.emulate
def test_emulated_cuda_selection_signed_zeros_half_scores_and_workspace():
    from zigspark.cuda_ops import token_prune as kernels

    _cuda_matches_reference(torch.rand(3, 1), torch.rand(3, 1), (1, 1), 1)
    _compare_backends("cuda", torch.device("cpu"), [(1, 9), (9, 1), (3, 5), (6, 11), (13, 17)], batch=2)
    obj, deep = _signed_zero_case("cpu")
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        got = zigspark.hiprune_select(obj.to(dtype), deep.to(dtype), (1, 6), 3, backend="cuda")
        assert got[0].tolist() == [0, 4, 5], dtype
        obj16, deep16 = torch.rand(2, 99).to(dtype), torch.randn(2, 99).to(dtype)   # 16-bit scores: ties
        for keep in (1, 11, 50, 99):
            _cuda_matches_reference(obj16, deep16, (9, 11), keep, wrap_rows=True, always_keep=[0])
    obj, deep = torch.randint(0, 50, (2, 99)).float(), torch.rand(2, 99)
    for keep in (1, 11, 50, 99):
        for wrap in (False, True):   # the global-memory path, forced
            got = kernels.hiprune_select(obj, deep, (9, 11), keep, max(1, round(keep * 0.1 / 5)), wrap, None,
                                         force_workspace=True)
            assert torch.equal(got, zigspark.hiprune_select(obj, deep, (9, 11), keep, wrap_rows=wrap,
                                                            backend="reference")), (keep, wrap)


@pytest.mark.gpu
@pytest.mark.parametrize("grid", [(24, 24), (48, 60), (64, 64), (1, 2880), (37, 53)])
@pytest.mark.parametrize("kind", ["rand", "integer", "constant", "signed_zero_inf"])
def test_gpu_cuda_large_grids_and_ties(grid, kind):
    n = grid[0] * grid[1]
    g = torch.Generator().manual_seed(n)

    def scores():
        if kind == "rand":
            return torch.rand(8, n, generator=g)
        if kind == "integer":
            return torch.randint(0, 7, (8, n), generator=g).float()
        if kind == "constant":
            return torch.full((8, n), 0.25)
        vals = torch.tensor([0.0, -0.0, 1.0, -1.0, float("inf"), float("-inf"), 3e-38, -3e-38])
        return vals[torch.randint(0, 8, (8, n), generator=g)]

    obj, deep = scores().cuda(), scores().cuda()
    keeps = {1, 2, 3, 7, n // 9, n // 3, n // 2, n - 1, n, *torch.randint(1, n + 1, (4,), generator=g).tolist()}
    for keep in sorted(keeps):
        for alpha, wrap in ((0.1, False), (0.1, True), (2.0, False)):
            _cuda_matches_reference(obj, deep, grid, keep, alpha=alpha, wrap_rows=wrap)
        _cuda_matches_reference(obj, deep, grid, keep, always_keep=torch.randint(0, n, (min(keep, 5),),
                                                                                  generator=g).tolist())
        _cuda_matches_reference(obj, deep, grid, keep, always_keep=per_sample_always(8, n, keep, keep, width=9))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_cuda_half_precision_scores(dtype):
    for grid in ((24, 24), (48, 60), (64, 64)):
        n = grid[0] * grid[1]
        obj = torch.rand(6, n, device="cuda").to(dtype)     # few distinct values in 16 bits: ties
        deep = torch.randn(6, n, device="cuda").to(dtype)
        for keep in (1, n // 9, n // 2, n):
            _cuda_matches_reference(obj, deep, grid, keep)
            _cuda_matches_reference(obj, deep, grid, keep, wrap_rows=True, always_keep=[0])
            _cuda_matches_reference(obj, deep.float(), grid, keep)  # mixed dtypes: both read as float32


@pytest.mark.gpu
def test_gpu_cuda_workspace_path_and_large_n():
    """The global-memory path: forced at small N, and taken by itself where a sample exceeds shared memory."""
    from zigspark.cuda_ops import token_prune as kernels

    for grid in ((7, 7), (24, 24), (64, 64)):
        n = grid[0] * grid[1]
        obj = torch.randint(0, 50, (5, n), device="cuda").float()
        deep = torch.rand(5, n, device="cuda")
        for keep in (1, n // 9, n // 2, n):
            n_anchor = min(n, max(1, round(keep * 0.1 / 5)))
            for wrap in (False, True):
                got = kernels.hiprune_select(obj, deep, grid, keep, n_anchor, wrap, None, force_workspace=True)
                expected = zigspark.hiprune_select(obj, deep, grid, keep, wrap_rows=wrap, backend="reference")
                assert torch.equal(got, expected), (grid, keep, wrap)
    grid = (200, 160)  # 32,000 tokens: ~290 KB per sample, more than any GPU's shared memory per block
    n = grid[0] * grid[1]
    C = zigspark._cuda.extension()
    assert C.hiprune_select_workspace(batch=2, n=n, n_anchor=64, device=0) > 0
    obj, deep = torch.rand(2, n, device="cuda"), torch.randint(0, 1000, (2, n), device="cuda").float()
    for keep in (1, 3200, n // 2, n):
        _cuda_matches_reference(obj, deep, grid, keep)


@pytest.mark.gpu
def test_gpu_auto_runs_the_cuda_kernel():
    from zigspark import backends

    obj, deep = torch.rand(4, 576, device="cuda"), torch.rand(4, 576, device="cuda")
    got = zigspark.hiprune_select(obj, deep, (24, 24), 64)
    assert backends.last_backends()["hiprune_select"] == "cuda"
    assert torch.equal(got, zigspark.hiprune_select(obj, deep, (24, 24), 64, backend="reference"))
    empty = zigspark.hiprune_select(obj[:0], deep[:0], (24, 24), 64, backend="cuda")
    assert empty.shape == (0, 64)


def check_prune_tokens_kernels(device, dtype, channels, backend="cuda"):
    if backend == "triton":
        from zigspark.triton_kernels import token_prune as kernels
    else:
        from zigspark.cuda_ops import token_prune as kernels

    batch, n, keep = 3, 50, 17
    x = torch.randn(batch, n, channels, device=device).to(dtype)
    idx = torch.stack([torch.randperm(n, device=device)[:keep].sort().values for _ in range(batch)])
    expected = torch.gather(x, 1, idx[..., None].expand(-1, -1, channels))
    assert torch.equal(kernels.prune_tokens_fwd(x, idx), expected)
    # strided rows (every other token), an unaligned row start, and one sample broadcast over the batch
    wide = torch.randn(batch, 2 * n, channels + 1, device=device).to(dtype)
    aligned = torch.randn(batch, 2 * n, channels, device=device).to(dtype)
    for view in (wide[:, ::2, :channels], wide[:, :n, 1:], aligned[:, ::2]):
        assert torch.equal(kernels.prune_tokens_fwd(view, idx), torch.gather(view, 1, idx[..., None].expand(
            -1, -1, channels)))
    pos = torch.randn(1, n, channels, device=device).to(dtype).expand(batch, -1, -1)
    assert torch.equal(kernels.prune_tokens_fwd(pos, idx), torch.gather(pos, 1, idx[..., None].expand(
        -1, -1, channels)))

    # backward: integer-valued gradients, so that sums of repeated indices are exact in every dtype
    grad = torch.randint(-2, 3, (batch, keep, channels), device=device).to(dtype)
    unique = torch.zeros(batch, n, channels, device=device, dtype=dtype).scatter_(
        1, idx[..., None].expand(-1, -1, channels), grad)
    assert torch.equal(kernels.prune_tokens_bwd(grad, idx, n, unique=True), unique)
    assert torch.equal(kernels.prune_tokens_bwd(grad, idx, n, unique=False), unique)
    repeated = torch.randint(0, 5, (batch, keep), device=device)   # each index up to 17 times
    summed = torch.zeros(batch, n, channels, device=device, dtype=dtype).scatter_add_(
        1, repeated[..., None].expand(-1, -1, channels), grad)
    assert torch.equal(kernels.prune_tokens_bwd(grad, repeated, n, unique=False), summed)
    assert torch.equal(kernels.prune_tokens_fwd(x, repeated), torch.gather(x, 1, repeated[..., None].expand(
        -1, -1, channels)))
    # the op on both backends, forward and gradient, agrees with the kernel pair
    for op_backend in ("reference", backend):
        xr = x.clone().requires_grad_(True)
        out = zigspark.prune_tokens(xr, idx, backend=op_backend)
        assert torch.equal(out, expected)
        out.backward(grad)
        assert torch.equal(xr.grad, kernels.prune_tokens_bwd(grad, idx, n, unique=True)), op_backend
    # a gradient that is not contiguous (the kernels read it through its strides)
    strided = torch.randint(-2, 3, (batch, channels, keep), device=device).to(dtype).transpose(1, 2)
    assert torch.equal(kernels.prune_tokens_bwd(strided, repeated, n), torch.zeros(batch, n, channels, device=device,
                       dtype=dtype).scatter_add_(1, repeated[..., None].expand(-1, -1, channels), strided))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("channels", [1, 3, 8, 64, 1000, 1024, 2500])
def test_gpu_prune_tokens_kernels_match_torch_indexing(backend, dtype, channels):
    check_prune_tokens_kernels("cuda", dtype, channels, backend)


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("channels", [1, 3, 1100])
def test_triton_prune_tokens_kernels_match_torch_indexing(triton_device, dtype, channels):
    check_prune_tokens_kernels(triton_device, dtype, channels, "triton")


@pytest.mark.emulate
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("channels", [1, 3, 8, 64, 1000])
def test_emulated_prune_tokens_kernels_match_torch_indexing(dtype, channels):
    check_prune_tokens_kernels("cpu", dtype, channels)
