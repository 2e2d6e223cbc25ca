"""Karpathy-format caption files (Flickr30K, COCO, the Shapes world) for image-text retrieval.

A file (``dataset_flickr30k.json``, ``dataset_coco.json``, ``dataset_shapes.json``; SPEC §6) is
``{"images": [{"filename", "imgid", "split", "sentences": [{"raw", ...}], "filepath"?}]}``. An
image lives at ``IMAGES/filepath/filename`` (COCO: ``filepath`` is ``train2014``/``val2014``) or
``IMAGES/filename`` (Flickr30K has no ``filepath``); ``IMAGES`` defaults to the caption file's
folder. ``restval`` (COCO's extra training images) is a split of its own: train on
``[train, restval]``.

Datasets never raise on an unreadable image: the item carries the error and the collator drops
it and lists it in ``batch["skipped"]``, as for VQA.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .images import DEFAULT_MAX_PIXELS, BadImageError, open_image
from .vqa import Issues, _read_json, _top_list

KARPATHY_SPLITS = ("train", "restval", "val", "test")


@dataclass(frozen=True)
class CaptionedImage:
    """One image of a caption file: ``image_id`` is the file's ``imgid``."""

    image_id: int
    path: Path
    captions: tuple[str, ...]
    split: str


def load_karpathy(
    captions_file: str | Path, splits: Sequence[str] = ("test",), images_root: str | Path | None = None
) -> list[CaptionedImage]:
    """The images of ``splits`` in a Karpathy caption file, in file order.

    Raises a ``ValueError`` naming the file, the entry and the field for a malformed file (every
    problem counted, the first few of each kind shown), or when a split is unknown or empty.
    Image files are not opened here (bad ones are skipped while loading batches).
    """
    path = Path(captions_file)
    unknown = [s for s in splits if s not in KARPATHY_SPLITS]
    if unknown:
        raise ValueError(f"unknown Karpathy split(s) {unknown}; known: {', '.join(KARPATHY_SPLITS)}")
    root = Path(images_root) if images_root is not None else path.parent
    entries = _top_list(path, _read_json(path, "Karpathy captions"), "images")
    issues, images, seen = Issues(), [], set()
    for i, entry in enumerate(entries):
        where = f"images[{i}]"
        if not isinstance(entry, dict):
            issues.add("type", f"{path}: {where} must be an object, got a {type(entry).__name__}")
            continue
        missing = [k for k in ("filename", "imgid", "split", "sentences") if k not in entry]
        if missing:
            issues.add(("missing", tuple(missing)), f"{path}: {where} is missing field(s) {', '.join(map(repr, missing))}")
            continue
        if entry["split"] not in KARPATHY_SPLITS:
            issues.add("split", f"{path}: {where}, field 'split': {entry['split']!r} is not one of {KARPATHY_SPLITS}")
            continue
        if not isinstance(entry["imgid"], int) or isinstance(entry["imgid"], bool):
            issues.add("imgid", f"{path}: {where}, field 'imgid': must be an integer, got {entry['imgid']!r}")
            continue
        if entry["imgid"] in seen:
            issues.add("duplicate", f"{path}: {where}, field 'imgid': {entry['imgid']} appears twice")
            continue
        seen.add(entry["imgid"])
        sentences = entry["sentences"]
        raws = [s.get("raw") if isinstance(s, dict) else None for s in sentences] if isinstance(sentences, list) else None
        if not raws or not all(isinstance(r, str) and r.strip() for r in raws):
            issues.add("sentences", f"{path}: {where}, field 'sentences': needs a non-empty list of "
                                    "{\"raw\": <non-empty caption>} objects")
            continue
        if entry["split"] not in splits:
            continue
        folder = root / entry["filepath"] if entry.get("filepath") else root
        images.append(CaptionedImage(entry["imgid"], folder / entry["filename"], tuple(r.strip() for r in raws), entry["split"]))
    issues.raise_if_any(f"the caption file {path}")
    if not images:
        raise ValueError(f"{path} has no image in split(s) {', '.join(splits)}")
    return images


class CaptionedImageDataset(torch.utils.data.Dataset):
    """Training pairs: each image with one of its captions, drawn per item — under ``EpochOrder``
    the draw is a function of (seed, epoch, item), so every epoch sees other captions and a
    resumed run sees the same ones. An item is ``{"image", "caption", "index"}`` or, for an
    unreadable image, ``{"error", "index", "image_path"}``. (Images alone, for evaluation and
    indexing: ``absvl.data.images.ImageFiles``.)
    """

    def __init__(
        self,
        images: Sequence[CaptionedImage],
        transform: Callable[[Any], torch.Tensor],
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.images = list(images)
        self.transform = transform
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.images[index]
        try:
            image = open_image(item.path, self.max_pixels)
        except BadImageError as exc:
            return {"error": exc.reason, "index": index, "image_path": exc.path}
        return {"image": self.transform(image), "caption": random.choice(item.captions), "index": index}


class CaptionCollator:
    """Items of ``CaptionedImageDataset`` → ``images [B,3,S,S]``, ``input_ids``/``attention_mask
    [B,T]`` (absent when every image was unreadable), ``indices [B]`` and ``skipped``
    ``[(index, image_path, reason)]``."""

    def __init__(self, tokenizer: Any, max_text_len: int = 40, image_size: int = 0) -> None:
        self.tokenizer = tokenizer
        self.max_text_len = max_text_len
        self.image_size = image_size

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        good = [it for it in items if "error" not in it]
        batch: dict[str, Any] = {
            "indices": torch.tensor([it["index"] for it in good], dtype=torch.long),
            "skipped": [(it["index"], it["image_path"], it["error"]) for it in items if "error" in it],
        }
        if not good:
            batch["images"] = torch.zeros(0, 3, self.image_size, self.image_size)
            return batch
        batch["images"] = torch.stack([it["image"] for it in good])
        encoded = self.tokenizer([it["caption"] for it in good], padding="longest", truncation=True,
                                 max_length=self.max_text_len, return_tensors="pt")
        batch["input_ids"], batch["attention_mask"] = encoded["input_ids"], encoded["attention_mask"]
        return batch
