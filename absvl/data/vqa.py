"""VQAv2 in the official layout (JSON files + COCO images) or as a Hugging Face dataset → ``VQAExample`` lists.

Where the files may be (the search order) and the accepted fields: data/README.md. Every malformed input raises
``VQAFormatError`` naming the file, the entry and the field; ``absvl.data.check`` reports the same problems instead.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import hf
from .problems import Issues, VQAFormatError, is_int, read_dataset_json, top_list
from .vqa_examples import VQAExample, join_examples, parse_annotations, parse_questions

__all__ = [
    "HF_FIELDS",
    "SPLITS",
    "VQAv2Layout",
    "canonical_split",
    "holdout_split",
    "load_vqa_hf",
    "load_vqa_split",
    "read_split",
]

ANSWER_TYPES = ("yes/no", "number", "other")


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
HF_FIELDS = (
    "question_id",
    "image_id",
    "question",
    "answers",
    "image",
    "answer_type",
    "question_type",
    "multiple_choice_answer",
    "target_objects",
)


def canonical_split(split: str) -> str:
    """``train``/``val``/``test-dev``/``test`` from a split name or alias (``val2014``, ``validation``, ...)."""
    key = str(split).strip().lower()
    key = _SPLIT_ALIASES.get(key, key)
    if key not in SPLITS:
        raise ValueError(f"unknown VQAv2 split {split!r}: use one of {', '.join(SPLITS)}")
    return key


class VQAv2Layout:
    """Where the files of a VQAv2-format dataset are (the search order: data/README.md)."""

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
    qentries = top_list(qfile, read_dataset_json(qfile, "VQAv2 questions"), "questions")
    questions = parse_questions(str(qfile), qentries, issues)
    annotations = None
    num_annotations = None
    if afile is not None:
        aentries = top_list(afile, read_dataset_json(afile, "VQAv2 annotations"), "annotations")
        num_annotations = len(aentries)
        annotations = parse_annotations(str(afile), aentries, issues)
    examples = join_examples(
        questions,
        annotations,
        str(qfile),
        str(afile),
        lambda entry: (str(layout.image_path(split, entry["image_id"])), None),
        issues,
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
        dataset = hf.dataset_at(base, split)
        if base.exists():
            roots.append(base if base.is_dir() else base.parent)
    else:
        source = f"Hugging Face dataset ({split})"
        dataset = hf.pick_split(path_or_dataset, split, "the Hugging Face dataset")
    if not isinstance(dataset, datasets.Dataset):
        raise TypeError(f"expected a datasets.Dataset, got {type(dataset).__name__}")
    dataset = hf.map_columns(dataset.with_format(None), columns or {}, source, HF_FIELDS)
    columns = set(dataset.column_names)
    missing = [c for c in ("question_id", "image_id", "question") if c not in columns]
    if missing:
        raise VQAFormatError(
            f"{source}: missing column(s) {', '.join(repr(c) for c in missing)} "
            f"(columns: {', '.join(sorted(columns))}; map the dataset's own names with "
            "data.hf_columns, e.g. {question_id: qid})"
        )
    if require_annotations and "answers" not in columns:
        raise VQAFormatError(
            f"{source}: missing column 'answers' (needed for split {split!r}; "
            "pass require_annotations=False for unannotated data)"
        )
    image_column = next((c for c in ("image", "image_path") if c in columns), None)
    if image_column is None:
        raise VQAFormatError(
            f"{source}: missing image column 'image' (or 'image_path'; map another one with "
            f"data.hf_columns) (columns: {', '.join(sorted(columns))})"
        )

    meta_cols = [
        c
        for c in (
            "question_id",
            "image_id",
            "question",
            "answers",
            "answer_type",
            "question_type",
            "multiple_choice_answer",
            "target_objects",
        )
        if c in columns
    ]
    meta = dataset.select_columns(meta_cols).to_dict()
    n = len(dataset)
    issues = Issues()
    q_entries = []
    for i in range(n):
        entry = {k: meta[k][i] for k in ("question_id", "image_id", "question")}
        if "target_objects" in meta:
            entry["target_objects"] = meta["target_objects"][i]
        q_entries.append(entry)
    questions = parse_questions(source, q_entries, issues, where="row {}")
    row_of = {}
    for i, qid in enumerate(meta["question_id"]):  # first occurrence: the row _parse_questions kept
        if is_int(qid) and qid in questions and qid not in row_of:
            row_of[qid] = i
    annotations = None
    if "answers" in columns:
        kept_rows = [row_of[qid] for qid in questions]
        a_keys = [c for c in meta_cols if c not in ("question", "target_objects")]
        a_entries = [{k: meta[k][i] for k in a_keys} for i in kept_rows]
        annotations = parse_annotations(source, a_entries, issues, where="row {}", rows=kept_rows)
        for ann in annotations.values():  # as in VQAv2: the most frequent human answer
            if ann.get("multiple_choice_answer") is None:
                ann["multiple_choice_answer"] = Counter(ann["answers"]).most_common(1)[0][0]
    images = hf.image_refs(dataset, image_column, roots, source, meta["question_id"])
    examples = join_examples(questions, annotations, source, source, lambda e: images[row_of[e["question_id"]]], issues)
    issues.raise_if_any(source)
    return examples


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
