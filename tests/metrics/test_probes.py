"""Linear probes of the tokens the fusion reads: the ridge classifier, the object patches' tokens and labels of a
tiny Shapes world, the split into fit and score halves, the table."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from absvl.data.patch_labels import patch_targets
from absvl.data.shapes_scene import COLORS, SHAPES
from absvl.metrics.probes import (
    PASSES,
    PROBED,
    format_probe_table,
    object_patch_tokens,
    ridge_probe,
    split_probes,
    token_probes,
)

SPLIT = "train2014"


# --- the ridge probe ----------------------------------------------------------------------------
def _clusters(n, classes=3, dim=6, noise=0.1, seed=0):
    """Points near one centre per class: linearly separable."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    centres = 3.0 * torch.eye(classes, dim)
    return centres[labels] + noise * torch.randn(n, dim, generator=g), labels


def test_ridge_probe_reads_a_linearly_separable_property_perfectly():
    train_x, train_y = _clusters(60, seed=0)
    test_x, test_y = _clusters(30, seed=1)
    assert ridge_probe(train_x, train_y, test_x, test_y) == 100.0
    # the features are standardised: their scale and offset change nothing
    assert ridge_probe(1000 * train_x + 7, train_y, 1000 * test_x + 7, test_y) == 100.0
    # each feature on its own: the property in features of tiny scale, noise in features of large scale
    scales = torch.tensor([1e-4, 1e-4, 1e-4, 1e3, 1e3, 1e3])
    assert ridge_probe(train_x * scales, train_y, test_x * scales, test_y) == 100.0
    # a property the features do not carry is read at chance
    wrong = ridge_probe(train_x, train_y, test_x, (test_y + 1) % 3)
    assert wrong == 0.0


def test_ridge_probe_on_random_labels_is_near_chance():
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(800, 16, generator=g), torch.randn(800, 16, generator=g)
    y, u = torch.randint(0, 4, (800,), generator=g), torch.randint(0, 4, (800,), generator=g)
    accuracy = ridge_probe(x, y, t, u)
    assert 17.0 < accuracy < 33.0  # chance 25 %, std ~1.5 %
    # separable train labels scored against shuffled test labels: chance too
    train_x, train_y = _clusters(300, classes=4, seed=2)
    test_x, test_y = _clusters(800, classes=4, seed=3)
    shuffled = test_y[torch.randperm(len(test_y), generator=g)]
    assert 17.0 < ridge_probe(train_x, train_y, test_x, shuffled) < 33.0


def test_ridge_probe_without_rows_is_nan():
    x, y = _clusters(10)
    assert math.isnan(ridge_probe(x, y, x[:0], y[:0]))
    assert math.isnan(ridge_probe(x[:0], y[:0], x, y))


def test_ridge_probe_scores_a_class_unseen_in_training_as_wrong():
    train_x, train_y = _clusters(60, classes=2, dim=6)
    test_x, test_y = _clusters(40, classes=3, dim=6, seed=5)  # class 2 never fitted
    accuracy = ridge_probe(train_x, train_y, test_x, test_y)
    seen = (test_y < 2).double().mean().item()
    assert accuracy == pytest.approx(100.0 * seen)


def test_token_probes_probe_each_property_from_each_pass():
    x, shape = _clusters(90, classes=3, seed=0)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(90, 6, generator=g)
    fit = {"bottom_up": x[:60], "top_down": noise[:60], "shape": shape[:60]}
    fit["color"], fit["position"] = shape[:60], (shape[:60] + 1) % 3
    score = {"bottom_up": x[60:], "top_down": noise[60:], "shape": shape[60:]}
    score["color"], score["position"] = shape[60:], (shape[60:] + 1) % 3
    result = token_probes(fit, score)
    assert set(result) == {*PASSES, "patches"} and result["patches"] == 30
    assert result["bottom_up"] == {"shape": 100.0, "color": 100.0, "position": 100.0}
    for name in PROBED:
        assert result["top_down"][name] == ridge_probe(noise[:60], fit[name], noise[60:], score[name])
    assert result["top_down"]["shape"] < 70.0
    only = token_probes(fit, score, properties=("color",))
    assert set(only["bottom_up"]) == {"color"}


def test_format_probe_table():
    result = {
        "bottom_up": {"shape": 100.0, "color": 87.25, "position": 12.5},
        "top_down": {"shape": 50.0, "color": float("nan"), "position": 3.0},
        "patches": 10,
    }
    lines = format_probe_table(result).splitlines()
    assert len(lines) == 3
    assert all(name in lines[0] for name in PROBED)
    assert lines[1].split() == ["bottom-up", "100.0%", "87.2%", "12.5%"]
    assert lines[2].split() == ["top-down", "50.0%", "nan%", "3.0%"]


# --- on a tiny world with a tiny model ----------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model(tiny_vl):
    return tiny_vl(global_pool="avg")  # fc_norm: the fusion's tokens are normalised


def _first_questions(world, split, limit):
    from absvl.io import read_json

    chosen = {}
    for q in read_json(world.questions_path(split))["questions"]:
        chosen.setdefault(q["image_id"], q)
        if len(chosen) >= limit:
            break
    return list(chosen.values())


def test_object_patch_tokens_are_the_object_patches_of_each_image(tiny_model, world):
    tiny_model.train()
    tokens = object_patch_tokens(tiny_model, world, SPLIT, limit=4, batch_size=3)
    assert tiny_model.training  # the mode is restored
    tiny_model.eval()
    scenes = world.load_scenes()
    questions = _first_questions(world, SPLIT, 4)
    # every object-owned cell of each image, in order, with its object's shape and colour
    expected = {"shape": [], "color": [], "position": [], "image": []}
    for q in questions:
        objects = scenes[q["image_id"]]["objects"]
        mask = np.asarray(Image.open(world.mask_path(SPLIT, q["image_id"])))
        owners = patch_targets(mask, 8, len(objects) + 1)  # 32 px images on a 4x4 grid
        for cell in np.flatnonzero(owners > 0):
            obj = objects[owners[cell] - 1]
            assert obj["label"] == owners[cell]
            expected["shape"].append(list(SHAPES).index(obj["shape"]))
            expected["color"].append(list(COLORS).index(obj["color"]))
            expected["position"].append(int(cell))
            expected["image"].append(q["image_id"])
    n = len(expected["shape"])
    assert n > 0
    for name, values in expected.items():
        assert tokens[name].dtype == torch.long and tokens[name].tolist() == values, name
    width = tiny_model.backbone.num_features
    assert tokens["bottom_up"].shape == tokens["top_down"].shape == (n, width)
    # the normalised tokens the fusion reads, of the first pass and of the second under the image's first question
    q = questions[0]
    inputs = tiny_model.prepare_inputs(
        images=[Image.open(world.image_path(SPLIT, q["image_id"]))], text=[q["question"]]
    )
    with torch.no_grad():
        _, xi = tiny_model.encode_prior(inputs["input_ids"], inputs["attention_mask"])
        vision = tiny_model.encode_vision(inputs["images"], xi)
    cells = [c for c, i in zip(expected["position"], expected["image"]) if i == q["image_id"]]
    rows = slice(0, len(cells))
    for kind in PASSES:
        reads = tiny_model.fusion_image_tokens(vision, kind)[0, 1:][cells]
        torch.testing.assert_close(tokens[kind][rows], reads, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(tokens["bottom_up"], tokens["top_down"])
    # fc_norm's tokens: zero mean per token before its affine map (weight 1, bias 0 at init)
    torch.testing.assert_close(tokens["bottom_up"].mean(-1), torch.zeros(n), atol=1e-4, rtol=0)


def test_split_probes_fit_on_the_first_half_of_the_images_and_score_the_second(tiny_model, world):
    tokens = object_patch_tokens(tiny_model, world, SPLIT, limit=6)
    images = tokens.pop("image")
    ids = images.unique()  # sorted
    assert len(ids) == 6
    second = images >= ids[3]
    result = split_probes(tiny_model, world, SPLIT, limit=6)
    assert result["patches"] == int(second.sum()) > 0
    fit = {k: v[~second] for k, v in tokens.items()}
    score = {k: v[second] for k, v in tokens.items()}
    for kind in PASSES:
        for name in PROBED:
            expected = ridge_probe(fit[kind], fit[name], score[kind], score[name])
            assert result[kind][name] == pytest.approx(expected, abs=1e-6)
            assert 0.0 <= result[kind][name] <= 100.0
    assert len(format_probe_table(result).splitlines()) == 3
