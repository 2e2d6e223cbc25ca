"""Scene-true retrieval scores, computed by hand on small rankings."""

import numpy as np
import pytest

from absvl.metrics.scene_retrieval import format_scene_table, oracle_precision, scene_precision, scene_retrieval_scores


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
