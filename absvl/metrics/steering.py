"""Does the question steer where the backbone looks? Two scores per question family, on a Shapes world.

Both compare maps of one image under different questions, so a map that prefers objects in general, or
one object whatever is asked, scores no steering:

- **paired**: an image with two questions of one family that name different objects, A and B (the
  objects only one of the two questions names). The map's share of its mass on A under question A,
  divided by its share on A under question B (and the same for B). 1 = the question changes nothing; the
  medians and means over all such ratios are reported. "What color is the object left of the circle?"
  names the circle, not the object it asks about: that one is found through the relation, which no map
  computed before the question is answered can know.
- **pointing**: the share of questions whose map peaks on one of the question's objects (a cell that
  the objects cover for at least a quarter). The bottom-up map, which no question changes, is the baseline
  beside it, and ``chance`` the share of cells that the objects cover.

Four maps are scored (``MAPS``): ``gate``, the prior gate ``clamp(cos(ξ, z_i), 0, 1)`` on the first
pass's tokens (what AbSViT's ξ selects, and the map the prior loss's object-level term trains; backbones
without a prior have none); ``bottom_up`` (the first pass's token norms at the map block, the baseline:
no question changes it); ``top_down`` (the second pass's token norms, the map AbSViT's figures show) and
``fusion``: how much the top-down pass changed each token the fusion reads, ``‖n(z_td) − n(z_bu)‖`` with
``n`` the tokens' final norm (``AbsVLModel.fusion_change``). The fusion reads normalised tokens, so
the norm of what it reads does not move: what the question changes there, and where, is the second
pass's effect on the answer (and the map that ``topdown_object_loss`` trains, when its weight is on).

The question pairs come from the world's own question generator (``absvl.data.shapes_text``), so they
are questions of the training distribution, with the same wording and the same objects named.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..data.shapes_text import FAMILY_TEMPLATES, question_candidates
from ..images import BadImageError, open_image

MAPS = ("gate", "bottom_up", "top_down", "fusion")
# the families that name objects, in report order, with the question type they read as (counted: questions
# whose objects are there)
FAMILIES = {**FAMILY_TEMPLATES, "exist": "is there a <object>? (yes)", "count": "how many <objects>? (1+)"}
POINTING_COVER = 0.25  # a map cell is on an object when the object covers this share of it


def steering_pairs(world: Any, split: str, limit: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """Question pairs of every family for the images of ``split`` (the first ``limit`` that have two or
    more objects): ``{"image_id", "family", "questions": [qa, qb], "answers": [..], "targets": [[..], [..]],
    "named": [[..], [..]], "only": [A, B]}`` where ``targets`` are each question's objects (indices), ``named``
    those its words describe and ``only`` the objects that one question names and the other not (both non-empty).
    Deterministic in ``seed``."""
    scenes = sorted((s for s in world.load_scenes().values() if s["split"] == split), key=lambda s: s["image_id"])
    margin = world.relation_margin
    pairs: list[dict[str, Any]] = []
    images = 0
    for scene in scenes:
        objects = scene["objects"]
        if len(objects) < 2:
            continue
        if limit is not None and images >= limit:
            break
        images += 1
        for family in FAMILIES:
            rng = np.random.default_rng([seed, scene["image_id"], list(FAMILIES).index(family)])
            candidates = [c for c in question_candidates(objects, family, margin, rng) if c["targets"]]
            if family == "count":  # "how many objects are there?" names no object
                candidates = [c for c in candidates if c["question"] != "how many objects are there?"]
            order = rng.permutation(len(candidates))
            found = None
            for i in order:
                for j in order:
                    a, b = set(candidates[i]["named"]), set(candidates[j]["named"])
                    if a - b and b - a:
                        found = (candidates[i], candidates[j])
                        break
                if found:
                    break
            if found is None:
                continue
            qa, qb = found
            pairs.append(
                {
                    "image_id": scene["image_id"],
                    "family": family,
                    "questions": [qa["question"], qb["question"]],
                    "answers": [qa["answer"], qb["answer"]],
                    "targets": [sorted(qa["targets"]), sorted(qb["targets"])],
                    "named": [sorted(qa["named"]), sorted(qb["named"])],
                    "only": [sorted(set(qa["named"]) - set(qb["named"])), sorted(set(qb["named"]) - set(qa["named"]))],
                }
            )
    return pairs


def cell_cover(labels: np.ndarray, objects: Sequence[int], grid: tuple[int, int]) -> np.ndarray:
    """``h×w`` share of each map cell covered by the objects (indices) of a label map (0 background,
    object ``i`` is label ``i + 1``)."""
    h, w = grid
    H, W = labels.shape
    if H % h or W % w:
        raise ValueError(f"label map {H}x{W} is not a whole multiple of the map {h}x{w}")
    mask = np.isin(labels, [int(i) + 1 for i in objects])
    return mask.reshape(h, H // h, w, W // w).mean(axis=(1, 3))


def mass_share(attention: np.ndarray, cover: np.ndarray) -> float:
    """Share of a non-negative map's mass on the covered cells (cover-weighted); an all-zero map
    spreads evenly (its share is the covered area's)."""
    total = float(attention.sum())
    return float((attention * cover).sum() / total) if total > 0 else float(cover.mean())


def points_at(attention: np.ndarray, cover: np.ndarray) -> bool:
    """Whether the map's peak cell is one the objects cover for at least ``POINTING_COVER``. A constant map
    (e.g. a shut gate, or no change by the top-down pass) has no peak and points nowhere."""
    if float(attention.max()) <= float(attention.min()):
        return False
    return bool(cover.flat[int(np.argmax(attention))] >= POINTING_COVER)


@torch.no_grad()
def question_maps(model: Any, images: list[Any], questions: list[str]) -> dict[str, np.ndarray]:
    """``MAPS`` of each (image, question) as ``[B, h, w]`` arrays (``gate`` only for backbones with a
    prior; eval mode is the caller's)."""
    inputs = model.prepare_inputs(images=images, text=questions)
    _, xi = model.encode_prior(inputs["input_ids"], inputs["attention_mask"])
    vision = model.encode_vision(inputs["images"], xi, return_maps=True)
    prefix, (h, w) = vision.num_prefix_tokens, vision.grid_size
    fusion = model.fusion_change(vision).norm(dim=-1).reshape(-1, h, w)
    maps = {
        **({"gate": vision.prior_mask[:, prefix:, 0].reshape(-1, h, w)} if vision.prior_mask is not None else {}),
        "bottom_up": vision.maps["bottom_up"],
        "top_down": vision.maps.get("top_down", vision.maps["bottom_up"]),
        "fusion": fusion,
    }
    return {k: v.float().cpu().numpy() for k, v in maps.items()}


def steering_scores(
    model: Any, world: Any, split: str, pairs: Sequence[dict[str, Any]], batch_size: int = 32
) -> dict[str, Any]:
    """Paired and pointing scores (see the module docstring) of ``model`` on ``pairs``
    (``steering_pairs``): ``{"families": {family: {"pairs", "questions", "paired": {map: {"median",
    "mean"}}, "pointing": {map: %}, "chance": %}}, "all": {...}}``. Pairs whose image is unreadable are
    left out."""
    from PIL import Image

    rows: list[dict[str, Any]] = []  # one per question: its pair, its side, its maps
    for pair in pairs:
        try:
            image = open_image(world.image_path(split, pair["image_id"]))
        except BadImageError:
            continue
        for side in (0, 1):
            rows.append({"pair": pair, "side": side, "image": image})
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            maps = question_maps(model, [r["image"] for r in chunk], [r["pair"]["questions"][r["side"]] for r in chunk])
            for i, row in enumerate(chunk):
                row["maps"] = {k: v[i] for k, v in maps.items()}
    finally:
        model.train(was_training)

    by_family: dict[str, dict[str, list]] = {}
    labels_cache: dict[int, np.ndarray] = {}
    for k in range(0, len(rows), 2):
        first, second = rows[k], rows[k + 1]
        pair = first["pair"]
        image_id = pair["image_id"]
        if image_id not in labels_cache:
            labels_cache[image_id] = np.asarray(Image.open(world.mask_path(split, image_id)))
        labels = labels_cache[image_id]
        grid = first["maps"]["bottom_up"].shape
        stats = by_family.setdefault(pair["family"], {"paired": [], "pointing": [], "chance": []})
        for own, other in ((first, second), (second, first)):
            side = own["side"]
            only = cell_cover(labels, pair["only"][side], grid)
            targets = cell_cover(labels, pair["targets"][side], grid)
            paired = {}
            names = [name for name in MAPS if name in own["maps"]]
            for name in names:
                under_other = mass_share(other["maps"][name], only)
                paired[name] = mass_share(own["maps"][name], only) / under_other if under_other > 0 else float("nan")
            stats["paired"].append(paired)
            stats["pointing"].append({name: points_at(own["maps"][name], targets) for name in names})
            stats["chance"].append(float((targets >= POINTING_COVER).mean()))

    def summary(stats: dict[str, list]) -> dict[str, Any]:
        out: dict[str, Any] = {"questions": len(stats["pointing"]), "pairs": len(stats["pointing"]) // 2}
        out["paired"] = {}
        names = [name for name in MAPS if stats["pointing"] and name in stats["pointing"][0]]
        for name in names:
            values = np.array([p[name] for p in stats["paired"]], dtype=np.float64)
            values = values[np.isfinite(values)]
            out["paired"][name] = {
                "median": float(np.median(values)) if values.size else float("nan"),
                "mean": float(values.mean()) if values.size else float("nan"),
            }
        n = max(len(stats["pointing"]), 1)
        out["pointing"] = {name: 100.0 * sum(p[name] for p in stats["pointing"]) / n for name in names}
        out["chance"] = 100.0 * float(np.mean(stats["chance"])) if stats["chance"] else float("nan")
        return out

    families = {f: summary(by_family[f]) for f in FAMILIES if f in by_family}
    everything = {key: [x for s in by_family.values() for x in s[key]] for key in ("paired", "pointing", "chance")}
    return {"families": families, "all": summary(everything)}


def gate_hits(gate: torch.Tensor, patch_objects: torch.Tensor, target_objects: torch.Tensor) -> dict[str, float]:
    """How a batch's prior gate ``[B, P]`` (spatial tokens) sits on the questions' objects (``patch_objects``
    ``[B, P]``: each patch's object label, ``target_objects`` ``[B, K]``: the question's labels): sums over the
    rows that have object patches of ``questions`` (their number), ``pointing`` (rows whose gate peaks on one),
    ``on_targets`` and ``off_targets`` (the row's mean gate on its objects' patches and on the others)."""
    labels = target_objects.shape[1]
    positive = target_objects.gather(1, patch_objects.long().clamp(0, labels - 1)) & (patch_objects >= 0)
    rows = positive.any(1)
    if not rows.any():
        return {"questions": 0.0, "pointing": 0.0, "on_targets": 0.0, "off_targets": 0.0}
    gate, positive = gate[rows].float(), positive[rows]
    peak = positive.gather(1, gate.argmax(1, keepdim=True)).squeeze(1)
    on = (gate * positive).sum(1) / positive.sum(1)
    off = (gate * ~positive).sum(1) / (~positive).sum(1).clamp(min=1)
    return {
        "questions": float(rows.sum()),
        "pointing": float(peak.sum()),
        "on_targets": float(on.sum()),
        "off_targets": float(off.sum()),
    }


def format_steering_table(scores: dict[str, Any]) -> str:
    """The steering scores as a table: per family, the paired median (mean) of each question-dependent map,
    the pointing of every map (the bottom-up one the baseline) and the chance of pointing."""
    maps = [m for m in MAPS if m in scores["all"]["pointing"]]
    steered = [m for m in maps if m != "bottom_up"]
    label = lambda m: m.replace("_", "-")  # noqa: E731
    cells = [f"paired {label(m)}" for m in steered] + [f"pointing {label(m)}" for m in maps] + ["chance"]
    widths = [max(len(c), 13) for c in cells]
    lines = [f"{'family':<50} {'pairs':>5}  " + " ".join(f"{c:>{w}}" for c, w in zip(cells, widths))]
    for name, s in [*((FAMILIES[f], s) for f, s in scores["families"].items()), ("all", scores["all"])]:
        row = [f"{s['paired'][m]['median']:.2f}x ({s['paired'][m]['mean']:.2f})" for m in steered]
        row += [f"{s['pointing'][m]:.0f}%" for m in maps] + [f"{s['chance']:.0f}%"]
        lines.append(f"{name:<50} {s['pairs']:>5}  " + " ".join(f"{c:>{w}}" for c, w in zip(row, widths)))
    return "\n".join(lines)


__all__ = [
    "FAMILIES",
    "MAPS",
    "cell_cover",
    "format_steering_table",
    "gate_hits",
    "mass_share",
    "points_at",
    "question_maps",
    "steering_pairs",
    "steering_scores",
]
