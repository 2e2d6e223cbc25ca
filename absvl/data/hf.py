"""Hugging Face ``datasets`` as absvl reads them: from a Hub id or a local folder/file, split by split, with
images left in the dataset (read by reference) or named by path."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .problems import VQAFormatError

__all__ = ["HFImageRef", "SPLIT_NAMES", "dataset_at", "image_refs", "map_columns", "pick_split"]

# names a Hugging Face dataset may use for each split (DatasetDict keys, parquet file prefixes)
SPLIT_NAMES = {
    "train": ("train", "train2014"),
    "val": ("val", "validation", "valid", "val2014"),
    "test-dev": ("test-dev", "testdev", "test_dev", "test-dev2015", "testdev2015"),
    "test": ("test", "test2015"),
    "restval": ("restval",),  # Karpathy's COCO split (the caption datasets' restval-*.parquet)
}


@dataclass(eq=False)
class HFImageRef:
    """An image stored inside a Hugging Face dataset (row ``row`` of ``column``), read on demand.

    Holding a reference instead of the bytes keeps memory flat for large (memory-mapped) datasets.
    """

    dataset: Any  # datasets.Dataset formatted as "arrow", reduced to the image column
    row: int
    column: str

    def read(self) -> bytes | str:
        value = self.dataset[self.row].column(self.column)[0].as_py()
        if isinstance(value, dict):
            return value.get("bytes") or value.get("path")
        return value


def pick_split(obj: Any, split: str | None, source: str):
    """The ``split`` of a ``DatasetDict`` (or a dict of datasets); ``split=None``: ``obj`` as it is."""
    import datasets

    if split is not None and isinstance(obj, (datasets.DatasetDict, dict)):
        for name in SPLIT_NAMES[split]:
            if name in obj:
                return obj[name]
        raise ValueError(f"{source} has no split {split!r} (it has: {', '.join(obj)})")
    return obj


def _load_dataset(name: str) -> Any:
    """``datasets.load_dataset(name)``: a Hub dataset id (downloaded once, then read from the cache)
    or a dataset repository folder (data files, optionally a README.md saying the splits)."""
    import datasets

    try:
        return datasets.load_dataset(name)
    except ConnectionError as exc:
        if datasets.config.HF_HUB_OFFLINE:
            raise FileNotFoundError(
                f"Hugging Face dataset {name!r} is neither a local path nor in the datasets cache, and offline mode is "
                "on (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE): load it once online to cache it, or give the folder of a "
                "local copy instead"
            ) from None
        raise FileNotFoundError(
            f"{name!r} is not a local path and the Hugging Face Hub could not be reached for it "
            f"({exc}): check the name and the network, or give the folder of a local copy "
            "instead"
        ) from None


def _from_files(path: Path, files: Sequence[Path]) -> Any:
    import datasets

    suffixes = {p.suffix for p in files}
    if suffixes == {".parquet"}:
        return datasets.Dataset.from_parquet([str(p) for p in files])
    if suffixes == {".arrow"}:
        parts = [datasets.Dataset.from_file(str(p)) for p in files]
        return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    raise ValueError(
        f"{path}: expected .parquet or .arrow files (or a save_to_disk folder), got {', '.join(sorted(suffixes))}"
    )


def dataset_at(path: Path, split: str | None):
    """The ``split`` of the dataset at ``path``; ``split=None``: every split (a ``DatasetDict``, a
    dict of datasets for split-named files, or one dataset)."""
    import datasets

    if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        return pick_split(datasets.load_from_disk(str(path)), split, str(path))
    if not path.exists() or (path / "README.md").is_file():  # a Hub id or a dataset repository folder
        return pick_split(_load_dataset(str(path)), split, str(path))
    if path.is_file():
        files = [path]
    else:
        files = sorted(p for p in path.rglob("*") if p.suffix in (".parquet", ".arrow") and p.is_file())
        if not files:  # other data files (json, jsonl, csv): datasets' own discovery
            return pick_split(_load_dataset(str(path)), split, str(path))
        all_names = {n for ns in SPLIT_NAMES.values() for n in ns}

        def split_of(p: Path) -> str | None:
            parts = [p.stem.split("-")[0].split(".")[0].lower()] + [d.lower() for d in p.relative_to(path).parts[:-1]]
            return next((n for n in parts if n in all_names), None)

        named = [p for p in files if split_of(p) is not None]
        if named and split is None:
            splits = dict.fromkeys(map(split_of, named))
            return {s: _from_files(path, [p for p in named if split_of(p) == s]) for s in splits}
        if named:  # files tell their split: keep those of this split
            files = [p for p in named if split_of(p) in SPLIT_NAMES[split]]
            if not files:
                raise ValueError(
                    f"{path} has no files for split {split!r} (file names tell splits "
                    f"{', '.join(sorted({split_of(p) for p in named}))})"
                )
    return _from_files(path, files)


def image_refs(
    dataset: Any, column: str, roots: Sequence[Path], source: str, ids: Sequence[Any], id_name: str = "question_id"
) -> list[tuple[str, Any]]:
    """(image path or description, bytes-reference or None; ``b""`` for no image) for every row, read
    through Arrow (no decoding); a relative path is looked up under ``roots`` (the first holding it,
    else the first root). Descriptions name the row and its ``id_name`` (``ids[row]``)."""
    import pyarrow as pa

    arrow = dataset.select_columns([column]).with_format("arrow")
    out: list[tuple[str, Any]] = []

    def located(p: str | None) -> str | None:
        if not p or Path(p).is_absolute():
            return p or None
        found = next((root / p for root in roots if (root / p).exists()), None)
        if found is None and not Path(p).exists() and roots:
            found = roots[0] / p
        return str(found) if found is not None else p

    for start in range(0, len(arrow), 4096):
        col = arrow[start : start + 4096].column(column).combine_chunks()
        if pa.types.is_struct(col.type):
            names = [col.type.field(i).name for i in range(col.type.num_fields)]
            paths = col.field("path").to_pylist() if "path" in names else [None] * len(col)
            has_bytes = col.field("bytes").is_valid().to_pylist() if "bytes" in names else [False] * len(col)
            valid = col.is_valid().to_pylist()
        elif pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
            paths, has_bytes, valid = col.to_pylist(), [False] * len(col), col.is_valid().to_pylist()
        elif pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type):
            paths, has_bytes = [None] * len(col), col.is_valid().to_pylist()
            valid = has_bytes
        else:
            raise VQAFormatError(
                f"{source}: column {column!r} must hold images, bytes or paths, got Arrow type {col.type}"
            )
        for j in range(len(col)):
            row = start + j
            label = f"{source} row {row} ({id_name} {ids[row]})"
            if valid[j] and has_bytes[j]:
                name = f"{label} [{paths[j]}]" if paths[j] else label
                out.append((name, HFImageRef(arrow, row, column)))
            elif valid[j] and paths[j]:
                out.append((located(paths[j]), None))
            else:
                out.append((label, b""))  # no image: reported as a bad image when opened
    return out


def map_columns(dataset: Any, columns: Mapping[str, str], source: str, fields: Sequence[str]) -> Any:
    """``dataset`` with the columns named in ``columns`` (field → column) renamed to their fields."""
    unknown = [f for f in columns if f not in fields]
    if unknown:
        raise VQAFormatError(
            f"unknown field(s) {', '.join(map(repr, unknown))} in the column mapping "
            f"(data.hf_columns): the fields are {', '.join(fields)}"
        )
    names = dataset.column_names
    absent = [f"{column!r} (for {f})" for f, column in columns.items() if column not in names]
    if absent:
        raise VQAFormatError(
            f"{source}: column(s) {', '.join(absent)} of the column mapping (data.hf_columns) are not "
            f"in the dataset (columns: {', '.join(names)})"
        )
    renames = {column: f for f, column in columns.items() if column != f}
    shadowed = [f for f in renames.values() if f in names and f not in renames]  # replaced by the mapped column
    return dataset.remove_columns(shadowed).rename_columns(renames)
