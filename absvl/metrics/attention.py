"""How much of an attention map falls on the objects a question is about.

``target_attention_ratio`` scores one map against one target mask; ``target_attention_ratios``
and ``attention_scores`` run a VL model over the questions of a Shapes world split (whose
questions record their target objects) and score its bottom-up and top-down maps.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..data.shapes_world import target_mask
from ..images import BadImageError, open_image
from ..io import read_json

MAP_KINDS = ("bottom_up", "top_down")
# each map scored on the question's targets (the kind's name) and, as a control, on the image's other
# objects ("<kind>_others"): a map that follows the question prefers the first, one that just prefers
# objects scores both alike
SCORE_KEYS = MAP_KINDS + tuple(f"{kind}_others" for kind in MAP_KINDS)


def target_attention_ratio(attention: np.ndarray, target: np.ndarray) -> float:
    """Share of the map's mass on the target divided by the target's area share.

    ``attention`` is a non-negative ``h×w`` map (e.g. token norms), ``target`` a boolean
    ``H×W`` mask whose sides are multiples of ``h`` and ``w``; each map cell is weighted by
    the fraction of its pixels inside the target. 1.0 means no preference for the target,
    above 1 attention concentrated on it. NaN when the target is empty.
    """
    attention = np.asarray(attention, dtype=np.float64)
    target = np.asarray(target, dtype=bool)
    h, w = attention.shape
    H, W = target.shape
    if H % h or W % w:
        raise ValueError(f"mask {H}x{W} is not a whole multiple of the map {h}x{w}")
    if (attention < 0).any():
        raise ValueError("attention map must be non-negative")
    cover = target.reshape(h, H // h, w, W // w).mean(axis=(1, 3))
    area_share = cover.mean()
    if area_share == 0:
        return float("nan")
    total = attention.sum()
    mass_share = (attention * cover).sum() / total if total > 0 else area_share
    return float(mass_share / area_share)


def target_questions(world: Any, split: str, limit: int | None = 200) -> list[dict[str, Any]]:
    """The first ``limit`` questions of ``split`` (file order) that name target objects."""
    questions = read_json(world.questions_path(split))["questions"]
    questions = [q for q in questions if q.get("target_objects")]
    return questions if limit is None else questions[:limit]


def target_attention_ratios(
    model: Any, world: Any, questions: Sequence[dict[str, Any]], split: str, batch_size: int = 32
) -> dict[str, list[float]]:
    """``{"bottom_up": [...], "top_down": [...], "bottom_up_others": [...], "top_down_others": [...]}``:
    ``target_attention_ratio`` of each question's map (``model.attention_maps`` under the question's ξ)
    against its target mask, and against the mask of the image's other objects (``*_others``), in
    question order; NaN where the mask is empty or the image unreadable. Runs in eval mode,
    without gradients; the batch size does not change the result."""
    import torch

    def readable(q: dict[str, Any]) -> Any:
        try:
            return open_image(world.image_path(split, q["image_id"]))
        except BadImageError:
            return None

    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    ratios: dict[str, list[float]] = {key: [] for key in SCORE_KEYS}
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(questions), batch_size):
            pictures = [(q, readable(q)) for q in questions[start : start + batch_size]]
            chunk = [(q, image) for q, image in pictures if image is not None]
            if chunk:
                inputs = model.prepare_inputs(
                    images=[image for _, image in chunk], text=[q["question"] for q, _ in chunk]
                )
                with torch.no_grad():
                    maps = model.attention_maps(inputs["images"], inputs["input_ids"], inputs["attention_mask"])
            row = {id(q): i for i, (q, _) in enumerate(chunk)}
            for q, _ in pictures:
                masks = {"": target_mask(world, q), "_others": target_mask(world, q, others=True)}
                for kind in MAP_KINDS:
                    values = maps[kind][row[id(q)]].float().cpu().numpy() if id(q) in row else None
                    for suffix, mask in masks.items():
                        ratio = target_attention_ratio(values, mask) if values is not None else float("nan")
                        ratios[kind + suffix].append(ratio)
    finally:
        model.train(was_training)
    return ratios


def mean_ratio(values: Sequence[float]) -> float:
    """Mean over the defined (non-NaN) ratios; NaN when none is defined."""
    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else float("nan")


def attention_scores(
    model: Any,
    world: Any,
    split: str,
    limit: int | None = 200,
    batch_size: int = 32,
    question_types: Mapping[int, str] | None = None,
) -> dict[str, Any]:
    """Mean target-attention ratios (``SCORE_KEYS``: each map on the targets and on the other objects)
    of ``model`` over the first ``limit`` questions of ``split`` that have target objects (a Shapes
    world; empty masks are left out of the mean). Backbones without a top-down path score their one
    map for both kinds.

    With ``question_types`` (question id -> VQA question type, as in the split's annotations) the
    result also holds ``"per_question_type"``: the same means per type, each with its ``"questions"``
    count, so that a question family whose map does not move is not hidden by the overall mean.
    """
    questions = target_questions(world, split, limit)
    ratios = target_attention_ratios(model, world, questions, split, batch_size)
    scores: dict[str, Any] = {kind: mean_ratio(values) for kind, values in ratios.items()}
    if question_types is not None:
        groups: dict[str, list[int]] = {}
        for i, q in enumerate(questions):
            groups.setdefault(question_types.get(q["question_id"], "unknown"), []).append(i)
        scores["per_question_type"] = {
            qtype: {
                "questions": len(rows),
                **{kind: mean_ratio([values[i] for i in rows]) for kind, values in ratios.items()},
            }
            for qtype, rows in sorted(groups.items())
        }
    return scores


__all__ = [
    "MAP_KINDS",
    "SCORE_KEYS",
    "attention_scores",
    "mean_ratio",
    "target_attention_ratio",
    "target_attention_ratios",
    "target_questions",
]
