"""``caption_holds``: a caption of the Shapes world's language checked against any scene; its form
(``caption_kind``) and its foils (``caption_foil``), the captions made false by one change."""

import json
import random

import numpy as np
import pytest

from absvl.data.shapes_scene import COLORS, SHAPES
from absvl.data.shapes_text import CAPTION_KINDS, caption_foil, caption_holds, caption_kind, tokens
from absvl.data.shapes_world import ShapesWorld


def _obj(color, shape, size, x, y):
    return {"color": color, "shape": shape, "size": size, "center": [x, y]}


SCENE = [
    _obj("red", "circle", "small", 10, 30),
    _obj("blue", "square", "large", 40, 30),
    _obj("red", "triangle", "small", 25, 5),
]
MARGIN = 4.0


@pytest.mark.parametrize(
    "caption, expected",
    [
        ("a small red circle left of a large blue square.", (True, True)),
        ("a large blue square left of a small red circle.", (True, False)),  # the objects, the wrong relation
        ("a red circle right of a blue square.", (True, False)),
        ("a small red triangle above a red circle.", (True, True)),
        ("a green circle left of a blue square.", (False, False)),  # an object missing
        ("from left to right: a small red circle, a small red triangle and a large blue square.", (True, True)),
        ("from left to right: a large blue square, a small red circle and a small red triangle.", (True, False)),
        ("from top to bottom: a small red triangle, a small red circle and a large blue square.", (True, True)),
        ("two red shapes and a blue shape.", (True, None)),
        ("three red shapes.", (False, None)),  # counts: as many as named
        ("a circle, a square and a triangle.", (True, None)),
        ("two circles and a square.", (False, None)),
        ("three shapes: a red circle, a blue square and a red triangle.", (True, None)),
        ("a small red circle, a large blue square and a small red triangle on a gradient background.", (True, None)),
    ],
)
def test_caption_holds_for_each_caption_form(caption, expected):
    assert caption_holds(caption, SCENE, MARGIN) == expected


def test_a_relation_within_the_margin_is_not_right():
    close = [_obj("red", "circle", "small", 10, 30), _obj("blue", "square", "large", 12, 30)]  # 2 px apart
    assert caption_holds("a red circle left of a blue square.", close, MARGIN) == (True, False)


def test_texts_outside_the_language_are_not_judged():
    for text in ("a photo of a dog.", "a red circle near a blue square.", "several circles."):
        assert caption_holds(text, SCENE, MARGIN) is None


def test_every_caption_of_a_world_holds_for_its_own_scene(shapes_root):
    scenes = json.loads((shapes_root / "scenes.json").read_text())
    by_file = {scene["file_name"]: scene["objects"] for scene in scenes["images"]}
    images = json.loads((shapes_root / "dataset_shapes.json").read_text())["images"]
    checked = 0
    for image in images:
        for sentence in image["sentences"]:
            present, related = caption_holds(sentence["raw"], by_file[image["filename"]], scenes["relation_margin"])
            assert present and related is not False, sentence["raw"]
            checked += 1
    assert checked == 5 * len(images)


@pytest.mark.parametrize(
    "caption, kind",
    [
        ("a small red circle left of a large blue square.", "relation"),
        ("from top to bottom: a small red triangle, a small red circle and a large blue square.", "order"),
        ("two red shapes and a blue shape.", "colour counts"),
        ("a circle, a square and a triangle.", "shape counts"),
        ("three shapes: a red circle, a blue square and a red triangle.", "object list"),
        ("a small red circle and a large blue square on a gradient background.", "object list"),
        ("a photo of a dog.", None),
    ],
)
def test_caption_kind_names_the_form(caption, kind):
    assert caption_kind(caption) == kind


def _one_word_changed(caption, foil):
    """The positions where the two texts' words differ (an article that follows its noun's first letter aside)."""
    a, b = caption.rstrip(".").split(" "), foil.rstrip(".").split(" ")
    return [i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y and {x, y} != {"a", "an"}]


@pytest.mark.parametrize("seed", range(5))
def test_a_foil_changes_one_thing_and_no_longer_holds(seed):
    rng = np.random.default_rng(seed)
    for caption in (  # each holds for the scene
        "a small red circle left of a large blue square.",
        "two red shapes and a blue shape.",
        "three shapes: a red circle, a blue square and a red triangle.",
    ):
        foil = caption_foil(caption, SCENE, MARGIN, rng)
        assert foil is not None and foil.endswith(".") and caption_kind(foil) == caption_kind(caption)
        present, related = caption_holds(foil, SCENE, MARGIN)
        assert not (present and related is not False), (caption, foil)
        assert len(_one_word_changed(caption, foil)) == 1 or " right of " in foil, (caption, foil)
        if caption_kind(caption) in ("shape counts", "colour counts"):  # a form positives never take: no repeats
            named = [w.removesuffix("s") for w in tokens(foil) if w.removesuffix("s") in (*COLORS, *SHAPES)]
            assert len(named) == len(set(named)), foil


def test_an_order_foil_swaps_neighbours_and_a_relation_foil_turns_the_relation():
    caption = "from left to right: a small red circle, a small red triangle and a large blue square."
    foils = {caption_foil(caption, SCENE, MARGIN, np.random.default_rng(seed)) for seed in range(60)}
    assert "from left to right: a small red triangle, a small red circle and a large blue square." in foils
    relation = "a small red circle left of a large blue square."
    foils = {caption_foil(relation, SCENE, MARGIN, np.random.default_rng(seed)) for seed in range(60)}
    assert "a small red circle right of a large blue square." in foils
    assert "an orange circle left of a large blue square." not in foils  # a size kept: only one word changes
    assert any(f.startswith("a small orange circle") for f in foils)  # "a" before a consonant, "an" before a vowel
    assert all(not f.startswith("a small an") for f in foils)


def test_no_foil_when_every_change_still_holds():
    # every shape is named already (a count caption names each once), and a foil must be false for the scene
    assert caption_foil("a circle, a square and a triangle.", SCENE, MARGIN, np.random.default_rng(0)) is None
    assert caption_foil("a photo of a dog.", SCENE, MARGIN, np.random.default_rng(0)) is None


def test_the_world_makes_a_foil_for_nearly_every_caption_from_its_scenes(shapes_root):
    world = ShapesWorld.load(shapes_root)
    foil = world.caption_foils()
    images = json.loads((shapes_root / "dataset_shapes.json").read_text())["images"]
    scenes, made, total = world.scene_objects(), 0, 0
    random.seed(0)
    for image in images:
        path = shapes_root / "images" / image["filepath"] / image["filename"]
        for sentence in image["sentences"]:
            text = foil(path, sentence["raw"])
            total += 1
            if text is None:
                continue
            made += 1
            present, related = caption_holds(text, scenes[image["filename"]], world.relation_margin)
            assert not (present and related is not False)
    assert made >= 0.9 * total
    assert set(CAPTION_KINDS) >= {caption_kind(s["raw"]) for im in images for s in im["sentences"]}
