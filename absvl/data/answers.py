"""VQA answers: the answer vocabulary and soft training targets, both over the official evaluator's normalisation
(:func:`absvl.data.answer_processing.normalize_answer`), so a class is exactly a string the evaluator compares."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ..io import read_json, write_json
from .answer_processing import normalize_answer

__all__ = [
    "build_answer_vocab",
    "load_answers",
    "save_answers",
    "soft_score",
    "soft_targets",
]


def build_answer_vocab(annotations: Iterable[Mapping[str, Any]], min_count: int = 9) -> list[str]:
    """Answer vocabulary: normalised ``multiple_choice_answer`` kept when seen ``min_count``
    times or more (METER/ViLT recipe: train+val annotations, ``min_count=9`` -> 3,129 answers
    on VQAv2).

    ``annotations`` are annotation entries (several files' lists may be chained); an official
    annotations dict (``{"annotations": [...]}``) is accepted too. The order is deterministic:
    count descending, then the answer string ascending. Every normalised string counts, the
    empty one included (e.g. a ``multiple_choice_answer`` of ``"a"``), as in the recipe.
    """
    if min_count < 1:
        raise ValueError(f"min_count must be >= 1, got {min_count}")
    if isinstance(annotations, Mapping):
        if "annotations" not in annotations:
            raise ValueError("annotations: expected annotation entries or an object with an 'annotations' list")
        annotations = annotations["annotations"]
    counts: Counter[str] = Counter()
    for i, ann in enumerate(annotations):
        answer = ann.get("multiple_choice_answer") if isinstance(ann, Mapping) else None
        if not isinstance(answer, str):
            qid = ann.get("question_id") if isinstance(ann, Mapping) else None
            raise ValueError(f"annotation {i} (question_id {qid}): 'multiple_choice_answer' is missing or not a string")
        counts[normalize_answer(answer)] += 1
    kept = [(answer, n) for answer, n in counts.items() if n >= min_count]
    kept.sort(key=lambda item: (-item[1], item[0]))
    return [answer for answer, _ in kept]


def soft_score(n: int) -> float:
    """Soft target of an answer given by ``n`` of the 10 humans: 0, 0.3, 0.6, 0.9, 1.0 for
    n = 0, 1, 2, 3, >= 4 (the METER/ViLT values).

    They equal the official metric for a prediction matching n of 10 answers with distinct
    ``answer_id`` -- the mean over the 10 leave-one-out subsets of min(1, matches/3), where
    the n subsets that leave a match out see n - 1 matches and the 10 - n others see n:

    * n = 1: (1·0 + 9·1/3) / 10 = 0.3
    * n = 2: (2·1/3 + 8·2/3) / 10 = 0.6
    * n = 3: (3·2/3 + 7·1) / 10 = 0.9
    * n >= 4: every subset sees >= 3 matches -> 1.0

    (Plain min(1, n/3) would give 0.33, 0.67, 1.0 instead.)
    """
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"n must be an int, got {type(n).__name__}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return (0.0, 0.3, 0.6, 0.9)[n] if n < 4 else 1.0


def soft_targets(answers: Sequence[str | Mapping[str, Any]], answer_to_index: Mapping[str, int]) -> dict[int, float]:
    """Soft targets ``{answer index: score}`` from a question's human answers.

    ``answers`` are the (usually 10) human answers, as strings or as official answer objects
    (``{"answer": ...}``). Each is normalised with :func:`normalize_answer`; an in-vocabulary
    answer given n times scores :func:`soft_score` (n). Out-of-vocabulary answers are left out;
    the result is empty when none is in the vocabulary (the training loader drops those
    questions).
    """
    counts: Counter[str] = Counter()
    for i, item in enumerate(answers):
        text = item.get("answer") if isinstance(item, Mapping) else item
        if not isinstance(text, str):
            raise ValueError(f"answers[{i}] must be a string or an object with a string 'answer', got {item!r}")
        counts[normalize_answer(text)] += 1
    return {answer_to_index[a]: soft_score(n) for a, n in counts.items() if a in answer_to_index}


def save_answers(path: str | os.PathLike, answers: Sequence[str]) -> None:
    """Write the vocabulary as a JSON array of strings (index = position)."""
    answers = list(answers)
    _check_answers(answers, f"answers to save to {os.fspath(path)}")
    write_json(path, answers, indent=0)


def load_answers(path: str | os.PathLike) -> list[str]:
    """Read a vocabulary written by :func:`save_answers`.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not JSON, not an array, a non-string entry or a duplicate (naming the file).
    """
    path = os.fspath(path)
    data = read_json(path, what="an answer vocabulary")
    if not isinstance(data, list):
        raise ValueError(f"answer vocabulary file {path} must hold a JSON array of strings, got {type(data).__name__}")
    _check_answers(data, f"answer vocabulary file {path}")
    return data


def _check_answers(answers: list, where: str) -> None:
    seen: set[str] = set()
    for i, a in enumerate(answers):
        if not isinstance(a, str):
            raise ValueError(f"{where}: entry {i} is not a string: {a!r}")
        if a in seen:
            raise ValueError(f"{where}: duplicate answer {a!r} at entry {i}")
        seen.add(a)
