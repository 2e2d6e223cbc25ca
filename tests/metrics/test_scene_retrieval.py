"""Scene-true retrieval scores, computed by hand on small rankings."""

import numpy as np
import pytest

from absvl.metrics.scene_retrieval import (
    format_kind_table,
    format_scene_report,
    format_scene_table,
    oracle_precision,
    scene_precision,
    scene_retrieval_scores,
)


def test_precision_is_the_share_of_hits_that_fit():
    satisfied = np.array([[True, False, True, False, False, True], [False, False, False, False, True, False]])
    order = np.array([[0, 1, 2, 3, 4, 5], [3, 4, 0, 1, 2, 5]])
    scores = scene_precision(order, satisfied)
    assert scores == pytest.approx({"p@1": 50.0, "p@5": 100.0 * (2 / 5 + 1 / 5) / 2})


def test_the_oracle_is_the_best_any_ranking_can_do():
    satisfied = np.array([[True] * 6, [True, False, False, False, False, False]])
    assert oracle_precision(satisfied) == pytest.approx({"p@1": 100.0, "p@5": 100.0 * (1 + 1 / 5) / 2})
    best = np.argsort(~satisfied, axis=1, kind="stable")  # the fitting images first
    assert scene_precision(best, satisfied) == oracle_precision(satisfied)


def test_scores_split_objects_and_relations_and_give_the_paired_recall_ceiling():
    objects = np.array([[True, True, False], [True, False, True], [False, True, False]])
    relations = np.array([[True, False, False], [True, False, True], [False, True, False]])
    relational = np.array([True, False, False])
    order = np.array([[1, 0, 2], [0, 2, 1], [1, 0, 2]])
    scores = scene_retrieval_scores({"contrastive": order}, objects, relations, relational)
    ranking = scores["rankings"]["contrastive"]
    assert ranking["objects present"]["p@1"] == pytest.approx(100.0)
    assert ranking["relation right"]["p@1"] == pytest.approx(0.0)  # image 1 has the objects, not the relation
    # fits: query 0 by its relation (1 image), queries 1 and 2 by their objects (2 and 1 images)
    assert scores["ir@1_ceiling"] == pytest.approx(100.0 * (1 + 1 / 2 + 1) / 3)
    assert (scores["queries"], scores["relational"]) == (3, 1)
    table = format_scene_table(scores).splitlines()
    assert table[2].startswith("| contrastive | 100.00 |") and table[-1].startswith("| oracle (best possible) |")


def test_scores_per_caption_form_and_the_gain_table():
    objects = np.array([[True, False, False], [False, True, False], [True, True, True]])
    relations = np.array([[True, False, False], [False, False, False], [True, True, True]])
    relational = np.array([True, True, False])
    kinds = ["relation", "relation", "shape counts"]
    contrastive = np.array([[1, 0, 2], [1, 0, 2], [0, 1, 2]])
    reranked = np.array([[0, 1, 2], [1, 0, 2], [2, 1, 0]])
    scores = scene_retrieval_scores(
        {"contrastive": contrastive, "reranked": reranked}, objects, relations, relational, kinds
    )
    relation = scores["by kind"]["relation"]
    assert relation["queries"] == 2
    assert relation["rankings"]["contrastive"]["objects present"]["p@1"] == pytest.approx(50.0)
    assert relation["rankings"]["reranked"]["objects present"]["p@1"] == pytest.approx(100.0)
    assert relation["rankings"]["reranked"]["relation right"]["p@1"] == pytest.approx(50.0)
    assert "relation right" not in scores["by kind"]["shape counts"]["rankings"]["contrastive"]
    table = format_kind_table(scores, "contrastive", "reranked").splitlines()
    assert table[2] == "| relation | 2 | 50.00 | 100.00 | +50.00 | 0.00 | 50.00 | +50.00 |"
    assert table[3] == "| shape counts | 1 | 100.00 | 100.00 | +0.00 | – | – | – |"
    report = format_scene_report(scores)
    assert "gain per caption form" in report and "| oracle (best possible) |" in report
    assert "by kind" not in scene_retrieval_scores({"contrastive": contrastive}, objects, relations, relational)
