"""The official VQA accuracy (``vqaEval.py`` of GT-Vision-Lab/VQA): per-question scores, the overall and per-type
tables, the majority-answer baseline. The answer processing it applies is :mod:`absvl.data.answer_processing`;
the exact procedure and every quirk reproduced: docs/vqa_metric.md.
"""

from __future__ import annotations

import operator
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ..data.answer_processing import (
    DEFAULT_REVISION,
    VQARevision,
    clean_whitespace,
    get_revision,
    normalize_answer,
    process_answer,
    process_digit_article,
    process_punctuation,
)
from ..errors import InputTypeError
from ..io import preview, read_json

__all__ = [
    "accuracy_by_group",
    "evaluate_vqa",
    "evaluate_vqa_files",
    "format_accuracy_table",
    "majority_answer_baseline",
    "question_accuracy",
]

_ROUND_DIGITS = 2
_SHOW_IDS = 5


def question_accuracy(
    prediction: str,
    answers: Sequence[Mapping[str, Any] | str],
    revision: str | VQARevision = DEFAULT_REVISION,
) -> float:
    """Official accuracy in [0, 1] of ``prediction`` for one question (not ×100, not rounded),
    with the text processing of ``revision``.

    ``answers`` are the question's human answer records (``{"answer", "answer_id", ...}``) or
    plain strings (then each is its own record, told apart by its position, i.e. the usual
    leave-one-out). The exact procedure: docs/vqa_metric.md.
    """
    rev = get_revision(revision)
    if not isinstance(prediction, str):
        raise InputTypeError(f"prediction must be a string, got {type(prediction).__name__}")
    if not answers:
        raise ValueError("a question needs at least one human answer")
    human = clean_whitespace if rev.clean_human_answers else str
    records: list[dict[str, Any]] = []
    for position, item in enumerate(answers):
        if isinstance(item, str):
            records.append({"answer": human(item), "__position__": position})
        elif isinstance(item, Mapping) and isinstance(item.get("answer"), str):
            records.append(dict(item, answer=human(item["answer"])))
        else:
            raise InputTypeError(
                f"answers[{position}] must be a string or an object with a string 'answer', got {item!r}"
            )
    pred = clean_whitespace(prediction)
    differ = len({r["answer"] for r in records}) > 1
    if differ or rev.always_process_prediction:
        pred = process_answer(pred, rev)
    if differ:
        for r in records:
            r["answer"] = process_punctuation(r["answer"], rev)
            if rev.human_digit_article:
                r["answer"] = process_digit_article(r["answer"], rev)
    total: float = 0
    for held_out in records:
        matches = 0
        for other in records:
            # The official code removes every record equal to the held-out one as a whole.
            if other != held_out and other["answer"] == pred:
                matches += 1
        total = total + min(1, float(matches) / 3)
    return float(total) / len(records)


# ----------------------------------------------------------------------------------------
# Input checking
# ----------------------------------------------------------------------------------------
def _preview(ids: Iterable[Any]) -> str:
    return f"[{preview(map(repr, ids), _SHOW_IDS)}]"


def _question_id(value: Any, where: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{where}: 'question_id' must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{where}: 'question_id' must be an integer, got {value!r}") from None


def _entries(obj: Any, key: str, what: str) -> list:
    """The entry list of an official JSON dict (``obj[key]``) or the list itself."""
    if isinstance(obj, Mapping):
        if key not in obj:
            raise ValueError(
                f"{what}: expected a list or an object with a {key!r} list; "
                f"got an object with keys {_preview(obj.keys())}"
            )
        obj = obj[key]
    if isinstance(obj, (str, bytes)) or not isinstance(obj, Sequence):
        raise ValueError(f"{what}: expected a list of {key}, got {type(obj).__name__}")
    return list(obj)


def _check_annotations(annotations: Any) -> dict[int, Mapping[str, Any]]:
    """question_id -> annotation, in file order, every field the evaluator reads checked."""
    by_id: dict[int, Mapping[str, Any]] = {}
    for i, ann in enumerate(_entries(annotations, "annotations", "annotations")):
        if not isinstance(ann, Mapping):
            raise ValueError(f"annotations[{i}] must be an object, got {type(ann).__name__}")
        if "question_id" not in ann:
            raise ValueError(f"annotations[{i}] has no 'question_id'")
        qid = _question_id(ann["question_id"], f"annotations[{i}]")
        where = f"annotation of question_id {qid}"
        if qid in by_id:
            raise ValueError(f"{where}: question_id appears more than once in the annotations")
        for field in ("question_type", "answer_type"):
            if not isinstance(ann.get(field), str):
                raise ValueError(f"{where}: {field!r} is missing or not a string")
        answers = ann.get("answers")
        if not isinstance(answers, Sequence) or isinstance(answers, (str, bytes)) or not answers:
            raise ValueError(f"{where}: 'answers' must be a non-empty list of answer objects")
        for j, a in enumerate(answers):
            if not isinstance(a, Mapping) or not isinstance(a.get("answer"), str):
                raise ValueError(f"{where}: answers[{j}] must be an object with a string 'answer'")
        by_id[qid] = ann
    return by_id


def _check_predictions(predictions: Any) -> dict[int, str]:
    """question_id -> answer from a submission list or a ``{question_id: answer}`` dict."""
    out: dict[int, str] = {}
    if isinstance(predictions, Mapping):
        for key, answer in predictions.items():
            qid = _question_id(key, "predictions")
            if qid in out:
                raise ValueError(f"predictions: duplicate question_id {qid}")
            if not isinstance(answer, str):
                raise ValueError(
                    f"prediction for question_id {qid}: 'answer' must be a string, "
                    f"got {type(answer).__name__}: {answer!r}"
                )
            out[qid] = answer
        return out
    if isinstance(predictions, (str, bytes)) or not isinstance(predictions, Sequence):
        raise ValueError(
            "predictions must be a list of {'question_id': int, 'answer': str} objects "
            f"or a dict question_id -> answer, got {type(predictions).__name__}"
        )
    for i, entry in enumerate(predictions):
        if not isinstance(entry, Mapping):
            raise ValueError(f"predictions[{i}] must be an object, got {type(entry).__name__}")
        if "question_id" not in entry:
            raise ValueError(f"predictions[{i}] has no 'question_id'")
        qid = _question_id(entry["question_id"], f"predictions[{i}]")
        if "answer" not in entry:
            raise ValueError(f"predictions[{i}] (question_id {qid}) has no 'answer'")
        answer = entry["answer"]
        if not isinstance(answer, str):
            raise ValueError(
                f"predictions[{i}] (question_id {qid}): 'answer' must be a string, "
                f"got {type(answer).__name__}: {answer!r}"
            )
        if qid in out:
            raise ValueError(f"predictions[{i}]: duplicate question_id {qid}")
        out[qid] = answer
    return out


def _check_questions(questions: Any, annotated: Iterable[int]) -> None:
    ids = set()
    for i, q in enumerate(_entries(questions, "questions", "questions")):
        if not isinstance(q, Mapping) or "question_id" not in q:
            raise ValueError(f"questions[{i}] must be an object with a 'question_id'")
        ids.add(_question_id(q["question_id"], f"questions[{i}]"))
    unknown = [qid for qid in annotated if qid not in ids]
    if unknown:
        raise ValueError(f"{len(unknown)} annotated question id(s) are not in the questions: {_preview(unknown)}")


# ----------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------
def _percent(total: float, count: int) -> float:
    return round(100 * float(total) / count, _ROUND_DIGITS)


def evaluate_vqa(
    predictions: Sequence[Mapping[str, Any]] | Mapping[int, str],
    questions: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None,
    annotations: Mapping[str, Any] | Sequence[Mapping[str, Any]],
    question_ids: Iterable[int] | None = None,
    *,
    revision: str | VQARevision = DEFAULT_REVISION,
) -> dict[str, Any]:
    """Official VQA accuracy of ``predictions``.

    Args:
        predictions: the submission list ``[{"question_id": int, "answer": str}, ...]`` or a
            dict ``{question_id: answer}``.
        questions: the official questions JSON (``{"questions": [...]}``) or its list, used
            only to check that every annotated question exists; ``None`` skips the check.
        annotations: the official annotations JSON (``{"annotations": [...]}``) or its list.
        question_ids: evaluate only these questions (in this order). By default every
            annotated question is evaluated, in annotation order, and -- as the official
            loader asserts -- the predicted question ids must equal the annotated ones. With
            ``question_ids`` each of them needs a prediction, predictions for other annotated
            questions are ignored, and predictions for unannotated ids are still an error.
        revision: the official evaluator revision whose text processing is used:
            ``"07aecec"`` (:data:`DEFAULT_REVISION`, the specification's) or ``"master"``.

    Returns:
        ``{"overall": float, "perQuestionType": {type: float}, "perAnswerType": {type:
        float}, "perQuestion": {question_id: float}}``: the first three as the official
        ``VQAEval.accuracy``, the last as its ``evalQA``, all from the per-question means
        (never the last leave-one-out value of revision 07aecec); percentages rounded to 2
        decimals, type dicts in first-seen order.

    Raises:
        ValueError: malformed predictions/annotations/questions (naming the entry and its
            question id), duplicate question ids, predictions for unannotated questions,
            missing predictions (count and a few ids), nothing to evaluate, or an unknown
            ``revision``.
    """
    rev = get_revision(revision)
    by_id = _check_annotations(annotations)
    preds = _check_predictions(predictions)
    if questions is not None:
        _check_questions(questions, by_id)

    unknown = [qid for qid in preds if qid not in by_id]
    if unknown:
        raise ValueError(
            f"predictions contain {len(unknown)} question id(s) that are not in the annotations: {_preview(unknown)}"
        )
    if question_ids is None:
        order = list(by_id)
    else:
        order = []
        seen = set()
        for value in question_ids:
            qid = _question_id(value, "question_ids")
            if qid in seen:
                raise ValueError(f"question_ids: duplicate question_id {qid}")
            if qid not in by_id:
                raise ValueError(f"question_ids: question_id {qid} is not in the annotations")
            seen.add(qid)
            order.append(qid)
    missing = [qid for qid in order if qid not in preds]
    if missing:
        raise ValueError(
            f"predictions are missing for {len(missing)} of {len(order)} annotated question(s): {_preview(missing)}"
        )
    if not order:
        raise ValueError("no questions to evaluate (the annotations are empty)")

    total: float = 0
    per_qtype: dict[str, list] = {}
    per_atype: dict[str, list] = {}
    per_question: dict[int, float] = {}
    for qid in order:
        ann = by_id[qid]
        acc = question_accuracy(preds[qid], ann["answers"], rev)
        total = total + acc
        for table, key in ((per_qtype, ann["question_type"]), (per_atype, ann["answer_type"])):
            slot = table.setdefault(key, [0, 0])
            slot[0] = slot[0] + acc
            slot[1] += 1
        per_question[qid] = round(100 * acc, _ROUND_DIGITS)
    return {
        "overall": _percent(total, len(order)),
        "perQuestionType": {k: _percent(s, n) for k, (s, n) in per_qtype.items()},
        "perAnswerType": {k: _percent(s, n) for k, (s, n) in per_atype.items()},
        "perQuestion": per_question,
    }


def accuracy_by_group(result: Mapping[str, Any], group_of: Mapping[int, str]) -> dict[str, float]:
    """Mean accuracy (%) per group of an :func:`evaluate_vqa` result's questions (``perQuestion``), e.g. per
    question family of a world whose question types mix families; questions without a group are left out."""
    sums: dict[str, list] = {}
    for qid, accuracy in result["perQuestion"].items():
        group = group_of.get(qid)
        if group is not None:
            slot = sums.setdefault(group, [0.0, 0])
            slot[0] += accuracy
            slot[1] += 1
    return {group: round(total / n, _ROUND_DIGITS) for group, (total, n) in sums.items()}


def evaluate_vqa_files(
    predictions_path: str | os.PathLike,
    questions_path: str | os.PathLike | None,
    annotations_path: str | os.PathLike,
    *,
    revision: str | VQARevision = DEFAULT_REVISION,
) -> dict[str, Any]:
    """:func:`evaluate_vqa` on official files: a submission JSON array, the questions JSON
    (or ``None``) and the annotations JSON, with the text processing of ``revision``. Errors
    about a file's content name the file."""
    rev = get_revision(revision)
    preds = read_json(predictions_path, what="a VQA predictions file")
    if not isinstance(preds, list):
        got = "an object" if isinstance(preds, dict) else type(preds).__name__
        raise ValueError(
            f"{os.fspath(predictions_path)} (a VQA predictions file): the top-level JSON value must be an "
            f"array, got {got}"
        )
    questions = None if questions_path is None else read_json(questions_path, what="a VQA questions file")
    annotations = read_json(annotations_path, what="a VQA annotations file")
    try:
        return evaluate_vqa(preds, questions, annotations, revision=rev)
    except ValueError as e:
        files = [f"predictions {os.fspath(predictions_path)}"]
        if questions_path is not None:
            files.append(f"questions {os.fspath(questions_path)}")
        files.append(f"annotations {os.fspath(annotations_path)}")
        files = ", ".join(files)
        raise ValueError(f"{e} ({files})") from None


def format_accuracy_table(result: Mapping[str, Any], beside: Mapping[str, Mapping[str, Any]] | None = None) -> str:
    """A plain-text table of an :func:`evaluate_vqa` result: overall, then per answer type, then per
    question type, then per question family where the result has ``perFamily`` (:func:`accuracy_by_group`), each
    sorted by name. ``beside``: more results on the same questions (e.g. baselines),
    one column each under its name, the ``result`` column headed "model"."""
    columns = [result, *(beside or {}).values()]
    rows: list[tuple[str, list[str]]] = []
    n = len(result.get("perQuestion", {}))
    rows.append((f"overall ({n} questions)" if n else "overall", [f"{c['overall']:.2f}" for c in columns]))
    for title, key in (
        ("answer type", "perAnswerType"),
        ("question type", "perQuestionType"),
        ("question family", "perFamily"),
    ):
        table = result.get(key) or {}
        if table:
            rows.append((title, []))
            for name in sorted(table):
                cells = [f"{c[key][name]:.2f}" if name in (c.get(key) or {}) else "-" for c in columns]
                rows.append((f"  {name}", cells))
    width = max(len(label) for label, _ in rows)
    lines = ["VQA accuracy (%)"]
    if beside:
        names = ["model", *beside]
        widths = [max(6, len(name)) for name in names]
        lines.append(f"{'':<{width}}  " + "  ".join(f"{name:>{w}}" for name, w in zip(names, widths)))
    else:
        widths = [6]
    for label, cells in rows:
        lines.append((f"{label:<{width}}  " + "  ".join(f"{c:>{w}}" for c, w in zip(cells, widths))).rstrip())
    return "\n".join(lines)


def majority_answer_baseline(
    train_annotations: Mapping[str, Any] | Sequence[Mapping[str, Any]],
    eval_annotations: Mapping[str, Any] | Sequence[Mapping[str, Any]],
    *,
    revision: str | VQARevision = DEFAULT_REVISION,
) -> dict[str, Any]:
    """Accuracy of always answering the most common normalised training
    ``multiple_choice_answer`` (ties: the alphabetically first answer), normalised and scored
    with ``revision``.

    Returns the :func:`evaluate_vqa` result on ``eval_annotations`` with the constant answer
    added under ``"answer"``.
    """
    rev = get_revision(revision)
    counts: Counter[str] = Counter()
    for i, ann in enumerate(_entries(train_annotations, "annotations", "train annotations")):
        if not isinstance(ann, Mapping) or not isinstance(ann.get("multiple_choice_answer"), str):
            qid = ann.get("question_id") if isinstance(ann, Mapping) else None
            raise ValueError(f"train annotations[{i}] (question_id {qid}) has no string 'multiple_choice_answer'")
        counts[normalize_answer(ann["multiple_choice_answer"], rev)] += 1
    if not counts:
        raise ValueError("train annotations are empty: no majority answer")
    answer = min(counts.items(), key=lambda kv: (-kv[1], kv[0]))[0]
    eval_ids = _check_annotations(eval_annotations)
    result = evaluate_vqa({qid: answer for qid in eval_ids}, None, eval_annotations, revision=rev)
    result["answer"] = answer
    return result
