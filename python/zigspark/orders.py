"""Scan orders over token grids: ZigMa's zigzag paths (Hu et al., ECCV 2024), raster and video orders.

An order of length L = frames·h·w lists, for each scan step t, the raster index (frame·h·w + row·w + col)
of the token visited at step t. A scan "along an order" reads token order[t] at step t and writes its
output back to the same raster position, so no permuted copy is needed.

ZigMa's 8 zigzag paths over an h×w grid. Path i starts at corner i // 2 — top-left, top-right,
bottom-left, bottom-right — and is a row-wise snake for even i, a column-wise snake for odd i, moving
away from its corner. With flip_r = (corner is a bottom one), flip_c = (corner is a right one):

    row-wise  (i even):  r = t // w,  c = t % w,  c ← w−1−c if r is odd
    column-wise (i odd): c = t // h,  r = t % h,  r ← h−1−r if c is odd
    then  r ← h−1−r if flip_r,  c ← w−1−c if flip_c,  index = r·w + c

Video orders on a T×h×w grid: *spatial* applies a 2-D path inside each frame, frames in order;
*temporal* visits, for each spatial position in raster order, all frames forward (or backward).

Built-in orders are closed-form functions of t (the kernels compute them on the fly and read no index
tensor); any other permutation can be given as a LongTensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

KIND_CODES = {"raster": 0, "zigzag": 1, "temporal": 2}


@dataclass(frozen=True)
class ScanOrder:
    """A closed-form scan order. Build it with :func:`raster`, :func:`zigzag` or :func:`temporal`."""

    kind: str            # "raster" | "zigzag" | "temporal"
    h: int
    w: int
    frames: int = 1
    path: int = 0        # zigzag path 0..7 (kind "zigzag")
    reverse: bool = False  # raster: last token first; temporal: frames backward

    def __post_init__(self):
        if self.kind not in KIND_CODES:
            raise ValueError(f"order kind must be one of {sorted(KIND_CODES)}, got {self.kind!r}")
        for name in ("h", "w", "frames"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"order {name} must be a positive int, got {value!r}")
        if not 0 <= self.path < 8:
            raise ValueError(f"zigzag path must be in 0..7, got {self.path}")

    def __len__(self) -> int:
        return self.frames * self.h * self.w

    @property
    def params(self) -> tuple[int, int, int, int, int, int]:
        """(kind code, frames, h, w, path, reverse): what the kernels receive instead of an index tensor."""
        return KIND_CODES[self.kind], self.frames, self.h, self.w, self.path, int(self.reverse)

    def indices(self, device=None) -> torch.Tensor:
        """The order materialised: LongTensor of length L with the raster index visited at each step."""
        return order_index(torch.arange(len(self), device=device), *self.params)

    def inverse_indices(self, device=None) -> torch.Tensor:
        return inverse(self.indices(device))


def zigzag_index(t: torch.Tensor, h: int, w: int, path: int) -> torch.Tensor:
    """Raster index visited at step t (0 ≤ t < h·w) of zigzag path `path` — the formula in the docstring."""
    corner, column_wise = divmod(path, 2)
    if column_wise:
        c, r = t // h, t % h
        r = torch.where(c % 2 == 1, h - 1 - r, r)
    else:
        r, c = t // w, t % w
        c = torch.where(r % 2 == 1, w - 1 - c, c)
    if corner >= 2:
        r = h - 1 - r
    if corner % 2 == 1:
        c = w - 1 - c
    return r * w + c


def order_index(t: torch.Tensor, kind: int, frames: int, h: int, w: int, path: int, reverse: int) -> torch.Tensor:
    """Raster index visited at step t for the order with these params (see ScanOrder.params)."""
    hw = h * w
    length = frames * hw
    if kind == KIND_CODES["raster"]:
        return length - 1 - t if reverse else t.clone()
    if kind == KIND_CODES["zigzag"]:
        frame, s = t // hw, t % hw
        return frame * hw + zigzag_index(s, h, w, path)
    if kind == KIND_CODES["temporal"]:
        s, f = t // frames, t % frames
        if reverse:
            f = frames - 1 - f
        return f * hw + s
    raise ValueError(f"unknown order kind code {kind}")


# ---- constructors ------------------------------------------------------------------------------------

def raster(h: int, w: int = 1, frames: int = 1, reverse: bool = False) -> ScanOrder:
    """Raster order (row by row, frame by frame), or its reverse."""
    return ScanOrder("raster", h, w, frames, 0, reverse)


def zigzag(h: int, w: int, path: int, frames: int = 1) -> ScanOrder:
    """ZigMa zigzag path `path` (0..7) over an h×w grid; with frames > 1, applied inside each frame."""
    return ScanOrder("zigzag", h, w, frames, path)


def temporal(frames: int, h: int, w: int, backward: bool = False) -> ScanOrder:
    """For each spatial position (raster order), every frame forward — or backward."""
    return ScanOrder("temporal", h, w, frames, 0, backward)


def zigzag_path(h: int, w: int, i: int) -> torch.Tensor:
    """LongTensor of length h·w: the raster indices in the order ZigMa's path i visits them."""
    return zigzag(h, w, i).indices()


def zigzag_paths(h: int, w: int) -> list[torch.Tensor]:
    """All 8 zigzag paths of an h×w grid, numbered as ZigMa numbers them."""
    return [zigzag_path(h, w, i) for i in range(8)]


def path_for_layer(layer_index: int) -> int:
    """ZigMa's layer i scans along path i mod 8."""
    return layer_index % 8


def inverse(order: torch.Tensor) -> torch.Tensor:
    """The inverse permutation: inverse(order)[order[t]] = t."""
    inv = torch.empty_like(order)
    inv[order] = torch.arange(order.numel(), device=order.device, dtype=order.dtype)
    return inv


def check_order(order, length: int, device: torch.device):
    """Validate an `order=` argument for a sequence of `length` steps.

    Returns None (identity), a ScanOrder, or a LongTensor permutation on `device`.
    """
    if order is None:
        return None
    if isinstance(order, ScanOrder):
        if len(order) != length:
            raise ValueError(f"order covers {len(order)} positions (frames={order.frames}, h={order.h}, "
                             f"w={order.w}) but the sequence length L is {length}")
        return order
    if not isinstance(order, torch.Tensor):
        raise TypeError(f"order must be a zigspark.orders.ScanOrder or a LongTensor permutation, got "
                        f"{type(order).__name__}")
    if order.dtype not in (torch.int64, torch.int32) or order.dim() != 1:
        raise TypeError(f"an order tensor must be a 1-D integer (int64/int32) tensor, got {order.dtype} with "
                        f"shape {tuple(order.shape)}")
    if order.numel() != length:
        raise ValueError(f"order has {order.numel()} entries but the sequence length L is {length}")
    order = order.to(device=device, dtype=torch.int64).contiguous()  # the kernels read it with stride 1
    seen = torch.zeros(length, dtype=torch.bool, device=device)
    in_range = bool(((order >= 0) & (order < length)).all())
    if in_range:
        seen[order] = True
    if not in_range or not bool(seen.all()):
        raise ValueError(f"order must be a permutation of 0..{length - 1} (every position exactly once)")
    return order
