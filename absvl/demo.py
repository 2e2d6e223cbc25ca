"""``absvl demo`` / ``make demo``: the VQA and retrieval stories offline on a CPU in minutes.

1. generate the Shapes world (cached in ``data/shapes``): images, VQAv2-format questions, captions,
   per-patch labels and a tiny RoBERTa + tokenizer built and MLM-pretrained locally;
2. stage 1, the paper's ImageNet stage: the vision encoder classifies every patch of the world's training
   images (``configs/shapes_pretrain.yaml``, ``absvl train classify``); cached while its config is
   unchanged; its object-patch shape and colour accuracy on val are printed;
3. stage 2a, prior alignment (``configs/shapes_prior.yaml``, ``absvl train prior``): ξ learns to point at
   the objects a question names, the vision encoder frozen;
4. stage 2b: VQA finetuning from it (``configs/shapes_absvit_tiny.yaml``, the real trainer), the question's
   ξ steering the second pass;
5. score test-dev with the official VQA accuracy next to the question-only, image-only and majority-answer
   baselines (``absvl.metrics.baselines``), per question type and per family of the world's templates, and
   where the VQA head's object pointers land and what its count density counts (``absvl.metrics.pointers``);
6. what the tokens the fusion reads know (linear probes of shape, colour, position; bottom-up and
   top-down, ``absvl.metrics.probes``) and whether the question steers them (paired and pointing scores
   per question family, ``absvl.metrics.steering``);
7. write a PNG: per row an image, its bottom-up map, the top-down maps of a pair of questions about
   different objects and the gate each opens (the rule that picks them is printed);
8. retrieval: finetune the VQA model on the world's captions (``configs/shapes_retrieval.yaml``: prior loss
   + ITM on hard negatives), report test IR/TR@k (contrastive, then re-ranked by ITM with the caption
   steering the encoder), index the test images with FAISS and run a query.
Everything lands in ``OUT/demo.json``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .data.patch_labels import read_classes
from .data.shapes import ensure_shapes
from .data.shapes_text import caption_holds, question_templates
from .data.shapes_world import PATCH_LABELS_DIR, ShapesWorld
from .evaluation.retrieval import evaluate_retrieval_model
from .evaluation.vqa import predict_vqa_submission
from .io import atomic_file, read_json, write_json
from .metrics.baselines import image_only_answers, question_only_answers
from .metrics.pointers import count_hits, format_count_table, format_pointer_table, pointer_hits
from .metrics.probes import format_probe_table, object_patch_tokens, token_probes
from .metrics.retrieval import format_recall_table
from .metrics.scene_retrieval import format_scene_report
from .metrics.steering import FAMILIES, cell_cover, format_steering_table, mass_share, steering_pairs, steering_scores
from .metrics.vqa import accuracy_by_group, evaluate_vqa, format_accuracy_table, majority_answer_baseline
from .models.vl import AbsVLForQuestionAnswering, AbsVLForRetrieval, AbsVLModel
from .retrieval import Retriever, build_index
from .training.classify import train_classifier
from .training.config import ClassifyConfig, RetrievalConfig, RunConfig, dump_config, load_config
from .training.prior import train_prior
from .training.retrieval import train_retrieval
from .training.vqa import load_split, train_vqa
from .visualize import attention_figure

DEFAULT_CONFIG = "configs/shapes_absvit_tiny.yaml"
PRETRAIN_CONFIG = "configs/shapes_pretrain.yaml"
PRIOR_CONFIG = "configs/shapes_prior.yaml"
EXAMPLE_FAMILIES = ("color", "shape", "exist")  # the picture's rows: the first three families of the table
RETRIEVAL_CONFIG = "configs/shapes_retrieval.yaml"
RETRIEVAL_STEPS = 100  # of 32 images: a short finetune of the VQA model
RETRIEVAL_TEST_IMAGES = 200  # the first test images (with their 5 captions each) that recall is measured on
PROBE_IMAGES = 200  # probes: fitted on this many val images, scored on as many test-dev images
STEERING_IMAGES = 300  # test-dev images whose question pairs the steering scores use


def retrieval_stage(vqa_export: str, overrides: list[str] | tuple[str, ...], out_dir: Path) -> dict[str, Any]:
    """Finetune the VQA model for retrieval, evaluate on the test captions, index the test images, search."""
    config = load_config(
        RETRIEVAL_CONFIG,
        [f"train.init_from={vqa_export}", f"train.max_steps={RETRIEVAL_STEPS}", *overrides],
        RetrievalConfig,
    )
    export = train_retrieval(config, notify=print)["export"]
    d = config.data
    images_root = Path(d.images) if d.images else Path(d.captions).parent
    result = evaluate_retrieval_model(
        export,
        d.captions,
        "test",
        images_root,
        rerank_k=config.train.rerank_k,
        num_workers=d.num_workers,
        max_images=RETRIEVAL_TEST_IMAGES,
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
    print(format_scene_report(result["scene"]))
    model = AbsVLForRetrieval.from_pretrained(export)
    report = build_index(
        model,
        images_root / "test2015",
        out_dir / "index",
        overwrite=True,
        model_source=export,
        progress=False,
    )
    print(f"indexed {report.num_indexed} test images with FAISS ({report.factory}) in {out_dir / 'index'}")
    retriever = Retriever(model, report.out)
    query = "a red circle left of a blue square."
    hits = retriever.search(query, k=5, rerank=20)
    print(f"search {query!r} (top-20 re-ranked with the query steering the encoder), checked against each scene:")
    world = ShapesWorld.load(Path(d.captions).parent)
    scenes = world.scene_objects()
    checks = [caption_holds(query, scenes[hit.path.name], world.relation_margin) for hit in hits]
    for hit, (present, related) in zip(hits, checks):
        print(
            f"  {hit.rank}. {hit.path.name}  re-rank score {hit.rerank_score:.3f}  cosine {hit.score:.3f}  "
            f"objects {'present' if present else 'missing'}, relation {'right' if present and related else 'wrong'}"
        )
    return {
        "export": export,
        "recall": {k: result[k] for k in ("contrastive", "reranked")},
        "scene": result["scene"],
        "query_hits_right": {
            "objects present": sum(present for present, _ in checks),
            "relation right": sum(bool(present and related) for present, related in checks),
        },
        "index": str(report.out),
        "query": query,
        "hits": [str(h.path) for h in hits],
    }


def pretrain_stage(vqa_config: Any, overrides: Sequence[str] = ()) -> tuple[str, dict[str, float]]:
    """Stage 1, the paper's ImageNet stage: the vision encoder classifies every patch of the world's
    training images (``configs/shapes_pretrain.yaml``). Reused while its config is unchanged (its run
    folder's ``config.yaml`` equals this one and the export exists) and the world's patch classes are the ones it
    learned (a world of an older generator labels fewer). Returns the export folder and its validation metrics
    (``top1``, ``objects``, ``background``, ``shape``, ``color``, ``size`` in %)."""
    if vqa_config.data.shapes:
        print(f"the Shapes world in {vqa_config.data.root} ({vqa_config.data.shapes}; generated on first use)")
        ensure_shapes(vqa_config.data.root, **vqa_config.data.shapes)
    config = load_config(
        PRETRAIN_CONFIG, [f"data.root={Path(vqa_config.data.root) / PATCH_LABELS_DIR}", *overrides], ClassifyConfig
    )
    out = Path(config.train.output_dir)
    export = out / "final"
    saved = out / "config.yaml"
    unchanged = saved.is_file() and saved.read_text(encoding="utf-8") == dump_config(config)
    if (export / "model.safetensors").is_file() and unchanged:
        unchanged = read_json(export / "config.json").get("classes") == read_classes(config.data.root)
    if unchanged:
        print(f"stage 1 (vision pretraining): reusing {export} (delete it to pretrain again)")
    else:
        print("stage 1 (vision pretraining): every patch of the Shapes training images classified")
        train_classifier(config, notify=print)
    metrics = read_json(export / "config.json").get("metrics", {})
    if "shape" in metrics:
        print(
            f"stage 1 on val object patches: shape {metrics['shape']:.2f} %, colour {metrics['color']:.2f} %, "
            f"size {metrics.get('size', float('nan')):.2f} %, all three {metrics['objects']:.2f} % (background "
            f"patches {metrics['background']:.2f} %)"
        )
    return str(export), metrics


def prior_stage(vqa_config: RunConfig, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Stage 2a, prior alignment (``configs/shapes_prior.yaml``'s losses and schedule) of the model that
    stage 2b finetunes: ``vqa_config``'s model (architecture) and data. Returns the run's summary."""
    config = load_config(PRIOR_CONFIG, overrides)
    config = replace(config, model=vqa_config.model.with_loss_weights(config.model), data=vqa_config.data)
    print("stage 2a (prior alignment): ξ learns to point at the objects a question names, the vision encoder frozen")
    summary = train_prior(config, notify=print)
    if summary["val"] and "gate_pointing" in summary["val"]:
        print(
            f"prior alignment on val: the gate peaks on the question's object for {summary['val']['gate_pointing']:.1f} %"
        )
    return summary


def example_pairs(world: ShapesWorld, split: str) -> list[dict[str, Any]]:
    """The picture's rows (``EXAMPLE_FAMILIES``): for the k-th family, the question pair
    (``steering_pairs``) of the first ``split`` image (by id) with such a pair, each image used once."""
    chosen: list[dict[str, Any]] = []
    pairs = steering_pairs(world, split, limit=50)
    for family in EXAMPLE_FAMILIES:
        for pair in pairs:
            if pair["family"] == family and all(pair["image_id"] != c["image_id"] for c in chosen):
                chosen.append(pair)
                break
    return chosen


def map_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Total-variation distance of two non-negative maps as mass distributions (0: the same, 1: disjoint)."""
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    return float(0.5 * np.abs(a / max(a.sum(), 1e-12) - b / max(b.sum(), 1e-12)).sum())


def example_maps(model: AbsVLModel, world: ShapesWorld, split: str, png: Path) -> list[dict[str, Any]]:
    """The picture (``example_pairs``: one row per image, the image, its bottom-up map and the top-down maps
    of the two questions of its pair) and what it shows in numbers: each answer and whether it is right,
    each top-down map's share on its own question's object(s) and on the other question's, and the
    distances between the maps."""
    rows, reports = [], []
    scenes = world.load_scenes()
    for pair in example_pairs(world, split):
        image_path = world.image_path(split, pair["image_id"])
        figure, maps = attention_figure(model, image_path, pair["questions"])
        rows.append(figure)
        labels = np.asarray(Image.open(world.mask_path(split, pair["image_id"])))
        grid = maps["bottom_up"].shape
        own = [cell_cover(labels, objects, grid) for objects in pair["only"]]
        bottom_up, top_down = maps["bottom_up"], maps["top_down"]
        answers = maps["answers"] or [""] * 2
        report = {
            "image": image_path.name,
            "objects": len(scenes[pair["image_id"]]["objects"]),
            "family": pair["family"],
            "questions": pair["questions"],
            "answers": answers,
            "expected": pair["answers"],
            "right": [a == e for a, e in zip(answers, pair["answers"])],
            "top_down_on_own_object": [mass_share(t, c) for t, c in zip(top_down, own)],
            "top_down_on_other_object": [mass_share(t, c) for t, c in zip(top_down, own[::-1])],
            "bottom_up_on_object": [mass_share(bottom_up, c) for c in own],
            "distance_between_top_down": map_distance(*top_down),
            "distance_to_bottom_up": [map_distance(t, bottom_up) for t in top_down],
        }
        reports.append(report)
        print(
            f"  {image_path.name} ({FAMILIES[pair['family']]}): distance between the two top-down maps "
            f"{report['distance_between_top_down']:.3f}"
        )
        for k, question in enumerate(report["questions"]):
            verdict = "right" if report["right"][k] else f"wrong, expected {report['expected'][k]!r}"
            print(
                f"    {question!r} -> {answers[k]!r} ({verdict}): top-down map's share on its object "
                f"{report['top_down_on_own_object'][k]:.2f}, on the other question's "
                f"{report['top_down_on_other_object'][k]:.2f} (bottom-up {report['bottom_up_on_object'][k]:.2f})"
            )
    picture = Image.new("RGB", (max(r.width for r in rows), sum(r.height for r in rows)), "white")
    for k, row in enumerate(rows):
        picture.paste(row, (0, sum(r.height for r in rows[:k])))
    png.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(png) as tmp:
        picture.save(tmp)
    right = sum(sum(r["right"]) for r in reports)
    print(
        f"wrote {png}: per row an image, its bottom-up map, the top-down maps of two questions and the gate each "
        "question opens "
        f"({right} of {2 * len(reports)} answers right; distances: total variation of the maps as distributions, "
        "0 = the same map, 1 = disjoint)"
    )
    return reports


def baselines(model: AbsVLModel, world: ShapesWorld, split: str, private: dict[str, Any]) -> dict[str, dict]:
    """The question-only, image-only and majority-answer baselines on ``split`` (``absvl.metrics.baselines``),
    fitted on the training split."""
    train_questions = read_json(world.questions_path("train2014"))
    train_annotations = read_json(world.annotations_path("train2014"))
    questions = read_json(world.questions_path(split))
    return {
        "question only": evaluate_vqa(
            question_only_answers(train_questions, train_annotations, questions), questions, private
        ),
        "image only": evaluate_vqa(
            image_only_answers(
                model, world.image_path, ("train2014", train_questions, train_annotations), (split, questions)
            ),
            questions,
            private,
        ),
        "majority answer": majority_answer_baseline(train_annotations, private),
    }


def run(
    config_path: str | Path = DEFAULT_CONFIG,
    overrides: list[str] | tuple[str, ...] = (),
    out_dir: str | Path = "outputs/demo",
    retrieval_overrides: list[str] | tuple[str, ...] | None = (),
    pretrain_overrides: list[str] | tuple[str, ...] = (),
    prior_overrides: list[str] | tuple[str, ...] = (),
) -> dict[str, Any]:
    """The demo; ``retrieval_overrides=None`` skips the retrieval stage."""
    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = load_config(config_path, overrides)
    backbone, stage1 = pretrain_stage(config, pretrain_overrides)
    config = load_config(config_path, [*overrides, f"model.backbone_kwargs.pretrained_path={backbone}"])
    pretrained_s = time.perf_counter() - started
    prior = prior_stage(config, prior_overrides)
    config = replace(config, train=replace(config.train, init_from=prior["export"]))
    print("stage 2b (VQA finetuning): the question's ξ steers the pretrained backbone's second pass")
    summary = train_vqa(config, notify=print)
    trained_s = time.perf_counter() - started
    model = AbsVLForQuestionAnswering.from_pretrained(summary["export"])
    world = ShapesWorld.load(config.data.root)

    split = "test-dev2015"
    private = read_json(world.root / "shapes_test-dev2015_annotations.json")
    test_dev = load_split(config, "test-dev", require_annotations=False)
    answers, _, _ = predict_vqa_submission(model, test_dev)
    questions = read_json(world.questions_path(split))
    result = evaluate_vqa(answers, questions, private)
    compared = baselines(model, world, split, private)
    families = question_templates((q["question_id"], q["question"]) for q in questions["questions"])
    for r in (result, *compared.values()):
        r["perFamily"] = accuracy_by_group(r, families)
    print("\n== Shapes test-dev, official VQA accuracy: the model and what the question or the image alone answer ==")
    print(
        "question only: each question text's most common training answer (the ceiling of any text-only model);\n"
        "image only: a linear classifier on the image's pooled bottom-up tokens, blind to the question;\n"
        'question family: the world\'s templates (the question type "what color is the" holds the colour questions\n'
        "and the relational ones about colour)"
    )
    print(format_accuracy_table(result, compared))
    gain = result["overall"] - compared["question only"]["overall"]
    print(f"AbSViT-VL: {result['overall']:.2f}  ({gain:+.2f} over the question alone)")

    pointers = pointer_hits(model, world, test_dev)
    if pointers:
        print(
            f"\n== where the VQA head's object pointers land ({pointers['all']['questions']} test-dev questions that "
            "name an object) ==\nhop 1: on the last object the question names (a relation's reference), hop 2: on the "
            "first (the object related to it);\nchance: the share of the cells the object owns (% of questions)"
        )
        print(format_pointer_table(pointers))
    counted = count_hits(model, world, test_dev)
    if counted:
        print(
            f'\n== what the VQA head\'s count density counts ({counted["all"]["questions"]} test-dev "how many" '
            "questions) ==\nexact: the density's sum, rounded, is the number of objects the world says match"
        )
        print(format_count_table(counted))

    print(
        f"\n== what the tokens the fusion reads know: linear probes on object patches ({PROBE_IMAGES} val images "
        f"fit, {PROBE_IMAGES} test-dev images scored) =="
    )
    probes = token_probes(
        object_patch_tokens(model, world, "val2014", PROBE_IMAGES),
        object_patch_tokens(model, world, split, PROBE_IMAGES),
    )
    print(format_probe_table(probes))

    pairs = steering_pairs(world, split, limit=STEERING_IMAGES)
    steering = steering_scores(model, world, split, pairs)
    print(
        f"\n== does the question steer the backbone? {len(pairs)} question pairs on {STEERING_IMAGES} test-dev images ==\n"
        "paired: a map's share on object A under a question naming A / under one naming B, median (mean);\n"
        "pointing: questions whose map peaks on one of their objects. Maps: gate = the prior gate ξ opens (what the\n"
        "prior loss trains), bottom-up = the first pass (no question: the baseline), top-down = the second pass,\n"
        "fusion = how much the second pass changed each token the fusion reads"
    )
    print(format_steering_table(steering))
    print(
        f"\nthe picture: for each of the families {', '.join(FAMILIES[f] for f in EXAMPLE_FAMILIES)}, the first "
        "test-dev image (by id) with a pair of such questions about different objects"
    )
    examples = example_maps(model, world, split, out_dir / "attention.png")
    print(f"model saved with save_pretrained in {summary['export']}")
    report = {
        "accuracy": result["overall"],
        "per_answer_type": result["perAnswerType"],
        "per_question_type": result["perQuestionType"],
        "per_family": result["perFamily"],
        "baselines": {
            name: {"overall": r["overall"], "per_question_type": r["perQuestionType"], "per_family": r["perFamily"]}
            for name, r in compared.items()
        },
        "majority_baseline": compared["majority answer"]["overall"],
        "stage1": stage1,
        "prior_alignment": prior["val"],
        "pointers": pointers,
        "count": counted,
        "probes": probes,
        "steering": steering,
        "examples": examples,
        "export": summary["export"],
        "pretrained_backbone": backbone,
        "prior_export": prior["export"],
        "png": str(out_dir / "attention.png"),
    }
    if retrieval_overrides is not None:
        report["retrieval"] = retrieval_stage(summary["export"], retrieval_overrides, out_dir)
        print(
            f"\nweb page (questions: the VQA model; search: the index's retrieval model): "
            f"absvl serve --model {summary['export']} --index {report['retrieval']['index']}"
        )
    report["minutes"] = {
        "world + stage 1": pretrained_s / 60,
        "stages 2a + 2b": (trained_s - pretrained_s) / 60,
        "total": (time.perf_counter() - started) / 60,
    }
    write_json(out_dir / "demo.json", report)
    print(
        f"\ndemo took {report['minutes']['total']:.1f} min (world + stage 1: {pretrained_s / 60:.1f} min, "
        f"stages 2a + 2b: {report['minutes']['stages 2a + 2b']:.1f} min); report in {out_dir / 'demo.json'}"
    )
    return report
