"""Image files as model inputs by position, for indexing and retrieval evaluation (unreadable files set aside)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from ..images import DEFAULT_MAX_PIXELS, BadImageError, image_transform, open_image

__all__ = ["ImageFiles", "check_image_root", "collate_image_files"]


def check_image_root(paths: Sequence[str | Path], hint: str, probe: int = 20) -> None:
    """Fail early (not after an epoch of skipped items) when none of the first ``probe`` image
    files exists; ``hint`` says where the images should be."""
    sample = [Path(p) for p in paths[:probe]]
    if sample and not any(p.is_file() for p in sample):
        raise FileNotFoundError(f"none of the first {len(sample)} images exists (e.g. {sample[0]}): {hint}")


class ImageFiles(torch.utils.data.Dataset):
    """Image files as eval-transformed model inputs, by position (indexing, retrieval evaluation).

    An unreadable file never raises: its item carries the reason instead of a tensor, and
    ``collate_image_files`` sets it aside.
    """

    def __init__(
        self, paths: Sequence[str | Path], image_size: int, max_pixels: int | None = DEFAULT_MAX_PIXELS
    ) -> None:
        self.paths = list(paths)
        self.transform = image_transform(image_size, train=False)
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, position: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            return position, self.transform(open_image(self.paths[position], self.max_pixels)), None
        except BadImageError as err:
            return position, None, err.reason


def collate_image_files(
    items: Sequence[tuple[int, torch.Tensor | None, str | None]],
) -> tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]:
    """(positions read, their images ``[B, 3, S, S]`` or None, ``[(position, reason)]`` of the unreadable)."""
    good = [(pos, x) for pos, x, _ in items if x is not None]
    bad = [(pos, reason) for pos, x, reason in items if x is None]
    images = torch.stack([x for _, x in good]) if good else None
    return [pos for pos, _ in good], images, bad
