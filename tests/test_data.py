"""zigspark.data: every source's shapes, ranges and labels, resizing, channels, deterministic stratified
splits, folders and .npy files, bad inputs, image grids and the resumable batch stream."""

import ast
import itertools
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from zigspark import data
from zigspark.data import _optional, builtin
from zigspark.data.transforms import resize_square

pytestmark = pytest.mark.cpu

EXPECTED_PHOTOS = ["astronaut", "camera", "chelsea", "coffee", "rocket", "coins", "moon", "clock", "brick",
                   "grass", "gravel", "immunohistochemistry", "china", "flower"]


def check_imageset(d, n, c, h, w, num_classes):
    assert d.images.shape == (n, c, h, w) and d.images.dtype == torch.float32 and d.images.is_contiguous()
    assert d.images.min() >= -1 and d.images.max() <= 1 and torch.isfinite(d.images).all()
    assert d.num_classes == num_classes and len(d) == n
    if num_classes:
        assert d.labels.dtype == torch.int64 and d.labels.shape == (n,)
        assert 0 <= d.labels.min() and d.labels.max() < num_classes
    else:
        assert d.labels is None


def codes_of(images):
    """Recover k from images whose pixels all equal k/255 (the numbered .npy fixture)."""
    return torch.round((images[:, 0, 0, 0] + 1) * 127.5).long()


@pytest.fixture
def numbered_npy(tmp_path):
    """60 uint8 6×6 images, image k filled with k, and labels k % 3 (20 per class) in a second file."""
    k = np.arange(60, dtype=np.uint8)
    np.save(tmp_path / "numbered.npy", np.broadcast_to(k[:, None, None], (60, 6, 6)).copy())
    np.save(tmp_path / "labels.npy", (k % 3).astype(np.int64))
    return tmp_path / "numbered.npy", tmp_path / "labels.npy"


# ---- built-in sources ------------------------------------------------------------------------------------------

def test_digits_are_sklearn_digits_in_signed_range():
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    everything = data.load_images("digits", split="all")
    check_imageset(everything, 1797, 1, 8, 8, 10)
    bunch = sklearn_datasets.load_digits()
    assert torch.allclose(everything.images[:, 0], torch.from_numpy(bunch.images / 8.0 - 1).float())
    assert torch.equal(everything.labels, torch.from_numpy(bunch.target).long())
    assert everything.images.min() == -1 and everything.images.max() == 1
    assert everything.class_names == [str(i) for i in range(10)] and everything.name == "digits"
    assert torch.equal(data.load_images("Digits", split="all").images, everything.images)  # names ignore case
    train, test = data.load_images("digits"), data.load_images("digits", split="test")
    assert len(train) + len(test) == 1797 and abs(len(test) - 0.2 * 1797) < 10


def test_digits_resize_up_and_down():
    big = data.load_images("digits", resolution=16, split="all")
    check_imageset(big, 1797, 1, 16, 16, 10)
    small = data.load_images("digits", resolution=4, split="all")
    check_imageset(small, 1797, 1, 4, 4, 10)
    original = data.load_images("digits", split="all").images
    # resizing moves pixels, not brightness: per-image means agree closely
    for resized in (big.images, small.images):
        assert (resized.mean(dim=(1, 2, 3)) - original.mean(dim=(1, 2, 3))).abs().max() < 0.1


def test_shrinking_is_antialiased():
    noise = torch.rand(4, 1, 64, 64) * 2 - 1
    shrunk = resize_square(noise, 8)
    # an 8× shrink that averages ~8×8 pixels divides the noise std by ~8; plain bilinear only by ~2
    assert shrunk.shape == (4, 1, 8, 8) and shrunk.std() < 0.25 * noise.std()


def test_faces_labels_faces_one_and_non_faces_zero():
    pytest.importorskip("skimage")
    everything = data.load_images("lfw", split="all")
    check_imageset(everything, 200, 1, 25, 25, 2)
    assert everything.class_names == ["non-face", "face"] and everything.name == "faces"
    assert everything.labels[:100].eq(1).all() and everything.labels[100:].eq(0).all()
    # faces are aligned crops: their per-pixel spread across images is smaller than the backgrounds'
    assert everything.images[:100].std(0).mean() < everything.images[100:].std(0).mean()
    train, test = data.load_images("faces"), data.load_images("faces", split="test")
    assert torch.bincount(train.labels).tolist() == [80, 80] and torch.bincount(test.labels).tolist() == [20, 20]
    assert data.load_images("faces", resolution=12).images.shape == (160, 1, 12, 12)


def test_photos_load_and_crop_deterministically():
    pytest.importorskip("skimage")
    pytest.importorskip("sklearn")
    assert data.photo_names() == EXPECTED_PHOTOS
    crops = data.load_images("photos", resolution=16, num_crops=20, split="all")
    check_imageset(crops, 20, 3, 16, 16, 0)
    assert crops.name == "photos"
    again = data.load_images("photos", resolution=16, num_crops=20, split="all")
    other = data.load_images("photos", resolution=16, num_crops=20, split="all", seed=1)
    assert torch.equal(crops.images, again.images) and not torch.equal(crops.images, other.images)
    assert len(data.load_images("photos", resolution=16, num_crops=20)) == 16
    whole = data.load_images("photos", resolution=512, num_crops=2, split="all")
    check_imageset(whole, 2, 3, 512, 512, 0)


def test_photos_resolution_is_required_and_bounded():
    with pytest.raises(ValueError, match="resolution"):
        data.load_images("photos")
    with pytest.raises(ValueError, match="at most 512"):
        data.load_images("photos", resolution=513)


def test_channel_conversion():
    rgb_digits = data.load_images("digits", channels=3, split="all")
    assert rgb_digits.images.shape == (1797, 3, 8, 8)
    assert torch.equal(rgb_digits.images[:, 0], rgb_digits.images[:, 2])
    rgb = data.load_images("photos", resolution=8, num_crops=4, split="all")
    gray = data.load_images("photos", resolution=8, num_crops=4, split="all", channels=1)
    luma = 0.299 * rgb.images[:, 0] + 0.587 * rgb.images[:, 1] + 0.114 * rgb.images[:, 2]
    assert gray.images.shape == (4, 1, 8, 8) and torch.allclose(gray.images[:, 0], luma, atol=1e-6)


# ---- splits ----------------------------------------------------------------------------------------------------

def test_splits_are_disjoint_cover_everything_and_are_stratified(numbered_npy):
    images, labels = numbered_npy
    parts = {s: data.load_images(images, labels=labels, split=s, seed=3) for s in ("train", "test", "all")}
    train, test = codes_of(parts["train"].images), codes_of(parts["test"].images)
    assert set(train.tolist()).isdisjoint(test.tolist())
    assert sorted(train.tolist() + test.tolist()) == list(range(60))
    assert torch.equal(codes_of(parts["all"].images), torch.arange(60))
    assert torch.equal(parts["test"].labels, test % 3)  # labels travel with their images
    assert torch.bincount(parts["test"].labels).tolist() == [4, 4, 4]  # 20 % of each class of 20
    assert parts["train"].num_classes == 3


def test_splits_are_deterministic_and_depend_on_the_seed(numbered_npy):
    images, _ = numbered_npy
    a = data.load_images(images, split="test", seed=5)
    b = data.load_images(images, split="test", seed=5)
    c = data.load_images(images, split="test", seed=6)
    assert torch.equal(a.images, b.images) and not torch.equal(a.images, c.images)
    assert len(a) == 12 and a.labels is None  # unlabelled: ⌊0.2·60 + ½⌋ images


def test_digits_split_keeps_class_proportions():
    everything = data.load_images("digits", split="all")
    test = data.load_images("digits", split="test", test_fraction=0.3, seed=11)
    per_class = torch.bincount(everything.labels)
    expected = torch.floor(0.3 * per_class.double() + 0.5).long()
    assert torch.equal(torch.bincount(test.labels, minlength=10), expected)


def test_split_indices_of_tiny_set_refuse_an_empty_split():
    half = data.split_indices(10, "test", seed=0, test_fraction=0.5)
    assert len(half) == 5 and torch.equal(half, half.sort().values)  # sorted: a split keeps the source order
    with pytest.raises(ValueError, match="test split .* is empty"):
        data.split_indices(2, "test", test_fraction=0.2)


# ---- folders and .npy files ------------------------------------------------------------------------------------

def write_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_folder_without_subfolders_is_unlabelled(tmp_path):
    for k in range(4):
        write_png(tmp_path / "flat" / f"{k}.png", np.full((10, 7), 85 * (k % 4), dtype=np.uint8))
    d = data.load_images(tmp_path / "flat", split="all")
    check_imageset(d, 4, 1, 10, 7, 0)
    assert d.name == "flat"
    assert torch.allclose(d.images[:, 0, 0, 0], torch.tensor([-1.0, -1 / 3, 1 / 3, 1.0]), atol=1e-6)
    square = data.load_images(str(tmp_path / "flat"), resolution=5, split="all")
    check_imageset(square, 4, 1, 5, 5, 0)


def test_folder_with_class_subfolders(tmp_path):
    rng = np.random.default_rng(0)
    for cls, count in (("cat", 5), ("dog", 10)):
        for k in range(count):
            write_png(tmp_path / "pets" / cls / f"{k:02d}.png", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    write_png(tmp_path / "pets" / "dog" / "nested" / "extra.png", np.zeros((8, 8), dtype=np.uint8))  # gray
    (tmp_path / "pets" / "empty").mkdir()
    d = data.load_images(tmp_path / "pets", split="all")
    check_imageset(d, 16, 3, 8, 8, 2)
    assert d.class_names == ["cat", "dog"] and torch.bincount(d.labels).tolist() == [5, 11]
    first = np.asarray(Image.open(tmp_path / "pets" / "cat" / "00.png"), dtype=np.float32) / 127.5 - 1
    assert torch.allclose(d.images[0].permute(1, 2, 0), torch.from_numpy(first), atol=1e-6)
    test = data.load_images(tmp_path / "pets", split="test")
    assert torch.bincount(test.labels).tolist() == [1, 2]


def test_folder_errors(tmp_path):
    write_png(tmp_path / "mixed" / "a.png", np.zeros((8, 8), dtype=np.uint8))
    write_png(tmp_path / "mixed" / "b.png", np.zeros((9, 8), dtype=np.uint8))
    with pytest.raises(ValueError, match="differ in size.*resolution="):
        data.load_images(tmp_path / "mixed")
    assert data.load_images(tmp_path / "mixed", resolution=4, split="all").images.shape == (2, 1, 4, 4)
    (tmp_path / "nothing").mkdir()
    (tmp_path / "nothing" / "notes.txt").write_text("no images")
    with pytest.raises(ValueError, match="no image files"):
        data.load_images(tmp_path / "nothing")
    write_png(tmp_path / "both" / "cls" / "a.png", np.zeros((8, 8), dtype=np.uint8))
    write_png(tmp_path / "both" / "stray.png", np.zeros((8, 8), dtype=np.uint8))
    with pytest.raises(ValueError, match="stray.png"):
        data.load_images(tmp_path / "both")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read the image file .*bad.png"):
        data.load_images(tmp_path / "broken")


def test_npy_layouts_and_value_rules(tmp_path):
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (5, 6, 7, 3), dtype=np.uint8)
    expected = torch.from_numpy(pixels.astype(np.float32) / 127.5 - 1).permute(0, 3, 1, 2)
    layouts = {"nhwc_uint8": pixels, "nchw_uint8": pixels.transpose(0, 3, 1, 2),
               "nchw_unit": pixels.transpose(0, 3, 1, 2).astype(np.float64) / 255,
               "nhwc_int64": pixels.astype(np.int64)}
    for name, array in layouts.items():
        np.save(tmp_path / f"{name}.npy", array)
        d = data.load_images(tmp_path / f"{name}.npy", split="all")
        assert d.name == name
        check_imageset(d, 5, 3, 6, 7, 0)
        assert torch.allclose(d.images, expected, atol=1e-6), name
    signed = rng.uniform(-1, 1, (5, 1, 4, 4)).astype(np.float32)
    np.save(tmp_path / "signed.npy", signed)
    assert torch.equal(data.load_images(tmp_path / "signed.npy", split="all").images, torch.from_numpy(signed))
    np.save(tmp_path / "gray.npy", pixels[..., 0])
    gray = data.load_images(tmp_path / "gray.npy", split="all", channels=3)
    assert gray.images.shape == (5, 3, 6, 7) and torch.equal(gray.images[:, 1], expected[:, 0])
    np.save(tmp_path / "rgba.npy", np.concatenate([pixels, pixels[..., :1]], axis=3))
    assert torch.allclose(data.load_images(tmp_path / "rgba.npy", split="all").images, expected, atol=1e-6)
    assert data.load_images(tmp_path / "nhwc_uint8.npy", resolution=3, split="all").images.shape == (5, 3, 3, 3)


def test_npy_labels_file_and_array(numbered_npy):
    images, labels = numbered_npy
    d = data.load_images(images, labels=labels, split="all")
    assert d.num_classes == 3 and torch.equal(d.labels, torch.arange(60) % 3)
    from_array = data.load_images(images, labels=np.arange(60) % 4, split="all")
    assert from_array.num_classes == 4


def test_npy_errors(tmp_path, numbered_npy):
    images, _ = numbered_npy
    np.save(tmp_path / "bright.npy", np.full((3, 4, 4), 2.5))
    with pytest.raises(ValueError, match=r"float values in \[2.5, 2.5\].*rescale"):
        data.load_images(tmp_path / "bright.npy")
    np.save(tmp_path / "nan.npy", np.full((3, 4, 4), np.nan))
    with pytest.raises(ValueError, match="NaN"):
        data.load_images(tmp_path / "nan.npy")
    np.save(tmp_path / "five_d.npy", np.zeros((2, 3, 4, 4, 1), dtype=np.uint8))
    with pytest.raises(ValueError, match="shape"):
        data.load_images(tmp_path / "five_d.npy")
    np.save(tmp_path / "no_channels.npy", np.zeros((2, 5, 6, 7), dtype=np.uint8))
    with pytest.raises(ValueError, match="channels"):
        data.load_images(tmp_path / "no_channels.npy")
    with pytest.raises(ValueError, match=r"labels must hold one label per image, shape \(60,\)"):
        data.load_images(images, labels=np.zeros(59, dtype=np.int64))
    with pytest.raises(TypeError, match="labels must be integers"):
        data.load_images(images, labels=np.zeros(60))
    with pytest.raises(ValueError, match="labels must be >= 0"):
        data.load_images(images, labels=-np.ones(60, dtype=np.int64))
    with pytest.raises(ValueError, match="no such file"):
        data.load_images(images, labels=tmp_path / "missing.npy")


# ---- bad arguments ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, error, message", [
    (dict(source="digitz"), ValueError, "unknown dataset 'digitz': use one of digits, faces, photos, or a path"),
    (dict(source="no/such/folder"), ValueError, "no such file or folder"),
    (dict(source="missing.npy"), ValueError, "no such file or folder"),
    (dict(source=3), TypeError, "source must be"),
    (dict(source="digits", split="val"), ValueError, "split must be one of train, test, all"),
    (dict(source="digits", resolution=0), ValueError, "resolution must be >= 1"),
    (dict(source="digits", resolution="8"), TypeError, "resolution must be an int"),
    (dict(source="digits", test_fraction=1.0), ValueError, "test_fraction must be a number strictly between"),
    (dict(source="digits", channels=2), ValueError, "channels must be 1"),
    (dict(source="digits", channels=3.0), ValueError, "channels must be 1"),
    (dict(source="digits", seed=-1), ValueError, "seed must be >= 0"),
    (dict(source="digits", num_crops=4), ValueError, "num_crops applies to source 'photos' only"),
    (dict(source="faces", labels=[0, 1]), ValueError, "labels= applies to .npy sources only"),
])
def test_bad_arguments_name_the_argument_and_the_fix(kwargs, error, message):
    with pytest.raises(error, match=message):
        data.load_images(**kwargs)


def test_a_file_that_is_not_npy_is_refused(tmp_path):
    (tmp_path / "images.txt").write_text("x")
    with pytest.raises(ValueError, match="not a .npy array"):
        data.load_images(tmp_path / "images.txt")


def test_missing_optional_package_says_which_pip_install(monkeypatch):
    with pytest.raises(ImportError, match="pip install scikit-image"):
        _optional.require("skimage.not_a_module_xyz", "the test")
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    builtin._digits_arrays.cache_clear()
    try:
        with pytest.raises(ImportError, match="digits.*`pip install scikit-learn`"):
            data.load_images("digits")
    finally:
        builtin._digits_arrays.cache_clear()


def test_importing_the_package_needs_only_torch():
    """The GPU machine may lack NumPy, scikit-learn, scikit-image and Pillow: no module that
    `import zigspark.data` loads (following top-level imports from __init__) may import them at top level."""
    optional = {"numpy", "sklearn", "skimage", "PIL"}
    folder = Path(data.__file__).parent
    todo, seen = ["__init__"], set()
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        for node in ast.parse((folder / f"{module}.py").read_text()).body:
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                todo += [node.module] if node.module else [a.name for a in node.names]
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            assert not {n.split(".")[0] for n in names} & optional, f"{module}.py imports {names} at top level"
    assert {"__init__", "load", "grid", "batches"} <= seen and "builtin" not in seen


# ---- grids and pixels ------------------------------------------------------------------------------------------

def test_to_uint8_maps_the_signed_range_to_bytes():
    x = torch.tensor([-1.0, 0.0, 1.0, 2.0, float("nan")]).view(1, 1, 1, 5).expand(2, 3, 1, 5)
    pixels = data.to_uint8(x)
    assert pixels.shape == (2, 1, 5, 3) and pixels.dtype == np.uint8
    assert pixels[0, 0, :, 0].tolist() == [0, 128, 255, 255, 0]
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        data.to_uint8(torch.zeros(3, 8, 8))


def test_save_image_grid_writes_an_upscaled_png(tmp_path):
    digits = data.load_images("digits", split="all").images[:10]
    path = data.save_image_grid(digits, tmp_path / "sub" / "digits.png", nrow=4)
    with Image.open(path) as png:
        assert png.format == "PNG" and png.mode == "L"
        # 8×8 images upscaled 8× to 64 px; 4 per row, 3 rows, 2 px padding around every cell
        assert png.size == (4 * 64 + 5 * 2, 3 * 64 + 4 * 2)
        grid = np.asarray(png)
    first = data.to_uint8(digits[:1])[0, :, :, 0]
    assert np.array_equal(grid[2:66:8, 2:66:8], first)  # nearest neighbour: every 8th pixel is a source pixel
    assert np.array_equal(grid[2:10, 2:10], np.full((8, 8), first[0, 0]))
    photos = data.load_images("photos", resolution=32, num_crops=3, split="all").images
    path = data.save_image_grid(photos, tmp_path / "photos.png", labels=["a", "b", 3])
    with Image.open(path) as png:
        assert png.mode == "RGB" and png.size == (2 * 64 + 3 * 2, 2 * (64 + 12) + 3 * 2)
    with pytest.raises(ValueError, match="labels must give one caption per image"):
        data.save_image_grid(photos, tmp_path / "bad.png", labels=["a"])
    with pytest.raises(ValueError, match="no file extension"):
        data.save_image_grid(photos, tmp_path / "grid")


# ---- the batch stream ------------------------------------------------------------------------------------------

def test_batch_indices_cover_each_epoch_exactly_once():
    for n, batch_size in ((12, 4), (10, 3), (3, 7)):
        steps = math.lcm(n, batch_size) // batch_size * 2  # two whole epochs' worth of positions, or more
        stream = torch.cat([data.batch_indices(n, batch_size, s, seed=2) for s in range(steps)])
        assert data.batch_indices(n, batch_size, steps - 1, seed=2).shape == (batch_size,)
        epochs = stream.view(-1, n)
        assert all(sorted(e.tolist()) == list(range(n)) for e in epochs), (n, batch_size)
        assert not all(torch.equal(epochs[0], e) for e in epochs[1:])  # a fresh permutation per epoch


def test_batch_indices_is_a_pure_function_so_resuming_is_exact():
    uninterrupted = [b for _, b in itertools.islice(data.batch_stream(100, 16, seed=7), 30)]
    later = [data.batch_indices(100, 16, s, seed=7) for s in (29, 3, 17)]  # any order, any time
    assert all(torch.equal(b, uninterrupted[s]) for b, s in zip(later, (29, 3, 17)))
    resumed = list(itertools.islice(data.batch_stream(100, 16, seed=7, start_step=20), 10))
    assert [s for s, _ in resumed] == list(range(20, 30))
    assert all(torch.equal(b, uninterrupted[s]) for s, b in resumed)
    assert not torch.equal(data.batch_indices(100, 16, 0, seed=8), uninterrupted[0])
    assert data.batch_indices(100, 16, 0).dtype == torch.int64


@pytest.mark.parametrize("name, kwargs, error", [
    ("n", dict(n=0, batch_size=4, step=0), ValueError),
    ("batch_size", dict(n=10, batch_size=0, step=0), ValueError),
    ("step", dict(n=10, batch_size=4, step=-1), ValueError),
    ("step", dict(n=10, batch_size=4, step=1.0), TypeError),
    ("seed", dict(n=10, batch_size=4, step=0, seed=-2), ValueError),
])
def test_batch_indices_bad_arguments(name, kwargs, error):
    with pytest.raises(error, match=f"^{name} must"):
        data.batch_indices(**kwargs)
