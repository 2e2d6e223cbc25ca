"""Inputs: image loading/normalisation and text tokenisation, shared by pipelines and data loaders."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from ...images import image_transform, open_image

ImageInput = Image.Image | str | Path | np.ndarray
CNN_DEFAULT_SIZE = 224


def backbone_image_size(backbone: nn.Module) -> int:
    """The input side a backbone was built for: ``patch_embed.img_size`` for ViTs, 224 for CNNs."""
    patch_embed = getattr(backbone, "patch_embed", None)
    if patch_embed is None:
        return CNN_DEFAULT_SIZE
    h, w = patch_embed.img_size
    if h != w:
        raise ValueError(f"backbone input size {h}x{w} is not square: set AbsVLConfig.image_size")
    return int(h)


def load_image(image: ImageInput) -> Image.Image:
    """An RGB PIL image from a PIL image, a file path, or an ``HxW[x3]`` array (uint8, or float in [0, 1]).

    Files go through ``absvl.images.open_image``: decompression-bomb guard, full decode (a bad
    file raises ``BadImageError`` naming it), grayscale/CMYK/16-bit/alpha converted to RGB.
    """
    if isinstance(image, (str, Path)):
        return open_image(image)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            image = (np.clip(image, 0.0, 1.0) * 255.0).round().astype(np.uint8)
        return Image.fromarray(image).convert("RGB")
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    raise TypeError(f"image must be a PIL image, a path or a numpy array, not {type(image).__name__}")


@functools.lru_cache(maxsize=8)
def _eval_transform(size: int) -> Callable[[Image.Image], torch.Tensor]:
    return image_transform(size, train=False)


def preprocess_image(image: ImageInput, size: int) -> torch.Tensor:
    """``[3, size, size]`` float tensor: ``absvl.images.image_transform``'s eval mode (what evaluation and the
    index feed the model)."""
    return _eval_transform(size)(load_image(image))


class AbsVLProcessor:
    """Turns images and texts into model inputs (HF processor convention).

    ``processor(images=..., text=...)`` returns a dict with ``images`` ``[B, 3, S, S]`` and/or
    ``input_ids``/``attention_mask`` ``[B, T]`` (padded to the longest, truncated to ``max_text_len``).
    """

    def __init__(self, tokenizer: Any, image_size: int, max_text_len: int = 40) -> None:
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.max_text_len = max_text_len

    def __call__(
        self, images: ImageInput | Sequence[ImageInput] | None = None, text: str | Sequence[str] | None = None
    ) -> dict[str, torch.Tensor]:
        if images is None and text is None:
            raise ValueError("give images, text or both")
        batch: dict[str, torch.Tensor] = {}
        if images is not None:
            images = [images] if isinstance(images, (Image.Image, str, Path, np.ndarray)) else list(images)
            batch["images"] = torch.stack([preprocess_image(im, self.image_size) for im in images])
        if text is not None:
            encoded = self.tokenizer(
                [text] if isinstance(text, str) else list(text),
                padding=True,
                truncation=True,
                max_length=self.max_text_len,
                return_tensors="pt",
            )
            batch["input_ids"], batch["attention_mask"] = encoded["input_ids"], encoded["attention_mask"]
        return batch
