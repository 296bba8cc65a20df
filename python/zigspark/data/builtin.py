"""The data sets that ship inside installed packages (nothing is downloaded).

    digits  sklearn.datasets.load_digits: 1,797 8×8 gray handwritten digits, intensities 0…16, 10 classes
    faces   skimage.data.lfw_subset: 200 25×25 gray crops of Labeled Faces in the Wild; the first 100 are
            faces, the last 100 background patches; label 1 = face, 0 = non-face
    photos  random square crops of the photographs bundled with scikit-image and scikit-learn (PHOTOS)

A photo crop: pick a photograph p uniformly among those whose short side is ≥ r (r = resolution), a crop
side s uniformly in [r, short side of p], a uniformly placed s×s window, resize it to r×r (antialiased),
and flip it left–right with probability ½. Gray photographs are replicated to RGB. Every draw comes from
one torch.Generator seeded by derive_seed(seed, a key for "photos"), so a seed fixes the crops (and the
photographs are decoded once per process, then cached).
"""

from __future__ import annotations

import warnings
from functools import lru_cache

import numpy as np
import torch

from ._optional import require
from ._seeds import derive_seed
from .imageset import ImageSet
from .transforms import resize_square, to_signed

# (package, name): skimage.data.<name>() or sklearn.datasets.load_sample_image("<name>.jpg").
# Everyday photographs and photographed textures; all load from the installed packages without pooch.
PHOTOS = (("skimage", "astronaut"), ("skimage", "camera"), ("skimage", "chelsea"), ("skimage", "coffee"),
          ("skimage", "rocket"), ("skimage", "coins"), ("skimage", "moon"), ("skimage", "clock"),
          ("skimage", "brick"), ("skimage", "grass"), ("skimage", "gravel"),
          ("skimage", "immunohistochemistry"), ("sklearn", "china"), ("sklearn", "flower"))
MAX_PHOTO_RESOLUTION = 512
DEFAULT_NUM_CROPS = 256
_PHOTOS_SEED_KEY = 0x70686F746F73  # "photos"


@lru_cache(maxsize=1)
def _digits_arrays():
    datasets = require("sklearn.datasets", "the 'digits' data set (sklearn.datasets.load_digits)")
    bunch = datasets.load_digits()
    return bunch.images.astype(np.float32) / 16.0, bunch.target.astype(np.int64)


def load_digits() -> ImageSet:
    """1,797 digits, (1797, 1, 8, 8) in [−1, 1], labels 0…9."""
    unit, target = _digits_arrays()
    images = to_signed(torch.from_numpy(unit).unsqueeze(1))
    return ImageSet(images, torch.from_numpy(target.copy()), 10, "digits", [str(d) for d in range(10)])


@lru_cache(maxsize=1)
def _lfw_array():
    data = require("skimage.data", "the 'faces' data set (skimage.data.lfw_subset)")
    return np.asarray(data.lfw_subset(), dtype=np.float32)  # float64 in [0, 1] in scikit-image 0.26


def load_faces() -> ImageSet:
    """200 LFW crops, (200, 1, 25, 25) in [−1, 1]; label 1 = face (the first 100), 0 = non-face."""
    unit = _lfw_array()
    if unit.shape != (200, 25, 25):
        raise RuntimeError(f"skimage.data.lfw_subset() returned shape {unit.shape}, expected (200, 25, 25); "
                           f"this scikit-image version changed the data set")
    if unit.max() > 1.0:  # documented as uint8 in some versions
        unit = unit / 255.0
    labels = torch.cat([torch.ones(100, dtype=torch.int64), torch.zeros(100, dtype=torch.int64)])
    return ImageSet(to_signed(torch.from_numpy(unit).unsqueeze(1)), labels, 2, "faces", ["non-face", "face"])


@lru_cache(maxsize=None)
def _photo(package: str, name: str):
    """(3, H, W) float32 in [−1, 1], or None when this installation cannot load it without a download."""
    module = require("skimage.data" if package == "skimage" else "sklearn.datasets", "the 'photos' data set")
    try:
        array = getattr(module, name)() if package == "skimage" else module.load_sample_image(f"{name}.jpg")
    except Exception as err:  # e.g. a scikit-image build whose photo needs pooch (a download)
        warnings.warn(f"photos: skipping {package} photograph {name!r}, which does not load here ({err})")
        return None
    array = np.asarray(array)
    if array.dtype != np.uint8:
        raise RuntimeError(f"photos: {package} photograph {name!r} has dtype {array.dtype}, expected uint8")
    unit = torch.from_numpy(array.astype(np.float32) / 255.0)
    unit = unit.unsqueeze(0).expand(3, -1, -1) if unit.dim() == 2 else unit[..., :3].permute(2, 0, 1)
    return to_signed(unit.contiguous())


def photo_names() -> list:
    """Names of the photographs that load in this installation (crops of resolution ≤ their short side)."""
    return [name for package, name in PHOTOS if _photo(package, name) is not None]


def load_photos(resolution: int, num_crops: int, seed: int) -> ImageSet:
    """num_crops random crops, (num_crops, 3, resolution, resolution) in [−1, 1], unlabelled."""
    photos = [(name, image) for package, name in PHOTOS if (image := _photo(package, name)) is not None]
    if not photos:
        raise RuntimeError("photos: none of the bundled photographs loads in this installation; "
                           "reinstall scikit-image and scikit-learn")
    eligible = [(name, image) for name, image in photos if min(image.shape[-2:]) >= resolution]
    if not eligible:
        largest = max(min(image.shape[-2:]) for _, image in photos)
        raise ValueError(f"resolution={resolution} is larger than the short side of every bundled photograph "
                         f"(at most {largest}); use resolution <= {largest}")
    generator = torch.Generator().manual_seed(derive_seed(seed, _PHOTOS_SEED_KEY))

    def uniform_int(low: int, high: int) -> int:  # inclusive bounds
        return int(torch.randint(low, high + 1, (1,), generator=generator))

    crops = torch.empty(num_crops, 3, resolution, resolution)
    for i in range(num_crops):
        _, image = eligible[uniform_int(0, len(eligible) - 1)]
        h, w = image.shape[-2:]
        side = uniform_int(resolution, min(h, w))
        top, left = uniform_int(0, h - side), uniform_int(0, w - side)
        crop = resize_square(image[None, :, top:top + side, left:left + side], resolution)[0]
        crops[i] = crop.flip(-1) if uniform_int(0, 1) else crop
    return ImageSet(crops, None, 0, "photos")
