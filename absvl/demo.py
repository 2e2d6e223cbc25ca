"""``absvl demo`` / ``make demo``: the whole VQA story offline on a CPU in minutes.

1. generate the Shapes world (cached in ``data/shapes``): images, VQAv2-format questions,
   captions and a tiny RoBERTa + tokenizer built locally;
2. train a tiny AbSViT-VL on it (``configs/shapes_absvit_tiny.yaml``, the real trainer);
3. score test-dev with the official VQA accuracy next to the majority-answer baseline;
4. measure where the backbone looks: the share of the token-norm map on the question's
   target objects over their area share (1.0 = no preference), bottom-up vs top-down;
5. write a PNG: one image, its bottom-up map, and the top-down maps for two questions
   about different objects.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from .data.shapes import ShapesWorld, target_mask
from .metrics.attention import target_attention_ratio
from .metrics.vqa import evaluate_vqa, format_accuracy_table, majority_answer_baseline
from .models.vl import AbsVLModel
from .training.config import load_config
from .training.vqa import predict_split, train_vqa

DEFAULT_CONFIG = "configs/shapes_absvit_tiny.yaml"


def _heat(values: np.ndarray, size: int) -> Image.Image:
    v = (values - values.min()) / (values.max() - values.min() + 1e-8)
    gray = Image.fromarray((v * 255).astype(np.uint8)).resize((size, size), Image.Resampling.BILINEAR)
    g = np.asarray(gray, dtype=np.float32) / 255
    return Image.fromarray((np.stack([g, g * 0.6, 1 - g], -1) * 255).astype(np.uint8))


def _overlay(image: Image.Image, values: np.ndarray) -> Image.Image:
    return Image.blend(image, _heat(values, image.size[0]), 0.55)


def attention_figure(
    model: AbsVLModel, image_path: Path, questions: list[str], out_png: Path, size: int = 224
) -> dict[str, np.ndarray]:
    """PNG of the image, its bottom-up map, and one top-down map per question (paper Fig. 4/6 style)."""
    image = Image.open(image_path).convert("RGB")
    processor = model.processor
    inputs = processor(images=[image] * len(questions), text=questions)
    with torch.no_grad():
        maps = model.attention_maps(inputs["images"], inputs["input_ids"], inputs["attention_mask"])
        logits = model(inputs["images"], inputs["input_ids"], inputs["attention_mask"]).vqa_logits
    answers = [model.answers[i] for i in logits.argmax(-1).tolist()]
    big = image.resize((size, size), Image.Resampling.NEAREST)
    panels = [(big, "image"), (_overlay(big, maps["bottom_up"][0].numpy()), "bottom-up")]
    for i, (question, answer) in enumerate(zip(questions, answers)):
        panels.append((_overlay(big, maps["top_down"][i].numpy()), f"{question} -> {answer}"))
    label_h = 34
    canvas = Image.new("RGB", (size * len(panels), size + label_h), "white")
    draw = ImageDraw.Draw(canvas)
    for k, (panel, label) in enumerate(panels):
        canvas.paste(panel, (k * size, label_h))
        words, line = label.split(), ""
        lines = []
        for word in words:  # wrap to the panel width
            if len(line) + len(word) > 34:
                lines.append(line)
                line = ""
            line = f"{line} {word}".strip()
        lines.append(line)
        draw.multiline_text((k * size + 4, 2), "\n".join(lines[:2]), fill="black")
    out_png.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out_png)
    return {"bottom_up": maps["bottom_up"][0].numpy(), **{q: maps["top_down"][i].numpy() for i, q in enumerate(questions)}}


def _two_questions(world: ShapesWorld, split: str) -> tuple[Path, list[str]]:
    """A test image with two objects of unique shapes, and a colour question about each."""
    scenes = world.load_scenes()
    for image_id, scene in sorted(scenes.items()):
        if scene["split"] != split:
            continue
        shapes = [o["shape"] for o in scene["objects"]]
        unique = [o for o in scene["objects"] if shapes.count(o["shape"]) == 1]
        if len(unique) >= 2 and len(scene["objects"]) >= 3:
            a, b = unique[:2]
            return world.image_path(split, image_id), [f"what color is the {a['shape']}?", f"what color is the {b['shape']}?"]
    raise RuntimeError(f"no {split} image of the Shapes world has two objects of unique shapes")


def attention_scores(model: AbsVLModel, world: ShapesWorld, split: str, limit: int = 200) -> dict[str, float]:
    """Mean target-attention ratio (bottom-up, top-down) over questions that have target objects."""
    questions = json.loads(world.questions_path(split).read_text())["questions"]
    questions = [q for q in questions if q.get("target_objects")][:limit]
    ratios: dict[str, list[float]] = {"bottom_up": [], "top_down": []}
    processor = model.processor
    for start in range(0, len(questions), 32):
        chunk = questions[start : start + 32]
        images = [Image.open(world.image_path(split, q["image_id"])).convert("RGB") for q in chunk]
        inputs = processor(images=images, text=[q["question"] for q in chunk])
        with torch.no_grad():
            maps = model.attention_maps(inputs["images"], inputs["input_ids"], inputs["attention_mask"])
        for i, q in enumerate(chunk):
            mask = target_mask(world, q)
            for kind in ratios:
                ratios[kind].append(target_attention_ratio(maps[kind][i].numpy(), mask))
    return {kind: float(np.mean(v)) for kind, v in ratios.items()}


def run(config_path: str | Path = DEFAULT_CONFIG, overrides: list[str] | tuple[str, ...] = (), out_dir: str | Path = "outputs/demo") -> dict[str, Any]:
    config = load_config(config_path, overrides)
    out_dir = Path(out_dir)
    summary = train_vqa(config)
    model = AbsVLModel.from_pretrained(summary["export"])
    world = ShapesWorld.load(config.data.root)

    split = "test-dev2015"
    predictions = predict_split(model, config, "test-dev")
    questions = json.loads(world.questions_path(split).read_text())
    private = json.loads((world.root / "shapes_test-dev2015_annotations.json").read_text())
    result = evaluate_vqa(predictions, questions, private)
    train_annotations = json.loads(world.annotations_path("train2014").read_text())
    baseline = majority_answer_baseline(train_annotations, private)

    print("\n== Shapes test-dev, official VQA accuracy ==")
    print(format_accuracy_table(result))
    print(f"\nmajority-answer baseline ({baseline['answer']!r} for every question): {baseline['overall']:.2f}")
    print(f"AbSViT-VL: {result['overall']:.2f}  ({result['overall'] - baseline['overall']:+.2f} over the baseline)")

    scores = attention_scores(model, world, split)
    print(
        "target attention (map mass on the question's objects / their area share; 1.0 = no preference): "
        f"bottom-up {scores['bottom_up']:.2f}, top-down {scores['top_down']:.2f}"
    )
    image_path, two = _two_questions(world, split)
    png = out_dir / "attention.png"
    attention_figure(model, image_path, two, png)
    print(f"wrote {png}: {image_path.name}, bottom-up map, top-down maps for {two}")
    print(f"model saved with save_pretrained in {summary['export']}")
    report = {
        "accuracy": result["overall"], "per_answer_type": result["perAnswerType"],
        "majority_baseline": baseline["overall"], "attention": scores, "export": summary["export"], "png": str(png),
    }
    (out_dir / "demo.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
