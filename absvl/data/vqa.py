"""VQAv2 data: the official JSON + COCO image layout, Hugging Face ``datasets`` input, the torch
dataset and collator used for training and evaluation (SPEC §6).

Official layout (``VQAv2Layout``)::

    ROOT/v2_OpenEnded_mscoco_{train2014,val2014,test-dev2015,test2015}_questions.json
    ROOT/v2_mscoco_{train2014,val2014}_annotations.json
    ROOT/images/{train2014,val2014,test2015}/COCO_<folder>_<image_id:012d>.jpg   (or)
    ROOT/{train2014,val2014,test2015}/COCO_<folder>_<image_id:012d>.jpg

The JSON files are looked up in ``ROOT``, then ``ROOT/questions`` and ``ROOT/annotations``; each
image folder in ``ROOT/images/<folder>`` then ``ROOT/<folder>`` (the first that exists). Explicit
``questions_dir``/``annotations_dir``/``images_dir`` override the search (``images_dir/<folder>`` if
it exists, else ``images_dir`` itself). Split names: ``train`` → train2014, ``val`` → val2014,
``test-dev`` → test-dev2015 (images in test2015), ``test`` → test2015; the test splits have no
public annotations.

Every malformed input raises ``VQAFormatError`` (a ``ValueError``) whose message names the file,
the entry and the field; ``absvl.data.check`` collects the same problems into a report instead.
"""
from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .images import DEFAULT_MAX_PIXELS, BadImageError, open_image

__all__ = [
    "HFImageRef",
    "SPLITS",
    "VQACollator",
    "VQADataset",
    "VQAExample",
    "VQAFormatError",
    "VQAv2Layout",
    "canonical_split",
    "holdout_split",
    "load_vqa_hf",
    "load_vqa_split",
]

ANSWER_TYPES = ("yes/no", "number", "other")
MAX_LISTED = 5  # ids / examples shown per kind of problem


@dataclass(frozen=True)
class SplitInfo:
    name: str  # canonical: train, val, test-dev, test
    tag: str  # in the JSON file names: train2014, val2014, test-dev2015, test2015
    image_folder: str  # train2014, val2014, test2015
    has_annotations: bool


SPLITS: dict[str, SplitInfo] = {
    "train": SplitInfo("train", "train2014", "train2014", True),
    "val": SplitInfo("val", "val2014", "val2014", True),
    "test-dev": SplitInfo("test-dev", "test-dev2015", "test2015", False),
    "test": SplitInfo("test", "test2015", "test2015", False),
}
_SPLIT_ALIASES = {
    "train2014": "train",
    "val2014": "val",
    "validation": "val",
    "valid": "val",
    "testdev": "test-dev",
    "test_dev": "test-dev",
    "test-dev2015": "test-dev",
    "testdev2015": "test-dev",
    "test2015": "test",
}
# the fields of a row of a Hugging Face VQA dataset (``load_vqa_hf``'s ``columns`` maps them to other names)
HF_FIELDS = ("question_id", "image_id", "question", "answers", "image", "answer_type", "question_type",
             "multiple_choice_answer", "target_objects")
# names a Hugging Face dataset may use for each split (DatasetDict keys, parquet file prefixes)
_HF_SPLIT_NAMES = {
    "train": ("train", "train2014"),
    "val": ("val", "validation", "valid", "val2014"),
    "test-dev": ("test-dev", "testdev", "test_dev", "test-dev2015", "testdev2015"),
    "test": ("test", "test2015"),
}


def canonical_split(split: str) -> str:
    """``train``/``val``/``test-dev``/``test`` from a split name or alias (``val2014``, ``validation``, ...)."""
    key = str(split).strip().lower()
    key = _SPLIT_ALIASES.get(key, key)
    if key not in SPLITS:
        raise ValueError(f"unknown VQAv2 split {split!r}: use one of {', '.join(SPLITS)}")
    return key


class VQAFormatError(ValueError):
    """A VQA questions/annotations file (or dataset) that does not follow the official format."""


# ----------------------------------------------------------------------------------------------
# examples and images


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


@dataclass
class VQAExample:
    """One VQA question.

    ``answers`` are the 10 human answers as given (not normalised), ``None`` without annotations.
    ``image_path`` is the image file, or a description of the image for messages when the image
    comes from a Hugging Face dataset (``image_data``: the encoded bytes or an ``HFImageRef``).
    """

    question_id: int
    image_id: int
    question: str
    image_path: str
    answers: list[str] | None = None
    answer_type: str | None = None
    question_type: str | None = None
    multiple_choice_answer: str | None = None
    target_objects: Any = None
    image_data: bytes | HFImageRef | None = field(default=None, repr=False)

    def open_image(self, max_pixels: int | None = DEFAULT_MAX_PIXELS):
        """The RGB PIL image (``BadImageError`` when missing or unreadable)."""
        if self.image_data is None:
            return open_image(self.image_path, max_pixels=max_pixels)
        data = self.image_data.read() if isinstance(self.image_data, HFImageRef) else self.image_data
        if data is None:
            raise BadImageError(self.image_path, "the dataset holds no image for this row")
        return open_image(data, max_pixels=max_pixels, name=self.image_path)


# ----------------------------------------------------------------------------------------------
# problem collection (shared with absvl.data.check)


class Issues:
    """Problems grouped by kind: each kind counted, its first few messages kept."""

    def __init__(self, keep: int = 3) -> None:
        self.keep = keep
        self._groups: dict[Any, list] = {}
        self.rejected: set[int] = set()  # question ids of entries dropped for a problem of their own

    def add(self, kind: Any, message: str) -> None:
        group = self._groups.setdefault(kind, [0, []])
        group[0] += 1
        if len(group[1]) < self.keep:
            group[1].append(message)

    def __bool__(self) -> bool:
        return bool(self._groups)

    def __len__(self) -> int:
        return sum(count for count, _ in self._groups.values())

    def messages(self) -> list[str]:
        out = []
        for count, examples in self._groups.values():
            out.extend(examples)
            if count > len(examples):
                out.append(f"... and {count - len(examples):,} more like the one above")
        return out

    def raise_if_any(self, what: str) -> None:
        if self:
            lines = "\n  ".join(self.messages())
            raise VQAFormatError(f"{len(self):,} problem(s) in {what}:\n  {lines}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _few(ids: Sequence[Any]) -> str:
    ids = list(ids)
    shown = ", ".join(str(i) for i in ids[:MAX_LISTED])
    return shown + (f", ... ({len(ids):,} in all)" if len(ids) > MAX_LISTED else "")


def _read_json(path: Path, what: str) -> Any:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} file not found: {path}") from None
    except OSError as exc:
        raise VQAFormatError(f"{path}: cannot read the {what} file ({exc})") from None
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise VQAFormatError(
            f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); "
            f"is the {what} file complete (not cut short by a failed download or unzip)?"
        ) from None
    except UnicodeDecodeError as exc:
        raise VQAFormatError(f"{path}: not UTF-8 text, not a JSON {what} file ({exc})") from None


def _top_list(path: Path, data: Any, key: str) -> list:
    if not isinstance(data, dict):
        raise VQAFormatError(f"{path}: the top level must be an object with key {key!r}, got a {type(data).__name__}")
    if key not in data:
        found = ", ".join(repr(k) for k in list(data)[:10]) or "none"
        raise VQAFormatError(f"{path}: missing top-level key {key!r} (keys found: {found})")
    entries = data[key]
    if not isinstance(entries, list):
        raise VQAFormatError(f"{path}: top-level key {key!r} must be a list, got a {type(entries).__name__}")
    return entries


def _check_entry(
    source: str, where: str, entry: Any, required: Sequence[str], issues: Issues, kind: str
) -> tuple[int, int] | None:
    """(question_id, image_id) of a question/annotation entry, or None after recording its problem."""
    if not isinstance(entry, dict):
        issues.add((source, kind, "type"), f"{source}: {where} must be an object, got a {type(entry).__name__}")
        return None
    missing = [k for k in required if k not in entry]
    if missing:
        qid = entry.get("question_id")
        ident = f" (question_id {qid})" if qid is not None else ""
        issues.add(
            (source, kind, "missing", tuple(missing)),
            f"{source}: {where}{ident} is missing field(s) {', '.join(repr(k) for k in missing)}",
        )
        if _is_int(qid):
            issues.rejected.add(qid)
        return None
    ids = []
    for key in ("question_id", "image_id"):
        value = entry[key]
        if not _is_int(value):
            if key == "image_id" and _is_int(entry["question_id"]):
                issues.rejected.add(entry["question_id"])
            issues.add(
                (source, kind, "int", key),
                f"{source}: {where}, field {key!r}: must be an integer, got {value!r} ({type(value).__name__})",
            )
            return None
        ids.append(value)
    return ids[0], ids[1]


def _entries_with_ids(
    source: str, entries: Sequence[Any], issues: Issues, template: str, rows: Sequence[int] | None,
    keys: tuple[str, ...], kind: str,
) -> Iterator[tuple[str, int, dict]]:
    """(location, question_id, entry) of every entry whose keys and ids are well formed; the others are recorded."""
    for i, entry in enumerate(entries):
        where = template.format(rows[i] if rows is not None else i)
        ids = _check_entry(source, where, entry, keys, issues, kind)
        if ids is not None:
            yield where, ids[0], entry


def _parse_questions(
    source: str,
    entries: Sequence[Any],
    issues: Issues,
    where: str = "questions[{}]",
    rows: Sequence[int] | None = None,
) -> dict[int, dict]:
    """question_id → question entry; malformed entries, empty questions and duplicates recorded."""
    out: dict[int, dict] = {}
    keys = ("question_id", "image_id", "question")
    for where, qid, entry in _entries_with_ids(source, entries, issues, where, rows, keys, "question"):
        text = entry["question"]
        if not isinstance(text, str):
            issues.add((source, "question", "str"), f"{source}: {where} (question_id {qid}), field 'question': "
                       f"must be a string, got {type(text).__name__}")
            issues.rejected.add(qid)
            continue
        if not text.strip():
            issues.add((source, "question", "empty"),
                       f"{source}: {where} (question_id {qid}), field 'question': empty question")
            issues.rejected.add(qid)
            continue
        if qid in out:
            issues.add((source, "question", "duplicate"), f"{source}: {where}: duplicate question_id {qid}")
            continue
        out[qid] = entry
    return out


def _answer_list(value: Any) -> list[str] | None:
    """The answer strings of an ``answers`` field (list of {"answer": ...} or of str), None if malformed."""
    if isinstance(value, dict) and isinstance(value.get("answer"), list):  # HF Sequence(dict) columns
        value = value["answer"]
    if not isinstance(value, list) or not value:
        return None
    out = []
    for item in value:
        answer = item.get("answer") if isinstance(item, dict) else item
        if not isinstance(answer, str):
            return None
        out.append(answer)
    return out


def _parse_annotations(
    source: str,
    entries: Sequence[Any],
    issues: Issues,
    where: str = "annotations[{}]",
    rows: Sequence[int] | None = None,
) -> dict[int, dict]:
    """question_id → annotation entry with ``answers`` turned into a list of strings."""
    out: dict[int, dict] = {}
    keys = ("question_id", "image_id", "answers")
    for where, qid, entry in _entries_with_ids(source, entries, issues, where, rows, keys, "annotation"):
        answers = _answer_list(entry["answers"])
        if answers is None:
            issues.add(
                (source, "annotation", "answers"),
                f"{source}: {where} (question_id {qid}), field 'answers': must be a non-empty list of "
                f'{{"answer": str, ...}} objects, got {str(entry["answers"])[:80]}',
            )
            issues.rejected.add(qid)
            continue
        bad_str = [k for k in ("answer_type", "question_type", "multiple_choice_answer")
                   if entry.get(k) is not None and not isinstance(entry[k], str)]
        if bad_str:
            issues.add((source, "annotation", "str", bad_str[0]),
                       f"{source}: {where} (question_id {qid}), field {bad_str[0]!r}: must be a string")
            issues.rejected.add(qid)
            continue
        if qid in out:
            issues.add((source, "annotation", "duplicate"), f"{source}: {where}: duplicate question_id {qid}")
            continue
        out[qid] = dict(entry, answers=answers)
    return out


def _join(
    questions: dict[int, dict],
    annotations: dict[int, dict] | None,
    qsource: str,
    asource: str,
    image_path: Callable[[dict], tuple[str, Any]],
    issues: Issues,
) -> list[VQAExample]:
    """Examples in question order; id mismatches between the two sources recorded."""
    if annotations is not None:
        no_annotation = [q for q in questions if q not in annotations and q not in issues.rejected]
        no_question = [a for a in annotations if a not in questions and a not in issues.rejected]
        if no_annotation:
            issues.add((qsource, "join", "no_annotation"),
                       f"{len(no_annotation):,} question(s) of {qsource} have no annotation in {asource} "
                       f"(question_id {_few(no_annotation)})")
        if no_question:
            issues.add((asource, "join", "no_question"),
                       f"{len(no_question):,} annotation(s) of {asource} have no question in {qsource} "
                       f"(question_id {_few(no_question)})")
        mismatch = [(q, e["image_id"], annotations[q]["image_id"]) for q, e in questions.items()
                    if q in annotations and annotations[q]["image_id"] != e["image_id"]]
        if mismatch:
            shown = ", ".join(f"question_id {q}: image_id {a} vs {b}" for q, a, b in mismatch[:MAX_LISTED])
            issues.add((asource, "join", "image_id"),
                       f"{len(mismatch):,} question(s) have a different image_id in {qsource} and {asource} ({shown})")
    examples = []
    for qid, entry in questions.items():
        ann = annotations.get(qid) if annotations is not None else None
        if annotations is not None and (ann is None or ann["image_id"] != entry["image_id"]):
            continue
        path, data = image_path(entry)
        target = entry.get("target_objects", ann.get("target_objects") if ann else None)
        examples.append(
            VQAExample(
                question_id=qid,
                image_id=entry["image_id"],
                question=entry["question"],
                image_path=path,
                answers=list(ann["answers"]) if ann else None,
                answer_type=ann.get("answer_type") if ann else None,
                question_type=ann.get("question_type") if ann else None,
                multiple_choice_answer=ann.get("multiple_choice_answer") if ann else None,
                target_objects=target,
                image_data=data,
            )
        )
    return examples


# ----------------------------------------------------------------------------------------------
# the official layout


class VQAv2Layout:
    """Where the files of a VQAv2-format dataset are (see the module docstring for the search order)."""

    def __init__(
        self,
        root: str | Path,
        questions_dir: str | Path | None = None,
        annotations_dir: str | Path | None = None,
        images_dir: str | Path | None = None,
    ) -> None:
        self.root = Path(root).expanduser()
        self.questions_dir = Path(questions_dir).expanduser() if questions_dir is not None else None
        self.annotations_dir = Path(annotations_dir).expanduser() if annotations_dir is not None else None
        self.images_dir = Path(images_dir).expanduser() if images_dir is not None else None
        self._folders: dict[str, Path] = {}

    def __repr__(self) -> str:
        return f"VQAv2Layout(root={str(self.root)!r})"

    def _json_dirs(self, explicit: Path | None) -> list[Path]:
        if explicit is not None:
            return [explicit]
        return [self.root, self.root / "questions", self.root / "annotations"]

    def questions_candidates(self, split: str) -> list[Path]:
        name = f"v2_OpenEnded_mscoco_{SPLITS[canonical_split(split)].tag}_questions.json"
        return [d / name for d in self._json_dirs(self.questions_dir)]

    def annotations_candidates(self, split: str) -> list[Path]:
        info = SPLITS[canonical_split(split)]
        if not info.has_annotations:
            return []
        name = f"v2_mscoco_{info.tag}_annotations.json"
        return [d / name for d in self._json_dirs(self.annotations_dir)]

    def questions_file(self, split: str) -> Path:
        """The questions JSON of ``split`` (``FileNotFoundError`` naming every place searched)."""
        candidates = self.questions_candidates(split)
        for path in candidates:
            if path.is_file():
                return path
        searched = ", ".join(str(p) for p in candidates)
        raise FileNotFoundError(f"no questions file for split {split!r}: looked for {searched}")

    def annotations_file(self, split: str) -> Path | None:
        """The annotations JSON of ``split``, None when the split has none or it is not there."""
        return next((p for p in self.annotations_candidates(split) if p.is_file()), None)

    def image_candidates(self, split: str) -> list[Path]:
        folder = SPLITS[canonical_split(split)].image_folder
        if self.images_dir is not None:
            return [self.images_dir / folder, self.images_dir]
        return [self.root / "images" / folder, self.root / folder]

    def image_folder(self, split: str) -> Path:
        """The first existing image folder candidate (the first candidate when none exists)."""
        key = canonical_split(split)
        if key not in self._folders:
            candidates = self.image_candidates(key)
            self._folders[key] = next((p for p in candidates if p.is_dir()), candidates[0])
        return self._folders[key]

    def image_path(self, split: str, image_id: int) -> Path:
        folder = SPLITS[canonical_split(split)].image_folder
        return self.image_folder(split) / f"COCO_{folder}_{int(image_id):012d}.jpg"

    def available_splits(self) -> list[str]:
        """Splits whose questions file exists."""
        return [s for s in SPLITS if any(p.is_file() for p in self.questions_candidates(s))]


@dataclass
class SplitLoad:
    """What ``read_split`` found: the valid examples, raw counts and the problems."""

    split: str
    examples: list[VQAExample]
    num_questions: int
    num_annotations: int | None
    questions_file: Path
    annotations_file: Path | None
    issues: Issues


def read_split(layout: VQAv2Layout, split: str, require_annotations: bool | None = None) -> SplitLoad:
    """Parse and cross-check a split, collecting per-entry problems in ``issues`` (no raise for them).

    File-level problems (missing file, invalid JSON, missing top-level key) still raise.
    """
    split = canonical_split(split)
    info = SPLITS[split]
    if require_annotations is None:
        require_annotations = info.has_annotations
    qfile = layout.questions_file(split)
    afile = layout.annotations_file(split)
    if require_annotations and afile is None:
        if not info.has_annotations:
            raise ValueError(f"split {split!r} has no public annotations: load it with require_annotations=False")
        searched = ", ".join(str(p) for p in layout.annotations_candidates(split))
        raise FileNotFoundError(f"no annotations file for split {split!r}: looked for {searched}")
    issues = Issues()
    qentries = _top_list(qfile, _read_json(qfile, "questions"), "questions")
    questions = _parse_questions(str(qfile), qentries, issues)
    annotations = None
    num_annotations = None
    if afile is not None:
        aentries = _top_list(afile, _read_json(afile, "annotations"), "annotations")
        num_annotations = len(aentries)
        annotations = _parse_annotations(str(afile), aentries, issues)
    examples = _join(
        questions, annotations, str(qfile), str(afile),
        lambda entry: (str(layout.image_path(split, entry["image_id"])), None), issues,
    )
    return SplitLoad(split, examples, len(qentries), num_annotations, qfile, afile, issues)


def load_vqa_split(
    layout_or_root: VQAv2Layout | str | Path, split: str, require_annotations: bool | None = None
) -> list[VQAExample]:
    """The examples of an official-format split, in questions-file order.

    Args:
        layout_or_root: a ``VQAv2Layout`` or the dataset root folder.
        split: ``train``, ``val``, ``test-dev`` or ``test`` (or ``train2014``, ``val2014``, ...).
        require_annotations: True → the annotations file must exist; False → used when present
            (``answers`` None otherwise). Default: True for train/val, False for the test splits.

    Raises:
        FileNotFoundError: a required file is missing (the message lists where it was looked for).
        VQAFormatError: invalid JSON, missing keys/fields, non-integer ids, empty questions,
            duplicate ids, questions without annotations or the reverse, image_id disagreements —
            the message names the file, the entry and the field.
    """
    layout = layout_or_root if isinstance(layout_or_root, VQAv2Layout) else VQAv2Layout(layout_or_root)
    loaded = read_split(layout, split, require_annotations)
    loaded.issues.raise_if_any(f"VQAv2 split {loaded.split!r} ({layout.root})")
    return loaded.examples


# ----------------------------------------------------------------------------------------------
# Hugging Face datasets


def _hf_pick_split(obj: Any, split: str | None, source: str):
    """The ``split`` of a ``DatasetDict`` (or a dict of datasets); ``split=None``: ``obj`` as it is."""
    import datasets

    if split is not None and isinstance(obj, (datasets.DatasetDict, dict)):
        for name in _HF_SPLIT_NAMES[split]:
            if name in obj:
                return obj[name]
        raise ValueError(f"{source} has no split {split!r} (it has: {', '.join(obj)})")
    return obj


def _hf_load_dataset(name: str) -> Any:
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
                "local copy instead") from None
        raise FileNotFoundError(f"{name!r} is not a local path and the Hugging Face Hub could not be reached for it "
                                f"({exc}): check the name and the network, or give the folder of a local copy "
                                "instead") from None


def _hf_from_files(path: Path, files: Sequence[Path]) -> Any:
    import datasets

    suffixes = {p.suffix for p in files}
    if suffixes == {".parquet"}:
        return datasets.Dataset.from_parquet([str(p) for p in files])
    if suffixes == {".arrow"}:
        parts = [datasets.Dataset.from_file(str(p)) for p in files]
        return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    raise ValueError(f"{path}: expected .parquet or .arrow files (or a save_to_disk folder), "
                     f"got {', '.join(sorted(suffixes))}")


def _hf_from_path(path: Path, split: str | None):
    """The ``split`` of the dataset at ``path``; ``split=None``: every split (a ``DatasetDict``, a
    dict of datasets for split-named files, or one dataset)."""
    import datasets

    if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        return _hf_pick_split(datasets.load_from_disk(str(path)), split, str(path))
    if not path.exists() or (path / "README.md").is_file():  # a Hub id or a dataset repository folder
        return _hf_pick_split(_hf_load_dataset(str(path)), split, str(path))
    if path.is_file():
        files = [path]
    else:
        files = sorted(p for p in path.rglob("*") if p.suffix in (".parquet", ".arrow") and p.is_file())
        if not files:  # other data files (json, jsonl, csv): datasets' own discovery
            return _hf_pick_split(_hf_load_dataset(str(path)), split, str(path))
        all_names = {n for ns in _HF_SPLIT_NAMES.values() for n in ns}

        def split_of(p: Path) -> str | None:
            parts = [p.stem.split("-")[0].split(".")[0].lower()] + [d.lower() for d in p.relative_to(path).parts[:-1]]
            return next((n for n in parts if n in all_names), None)

        named = [p for p in files if split_of(p) is not None]
        if named and split is None:
            splits = dict.fromkeys(map(split_of, named))
            return {s: _hf_from_files(path, [p for p in named if split_of(p) == s]) for s in splits}
        if named:  # files tell their split: keep those of this split
            files = [p for p in named if split_of(p) in _HF_SPLIT_NAMES[split]]
            if not files:
                raise ValueError(f"{path} has no files for split {split!r} (file names tell splits "
                                 f"{', '.join(sorted({split_of(p) for p in named}))})")
    return _hf_from_files(path, files)


def _hf_images(
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
        col = arrow[start:start + 4096].column(column).combine_chunks()
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
            raise VQAFormatError(f"{source}: column {column!r} must hold images, bytes or paths, "
                                 f"got Arrow type {col.type}")
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


def _hf_map_columns(dataset: Any, columns: Mapping[str, str], source: str, fields: Sequence[str] = HF_FIELDS) -> Any:
    """``dataset`` with the columns named in ``columns`` (field → column) renamed to their fields."""
    unknown = [f for f in columns if f not in fields]
    if unknown:
        raise VQAFormatError(f"unknown field(s) {', '.join(map(repr, unknown))} in the column mapping "
                             f"(data.hf_columns): the fields are {', '.join(fields)}")
    names = dataset.column_names
    absent = [f"{column!r} (for {f})" for f, column in columns.items() if column not in names]
    if absent:
        raise VQAFormatError(f"{source}: column(s) {', '.join(absent)} of the column mapping (data.hf_columns) are not "
                             f"in the dataset (columns: {', '.join(names)})")
    renames = {column: f for f, column in columns.items() if column != f}
    shadowed = [f for f in renames.values() if f in names and f not in renames]  # replaced by the mapped column
    return dataset.remove_columns(shadowed).rename_columns(renames)


def load_vqa_hf(
    path_or_dataset: Any,
    split: str = "train",
    require_annotations: bool | None = None,
    columns: Mapping[str, str] | None = None,
    images_root: str | Path | None = None,
) -> list[VQAExample]:
    """VQA examples from a Hugging Face ``datasets`` dataset with the VQAv2 fields.

    Args:
        path_or_dataset: a ``datasets.Dataset``/``DatasetDict``; a ``save_to_disk`` folder; a
            ``.parquet``/``.arrow`` file or a folder of them (files whose name or parent folder
            starts with a split name — ``train``, ``validation``/``val``, ``testdev``, ``test`` —
            are filtered by ``split``); a dataset repository folder (a README.md, or data files
            of another format: read by ``datasets.load_dataset``); or a Hub dataset id
            (``org/name``: ``datasets.load_dataset``, downloaded once and then read from the
            cache; with ``HF_HUB_OFFLINE=1`` only the cache is read).
        split: picks the split of a ``DatasetDict`` or a folder (``val`` also matches ``validation``).
        require_annotations: default True for train/val, False for the test splits.
        columns: field → the dataset's column, for the fields the dataset names otherwise
            (``{"question_id": "qid", "image": "img"}``); fields are ``HF_FIELDS``.
        images_root: folder where relative image paths are looked up first (then the dataset's folder).

    Fields: ``question_id`` and ``image_id`` (int), ``question`` (str); ``answers`` (a list of str
    or of ``{"answer": str, ...}``); ``image`` (an ``Image`` feature, encoded bytes or a path; a
    dataset without ``image`` may have ``image_path``); optional ``answer_type``,
    ``question_type``, ``multiple_choice_answer`` (default: the most frequent answer),
    ``target_objects``. Images stay in the dataset and are decoded on use.
    """
    import datasets

    split = canonical_split(split)
    if require_annotations is None:
        require_annotations = SPLITS[split].has_annotations
    roots = [Path(images_root).expanduser()] if images_root is not None else []
    if isinstance(path_or_dataset, (str, Path)):
        base = Path(path_or_dataset).expanduser()
        source = str(base)
        dataset = _hf_from_path(base, split)
        if base.exists():
            roots.append(base if base.is_dir() else base.parent)
    else:
        source = f"Hugging Face dataset ({split})"
        dataset = _hf_pick_split(path_or_dataset, split, "the Hugging Face dataset")
    if not isinstance(dataset, datasets.Dataset):
        raise TypeError(f"expected a datasets.Dataset, got {type(dataset).__name__}")
    dataset = _hf_map_columns(dataset.with_format(None), columns or {}, source)
    columns = set(dataset.column_names)
    missing = [c for c in ("question_id", "image_id", "question") if c not in columns]
    if missing:
        raise VQAFormatError(f"{source}: missing column(s) {', '.join(repr(c) for c in missing)} "
                             f"(columns: {', '.join(sorted(columns))}; map the dataset's own names with "
                             "data.hf_columns, e.g. {question_id: qid})")
    if require_annotations and "answers" not in columns:
        raise VQAFormatError(f"{source}: missing column 'answers' (needed for split {split!r}; "
                             "pass require_annotations=False for unannotated data)")
    image_column = next((c for c in ("image", "image_path") if c in columns), None)
    if image_column is None:
        raise VQAFormatError(f"{source}: missing image column 'image' (or 'image_path'; map another one with "
                             f"data.hf_columns) (columns: {', '.join(sorted(columns))})")

    meta_cols = [c for c in ("question_id", "image_id", "question", "answers", "answer_type", "question_type",
                             "multiple_choice_answer", "target_objects") if c in columns]
    meta = dataset.select_columns(meta_cols).to_dict()
    n = len(dataset)
    issues = Issues()
    q_entries = []
    for i in range(n):
        entry = {k: meta[k][i] for k in ("question_id", "image_id", "question")}
        if "target_objects" in meta:
            entry["target_objects"] = meta["target_objects"][i]
        q_entries.append(entry)
    questions = _parse_questions(source, q_entries, issues, where="row {}")
    row_of = {}
    for i, qid in enumerate(meta["question_id"]):  # first occurrence: the row _parse_questions kept
        if _is_int(qid) and qid in questions and qid not in row_of:
            row_of[qid] = i
    annotations = None
    if "answers" in columns:
        kept_rows = [row_of[qid] for qid in questions]
        a_keys = [c for c in meta_cols if c not in ("question", "target_objects")]
        a_entries = [{k: meta[k][i] for k in a_keys} for i in kept_rows]
        annotations = _parse_annotations(source, a_entries, issues, where="row {}", rows=kept_rows)
        for ann in annotations.values():  # as in VQAv2: the most frequent human answer
            if ann.get("multiple_choice_answer") is None:
                ann["multiple_choice_answer"] = Counter(ann["answers"]).most_common(1)[0][0]
    images = _hf_images(dataset, image_column, roots, source, meta["question_id"])
    examples = _join(questions, annotations, source, source, lambda e: images[row_of[e["question_id"]]], issues)
    issues.raise_if_any(source)
    return examples


# ----------------------------------------------------------------------------------------------
# model selection hold-out


def holdout_split(examples: Sequence[VQAExample], num_images: int, seed: int = 0) -> tuple[list, list]:
    """(rest, holdout): all questions of ``num_images`` randomly chosen images go to ``holdout``.

    Deterministic for a given set of image ids and ``seed`` (independent of example order); both
    lists keep the input order and share no image. ViLT keeps 1,000 val images aside this way.
    """
    image_ids = sorted({ex.image_id for ex in examples})
    if not 0 <= num_images <= len(image_ids):
        raise ValueError(f"num_images={num_images} must be between 0 and the {len(image_ids):,} images available")
    held = set(random.Random(seed).sample(image_ids, num_images))
    rest = [ex for ex in examples if ex.image_id not in held]
    holdout = [ex for ex in examples if ex.image_id in held]
    return rest, holdout


# ----------------------------------------------------------------------------------------------
# torch dataset and collator


class VQADataset(torch.utils.data.Dataset):
    """Torch dataset of VQA examples: image tensor, question, soft targets, question id.

    Args:
        examples: from ``load_vqa_split``/``load_vqa_hf``.
        answer_to_index: answer string → index (or the answer list itself).
        transform: PIL RGB image → tensor (``image_transform``).
        drop_unanswerable: drop annotated questions none of whose answers is in the vocabulary
            (training, SPEC §6); their number is ``num_dropped``. Unannotated questions are kept.
        max_pixels: decompression-bomb limit for ``open_image``.

    An unreadable image never raises: the item is ``{"error": reason, "question_id", "image_path"}``
    and ``VQACollator`` drops it from the batch and lists it in ``batch["skipped"]``.
    """

    def __init__(
        self,
        examples: Sequence[VQAExample],
        answer_to_index: Mapping[str, int] | Sequence[str],
        transform: Callable[[Any], torch.Tensor],
        drop_unanswerable: bool = True,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ) -> None:
        from .answers import soft_targets

        if not isinstance(answer_to_index, Mapping):
            answer_to_index = {a: i for i, a in enumerate(answer_to_index)}
        self.answer_to_index = answer_to_index
        self.transform = transform
        self.max_pixels = max_pixels
        self.examples: list[VQAExample] = []
        self.targets: list[dict[int, float]] = []
        self.dropped_question_ids: list[int] = []
        for ex in examples:
            targets = dict(soft_targets(ex.answers, answer_to_index)) if ex.answers is not None else {}
            if drop_unanswerable and ex.answers is not None and not targets:
                self.dropped_question_ids.append(ex.question_id)
                continue
            self.examples.append(ex)
            self.targets.append(targets)

    @property
    def num_dropped(self) -> int:
        return len(self.dropped_question_ids)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        ex = self.examples[index]
        try:
            image = ex.open_image(self.max_pixels)
        except BadImageError as exc:
            return {"error": exc.reason, "question_id": ex.question_id, "image_path": exc.path}
        return {
            "image": self.transform(image),
            "question": ex.question,
            "targets": dict(self.targets[index]),
            "question_id": ex.question_id,
        }


class VQACollator:
    """Items of ``VQADataset`` → a model batch.

    Returns ``images [B,3,S,S]``, ``input_ids``/``attention_mask [B,T]`` (padded to the longest,
    truncated to ``max_text_len``), ``vqa_targets [B, num_answers]`` (dense soft scores; zero rows
    for unannotated questions), ``question_ids [B]``, ``questions`` (list of str) and ``skipped``:
    ``[(question_id, image_path, reason), ...]`` for the items whose image could not be read. If
    every item was bad the batch has ``B = 0`` (the trainer skips it; ``images`` is
    ``[0,3,S,S]`` with ``S = image_size`` or 0 when not given).
    """

    def __init__(self, tokenizer: Any, num_answers: int, max_text_len: int = 40, image_size: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.num_answers = int(num_answers)
        self.max_text_len = int(max_text_len)
        self.image_size = image_size

    def __call__(self, items: Sequence[dict[str, Any] | None]) -> dict[str, Any]:
        good = [it for it in items if it is not None and "error" not in it]
        bad = [it for it in items if it is not None and "error" in it]
        skipped = [(it["question_id"], it["image_path"], it["error"]) for it in bad]
        n = len(good)
        targets = torch.zeros(n, self.num_answers, dtype=torch.float32)
        for row, it in enumerate(good):
            for index, score in it["targets"].items():
                if not 0 <= index < self.num_answers:
                    raise IndexError(f"answer index {index} of question {it['question_id']} is outside "
                                     f"the {self.num_answers} answers")
                targets[row, index] = float(score)
        questions = [it["question"] for it in good]
        if n:
            images = torch.stack([it["image"] for it in good])
            enc = self.tokenizer(questions, padding="longest", truncation=True, max_length=self.max_text_len,
                                 return_tensors="pt")
            input_ids, attention_mask = enc["input_ids"], enc["attention_mask"]
        else:
            size = self.image_size or 0
            images = torch.zeros(0, 3, size, size)
            input_ids = torch.zeros(0, 0, dtype=torch.long)
            attention_mask = torch.zeros(0, 0, dtype=torch.long)
        return {
            "images": images,
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "vqa_targets": targets,
            "question_ids": torch.tensor([it["question_id"] for it in good], dtype=torch.long),
            "questions": questions,
            "skipped": skipped,
        }
