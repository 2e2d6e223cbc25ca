"""IR@k / TR@k on hand-made rankings."""

import pytest

from absvl.metrics.retrieval import format_recall_table, recall_at_k, retrieval_recalls


def test_recall_at_k_counts_queries_with_a_relevant_item_in_the_first_k():
    rankings = [[2, 0, 1], [1, 2, 0], [0, 1, 2]]
    relevant = [{0}, {0}, {0}]
    assert recall_at_k(rankings, relevant, 1) == pytest.approx(100 / 3)
    assert recall_at_k(rankings, relevant, 2) == pytest.approx(200 / 3)
    assert recall_at_k(rankings, relevant, 3) == 100.0
    with pytest.raises(ValueError, match="2 rankings for 3"):
        recall_at_k(rankings[:2], relevant, 1)
    with pytest.raises(ValueError, match="no query"):
        recall_at_k([], [], 1)


def test_text_and_image_retrieval_recalls():
    # 2 images, captions 0,1 of image 0 and captions 2,3 of image 1
    caption_image = [0, 0, 1, 1]
    image_captions = [{0, 1}, {2, 3}]
    text_to_image = [[0, 1], [1, 0], [1, 0], [1, 0]]  # caption 1 ranks its image second
    image_to_text = [[2, 1, 0, 3], [0, 1, 2, 3]]  # image 0: its caption 1 at rank 2; image 1: its first at rank 3
    r = retrieval_recalls(text_to_image, caption_image, image_to_text, image_captions, ks=(1, 2, 3))
    assert r["ir@1"] == 75.0 and r["ir@2"] == 100.0 and r["ir@3"] == 100.0
    assert r["tr@1"] == 0.0 and r["tr@2"] == 50.0 and r["tr@3"] == 100.0
    assert r["r_mean"] == pytest.approx((75 + 100 + 100 + 0 + 50 + 100) / 6)
    table = format_recall_table({"contrastive": r})
    assert table.splitlines()[0].startswith("| ranking | IR@1 | IR@2") and "| contrastive | 75.00 |" in table
