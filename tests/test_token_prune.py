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
def test_bad_inputs():
    obj, deep = torch.rand(2, 12), torch.rand(2, 12)
    cases = [
        (dict(keep=0), "1 <= keep <= N = 12"), (dict(keep=13), "1 <= keep <= N"),
        (dict(grid=(3, 5)), r"grid \(3, 5\) has 15 tokens but the scores have N = 12"),
        (dict(deep_scores=torch.rand(3, 12)), "must both be"),
        (dict(obj_scores=torch.full((2, 12), float("nan"))), "NaN"),
        (dict(strategy="best"), "strategy must be one of"),
        (dict(always_keep=[12]), r"always_keep indices must be in \[0, 12\)"),
    ]
    for override, match in cases:
        args = {**dict(obj_scores=obj, deep_scores=deep, grid=(3, 4), keep=4), **override}
        with pytest.raises(ValueError, match=match):
            zigspark.hiprune_select(args.pop("obj_scores"), args.pop("deep_scores"), args.pop("grid"),
                                    args.pop("keep"), **args)
    with pytest.raises(ValueError, match="keep_idx must be"):
        zigspark.prune_tokens(torch.randn(2, 5, 3), torch.tensor([[7]]))


def _compare_backends(backend, device, grids, batch=3):
    for h, w in grids:
        n = h * w
        g = torch.Generator().manual_seed(h * 100 + w)
        obj, deep = torch.rand(batch, n, generator=g).to(device), torch.rand(batch, n, generator=g).to(device)
        obj[:, :3] = obj[:, 3:6]   # ties in both scores: the lower index must win
        deep[:, 1:4] = deep[:, 4:7]
        for wrap in (False, True):
            for keep in sorted({1, 2, 5, n // 9 or 1, n // 3 or 1, n}):
                for always in (None, [n - 1, 0]):
                    if always and keep < 2:
                        continue
                    args = (obj, deep, (h, w), keep)
                    kw = dict(wrap_rows=wrap, always_keep=always)
                    got = zigspark.hiprune_select(*args, **kw, backend=backend)
                    expected = zigspark.hiprune_select(*args, **kw, backend="reference")
                    assert torch.equal(got, expected), (h, w, wrap, keep, always)


@pytest.mark.interpret
def test_triton_selection_equals_reference(triton_device):
    _compare_backends("triton", triton_device, [(1, 9), (3, 5), (7, 7), (6, 11)])


@pytest.mark.gpu
def test_gpu_triton_selection_equals_reference():
    _compare_backends("triton", torch.device("cuda"), [(24, 24), (48, 60), (64, 64), (1, 577)], batch=16)
