"""Scene-true retrieval scores: recall against one paired caption undercounts where several images fit a caption
and does not say whether the hits are right. Where every image's scene is known (the Shapes world), each caption
has the set of images that satisfy it; a ranking is scored by the share of its hits in that set (precision@k),
for "every named object present" and, for captions that name a relation, "the relation right". The oracle is the
best any ranking can do: precision 100 % @1 (the caption's own image satisfies it) and min(|set|, k)/k @k, and
paired-caption IR@1 at most the mean of 1/|set| (a ranking that knows the scenes cannot tell the paired image from
the others that fit).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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
    rankings: Mapping[str, np.ndarray],
    objects: np.ndarray,
    relations: np.ndarray,
    relational: np.ndarray,
    kinds: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Scene-true scores of text → image rankings.

    Args:
        rankings: ``{"contrastive": order, ...}``, each ``[Q, depth]`` image indices, best first.
        objects: ``[Q, I]`` bool, the query caption's named objects are all in the image.
        relations: ``[Q, I]`` bool, and the relation it names holds.
        relational: ``[Q]`` bool, the caption names a relation.
        kinds: ``[Q]`` each caption's form (e.g. ``shapes_text.caption_kind``) → ``"by kind"``: the same scores
            of each form's captions, ``{kind: {"queries", "rankings": {name: {check: {"p@1", "p@5"}}}}}`` (a check
            a form never makes is absent), to see where a ranking (re-ranking) gains.

    Returns ``{"rankings": {name: {"objects present": {"p@1", "p@5"}, "relation right": {...}}}, "oracle": the
    same for the best ranking, "ir@1_ceiling": the paired-caption IR@1 ceiling (%), "queries", "relational"}``;
    "relation right" is over the relational queries only.
    """
    fits = np.where(relational[:, None], relations, objects)  # all that the caption says
    out = {
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
    if kinds is not None:
        kinds = np.asarray(kinds)
        out["by kind"] = {}
        for kind in dict.fromkeys(kinds.tolist()):
            rows = kinds == kind
            related = rows & relational
            out["by kind"][kind] = {
                "queries": int(rows.sum()),
                "rankings": {
                    name: {
                        "objects present": scene_precision(order[rows], objects[rows]),
                        **(
                            {"relation right": scene_precision(order[related], relations[related])}
                            if related.any()
                            else {}
                        ),
                    }
                    for name, order in rankings.items()
                },
            }
    return out


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


def format_kind_table(scores: Mapping[str, Any], base: str, other: str) -> str:
    """A Markdown table of ``scores["by kind"]``: per caption form, P@1 of ranking ``base`` and ``other`` and the
    gain of ``other`` over ``base``, for each check ("–" where a form names no relation)."""
    lines = [
        f"| caption form | captions | objects present P@1: {base} | {other} | gain | relation right P@1: {base} | "
        f"{other} | gain |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for kind, part in scores["by kind"].items():
        cells = [kind, str(part["queries"])]
        for check in ("objects present", "relation right"):
            if check not in part["rankings"][base]:
                cells += ["–"] * 3
                continue
            a, b = part["rankings"][base][check]["p@1"], part["rankings"][other][check]["p@1"]
            cells += [f"{a:.2f}", f"{b:.2f}", f"{b - a:+.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_scene_report(scores: Mapping[str, Any]) -> str:
    """What ``absvl eval retrieval`` and the demo print of a Shapes world's scene-true scores: the precision table
    with the oracle, the paired-caption IR@1 ceiling and, with a re-ranked ranking, its gain per caption form."""
    parts = [
        f"{SCENE_TABLE_TITLE} ({scores['relational']} of the {scores['queries']} captions name a relation):",
        format_scene_table(scores),
        f"paired-caption IR@1 ceiling (several images fit a caption): {scores['ir@1_ceiling']:.2f}",
    ]
    names = list(scores["rankings"])
    if "by kind" in scores and len(names) > 1:
        parts += ["re-ranking's gain per caption form (scene-true P@1):", format_kind_table(scores, *names[:2])]
    return "\n".join(parts)
