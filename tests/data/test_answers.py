"""Answer normalisation, vocabulary, soft targets and vocabulary files."""

from __future__ import annotations

import json

import pytest

from absvl.data import answer_processing
from absvl.data import answers as answers_module
from absvl.data.answer_processing import normalize_answer
from absvl.data.answers import (
    build_answer_vocab,
    load_answers,
    save_answers,
    soft_score,
    soft_targets,
)
from absvl.metrics import vqa as vqa_metric


def test_one_normalisation_shared_with_the_metric():
    assert answers_module.normalize_answer is vqa_metric.normalize_answer is answer_processing.normalize_answer
    assert normalize_answer("Two dogs.") == "2 dogs"


def test_normalisation_is_the_default_metric_revision():
    # The vocabulary uses the prediction processing of answer_processing.DEFAULT_REVISION ("07aecec"):
    # typographic contractions, the apostrophe and the colon are punctuation.
    assert answer_processing.DEFAULT_REVISION == "07aecec"
    assert normalize_answer("dont") == "don\u2019t"
    assert normalize_answer("it's") == "it s"
    assert normalize_answer("10:30") == "10 30"
    assert normalize_answer("dont", revision="master") == "don't"
    assert normalize_answer("it's", "master") == "it's"
    vocab_annotations = [ann(i, "dont") for i in range(3)]
    assert build_answer_vocab(vocab_annotations, min_count=3) == ["don\u2019t"]


def ann(qid, mc):
    return {"question_id": qid, "multiple_choice_answer": mc}


MC = ["Yes", "yes", "yes.", " YES", "no", "no", "no", "No", "two", "2", "2", "2", "red"]


def test_vocab_order_and_min_count():
    annotations = [ann(i, a) for i, a in enumerate(MC)]
    # normalised counts: yes 4, no 4, 2 4 ("two" -> "2"), red 1
    # ties on count are broken by the string: "2" < "no" < "yes"
    assert build_answer_vocab(annotations, min_count=4) == ["2", "no", "yes"]
    assert build_answer_vocab(annotations, min_count=1) == ["2", "no", "yes", "red"]
    assert build_answer_vocab(annotations, min_count=5) == []
    assert build_answer_vocab(annotations) == []  # default min_count = 9
    assert build_answer_vocab(annotations * 3) == ["2", "no", "yes"]  # 12 each >= 9, red 3
    # official dict and chained iterables are accepted
    assert build_answer_vocab({"annotations": annotations}, min_count=4) == ["2", "no", "yes"]
    assert build_answer_vocab(iter(annotations), min_count=4) == ["2", "no", "yes"]


def test_vocab_errors():
    with pytest.raises(ValueError, match=r"annotation 1 \(question_id 7\): 'multiple_choice_answer'"):
        build_answer_vocab([ann(0, "yes"), {"question_id": 7}], min_count=1)
    with pytest.raises(ValueError, match="min_count"):
        build_answer_vocab([], min_count=0)


def test_soft_score():
    assert [soft_score(n) for n in range(6)] == [0.0, 0.3, 0.6, 0.9, 1.0, 1.0]
    assert soft_score(10) == 1.0
    with pytest.raises(ValueError):
        soft_score(-1)
    with pytest.raises(TypeError):
        soft_score(1.0)


@pytest.mark.parametrize("n", range(11))
def test_soft_score_equals_the_official_averaged_metric(n):
    humans = ["cat"] * n + [f"other{i}" for i in range(10 - n)]
    assert vqa_metric.question_accuracy("cat", humans) == pytest.approx(soft_score(n), abs=1e-12)


def test_soft_targets():
    vocab = {"yes": 0, "no": 1, "2": 2}
    humans = ["yes", "yes", "yes", "Yes.", "no", "no", "maybe", "two", "2", "2"]
    # yes x4 -> 1.0; no x2 -> 0.6; "2" x3 ("two" normalises to "2") -> 0.9; maybe not in vocab
    assert soft_targets(humans, vocab) == {0: 1.0, 1: 0.6, 2: 0.9}
    # official answer objects work too
    assert soft_targets([{"answer": a, "answer_id": i} for i, a in enumerate(humans)], vocab) == {
        0: 1.0,
        1: 0.6,
        2: 0.9,
    }
    # nothing in the vocabulary -> empty (the loader drops such questions)
    assert soft_targets(["maybe"] * 10, vocab) == {}
    with pytest.raises(ValueError, match=r"answers\[1\]"):
        soft_targets(["yes", 3], vocab)


def test_save_load_round_trip(tmp_path):
    vocab = ["2", "no", "yes", "don't", "café"]
    path = tmp_path / "answers.json"
    save_answers(path, vocab)
    assert load_answers(path) == vocab
    assert json.loads(path.read_text(encoding="utf-8")) == vocab


@pytest.mark.parametrize(
    "content, message",
    [
        ('["yes", "no"', "is not valid JSON"),
        ('{"yes": 0}', "must hold a JSON array of strings, got dict"),
        ('["yes", 2]', "entry 1 is not a string"),
        ('["yes", "no", "yes"]', "duplicate answer 'yes' at entry 2"),
    ],
)
def test_load_answers_malformed(tmp_path, content, message):
    path = tmp_path / "vocab.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=message) as info:
        load_answers(path)
    assert str(path) in str(info.value)


def test_load_answers_missing_and_save_checks(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"none\.json \(an answer vocabulary\) does not exist"):
        load_answers(tmp_path / "none.json")
    with pytest.raises(ValueError, match="duplicate answer 'a'"):
        save_answers(tmp_path / "x.json", ["a", "a"])
