"""``caption_holds``: a caption of the Shapes world's language checked against any scene."""

import json

import pytest

from absvl.data.shapes_text import caption_holds


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
