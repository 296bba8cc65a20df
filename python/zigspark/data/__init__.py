"""zigspark.data: images for the model layer, as float32 (N, C, H, W) tensors in [−1, 1].

    load_images(source, ...) -> ImageSet        digits, faces, photos, an image folder or a .npy file
    batch_indices(n, batch_size, step, seed)   the minibatch of a global step: resumable, deterministic
    save_image_grid(images, path)              a PNG grid, tiny images upscaled so they can be seen
    to_uint8(images)                           (N, H, W, C) uint8 NumPy pixels

Importing this package needs only torch: NumPy, scikit-learn, scikit-image and Pillow are imported by the
functions that use them (the GPU machine has torch, perhaps not the others).
"""

from .batches import batch_indices, batch_stream
from .grid import make_grid, save_image_grid, to_uint8
from .imageset import ImageSet
from .load import BUILTIN_SOURCES, load_images, photo_names
from .splits import split_indices

__all__ = ["BUILTIN_SOURCES", "ImageSet", "batch_indices", "batch_stream", "load_images", "make_grid",
           "photo_names", "save_image_grid", "split_indices", "to_uint8"]
