"""Karpathy caption files: parsing, image paths, errors naming the entry, the caption dataset."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from absvl.data.captions import CaptionCollator, CaptionedImageDataset, load_karpathy
from absvl.training.data import EpochOrder


def write(path, images):
    path.write_text(json.dumps({"images": images, "dataset": "test"}))
    return path


def entry(i, split="test", filepath=None, captions=("a red circle.", "a circle.")):
    e = {"filename": f"{i}.jpg", "imgid": i, "split": split, "sentences": [{"raw": c, "tokens": c.split()} for c in captions]}
    if filepath:
        e["filepath"] = filepath
    return e


def test_paths_splits_and_captions(tmp_path):
    f = write(tmp_path / "dataset_coco.json", [entry(0, "train", "train2014"), entry(1, "restval", "val2014"),
                                              entry(2, "test", "val2014"), entry(3, "val")])
    train = load_karpathy(f, ["train", "restval"], images_root="/coco")
    assert [(im.image_id, str(im.path)) for im in train] == [(0, "/coco/train2014/0.jpg"), (1, "/coco/val2014/1.jpg")]
    (val,) = load_karpathy(f, ["val"])
    assert val.path == tmp_path / "3.jpg" and val.captions == ("a red circle.", "a circle.") and val.split == "val"
    with pytest.raises(ValueError, match="unknown Karpathy split"):
        load_karpathy(f, ["testing"])


def test_the_shapes_world_caption_file(shapes_root):
    images = load_karpathy(shapes_root / "dataset_shapes.json", ["train", "val", "test"], shapes_root / "images")
    assert len(images) == 40 and all(len(im.captions) == 5 and im.path.is_file() for im in images)


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"filename": "x.jpg", "imgid": 0, "split": "test"}, r"images\[0\] is missing field\(s\) 'sentences'"),
        ({**entry(0), "imgid": "7"}, r"images\[0\], field 'imgid': must be an integer"),
        ({**entry(0), "split": "dev"}, r"images\[0\], field 'split': 'dev' is not one of"),
        ({**entry(0), "sentences": [{"raw": "  "}]}, r"images\[0\], field 'sentences'"),
        ({**entry(0), "sentences": []}, r"images\[0\], field 'sentences'"),
        ("oops", r"images\[0\] must be an object"),
    ],
)
def test_malformed_entries_are_named(tmp_path, bad, message):
    f = write(tmp_path / "c.json", [bad, entry(1)])
    with pytest.raises(ValueError, match=message) as err:
        load_karpathy(f)
    assert str(f) in str(err.value)


def test_file_level_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="captions file not found"):
        load_karpathy(tmp_path / "missing.json")
    (tmp_path / "cut.json").write_text('{"images": [')
    with pytest.raises(ValueError, match="not valid JSON"):
        load_karpathy(tmp_path / "cut.json")
    (tmp_path / "other.json").write_text('{"annotations": []}')
    with pytest.raises(ValueError, match="missing top-level key 'images'"):
        load_karpathy(tmp_path / "other.json")
    with pytest.raises(ValueError, match="appears twice"):
        load_karpathy(write(tmp_path / "dup.json", [entry(1), entry(1)]))
    with pytest.raises(ValueError, match="no image in split"):
        load_karpathy(write(tmp_path / "train.json", [entry(1, "train")]), ["test"])


def test_dataset_draws_captions_per_epoch_and_skips_bad_images(tmp_path):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "0.jpg")
    (tmp_path / "1.jpg").write_bytes(b"broken")
    captions = tuple(f"caption {i}." for i in range(5))
    images = load_karpathy(write(tmp_path / "c.json", [entry(0, captions=captions), entry(1)]))
    dataset = CaptionedImageDataset(images, lambda im: torch.zeros(3, 4, 4))
    drawn = {EpochOrder(dataset, seed=0, epoch=e, shuffle=False)[0]["caption"] for e in range(12)}
    assert drawn <= set(captions) and len(drawn) > 1  # other captions in other epochs
    assert EpochOrder(dataset, 0, 3, shuffle=False)[0]["caption"] == EpochOrder(dataset, 0, 3, shuffle=False)[0]["caption"]
    bad = dataset[1]
    assert bad["index"] == 1 and "not a recognised image" in bad["error"]

    class Tokenizer:
        def __call__(self, texts, **kwargs):
            return {"input_ids": torch.ones(len(texts), 3, dtype=torch.long), "attention_mask": torch.ones(len(texts), 3)}

    batch = CaptionCollator(Tokenizer(), image_size=4)([dataset[0], bad])
    assert batch["images"].shape == (1, 3, 4, 4) and batch["indices"].tolist() == [0]
    assert batch["input_ids"].shape == (1, 3) and batch["skipped"][0][:2] == (1, str(tmp_path / "1.jpg"))
    empty = CaptionCollator(Tokenizer(), image_size=4)([bad])
    assert empty["images"].shape == (0, 3, 4, 4) and "input_ids" not in empty
