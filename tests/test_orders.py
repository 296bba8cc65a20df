"""zigspark.orders: the closed-form scan orders against orders built step by step."""

import pytest
import torch

from zigspark import orders

pytestmark = pytest.mark.cpu

GRIDS = [(1, 1), (1, 5), (5, 1), (2, 2), (3, 4), (4, 3), (5, 7), (8, 8), (7, 16)]
CORNERS = [(0, 0, 1, 1), (0, -1, 1, -1), (-1, 0, -1, 1), (-1, -1, -1, -1)]  # TL, TR, BL, BR


def walked_paths(h, w):
    """ZigMa's construction, generalised to h×w: per corner the row-wise snake, then the column-wise one."""
    paths = []
    for start_row, start_col, dir_row, dir_col in CORNERS:
        r0, c0 = start_row % h, start_col % w
        rows = []
        for i in range(h):
            for j in range(w):
                col = j if i % 2 == 0 else w - 1 - j
                rows.append((r0 + dir_row * i) * w + c0 + dir_col * col)
        cols = []
        for j in range(w):
            for i in range(h):
                row = i if j % 2 == 0 else h - 1 - i
                cols.append((r0 + dir_row * row) * w + c0 + dir_col * j)
        paths += [rows, cols]
    return [torch.tensor(p) for p in paths]


@pytest.mark.parametrize("h,w", GRIDS)
def test_zigzag_paths_match_the_walked_construction(h, w):
    for i, (closed, walked) in enumerate(zip(orders.zigzag_paths(h, w), walked_paths(h, w))):
        assert torch.equal(closed, walked), f"path {i} on {h}x{w}"


@pytest.mark.parametrize("h,w", GRIDS)
def test_paths_are_spatially_continuous_permutations(h, w):
    for i, path in enumerate(orders.zigzag_paths(h, w)):
        assert torch.equal(torch.sort(path).values, torch.arange(h * w)), f"path {i} is not a permutation"
        r, c = path // w, path % w
        steps = (r.diff().abs() + c.diff().abs())
        assert bool((steps == 1).all()), f"path {i} on {h}x{w} jumps"


def test_path_numbering_corners_and_directions():
    h, w = 3, 4
    p = orders.zigzag_paths(h, w)
    assert p[0][:5].tolist() == [0, 1, 2, 3, 7]        # top-left, along the row, then back
    assert p[1][:4].tolist() == [0, 4, 8, 9]           # top-left, down the column, then up
    assert p[2][:5].tolist() == [3, 2, 1, 0, 4]        # top-right
    assert p[5][:4].tolist() == [8, 4, 0, 1]           # bottom-left, column-wise: up first
    assert p[7][0].item() == 11 and p[6][0].item() == 11
    assert [orders.path_for_layer(i) for i in (0, 7, 8, 13)] == [0, 7, 0, 5]


def test_inverse_and_raster():
    path = orders.zigzag_path(5, 7, 6)
    inv = orders.inverse(path)
    assert torch.equal(inv[path], torch.arange(35)) and torch.equal(path[inv], torch.arange(35))
    assert torch.equal(orders.raster(3, 4).indices(), torch.arange(12))
    assert torch.equal(orders.raster(3, 4, reverse=True).indices(), torch.arange(12).flip(0))
    assert torch.equal(orders.zigzag(5, 7, 6).inverse_indices(), inv)


@pytest.mark.parametrize("frames,h,w", [(1, 3, 4), (3, 2, 5), (4, 3, 3)])
def test_video_orders(frames, h, w):
    hw = h * w
    for i in range(8):
        spatial = orders.zigzag(h, w, i, frames=frames).indices()
        expected = torch.cat([f * hw + orders.zigzag_path(h, w, i) for f in range(frames)])
        assert torch.equal(spatial, expected)
    forward = orders.temporal(frames, h, w).indices()
    assert torch.equal(forward, torch.tensor([f * hw + s for s in range(hw) for f in range(frames)]))
    backward = orders.temporal(frames, h, w, backward=True).indices()
    assert torch.equal(backward, torch.tensor([f * hw + s for s in range(hw) for f in reversed(range(frames))]))


def test_check_order_accepts_and_rejects():
    assert orders.check_order(None, 6, torch.device("cpu")) is None
    perm = torch.randperm(6)
    assert torch.equal(orders.check_order(perm.int(), 6, torch.device("cpu")), perm)
    with pytest.raises(ValueError, match="covers 12 positions .* L is 6"):
        orders.check_order(orders.zigzag(3, 4, 0), 6, torch.device("cpu"))
    with pytest.raises(ValueError, match="has 5 entries"):
        orders.check_order(torch.arange(5), 6, torch.device("cpu"))
    with pytest.raises(ValueError, match="permutation of 0..5"):
        orders.check_order(torch.tensor([0, 1, 2, 3, 4, 4]), 6, torch.device("cpu"))
    with pytest.raises(ValueError, match="permutation"):
        orders.check_order(torch.tensor([0, 1, 2, 3, 4, 9]), 6, torch.device("cpu"))
    with pytest.raises(TypeError, match="1-D integer"):
        orders.check_order(torch.arange(6.0), 6, torch.device("cpu"))
    with pytest.raises(TypeError, match="ScanOrder or a LongTensor"):
        orders.check_order([0, 1, 2], 3, torch.device("cpu"))
    with pytest.raises(ValueError, match="path must be in 0..7"):
        orders.zigzag(3, 3, 8)
    with pytest.raises(ValueError, match="h must be a positive int"):
        orders.zigzag(0, 3, 1)
