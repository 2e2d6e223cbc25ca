"""The measurements and results of ``scripts/compare_topdown.py``: a trained model scored, the runs summed
up per variant, the Markdown tables (``results.md``) and the comparison figure (``comparison.png``).

``score_model`` scores one run's model (test-dev accuracy, steering, diagnostics) on the question pairs of
``steering_test_pairs``, ``aggregate`` turns the run records into one row per variant (mean ± std over seeds),
``markdown`` writes the tables with their reading notes, ``plot`` draws the accuracy and pointing bars (PIL
only). The steering scores are ``absvl.metrics.steering.steering_scores``' output, kept per run as ``steering``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection
from pathlib import Path
from typing import Any

import numpy as np

TEST_SPLIT = "test-dev2015"


# --------------------------------------------------------------------------- scoring one run
def steering_test_pairs(world: Any, images: int) -> list[dict[str, Any]]:
    """The steering question pairs of the first ``images`` test-dev images with 2+ objects, which every run is
    scored on (``absvl.metrics.steering.steering_pairs``, seed 0)."""
    from absvl.metrics.steering import steering_pairs

    return steering_pairs(world, TEST_SPLIT, images, seed=0)


def score_model(
    model: Any, config: Any, world: Any, pairs: list[dict[str, Any]], extra_map_block: int | None = None
) -> dict[str, Any]:
    """A trained VQA model's record entries: ``accuracy`` and ``per_answer_type`` (official VQA accuracy on
    the world's test-dev), ``steering`` (``absvl.metrics.steering.steering_scores`` on ``pairs``),
    ``steering_other_block`` (the same with the maps after block ``extra_map_block``; the fusion and gate
    maps do not move; None without it), ``prior_mask_mean`` and ``topdown_change`` (``diagnostics``)."""
    from absvl.evaluation.vqa import predict_vqa_submission
    from absvl.metrics.steering import steering_scores
    from absvl.metrics.vqa import evaluate_vqa
    from absvl.training.vqa import load_split

    predictions, _, _ = predict_vqa_submission(model, load_split(config, "test-dev", require_annotations=False))
    questions = json.loads(world.questions_path(TEST_SPLIT).read_text())
    private = json.loads(world.annotations_path(TEST_SPLIT).read_text())
    result = evaluate_vqa(predictions, questions, private)
    steering = steering_scores(model, world, TEST_SPLIT, pairs)
    other = None
    if extra_map_block is not None and hasattr(model.backbone, "map_block"):
        default_block, model.backbone.map_block = model.backbone.map_block, extra_map_block
        try:
            other = steering_scores(model, world, TEST_SPLIT, pairs)
        finally:
            model.backbone.map_block = default_block
    return {
        "accuracy": result["overall"],
        "per_answer_type": result["perAnswerType"],
        "steering": steering,
        "steering_other_block": other,
        **diagnostics(model, world, pairs),
    }


def diagnostics(model: Any, world: Any, pairs: list[dict[str, Any]], batch_size: int = 32) -> dict[str, Any]:
    """``prior_mask_mean``: the mean prior gate on the spatial tokens (None for a backbone without a prior),
    and ``topdown_change``: the output tokens' relative change by the top-down pass, ``‖z_td − z_bu‖ /
    ‖z_bu‖``; over the first question of each steering pair."""
    import torch

    from absvl.images import BadImageError, open_image

    items = []
    for pair in pairs:
        try:
            items.append((open_image(world.image_path(TEST_SPLIT, pair["image_id"])), pair["questions"][0]))
        except BadImageError:
            continue
    changes: list[float] = []
    gate_means: list[float] = []
    model.eval()
    with torch.no_grad():
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            inputs = model.prepare_inputs(images=[i for i, _ in chunk], text=[q for _, q in chunk])
            _, xi = model.encode_prior(inputs["input_ids"], inputs["attention_mask"])
            vision = model.encode_vision(inputs["images"], xi)
            z_bu, z = vision.bottom_up_tokens, vision.tokens
            changes.extend(((z - z_bu).norm(dim=-1).mean(-1) / z_bu.norm(dim=-1).mean(-1)).tolist())
            if vision.prior_mask is not None:
                gate_means.extend(vision.prior_mask[:, vision.num_prefix_tokens :, 0].mean(-1).tolist())
    return {
        "prior_mask_mean": float(np.mean(gate_means)) if gate_means else None,
        "topdown_change": float(np.mean(changes)) if changes else float("nan"),
    }


# --------------------------------------------------------------------------- aggregation
# absvl.metrics.steering.MAPS: the prior gate (backbones with a prior), the first and second pass's token
# norms, the top-down pass's change of the tokens the fusion reads
MAPS = ("gate", "bottom_up", "top_down", "fusion")
ONE_PASS_MAPS = ("bottom_up",)  # what a variant without a top-down pass has: its scores' other maps are copies or 0


def _mean_std(values: list[float | None]) -> tuple[float, float]:
    """Mean and sample std (ddof 1; 0 for one value) of the values that are there (not None or NaN)."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return float("nan"), float("nan")
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def _scores(steering: dict[str, Any] | None, family: str) -> dict[str, Any] | None:
    """One family's (or ``all``) steering scores of a run, None when it has none."""
    steering = steering or {}
    return steering.get("all") if family == "all" else (steering.get("families") or {}).get(family)


def _map_over_seeds(
    steerings: list[dict[str, Any] | None], family: str, kind: str, name: str
) -> tuple[float, float] | None:
    """Mean ± std over seeds of a map's ``pointing`` (%) or ``paired`` median on a family; None when a run's
    scores lack the map (e.g. ``gate`` of a backbone without a prior)."""
    values = []
    for steering in steerings:
        scores = _scores(steering, family)
        if scores is None:
            values.append(None)  # the family had no pair in this run: NaN, not a missing map
            continue
        if name not in scores[kind]:
            return None
        value = scores[kind][name]
        values.append(value["median"] if kind == "paired" else value)
    return _mean_std(values)


def _per_map(steerings: list[Any], family: str, kind: str, kept: Collection[str]) -> dict[str, Any]:
    """``_map_over_seeds`` of every map (None for the maps not ``kept``)."""
    return {m: _map_over_seeds(steerings, family, kind, m) if m in kept else None for m in MAPS}


def aggregate(
    runs: list[dict[str, Any]], variants: list[Any], topdown_variants: Collection[str]
) -> list[dict[str, Any]]:
    """One row per variant (``compare_topdown.Variant``, in the given order) with runs: mean ± std over
    its seeds of the accuracy and of the steering scores (each run's ``steering``, the output of
    ``absvl.metrics.steering.steering_scores``): ``pointing`` (%) and ``paired`` (median) per map on all
    families, ``family_pointing`` per family and map, ``chance`` per family, ``other_pointing`` from the
    maps at the extra block. The maps a variant lacks are None: a variant outside ``topdown_variants`` keeps
    only the bottom-up map (its top-down map is a copy, its fusion map 0) and ``topdown_change`` is None."""
    from absvl.metrics.steering import FAMILIES

    present = {f for r in runs for f in ((r.get("steering") or {}).get("families") or {})}
    families = [f for f in FAMILIES if f in present] + sorted(present - set(FAMILIES))
    rows = []
    for v in variants:
        mine = sorted((r for r in runs if r["variant"] == v.name), key=lambda r: r["seed"])
        if not mine:
            continue
        topdown = v.name in topdown_variants
        kept = MAPS if topdown else ONE_PASS_MAPS
        steerings = [r.get("steering") for r in mine]
        row = {"variant": v.name, "label": v.label, "backbone": v.describe(), "seeds": [r["seed"] for r in mine]}
        row["accuracy"] = _mean_std([r["accuracy"] for r in mine])
        row["accuracies"] = [r["accuracy"] for r in mine]
        row["pointing"] = _per_map(steerings, "all", "pointing", kept)
        row["paired"] = _per_map(steerings, "all", "paired", kept)
        row["family_pointing"] = {f: _per_map(steerings, f, "pointing", kept) for f in (*families, "all")}
        row["chance"] = {
            f: _mean_std([(_scores(s, f) or {}).get("chance") for s in steerings]) for f in (*families, "all")
        }
        row["pairs"] = [(_scores(s, "all") or {}).get("pairs", 0) for s in steerings]
        other = [r.get("steering_other_block") for r in mine]
        row["other_pointing"] = _per_map(other, "all", "pointing", kept) if all(o is not None for o in other) else None
        mm = [r.get("prior_mask_mean") for r in mine]
        row["prior_mask_mean"] = _mean_std(mm) if all(m is not None for m in mm) else None
        row["topdown_change"] = _mean_std([r["topdown_change"] for r in mine]) if topdown else None
        row["prior_seconds"] = float(np.mean([r.get("prior_seconds", 0.0) for r in mine]))
        row["train_seconds"] = float(np.mean([r["train_seconds"] for r in mine]))
        rows.append(row)
    return rows


def _fmt(ms: tuple[float, float] | None, digits: int = 2) -> str:
    """``mean ± std``; ``—`` for None (the variant lacks it), ``n/a`` for NaN (nothing to average)."""
    if ms is None:
        return "—"
    mean, std = ms
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _pct(ms: tuple[float, float] | None) -> str:
    return _fmt(ms, 0)


def _seconds(row: dict[str, Any]) -> str:
    vqa = f"{row['train_seconds']:.0f}"
    return f"{row['prior_seconds']:.0f} + {vqa}" if row["prior_seconds"] else vqa


def _overrides(label: str, values: list[str]) -> str:
    return f" {label} {', '.join('`' + s + '`' for s in values)}" if values else ""


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """``results.md``: the budget, what the scores mean, the main table (accuracy, steering on all families,
    diagnostics, time), top-down pointing per question family, time and command."""
    extra = meta.get("extra_map_block")
    families = [f for f in (rows[0]["family_pointing"] if rows else {}) if f != "all"]
    chance = rows[0]["chance"] if rows else {}
    prior_variants = set(meta.get("prior_variants", []))
    lines = [
        "# Top-down variants on the Shapes world VQA",
        "",
        f"Budget per run: {meta['steps']} VQA optimizer steps × batch {meta['batch_size']} "
        f"({meta['steps'] * meta['batch_size']:,} training questions seen, same order for every variant of a seed), "
        f"seeds {meta['seeds']}; VQA recipe `{meta['config']}`{_overrides('with', meta['set'])}. The variants with a "
        f"prior gate (Prior: yes) first run {meta['prior_steps']} steps of prior alignment (`{meta['prior_config']}`"
        f"{_overrides('with', meta.get('prior_set', []))}) and start VQA from its export: their time is extra "
        "(Train s/run: prior + VQA). "
        f"Test-dev: {meta['test_questions']:,} questions, official VQA accuracy; majority-answer baseline "
        f"{meta['majority']:.2f}. Every figure is the mean ± std over the seeds.",
        "",
        f"Steering (`absvl.metrics.steering`) on {meta['steering_pairs']:,} question pairs of the first "
        f"{meta['steering_images']} test-dev images with 2+ objects (two questions of one family that name different "
        "objects). **Pointing**: % of the questions whose map peaks on one of the question's objects; the bottom-up "
        "map, which no question changes, is the baseline, and chance (the share of cells the objects cover) is "
        f"{_chance(chance.get('all'))} % on all families. **Paired**: median over the questions of the map's share "
        "on the objects only this question names, under it / under the pair's other question (1.00: the question "
        "changes nothing). Maps: token norms after the block at 3/4 of the depth in the first (BU) and second (TD) "
        "pass; fusion: how much the top-down pass changed each token the fusion reads (the map "
        "`topdown_object_loss` trains where `model.topdown_object_weight` > 0); gate: the prior gate "
        "`clamp(cos(ξ, z_i), 0, 1)`, the map the prior alignment and the object-level prior term train. A trained "
        "map scored on held-out images and questions shows that its term generalises, not that the steering came "
        "for free. “—”: the variant has no such map (no top-down pass: its one map is the bottom-up one; no prior "
        "gate)."
        + (
            f" Other block: BU / TD pointing with the maps after block {extra} (Python index)."
            if extra is not None
            else ""
        ),
        "",
        "| Variant | Backbone (+ backbone_kwargs, overrides) | Prior | Test-dev acc. | Pointing BU % | Pointing TD % "
        "| Pointing fusion % | Paired TD | Paired fusion | Gate pointing % | "
        + ("Other block BU / TD % | " if extra is not None else "")
        + "Mean prior gate | ‖z_td−z_bu‖/‖z_bu‖ | Acc. per seed | Train s/run |",
        "| --- " * (14 + (extra is not None)) + "|",
    ]
    for r in rows:
        p, q = r["pointing"], r["paired"]
        other = r.get("other_pointing")
        other_cell = "—" if other is None else f"{_pct(other['bottom_up'])} / {_pct(other['top_down'])}"
        lines.append(
            f"| {r['label']} | `{r['backbone']}` | {'yes' if r['variant'] in prior_variants else 'no'} | "
            f"{_fmt(r['accuracy'])} | {_pct(p['bottom_up'])} | {_pct(p['top_down'])} | {_pct(p['fusion'])} | "
            f"{_fmt(q['top_down'])} | {_fmt(q['fusion'])} | {_pct(p['gate'])} | "
            + (f"{other_cell} | " if extra is not None else "")
            + f"{_fmt(r['prior_mask_mean'], 4)} | {_fmt(r['topdown_change'], 3)} | "
            f"{', '.join(f'{a:.2f}' for a in r['accuracies'])} | {_seconds(r)} |"
        )
    lines += [
        "",
        "Pointing per question family, %: the top-down map, in brackets the bottom-up map.",
        "",
        "| Variant | " + " | ".join(families) + " | all |",
        "| --- " * (len(families) + 2) + "|",
    ]
    for r in rows:
        cells = [
            f"{_pct(r['family_pointing'][f]['top_down'])} ({_pct(r['family_pointing'][f]['bottom_up'])})"
            for f in (*families, "all")
        ]
        lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
    if rows:
        lines.append("| chance | " + " | ".join(_chance(chance.get(f)) for f in (*families, "all")) + " |")
    lines += [
        "",
        f"Time: {meta['run_minutes']:.1f} min of training + evaluation summed over the {sum(len(r['seeds']) for r in rows)} "
        f"runs (of which {meta.get('prior_minutes', 0.0):.1f} min prior alignment); this invocation "
        f"{meta['wall_minutes']:.1f} min ({meta['runs_done']} runs trained, {meta['runs_skipped']} reused from earlier "
        f"invocations); {meta['machine']}.",
        "",
        f"Command: `{meta['command']}`",
        "",
        "Reading it: a variant steers where its top-down (or fusion) pointing is above its bottom-up pointing and its "
        "paired ratio above 1.00. Where the mean prior gate is ~0 the gate is shut: the top-down pass adds nothing "
        "(‖z_td−z_bu‖ ≈ 0), the top-down maps equal the bottom-up ones and the model is its bottom-up network. "
        "Feedback has a second pass but no prior: its maps do not depend on the question (paired 1.00). Per-run "
        "records, with the prior alignment's validation (its gate's pointing on val): `results.json`.",
        "",
        "Files: `results.json` (every run), `comparison.png` (accuracy and all-families pointing, bottom-up vs "
        "top-down), `attention.png` (the most accurate AbSViT run with an active top-down pass: image, bottom-up map, "
        "top-down maps for a steering pair's two questions).",
        "",
    ]
    return "\n".join(lines)


def _chance(ms: tuple[float, float] | None) -> str:
    """Chance is the pairs' and the grid's, the same for every run: its mean alone."""
    return "n/a" if ms is None or math.isnan(ms[0]) else f"{ms[0]:.0f}"


# --------------------------------------------------------------------------- pictures
def _bar_panel(
    draw: Any,
    box: tuple[int, int, int, int],
    title: str,
    labels: list[str],
    series: list[dict[str, Any]],
    ref: float | None,
    ref_label: str,
) -> None:
    """Grouped bars with std whiskers inside ``box`` (PIL only: no plotting dependency)."""
    x0, y0, x1, y1 = box
    draw.text((x0 + 4, y0), title, fill="black")
    top, bottom, left = y0 + 34, y1 - 60, x0 + 44
    values = [
        m + (s if not math.isnan(s) else 0)
        for ser in series
        for (m, s) in ser["values"]
        if m is not None and not math.isnan(m)
    ]
    vmax = max(values + ([ref] if ref is not None else []) + [1e-6]) * 1.1
    scale = lambda v: bottom - (bottom - top) * (v / vmax)  # noqa: E731
    draw.line((left, top, left, bottom), fill="black")
    draw.line((left, bottom, x1 - 6, bottom), fill="black")
    for k in range(5):  # y ticks
        v = vmax * k / 4
        y = scale(v)
        draw.line((left - 4, y, left, y), fill="black")
        draw.text((x0 + 2, y - 6), f"{v:.2f}" if vmax < 10 else f"{v:.0f}", fill="black")
    group_w = (x1 - 6 - left) / max(len(labels), 1)
    bar_w = group_w * 0.8 / len(series)
    for i, label in enumerate(labels):
        gx = left + i * group_w + group_w * 0.1
        for j, ser in enumerate(series):
            m, s = ser["values"][i]
            if m is None or math.isnan(m):
                continue
            bx = gx + j * bar_w
            draw.rectangle((bx, scale(m), bx + bar_w - 2, bottom), fill=ser["color"])
            if s and not math.isnan(s):
                cx = bx + bar_w / 2 - 1
                draw.line((cx, scale(m + s), cx, scale(max(m - s, 0))), fill="black")
                draw.line((cx - 3, scale(m + s), cx + 3, scale(m + s)), fill="black")
        words = label.split()
        draw.multiline_text((gx, bottom + 6), "\n".join([" ".join(words[:2]), " ".join(words[2:])]), fill="black")
    if ref is not None:
        y = scale(ref)
        for xx in range(int(left), int(x1 - 6), 8):
            draw.line((xx, y, xx + 4, y), fill=(200, 0, 0))
        draw.text((x1 - 170, y - 14), ref_label, fill=(200, 0, 0))
    lx = x1 - 170
    for j, ser in enumerate(series):  # legend
        draw.rectangle((lx, y0 + 2 + 14 * j, lx + 10, y0 + 12 + 14 * j), fill=ser["color"])
        draw.text((lx + 14, y0 + 14 * j), ser["name"], fill="black")


def plot(rows: list[dict[str, Any]], majority: float, path: Path) -> None:
    from PIL import Image, ImageDraw

    width = max(900, 110 * len(rows) + 80)
    canvas = Image.new("RGB", (width, 760), "white")
    draw = ImageDraw.Draw(canvas)
    labels = [r["label"] for r in rows]
    _bar_panel(
        draw,
        (10, 10, width - 10, 370),
        "Shapes test-dev VQA accuracy (mean ± std over seeds)",
        labels,
        [{"name": "accuracy", "color": (70, 110, 200), "values": [r["accuracy"] for r in rows]}],
        majority,
        f"majority baseline {majority:.1f}",
    )
    nan = (float("nan"), float("nan"))
    chance = rows[0]["chance"]["all"][0] if rows else float("nan")
    _bar_panel(
        draw,
        (10, 390, width - 10, 750),
        "Steering: pointing on all families, % (mean ± std over seeds)",
        labels,
        [
            {"name": "bottom-up map", "color": (150, 150, 150), "values": [r["pointing"]["bottom_up"] for r in rows]},
            {
                "name": "top-down map",
                "color": (230, 130, 30),
                "values": [r["pointing"]["top_down"] or nan for r in rows],
            },
        ],
        None if math.isnan(chance) else chance,
        f"chance {chance:.0f} %",
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
