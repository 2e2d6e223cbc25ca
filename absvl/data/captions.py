"""Karpathy-format caption files (Flickr30K, COCO, the Shapes world) and Hugging Face caption datasets
for image-text retrieval (formats: data/README.md, SPEC §6).

An unreadable image never raises: the item carries the error, and the collator drops it and lists it
in ``batch["skipped"]``, as for VQA.
"""

from __future__ import annotations

import hashlib
import io
import logging
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..images import DEFAULT_MAX_PIXELS, BadImageError, open_image
from ..io import atomic_file
from . import hf
from .hf import HFImageRef
from .image_files import check_image_root
from .problems import Issues, is_int, read_dataset_json, top_list

logger = logging.getLogger(__name__)

KARPATHY_SPLITS = ("train", "restval", "val", "test")
CAPTION_FORMATS = ("karpathy", "hf")
# the fields of a Hugging Face caption dataset, and the columns each is looked for under (in this
# order) when the column mapping does not name one
HF_CAPTION_COLUMNS = {
    "image": ("image", "img", "image_path", "file_name", "filename"),
    "captions": ("captions", "caption", "sentences", "text", "raw"),
    "split": ("split",),
    "image_id": ("image_id", "imgid", "img_id", "cocoid"),
    "folder": ("filepath",),  # Karpathy's filepath: a path in ``image`` is folder/image
}
# the Karpathy split each dataset split name (or ``split`` column value) stands for
_HF_SPLITS = {
    "train": "train",
    "restval": "restval",
    "val": "val",
    "validation": "val",
    "valid": "val",
    "dev": "val",
    "test": "test",
}


@dataclass(frozen=True)
class CaptionedImage:
    """One image of a caption file: ``image_id`` is the file's ``imgid``."""

    image_id: int
    path: Path
    captions: tuple[str, ...]
    split: str


def _caption_list(value: Any) -> tuple[str, ...] | None:
    """The stripped captions of a caption string, a list of them or of ``{"raw": str}`` (Karpathy
    ``sentences``, also as the ``{"raw": [...]}`` a ``datasets`` Sequence reads back); None if malformed."""
    if isinstance(value, dict):
        value = value.get("raw")
    if isinstance(value, str):
        value = [value]
    raws = [v.get("raw") if isinstance(v, dict) else v for v in value] if isinstance(value, list) else None
    if not raws or not all(isinstance(r, str) and r.strip() for r in raws):
        return None
    return tuple(r.strip() for r in raws)


def _image_path(folder: Any, filename: str) -> str:
    """A Karpathy image's path relative to the image root: ``filepath/filename``, or ``filename``."""
    return f"{folder}/{filename}" if folder else filename


def _check_splits(splits: Sequence[str]) -> None:
    unknown = [s for s in splits if s not in KARPATHY_SPLITS]
    if unknown:
        raise ValueError(f"unknown Karpathy split(s) {unknown}; known: {', '.join(KARPATHY_SPLITS)}")


def load_karpathy(
    captions_file: str | Path, splits: Sequence[str] = ("test",), images_root: str | Path | None = None
) -> list[CaptionedImage]:
    """The images of ``splits`` in a Karpathy caption file, in file order.

    Raises a ``ValueError`` naming the file, the entry and the field for a malformed file (every
    problem counted, the first few of each kind shown), or when a split is unknown or empty.
    Image files are not opened here (bad ones are skipped while loading batches).
    """
    path = Path(captions_file)
    _check_splits(splits)
    root = Path(images_root) if images_root is not None else path.parent
    entries = top_list(path, read_dataset_json(path, "Karpathy captions"), "images")
    issues, images, seen = Issues(), [], set()
    for i, entry in enumerate(entries):
        where = f"images[{i}]"
        if not isinstance(entry, dict):
            issues.add("type", f"{path}: {where} must be an object, got a {type(entry).__name__}")
            continue
        missing = [k for k in ("filename", "imgid", "split", "sentences") if k not in entry]
        if missing:
            issues.add(
                ("missing", tuple(missing)), f"{path}: {where} is missing field(s) {', '.join(map(repr, missing))}"
            )
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
        captions = _caption_list(entry["sentences"]) if isinstance(entry["sentences"], list) else None
        if captions is None:
            issues.add(
                "sentences",
                f"{path}: {where}, field 'sentences': needs a non-empty list of "
                '{"raw": <non-empty caption>} objects',
            )
            continue
        if entry["split"] not in splits:
            continue
        image = root / _image_path(entry.get("filepath"), entry["filename"])
        images.append(CaptionedImage(entry["imgid"], image, captions, entry["split"]))
    issues.raise_if_any(f"the caption file {path}")
    if not images:
        raise ValueError(f"{path} has no image in split(s) {', '.join(splits)}")
    return images


def load_captions(
    source: str | Path,
    splits: Sequence[str] = ("test",),
    images_root: str | Path | None = None,
    format: str | None = None,
    columns: Mapping[str, str] | None = None,
) -> list[CaptionedImage]:
    """``load_karpathy`` (``format="karpathy"``) or ``load_captions_hf`` (``"hf"``); ``None``: a
    ``.json`` file is a Karpathy caption file, anything else a Hugging Face dataset."""
    format = format or ("karpathy" if Path(source).suffix.lower() == ".json" else "hf")
    if format not in CAPTION_FORMATS:
        raise ValueError(f"unknown caption format {format!r}: use one of {', '.join(CAPTION_FORMATS)}")
    if format == "hf":
        return load_captions_hf(source, splits, columns, images_root)
    if columns:
        raise ValueError(f"a column mapping ({dict(columns)}) applies to Hugging Face datasets (format hf) only")
    return load_karpathy(source, splits, images_root)


def load_captions_hf(
    path_or_dataset: Any,
    splits: Sequence[str] = ("test",),
    columns: Mapping[str, str] | None = None,
    images_root: str | Path | None = None,
    cache_dir: str | Path | None = None,
) -> list[CaptionedImage]:
    """The images of ``splits`` in a Hugging Face caption dataset, in dataset order.

    Args:
        path_or_dataset: a Hub dataset id (``datasets.load_dataset``, downloaded once, then read from
            the cache; with ``HF_HUB_OFFLINE=1`` only the cache is read), a dataset repository folder,
            parquet/arrow files or a folder of them, a ``save_to_disk`` folder, or a
            ``datasets.Dataset``/``DatasetDict``.
        splits: Karpathy split names. A row's split is its ``split`` column's value when the dataset
            has that column (``validation`` stands for ``val``), else the dataset split holding it.
        columns: field → the dataset's column, for fields under other names than ``HF_CAPTION_COLUMNS``.
        images_root: folder where relative image paths are looked up first (then the dataset's folder).
        cache_dir: where images stored in the dataset are written, a folder per dataset fingerprint
            (default ``$HF_DATASETS_CACHE/absvl_images``); a later load reuses the files (a dataset
            built in memory has a new fingerprint in every process, so only loaded ones are reused).

    Fields: ``image`` (an ``Image`` feature, encoded bytes or a path), ``captions`` (a caption, a
    list of them or Karpathy ``sentences``), optional ``split``, ``image_id`` (an integer or its
    digits) and ``folder`` (the Karpathy layout's ``filepath`` beside ``filename``: a path in
    ``image`` is then ``folder/image``, as in the caption file). The rows of one image (one
    ``image_id``; without that column, one image path or the same bytes) are one item with all
    their captions: one row per image and one row per caption both work. Rows without an image
    are left out and counted in the log; files that cannot be read are skipped while loading
    batches. Malformed rows raise a ``ValueError`` naming the dataset, the row and the column.
    """
    import datasets

    _check_splits(splits)
    roots = [Path(images_root).expanduser()] if images_root is not None else []
    if isinstance(path_or_dataset, (str, Path)):
        base, source = Path(path_or_dataset).expanduser(), str(path_or_dataset)
        loaded = hf.dataset_at(base, None)
        if base.exists():
            roots.append(base if base.is_dir() else base.parent)
    else:
        loaded, source = path_or_dataset, "the Hugging Face dataset"
    parts = dict(loaded) if isinstance(loaded, Mapping) else {"": loaded}
    cache = Path(cache_dir or Path(datasets.config.HF_DATASETS_CACHE) / "absvl_images").expanduser()
    issues, images, no_image = Issues(), [], []
    for name, dataset in parts.items():
        label = f"{source} [{name}]" if name else source
        dataset, names = _hf_caption_columns(dataset.with_format(None), columns or {}, label)
        rows, files, ids = _hf_caption_rows(dataset, names, _HF_SPLITS.get(name.lower()), roots, label, issues)
        groups: dict[Any, tuple[int, str, list[str]]] = {}  # an image's first row, its split and all its captions
        for row, split, captions, key in rows:
            if split in splits:
                groups.setdefault(key, (row, split, []))[2].extend(captions)
        stored = {row: files[row][1] for row, _, _ in groups.values() if isinstance(files[row][1], HFImageRef)}
        written = _cache_images(stored, cache / dataset._fingerprint, label)
        for row, split, captions in groups.values():
            path, data = files[row]
            if isinstance(data, bytes):
                no_image.append(path)
            else:
                images.append(CaptionedImage(ids[row], written.get(row, Path(path)), tuple(captions), split))
    issues.raise_if_any(f"the caption dataset {source}")
    if no_image:
        logger.warning(
            "%s: %d image(s) left out, the dataset holds no image for them (first: %s)",
            source,
            len(no_image),
            no_image[0],
        )
    if not images:
        named = ", ".join(n or "(unnamed)" for n in parts)
        raise ValueError(
            f"{source} has no image in split(s) {', '.join(splits)} (its splits: {named}; a "
            "row's split is its split column's value, else the dataset split holding it: name the split "
            "column with data.hf_columns, e.g. {split: subset})"
        )
    return images


def _hf_caption_columns(dataset: Any, columns: Mapping[str, str], source: str) -> tuple[Any, dict[str, str]]:
    """``dataset`` with the caption fields as its column names, and field → the dataset's own column:
    ``columns`` first, then for every other field the first of its ``HF_CAPTION_COLUMNS`` present."""
    found = dataset.column_names
    names = dict(columns)
    for name, candidates in HF_CAPTION_COLUMNS.items():
        column = next((c for c in candidates if c in found and c not in names.values()), None)
        names.setdefault(name, column)
    names = {name: column for name, column in names.items() if column is not None}
    dataset = hf.map_columns(dataset, names, source, tuple(HF_CAPTION_COLUMNS))
    missing = [f for f in ("image", "captions") if f not in names]
    if missing:
        looked = "; ".join(f"{f}: {', '.join(HF_CAPTION_COLUMNS[f])}" for f in missing)
        raise ValueError(
            f"{source}: no column for {' or '.join(missing)} (looked for {looked}; columns: "
            f"{', '.join(found)}): name it with data.hf_columns, e.g. {{captions: sentences, image: img}}"
        )
    return dataset, names


def _hf_caption_rows(
    dataset: Any, names: Mapping[str, str], part_split: str | None, roots: Sequence[Path], source: str, issues: Issues
) -> tuple[list[tuple[int, str | None, tuple[str, ...], Any]], list[tuple[str, Any]], Sequence[int]]:
    """``(row, split, captions, image key)`` of every well-formed row (the others recorded in
    ``issues``), every row's image ``(path or description, HFImageRef | None | b"")`` (see
    ``hf.image_refs``) and its image id. Rows are keyed by image id, else by image path or bytes."""
    meta = dataset.select_columns([f for f in ("captions", "split", "image_id") if f in names]).to_dict()
    ids = [
        int(v) if isinstance(v, str) and v.strip().isdigit() else v for v in meta.get("image_id", range(len(dataset)))
    ]
    if "folder" in names and getattr(dataset.features["image"], "dtype", None) in ("string", "large_string"):
        paths = dataset.select_columns(["folder", "image"]).to_dict()
        joined = [f and _image_path(d, f) for d, f in zip(paths["folder"], paths["image"])]
        dataset = dataset.remove_columns("image").add_column("image", joined)
    files = hf.image_refs(dataset, "image", roots, source, ids, "image_id")
    rows = []
    for row, (path, data) in enumerate(files):
        where = f"{source} row {row}"
        captions = _caption_list(meta["captions"][row])
        split = _HF_SPLITS.get(str(meta["split"][row]).strip().lower()) if "split" in meta else part_split
        if captions is None:
            issues.add(
                "captions",
                f"{where}, column {names['captions']!r}: needs a caption or a non-empty list of "
                f'captions (strings or {{"raw": str}} objects), got {meta["captions"][row]!r:.80}',
            )
        elif not is_int(ids[row]):
            issues.add("image_id", f"{where}, column {names['image_id']!r}: must be an integer, got {ids[row]!r}")
        elif "split" in meta and split is None:
            issues.add(
                "split",
                f"{where}, column {names['split']!r}: {meta['split'][row]!r} is not a split name "
                f"({', '.join(_HF_SPLITS)})",
            )
        elif "image_id" in meta:
            rows.append((row, split, captions, ids[row]))
        elif isinstance(data, HFImageRef):
            rows.append((row, split, captions, hashlib.sha1(_image_bytes(data)).hexdigest()))
        else:  # a file path, or no image (b"": a row of its own)
            rows.append((row, split, captions, path if data is None else ("row", row)))
    return rows, files, ids


def _image_bytes(ref: HFImageRef) -> bytes:
    data = ref.read()
    return data if isinstance(data, bytes) else b""


def _cache_images(stored: Mapping[int, HFImageRef], folder: Path, source: str) -> dict[int, Path]:
    """``folder/<row>.<format>`` holding each row's image bytes: a file of an earlier load is reused, a
    new one written atomically (a reader never sees a partial image)."""
    if not stored:
        return {}
    folder.mkdir(parents=True, exist_ok=True)
    present = {p.stem: p for p in folder.iterdir() if not p.name.startswith(".")}
    out, written = {}, 0
    for row, ref in stored.items():
        out[row] = present.get(str(row))
        if out[row] is None:
            data = _image_bytes(ref)
            out[row] = folder / f"{row}{_suffix(data)}"
            with atomic_file(out[row]) as tmp:
                tmp.write_bytes(data)
            written += 1
    logger.info("%s: %d image(s) in %s, %d of them written now", source, len(out), folder, written)
    return out


def _suffix(data: bytes) -> str:
    """The file extension of encoded image bytes (``.img`` when PIL does not recognise them)."""
    try:
        kind = Image.open(io.BytesIO(data)).format
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return ".img"
    return ".jpg" if kind == "JPEG" else f".{kind.lower()}"


class CaptionedImageDataset(torch.utils.data.Dataset):
    """Training pairs: each image with one of its captions, drawn per item — under ``EpochOrder``
    the draw is a function of (seed, epoch, item), so every epoch sees other captions and a
    resumed run sees the same ones. An item is ``{"image", "caption", "index"}`` (and ``"foil"``, the
    caption made false for the image by ``foil(path, caption)``, or None) or, for an unreadable image,
    ``{"error", "index", "image_path"}``. (Images alone, for evaluation and
    indexing: ``absvl.data.image_files.ImageFiles``.)
    """

    def __init__(
        self,
        images: Sequence[CaptionedImage],
        transform: Callable[[Any], torch.Tensor],
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        foil: Callable[[Path, str], str | None] | None = None,
    ) -> None:
        self.images = list(images)
        self.transform = transform
        self.max_pixels = max_pixels
        self.foil = foil

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.images[index]
        try:
            image = open_image(item.path, self.max_pixels)
        except BadImageError as exc:
            return {"error": exc.reason, "index": index, "image_path": exc.path}
        caption = random.choice(item.captions)
        out = {"image": self.transform(image), "caption": caption, "index": index}
        if self.foil is not None:
            out["foil"] = self.foil(item.path, caption)
        return out


class CaptionCollator:
    """Items of ``CaptionedImageDataset`` → ``images [B,3,S,S]``, ``input_ids``/``attention_mask
    [B,T]`` (absent when every image was unreadable), ``indices [B]`` and ``skipped``
    ``[(index, image_path, reason)]``; items with foils add ``foil_rows [F]`` (the images that have one) and
    ``foil_ids``/``foil_mask [F, T]``."""

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
        foiled = [row for row, it in enumerate(good) if it.get("foil")]
        encoded = self.tokenizer(  # the foils padded with the captions: their rows join the ITM pairs as they are
            [it["caption"] for it in good] + [good[row]["foil"] for row in foiled],
            padding="longest",
            truncation=True,
            max_length=self.max_text_len,
            return_tensors="pt",
        )
        n = len(good)
        batch["input_ids"], batch["attention_mask"] = encoded["input_ids"][:n], encoded["attention_mask"][:n]
        if any("foil" in it for it in good):
            batch["foil_rows"] = torch.tensor(foiled, dtype=torch.long)
            batch["foil_ids"], batch["foil_mask"] = encoded["input_ids"][n:], encoded["attention_mask"][n:]
        return batch


def check_caption_images(images: Sequence[CaptionedImage], key: str = "data.images") -> None:
    """``check_image_root`` on the images of a caption file."""
    check_image_root(
        [im.path for im in images[:20]], f"point {key} at the folder holding the caption file's filepath/filename"
    )
