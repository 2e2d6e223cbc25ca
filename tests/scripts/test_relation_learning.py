"""scripts/relation_learning.py: the marks and centroids it trains on, and a few steps of every arm."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from absvl.data.shapes_world import ShapesWorld
from absvl.models.vl import AbsVLModel
from absvl.training.config import load_config

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "relation_learning.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("relation_learning", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_centroids_of_the_marked_cells(script):
    marks = torch.tensor([[1.0, 0.0, 0.0, -1.0], [0.0, 1.0, -1.0, -1.0]])  # 2 x 2 grids, row by row
    assert script.centroids(marks, (2, 2)).tolist() == [[-1.0, -1.0, 1.0, 1.0], [1.0, -1.0, 0.0, 1.0]]


def test_marks_follow_the_question_objects(script, shapes_root):
    world = ShapesWorld.load(shapes_root)
    questions = script.relation_questions(world, "train2014")
    assert questions and all(q["question"].startswith("is the ") for q in questions)
    scenes = world.load_scenes()
    both = 0
    for q in questions[:5]:
        marks = script.object_marks(world, "train2014", q, (4, 4)).reshape(4, 4)
        labels = np.asarray(Image.open(world.mask_path("train2014", q["image_id"])))
        a, b = (scenes[q["image_id"]]["objects"][i]["label"] for i in q["target_objects"])
        # each marked cell holds its object's pixels; A's cells +1, B's -1
        for (row, col), value in np.ndenumerate(marks.numpy()):
            cell = labels[row * 8 : row * 8 + 8, col * 8 : col * 8 + 8]
            if value:
                assert (cell == (a if value > 0 else b)).any()
        both += bool((marks > 0).any() and (marks < 0).any())
    assert both  # a small object may dominate no cell of its own


def test_every_arm_trains_and_reports(script, shapes_root, tiny_overrides, tmp_path, capsys):
    config = load_config("configs/shapes_absvit_tiny.yaml", tiny_overrides)
    AbsVLModel(config.model).save_pretrained(tmp_path / "model")
    out = tmp_path / "relations.json"
    argv = ["--model", str(tmp_path / "model"), "--root", str(shapes_root), "--steps", "2", "--eval-every", "1"]
    # the tiny world's val split may hold no "left of" question: score on the training questions
    results = script.main([*argv, "--batch", "4", "--val-split", "train2014", "--out", str(out)])
    assert set(results["arms"]) == {"one", "all", "mlp", "pointers"}
    for history in results["arms"].values():
        assert [h["step"] for h in history] == [1, 2] and all(0 <= h["accuracy"] <= 100 for h in history)
    assert json.loads(out.read_text()) == results
    assert "val VQA accuracy" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        script.main([*argv, "--arms", "one,bogus"])
