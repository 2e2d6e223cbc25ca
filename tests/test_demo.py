import json
from pathlib import Path

import numpy as np
from PIL import Image

from absvl import demo
from absvl.data.shapes_text import FAMILY_TEMPLATES
from absvl.models.vl import AbsVLForQuestionAnswering, AbsVLForRetrieval, load_model


def test_demo_runs_end_to_end_on_a_tiny_world(tiny_overrides, shapes_root, tmp_path, capsys):
    retrieval = [
        f"data.captions={shapes_root / 'dataset_shapes.json'}",
        f"data.images={shapes_root / 'images'}",
        "data.shapes=null",
        "data.num_workers=0",
        f"train.output_dir={tmp_path / 'retrieval'}",
        "train.max_steps=3",
        "train.batch_size=8",
        "train.trackers=[]",
        "train.rerank_k=2",
    ]
    pretrain = [
        "model.backbone_kwargs={img_size: 32}",
        f"train.output_dir={tmp_path / 'pretrain'}",
        "train.max_steps=2",
        "train.eval_every=0",
        "train.batch_size=8",
        "train.trackers=[]",
    ]
    prior = [f"train.output_dir={tmp_path / 'prior'}", "train.max_steps=2", "train.batch_size=8", "train.trackers=[]"]
    report = demo.run(
        demo.DEFAULT_CONFIG, [*tiny_overrides, "train.max_steps=4"], tmp_path / "out", retrieval, pretrain, prior
    )
    printed = capsys.readouterr().out
    assert "stage 1 (vision pretraining)" in printed and "stage 1 on val object patches: shape" in printed
    assert "stage 2a (prior alignment)" in printed and "stage 2b (VQA finetuning)" in printed
    # the VQA model's backbone started from the stage-1 export, the VQA run from the prior alignment's
    assert report["pretrained_backbone"] == str(tmp_path / "pretrain" / "final")
    assert report["prior_export"] == str(tmp_path / "prior" / "final")
    assert set(report["stage1"]) >= {"shape", "color", "objects", "background"}
    assert "gate_pointing" in report["prior_alignment"]
    # the baselines beside the model, per question type
    assert set(report["baselines"]) == {"question only", "image only", "majority answer"}
    assert "question only" in printed and "image only" in printed and "over the question alone" in printed
    for baseline in report["baselines"].values():
        assert 0 <= baseline["overall"] <= 100 and set(baseline["per_question_type"]) == set(
            report["per_question_type"]
        )
        assert set(baseline["per_family"]) == set(report["per_family"])
    # per family of the world's templates: the relational attribute questions apart from the colour family
    assert set(report["per_family"]) <= set(FAMILY_TEMPLATES.values()) and "question family" in printed
    # where the object pointers land (the demo's VQA config reads them), each hop beside its chance
    assert report["pointers"]["all"]["questions"] > 0 and "object pointers land" in printed
    assert set(report["pointers"]["all"]) == {"questions", "hop 1", "hop 2", "chance 1", "chance 2"}
    # and what its count density counts, by the number of objects the world says match
    assert report["count"]["all"]["questions"] > 0 and "count density counts" in printed
    assert set(report["count"]["all"]) == {"questions", "exact", "mean error"}
    # probes and steering printed and reported
    assert set(report["probes"]["bottom_up"]) == {"shape", "color", "position"}
    assert "tokens the fusion reads" in printed and "pointing bottom-up" in printed
    assert report["steering"]["all"]["questions"] > 0 and "gate" in report["steering"]["all"]["pointing"]
    # the picture's rows follow the stated rule: one pair per family, in order, on different images
    families = [example["family"] for example in report["examples"]]
    assert families == list(demo.EXAMPLE_FAMILIES[: len(families)]) and families
    assert len({example["image"] for example in report["examples"]}) == len(families)
    for example in report["examples"]:
        assert len(example["questions"]) == 2 and len(example["right"]) == 2
        assert example["right"] == [a == e for a, e in zip(example["answers"], example["expected"])]
        assert 0 <= example["distance_between_top_down"] <= 1 and len(example["distance_to_bottom_up"]) == 2
    assert "answers right" in printed and "the first test-dev image (by id)" in printed
    # a second run reuses the pretrained backbone instead of training it again
    again = demo.run(
        demo.DEFAULT_CONFIG, [*tiny_overrides, "train.max_steps=1"], tmp_path / "out2", None, pretrain, prior
    )
    assert "reusing" in capsys.readouterr().out and again["pretrained_backbone"] == report["pretrained_backbone"]
    # a stage 1 that learned other patch classes than the world's (an older generator's, without the size) trains again
    export_config = Path(report["pretrained_backbone"]) / "config.json"
    saved = json.loads(export_config.read_text())
    export_config.write_text(json.dumps({**saved, "classes": [c.split(" ", 1)[-1] for c in saved["classes"]]}))
    demo.run(demo.DEFAULT_CONFIG, [*tiny_overrides, "train.max_steps=1"], tmp_path / "out3", None, pretrain, prior)
    assert "every patch of the Shapes training images classified" in capsys.readouterr().out
    assert (
        "| re-ranked top-2 (ITM, top-down) |" in printed and "search 'a red circle left of a blue square.'" in printed
    )
    assert len(report["retrieval"]["hits"]) == 4  # the 4 test images of the tiny world, all re-ranked
    retrieval_model = load_model(report["retrieval"]["export"])
    assert type(retrieval_model) is AbsVLForRetrieval and retrieval_model.config.retrieval_head_dim == 128
    index_meta = json.loads((Path(report["retrieval"]["index"]) / "meta.json").read_text())
    assert index_meta["dim"] == 128  # the index holds the retrieval head's embeddings, as the config says
    assert "re-ranking's gain per caption form" in printed and set(report["retrieval"]["scene"]["by kind"])
    assert type(load_model(report["export"])) is AbsVLForQuestionAnswering
    assert 0 <= report["accuracy"] <= 100 and 0 <= report["majority_baseline"] <= 100
    png = Image.open(report["png"])
    assert png.size[0] == 6 * 224  # image | bottom-up | two top-down maps | two gates, one row per example
    assert png.size[1] == len(report["examples"]) * (224 + 34)
    assert json.loads((tmp_path / "out" / "demo.json").read_text())["export"] == report["export"]


def test_map_distance():
    a, b = np.array([[1.0, 0.0], [0.0, 0.0]]), np.array([[0.0, 2.0], [0.0, 0.0]])
    assert demo.map_distance(a, a * 3) == 0.0  # a distribution: the scale does not matter
    assert demo.map_distance(a, b) == 1.0
    assert demo.map_distance(a, np.ones((2, 2))) == 0.75
