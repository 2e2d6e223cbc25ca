"""Image files → RGB PIL images, and RGB images → model input tensors: the one decoder and the one transform.

Every image absvl reads goes through ``open_image`` (training, evaluation, indexing, pipelines, the server,
``absvl data check``) and every model input through ``image_transform`` (the processor uses its eval mode), so
they cannot drift apart. How each file mode becomes RGB, and why no crop or flip: docs/images.md.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import IO

import numpy as np
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

__all__ = ["BadImageError", "DEFAULT_MAX_PIXELS", "ImageSource", "image_transform", "open_image", "to_rgb"]

#: Same limit as PIL's own ``Image.MAX_IMAGE_PIXELS`` default (about 89.5 megapixels; ~9,459² px).
#: COCO images are at most 640×640.
DEFAULT_MAX_PIXELS = 89_478_485

ImageSource = str | Path | bytes | bytearray | IO[bytes]

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_HIGH_DEPTH_MODES = ("I", "F", "I;16", "I;16L", "I;16B", "I;16N")
_WHITE = (255, 255, 255)


class BadImageError(ValueError):
    """An image file that cannot be used: missing, unreadable, truncated, too large, odd mode.

    Attributes:
        path: the file (or a description of where the bytes came from).
        reason: what is wrong with it.
    """

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(
            f"bad image {self.path}: {reason}. Replace or re-extract this file (or drop the questions "
            "that use it); `absvl data check` lists every bad image of a dataset, and training skips "
            "bad images and reports them at the end."
        )

    def __reduce__(self):  # picklable across DataLoader worker processes
        return (type(self), (self.path, self.reason))


def _name_of(source: ImageSource, name: str | None) -> str:
    if name is not None:
        return name
    if isinstance(source, (str, Path)):
        return str(source)
    if isinstance(source, (bytes, bytearray)):
        return f"<{len(source)} bytes of image data>"
    return str(getattr(source, "name", None) or "<file object>")


def _high_depth_to_l(img: Image.Image) -> Image.Image:
    """16/32-bit integer or float grayscale → 8-bit ``L`` (the rule: docs/images.md)."""
    arr = np.asarray(img)
    if img.mode.startswith("I;16"):
        out = arr.astype(np.float64) / 257.0
    else:
        arr = arr.astype(np.float64)
        finite = arr[np.isfinite(arr)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        if img.mode == "F" and lo >= 0.0 and hi <= 1.0:
            out = arr * 255.0
        elif lo >= 0.0 and hi <= 255.0:
            out = arr
        elif lo >= 0.0 and hi <= 65535.0:
            out = arr / 257.0
        else:
            out = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
    out = np.nan_to_num(out, nan=0.0, posinf=255.0, neginf=0.0)
    return Image.fromarray(np.clip(np.round(out), 0, 255).astype(np.uint8), mode="L")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL image → RGB: alpha composited onto white, 16/32-bit rescaled (docs/images.md)."""
    if img.mode == "RGB" and "transparency" not in img.info:
        return img
    if img.mode in _HIGH_DEPTH_MODES:
        return _high_depth_to_l(img).convert("RGB")
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def open_image(
    source: ImageSource, max_pixels: int | None = DEFAULT_MAX_PIXELS, name: str | None = None
) -> Image.Image:
    """Decode an image file completely and return it as RGB.

    Args:
        source: a path, the encoded bytes, or a binary file object.
        max_pixels: refuse images with more pixels than this (decompression-bomb guard); ``None``
            leaves only PIL's own limit (``Image.MAX_IMAGE_PIXELS``, whose error is also turned into
            a ``BadImageError``).
        name: how to call the image in error messages (default: the path).

    Raises:
        BadImageError: missing, unreadable, truncated/corrupt, too large or unconvertible image.
    """
    label = _name_of(source, name)
    if isinstance(source, (bytes, bytearray)):
        source = io.BytesIO(source)
    img = None
    try:
        img = Image.open(source)
        width, height = img.size
        if max_pixels is not None and width * height > max_pixels:
            raise BadImageError(
                label,
                f"{width}x{height} = {width * height:,} pixels is over the limit of {max_pixels:,} "
                "(possible decompression bomb; raise max_pixels if the image is genuine)",
            )
        img.load()  # decode everything now: truncated/corrupt data fails here (PIL then closes a file it opened)
        return to_rgb(img)  # not inside ``with``: closing an image also frees its pixels
    except BadImageError:
        raise
    except FileNotFoundError:
        raise BadImageError(label, "file not found") from None
    except Image.DecompressionBombError as exc:
        raise BadImageError(label, f"decompression bomb ({exc})") from None
    except Image.UnidentifiedImageError:
        raise BadImageError(label, "not a recognised image file (corrupt, empty, or not an image)") from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError, struct.error) as exc:
        raise BadImageError(label, f"cannot be decoded ({type(exc).__name__}: {exc})") from None
    finally:
        if img is not None and getattr(img, "fp", None) is not None and isinstance(source, (str, Path)):
            img.fp.close()  # failed before PIL closed the file it opened


def image_transform(
    image_size: int,
    train: bool,
    randaugment: bool = False,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
    randaugment_ops: int = 2,
    randaugment_magnitude: int = 9,
):
    """torchvision v2 transform: RGB PIL image → normalised ``[3, image_size, image_size]`` float tensor.

    Both modes: bicubic resize of the whole image to ``image_size × image_size`` (geometry kept: no
    crop, no flip — questions mention left/right, positions and counts), scale to [0, 1], normalise
    with ``mean``/``std`` (ImageNet by default). ``train=True`` with ``randaugment=True`` adds
    RandAugment after the resize (its op set has no flip). The eval mode is every model input's
    outside training (evaluation, indexing, ``AbsVLProcessor``).
    """
    from torchvision.transforms import v2

    if train not in (True, False):
        raise TypeError(f"train must be a bool, got {train!r}")
    steps = [v2.Resize((image_size, image_size), interpolation=v2.InterpolationMode.BICUBIC, antialias=True)]
    if train and randaugment:
        steps.append(v2.RandAugment(num_ops=randaugment_ops, magnitude=randaugment_magnitude))
    steps += [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(mean), std=list(std))]
    return v2.Compose(steps)
