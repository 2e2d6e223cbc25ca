"""VQA examples, and how question and annotation entries (files or dataset rows) become them: each entry
checked, the two joined on ``question_id``; every problem recorded in an ``Issues``, none raised."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..images import DEFAULT_MAX_PIXELS, BadImageError, open_image
from ..io import preview
from .answer_processing import normalize_answer
from .hf import HFImageRef
from .problems import Issues, is_int

__all__ = ["VQAExample", "join_examples", "parse_annotations", "parse_questions"]

MAX_LISTED = 5  # ids / examples shown per kind of problem


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

    @property
    def says_absent(self) -> bool:
        """Whether the answer says that what the question names is not in the image: "how many ...?" →
        0, "is there / are there ...?" → no (the majority answer, normalised). Such a (question, image)
        pair is no positive of the prior loss: the image does not hold what the text's ξ asks for."""
        answer = normalize_answer(self.multiple_choice_answer or "")
        question = self.question.strip().lower()
        return (answer == "0" and question.startswith("how many")) or (
            answer == "no" and question.startswith(("is there", "are there"))
        )

    def open_image(self, max_pixels: int | None = DEFAULT_MAX_PIXELS):
        """The RGB PIL image (``BadImageError`` when missing or unreadable)."""
        if self.image_data is None:
            return open_image(self.image_path, max_pixels=max_pixels)
        data = self.image_data.read() if isinstance(self.image_data, HFImageRef) else self.image_data
        if data is None:
            raise BadImageError(self.image_path, "the dataset holds no image for this row")
        return open_image(data, max_pixels=max_pixels, name=self.image_path)


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
        if is_int(qid):
            issues.rejected.add(qid)
        return None
    ids = []
    for key in ("question_id", "image_id"):
        value = entry[key]
        if not is_int(value):
            if key == "image_id" and is_int(entry["question_id"]):
                issues.rejected.add(entry["question_id"])
            issues.add(
                (source, kind, "int", key),
                f"{source}: {where}, field {key!r}: must be an integer, got {value!r} ({type(value).__name__})",
            )
            return None
        ids.append(value)
    return ids[0], ids[1]


def _entries_with_ids(
    source: str,
    entries: Sequence[Any],
    issues: Issues,
    template: str,
    rows: Sequence[int] | None,
    keys: tuple[str, ...],
    kind: str,
) -> Iterator[tuple[str, int, dict]]:
    """(location, question_id, entry) of every entry whose keys and ids are well formed; the others are recorded."""
    for i, entry in enumerate(entries):
        where = template.format(rows[i] if rows is not None else i)
        ids = _check_entry(source, where, entry, keys, issues, kind)
        if ids is not None:
            yield where, ids[0], entry


def parse_questions(
    source: str,
    entries: Sequence[Any],
    issues: Issues,
    where: str = "questions[{}]",
    rows: Sequence[int] | None = None,
) -> dict[int, dict]:
    """question_id → question entry; malformed entries, empty questions and duplicates recorded."""
    out: dict[int, dict] = {}
    keys = ("question_id", "image_id", "question")
    for at, qid, entry in _entries_with_ids(source, entries, issues, where, rows, keys, "question"):
        text = entry["question"]
        if not isinstance(text, str):
            issues.add(
                (source, "question", "str"),
                f"{source}: {at} (question_id {qid}), field 'question': must be a string, got {type(text).__name__}",
            )
            issues.rejected.add(qid)
            continue
        if not text.strip():
            issues.add(
                (source, "question", "empty"), f"{source}: {at} (question_id {qid}), field 'question': empty question"
            )
            issues.rejected.add(qid)
            continue
        if qid in out:
            issues.add((source, "question", "duplicate"), f"{source}: {at}: duplicate question_id {qid}")
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


def parse_annotations(
    source: str,
    entries: Sequence[Any],
    issues: Issues,
    where: str = "annotations[{}]",
    rows: Sequence[int] | None = None,
) -> dict[int, dict]:
    """question_id → annotation entry with ``answers`` turned into a list of strings."""
    out: dict[int, dict] = {}
    keys = ("question_id", "image_id", "answers")
    for at, qid, entry in _entries_with_ids(source, entries, issues, where, rows, keys, "annotation"):
        answers = _answer_list(entry["answers"])
        if answers is None:
            issues.add(
                (source, "annotation", "answers"),
                f"{source}: {at} (question_id {qid}), field 'answers': must be a non-empty list of "
                f'{{"answer": str, ...}} objects, got {str(entry["answers"])[:80]}',
            )
            issues.rejected.add(qid)
            continue
        bad_str = [
            k
            for k in ("answer_type", "question_type", "multiple_choice_answer")
            if entry.get(k) is not None and not isinstance(entry[k], str)
        ]
        if bad_str:
            issues.add(
                (source, "annotation", "str", bad_str[0]),
                f"{source}: {at} (question_id {qid}), field {bad_str[0]!r}: must be a string",
            )
            issues.rejected.add(qid)
            continue
        if qid in out:
            issues.add((source, "annotation", "duplicate"), f"{source}: {at}: duplicate question_id {qid}")
            continue
        out[qid] = dict(entry, answers=answers)
    return out


def join_examples(
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
            issues.add(
                (qsource, "join", "no_annotation"),
                f"{len(no_annotation):,} question(s) of {qsource} have no annotation in {asource} "
                f"(question_id {preview(no_annotation)})",
            )
        if no_question:
            issues.add(
                (asource, "join", "no_question"),
                f"{len(no_question):,} annotation(s) of {asource} have no question in {qsource} "
                f"(question_id {preview(no_question)})",
            )
        mismatch = [
            (q, e["image_id"], annotations[q]["image_id"])
            for q, e in questions.items()
            if q in annotations and annotations[q]["image_id"] != e["image_id"]
        ]
        if mismatch:
            shown = ", ".join(f"question_id {q}: image_id {a} vs {b}" for q, a, b in mismatch[:MAX_LISTED])
            issues.add(
                (asource, "join", "image_id"),
                f"{len(mismatch):,} question(s) have a different image_id in {qsource} and {asource} ({shown})",
            )
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
