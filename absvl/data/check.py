"""``absvl data check``: a VQAv2-format dataset (official layout or Hugging Face) or a caption dataset (Karpathy
JSON or Hugging Face) read as training reads it, every problem collected into a ``CheckReport`` instead of stopping
at the first, every referenced image decoded.

Errors mean the dataset cannot be used as is; warnings (answers outside the vocabulary, annotations without 10
answers or with an unknown ``answer_type``, ids shared by train and val, caption rows without an image) that it
can, but worth knowing.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from ..images import DEFAULT_MAX_PIXELS, BadImageError, open_image
from ..io import preview
from . import captions, hf
from .answer_processing import normalize_answer
from .answers import load_answers, soft_targets
from .problems import VQAFormatError
from .vqa import ANSWER_TYPES, VQAv2Layout, canonical_split, load_vqa_hf, read_split
from .vqa_examples import VQAExample

__all__ = ["CheckReport", "check_captions", "check_dataset", "check_vqa", "detect_kind"]

MAX_LISTED = 10  # paths listed per kind of image problem
COLUMNS = ("questions", "annotations", "examples", "images", "checked", "missing", "unreadable", "unanswerable")
CAPTION_COLUMNS = ("images", "captions", "min/image", "max/image", "checked", "missing", "unreadable")
KINDS = ("vqa", "captions")


@dataclass
class CheckReport:
    """Outcome of ``check_vqa`` or ``check_captions``.

    VQA: ``counts[split]`` has ``questions`` and ``annotations`` (entries in the files), ``examples``
    (valid, matched questions), ``images`` (distinct images referenced), ``checked`` (images opened),
    ``missing``/``unreadable`` images and ``unanswerable`` (annotated questions with no answer in
    the vocabulary; only with a vocabulary). Captions: ``images``, ``captions``, the fewest and most
    captions of an image, ``checked``, ``missing``, ``unreadable``. ``ok`` is False when there is any error.
    """

    root: str
    counts: dict[str, dict[str, int | None]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    kind: str = "VQA"  # the title's "<kind> dataset check"
    columns: tuple[str, ...] = COLUMNS

    @property
    def ok(self) -> bool:
        return not self.errors

    def format(self) -> str:
        lines = [f"{self.kind} dataset check: {self.root}"]
        if self.counts:
            header = f"{'split':10s}" + "".join(f"{c:>13s}" for c in self.columns)
            lines += ["", header]
            for split, counts in self.counts.items():
                cells = "".join(
                    f"{'-' if counts.get(c) is None else format(counts[c], ','):>13s}" for c in self.columns
                )
                lines.append(f"{split:10s}{cells}")
        for title, items in (("errors", self.errors), ("warnings", self.warnings), ("notes", self.notes)):
            if items:
                lines += ["", f"{title} ({len(items)}):"]
                lines += [f"  - {item}".replace("\n", "\n    ") for item in items]
        lines += ["", "result: OK" if self.ok else f"result: FAILED ({len(self.errors)} error(s))"]
        return "\n".join(lines)


def _is_hf_path(path: Path) -> bool:
    if path.is_file():
        return path.suffix in (".parquet", ".arrow")
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        return True
    return path.is_dir() and any(p.suffix in (".parquet", ".arrow") for g in ("*", "*/*") for p in path.glob(g))


def _hub_id(path: Path) -> bool:
    """Whether ``path``, not a local file or folder, reads as a Hub dataset id (``name`` or ``org/name``)."""
    return not path.exists() and not path.is_absolute() and re.fullmatch(r"[\w.-]+(/[\w.-]+)?", str(path)) is not None


def _open(opener: Callable[[], Any]) -> str | None:
    try:
        opener()
    except BadImageError as exc:
        return exc.reason
    return None


def _check_images(
    split: str,
    images: Mapping[str, tuple[Callable[[], Any], int]],
    users: str,
    report: CheckReport,
    max_images: int | None,
    progress: bool,
    num_workers: int,
) -> None:
    """Open every image (name → (opener, how many ``users`` — questions, captions — it has)), in order."""
    counts = report.counts[split]
    keys = list(images)
    counts["images"] = len(keys)
    if max_images is not None and len(keys) > max_images:
        report.notes.append(f"{split}: checked the first {max_images:,} of {len(keys):,} images (by image_id)")
        keys = keys[:max_images]
    missing: list[str] = []
    unreadable: list[tuple[str, str]] = []
    if keys:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(keys), desc=f"{split} images", unit="img", disable=not progress, file=sys.stderr)
        with ThreadPoolExecutor(max_workers=max(1, num_workers)) as pool:  # PIL decodes without the GIL
            for key, reason in zip(keys, pool.map(lambda k: _open(images[k][0]), keys)):
                if reason == "file not found":
                    missing.append(key)
                elif reason is not None:
                    unreadable.append((key, reason))
                bar.update(1)
        bar.close()
    counts["checked"], counts["missing"], counts["unreadable"] = len(keys), len(missing), len(unreadable)
    if missing:
        n_q = sum(images[k][1] for k in missing)
        shown = preview(missing, MAX_LISTED, sep="\n")
        report.errors.append(
            f"{split}: {len(missing):,} of {len(keys):,} images are missing ({n_q:,} {users} use them):\n{shown}"
        )
    if unreadable:
        n_q = sum(images[k][1] for k, _ in unreadable)
        shown = preview((f"{k}: {r}" for k, r in unreadable), MAX_LISTED, sep="\n")
        report.errors.append(
            f"{split}: {len(unreadable):,} of {len(keys):,} images cannot be read ({n_q:,} {users} use them):\n{shown}"
        )


def _check_answers(
    split: str, examples: Sequence[VQAExample], report: CheckReport, answer_to_index: dict[str, int] | None
) -> None:
    annotated = [ex for ex in examples if ex.answers is not None]
    if not annotated:
        return
    not_ten = sum(len(ex.answers) != 10 for ex in annotated)
    if not_ten:
        sizes = Counter(len(ex.answers) for ex in annotated if len(ex.answers) != 10)
        report.warnings.append(
            f"{split}: {not_ten:,} annotation(s) do not have 10 answers "
            f"(counts seen: {dict(sorted(sizes.items()))}); the official metric expects 10"
        )
    odd_types = Counter(ex.answer_type for ex in annotated if ex.answer_type not in ANSWER_TYPES)
    if odd_types:
        report.warnings.append(
            f"{split}: {sum(odd_types.values()):,} annotation(s) have an answer_type outside "
            f"{', '.join(ANSWER_TYPES)} (seen: {', '.join(repr(t) for t in odd_types)})"
        )
    if answer_to_index is None:
        return
    unanswerable = [ex.question_id for ex in annotated if not soft_targets(ex.answers, answer_to_index)]
    report.counts[split]["unanswerable"] = len(unanswerable)
    total_answers = sum(len(ex.answers) for ex in annotated)
    outside = sum(normalize_answer(a) not in answer_to_index for ex in annotated for a in ex.answers)
    if outside:
        report.warnings.append(
            f"{split}: {outside:,} of {total_answers:,} human answers ({outside / total_answers:.2%}) are outside the "
            f"{len(answer_to_index):,}-answer vocabulary; {len(unanswerable):,} of {len(annotated):,} questions "
            f"({len(unanswerable) / len(annotated):.2%}) have no answer in it (dropped from training"
            + (
                f"; question_id {', '.join(map(str, unanswerable[:5]))}{', ...' if len(unanswerable) > 5 else ''})"
                if unanswerable
                else ")"
            )
        )


def check_vqa(
    root: str | Path | VQAv2Layout,
    splits: Sequence[str] | str | None = None,
    answers: Sequence[str] | str | Path | None = None,
    max_images: int | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    progress: bool = True,
    num_workers: int | None = None,
    images: str | Path | None = None,
    columns: Mapping[str, str] | None = None,
) -> CheckReport:
    """Validate a VQAv2-format dataset (official layout, or a Hugging Face dataset).

    Args:
        root: dataset root (see ``VQAv2Layout``) or a layout; or a Hugging Face dataset path or Hub id.
        splits: splits to check (list or comma-separated); default: every split whose questions
            file exists (HF: train and val, those present).
        answers: the answer vocabulary (list, or an ``answers.json`` path) to measure answers
            outside it; not checked when None.
        max_images: open at most this many images per split (the first by image_id).
        max_pixels: decompression-bomb limit for ``open_image``.
        progress: tqdm progress bars on stderr.
        num_workers: threads decoding images (default: CPU count, at most 8).
        images: image folder holding ``train2014/``, ``val2014/``, ``test2015/`` when the images are
            not under ``root`` (``data.images``; for a Hugging Face dataset: where relative paths are
            looked up first).
        columns: a Hugging Face dataset's column for each field it names otherwise (``load_vqa_hf``).
    """
    layout = root if isinstance(root, VQAv2Layout) else VQAv2Layout(root, images_dir=images)
    report = CheckReport(root=str(layout.root))
    num_workers = num_workers or min(8, os.cpu_count() or 1)
    if isinstance(splits, str):
        splits = [s for s in splits.split(",") if s.strip()]
    splits = [canonical_split(s) for s in splits] if splits else None

    answer_to_index = None
    if answers is not None:
        if isinstance(answers, (str, Path)):
            try:
                answers = load_answers(answers)
            except (FileNotFoundError, ValueError) as exc:
                report.errors.append(str(exc))
                return report
        answer_to_index = {a: i for i, a in enumerate(answers)}
    else:
        report.notes.append("answers outside the vocabulary not checked: give the answer vocabulary (answers.json)")

    if not layout.root.exists() and not _hub_id(layout.root):
        report.errors.append(f"{layout.root} does not exist")
        return report
    hf = not layout.available_splits() and (_is_hf_path(layout.root) or _hub_id(layout.root))
    if splits is None:
        splits = ["train", "val"] if hf else layout.available_splits()
        if not splits:
            searched = ", ".join(str(p.parent) for p in layout.questions_candidates("train"))
            report.errors.append(
                f"no VQAv2 questions file (v2_OpenEnded_mscoco_<split>_questions.json) in {searched}, "
                "and not a Hugging Face dataset"
            )
            return report

    loaded: dict[str, list[VQAExample]] = {}
    for split in splits:
        counts = report.counts.setdefault(split, {c: None for c in COLUMNS})
        if hf:
            try:
                examples = load_vqa_hf(layout.root, split, columns=columns, images_root=layout.images_dir)
            except (FileNotFoundError, VQAFormatError, ValueError) as exc:
                if "has no split" in str(exc) or "has no files for split" in str(exc):
                    del report.counts[split]
                    report.notes.append(f"{split}: not in the dataset")
                else:
                    report.errors.append(f"{split}: {exc}")
                continue
            counts["questions"] = counts["examples"] = len(examples)
            counts["annotations"] = sum(ex.answers is not None for ex in examples)
        else:
            try:
                result = read_split(layout, split)
            except (FileNotFoundError, VQAFormatError, ValueError) as exc:
                report.errors.append(f"{split}: {exc}")
                continue
            examples = result.examples
            counts["questions"], counts["annotations"] = result.num_questions, result.num_annotations
            counts["examples"] = len(examples)
            report.errors.extend(f"{split}: {m}" for m in result.issues.messages())
        loaded[split] = examples
        _check_answers(split, examples, report, answer_to_index)
        by_image: dict[str, list[VQAExample]] = {}
        for ex in examples:
            by_image.setdefault(ex.image_path, []).append(ex)
        keys = sorted(by_image, key=lambda k: (by_image[k][0].image_id, k))
        opens = {k: (partial(by_image[k][0].open_image, max_pixels), len(by_image[k])) for k in keys}
        _check_images(split, opens, "question(s)", report, max_images, progress, num_workers)

    if "train" in loaded and "val" in loaded:
        shared = {ex.question_id for ex in loaded["train"]} & {ex.question_id for ex in loaded["val"]}
        if shared:
            report.warnings.append(
                f"{len(shared):,} question_id(s) appear in both train and val "
                f"(e.g. {', '.join(map(str, sorted(shared)[:5]))}): ids should be unique"
            )
    return report


class _Kept(logging.Handler):
    """Keeps the messages of the warnings logged while it is attached."""

    def __init__(self, out: list[str]) -> None:
        super().__init__(logging.WARNING)
        self.out = out

    def emit(self, record: logging.LogRecord) -> None:
        self.out.append(record.getMessage())


@contextmanager
def _warnings_into(logger: logging.Logger, out: list[str]) -> Iterator[None]:
    handler = _Kept(out)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


def check_captions(
    source: str | Path,
    splits: Sequence[str] | str | None = None,
    images: str | Path | None = None,
    columns: Mapping[str, str] | None = None,
    max_images: int | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    progress: bool = True,
    num_workers: int | None = None,
) -> CheckReport:
    """Validate a caption dataset as ``captions.load_captions`` reads it: a Karpathy caption file
    (``.json``) or a Hugging Face caption dataset (Hub id, repository folder, parquet/arrow files,
    ``save_to_disk`` folder).

    Args:
        splits: Karpathy splits to check (list or comma-separated; ``validation`` stands for
            ``val``); default: every split present.
        images: the image root (``data.images``): Karpathy ``filepath/filename`` and relative paths
            of a Hugging Face dataset are looked up there first, then in the dataset's folder.
        columns: a Hugging Face dataset's column for each field it names otherwise (``HF_CAPTION_COLUMNS``).
        max_images, max_pixels, progress, num_workers: as for ``check_vqa``.
    """
    report = CheckReport(root=str(source), kind="caption", columns=CAPTION_COLUMNS)
    if not Path(source).expanduser().exists() and not _hub_id(Path(source)):
        report.errors.append(f"{source} does not exist")
        return report
    if isinstance(splits, str):
        splits = splits.split(",")
    wanted = [captions._HF_SPLITS.get(s.strip().lower(), s) for s in splits or () if s.strip()]
    captions._check_splits(wanted)
    try:
        with _warnings_into(captions.logger, report.warnings):
            loaded = captions.load_captions(source, wanted or captions.KARPATHY_SPLITS, images, columns=columns)
    except (OSError, ValueError) as exc:
        report.errors.append(str(exc))
        if "data.hf_columns" in str(exc):
            report.notes.append("absvl data check takes the column mapping as --column FIELD=COLUMN")
        return report
    by_split: dict[str, list[captions.CaptionedImage]] = {}
    for im in loaded:
        by_split.setdefault(im.split, []).append(im)
    num_workers = num_workers or min(8, os.cpu_count() or 1)
    for split in wanted or captions.KARPATHY_SPLITS:
        if split not in by_split:
            if wanted:
                report.notes.append(f"{split}: not in the dataset")
            continue
        per_image = [len(im.captions) for im in by_split[split]]
        counts = report.counts[split] = dict.fromkeys(CAPTION_COLUMNS)
        counts.update({"captions": sum(per_image), "min/image": min(per_image), "max/image": max(per_image)})
        opens = {
            f"{im.path} (image_id {im.image_id})": (partial(open_image, im.path, max_pixels), len(im.captions))
            for im in sorted(by_split[split], key=lambda im: im.image_id)
        }
        _check_images(split, opens, "caption(s)", report, max_images, progress, num_workers)
    return report


def detect_kind(path: str | Path) -> str:
    """``"captions"`` or ``"vqa"``: a ``.json`` file is a Karpathy caption file; a folder holding
    VQAv2 questions files, or any other local path that is not a Hugging Face dataset, is VQA; a
    Hugging Face dataset (local or a Hub id, loaded as the loaders load it) is captions when it has a
    caption column (``HF_CAPTION_COLUMNS``) and no ``question`` column. Raises ``OSError`` or
    ``ValueError`` when the dataset cannot be loaded."""
    path = Path(path).expanduser()
    if path.suffix.lower() == ".json":
        return "captions"
    if path.is_dir() and VQAv2Layout(path).available_splits():
        return "vqa"
    if not _hub_id(path) and not _is_hf_path(path) and not (path / "README.md").is_file():
        return "vqa"
    loaded = hf.dataset_at(path, None)
    names = next(iter(loaded.values() if isinstance(loaded, Mapping) else [loaded])).column_names
    found = "question" not in names and any(c in names for c in captions.HF_CAPTION_COLUMNS["captions"])
    return "captions" if found else "vqa"


def check_dataset(
    path: str | Path,
    kind: str | None = None,
    splits: Sequence[str] | str | None = None,
    answers: Sequence[str] | str | Path | None = None,
    images: str | Path | None = None,
    columns: Mapping[str, str] | None = None,
    **options: Any,
) -> CheckReport:
    """``check_vqa`` or ``check_captions`` of ``path`` (``kind``; default: ``detect_kind``). A dataset that
    cannot be loaded to tell its kind is the report's one error; ``options`` go to the check."""
    if kind is None:
        try:
            kind = detect_kind(path)
        except (OSError, ValueError) as exc:
            return CheckReport(root=str(path), kind="Hugging Face", errors=[str(exc)])
    if kind not in KINDS:
        raise ValueError(f"unknown dataset kind {kind!r}: use one of {', '.join(KINDS)}")
    if kind == "vqa":
        return check_vqa(path, splits, answers, images=images, columns=columns, **options)
    report = check_captions(path, splits, images, columns, **options)
    if answers is not None:
        report.notes.append("an answer vocabulary applies to VQA datasets: not used for captions")
    return report
