"""Image-text retrieval recall (Flickr30K / COCO Karpathy test protocol, SPEC §6).

IR@k: share of captions whose image is among their first k retrieved images; TR@k: share of
images with at least one of their captions among the first k retrieved captions; ``r_mean`` is
the mean of the six. Values are percentages.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

RECALL_KS = (1, 5, 10)


def recall_at_k(rankings: Sequence[Sequence[int]], relevant: Sequence[set[int] | frozenset[int]], k: int) -> float:
    """% of queries with a relevant item among the first ``k`` of their ranking."""
    if len(rankings) != len(relevant):
        raise ValueError(f"{len(rankings)} rankings for {len(relevant)} relevance sets")
    if len(rankings) == 0:
        raise ValueError("no query to score")
    hits = sum(bool(set(np.asarray(ranking)[:k].tolist()) & rel) for ranking, rel in zip(rankings, relevant))
    return 100.0 * hits / len(rankings)


def retrieval_recalls(
    text_to_image: Sequence[Sequence[int]],
    caption_image: Sequence[int],
    image_to_text: Sequence[Sequence[int]],
    image_captions: Sequence[set[int] | frozenset[int]],
    ks: Sequence[int] = RECALL_KS,
) -> dict[str, float]:
    """``{"ir@1", ..., "tr@10", "r_mean"}`` from ranked candidate lists.

    Args:
        text_to_image: per caption, image indices best first.
        caption_image: per caption, the index of its image.
        image_to_text: per image, caption indices best first.
        image_captions: per image, the indices of its captions.
    """
    out = {f"ir@{k}": recall_at_k(text_to_image, [{i} for i in caption_image], k) for k in ks}
    out.update({f"tr@{k}": recall_at_k(image_to_text, image_captions, k) for k in ks})
    out["r_mean"] = float(np.mean([out[f"{d}@{k}"] for d in ("ir", "tr") for k in ks]))
    return out


def format_recall_table(results: dict[str, dict[str, float]]) -> str:
    """A Markdown table, one row per ranking (e.g. ``contrastive``, ``re-ranked``)."""
    columns = [k for k in next(iter(results.values()))]
    lines = [
        "| ranking | " + " | ".join(c.upper() if c != "r_mean" else "R mean" for c in columns) + " |",
        "| --- |" + " ---: |" * len(columns),
    ]
    for name, row in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{row[c]:.2f}" for c in columns) + " |")
    return "\n".join(lines)
