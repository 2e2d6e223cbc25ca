"""The official VQA accuracy, reimplemented to give the official numbers exactly.

Reference: ``PythonEvaluationTools/vqaEvaluation/vqaEval.py`` of the GT-Vision-Lab/VQA
repository. Two revisions of that file are implemented, selected by the ``revision`` keyword
of every public function (and ``absvl eval vqa --metric-revision``):

* ``"07aecec"`` (the default, :data:`DEFAULT_REVISION`): the file at commit
  ``07aecec5a25de425d107f092906d6fee49513a43``, the revision the product specification
  (SPEC.md section 6, "Official VQA accuracy") designates;
* ``"master"``: the current revision (commit a013f004, the one maintained ports such as
  lmms-eval align with).

Everything the official evaluator does to an answer lives in this module, once; the
differences between the revisions are data (:class:`VQARevision`: two punctuation lists, two
contraction tables and three switches). :mod:`absvl.data.answers` imports
:func:`normalize_answer` from here.

For each question the evaluator

1. replaces ``\\n`` and ``\\t`` by spaces in the prediction and strips it; *master* does the
   same to each human (ground-truth) answer, *07aecec* leaves the human answers untouched;
2. processes the prediction with :func:`process_punctuation` then
   :func:`process_digit_article` -- *07aecec* always, *master* only when the human answers
   are not all identical;
3. only when the human answers are **not all identical** (as strings, after step 1), processes
   every human answer: *07aecec* with :func:`process_punctuation` **only** (no lower-casing,
   no number words, no articles, no contractions), *master* with both functions. When all
   humans gave the same string nothing is done to them;
4. for each human answer ``h``: ``acc_h = min(1, #{other human answers equal to the
   prediction} / 3)``, "other" meaning every answer *entry* that is not equal to ``h`` as a
   whole record (answer text after processing, ``answer_id``, ``answer_confidence``, ...).
   With the distinct ``answer_id`` of real VQA files this is leave-one-out; entries that are
   exact duplicates (no ``answer_id``) leave each other out too, as in the official code;
5. scores the question with the mean of the ``acc_h``.

The overall number and the per-question-type / per-answer-type numbers are
``round(100 * sum / count, 2)`` over the per-question means, for both revisions; the
per-question numbers are ``round(100 * mean, 2)``. (Revision 07aecec put the *last* ``acc_h``
instead of the mean in its per-type and per-question tables -- a bug fixed later that the
specification says not to reproduce; its overall number already used the mean.) Sums are plain
left-to-right float sums in annotation order, as in the official code under Python <= 3.11
(Python 3.12's ``sum`` compensates rounding, which could move a last digit), and ``round`` is
Python 3's (an exact half, only possible on tiny sets, rounds to even where Python 2 rounded
away from zero).

Text-processing quirks shared by both revisions:

* each punctuation mark is deleted when it touches a space anywhere in the input (or when the
  input holds a digit-comma-digit such as ``1,000``, then *every* mark is deleted), otherwise
  it is replaced by a space (``"1,000"`` -> ``"1000"``);
* the period regex ``(?!<=\\d)(\\.)(?!\\d)`` is meant as a look-behind but is a look-ahead
  for the text ``<=digit``, so it removes every period not followed by a digit (``"3.5"``
  kept, ``"5."`` -> ``"5"``, ``"u.s.a."`` -> ``"usa"``); the comma regex is
  ``(\\d)(\\,)(\\d)``;
* ``re.UNICODE`` is passed positionally to ``Pattern.sub``, i.e. as ``count``: at most 32
  periods are removed;
* number words ``none`` and ``zero`` .. ``ten`` become digits (``"none"`` -> ``"0"``);
  articles ``a``/``an``/``the`` are dropped after that mapping;
* the contraction table holds capitalised keys (``"Im"``, ``"Ive"``, ``"Id've"``, ...) that
  can never match after lower-casing, and maps ``"somebody'd"`` to ``"somebodyd"``.

Quirks of revision 07aecec (the default):

* the punctuation list is ``; : / ' [ ] " ( ) = + \\ _ > < @ ` , ?``: the apostrophe and the
  colon are in it, ``{ } - !`` are not (``"it's"`` -> ``"it s"``, ``"10:30"`` -> ``"10 30"``,
  ``"t-shirt"`` and ``"yes!"`` unchanged);
* the contraction values use the typographic apostrophe ``’`` (``"dont"`` -> ``"don’t"``),
  except a few straight ones (``"ain't"``, ``"aren't"``, ``"can't"``, ``"could've"``,
  ``"couldn't"``, ``"we've"``, ``"where's"``, ``"who've"``); most keys that contain an
  apostrophe use ``’`` too, so -- the straight apostrophe being punctuation -- only those can
  still match;
* the prediction is always processed but the human answers never get
  :func:`process_digit_article`: ``"Yes."`` scores 100 against ten ``"yes"``, while against
  nine ``"Yes."`` and one ``"no"`` even ``"yes"`` scores 0 (the humans' ``"Yes"`` keeps its
  capital, the prediction is lower-cased); the prediction ``"two"`` (-> ``"2"``) matches the
  humans' ``"2"`` but not their ``"two"``, and no prediction can match ten identical answers
  that processing would change (``"two"``, ``"Yes"``, ``"yes."``, ``"the cat"``);
* the human answers are not stripped: ``"yes "`` and ``"yes"`` are different answers;
* text is compared as Unicode (Python 3); the original ran under Python 2, where the
  typographic contraction values were UTF-8 byte strings.

Quirks of revision master:

* the punctuation list is ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !``: no apostrophe, no
  colon, but ``-``, ``!``, ``{`` and ``}`` (``"t-shirt"`` -> ``"t shirt"``, ``"don't"`` and
  ``"10:30"`` unchanged);
* the contraction table maps to straight-apostrophe forms (``"dont"`` -> ``"don't"``);
* when all humans gave the same (stripped) string nothing else is done, to them or to the
  prediction: the prediction must then equal that string exactly (``"yes"`` does not match
  ten ``"Yes"``, nor does ``"yes."`` match ten ``"yes"``).
"""
from __future__ import annotations

import json
import operator
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

__all__ = [
    "ARTICLES",
    "CONTRACTIONS",
    "CONTRACTIONS_07AECEC",
    "CONTRACTIONS_MASTER",
    "DEFAULT_REVISION",
    "NUMBER_WORDS",
    "PUNCTUATION",
    "PUNCTUATION_07AECEC",
    "PUNCTUATION_MASTER",
    "REVISIONS",
    "VQARevision",
    "evaluate_vqa",
    "evaluate_vqa_files",
    "format_accuracy_table",
    "get_revision",
    "load_json",
    "majority_answer_baseline",
    "normalize_answer",
    "process_digit_article",
    "process_punctuation",
    "question_accuracy",
]

# The contraction table of revision 07aecec, entry for entry and in its order: mostly
# typographic apostrophes (U+2019), a few straight ones, exactly as in that file.
CONTRACTIONS_07AECEC: Mapping[str, str] = MappingProxyType({
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn’t’ve", "couldnt’ve": "couldn’t’ve",
    "didnt": "didn’t", "doesnt": "doesn’t", "dont": "don’t", "hadnt": "hadn’t",
    "hadnt’ve": "hadn’t’ve", "hadn'tve": "hadn’t’ve", "hasnt": "hasn’t", "havent": "haven’t",
    "hed": "he’d", "hed’ve": "he’d’ve", "he’dve": "he’d’ve", "hes": "he’s", "howd": "how’d",
    "howll": "how’ll", "hows": "how’s", "Id’ve": "I’d’ve", "I’dve": "I’d’ve", "Im": "I’m",
    "Ive": "I’ve", "isnt": "isn’t", "itd": "it’d", "itd’ve": "it’d’ve", "it’dve": "it’d’ve",
    "itll": "it’ll", "let’s": "let’s", "maam": "ma’am", "mightnt": "mightn’t",
    "mightnt’ve": "mightn’t’ve", "mightn’tve": "mightn’t’ve", "mightve": "might’ve",
    "mustnt": "mustn’t", "mustve": "must’ve", "neednt": "needn’t", "notve": "not’ve",
    "oclock": "o’clock", "oughtnt": "oughtn’t", "ow’s’at": "’ow’s’at", "’ows’at": "’ow’s’at",
    "’ow’sat": "’ow’s’at", "shant": "shan’t", "shed’ve": "she’d’ve", "she’dve": "she’d’ve",
    "she’s": "she’s", "shouldve": "should’ve", "shouldnt": "shouldn’t",
    "shouldnt’ve": "shouldn’t’ve", "shouldn’tve": "shouldn’t’ve", "somebody’d": "somebodyd",
    "somebodyd’ve": "somebody’d’ve", "somebody’dve": "somebody’d’ve",
    "somebodyll": "somebody’ll", "somebodys": "somebody’s", "someoned": "someone’d",
    "someoned’ve": "someone’d’ve", "someone’dve": "someone’d’ve", "someonell": "someone’ll",
    "someones": "someone’s", "somethingd": "something’d", "somethingd’ve": "something’d’ve",
    "something’dve": "something’d’ve", "somethingll": "something’ll", "thats": "that’s",
    "thered": "there’d", "thered’ve": "there’d’ve", "there’dve": "there’d’ve",
    "therere": "there’re", "theres": "there’s", "theyd": "they’d", "theyd’ve": "they’d’ve",
    "they’dve": "they’d’ve", "theyll": "they’ll", "theyre": "they’re", "theyve": "they’ve",
    "twas": "’twas", "wasnt": "wasn’t", "wed’ve": "we’d’ve", "we’dve": "we’d’ve",
    "weve": "we've", "werent": "weren’t", "whatll": "what’ll", "whatre": "what’re",
    "whats": "what’s", "whatve": "what’ve", "whens": "when’s", "whered": "where’d",
    "wheres": "where's", "whereve": "where’ve", "whod": "who’d", "whod’ve": "who’d’ve",
    "who’dve": "who’d’ve", "wholl": "who’ll", "whos": "who’s", "whove": "who've",
    "whyll": "why’ll", "whyre": "why’re", "whys": "why’s", "wont": "won’t",
    "wouldve": "would’ve", "wouldnt": "wouldn’t", "wouldnt’ve": "wouldn’t’ve",
    "wouldn’tve": "wouldn’t’ve", "yall": "y’all", "yall’ll": "y’all’ll", "y’allll": "y’all’ll",
    "yall’d’ve": "y’all’d’ve", "y’alld’ve": "y’all’d’ve", "y’all’dve": "y’all’d’ve",
    "youd": "you’d", "youd’ve": "you’d’ve", "you’dve": "you’d’ve", "youll": "you’ll",
    "youre": "you’re", "youve": "you’ve",
})

# The contraction table of the current (master) revision, entry for entry (straight apostrophes).
CONTRACTIONS_MASTER: Mapping[str, str] = MappingProxyType({
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
})

# The official punctuation lists, in the official order (order matters: replacements chain).
PUNCTUATION_07AECEC: tuple[str, ...] = (
    ";", ":", "/", "'", "[", "]", '"', "(", ")", "=", "+", "\\", "_",
    ">", "<", "@", "`", ",", "?",
)
PUNCTUATION_MASTER: tuple[str, ...] = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-",
    ">", "<", "@", "`", ",", "?", "!",
)

# Number words the official code turns into digits ("none" included); same in both revisions.
NUMBER_WORDS: Mapping[str, str] = MappingProxyType({
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
})

ARTICLES: frozenset[str] = frozenset({"a", "an", "the"})


@dataclass(frozen=True)
class VQARevision:
    """What one revision of the official ``vqaEval.py`` does to answers (see the module
    docstring). Aggregation is the same for every revision."""

    name: str
    commit: str
    punctuation: tuple[str, ...]
    contractions: Mapping[str, str]
    # Newlines/tabs -> spaces and strip on the human answers too (not only the prediction).
    clean_human_answers: bool
    # Process the prediction always (else only when the human answers are not all identical).
    always_process_prediction: bool
    # Human answers of a question whose answers differ get process_digit_article after
    # process_punctuation (else process_punctuation only).
    human_digit_article: bool


REVISIONS: Mapping[str, VQARevision] = MappingProxyType({
    "07aecec": VQARevision(
        name="07aecec", commit="07aecec5a25de425d107f092906d6fee49513a43",
        punctuation=PUNCTUATION_07AECEC, contractions=CONTRACTIONS_07AECEC,
        clean_human_answers=False, always_process_prediction=True, human_digit_article=False,
    ),
    "master": VQARevision(
        name="master", commit="a013f004",
        punctuation=PUNCTUATION_MASTER, contractions=CONTRACTIONS_MASTER,
        clean_human_answers=True, always_process_prediction=False, human_digit_article=True,
    ),
})

# The revision the product specification designates (SPEC.md section 6).
DEFAULT_REVISION = "07aecec"

# The default revision's tables.
CONTRACTIONS: Mapping[str, str] = REVISIONS[DEFAULT_REVISION].contractions
PUNCTUATION: tuple[str, ...] = REVISIONS[DEFAULT_REVISION].punctuation

# The official period pattern, typo included: ``(?!<=\d)`` is a look-ahead, not a look-behind.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
# The official code calls ``periodStrip.sub("", text, re.UNICODE)``: the flag lands in
# ``count``, so at most int(re.UNICODE) == 32 periods are removed.
_PERIOD_SUB_COUNT = int(re.UNICODE)

_ROUND_DIGITS = 2
_JSON_NAMES = {dict: "an object", list: "an array", str: "a string", int: "a number",
               float: "a number", bool: "a boolean", type(None): "null"}
_SHOW_IDS = 5


def get_revision(revision: str | VQARevision = DEFAULT_REVISION) -> VQARevision:
    """The :class:`VQARevision` named ``revision`` (one of :data:`REVISIONS`)."""
    if isinstance(revision, VQARevision):
        return revision
    try:
        return REVISIONS[revision]
    except (KeyError, TypeError):
        raise ValueError(f"unknown VQA metric revision {revision!r}; choose one of "
                         f"{', '.join(map(repr, REVISIONS))}") from None


# ----------------------------------------------------------------------------------------
# Text processing
# ----------------------------------------------------------------------------------------
def process_punctuation(text: str, revision: str | VQARevision = DEFAULT_REVISION) -> str:
    """The official ``processPunctuation`` with the punctuation list of ``revision``.

    Each mark is deleted when the *input* has it next to a space, or when the input contains a
    digit-comma-digit anywhere; otherwise it becomes a space. Then every period not followed by
    a digit is removed (at most 32 of them, as in the official call).
    """
    punctuation = get_revision(revision).punctuation
    delete_all = _COMMA_STRIP.search(text) is not None
    out = text
    for mark in punctuation:
        if delete_all or (mark + " ") in text or (" " + mark) in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_SUB_COUNT)


def process_digit_article(text: str, revision: str | VQARevision = DEFAULT_REVISION) -> str:
    """The official ``processDigitArticle``: lower-case, split on whitespace, number words to
    digits, drop articles, then apply the contraction table of ``revision`` word by word;
    join with spaces."""
    contractions = get_revision(revision).contractions
    words = []
    for word in text.lower().split():
        word = NUMBER_WORDS.get(word, word)
        if word not in ARTICLES:
            words.append(word)
    return " ".join(contractions.get(word, word) for word in words)


def _clean_whitespace(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def _process(text: str, rev: VQARevision) -> str:
    return process_digit_article(process_punctuation(text, rev), rev)


def normalize_answer(answer: str, revision: str | VQARevision = DEFAULT_REVISION) -> str:
    """What the evaluator of ``revision`` does to a prediction when it processes it:
    newlines/tabs to spaces, strip, :func:`process_punctuation`, then
    :func:`process_digit_article`. The answer vocabulary uses it too.

    ``normalize_answer("Two dogs.") == "2 dogs"``; ``normalize_answer("dont") == "don’t"``
    (typographic, revision 07aecec) but ``"don't"`` with ``revision="master"``.
    """
    if not isinstance(answer, str):
        raise TypeError(f"answer must be a string, got {type(answer).__name__}: {answer!r}")
    return _process(_clean_whitespace(answer), get_revision(revision))


def question_accuracy(
    prediction: str,
    answers: Sequence[Mapping[str, Any] | str],
    revision: str | VQARevision = DEFAULT_REVISION,
) -> float:
    """Official accuracy in [0, 1] of ``prediction`` for one question (not ×100, not rounded),
    with the text processing of ``revision``.

    ``answers`` are the question's human answer records (``{"answer", "answer_id", ...}``) or
    plain strings (then each is its own record, told apart by its position, i.e. the usual
    leave-one-out). See the module docstring for the exact procedure.
    """
    rev = get_revision(revision)
    if not isinstance(prediction, str):
        raise TypeError(f"prediction must be a string, got {type(prediction).__name__}")
    if not answers:
        raise ValueError("a question needs at least one human answer")
    human = _clean_whitespace if rev.clean_human_answers else str
    records: list[dict[str, Any]] = []
    for position, item in enumerate(answers):
        if isinstance(item, str):
            records.append({"answer": human(item), "__position__": position})
        elif isinstance(item, Mapping) and isinstance(item.get("answer"), str):
            records.append(dict(item, answer=human(item["answer"])))
        else:
            raise TypeError(f"answers[{position}] must be a string or an object with a string "
                            f"'answer', got {item!r}")
    pred = _clean_whitespace(prediction)
    differ = len({r["answer"] for r in records}) > 1
    if differ or rev.always_process_prediction:
        pred = _process(pred, rev)
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
    ids = list(ids)
    shown = ", ".join(repr(i) for i in ids[:_SHOW_IDS])
    more = f", ... ({len(ids)} in all)" if len(ids) > _SHOW_IDS else ""
    return f"[{shown}{more}]"


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
            raise ValueError(f"{what}: expected a list or an object with a {key!r} list; "
                             f"got an object with keys {_preview(obj.keys())}")
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
                raise ValueError(f"prediction for question_id {qid}: 'answer' must be a string, "
                                 f"got {type(answer).__name__}: {answer!r}")
            out[qid] = answer
        return out
    if isinstance(predictions, (str, bytes)) or not isinstance(predictions, Sequence):
        raise ValueError("predictions must be a list of {'question_id': int, 'answer': str} objects "
                         f"or a dict question_id -> answer, got {type(predictions).__name__}")
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
            raise ValueError(f"predictions[{i}] (question_id {qid}): 'answer' must be a string, "
                             f"got {type(answer).__name__}: {answer!r}")
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
        raise ValueError(f"{len(unknown)} annotated question id(s) are not in the questions: "
                         f"{_preview(unknown)}")


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
        raise ValueError(f"predictions contain {len(unknown)} question id(s) that are not in the "
                         f"annotations: {_preview(unknown)}")
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
        raise ValueError(f"predictions are missing for {len(missing)} of {len(order)} annotated "
                         f"question(s): {_preview(missing)}")
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


def load_json(
    path: str | os.PathLike,
    what: str = "JSON file",
    expected: type | tuple[type, ...] = (dict, list),
) -> Any:
    """Read a JSON file; errors name ``what`` and the file.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not valid JSON (with line/column) or its top-level value is not
            of the ``expected`` type(s).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} file {path} is not valid JSON: {e.msg} "
                         f"(line {e.lineno}, column {e.colno})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} file {path} is not UTF-8 text: {e}") from None
    if not isinstance(data, expected):
        kinds = expected if isinstance(expected, tuple) else (expected,)
        names = " or ".join(_JSON_NAMES.get(t, t.__name__) for t in kinds)
        got = _JSON_NAMES.get(type(data), type(data).__name__)
        raise ValueError(f"{what} file {path}: the top-level JSON value must be {names}, got {got}")
    return data


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
    preds = load_json(predictions_path, "predictions", list)
    questions = None if questions_path is None else load_json(questions_path, "questions")
    annotations = load_json(annotations_path, "annotations")
    try:
        return evaluate_vqa(preds, questions, annotations, revision=rev)
    except ValueError as e:
        files = [f"predictions {os.fspath(predictions_path)}"]
        if questions_path is not None:
            files.append(f"questions {os.fspath(questions_path)}")
        files.append(f"annotations {os.fspath(annotations_path)}")
        files = ", ".join(files)
        raise ValueError(f"{e} ({files})") from None


def format_accuracy_table(result: Mapping[str, Any]) -> str:
    """A plain-text table of an :func:`evaluate_vqa` result: overall, then per answer type,
    then per question type (each sorted by name)."""
    rows: list[tuple[str, str]] = []
    n = len(result.get("perQuestion", {}))
    rows.append((f"overall ({n} questions)" if n else "overall", f"{result['overall']:.2f}"))
    for title, key in (("answer type", "perAnswerType"), ("question type", "perQuestionType")):
        table = result.get(key) or {}
        if table:
            rows.append((title, ""))
            rows.extend((f"  {name}", f"{table[name]:.2f}") for name in sorted(table))
    width = max(len(label) for label, _ in rows)
    lines = ["VQA accuracy (%)"]
    lines += [f"{label:<{width}}  {value:>6}".rstrip() for label, value in rows]
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
            raise ValueError(f"train annotations[{i}] (question_id {qid}) has no string "
                             "'multiple_choice_answer'")
        counts[normalize_answer(ann["multiple_choice_answer"], rev)] += 1
    if not counts:
        raise ValueError("train annotations are empty: no majority answer")
    answer = min(counts.items(), key=lambda kv: (-kv[1], kv[0]))[0]
    eval_ids = _check_annotations(eval_annotations)
    result = evaluate_vqa({qid: answer for qid in eval_ids}, None, eval_annotations, revision=rev)
    result["answer"] = answer
    return result
