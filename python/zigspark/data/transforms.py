"""Pixel transforms shared by the sources.

    intensities u ∈ [0, 1]  →  x = 2u − 1 ∈ [−1, 1]
    gray → RGB: replicate;  RGB → gray: Y = 0.299 R + 0.587 G + 0.114 B (ITU-R BT.601, as PIL's "L")
    resize: bilinear, antialiased (a triangle filter widened by the shrink factor) when shrinking;
            a non-square image is first centre-cropped to its short side, so nothing is stretched.

Bilinear and antialiased filters are convex combinations, so values stay in [−1, 1]; the clamp only
removes rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_LUMA = (0.299, 0.587, 0.114)


def to_signed(unit: torch.Tensor) -> torch.Tensor:
    """[0, 1] → [−1, 1], float32."""
    return (unit.to(torch.float32) * 2 - 1).clamp_(-1, 1)


def convert_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """(N, C, H, W) with C ∈ {1, 3} → (N, channels, H, W)."""
    c = images.shape[1]
    if c == channels:
        return images
    if c == 1 and channels == 3:
        return images.expand(-1, 3, -1, -1).contiguous()
    if c == 3 and channels == 1:
        weights = torch.tensor(_LUMA, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
        return (images * weights).sum(dim=1, keepdim=True).clamp_(-1, 1)
    raise ValueError(f"channels={channels}: can convert between 1 (gray) and 3 (RGB) channels only, "
                     f"the images have {c}")


def center_square(images: torch.Tensor) -> torch.Tensor:
    """Crop (N, C, H, W) to its central (N, C, s, s), s = min(H, W)."""
    h, w = images.shape[-2:]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    return images[..., top:top + s, left:left + s]


def resize_square(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """(N, C, H, W) in [−1, 1] → (N, C, resolution, resolution): centre-crop to a square, then bilinear
    resize (antialiased when shrinking). Returns the input itself when nothing changes."""
    if images.shape[-2:] == (resolution, resolution):
        return images
    square = center_square(images)
    if square.shape[-1] == resolution:
        return square.contiguous()
    out = F.interpolate(square.float(), size=(resolution, resolution), mode="bilinear", align_corners=False,
                        antialias=square.shape[-1] > resolution)
    return out.clamp_(-1, 1)
