"""Images from the user's disk: a folder of image files, or a .npy array.

Folder: if it has subfolders holding images, each such subfolder (sorted by name) is one class, with every
image below it (ImageFolder-style); otherwise the images directly in it, unlabelled. Files are read with
PIL and sorted by path. An image is gray if its mode is gray ("1", "L", "LA", "I", "I;16", "F"), else RGB
(alpha is dropped); the set is RGB if any image is. 8-bit images are divided by 255, 16-bit ("I", "I;16")
by 65535, float ("F") ones are taken as [0, 1].

.npy array, layouts (N, H, W) gray, (N, H, W, C) or (N, C, H, W) with C ∈ {1, 3, 4} (a 4th, alpha,
channel is dropped). A 4-D array whose axes 1 and 3 both could be channels is read as channels-first
when axis 1 is the smaller, else channels-last. Values u are mapped to x = 2u − 1 by this rule:

    bool                      u = x                  (0 / 1)
    uint8                     u = x / 255
    uint16                    u = x / 65535
    other integers in 0…255   u = x / 255
    floats in [0, 1]          u = x                  (taken as [0, 1] even if they also fit [−1, 1])
    floats in [−1, 1] with a negative value: already in [−1, 1], kept as they are
    anything else (or NaN/inf): ValueError — rescale the array first

Labels (optional): a .npy file (or array) of N non-negative integers; num_classes = max label + 1.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ._optional import require
from .imageset import ImageSet
from .transforms import resize_square

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")
_GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")
_CHANNEL_COUNTS = (1, 3, 4)


def _image_files(folder: Path, recursive: bool) -> list:
    walk = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in walk if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _pil_unit(path: Path, rgb: bool) -> np.ndarray:
    """(H, W, 1 or 3) float32 in [0, 1] from one image file."""
    image_module = require("PIL.Image", "reading image files")
    with image_module.open(path) as image:
        image.load()
        if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
            array = np.asarray(image).astype(np.float32)
            array = np.clip(array if image.mode == "F" else array / 65535.0, 0.0, 1.0)[..., None]
            return np.repeat(array, 3, axis=2) if rgb else array
        if image.mode in ("P", "PA"):
            image = image.convert("RGBA")
        array = np.asarray(image.convert("RGB" if rgb else "L"), dtype=np.float32) / 255.0
    return array if rgb else array[..., None]


def _is_gray(path: Path) -> bool:
    image_module = require("PIL.Image", "reading image files")
    try:
        with image_module.open(path) as image:
            return image.mode in _GRAY_MODES
    except OSError as err:  # PIL.UnidentifiedImageError included
        raise ValueError(f"cannot read the image file {str(path)!r} ({err}); remove or repair it") from err


def load_folder(folder: Path, resolution: Optional[int]) -> ImageSet:
    """Every image in `folder` (see the module docstring), (N, C, H, W) in [−1, 1]."""
    subfolders = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    classes = [(d.name, files) for d in subfolders if (files := _image_files(d, recursive=True))]
    top_level = _image_files(folder, recursive=False)
    if classes and top_level:
        raise ValueError(f"source={str(folder)!r} has class subfolders and also {len(top_level)} images at its "
                         f"top level (e.g. {top_level[0].name}); move those into a class subfolder, or point "
                         f"source at a folder with only one of the two")
    if classes:
        files = [f for _, class_files in classes for f in class_files]
        labels = torch.cat([torch.full((len(fs),), c, dtype=torch.int64) for c, (_, fs) in enumerate(classes)])
    else:
        files, labels = top_level, None
    if not files:
        raise ValueError(f"source={str(folder)!r} holds no image files ({', '.join(IMAGE_SUFFIXES)}), neither "
                         f"directly nor in subfolders")
    rgb = not all(_is_gray(f) for f in files)
    tensors, sizes = [], {}
    for f in files:
        unit = torch.from_numpy(_pil_unit(f, rgb)).permute(2, 0, 1)[None]
        image = (unit * 2 - 1).clamp_(-1, 1)
        sizes.setdefault(tuple(image.shape[-2:]), f)
        tensors.append(image if resolution is None else resize_square(image, resolution))
    if resolution is None and len(sizes) > 1:
        (size_a, file_a), (size_b, file_b) = list(sizes.items())[:2]
        raise ValueError(f"the images in source={str(folder)!r} differ in size ({file_a.name} is "
                         f"{size_a[0]}×{size_a[1]}, {file_b.name} is {size_b[0]}×{size_b[1]}); pass "
                         f"resolution=<int> to resize them all to one square size")
    if classes:
        return ImageSet(torch.cat(tensors), labels, len(classes), folder.name, [name for name, _ in classes])
    return ImageSet(torch.cat(tensors), None, 0, folder.name)


def _channels_first(array: np.ndarray, path: Path) -> np.ndarray:
    """(N, H, W) / (N, H, W, C) / (N, C, H, W) → (N, C, H, W), C ∈ {1, 3}."""
    if array.ndim == 3:
        return array[:, None]
    if array.ndim != 4:
        raise ValueError(f"source={str(path)!r} holds an array of shape {array.shape}; expected (N, H, W), "
                         f"(N, H, W, C) or (N, C, H, W)")
    first, last = array.shape[1] in _CHANNEL_COUNTS, array.shape[3] in _CHANNEL_COUNTS
    if not (first or last):
        raise ValueError(f"source={str(path)!r} holds an array of shape {array.shape}: neither axis 1 nor axis 3 "
                         f"has 1, 3 or 4 channels; save it as (N, H, W), (N, H, W, C) or (N, C, H, W)")
    if last and not (first and array.shape[1] <= array.shape[3]):
        array = np.moveaxis(array, 3, 1)
    return array[:, :3]


def unit_interval_to_signed(array: np.ndarray, name: str) -> torch.Tensor:
    """Pixel array → float32 tensor in [−1, 1] by the value rule of the module docstring."""
    if array.size == 0:
        raise ValueError(f"{name} is an empty array of shape {array.shape}")
    if array.dtype == np.bool_:
        unit = array.astype(np.float32)
    elif array.dtype == np.uint8:
        unit = array.astype(np.float32) / 255.0
    elif array.dtype == np.uint16:
        unit = array.astype(np.float32) / 65535.0
    elif np.issubdtype(array.dtype, np.integer):
        low, high = int(array.min()), int(array.max())
        if low < 0 or high > 255:
            raise ValueError(f"{name} holds {array.dtype} values in [{low}, {high}]; integer pixels must lie in "
                             f"0…255 (or be uint16); rescale it, e.g. to uint8")
        unit = array.astype(np.float32) / 255.0
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ValueError(f"{name} contains NaN or infinite values; remove or replace them")
        low, high = float(array.min()), float(array.max())
        if 0.0 <= low and high <= 1.0:
            unit = array.astype(np.float32)
        elif -1.0 <= low and high <= 1.0:
            return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).clamp_(-1, 1)
        else:
            raise ValueError(f"{name} holds float values in [{low:g}, {high:g}]; float pixels must lie in [0, 1] "
                             f"(or already in [-1, 1]); rescale it, e.g. x / x.max(), or save it as uint8")
    else:
        raise TypeError(f"{name} has dtype {array.dtype}; expected bool, an integer or a float dtype")
    return (torch.from_numpy(np.ascontiguousarray(unit)) * 2 - 1).clamp_(-1, 1)


def read_labels(labels, n: int):
    """(LongTensor (n,), num_classes) from a .npy path or an array-like of n non-negative integers."""
    if isinstance(labels, (str, Path)):
        path = Path(labels).expanduser()
        if not path.is_file():
            raise ValueError(f"labels={str(labels)!r}: no such file; give the path of a .npy file of labels")
        array = np.load(path, allow_pickle=False)
    else:
        array = np.asarray(labels.detach().cpu() if isinstance(labels, torch.Tensor) else labels)
    if array.ndim != 1 or array.shape[0] != n:
        raise ValueError(f"labels must hold one label per image, shape ({n},), got shape {array.shape}")
    if not (np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_):
        raise TypeError(f"labels must be integers, got dtype {array.dtype}; convert them, e.g. "
                        f"labels.astype(np.int64)")
    array = array.astype(np.int64)
    if array.min() < 0:
        raise ValueError(f"labels must be >= 0 (0 … num_classes − 1), got {int(array.min())}")
    return torch.from_numpy(array), int(array.max()) + 1


def load_npy(path: Path, resolution: Optional[int], labels=None) -> ImageSet:
    """Images from a .npy file (see the module docstring), (N, C, H, W) in [−1, 1]."""
    array = np.load(path, allow_pickle=False)
    images = unit_interval_to_signed(_channels_first(array, path), f"source={str(path)!r}")
    if resolution is not None:
        images = resize_square(images, resolution)
    if labels is None:
        return ImageSet(images.contiguous(), None, 0, path.stem)
    label_tensor, num_classes = read_labels(labels, images.shape[0])
    return ImageSet(images.contiguous(), label_tensor, num_classes, path.stem)
