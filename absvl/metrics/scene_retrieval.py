"""Scene-true retrieval scores: recall against one paired caption undercounts where several images fit a caption
and does not say whether the hits are right. Where every image's scene is known (the Shapes world), each caption
has the set of images that satisfy it; a ranking is scored by the share of its hits in that set (precision@k),
for "every named object present" and, for captions that name a relation, "the relation right". The oracle is the
best any ranking can do: precision 100 % @1 (the caption's own image satisfies it) and min(|set|, k)/k @k, and
paired-caption IR@1 at most the mean of 1/|set| (a ranking that knows the scenes cannot tell the paired image from
the others that fit).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

PRECISION_KS = (1, 5)
SCENE_TABLE_TITLE = (
    "scene-true precision of the caption → image hits: the share whose scene has every object the caption names, "
    "and (captions that name a relation) whose relation holds too"
)


def scene_precision(order: np.ndarray, satisfied: np.ndarray, ks: tuple[int, ...] = PRECISION_KS) -> dict[str, float]:
    """``{"p@k": %}``: over the queries (rows of ``order``, their ranked image indices), the mean share of the
    first ``k`` hits whose image satisfies the query (``satisfied`` ``[Q, I]`` bool)."""
    hits = np.take_along_axis(satisfied, order[:, : max(ks)], axis=1)
    return {f"p@{k}": float(100.0 * hits[:, :k].mean()) for k in ks}


def oracle_precision(satisfied: np.ndarray, ks: tuple[int, ...] = PRECISION_KS) -> dict[str, float]:
    """The best precision@k any ranking can reach on ``satisfied`` ``[Q, I]``: min(|set|, k)/k per query."""
    fitting = satisfied.sum(axis=1)
    return {f"p@{k}": float(100.0 * np.mean(np.minimum(fitting, k) / k)) for k in ks}


def scene_retrieval_scores(
    rankings: Mapping[str, np.ndarray], objects: np.ndarray, relations: np.ndarray, relational: np.ndarray
) -> dict[str, Any]:
    """Scene-true scores of text → image rankings.

    Args:
        rankings: ``{"contrastive": order, ...}``, each ``[Q, depth]`` image indices, best first.
        objects: ``[Q, I]`` bool, the query caption's named objects are all in the image.
        relations: ``[Q, I]`` bool, and the relation it names holds.
        relational: ``[Q]`` bool, the caption names a relation.

    Returns ``{"rankings": {name: {"objects present": {"p@1", "p@5"}, "relation right": {...}}}, "oracle": the
    same for the best ranking, "ir@1_ceiling": the paired-caption IR@1 ceiling (%), "queries", "relational"}``;
    "relation right" is over the relational queries only.
    """
    fits = np.where(relational[:, None], relations, objects)  # all that the caption says
    return {
        "rankings": {
            name: {
                "objects present": scene_precision(order, objects),
                "relation right": scene_precision(order[relational], relations[relational]),
            }
            for name, order in rankings.items()
        },
        "oracle": {
            "objects present": oracle_precision(objects),
            "relation right": oracle_precision(relations[relational]),
        },
        "ir@1_ceiling": float(100.0 * np.mean(1.0 / np.maximum(fits.sum(axis=1), 1))),
        "queries": int(len(objects)),
        "relational": int(relational.sum()),
    }


def format_scene_table(scores: Mapping[str, Any]) -> str:
    """A Markdown table: one row per ranking and the oracle, precision @1/@5 for each check."""
    lines = [
        "| ranking | objects present P@1 | P@5 | relation right P@1 | P@5 |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, checks in [*scores["rankings"].items(), ("oracle (best possible)", scores["oracle"])]:
        objects, relations = checks["objects present"], checks["relation right"]
        lines.append(
            f"| {name} | {objects['p@1']:.2f} | {objects['p@5']:.2f} | {relations['p@1']:.2f} | {relations['p@5']:.2f} |"
        )
    return "\n".join(lines)
