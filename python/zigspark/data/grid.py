"""Image grids and 8-bit pixels.

    pixel = round(255 · (x + 1) / 2), x clamped to [−1, 1]   (NaN → 0)

A grid puts N images of size H×W in rows of `nrow` (torchvision's meaning: images per row), each image
upscaled by an integer factor s with nearest neighbour (default: the smallest s with s·min(H, W) ≥ 64, so
8×8 digits become 64×64 blocks of visible pixels), separated and framed by `padding` gray pixels:

    width  = ncol · s·W + (ncol + 1) · padding,      ncol = min(nrow, N)
    height = rows · (s·H + caption) + (rows + 1) · padding,   rows = ⌈N / ncol⌉

where caption = 12 pixels when labels are drawn under the images, else 0.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence, Union

import torch

from ._optional import require

if TYPE_CHECKING:  # NumPy is imported where it is used: `import zigspark.data` needs only torch
    import numpy as np

MIN_CELL_PIXELS = 64
CAPTION_PIXELS = 12
_PAD_VALUE = 128


def to_uint8(images) -> np.ndarray:
    """(N, C, H, W) tensor (or array) in [−1, 1] → (N, H, W, C) uint8 NumPy array, 0 ↔ −1 and 255 ↔ 1."""
    require("numpy", "to_uint8")
    x = torch.as_tensor(images).detach().to("cpu", torch.float32)
    if x.dim() != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {tuple(x.shape)}; add a batch axis with "
                         f"images[None] for a single image")
    x = torch.nan_to_num(x, nan=-1.0).clamp(-1, 1)
    pixels = torch.round((x + 1) * 127.5).to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).contiguous().numpy()


def make_grid(images, nrow: Optional[int] = None, *, scale: Optional[int] = None, padding: int = 2,
              labels: Optional[Sequence] = None) -> np.ndarray:
    """(N, C, H, W) in [−1, 1], C ∈ {1, 3} → grid pixels, (height, width, C) uint8 (sizes: module docstring).

    labels: optional sequence of N captions (str or int) drawn under the images.
    """
    np = require("numpy", "make_grid")
    pixels = to_uint8(images)
    n, h, w, c = pixels.shape
    if n == 0:
        raise ValueError("images is empty (N = 0); give at least one image")
    if c not in (1, 3):
        raise ValueError(f"images must have 1 (gray) or 3 (RGB) channels, got {c}")
    if nrow is None:
        nrow = math.ceil(math.sqrt(n))
    for name, value, low in (("nrow", nrow, 1), ("padding", padding, 0), ("scale", scale, 1)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if labels is not None and len(labels) != n:
        raise ValueError(f"labels must give one caption per image ({n}), got {len(labels)}")
    if scale is None:
        scale = max(1, math.ceil(MIN_CELL_PIXELS / min(h, w)))
    ncol, rows = min(nrow, n), math.ceil(n / min(nrow, n))
    caption = CAPTION_PIXELS if labels is not None else 0
    cell_h, cell_w = h * scale + caption, w * scale
    grid = np.full((rows * cell_h + (rows + 1) * padding, ncol * cell_w + (ncol + 1) * padding, c), _PAD_VALUE,
                   dtype=np.uint8)
    big = pixels.repeat(scale, axis=1).repeat(scale, axis=2)
    for i in range(n):
        top = padding + (i // ncol) * (cell_h + padding)
        left = padding + (i % ncol) * (cell_w + padding)
        grid[top:top + h * scale, left:left + cell_w] = big[i]
    if labels is not None:
        grid = _draw_captions(grid, labels, ncol, cell_h, cell_w, h * scale, padding)
    return grid


def _draw_captions(grid: np.ndarray, labels, ncol: int, cell_h: int, cell_w: int, image_h: int,
                   padding: int) -> np.ndarray:
    np = require("numpy", "save_image_grid")
    pil_image = require("PIL.Image", "save_image_grid")
    pil_draw = require("PIL.ImageDraw", "save_image_grid")
    canvas = pil_image.fromarray(grid[..., 0] if grid.shape[2] == 1 else grid)
    draw = pil_draw.Draw(canvas)
    ink = 255 if grid.shape[2] == 1 else (255, 255, 255)
    for i, label in enumerate(labels):
        top = padding + (i // ncol) * (cell_h + padding) + image_h
        left = padding + (i % ncol) * (cell_w + padding)
        draw.text((left + 1, top), str(label), fill=ink)
    array = np.asarray(canvas)
    return array[..., None] if array.ndim == 2 else array


def save_image_grid(images, path: Union[str, Path], nrow: Optional[int] = None, *,
                    labels: Optional[Sequence] = None, scale: Optional[int] = None, padding: int = 2) -> Path:
    """Write (N, C, H, W) images in [−1, 1] as one grid image (PNG for a .png path); returns the path.

    nrow is the number of images per row (default ⌈√N⌉); scale the nearest-neighbour upscaling factor
    (default: each image at least 64 pixels on its short side); labels optional captions, one per image.
    Parent folders are created.
    """
    path = Path(path)
    if not path.suffix:
        raise ValueError(f"path={str(path)!r} has no file extension; end it with .png")
    grid = make_grid(images, nrow, scale=scale, padding=padding, labels=labels)
    pil_image = require("PIL.Image", "save_image_grid")
    path.parent.mkdir(parents=True, exist_ok=True)
    pil_image.fromarray(grid[..., 0] if grid.shape[2] == 1 else grid).save(path)
    return path
