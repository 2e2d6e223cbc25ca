"""The official VQA evaluator's answer processing (absvl.data.answer_processing), at the revision each
test names: the default "07aecec" (the specification's) or "master"; worked out by hand from
GT-Vision-Lab/VQA, PythonEvaluationTools/vqaEvaluation/vqaEval.py."""

from __future__ import annotations

import pytest

from absvl.data.answer_processing import (
    CONTRACTIONS,
    CONTRACTIONS_07AECEC,
    CONTRACTIONS_MASTER,
    DEFAULT_REVISION,
    PUNCTUATION,
    PUNCTUATION_07AECEC,
    PUNCTUATION_MASTER,
    REVISIONS,
    normalize_answer,
    process_digit_article,
    process_punctuation,
)

MASTER = "master"
BOTH = pytest.mark.parametrize("revision", ["07aecec", "master"])


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("two", "2"),
        ("Ten", "10"),
        ("zero", "0"),
        ("eleven", "eleven"),
        ("none", "0"),  # quirk: "none" is a number word
        ("a dog", "dog"),
        ("the Dog", "dog"),
        ("an apple", "apple"),
        ("dog", "dog"),
        ("the two dogs", "2 dogs"),  # number mapping, then the article is dropped
        ("1,000", "1000"),  # digit-comma-digit: every mark deleted, not spaced
        ("3.5", "3.5"),  # period followed by a digit kept
        ("5.", "5"),
        ("yes.", "yes"),
        ("u.s.a.", "usa"),  # other periods removed
        ("red,blue", "red blue"),  # mark not touching a space -> space
        ("red, blue", "red blue"),  # mark touching a space -> deleted
        ("t-shirt", "t shirt"),  # '-' is in the current punctuation list
        ("yes!", "yes"),
        ("what?", "what"),
        ("{x}", "x"),
        ("10:30", "10:30"),  # ':' is not in the list
        ("don't", "don't"),  # nor is the apostrophe: it survives
        ("dont", "don't"),
        ("whats", "what's"),
        ("wheres", "where's"),
        ("oclock", "o'clock"),
        ("Im", "im"),  # capitalised table key never matches after lower()
        ("somebody'd", "somebodyd"),  # the table maps this one backwards
        ("  Yes\n", "yes"),
        ("black\tand white", "black and white"),
        ("", ""),
        ("a", ""),
        ("the", ""),
    ],
)
def test_normalize_answer_master(raw, expected):
    assert normalize_answer(raw, MASTER) == expected
    assert normalize_answer(raw, revision=MASTER) == expected


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("two", "2"),
        ("Ten", "10"),
        ("none", "0"),
        ("the two dogs", "2 dogs"),
        ("1,000", "1000"),
        ("3.5", "3.5"),
        ("5.", "5"),
        ("yes.", "yes"),
        ("u.s.a.", "usa"),
        ("red,blue", "red blue"),
        ("red, blue", "red blue"),
        ("what?", "what"),
        # The contraction table maps to the typographic apostrophe U+2019 ...
        ("dont", "don\u2019t"),
        ("whats", "what\u2019s"),
        ("oclock", "o\u2019clock"),
        ("Dont", "don\u2019t"),  # lower-cased before the lookup
        # ... except the entries the file spells with a straight one.
        ("cant", "can't"),
        ("wheres", "where's"),
        ("weve", "we've"),
        # The apostrophe is punctuation. "it's": no "' " / " '" and no digit-comma-digit in the
        # input -> replaced by a space -> "it s" (then split/joined: still "it s").
        ("it's", "it s"),
        ("don't", "don t"),
        ("let's", "let s"),
        ("rock 'n' roll", "rock n roll"),  # " '" and "' " occur -> every "'" deleted
        ("it's 1,000", "its 1000"),  # digit-comma-digit: every mark deleted
        # So are keys with a straight apostrophe never reached; typographic ones still match.
        ("couldn'tve", "couldn tve"),
        ("couldnt\u2019ve", "couldn\u2019t\u2019ve"),
        ("somebody\u2019d", "somebodyd"),
        # The colon is punctuation: "10:30" has no ": " -> space; "time: 10" has one -> deleted.
        ("10:30", "10 30"),
        ("time: 10", "time 10"),
        # '-', '!', '{', '}' are not in this list: they survive.
        ("t-shirt", "t-shirt"),
        ("yes!", "yes!"),
        ("{x}", "{x}"),
        ("Im", "im"),  # capitalised table key never matches
        ("  Yes\n", "yes"),
        ("black\tand white", "black and white"),
        ("", ""),
        ("a", ""),
        ("the", ""),
    ],
)
def test_normalize_answer_default_revision(raw, expected):
    assert DEFAULT_REVISION == "07aecec"
    assert normalize_answer(raw) == expected
    assert normalize_answer(raw, "07aecec") == expected


def test_normalize_answer_rejects_non_strings():
    with pytest.raises(TypeError, match="string"):
        normalize_answer(3)


@BOTH
def test_process_punctuation_details(revision):
    # '(' touches a space (" (") -> deleted; ')' touches none -> replaced by a space.
    assert process_punctuation("a (b)", revision) == "a b "
    # The comma-digit test looks at the whole input: '/' is deleted too, not spaced.
    assert process_punctuation("1,000/2", revision) == "10002"
    assert process_punctuation("yes/no", revision) == "yes no"
    # The official call passes re.UNICODE (== 32) as ``count``: only 32 periods go.
    assert process_punctuation("." * 40, revision) == "." * 8
    # The look-"behind" is really a look-ahead for "<=digit": ".5" keeps its period.
    assert process_punctuation(".5", revision) == ".5"
    assert process_punctuation("5.", revision) == "5"


def test_process_punctuation_lists_differ():
    # 07aecec (default): "'" and ":" are marks, "-" and "!" are not; master: the reverse.
    assert process_punctuation("it's 10:30") == "it s 10 30"
    assert process_punctuation("it's 10:30", MASTER) == "it's 10:30"
    assert process_punctuation("t-shirt!") == "t-shirt!"
    assert process_punctuation("t-shirt!", MASTER) == "t shirt "
    # Punctuation processing alone never lower-cases nor maps number words.
    assert process_punctuation("Two.") == "Two"


def test_process_digit_article_and_tables():
    assert process_digit_article("The ONE", MASTER) == "1"
    assert process_digit_article("a  b   c", MASTER) == "b c"
    assert CONTRACTIONS_MASTER["dont"] == "don't"  # straight apostrophes in this revision
    assert REVISIONS[MASTER].contractions is CONTRACTIONS_MASTER
    assert all("\u2019" not in k + v for k, v in CONTRACTIONS_MASTER.items())
    assert len(CONTRACTIONS_MASTER) == 120
    assert "'" not in PUNCTUATION_MASTER and ":" not in PUNCTUATION_MASTER
    assert "." not in PUNCTUATION_MASTER
    assert len(PUNCTUATION_MASTER) == 21
    assert REVISIONS[MASTER].punctuation is PUNCTUATION_MASTER


def test_default_revision_tables():
    assert CONTRACTIONS is CONTRACTIONS_07AECEC and PUNCTUATION is PUNCTUATION_07AECEC
    assert REVISIONS["07aecec"].commit == "07aecec5a25de425d107f092906d6fee49513a43"
    assert process_digit_article("The ONE dont") == "1 don\u2019t"
    assert CONTRACTIONS["dont"] == "don\u2019t"
    assert len(CONTRACTIONS) == 120
    # Same entries, in the same order, as master's once U+2019 is written as "'" ...
    straightened = {k.replace("\u2019", "'"): v.replace("\u2019", "'") for k, v in CONTRACTIONS.items()}
    assert list(straightened.items()) == list(CONTRACTIONS_MASTER.items())
    # ... and these are the only entries with a straight apostrophe.
    assert [(k, v) for k, v in CONTRACTIONS.items() if "'" in k + v] == [
        ("aint", "ain't"),
        ("arent", "aren't"),
        ("cant", "can't"),
        ("couldve", "could've"),
        ("couldnt", "couldn't"),
        ("couldn'tve", "couldn\u2019t\u2019ve"),
        ("hadn'tve", "hadn\u2019t\u2019ve"),
        ("weve", "we've"),
        ("wheres", "where's"),
        ("whove", "who've"),
    ]
    # fmt: off
    assert PUNCTUATION == (";", ":", "/", "'", "[", "]", '"', "(", ")", "=", "+", "\\", "_",
                           ">", "<", "@", "`", ",", "?")
    # fmt: on
    assert not {"{", "}", "-", "!", "."} & set(PUNCTUATION)
