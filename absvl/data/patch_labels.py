"""Patch-labelled images for dense ("every patch is classified") pretraining of a ViT backbone.

Layout (a semantic-segmentation dataset, ADE20K / PASCAL VOC style)::

    root/classes.json                 ["background", "red circle", ...]: label k is classes[k]
    root/attributes.json              optional: {"color": [null, "red", ...], ...}, one value per class
    root/<split>/images/<name>.jpg    any image format ``open_image`` reads
    root/<split>/labels/<name>.png    class-index map of the image's size (8/16-bit); 255 = unlabelled

``patch_targets`` turns a label map into one class per patch of the backbone's grid; the loss is
then a classification of every patch token (AbSViT's classifier applied token-wise). Image-level
labels teach a small ViT trained from scratch where things are far more slowly: each image gives
one label, here it gives one per patch, and the tokens of an object learn to carry its class,
which is what a top-down prior ξ is compared with (SPEC §2, Eq. 8).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..images import DEFAULT_MAX_PIXELS, BadImageError, open_image
from ..io import read_json
from .imagefolder import IMAGE_EXTENSIONS, ImageFolderError

CLASSES_FILE = "classes.json"
ATTRIBUTES_FILE = "attributes.json"
IGNORE_LABEL = 255  # pixels of this value in a label map are not labelled
IGNORE_INDEX = -100  # a patch target that takes no part in the loss (torch's cross-entropy default)


def read_classes(root: str | Path) -> list[str]:
    """``root/classes.json``: a non-empty list of distinct class names."""
    path = Path(root) / CLASSES_FILE
    try:
        classes = read_json(path, what="the class list of a patch-labelled dataset")
    except (OSError, ValueError) as err:
        raise ImageFolderError(str(err)) from None
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise ImageFolderError(f"{path} must hold a non-empty list of class names")
    if len(set(classes)) != len(classes) or len(classes) > IGNORE_LABEL:
        raise ImageFolderError(f"{path}: class names must be distinct and fewer than {IGNORE_LABEL}")
    return classes


def read_attributes(root: str | Path, classes: Sequence[str]) -> dict[str, list[str | None]]:
    """``root/attributes.json`` when there is one, else ``{}``: attribute name → its value for each class
    (``null`` where a class has none, e.g. background), e.g. ``{"shape": [null, "circle", ...]}``.
    Evaluation then also scores the object patches per attribute: is the predicted class's shape the
    true one, whatever its colour (``patch_accuracy``)."""
    path = Path(root) / ATTRIBUTES_FILE
    if not path.is_file():
        return {}
    try:
        attributes = read_json(path, what="the class attributes of a patch-labelled dataset")
    except (OSError, ValueError) as err:
        raise ImageFolderError(str(err)) from None
    ok = isinstance(attributes, dict) and all(
        isinstance(values, list)
        and len(values) == len(classes)
        and all(v is None or isinstance(v, str) for v in values)
        for values in attributes.values()
    )
    if not ok:
        raise ImageFolderError(
            f"{path} must map each attribute name to a list of {len(classes)} values (one per class of "
            f"{CLASSES_FILE}, null where a class has none)"
        )
    return attributes


def patch_accuracy(
    confusion: torch.Tensor, background: int | None, attributes: dict[str, list[str | None]]
) -> dict[str, float]:
    """Accuracies (%) from a ``[C, C]`` confusion matrix of patches (rows: true class, columns: predicted):
    ``top1`` of every patch; with a ``background`` class, ``background`` (its patches) and ``objects``
    (every other patch's class); and for each attribute, the object patches whose predicted class has
    the true class's value of it (``{"shape": ...}``: the shape right, whatever the colour)."""
    confusion = confusion.double()
    percent = lambda hits, total: float(100 * hits / total) if total > 0 else float("nan")  # noqa: E731
    result = {"top1": percent(confusion.trace(), confusion.sum())}
    if background is None:
        return result
    objects = torch.ones(len(confusion), dtype=torch.bool)
    objects[background] = False
    on_objects = confusion[objects]
    result["background"] = percent(confusion[background, background], confusion[background].sum())
    result["objects"] = percent(on_objects[:, objects].diagonal().sum(), on_objects.sum())
    for name, values in attributes.items():
        same = torch.tensor([[a is not None and a == b for b in values] for a in values])
        result[name] = percent((confusion * same)[objects].sum(), on_objects.sum())
    return result


def list_labelled(root: str | Path, split: str) -> list[tuple[str, str]]:
    """``(image, label map)`` paths of ``root/split``; an image without its label map is an error."""
    folder = Path(root) / split
    images_dir, labels_dir = folder / "images", folder / "labels"
    for d in (images_dir, labels_dir):
        if not d.is_dir():
            raise ImageFolderError(
                f"{d} does not exist: a patch-labelled split has {folder}/images/<name> and {folder}/labels/<name>.png "
                "(set data.val_split=null to train without validation)"
            )
    images = sorted(
        p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
    )
    if not images:
        raise ImageFolderError(f"{images_dir} holds no images")
    missing = [p.name for p in images if not (labels_dir / f"{p.stem}.png").is_file()]
    if missing:
        raise ImageFolderError(
            f"{len(missing)} image(s) of {images_dir} have no label map in {labels_dir}, e.g. {missing[0]}"
        )
    return [(str(p), str(labels_dir / f"{p.stem}.png")) for p in images]


def patch_targets(
    labels: np.ndarray, patch: int, num_classes: int, background: int | None = 0, min_share: float = 0.25
) -> np.ndarray:
    """One class per ``patch``×``patch`` cell of an ``H×W`` class-index map → ``[H/patch · W/patch]`` int64.

    A cell takes the non-background class with the most pixels when it covers at least ``min_share``
    of the cell (a small object still owns the patches it partly fills), otherwise ``background``
    if the cell has background pixels; a cell with no labelled pixel is ``IGNORE_INDEX``. With
    ``background=None`` every class is an object class. Labels ≥ ``num_classes`` (except 255) are
    an error.
    """
    H, W = labels.shape
    if H % patch or W % patch:
        raise ValueError(f"label map {H}x{W} is not a whole number of {patch}-pixel patches")
    labels = labels.astype(np.int64)
    bad = (labels >= num_classes) & (labels != IGNORE_LABEL)
    if bad.any():
        raise ValueError(f"label {int(labels[bad][0])} is not one of the {num_classes} classes")
    h, w = H // patch, W // patch
    cells = labels.reshape(h, patch, w, patch).transpose(0, 2, 1, 3).reshape(h * w, patch * patch)
    counts = np.zeros((h * w, num_classes + 1), dtype=np.int64)  # last column: unlabelled
    np.add.at(counts, (np.arange(h * w)[:, None], np.where(cells == IGNORE_LABEL, num_classes, cells)), 1)
    counts = counts[:, :num_classes]
    labelled = counts.sum(axis=1) > 0
    if background is None:
        return np.where(labelled, counts.argmax(axis=1), IGNORE_INDEX)
    objects = counts.copy()
    objects[:, background] = 0
    best = objects.argmax(axis=1)
    owned = objects[np.arange(h * w), best] >= min_share * patch * patch
    return np.where(owned, best, np.where(counts[:, background] > 0, background, IGNORE_INDEX))


class PatchLabelDataset(Dataset):
    """``(image, label map)`` pairs → ``{"image": tensor, "label": LongTensor [h·w]}``, or an error
    marker for an unreadable image or label map (never raises for a bad file).

    ``transform`` turns the PIL image into the normalised tensor (no geometric change: the label map
    must stay aligned); ``hflip`` mirrors image and labels together with that probability (the tensor and the
    patch grid: a pixel-wise transform and per-cell labels commute with the mirror). ``cache`` keeps each item's
    tensor and patch labels in memory once read, so later epochs skip decoding (4·3·S² bytes an image; each
    loader worker process keeps its own): only for a deterministic ``transform``, as ``patch_tensor_transform``.
    """

    def __init__(
        self,
        samples: Sequence[tuple[str, str]],
        transform: Callable[[Any], torch.Tensor],
        image_size: int,
        patch: int,
        num_classes: int,
        background: int | None = 0,
        hflip: float = 0.0,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        cache: bool = False,
    ) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.image_size, self.patch, self.num_classes = image_size, patch, num_classes
        self.background, self.hflip, self.max_pixels = background, hflip, max_pixels
        self._cache: dict[int, tuple[torch.Tensor, np.ndarray]] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        read = self._cache.get(index) if self._cache is not None else None
        if read is None:
            read = self._read(index)
            if isinstance(read, dict):
                return read
            if self._cache is not None:
                self._cache[index] = read
        image, targets = read
        if self.hflip and random.random() < self.hflip:
            image, targets = image.flip(-1), targets.reshape(self.image_size // self.patch, -1)[:, ::-1].reshape(-1)
        return {"image": image, "label": torch.from_numpy(np.ascontiguousarray(targets))}

    def _read(self, index: int) -> tuple[torch.Tensor, np.ndarray] | dict[str, Any]:
        """The item's normalised image and patch labels, unmirrored, or its error marker."""
        image_path, label_path = self.samples[index]
        try:
            image = open_image(image_path, max_pixels=self.max_pixels)
            with Image.open(label_path) as raw:
                labels = raw if raw.mode in ("L", "P", "I;16", "I") else None
                if labels is None:
                    return {"error": f"label map mode {raw.mode} is not a class-index image", "path": label_path}
                labels = labels.resize((self.image_size, self.image_size), Image.Resampling.NEAREST)
                labels = np.asarray(labels)
        except BadImageError as exc:
            return {"error": exc.reason, "path": exc.path}
        except OSError as exc:
            return {"error": f"unreadable label map ({exc})", "path": label_path}
        image = image.resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)
        try:
            targets = patch_targets(labels, self.patch, self.num_classes, self.background)
        except ValueError as exc:
            return {"error": str(exc), "path": label_path}
        return self.transform(image), targets
