"""The results of ``scripts/compare_topdown.py``: the runs summed up per variant, the Markdown table
(``results.md``) and the comparison figure (``comparison.png``).

``aggregate`` turns the run records into one row per variant (mean ± std over seeds), ``markdown``
writes the table with its reading notes, ``plot`` draws the accuracy and attention-score bars (PIL only).
"""

from __future__ import annotations

import math
from collections.abc import Collection
from pathlib import Path
from typing import Any

import numpy as np


# --------------------------------------------------------------------------- aggregation
def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return float("nan"), float("nan")
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def aggregate(
    runs: list[dict[str, Any]], variants: list[Any], topdown_variants: Collection[str]
) -> list[dict[str, Any]]:
    """One row per variant (``compare_topdown.Variant``, in the given order) with runs: mean ± std over
    its seeds; the token change ``topdown_change`` is kept only for the ``topdown_variants``."""
    rows = []
    for v in variants:
        mine = sorted((r for r in runs if r["variant"] == v.name), key=lambda r: r["seed"])
        if not mine:
            continue
        row = {"variant": v.name, "label": v.label, "backbone": v.describe(), "seeds": [r["seed"] for r in mine]}
        row["accuracy"] = _mean_std([r["accuracy"] for r in mine])
        row["accuracies"] = [r["accuracy"] for r in mine]
        row["bottom_up"] = _mean_std([r["attention"]["bottom_up"] for r in mine])
        td = [r["attention"]["top_down"] for r in mine]
        row["top_down"] = _mean_std(td) if all(t is not None for t in td) else None
        row["td_minus_bu"] = (
            _mean_std([r["attention"]["top_down"] - r["attention"]["bottom_up"] for r in mine])
            if row["top_down"]
            else None
        )
        pm = [r.get("prior_mask_score") for r in mine]
        other = [r.get("attention_other_block") for r in mine]
        row["other_td_minus_bu"] = (
            _mean_std([x["top_down"] - x["bottom_up"] for x in other])
            if all(x is not None and x.get("top_down") is not None for x in other)
            else None
        )
        row["other_bottom_up"] = (
            _mean_std([x["bottom_up"] for x in other]) if all(x is not None for x in other) else None
        )
        row["other_top_down"] = (
            _mean_std([x["top_down"] for x in other])
            if all(x is not None and x.get("top_down") is not None for x in other)
            else None
        )
        row["prior_mask"] = _mean_std(pm) if all(p is not None for p in pm) else None
        mm = [r.get("prior_mask_mean") for r in mine]
        row["prior_mask_mean"] = _mean_std(mm) if all(m is not None for m in mm) else None
        row["topdown_change"] = _mean_std([r["topdown_change"] for r in mine]) if v.name in topdown_variants else None
        row["train_seconds"] = float(np.mean([r["train_seconds"] for r in mine]))
        rows.append(row)
    return rows


def _fmt(ms: tuple[float, float] | None, digits: int = 2, signed: bool = False) -> str:
    if ms is None:
        return "—"
    mean, std = ms
    if math.isnan(mean):
        return "n/a"
    sign = "+" if signed else ""
    return f"{mean:{sign}.{digits}f} ± {std:.{digits}f}"


def _other_block(row: dict[str, Any]) -> str:
    if row.get("other_bottom_up") is None:
        return "—"
    return f"{_fmt(row['other_bottom_up'])} / {_fmt(row['other_top_down'])}"


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        "# Top-down variants on the Shapes world VQA",
        "",
        f"Budget per run: {meta['steps']} optimizer steps × batch {meta['batch_size']} "
        f"({meta['steps'] * meta['batch_size']:,} training questions seen, same order for every variant of a seed), "
        f"seeds {meta['seeds']}; base recipe `{meta['config']}`"
        + (f" with {', '.join('`' + s + '`' for s in meta['set'])}" if meta["set"] else "")
        + f". Test-dev: {meta['test_questions']:,} questions, official VQA accuracy (mean ± std over seeds); "
        f"majority-answer baseline {meta['majority']:.2f}.",
        "",
        "Attention score = share of the token-norm map's mass on the question's target object(s) / their area share "
        f"(1.0 = no preference), mean over the first {meta['attention_questions']} test-dev questions with targets; "
        "maps are per-token norms after the block at 3/4 of the depth (where the authors' L−3 of 12 blocks lies) "
        "of the first (bottom-up) and second (top-down) pass. "
        f"“other block”: the same maps after block {meta.get('extra_map_block')} (Python index; 0 is the literal "
        "L−3 of the 4-block model, its first block). "
        "“—”: the variant has no top-down pass (its one map is the bottom-up one) or no prior.",
        "",
        "| Variant | Backbone (+ backbone_kwargs) | Test-dev acc. | Bottom-up score | Top-down score | TD − BU | "
        "BU / TD score, other block | Prior-mask score | Mean prior mask | ‖z_td−z_bu‖/‖z_bu‖ | Acc. per seed | Train s/run |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['label']} | `{r['backbone']}` | {_fmt(r['accuracy'])} | {_fmt(r['bottom_up'])} | {_fmt(r['top_down'])} | "
            f"{_fmt(r['td_minus_bu'], signed=True)} | {_other_block(r)} | {_fmt(r['prior_mask'])} | {_fmt(r['prior_mask_mean'], 4)} | {_fmt(r['topdown_change'], 3)} | "
            f"{', '.join(f'{a:.2f}' for a in r['accuracies'])} | {r['train_seconds']:.0f} |"
        )
    lines += [
        "",
        f"Time: {meta['run_minutes']:.1f} min of training + evaluation summed over the {len(meta['seeds']) * len(rows)} runs; "
        f"this invocation {meta['wall_minutes']:.1f} min ({meta['runs_done']} runs trained, {meta['runs_skipped']} reused "
        f"from earlier invocations); {meta['machine']}.",
        "",
        f"Command: `{meta['command']}`",
        "",
        "Reading it: the prior mask is AbSViT's gate `clamp(cos(ξ, z_i), 0, 1)`; where its mean is ~0 the gate is "
        "shut, the top-down pass adds nothing (‖z_td−z_bu‖ ≈ 0), the top-down maps equal the bottom-up ones and "
        "the model is its bottom-up network (a gate shut from the start makes AbSViT and AbSViT-QKV train identically) (see the per-run records in `results.json`: "
        "`prior_mask_mean`, `topdown_change`). An all-zero map (PerceiverIO with a shut gate) scores 1.0.",
        "",
        "Files: `results.json` (every run), `comparison.png` (accuracy ± std and bottom-up vs top-down scores), "
        "`attention.png` (the most accurate AbSViT run with an active top-down pass: image, bottom-up map, "
        "top-down maps for two questions).",
        "",
    ]
    return "\n".join(lines)


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
    _bar_panel(
        draw,
        (10, 390, width - 10, 750),
        "Target-attention score (1.0 = no preference)",
        labels,
        [
            {"name": "bottom-up map", "color": (150, 150, 150), "values": [r["bottom_up"] for r in rows]},
            {"name": "top-down map", "color": (230, 130, 30), "values": [r["top_down"] or nan for r in rows]},
            {"name": "prior mask", "color": (90, 170, 90), "values": [r["prior_mask"] or nan for r in rows]},
        ],
        1.0,
        "1.0 = no preference",
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
