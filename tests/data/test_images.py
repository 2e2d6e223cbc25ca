"""absvl.images: safe image loading (modes, corrupt files, decompression bombs) and the train/eval transforms.
(Here rather than in tests/ for the image fixtures of tests/data/conftest.py.)"""

import io
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from absvl.images import BadImageError, image_transform, open_image, to_rgb
from absvl.models.vl.processing import load_image, preprocess_image


def test_rgb_jpeg(image_file):
    img = open_image(image_file("RGB", size=(40, 30)))
    assert img.mode == "RGB" and img.size == (40, 30)


def test_grayscale_to_rgb(image_file):
    arr = np.asarray(open_image(image_file("L")))
    assert arr.shape == (30, 40, 3)
    assert np.all(np.abs(arr.astype(int) - 100) <= 2)  # gray 100 replicated to 3 channels


def test_cmyk_to_rgb(image_file):
    arr = np.asarray(open_image(image_file("CMYK"))).astype(int)
    assert arr.shape == (30, 40, 3)
    assert arr[..., 0].mean() > 240 and arr[..., 1].mean() < 15 and arr[..., 2].mean() < 15  # red


def test_16bit_rescaled_not_clipped(image_file):
    path = image_file("I;16")
    with Image.open(path) as raw:  # a 16-bit file (Pillow < 10.1 opens it as 32-bit "I": the same values)
        assert raw.mode.startswith("I;16") or raw.mode == "I"
    arr = np.asarray(open_image(path)).astype(int)
    assert arr.shape == (30, 40, 3)
    assert arr[0, 0].tolist() == [0, 0, 0] and arr[0, -1].tolist() == [255, 255, 255]
    middle = arr[0, 20, 0]
    assert 110 < middle < 150  # a ramp, not clipped to white past 255/65535
    assert np.all(np.diff(arr[0, :, 0]) >= 0)


def test_32bit_and_float_modes():
    ints = Image.fromarray(np.array([[0, 1000, 65535]], dtype=np.int32))
    assert ints.mode == "I"
    assert np.asarray(to_rgb(ints))[0, :, 0].tolist() == [0, 4, 255]
    small = Image.fromarray(np.array([[0, 7, 255]], dtype=np.int32))
    assert np.asarray(to_rgb(small))[0, :, 0].tolist() == [0, 7, 255]
    floats = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert floats.mode == "F"
    assert np.asarray(to_rgb(floats))[0, :, 0].tolist() == [0, 128, 255]


def test_rgba_composited_on_white(image_file):
    arr = np.asarray(open_image(image_file("RGBA")))
    assert arr[0, 0].tolist() == [255, 0, 0]  # opaque red kept
    assert arr[0, -1].tolist() == [255, 255, 255]  # transparent → white, not the black underneath


def test_palette_with_transparency(image_file):
    arr = np.asarray(open_image(image_file("P")))
    assert arr.shape == (30, 40, 3)
    assert arr[0, 0].tolist() == [255, 255, 255]  # transparent index → white
    assert arr[0, -1].tolist() == [0, 0, 255]  # opaque blue


def test_la_and_plain_palette():
    la = Image.new("LA", (2, 2), (50, 255))
    assert np.asarray(to_rgb(la))[0, 0].tolist() == [50, 50, 50]
    p = Image.new("P", (2, 2), 0)
    p.putpalette([10, 20, 30] + [0] * 765)
    assert np.asarray(to_rgb(p))[0, 0].tolist() == [10, 20, 30]


def test_bytes_and_file_objects(image_file):
    data = image_file("RGB").read_bytes()
    assert open_image(data).size == (40, 30)
    assert open_image(io.BytesIO(data)).size == (40, 30)


@pytest.mark.parametrize("fmt", ["RGB", "I;16"])  # JPEG and PNG
def test_truncated_file_names_the_path(image_file, truncate, fmt):
    path = image_file(fmt, size=(64, 64))
    truncate(path)
    with pytest.raises(BadImageError) as info:
        open_image(path)
    assert str(path) in str(info.value) and info.value.path == str(path)
    assert "absvl data check" in str(info.value)


def test_garbage_empty_and_missing(tmp_path):
    garbage = tmp_path / "COCO_train2014_000000000001.jpg"
    garbage.write_bytes(b"this is not an image at all" * 10)
    with pytest.raises(BadImageError, match="COCO_train2014_000000000001.jpg.*not a recognised image"):
        open_image(garbage)
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(BadImageError, match="empty.jpg"):
        open_image(empty)
    with pytest.raises(BadImageError, match="missing.jpg: file not found"):
        open_image(tmp_path / "missing.jpg")
    with pytest.raises(BadImageError, match="bytes of image data"):
        open_image(b"\x89PNG\r\n\x1a\nbroken")


def test_decompression_bomb_guard(image_file):
    path = image_file("RGB", size=(40, 30))
    with pytest.raises(BadImageError, match="1,200 pixels is over the limit of 1,000"):
        open_image(path, max_pixels=1000)
    assert open_image(path, max_pixels=1200).size == (40, 30)


def test_pil_bomb_error_becomes_bad_image(image_file, monkeypatch):
    path = image_file("RGB", size=(40, 30))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # PIL raises above 2 × its limit
    with pytest.raises(BadImageError, match="decompression bomb"):
        open_image(path, max_pixels=None)


def test_bad_image_error_pickles():
    err = pickle.loads(pickle.dumps(BadImageError("/x/a.jpg", "file not found")))
    assert (err.path, err.reason) == ("/x/a.jpg", "file not found") and "/x/a.jpg" in str(err)


def test_processing_load_image_uses_safe_loader(image_file, truncate):
    assert load_image(image_file("RGBA")).getpixel((39, 0)) == (255, 255, 255)
    bad = image_file("RGB", name="bad.jpg")
    truncate(bad)
    with pytest.raises(BadImageError, match="bad.jpg"):
        load_image(bad)
    # PIL and array inputs behave as before
    assert load_image(Image.new("L", (3, 2), 7)).getpixel((0, 0)) == (7, 7, 7)
    assert load_image(np.zeros((2, 3), np.float32)).size == (3, 2)


@pytest.mark.parametrize("mode", ["RGB", "CMYK", "RGBA"])
def test_eval_transform_equals_preprocess_image(image_file, mode):
    path = image_file(mode, size=(50, 37))
    expected = preprocess_image(path, 32)
    got = image_transform(32, train=False)(open_image(path))
    assert got.shape == (3, 32, 32) and got.dtype == torch.float32
    assert torch.equal(got, expected)  # one transform: equal to the last bit


def test_train_transform_keeps_geometry(image_file):
    img = open_image(image_file("RGB", size=(50, 37)))
    # without RandAugment training is the eval transform: no crop, no flip
    torch.testing.assert_close(image_transform(32, train=True)(img), image_transform(32, train=False)(img))
    torch.manual_seed(0)
    augmented = image_transform(32, train=True, randaugment=True)
    assert not any("Flip" in type(t).__name__ or "Crop" in type(t).__name__ for t in augmented.transforms)
    assert augmented(img).shape == (3, 32, 32)
    # RandAugment only at training time
    evaluation = image_transform(32, train=False, randaugment=True)
    assert not any("RandAugment" in type(t).__name__ for t in evaluation.transforms)
