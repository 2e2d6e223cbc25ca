"""Does the question steer the maps? The cell cover, mass share, pointing and gate scores on hand-made
tensors; the question pairs of a tiny Shapes world; the paired and pointing scores of a tiny model and of
maps made to look where each question asks."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from absvl.data.shapes_text import question_candidates
from absvl.metrics import steering
from absvl.metrics.steering import (
    FAMILIES,
    MAPS,
    POINTING_COVER,
    cell_cover,
    format_steering_table,
    gate_hits,
    mass_share,
    points_at,
    question_maps,
    steering_pairs,
    steering_scores,
)

SPLIT = "train2014"


# --- hand-made maps ---------------------------------------------------------------------------
def _labels():
    """A 4x4 label map on a 2x2 grid: object 0 (label 1) fills cell (0, 0) and a quarter of cell (0, 1),
    object 1 (label 2) half of cell (1, 1)."""
    labels = np.zeros((4, 4), dtype=np.uint8)
    labels[:2, :2] = 1
    labels[0, 2] = 1
    labels[2:, 2] = 2
    return labels


def test_cell_cover_is_each_cells_share_of_the_objects():
    labels = _labels()
    np.testing.assert_allclose(cell_cover(labels, [0], (2, 2)), [[1.0, 0.25], [0.0, 0.0]])
    np.testing.assert_allclose(cell_cover(labels, [1], (2, 2)), [[0.0, 0.0], [0.0, 0.5]])
    np.testing.assert_allclose(cell_cover(labels, [0, 1], (2, 2)), [[1.0, 0.25], [0.0, 0.5]])
    np.testing.assert_allclose(cell_cover(labels, [], (2, 2)), np.zeros((2, 2)))
    np.testing.assert_allclose(cell_cover(labels, [0], (4, 4)), labels == 1)  # a map at the mask's resolution
    np.testing.assert_allclose(cell_cover(labels, [0], (1, 2)), [[4 / 8, 1 / 8]])  # 4x2-pixel cells
    with pytest.raises(ValueError, match="whole multiple"):
        cell_cover(labels, [0], (3, 3))


def test_mass_share_is_the_cover_weighted_share_of_the_mass():
    cover = np.array([[1.0, 0.25], [0.0, 0.5]])
    assert mass_share(np.array([[2.0, 4.0], [1.0, 1.0]]), cover) == pytest.approx((2 + 1 + 0.5) / 8)
    assert mass_share(np.array([[0.0, 0.0], [3.0, 0.0]]), cover) == 0.0
    assert mass_share(np.array([[5.0, 0.0], [0.0, 0.0]]), cover) == 1.0
    assert mass_share(np.zeros((2, 2)), cover) == pytest.approx(1.75 / 4)  # an empty map spreads evenly
    assert mass_share(np.ones((2, 2)), cover) == pytest.approx(1.75 / 4)


def test_points_at_needs_the_peak_on_a_cell_covered_for_a_quarter():
    cover = np.array([[1.0, 0.25], [0.2, 0.0]])
    assert POINTING_COVER == 0.25
    assert points_at(np.array([[3.0, 1.0], [0.0, 0.0]]), cover)
    assert points_at(np.array([[0.0, 2.0], [1.0, 0.0]]), cover)  # exactly a quarter
    assert not points_at(np.array([[0.0, 1.0], [2.0, 0.0]]), cover)  # 0.2: not enough
    assert not points_at(np.array([[0.0, 0.0], [0.0, 1.0]]), cover)


def test_gate_hits_on_hand_made_rows():
    # 4 patches; labels: row 0 [obj 1, obj 2, background, nobody], target obj 1, gate peaks on it;
    # row 1 [bg, obj 1, obj 2, obj 2], target obj 2, gate peaks on obj 1 (a miss);
    # row 2 has no patch of its target (obj 3 is absent): left out of every sum
    gate = torch.tensor([[0.9, 0.1, 0.2, 1.0], [0.0, 0.8, 0.4, 0.2], [1.0, 1.0, 1.0, 1.0]])
    patch_objects = torch.tensor([[1, 2, 0, -1], [0, 1, 2, 2], [0, 1, 2, 0]])
    target_objects = torch.zeros(3, 4, dtype=torch.bool)
    target_objects[0, 1] = target_objects[1, 2] = target_objects[2, 3] = True
    hits = gate_hits(gate, patch_objects, target_objects)
    assert hits["questions"] == 2.0
    assert hits["pointing"] == 0.0  # row 0's gate peaks on the unowned patch (1.0), row 1's on obj 1
    assert hits["on_targets"] == pytest.approx(0.9 + (0.4 + 0.2) / 2)
    assert hits["off_targets"] == pytest.approx((0.1 + 0.2 + 1.0) / 3 + (0.0 + 0.8) / 2)
    gate[0, 3] = 0.0  # now row 0 peaks on its target
    assert gate_hits(gate, patch_objects, target_objects)["pointing"] == 1.0
    # no row with an object patch of its question: all zero
    none = gate_hits(gate, patch_objects, torch.zeros(3, 4, dtype=torch.bool))
    assert none == {"questions": 0.0, "pointing": 0.0, "on_targets": 0.0, "off_targets": 0.0}


# --- the question pairs of a tiny world ----------------------------------------------------------


def test_steering_pairs_name_different_objects(world):
    pairs = steering_pairs(world, SPLIT, limit=6, seed=0)
    assert pairs
    scenes = world.load_scenes()
    assert {p["family"] for p in pairs} <= set(FAMILIES)
    images = list(dict.fromkeys(p["image_id"] for p in pairs))
    eligible = sorted(s["image_id"] for s in scenes.values() if s["split"] == SPLIT and len(s["objects"]) >= 2)
    assert images == eligible[: len(images)] and len(images) <= 6
    for p in pairs:
        objects = scenes[p["image_id"]]["objects"]
        assert len(p["questions"]) == len(p["answers"]) == len(p["targets"]) == len(p["only"]) == 2
        a, b = (set(t) for t in p["named"])
        assert p["only"] == [sorted(a - b), sorted(b - a)]  # the objects one question names and the other not
        for named, targets in zip(p["named"], p["targets"]):
            # "what color is the object left of the circle?" is about two objects and names one: the circle
            assert set(named) <= set(targets) and len(named) == (1 if p["family"] == "rel_what" else len(targets))
        assert p["only"][0] and p["only"][1] and not set(p["only"][0]) & set(p["only"][1])
        assert all(t == sorted(t) and set(t) <= {o["index"] for o in objects} for t in p["targets"])
        assert p["questions"][0] != p["questions"][1]
        if p["family"] == "count":
            assert "how many objects are there?" not in p["questions"]
        # the world's own questions: each with its answer and objects among the scene's candidates
        rng = np.random.default_rng([0, p["image_id"], list(FAMILIES).index(p["family"])])
        candidates = {c["question"]: c for c in question_candidates(objects, p["family"], world.relation_margin, rng)}
        for question, answer, targets, named in zip(p["questions"], p["answers"], p["targets"], p["named"]):
            candidate = candidates[question]
            assert candidate["answer"] == answer and sorted(candidate["targets"]) == targets
            assert sorted(candidate["named"]) == named
    # one pair per (image, family) at most
    keys = [(p["image_id"], p["family"]) for p in pairs]
    assert len(keys) == len(set(keys))


def test_steering_pairs_are_deterministic_in_the_seed(world):
    first = steering_pairs(world, SPLIT, limit=5, seed=0)
    assert steering_pairs(world, SPLIT, limit=5, seed=0) == first
    others = [steering_pairs(world, SPLIT, limit=5, seed=s) for s in (1, 2, 3)]
    assert any(o != first for o in others)
    # a larger limit extends the list: the first images' pairs do not change
    more = steering_pairs(world, SPLIT, limit=8, seed=0)
    assert more[: len(first)] == first and len(more) > len(first)


# --- the scores ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model(tiny_vl):
    return tiny_vl()


def test_question_maps_of_a_tiny_model(tiny_model, world):
    pair = steering_pairs(world, SPLIT, limit=1)[0]
    image = Image.open(world.image_path(SPLIT, pair["image_id"])).convert("RGB")
    maps = question_maps(tiny_model, [image, image], pair["questions"])
    assert set(maps) == set(MAPS) == {"gate", "bottom_up", "top_down", "fusion"}
    assert all(m.shape == (2, 4, 4) and m.dtype == np.float32 and (m >= 0).all() for m in maps.values())
    np.testing.assert_allclose(maps["bottom_up"][0], maps["bottom_up"][1], rtol=1e-5)  # the question is not read
    assert not np.allclose(maps["top_down"][0], maps["top_down"][1])
    assert not np.allclose(maps["gate"][0], maps["gate"][1])
    assert maps["gate"].max() <= 1.0
    # the fusion map: how far the second pass moved each token the fusion reads
    inputs = tiny_model.prepare_inputs(images=[image], text=pair["questions"][:1])
    with torch.no_grad():
        _, xi = tiny_model.encode_prior(inputs["input_ids"], inputs["attention_mask"])
        vision = tiny_model.encode_vision(inputs["images"], xi, return_maps=True)
    change = (vision.tokens - vision.bottom_up_tokens)[0, 1:].norm(dim=-1).reshape(4, 4)
    np.testing.assert_allclose(maps["fusion"][0], change.numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(maps["top_down"][0], vision.maps["top_down"][0].numpy(), rtol=1e-4, atol=1e-6)
    # the gate: clamp(cos(ξ, z_i), 0, 1) on the first pass's spatial tokens
    z = vision.bottom_up_tokens[0, 1:]
    gate = torch.nn.functional.cosine_similarity(z, xi[0][None], dim=-1).clamp(0, 1).reshape(4, 4)
    np.testing.assert_allclose(maps["gate"][0], gate.numpy(), rtol=1e-4, atol=1e-6)


def test_a_backbone_without_prior_has_no_gate_map(world, tiny_vl):
    model = tiny_vl("vit_test_patch8")
    pairs = steering_pairs(world, SPLIT, limit=1)
    scores = steering_scores(model, world, SPLIT, pairs)
    assert set(scores["all"]["pointing"]) == set(scores["all"]["paired"]) == {"bottom_up", "top_down", "fusion"}
    # no second pass: the top-down map is the bottom-up one, and the fusion's tokens do not move
    for name in ("bottom_up", "top_down"):
        assert scores["all"]["paired"][name]["median"] == pytest.approx(1.0, rel=1e-5)
    assert "gate" not in format_steering_table(scores)


def _check_summary(summary, pairs):
    assert summary["pairs"] == len(pairs) and summary["questions"] == 2 * len(pairs)
    assert set(summary["paired"]) == set(summary["pointing"]) == set(MAPS)
    assert all(set(v) == {"median", "mean"} for v in summary["paired"].values())
    assert all(0.0 <= v <= 100.0 for v in summary["pointing"].values())
    assert 0.0 <= summary["chance"] <= 100.0


def test_steering_scores_of_a_tiny_model(tiny_model, world):
    pairs = steering_pairs(world, SPLIT, limit=3)
    tiny_model.train()
    scores = steering_scores(tiny_model, world, SPLIT, pairs, batch_size=5)
    assert tiny_model.training  # the mode is restored
    tiny_model.eval()
    assert set(scores) == {"families", "all"}
    assert list(scores["families"]) == [f for f in FAMILIES if any(p["family"] == f for p in pairs)]
    for family, summary in scores["families"].items():
        _check_summary(summary, [p for p in pairs if p["family"] == family])
    _check_summary(scores["all"], pairs)
    # the bottom-up map reads no question: the two questions of a pair see the same map, a ratio of exactly 1
    assert scores["all"]["paired"]["bottom_up"]["median"] == pytest.approx(1.0, rel=1e-5)
    assert scores["all"]["paired"]["bottom_up"]["mean"] == pytest.approx(1.0, rel=1e-5)
    assert scores["all"]["paired"]["gate"]["mean"] != pytest.approx(1.0, rel=1e-5)  # ξ moves the (untrained) gate
    # batching does not change a score
    again = steering_scores(tiny_model, world, SPLIT, pairs, batch_size=64)
    for name in MAPS:
        assert again["all"]["pointing"][name] == scores["all"]["pointing"][name]
        assert again["all"]["paired"][name]["mean"] == pytest.approx(scores["all"]["paired"][name]["mean"], rel=1e-4)
    lines = format_steering_table(scores).splitlines()
    assert len(lines) == 2 + len(scores["families"])
    assert lines[-1].startswith("all") and all(FAMILIES[f] in "\n".join(lines) for f in scores["families"])


def test_maps_on_each_questions_objects_score_steering(world, monkeypatch):
    """A stand-in model whose top-down and fusion maps sit on the question's objects (at the masks' own
    resolution, a little mass everywhere) and whose bottom-up map is flat: paired ratios far above 1 for the
    steered maps, exactly 1 for the flat one, and pointing 100 %."""
    pairs = steering_pairs(world, SPLIT, limit=4)
    order = [(p, side) for p in pairs for side in (0, 1)]  # the order steering_scores asks for the maps in
    asked = []

    def fake_maps(model, images, questions):
        out = {name: [] for name in MAPS}
        for question in questions:
            pair, side = order[len(asked)]
            assert question == pair["questions"][side]
            asked.append(question)
            labels = np.asarray(Image.open(world.mask_path(SPLIT, pair["image_id"])))
            on_targets = cell_cover(labels, pair["targets"][side], labels.shape) + 0.01
            out["gate"].append(0.5 * on_targets)
            out["top_down"].append(on_targets)
            out["fusion"].append(2.0 * on_targets)
            out["bottom_up"].append(np.ones(labels.shape))
        return {k: np.stack(v).astype(np.float32) for k, v in out.items()}

    monkeypatch.setattr(steering, "question_maps", fake_maps)
    model = torch.nn.Linear(1, 1)  # only its train/eval mode is touched
    scores = steering_scores(model, world, SPLIT, pairs, batch_size=3)
    assert len(asked) == len(order) and model.training
    everything = scores["all"]
    for name in ("gate", "top_down", "fusion"):
        assert everything["paired"][name]["median"] > 5.0 and everything["paired"][name]["mean"] > 5.0
        assert everything["pointing"][name] == 100.0
        for summary in scores["families"].values():
            assert summary["paired"][name]["median"] > 1.0 and summary["pointing"][name] == 100.0
    assert everything["paired"]["bottom_up"] == {"median": pytest.approx(1.0), "mean": pytest.approx(1.0)}
    # chance: the mean share of the cells (here pixels) that each question's objects cover
    shares = []
    for pair, side in order:
        labels = np.asarray(Image.open(world.mask_path(SPLIT, pair["image_id"])))
        shares.append(float(np.isin(labels, [t + 1 for t in pair["targets"][side]]).mean()))
    assert everything["chance"] == pytest.approx(100.0 * np.mean(shares))
    # the flat bottom-up map peaks on pixel (0, 0): it points when a target covers it
    corner = [
        int(np.asarray(Image.open(world.mask_path(SPLIT, p["image_id"])))[0, 0]) - 1 in p["targets"][s]
        for p, s in order
    ]
    assert everything["pointing"]["bottom_up"] == pytest.approx(100.0 * np.mean(corner))
    table = format_steering_table(scores)
    assert "100%" in table.splitlines()[-1]


def test_an_unreadable_image_leaves_its_pair_out(world, monkeypatch, tmp_path):
    pairs = steering_pairs(world, SPLIT, limit=2)
    broken = {**pairs[0], "image_id": 999999999}  # no such image

    def fake_maps(model, images, questions):
        return {name: np.ones((len(questions), 4, 4), dtype=np.float32) for name in MAPS}

    monkeypatch.setattr(steering, "question_maps", fake_maps)
    scores = steering_scores(torch.nn.Linear(1, 1), world, SPLIT, [broken, *pairs], batch_size=4)
    assert scores["all"]["pairs"] == len(pairs)
    assert scores["all"]["paired"]["top_down"]["median"] == pytest.approx(1.0)


def test_no_pairs_give_empty_scores(world):
    scores = steering_scores(torch.nn.Linear(1, 1), world, SPLIT, [])
    assert scores["families"] == {}
    assert scores["all"] == {
        "questions": 0,
        "pairs": 0,
        "paired": {},
        "pointing": {},
        "chance": pytest.approx(math.nan, nan_ok=True),
    }
