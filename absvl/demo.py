"""``absvl demo`` / ``make demo``: the VQA and retrieval stories offline on a CPU in minutes.

1. generate the Shapes world (cached in ``data/shapes``): images, VQAv2-format questions,
   captions and a tiny RoBERTa + tokenizer built locally;
2. train a tiny AbSViT-VL on it (``configs/shapes_absvit_tiny.yaml``, the real trainer);
3. score test-dev with the official VQA accuracy next to the majority-answer baseline;
4. measure where the backbone looks: the share of the token-norm map on the question's
   target objects over their area share (1.0 = no preference), bottom-up vs top-down;
5. write a PNG: one image, its bottom-up map, and the top-down maps for two questions
   about different objects;
6. retrieval: finetune the VQA model on the world's captions (``configs/shapes_retrieval.yaml``:
   prior loss + ITM on hard negatives), report test IR/TR@k (contrastive, then re-ranked by ITM
   with the caption steering the encoder), index the test images with FAISS and run a query.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .data.shapes import ShapesWorld
from .metrics.attention import attention_scores
from .metrics.vqa import evaluate_vqa, format_accuracy_table, majority_answer_baseline
from .models.vl import AbsVLModel
from .metrics.retrieval import format_recall_table
from .retrieval import Retriever, build_index
from .training.config import RetrievalConfig, load_config
from .training.retrieval import evaluate_model as evaluate_retrieval_model
from .training.retrieval import train_retrieval
from .training.vqa import predict_split, train_vqa
from .visualize import attention_figure

DEFAULT_CONFIG = "configs/shapes_absvit_tiny.yaml"
RETRIEVAL_CONFIG = "configs/shapes_retrieval.yaml"
RETRIEVAL_EPOCHS = 2


def two_questions(world: ShapesWorld, split: str) -> tuple[Path, list[str]]:
    """A ``split`` image with 3+ objects, two of unique shapes, and a colour question about each
    (in tiny worlds without one: the first image and its first two objects)."""
    scenes = sorted(world.load_scenes().items())
    for image_id, scene in scenes:
        if scene["split"] != split:
            continue
        shapes = [o["shape"] for o in scene["objects"]]
        unique = [o for o in scene["objects"] if shapes.count(o["shape"]) == 1]
        if len(unique) >= 2 and len(scene["objects"]) >= 3:
            a, b = unique[:2]
            return world.image_path(split, image_id), [f"what color is the {a['shape']}?", f"what color is the {b['shape']}?"]
    for image_id, scene in scenes:
        if scene["split"] == split:
            return world.image_path(split, image_id), [f"what color is the {o['shape']}?" for o in scene["objects"][:2]]
    raise RuntimeError(f"the Shapes world has no {split} image")


def retrieval_stage(vqa_export: str, overrides: list[str] | tuple[str, ...], out_dir: Path) -> dict[str, Any]:
    """Finetune the VQA model for retrieval, evaluate on the test captions, index the test images, search."""
    config = load_config(RETRIEVAL_CONFIG, [f"train.init_from={vqa_export}", f"train.epochs={RETRIEVAL_EPOCHS}",
                                            *overrides], RetrievalConfig)
    export = train_retrieval(config)["export"]
    d = config.data
    images_root = Path(d.images) if d.images else Path(d.captions).parent
    result = evaluate_retrieval_model(export, d.captions, "test", images_root, rerank_k=config.train.rerank_k,
                                      num_workers=d.num_workers)
    print(f"\n== Shapes test retrieval ({result['images']} images, {result['captions']} captions) ==")
    print(format_recall_table({"contrastive": result["contrastive"],
                               f"re-ranked top-{config.train.rerank_k} (ITM, top-down)": result["reranked"]}))
    report = build_index(AbsVLModel.from_pretrained(export), images_root / "test2015", out_dir / "index",
                         overwrite=True, model_source=export, progress=False)
    print(f"indexed {report.num_indexed} test images with FAISS ({report.factory}) in {out_dir / 'index'}")
    retriever = Retriever(AbsVLModel.from_pretrained(export), report.out)
    query = "a red circle left of a blue square."
    hits = retriever.search(query, k=5, rerank=20)
    print(f"search {query!r} (top-20 re-ranked with the query steering the encoder):")
    for hit in hits:
        print(f"  {hit.rank}. {hit.path.name}  re-rank score {hit.rerank_score:.3f}  cosine {hit.score:.3f}")
    return {"export": export, "recall": {k: result[k] for k in ("contrastive", "reranked")},
            "index": str(report.out), "query": query, "hits": [str(h.path) for h in hits]}


def run(
    config_path: str | Path = DEFAULT_CONFIG,
    overrides: list[str] | tuple[str, ...] = (),
    out_dir: str | Path = "outputs/demo",
    retrieval_overrides: list[str] | tuple[str, ...] | None = (),
) -> dict[str, Any]:
    """The demo; ``retrieval_overrides=None`` skips the retrieval stage."""
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
    image_path, two = two_questions(world, split)
    png = out_dir / "attention.png"
    attention_figure(model, image_path, two, png)
    print(f"wrote {png}: {image_path.name}, bottom-up map, top-down maps for {two}")
    print(f"model saved with save_pretrained in {summary['export']}")
    report = {
        "accuracy": result["overall"], "per_answer_type": result["perAnswerType"],
        "majority_baseline": baseline["overall"], "attention": scores, "export": summary["export"], "png": str(png),
    }
    if retrieval_overrides is not None:
        report["retrieval"] = retrieval_stage(summary["export"], retrieval_overrides, out_dir)
    (out_dir / "demo.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
