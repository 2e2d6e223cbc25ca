"""``absvl demo`` / ``make demo``: the VQA and retrieval stories offline on a CPU in minutes.

1. generate the Shapes world (cached in ``data/shapes``): images, VQAv2-format questions,
   captions, per-patch labels and a tiny RoBERTa + tokenizer built and MLM-pretrained locally;
2. stage 1, the paper's ImageNet stage: pretrain the AbSViT backbone (``configs/shapes_pretrain.yaml``,
   ``absvl train classify`` on the patch labels, learned ξ); cached while its config is unchanged;
3. stage 2: finetune a tiny AbSViT-VL from it for VQA (``configs/shapes_absvit_tiny.yaml``, the real
   trainer), the question's ξ steering the second pass;
4. score test-dev with the official VQA accuracy next to the majority-answer baseline;
5. measure where the backbone looks: the share of the token-norm map on the question's
   target objects over their area share (1.0 = no preference), bottom-up vs top-down;
6. write a PNG: one image, its bottom-up map, and the top-down maps for two questions
   about different objects, with each map's score on its object and the maps' distances;
7. retrieval: finetune the VQA model on the world's captions (``configs/shapes_retrieval.yaml``:
   prior loss + ITM on hard negatives), report test IR/TR@k (contrastive, then re-ranked by ITM
   with the caption steering the encoder), index the test images with FAISS and run a query.
Everything lands in ``OUT/demo.json``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .data.shapes import ensure_shapes
from .data.shapes_world import PATCH_LABELS_DIR, ShapesWorld, target_mask
from .io import atomic_file, read_json, write_json
from .metrics.attention import attention_scores, target_attention_ratio
from .metrics.retrieval import format_recall_table
from .metrics.vqa import evaluate_vqa, format_accuracy_table, majority_answer_baseline
from .models.vl import AbsVLModel
from .retrieval import Retriever, build_index
from .training.classify import train_classifier
from .training.config import ClassifyConfig, RetrievalConfig, dump_config, load_config
from .training.retrieval import evaluate_model as evaluate_retrieval_model
from .training.retrieval import train_retrieval
from .training.vqa import predict_split, train_vqa
from .visualize import attention_figure

DEFAULT_CONFIG = "configs/shapes_absvit_tiny.yaml"
PRETRAIN_CONFIG = "configs/shapes_pretrain.yaml"
EXAMPLES = 3  # images in the attention picture
RETRIEVAL_CONFIG = "configs/shapes_retrieval.yaml"
RETRIEVAL_EPOCHS = 2


def question_pairs(world: ShapesWorld, split: str, count: int = 1) -> list[tuple[Path, list[tuple[str, int]]]]:
    """The first ``count`` ``split`` images with 3+ objects, two of unique colours, each with a shape
    question naming one of those two by its colour ("what shape is the red object?") and its object
    index (in tiny worlds without one: the first image and its first two objects).

    The questions name the object by colour because that is what the embedded default's prior can
    steer by: questions that name only a shape ("what color is the triangle?") get one and the same ξ
    from the tiny text encoder, and the gate stays shut for them (the demo's per-type table shows it).
    """

    def ask(objects: list[dict]) -> list[tuple[str, int]]:
        return [(f"what shape is the {o['color']} object?", o["index"]) for o in objects]

    pairs = []
    scenes = sorted(world.load_scenes().items())
    for image_id, scene in scenes:
        colors = [o["color"] for o in scene["objects"]]
        unique = [o for o in scene["objects"] if colors.count(o["color"]) == 1]
        if scene["split"] == split and len(unique) >= 2 and len(scene["objects"]) >= 3:
            pairs.append((world.image_path(split, image_id), ask(unique[:2])))
            if len(pairs) == count:
                return pairs
    if pairs:
        return pairs
    for image_id, scene in scenes:
        if scene["split"] == split:
            return [(world.image_path(split, image_id), ask(scene["objects"][:2]))]
    raise RuntimeError(f"the Shapes world has no {split} image")


def retrieval_stage(vqa_export: str, overrides: list[str] | tuple[str, ...], out_dir: Path) -> dict[str, Any]:
    """Finetune the VQA model for retrieval, evaluate on the test captions, index the test images, search."""
    config = load_config(
        RETRIEVAL_CONFIG,
        [f"train.init_from={vqa_export}", f"train.epochs={RETRIEVAL_EPOCHS}", *overrides],
        RetrievalConfig,
    )
    export = train_retrieval(config, notify=print)["export"]
    d = config.data
    images_root = Path(d.images) if d.images else Path(d.captions).parent
    result = evaluate_retrieval_model(
        export, d.captions, "test", images_root, rerank_k=config.train.rerank_k, num_workers=d.num_workers
    )
    print(f"\n== Shapes test retrieval ({result['images']} images, {result['captions']} captions) ==")
    print(
        format_recall_table(
            {
                "contrastive": result["contrastive"],
                f"re-ranked top-{config.train.rerank_k} (ITM, top-down)": result["reranked"],
            }
        )
    )
    report = build_index(
        AbsVLModel.from_pretrained(export),
        images_root / "test2015",
        out_dir / "index",
        overwrite=True,
        model_source=export,
        progress=False,
    )
    print(f"indexed {report.num_indexed} test images with FAISS ({report.factory}) in {out_dir / 'index'}")
    retriever = Retriever(AbsVLModel.from_pretrained(export), report.out)
    query = "a red circle left of a blue square."
    hits = retriever.search(query, k=5, rerank=20)
    print(f"search {query!r} (top-20 re-ranked with the query steering the encoder):")
    for hit in hits:
        print(f"  {hit.rank}. {hit.path.name}  re-rank score {hit.rerank_score:.3f}  cosine {hit.score:.3f}")
    return {
        "export": export,
        "recall": {k: result[k] for k in ("contrastive", "reranked")},
        "index": str(report.out),
        "query": query,
        "hits": [str(h.path) for h in hits],
    }


def pretrain_stage(vqa_config: Any, overrides: Sequence[str] = ()) -> str:
    """Stage 1, the paper's ImageNet stage: the vision encoder classifies every patch of the world's
    training images (``configs/shapes_pretrain.yaml``). Reused while its config is unchanged (its run
    folder's ``config.yaml`` equals this one and the export exists); returns the export folder."""
    if vqa_config.data.shapes:
        ensure_shapes(vqa_config.data.root, **vqa_config.data.shapes)
    config = load_config(
        PRETRAIN_CONFIG, [f"data.root={Path(vqa_config.data.root) / PATCH_LABELS_DIR}", *overrides], ClassifyConfig
    )
    out = Path(config.train.output_dir)
    export = out / "final"
    saved = out / "config.yaml"
    unchanged = saved.is_file() and saved.read_text(encoding="utf-8") == dump_config(config)
    if (export / "model.safetensors").is_file() and unchanged:
        print(f"stage 1 (vision pretraining): reusing {export} (delete it to pretrain again)")
        return str(export)
    print("stage 1 (vision pretraining): every patch of the Shapes training images classified, AbSViT's learned prior")
    summary = train_classifier(config, notify=print)
    if summary["val"]:
        print(f"patch classification, val top-1 {summary['val']['top1']:.2f} %")
    return summary["export"]


def map_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Total-variation distance of two non-negative maps as mass distributions (0: the same, 1: disjoint)."""
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    return float(0.5 * np.abs(a / max(a.sum(), 1e-12) - b / max(b.sum(), 1e-12)).sum())


def example_maps(
    model: AbsVLModel, world: ShapesWorld, split: str, png: Path, count: int = EXAMPLES
) -> list[dict[str, Any]]:
    """The picture, one row per image (the first ``count`` test images with two objects of unique
    colours, ``question_pairs``): the image, its bottom-up map and the top-down maps of a question
    about each of the two objects; and what it shows in numbers: each top-down map's target attention on its own
    question's object and on the other one, and the distances between the maps."""
    rows, reports = [], []
    for image_path, asked in question_pairs(world, split, count):
        figure, maps = attention_figure(model, image_path, [q for q, _ in asked])
        rows.append(figure)
        image_id = int(image_path.stem.rsplit("_", 1)[-1])
        masks = [target_mask(world, {"image_id": image_id, "target_objects": [i]}) for _, i in asked]
        bottom_up, top_down = maps["bottom_up"], maps["top_down"]
        report = {
            "image": image_path.name,
            "questions": [q for q, _ in asked],
            "answers": maps["answers"],
            "bottom_up_on_object": [target_attention_ratio(bottom_up, m) for m in masks],
            "top_down_on_own_object": [target_attention_ratio(t, m) for t, m in zip(top_down, masks)],
            "top_down_on_other_object": [target_attention_ratio(t, m) for t, m in zip(top_down, masks[::-1])],
            "distance_between_top_down": map_distance(*top_down),
            "distance_to_bottom_up": [map_distance(t, bottom_up) for t in top_down],
        }
        reports.append(report)
        print(f"  {image_path.name}: distance between the two top-down maps {report['distance_between_top_down']:.3f}")
        for k, question in enumerate(report["questions"]):
            answer = f" -> {report['answers'][k]}" if report["answers"] else ""
            print(
                f"    {question!r}{answer}: top-down map on its object {report['top_down_on_own_object'][k]:.2f}, "
                f"on the other one {report['top_down_on_other_object'][k]:.2f} (bottom-up "
                f"{report['bottom_up_on_object'][k]:.2f}); distance to the bottom-up map {report['distance_to_bottom_up'][k]:.3f}"
            )
    picture = Image.new("RGB", (max(r.width for r in rows), sum(r.height for r in rows)), "white")
    for k, row in enumerate(rows):
        picture.paste(row, (0, sum(r.height for r in rows[:k])))
    png.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(png) as tmp:
        picture.save(tmp)
    print(
        f"wrote {png}: per row an image, its bottom-up map and the top-down maps of two questions "
        "(distances: total variation of the maps as distributions, 0 = the same map, 1 = disjoint)"
    )
    return reports


def format_attention_table(scores: dict[str, Any]) -> str:
    """The overall and per-question-type target-attention scores of ``attention_scores`` as a table."""
    rows = [("all", scores), *scores["per_question_type"].items()]
    lines = [f"{'question type':<20} {'questions':>9} {'bottom-up':>16} {'top-down':>16}"]
    for name, s in rows:
        count = s.get("questions", sum(t["questions"] for t in scores["per_question_type"].values()))
        cells = [f"{s[k]:.2f} ({s[k + '_others']:.2f})" for k in ("bottom_up", "top_down")]
        lines.append(f"{name:<20} {count:>9} {cells[0]:>16} {cells[1]:>16}")
    return "\n".join(lines)


def run(
    config_path: str | Path = DEFAULT_CONFIG,
    overrides: list[str] | tuple[str, ...] = (),
    out_dir: str | Path = "outputs/demo",
    retrieval_overrides: list[str] | tuple[str, ...] | None = (),
    pretrain_overrides: list[str] | tuple[str, ...] = (),
) -> dict[str, Any]:
    """The demo; ``retrieval_overrides=None`` skips the retrieval stage."""
    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = load_config(config_path, overrides)
    backbone = pretrain_stage(config, pretrain_overrides)
    config = load_config(config_path, [*overrides, f"model.backbone_kwargs.pretrained_path={backbone}"])
    pretrained_s = time.perf_counter() - started
    print("stage 2 (VQA finetuning): the question's ξ steers the pretrained backbone's second pass")
    summary = train_vqa(config, notify=print)
    model = AbsVLModel.from_pretrained(summary["export"])
    world = ShapesWorld.load(config.data.root)

    split = "test-dev2015"
    predictions = predict_split(model, config, "test-dev")
    questions = read_json(world.questions_path(split))
    private = read_json(world.root / "shapes_test-dev2015_annotations.json")
    result = evaluate_vqa(predictions, questions, private)
    train_annotations = read_json(world.annotations_path("train2014"))
    baseline = majority_answer_baseline(train_annotations, private)

    print("\n== Shapes test-dev, official VQA accuracy ==")
    print(format_accuracy_table(result))
    print(f"\nmajority-answer baseline ({baseline['answer']!r} for every question): {baseline['overall']:.2f}")
    print(f"AbSViT-VL: {result['overall']:.2f}  ({result['overall'] - baseline['overall']:+.2f} over the baseline)")

    question_types = {a["question_id"]: a["question_type"] for a in private["annotations"]}
    scores = attention_scores(model, world, split, limit=None, question_types=question_types)
    ratio = scores["top_down"] / scores["bottom_up"]
    print(
        f"\n== target attention on Shapes test-dev ({sum(t['questions'] for t in scores['per_question_type'].values())} "
        "questions that name objects) ==\n"
        "map mass on the question's objects / their area share (1.0 = no preference); in brackets the same map on the\n"
        "image's other objects (a map that follows the question is higher on its targets than there)"
    )
    print(format_attention_table(scores))
    print(f"top-down / bottom-up on the targets: {ratio:.2f}x")
    examples = example_maps(model, world, split, out_dir / "attention.png")
    print(f"model saved with save_pretrained in {summary['export']}")
    report = {
        "accuracy": result["overall"],
        "per_answer_type": result["perAnswerType"],
        "per_question_type": result["perQuestionType"],
        "majority_baseline": baseline["overall"],
        "attention": scores,
        "attention_ratio": ratio,
        "examples": examples,
        "export": summary["export"],
        "pretrained_backbone": backbone,
        "png": str(out_dir / "attention.png"),
    }
    if retrieval_overrides is not None:
        report["retrieval"] = retrieval_stage(summary["export"], retrieval_overrides, out_dir)
        print(
            f"\nweb page (questions: the VQA model; search: the index's retrieval model): "
            f"absvl serve --model {summary['export']} --index {report['retrieval']['index']}"
        )
    report["minutes"] = {"pretraining (incl. world)": pretrained_s / 60, "total": (time.perf_counter() - started) / 60}
    write_json(out_dir / "demo.json", report)
    print(
        f"\ndemo took {report['minutes']['total']:.1f} min (world + stage 1: {pretrained_s / 60:.1f} min); "
        f"report in {out_dir / 'demo.json'}"
    )
    return report
