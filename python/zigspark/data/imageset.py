"""ImageSet: the one container every data source returns.

    images  (N, C, H, W) float32 in [−1, 1]   (x = 2·u − 1 for pixel intensities u ∈ [0, 1])
    labels  (N,) int64 in 0 … num_classes − 1, or None when unlabelled (then num_classes = 0)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class ImageSet:
    """Images in [−1, 1] with optional class labels.

    Attributes:
        images: float32 (N, C, H, W) in [−1, 1], C = 1 (gray) or 3 (RGB).
        labels: int64 (N,) in [0, num_classes), or None.
        num_classes: number of classes, 0 when unlabelled.
        name: where the images came from ("digits", "faces", "photos", a folder or file name).
        class_names: one name per class, or None.
    """

    images: torch.Tensor
    labels: Optional[torch.Tensor]
    num_classes: int
    name: str
    class_names: Optional[list] = None

    def __post_init__(self):
        if not isinstance(self.images, torch.Tensor) or self.images.dim() != 4:
            raise ValueError(f"ImageSet images must be a 4-D (N, C, H, W) tensor, got "
                             f"{getattr(self.images, 'shape', type(self.images).__name__)}")
        if self.images.dtype != torch.float32:
            raise TypeError(f"ImageSet images must be float32, got {self.images.dtype}")
        if self.labels is not None:
            if self.labels.dtype != torch.int64 or self.labels.shape != (self.images.shape[0],):
                raise ValueError(f"ImageSet labels must be int64 of shape ({self.images.shape[0]},), got "
                                 f"{self.labels.dtype} {tuple(self.labels.shape)}")
            if self.num_classes < 1:
                raise ValueError("ImageSet with labels needs num_classes >= 1")
        elif self.num_classes != 0:
            raise ValueError(f"an unlabelled ImageSet has num_classes 0, got {self.num_classes}")

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W)."""
        return self.images.shape[2], self.images.shape[3]

    def subset(self, indices: torch.Tensor) -> "ImageSet":
        """The examples at `indices` (LongTensor (M,)), as a new ImageSet with copied tensors."""
        labels = None if self.labels is None else self.labels[indices]
        return ImageSet(self.images[indices].contiguous(), labels, self.num_classes, self.name, self.class_names)

    def __repr__(self) -> str:
        n, c, h, w = self.images.shape
        classes = f"{self.num_classes} classes" if self.labels is not None else "unlabelled"
        return f"ImageSet({self.name!r}: {n} images {c}×{h}×{w}, {classes})"
