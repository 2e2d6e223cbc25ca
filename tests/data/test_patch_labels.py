"""Patch-labelled data: targets per patch, the dataset's errors and flips, the Shapes world's export."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from absvl.data.imagefolder import ClassifyCollator, ImageFolderError
from absvl.data.patch_labels import (
    ATTRIBUTES_FILE,
    IGNORE_INDEX,
    PatchLabelDataset,
    list_labelled,
    patch_accuracy,
    patch_targets,
    read_attributes,
    read_classes,
)
from absvl.data.shapes_world import patch_label_attributes, patch_label_classes
from absvl.images import open_image


def test_patch_targets_follow_the_object_share_rule():
    labels = np.zeros((16, 16), np.uint8)
    labels[0:3, 0:3] = 2  # 9 of 64 pixels: too little to own the patch -> background
    labels[0:8, 12:16] = 1  # 32 of 64 pixels of the top-right patch: owned by class 1
    labels[8:16, 0:8] = 255  # unlabelled patch -> ignored
    labels[8:10, 8:16] = 2  # 16 of 64 pixels (25 %) of class 2 beats 48 of background
    assert patch_targets(labels, 8, 3).tolist() == [0, 1, IGNORE_INDEX, 2]
    # without a background class the majority wins
    assert patch_targets(labels, 8, 3, background=None).tolist() == [0, 0, IGNORE_INDEX, 0]
    with pytest.raises(ValueError, match="not a whole number of 8-pixel patches"):
        patch_targets(labels[:12], 8, 3)
    with pytest.raises(ValueError, match="label 7 is not one of the 3 classes"):
        patch_targets(np.full((8, 8), 7, np.uint8), 8, 3)


def _dataset(root, n=3, size=16):
    (root / "train" / "images").mkdir(parents=True)
    (root / "train" / "labels").mkdir(parents=True)
    (root / "classes.json").write_text(json.dumps(["background", "thing"]))
    for i in range(n):
        image = np.zeros((size, size, 3), np.uint8)
        image[:, : size // 2] = 255  # white left half
        Image.fromarray(image).save(root / "train" / "images" / f"im{i}.png")
        labels = np.zeros((size, size), np.uint8)
        labels[:, : size // 2] = 1  # the thing is the left half
        Image.fromarray(labels).save(root / "train" / "labels" / f"im{i}.png")
    return root


def test_dataset_items_flip_image_and_labels_together(tmp_path):
    root = _dataset(tmp_path / "d")
    assert read_classes(root) == ["background", "thing"]
    samples = list_labelled(root, "train")
    to_tensor = lambda im: torch.from_numpy(np.asarray(im, dtype=np.float32).copy()).permute(2, 0, 1)  # noqa: E731
    plain = PatchLabelDataset(samples, to_tensor, image_size=16, patch=8, num_classes=2)[0]
    assert plain["label"].tolist() == [1, 0, 1, 0] and plain["image"][0, 0, 0] == 255
    flipped = PatchLabelDataset(samples, to_tensor, image_size=16, patch=8, num_classes=2, hflip=1.0)[0]
    assert flipped["label"].tolist() == [0, 1, 0, 1] and flipped["image"][0, 0, 0] == 0
    batch = ClassifyCollator(16)([plain, flipped])
    assert batch["labels"].shape == (2, 4) and batch["images"].shape == (2, 3, 16, 16)


def test_a_cached_dataset_reads_each_file_once_and_gives_the_same_items(tmp_path, monkeypatch):
    import random

    from absvl.data import patch_labels

    root = _dataset(tmp_path / "d")
    (root / "train" / "images" / "im2.png").write_bytes(b"not a png")
    samples = list_labelled(root, "train")
    to_tensor = lambda im: torch.from_numpy(np.asarray(im, dtype=np.float32).copy()).permute(2, 0, 1)  # noqa: E731
    plain = PatchLabelDataset(samples, to_tensor, image_size=16, patch=8, num_classes=2, hflip=0.5)
    cached = PatchLabelDataset(samples, to_tensor, image_size=16, patch=8, num_classes=2, hflip=0.5, cache=True)
    opened = []
    monkeypatch.setattr(patch_labels, "open_image", lambda path, **kw: opened.append(path) or open_image(path, **kw))
    flips = set()
    for epoch in range(4):
        for i in range(2):
            random.seed(10 * epoch + i)
            expected = plain[i]
            random.seed(10 * epoch + i)
            item = cached[i]
            # the mirror of the tensor and of the patch grid is the item of the mirrored image and label map
            assert torch.equal(item["image"], expected["image"]) and torch.equal(item["label"], expected["label"])
            flips.add(item["label"].tolist()[0])
    assert flips == {0, 1}  # both orientations came up
    # the uncached dataset opened its images every epoch, the cached one once
    assert len(opened) == 4 * 2 + 2
    # an unreadable item is reported every time, not cached
    assert "error" in cached[2] and "error" in cached[2] and 2 not in cached._cache


def test_bad_files_are_reported_not_raised(tmp_path):
    root = _dataset(tmp_path / "d")
    (root / "train" / "labels" / "im1.png").write_bytes(b"not a png")
    (root / "train" / "images" / "im2.png").write_bytes(b"not a png")
    samples = list_labelled(root, "train")
    data = PatchLabelDataset(samples, lambda im: torch.zeros(3, 16, 16), image_size=16, patch=8, num_classes=2)
    assert "error" not in data[0]
    assert data[1]["path"].endswith("labels/im1.png") and "label map" in data[1]["error"]
    assert data[2]["path"].endswith("images/im2.png")
    batch = ClassifyCollator(16)([data[i] for i in range(3)])
    assert len(batch["labels"]) == 1 and len(batch["skipped"]) == 2


def test_layout_errors_name_the_folder(tmp_path):
    root = _dataset(tmp_path / "d")
    with pytest.raises(ImageFolderError, match="val/images does not exist"):
        list_labelled(root, "val")
    (root / "train" / "labels" / "im0.png").unlink()
    with pytest.raises(ImageFolderError, match="have no label map"):
        list_labelled(root, "train")
    (root / "classes.json").write_text('{"a": 1}')
    with pytest.raises(ImageFolderError, match="non-empty list of class names"):
        read_classes(root)


def test_shapes_world_writes_patch_labels_of_its_objects(shapes_root):
    from absvl.data.shapes_world import ShapesWorld

    root = shapes_root / "patch_labels"
    classes = read_classes(root)
    assert classes == patch_label_classes() and classes[0] == "background" and len(classes) == 43
    world = ShapesWorld.load(shapes_root)
    scenes = world.load_scenes()
    train = list_labelled(root, "train")
    assert len(train) == world.splits["train2014"] and len(list_labelled(root, "val")) == world.splits["val2014"]
    image_path, label_path = train[0]
    scene = next(s for s in scenes.values() if s["file_name"] == image_path.rsplit("/", 1)[-1])
    labels = np.asarray(Image.open(label_path))
    mask = np.asarray(Image.open(world.mask_path(scene["split"], scene["image_id"])))
    for obj in scene["objects"]:  # every visible pixel of an object carries its "<size> <color> <shape>" class
        kind = f"{obj['size']} {obj['color']} {obj['shape']}"
        assert set(np.unique(labels[mask == obj["label"]])) == {classes.index(kind)}
    assert set(np.unique(labels[mask == 0])) == {0}
    # the images are the world's own
    assert Image.open(image_path).tobytes() == Image.open(world.image_path(scene["split"], scene["image_id"])).tobytes()


# --------------------------------------------------------------------------- accuracies per kind of patch
ATTRIBUTES = {"color": [None, "red", "red", "blue"], "shape": [None, "circle", "square", "circle"]}
# classes: 0 background, 1 red circle, 2 red square, 3 blue circle; rows true, columns predicted
CONFUSION = torch.tensor(
    [
        [50, 2, 0, 3],  # background: 50 of 55 right
        [4, 10, 3, 1],  # red circle: 10 right, 3 red square (colour right), 1 blue circle (shape right)
        [1, 2, 6, 0],  # red square: 6 right, 2 red circle (colour right)
        [0, 5, 0, 8],  # blue circle: 8 right, 5 red circle (shape right)
    ]
)


def test_patch_accuracy_from_a_hand_counted_confusion_matrix():
    result = patch_accuracy(CONFUSION, 0, ATTRIBUTES)
    assert set(result) == {"top1", "background", "objects", "color", "shape"}
    assert result["top1"] == pytest.approx(100 * 74 / 95)
    assert result["background"] == pytest.approx(100 * 50 / 55)
    # the 40 object patches: 24 right; a patch taken for background is wrong in every attribute
    assert result["objects"] == pytest.approx(100 * 24 / 40)
    assert result["color"] == pytest.approx(100 * (13 + 8 + 8) / 40)
    assert result["shape"] == pytest.approx(100 * (11 + 6 + 13) / 40)
    # the background class need not be the first: the same data with the classes reordered
    order = [2, 0, 3, 1]  # new class i is old class order[i]: background is now 1
    permuted = CONFUSION[order][:, order]
    reordered = {name: [values[i] for i in order] for name, values in ATTRIBUTES.items()}
    assert patch_accuracy(permuted, 1, reordered) == pytest.approx(result)
    # no background class: top-1 alone; no attributes: none scored
    assert patch_accuracy(CONFUSION, None, ATTRIBUTES) == {"top1": pytest.approx(100 * 74 / 95)}
    assert set(patch_accuracy(CONFUSION, 0, {})) == {"top1", "background", "objects"}


def test_patch_accuracy_without_object_patches_is_nan_not_an_error():
    confusion = torch.zeros(3, 3, dtype=torch.long)
    confusion[0, 0], confusion[0, 2] = 3, 1
    result = patch_accuracy(confusion, 0, {"color": [None, "red", "blue"]})
    assert result["top1"] == result["background"] == pytest.approx(75.0)
    assert np.isnan(result["objects"]) and np.isnan(result["color"])
    assert np.isnan(patch_accuracy(torch.zeros(2, 2), None, {})["top1"])


def test_read_attributes_checks_one_value_per_class(tmp_path):
    classes = ["background", "red circle", "red square", "blue circle"]
    assert read_attributes(tmp_path, classes) == {}  # optional
    (tmp_path / ATTRIBUTES_FILE).write_text(json.dumps(ATTRIBUTES))
    assert ATTRIBUTES_FILE == "attributes.json" and read_attributes(tmp_path, classes) == ATTRIBUTES
    with pytest.raises(ImageFolderError, match=r"attributes.json must map each attribute name to a list of 3 values"):
        read_attributes(tmp_path, classes[:3])
    for bad in ({"color": [None, "red", 1, "blue"]}, ["red"], {"color": "red"}):
        (tmp_path / ATTRIBUTES_FILE).write_text(json.dumps(bad))
        with pytest.raises(ImageFolderError, match="one per class of classes.json"):
            read_attributes(tmp_path, classes)
    (tmp_path / ATTRIBUTES_FILE).write_text("{not json")
    with pytest.raises(ImageFolderError, match="attributes.json"):
        read_attributes(tmp_path, classes)


def test_shapes_attributes_name_each_class_size_colour_and_shape(shapes_root):
    from absvl.data.shapes_scene import COLORS, SHAPES, SIZES

    classes, attributes = patch_label_classes(), patch_label_attributes()
    assert set(attributes) == {"size", "color", "shape"}
    assert all(values[0] is None for values in attributes.values())  # background
    for k, name in enumerate(classes[1:], start=1):
        assert name == f"{attributes['size'][k]} {attributes['color'][k]} {attributes['shape'][k]}"
    assert len(set(classes)) == len(classes) == 1 + len(SIZES) * len(COLORS) * len(SHAPES)
    assert set(attributes["color"][1:]) == set(COLORS) and set(attributes["shape"][1:]) == set(SHAPES)
    assert set(attributes["size"][1:]) == set(SIZES)
    # the world writes them beside classes.json, and they read back for its classes
    root = shapes_root / "patch_labels"
    assert json.loads((root / ATTRIBUTES_FILE).read_text()) == attributes
    assert read_attributes(root, read_classes(root)) == attributes
