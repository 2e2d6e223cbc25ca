import numpy as np
import pytest

from absvl.metrics.attention import (
    MAP_KINDS,
    SCORE_KEYS,
    attention_scores,
    mean_ratio,
    target_attention_ratio,
    target_attention_ratios,
    target_questions,
)


def test_uniform_map_scores_one():
    mask = np.zeros((8, 8), bool)
    mask[:4, :4] = True
    assert target_attention_ratio(np.ones((4, 4)), mask) == pytest.approx(1.0)


def test_all_mass_on_target_scores_inverse_area_share():
    mask = np.zeros((8, 8), bool)
    mask[:2, :2] = True  # one cell of a 4x4 map: area share 1/16
    attention = np.zeros((4, 4))
    attention[0, 0] = 5.0
    assert target_attention_ratio(attention, mask) == pytest.approx(16.0)
    attention = np.ones((4, 4))
    attention[0, 0] = 0.0  # no mass on the target
    assert target_attention_ratio(attention, mask) == 0.0


def test_partial_cells_are_weighted_by_coverage():
    mask = np.zeros((4, 4), bool)
    mask[0, 0] = True  # a quarter of cell (0, 0) of a 2x2 map
    attention = np.array([[3.0, 1.0], [1.0, 1.0]])
    # mass share = 3 * 0.25 / 6 = 0.125 ; area share = 1/16
    assert target_attention_ratio(attention, mask) == pytest.approx(0.125 / (1 / 16))


def test_errors_and_empty_target():
    assert np.isnan(target_attention_ratio(np.ones((2, 2)), np.zeros((4, 4), bool)))
    with pytest.raises(ValueError, match="not a whole multiple"):
        target_attention_ratio(np.ones((3, 3)), np.zeros((4, 4), bool))
    with pytest.raises(ValueError, match="non-negative"):
        target_attention_ratio(-np.ones((2, 2)), np.ones((4, 4), bool))


# --- hand-made maps and masks ---------------------------------------------------------------
def test_uniform_map_scores_one_for_any_target_and_resolution():
    rng = np.random.default_rng(0)
    for map_side, mask_side in ((4, 4), (4, 32), (8, 64), (2, 6)):
        mask = rng.random((mask_side, mask_side)) < 0.3
        mask[0, 0] = True
        assert target_attention_ratio(np.full((map_side, map_side), 0.7), mask) == pytest.approx(1.0)


def test_zero_map_scores_one():
    mask = np.zeros((8, 8), bool)
    mask[:4] = True
    assert target_attention_ratio(np.zeros((4, 4)), mask) == pytest.approx(1.0)


def test_multi_object_target_is_the_union():
    # two objects, one cell each of a 4x4 map (mask 16x16: 4x4 pixels per cell)
    mask = np.zeros((16, 16), bool)
    mask[0:4, 0:4] = True
    mask[12:16, 12:16] = True  # union area share = 2/16
    attention = np.zeros((4, 4))
    attention[0, 0] = 1.0  # all mass on one of the two objects
    assert target_attention_ratio(attention, mask) == pytest.approx(8.0)
    attention[3, 3] = 1.0  # split over both
    assert target_attention_ratio(attention, mask) == pytest.approx(8.0)
    attention[1, 1] = 2.0  # half the mass off target
    assert target_attention_ratio(attention, mask) == pytest.approx(4.0)


def test_mask_of_higher_resolution_than_map():
    # 64x64 mask (the Shapes world) against 8x8 and 4x4 maps: same object, same answer when the
    # object fills whole cells of both grids
    mask = np.zeros((64, 64), bool)
    mask[16:32, 16:32] = True  # area share 1/16
    fine = np.zeros((8, 8))
    fine[2:4, 2:4] = 1.0
    coarse = np.zeros((4, 4))
    coarse[1, 1] = 1.0
    assert target_attention_ratio(fine, mask) == pytest.approx(16.0)
    assert target_attention_ratio(coarse, mask) == pytest.approx(16.0)
    # non-square: a 2x4 map on a 4x8 mask
    mask = np.zeros((4, 8), bool)
    mask[:2, :2] = True  # cell (0, 0), area share 1/8
    attention = np.ones((2, 4))
    attention[0, 0] = 8.0  # mass share 8/15
    assert target_attention_ratio(attention, mask) == pytest.approx((8 / 15) / (1 / 8))


def test_empty_target_is_nan_and_left_out_of_the_mean():
    assert np.isnan(target_attention_ratio(np.ones((4, 4)), np.zeros((8, 8), bool)))
    assert mean_ratio([1.0, float("nan"), 3.0]) == pytest.approx(2.0)
    assert np.isnan(mean_ratio([float("nan")]))
    assert np.isnan(mean_ratio([]))


def test_negative_map_is_an_error():
    attention = np.ones((4, 4))
    attention[2, 1] = -1e-3
    with pytest.raises(ValueError, match="non-negative"):
        target_attention_ratio(attention, np.ones((8, 8), bool))


# --- the averaging over a world's questions, with a tiny model ------------------------------
@pytest.fixture(scope="module")
def tiny_model(shapes_root):
    import torch

    from absvl.models.vl import AbsVLConfig, AbsVLModel

    torch.manual_seed(0)
    config = AbsVLConfig(
        backbone="absvit_test_patch8",
        backbone_kwargs={"img_size": 32},
        text_encoder=str(shapes_root / "text_encoder"),
        max_text_len=16,
        fusion_hidden_size=32,
        fusion_layers=1,
        fusion_heads=2,
        fusion_dropout=0.0,
    )
    return AbsVLModel(config, answers=["yes", "no"]).eval()


def test_batching_gives_the_per_item_ratios(tiny_model, shapes_root):
    from absvl.data.shapes_world import ShapesWorld, target_mask

    world = ShapesWorld.load(shapes_root)
    split = "test-dev2015"
    questions = target_questions(world, split, limit=7)
    assert questions and all(q["target_objects"] for q in questions)
    batched = target_attention_ratios(tiny_model, world, questions, split, batch_size=4)
    single = target_attention_ratios(tiny_model, world, questions, split, batch_size=1)
    for kind in MAP_KINDS:
        assert len(batched[kind]) == len(questions)
        np.testing.assert_allclose(batched[kind], single[kind], rtol=1e-4)
    # each ratio is the scalar metric of the model's own map for that question
    q = questions[0]
    from PIL import Image

    inputs = tiny_model.processor(
        images=[Image.open(world.image_path(split, q["image_id"])).convert("RGB")], text=[q["question"]]
    )
    maps = tiny_model.attention_maps(inputs["images"], inputs["input_ids"], inputs["attention_mask"])
    expected = target_attention_ratio(maps["top_down"][0].detach().numpy(), target_mask(world, q))
    assert single["top_down"][0] == pytest.approx(expected, rel=1e-5)
    # the score is their mean
    scores = attention_scores(tiny_model, world, split, limit=7, batch_size=3)
    assert set(scores) == set(SCORE_KEYS) == {"bottom_up", "top_down", "bottom_up_others", "top_down_others"}
    for key in SCORE_KEYS:
        assert scores[key] == pytest.approx(mean_ratio(single[key]), rel=1e-4)
    # the control scores the same map on the image's other objects
    others = target_mask(world, q, others=True)
    assert not (others & target_mask(world, q)).any()
    expected = target_attention_ratio(maps["top_down"][0].detach().numpy(), others)
    assert single["top_down_others"][0] == pytest.approx(expected, rel=1e-5, nan_ok=True)
    assert tiny_model.training is False


def test_scores_per_question_type_are_the_means_over_each_type(tiny_model, shapes_root):
    from absvl.data.shapes_world import ShapesWorld

    world = ShapesWorld.load(shapes_root)
    split = "test-dev2015"
    questions = target_questions(world, split, limit=6)
    single = target_attention_ratios(tiny_model, world, questions, split, batch_size=1)
    # two made-up types, alternating; one question left without a type
    types = {q["question_id"]: ("odd" if i % 2 else "even") for i, q in enumerate(questions[:5])}
    scores = attention_scores(tiny_model, world, split, limit=6, question_types=types)
    per_type = scores["per_question_type"]
    assert list(per_type) == ["even", "odd", "unknown"]
    assert [per_type[t]["questions"] for t in per_type] == [3, 2, 1]
    for key in SCORE_KEYS:
        assert per_type["even"][key] == pytest.approx(mean_ratio(single[key][0:5:2]), rel=1e-4, nan_ok=True)
        assert per_type["odd"][key] == pytest.approx(mean_ratio(single[key][1:5:2]), rel=1e-4, nan_ok=True)
        assert per_type["unknown"][key] == pytest.approx(mean_ratio(single[key][5:]), rel=1e-4, nan_ok=True)
        assert scores[key] == pytest.approx(mean_ratio(single[key]), rel=1e-4, nan_ok=True)
    assert "per_question_type" not in attention_scores(tiny_model, world, split, limit=2)


def test_questions_without_target_are_nan_and_excluded(tiny_model, shapes_root):
    from absvl.data.shapes_world import ShapesWorld

    world = ShapesWorld.load(shapes_root)
    split = "test-dev2015"
    questions = target_questions(world, split, limit=2)
    empty = {**questions[0], "target_objects": []}
    ratios = target_attention_ratios(tiny_model, world, [questions[0], empty, questions[1]], split, batch_size=2)
    for kind in MAP_KINDS:
        assert np.isnan(ratios[kind][1]) and not np.isnan(ratios[kind][0])
        assert mean_ratio(ratios[kind]) == pytest.approx(np.mean([ratios[kind][0], ratios[kind][2]]))


def test_training_mode_is_restored(tiny_model, shapes_root):
    from absvl.data.shapes_world import ShapesWorld

    world = ShapesWorld.load(shapes_root)
    tiny_model.train()
    try:
        target_attention_ratios(tiny_model, world, target_questions(world, "test-dev2015", 1), "test-dev2015")
        assert tiny_model.training
    finally:
        tiny_model.eval()


def test_demo_uses_the_library_function():
    from absvl import demo
    from absvl.metrics import attention

    assert demo.attention_scores is attention.attention_scores
