"""load_images: one entry point for every source of images.

    load_images(source) = split( channels( read(source, resolution) ) )

read() gives the whole data set in [−1, 1] (builtin.py for "digits", "faces", "photos"; files.py for a folder
or a .npy file), channels() converts gray ↔ RGB when asked, and split() keeps the train, test or all
indices of splits.py (stratified by class when labelled, deterministic under `seed`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Union

from ..validation import check_int
from ._optional import require
from .imageset import ImageSet
from .splits import SPLITS, split_indices
from .transforms import convert_channels, resize_square

BUILTIN_SOURCES = ("digits", "faces", "photos")
_ALIASES = {"lfw": "faces"}
_DEFAULT_RESOLUTION = {"digits": 8, "faces": 25}



def _check_arguments(resolution, split, seed, test_fraction, num_crops, channels) -> None:
    check_int("resolution", resolution, 1, optional=True)
    check_int("num_crops", num_crops, 1, optional=True)
    check_int("seed", seed, 0)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) or not (
            math.isfinite(test_fraction) and 0 < test_fraction < 1):
        raise ValueError(f"test_fraction must be a number strictly between 0 and 1, got {test_fraction!r}")
    if channels is not None and (type(channels) is not int or channels not in (1, 3)):
        raise ValueError(f"channels must be 1 (gray), 3 (RGB) or None (keep the source's), got {channels!r}")


def _unknown_source(source) -> ValueError:
    return ValueError(f"unknown dataset {source!r}: use one of {', '.join(BUILTIN_SOURCES)}, or a path to a "
                      f"folder of images or a .npy file")


def _read(source, resolution, seed, num_crops, labels) -> ImageSet:
    """The whole data set of `source`, at `resolution` if given."""
    require("numpy", "load_images")  # builtin and files need NumPy, which the GPU machine may lack
    from . import builtin, files
    name = _ALIASES.get(source.lower(), source.lower()) if isinstance(source, str) else None
    if name in BUILTIN_SOURCES:
        if labels is not None:
            raise ValueError(f"labels= applies to .npy sources only; {name!r} brings its own labels (or none)")
        if num_crops is not None and name != "photos":
            raise ValueError(f"num_crops applies to source 'photos' only, not {name!r}")
        if name == "photos":
            if resolution is None:
                raise ValueError(f"source 'photos' needs resolution=<int> (the crop size, at most "
                                 f"{builtin.MAX_PHOTO_RESOLUTION}), e.g. resolution=64")
            if resolution > builtin.MAX_PHOTO_RESOLUTION:
                raise ValueError(f"resolution={resolution} is too large for source 'photos': crops are at most "
                                 f"{builtin.MAX_PHOTO_RESOLUTION}×{builtin.MAX_PHOTO_RESOLUTION}; use "
                                 f"resolution <= {builtin.MAX_PHOTO_RESOLUTION}")
            return builtin.load_photos(resolution, num_crops or builtin.DEFAULT_NUM_CROPS, seed)
        data = builtin.load_digits() if name == "digits" else builtin.load_faces()
        if resolution is not None and resolution != _DEFAULT_RESOLUTION[name]:
            data = ImageSet(resize_square(data.images, resolution), data.labels, data.num_classes, data.name,
                            data.class_names)
        return data

    if not isinstance(source, (str, Path)):
        raise TypeError(f"source must be a data set name or a path (str or pathlib.Path), got "
                        f"{type(source).__name__}")
    path = Path(source).expanduser()
    if num_crops is not None:
        raise ValueError("num_crops applies to source 'photos' only, not to a folder or .npy file")
    if path.is_dir():
        if labels is not None:
            raise ValueError("labels= applies to .npy sources only; a folder gets its labels from its class "
                             "subfolders")
        return files.load_folder(path, resolution)
    if path.is_file():
        if path.suffix.lower() != ".npy":
            raise ValueError(f"source={str(source)!r} is a file but not a .npy array; give a .npy file or the "
                             f"folder that holds the images")
        return files.load_npy(path, resolution, labels)
    if path.suffix.lower() == ".npy" or len(path.parts) > 1 or str(source).startswith((".", "~")):
        raise ValueError(f"source={str(source)!r}: no such file or folder; check the path")
    raise _unknown_source(source)


def load_images(source: Union[str, Path], *, resolution: Optional[int] = None, split: str = "train",
                seed: int = 0, test_fraction: float = 0.2, num_crops: Optional[int] = None,
                channels: Optional[int] = None, labels=None) -> ImageSet:
    """Load a data set as images in [−1, 1].

    Args:
        source: "digits" (sklearn, 1,797 8×8 gray, 10 classes), "faces" or "lfw" (skimage, 200 25×25 gray,
            face = 1 / non-face = 0), "photos" (random crops of the bundled photographs, RGB, unlabelled),
            a folder of images (a class per subfolder, if it has subfolders), or a .npy file of (N, H, W),
            (N, H, W, C) or (N, C, H, W) pixels (value rule: zigspark.data.files). Names are matched
            before paths: a folder called "digits" is "./digits".
        resolution: side of the square output images. Digits default 8, faces 25; required for "photos"
            (at most 512); for folders and .npy, None keeps the files' size (a folder's images must then
            agree). Non-square images are centre-cropped, then resized bilinearly (antialiased when shrinking).
        split: "train", "test" or "all". Train and test are disjoint and cover the data set; labelled data
            is split per class (stratified).
        seed: fixes the split (and the photo crops): identical arguments give identical tensors.
        test_fraction: share of each class (or of all images) that goes to the test split, in (0, 1).
        num_crops: number of crops for "photos" (default 256) before the split; use split="all" to get them all.
        channels: 1 or 3 to convert gray ↔ RGB; None keeps the source's channels.
        labels: for a .npy source, a .npy file (or array) of N non-negative integer labels.

    Returns:
        ImageSet with images float32 (N, C, H, W) in [−1, 1], labels int64 (N,) or None, num_classes (0 if
        unlabelled), name and class_names.

    Example:
        >>> train = load_images("digits", resolution=16)          # (1438, 1, 16, 16), 10 classes
        >>> test = load_images("digits", resolution=16, split="test")
    """
    _check_arguments(resolution, split, seed, test_fraction, num_crops, channels)
    data = _read(source, resolution, seed, num_crops, labels)
    if channels is not None and channels != data.channels:
        data = ImageSet(convert_channels(data.images, channels), data.labels, data.num_classes, data.name,
                        data.class_names)
    if split == "all":
        return data
    return data.subset(split_indices(len(data), split, labels=data.labels, seed=seed, test_fraction=test_fraction))


def photo_names() -> list:
    """Names of the bundled photographs that load in this installation (the crops of source 'photos')."""
    from . import builtin
    return builtin.photo_names()
