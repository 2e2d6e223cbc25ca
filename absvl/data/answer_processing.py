"""The official VQA evaluator's answer processing (``vqaEval.py`` of GT-Vision-Lab/VQA), in its two revisions.

The answer vocabulary (:mod:`absvl.data.answers`) and the metric (:mod:`absvl.metrics.vqa`) share it, so a class of
the vocabulary is exactly a string the evaluator compares. The revisions differ only in data (:class:`VQARevision`);
every quirk reproduced on purpose (the period regex that is a look-ahead, the capitalised contraction keys, ...)
is listed in docs/vqa_metric.md.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from ..errors import InputTypeError

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
    "clean_whitespace",
    "get_revision",
    "normalize_answer",
    "process_answer",
    "process_digit_article",
    "process_punctuation",
]

# The official tables, laid out as tables (the formatter would give each entry a line).
# fmt: off
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
# fmt: on

ARTICLES: frozenset[str] = frozenset({"a", "an", "the"})


@dataclass(frozen=True)
class VQARevision:
    """What one revision of the official ``vqaEval.py`` does to answers (docs/vqa_metric.md).
    Aggregation is the same for every revision."""

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


REVISIONS: Mapping[str, VQARevision] = MappingProxyType(
    {
        "07aecec": VQARevision(
            name="07aecec",
            commit="07aecec5a25de425d107f092906d6fee49513a43",
            punctuation=PUNCTUATION_07AECEC,
            contractions=CONTRACTIONS_07AECEC,
            clean_human_answers=False,
            always_process_prediction=True,
            human_digit_article=False,
        ),
        "master": VQARevision(
            name="master",
            commit="a013f004",
            punctuation=PUNCTUATION_MASTER,
            contractions=CONTRACTIONS_MASTER,
            clean_human_answers=True,
            always_process_prediction=False,
            human_digit_article=True,
        ),
    }
)

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


def get_revision(revision: str | VQARevision = DEFAULT_REVISION) -> VQARevision:
    """The :class:`VQARevision` named ``revision`` (one of :data:`REVISIONS`)."""
    if isinstance(revision, VQARevision):
        return revision
    try:
        return REVISIONS[revision]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown VQA metric revision {revision!r}; choose one of {', '.join(map(repr, REVISIONS))}"
        ) from None


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


def clean_whitespace(text: str) -> str:
    """Newlines and tabs to spaces, then strip (what the evaluator does first to a prediction)."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def process_answer(text: str, rev: VQARevision) -> str:
    """:func:`process_punctuation` then :func:`process_digit_article`."""
    return process_digit_article(process_punctuation(text, rev), rev)


def normalize_answer(answer: str, revision: str | VQARevision = DEFAULT_REVISION) -> str:
    """What the evaluator of ``revision`` does to a prediction when it processes it:
    newlines/tabs to spaces, strip, :func:`process_punctuation`, then
    :func:`process_digit_article`. The answer vocabulary uses it too.

    ``normalize_answer("Two dogs.") == "2 dogs"``; ``normalize_answer("dont") == "don’t"``
    (typographic, revision 07aecec) but ``"don't"`` with ``revision="master"``.
    """
    if not isinstance(answer, str):
        raise InputTypeError(f"answer must be a string, got {type(answer).__name__}: {answer!r}")
    return process_answer(clean_whitespace(answer), get_revision(revision))
