import json

import numpy as np
from PIL import Image

from absvl import demo
from absvl.models.vl import AbsVLModel


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
        "train.batch_size=8",
        "train.trackers=[]",
    ]
    report = demo.run(
        demo.DEFAULT_CONFIG, [*tiny_overrides, "train.max_steps=4"], tmp_path / "out", retrieval, pretrain
    )
    printed = capsys.readouterr().out
    assert "majority-answer baseline" in printed and "target attention" in printed
    assert "stage 1 (vision pretraining)" in printed and "distance between the two top-down maps" in printed
    # the VQA model's backbone started from the stage-1 export
    assert report["pretrained_backbone"] == str(tmp_path / "pretrain" / "final")
    for example in report["examples"]:
        assert len(example["questions"]) == 2 and all(q.startswith("what shape is the") for q in example["questions"])
        assert 0 <= example["distance_between_top_down"] <= 1 and len(example["distance_to_bottom_up"]) == 2
    assert report["attention_ratio"] == report["attention"]["top_down"] / report["attention"]["bottom_up"]
    # a second run reuses the pretrained backbone instead of training it again
    again = demo.run(demo.DEFAULT_CONFIG, [*tiny_overrides, "train.max_steps=1"], tmp_path / "out2", None, pretrain)
    assert "reusing" in capsys.readouterr().out and again["pretrained_backbone"] == report["pretrained_backbone"]
    assert (
        "| re-ranked top-2 (ITM, top-down) |" in printed and "search 'a red circle left of a blue square.'" in printed
    )
    assert len(report["retrieval"]["hits"]) == 4  # the 4 test images of the tiny world, all re-ranked
    assert (
        AbsVLModel.from_pretrained(report["retrieval"]["export"]).answers
        == AbsVLModel.from_pretrained(report["export"]).answers
    )
    assert 0 <= report["accuracy"] <= 100 and 0 <= report["majority_baseline"] <= 100
    assert set(report["attention"]) == {
        "bottom_up",
        "top_down",
        "bottom_up_others",
        "top_down_others",
        "per_question_type",
    }
    # every test-dev question that names objects is scored, per question type too (table printed)
    per_type = report["attention"]["per_question_type"]
    assert set(per_type) <= {"what color is the", "what shape is the", "is there a", "how many", "is the"}
    assert "question type" in printed and all(f"{qtype:<20}" in printed for qtype in per_type)
    png = Image.open(report["png"])
    assert png.size[0] == 4 * 224  # image | bottom-up | two top-down maps, one row per example
    assert png.size[1] == len(report["examples"]) * (224 + 34)
    assert json.loads((tmp_path / "out" / "demo.json").read_text())["export"] == report["export"]


def test_map_distance():
    a, b = np.array([[1.0, 0.0], [0.0, 0.0]]), np.array([[0.0, 2.0], [0.0, 0.0]])
    assert demo.map_distance(a, a * 3) == 0.0  # a distribution: the scale does not matter
    assert demo.map_distance(a, b) == 1.0
    assert demo.map_distance(a, np.ones((2, 2))) == 0.75
