"""ImageFolder classification data: ``root/<split>/<class>/<image>``.

The class list is the sorted sub-folders of the training split; other splits may hold a subset of
those classes (a folder naming an unknown class is an error). Images are decoded with
``open_image``: an unreadable file never raises inside a data loader, its item is an error marker
that ``ClassifyCollator`` drops from the batch and reports in ``batch["skipped"]``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from ..images import DEFAULT_MAX_PIXELS, BadImageError, open_image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")


class ImageFolderError(ValueError):
    """A dataset folder that does not have the ImageFolder layout; the message names the folder."""


def _visible_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images_in(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS
        and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def split_folder(root: str | Path, split: str) -> Path:
    folder = Path(root) / split
    if not folder.is_dir():
        raise ImageFolderError(
            f"{folder} does not exist: an ImageFolder dataset has {Path(root) / split}/<class>/<image> "
            f"(set data.val_split=null to train without validation)"
        )
    return folder


def find_classes(root: str | Path, split: str = "train") -> list[str]:
    """The sorted class names of ``root/split`` (its visible sub-folders; each must hold images)."""
    folder = split_folder(root, split)
    classes = [d.name for d in _visible_dirs(folder)]
    if not classes:
        raise ImageFolderError(f"{folder} has no class sub-folders: expected {folder}/<class>/<image>")
    empty = [c for c in classes if not _images_in(folder / c)]
    if empty:
        raise ImageFolderError(
            f"class folder(s) without images in {folder}: {', '.join(empty)} "
            f"(image files end in {', '.join(IMAGE_EXTENSIONS)})"
        )
    return classes


def list_samples(root: str | Path, split: str, classes: Sequence[str]) -> list[tuple[str, int]]:
    """``(image path, class index)`` of every image of ``root/split``, class by class, sorted.

    Raises ``ImageFolderError`` naming the folders of classes not in ``classes``."""
    folder = split_folder(root, split)
    index = {c: i for i, c in enumerate(classes)}
    dirs = _visible_dirs(folder)
    unknown = [d for d in dirs if d.name not in index]
    if unknown:
        raise ImageFolderError(
            f"{folder} has class folder(s) the model does not know: {', '.join(str(d) for d in unknown)} "
            f"(classes come from the training split: {', '.join(classes)})"
        )
    samples = [(str(p), index[d.name]) for d in dirs for p in _images_in(d)]
    if not samples:
        raise ImageFolderError(f"{folder} holds no images")
    return samples


class ImageFolderDataset(Dataset):
    """``(path, label)`` samples → ``{"image": tensor, "label": int}``, or, for an unreadable
    image, ``{"error": reason, "path": path}`` (never raises for a bad image)."""

    def __init__(
        self,
        samples: Sequence[tuple[str, int]],
        transform: Callable[[Any], torch.Tensor],
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path, label = self.samples[index]
        try:
            image = open_image(path, max_pixels=self.max_pixels)
        except BadImageError as exc:
            return {"error": exc.reason, "path": exc.path}
        return {"image": self.transform(image), "label": label}


class ClassifyCollator:
    """Items of ``ImageFolderDataset`` → ``{"images" [B,3,S,S], "labels" [B], "skipped"}`` (of
    ``PatchLabelDataset``: ``labels`` ``[B, h·w]``).

    ``skipped`` is ``[(path, reason), ...]`` for the unreadable items. If all were unreadable
    ``B = 0`` (``images`` is ``[0,3,S,S]``, ``S = image_size`` or 0 when not given).
    """

    def __init__(self, image_size: int | None = None) -> None:
        self.image_size = image_size

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        good = [it for it in items if "error" not in it]
        skipped = [(it["path"], it["error"]) for it in items if "error" in it]
        if good:
            images = torch.stack([it["image"] for it in good])
        else:
            size = self.image_size or 0
            images = torch.zeros(0, 3, size, size)
        if good and isinstance(good[0]["label"], torch.Tensor):  # patch labels, one row per image
            labels = torch.stack([it["label"] for it in good])
        else:
            labels = torch.tensor([it["label"] for it in good], dtype=torch.long)
        return {"images": images, "labels": labels, "skipped": skipped}
