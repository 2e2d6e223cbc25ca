"""Karpathy caption files: parsing, image paths, errors naming the entry, the caption dataset."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from absvl.data.captions import CaptionCollator, CaptionedImageDataset, load_captions, load_captions_hf, load_karpathy
from absvl.training.data import EpochOrder


def write(path, images):
    path.write_text(json.dumps({"images": images, "dataset": "test"}))
    return path


def entry(i, split="test", filepath=None, captions=("a red circle.", "a circle.")):
    e = {
        "filename": f"{i}.jpg",
        "imgid": i,
        "split": split,
        "sentences": [{"raw": c, "tokens": c.split()} for c in captions],
    }
    if filepath:
        e["filepath"] = filepath
    return e


def test_paths_splits_and_captions(tmp_path):
    f = write(
        tmp_path / "dataset_coco.json",
        [entry(0, "train", "train2014"), entry(1, "restval", "val2014"), entry(2, "test", "val2014"), entry(3, "val")],
    )
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
    with pytest.raises(FileNotFoundError, match=r"missing\.json \(a Karpathy captions file\) does not exist"):
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
    assert (
        EpochOrder(dataset, 0, 3, shuffle=False)[0]["caption"] == EpochOrder(dataset, 0, 3, shuffle=False)[0]["caption"]
    )
    bad = dataset[1]
    assert bad["index"] == 1 and "not a recognised image" in bad["error"]

    class Tokenizer:
        def __call__(self, texts, **kwargs):
            return {
                "input_ids": torch.ones(len(texts), 3, dtype=torch.long),
                "attention_mask": torch.ones(len(texts), 3),
            }

    batch = CaptionCollator(Tokenizer(), image_size=4)([dataset[0], bad])
    assert batch["images"].shape == (1, 3, 4, 4) and batch["indices"].tolist() == [0]
    assert batch["input_ids"].shape == (1, 3) and batch["skipped"][0][:2] == (1, str(tmp_path / "1.jpg"))
    empty = CaptionCollator(Tokenizer(), image_size=4)([bad])
    assert empty["images"].shape == (0, 3, 4, 4) and "input_ids" not in empty


def test_foils_ride_with_their_items_and_are_padded_with_the_captions(tmp_path):
    for i in range(3):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / f"{i}.jpg")
    images = load_karpathy(write(tmp_path / "c.json", [entry(i) for i in range(3)]))
    seen = []

    def foil(path, caption):  # a foil for every image but the second
        seen.append((path.name, caption))
        return None if path.name == "1.jpg" else caption.replace("red", "blue long long")

    dataset = CaptionedImageDataset(images, lambda im: torch.zeros(3, 4, 4), foil=foil)
    items = [dataset[i] for i in range(3)]
    assert [(name, it["caption"]) for (name, _), it in zip(seen, items)] == [
        (f"{i}.jpg", it["caption"]) for i, it in enumerate(items)
    ]

    class Tokenizer:  # one id per word, padded to the longest text of the call
        def __call__(self, texts, **kwargs):
            longest = max(len(t.split()) for t in texts)
            mask = torch.tensor([[1] * len(t.split()) + [0] * (longest - len(t.split())) for t in texts])
            return {"input_ids": mask * 7, "attention_mask": mask}

    batch = CaptionCollator(Tokenizer(), image_size=4)(items)
    assert batch["foil_rows"].tolist() == [i for i in (0, 2) if items[i]["foil"]]
    assert batch["foil_ids"].shape[1] == batch["input_ids"].shape[1]  # one padding: the rows join one forward
    assert batch["foil_mask"].sum(1).tolist() == [len(items[i]["foil"].split()) for i in batch["foil_rows"].tolist()]
    assert batch["attention_mask"].sum(1).tolist() == [len(it["caption"].split()) for it in items]
    plain = CaptionCollator(Tokenizer(), image_size=4)(
        [CaptionedImageDataset(images, lambda im: torch.zeros(3, 4, 4))[0]]
    )
    assert "foil_rows" not in plain and "foil" not in CaptionedImageDataset(images, lambda im: torch.zeros(3, 4, 4))[0]


# --- Hugging Face caption datasets ---------------------------------------------------------------
def shapes_images(shapes_root, splits=("train", "val", "test")):
    return load_karpathy(shapes_root / "dataset_shapes.json", splits, shapes_root / "images")


def bytes_repository(shapes_root, tmp_path):
    """Flickr30K-style repository: one parquet file (one dataset split, "test") of rows {picture: image bytes,
    sentences: Karpathy sentences, subset: train/validation/test, imgid: digits}, with a README naming the file."""
    import datasets

    images = shapes_images(shapes_root)
    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    features = datasets.Features(
        {
            "picture": datasets.Image(),
            "sentences": [{"raw": datasets.Value("string")}],
            "subset": datasets.Value("string"),
            "imgid": datasets.Value("string"),
        }
    )
    datasets.Dataset.from_dict(
        {
            "picture": [{"bytes": im.path.read_bytes(), "path": None} for im in images],
            "sentences": [[{"raw": c} for c in im.captions] for im in images],
            "subset": [{"val": "validation"}.get(im.split, im.split) for im in images],
            "imgid": [str(im.image_id) for im in images],
        },
        features=features,
    ).to_parquet(repo / "data" / "all.parquet")
    (repo / "README.md").write_text(
        "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: test\n"
        "    path: data/all.parquet\n---\n# Shapes captions\n"
    )
    return repo


def test_hf_repository_with_image_bytes_loads_like_the_caption_file_and_caches_the_images(
    shapes_root, tmp_path, offline, caplog
):
    repo = bytes_repository(shapes_root, tmp_path)
    columns = {"image": "picture", "split": "subset"}  # sentences and imgid are found under their own names
    with caplog.at_level("INFO", logger="absvl.data.captions"):
        got = load_captions_hf(repo, ["train", "val"], columns)
    assert "36 image(s) in" in caplog.text and "36 of them written now" in caplog.text
    caplog.clear()
    expected = shapes_images(shapes_root, ["train", "val"])
    assert [(g.image_id, g.captions, g.split) for g in got] == [(e.image_id, e.captions, e.split) for e in expected]
    assert all(g.path.read_bytes() == e.path.read_bytes() and g.path.suffix == ".jpg" for g, e in zip(got, expected))
    assert all(g.path.is_relative_to(offline / "absvl_images") for g in got)  # next to the dataset's own cache

    written = {g.path: g.path.stat().st_mtime_ns for g in got}
    with caplog.at_level("INFO", logger="absvl.data.captions"):
        again = load_captions(repo, ["train", "val"], columns=columns)  # not a .json file: a Hugging Face dataset
    assert again == got and {g.path: g.path.stat().st_mtime_ns for g in again} == written
    assert "36 image(s) in" in caplog.text and "0 of them written now" in caplog.text
    assert not list((offline / "absvl_images").rglob(".*.tmp"))


def test_hf_one_row_per_caption_with_image_files_and_dataset_splits(shapes_root, tmp_path, offline):
    """COCO-style: one row per caption {image_id, caption, file: relative path}, one json file per dataset split."""
    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    for split, name in (("train", "train"), ("val", "validation"), ("test", "test")):
        rows = [
            {"image_id": im.image_id, "caption": c, "file": str(im.path.relative_to(shapes_root / "images"))}
            for im in shapes_images(shapes_root, [split])
            for c in im.captions
        ]
        (repo / "data" / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = load_captions_hf(repo, ["val", "test"], {"image": "file"}, images_root=shapes_root / "images")
    assert got == shapes_images(shapes_root, ["val", "test"])  # grouped by image, files used where they are
    assert not (offline / "absvl_images").exists()


def test_hf_rows_without_an_id_are_grouped_by_image_and_rows_without_an_image_left_out(tmp_path, caplog):
    import datasets

    red, blue = (tmp_path / f"{c}.png" for c in ("red", "blue"))
    Image.new("RGB", (8, 8), "red").save(red)
    Image.new("RGB", (8, 8), "blue").save(blue)
    dataset = datasets.Dataset.from_dict(
        {
            "image": [
                {"bytes": red.read_bytes(), "path": None},
                {"bytes": blue.read_bytes(), "path": None},
                {"bytes": red.read_bytes(), "path": None},
                None,
                {"bytes": b"broken", "path": None},
            ],
            "text": ["a red square.", "a blue square.", "a square.", "nothing.", "a broken image."],
        },
        features=datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")}),
    )
    with caplog.at_level("WARNING"):
        got = load_captions_hf(datasets.DatasetDict(test=dataset), cache_dir=tmp_path / "cache")
    assert [(g.image_id, g.captions, g.path.suffix) for g in got] == [
        (0, ("a red square.", "a square."), ".png"),
        (1, ("a blue square.",), ".png"),
        (4, ("a broken image.",), ".img"),
    ]
    assert "1 image(s) left out, the dataset holds no image for them" in caplog.text
    item = CaptionedImageDataset(got, lambda im: torch.zeros(3, 4, 4))[2]  # unreadable: skipped while loading
    assert item["index"] == 2 and "not a recognised image" in item["error"]


def test_hf_column_mapping_and_row_errors_name_the_column(tmp_path):
    import datasets

    def load(columns=None, **rows):
        table = {"image": ["a.jpg", "b.jpg"], "caption": ["a cat.", "a dog."], "split": ["test", "test"], **rows}
        return load_captions_hf(datasets.Dataset.from_dict(table), ["test"], columns, cache_dir=tmp_path)

    assert [im.captions for im in load()] == [("a cat.",), ("a dog.",)]
    with pytest.raises(
        ValueError, match=r"unknown field\(s\) 'caption' .*the fields are image, captions, split, image_id"
    ):
        load({"caption": "caption"})
    with pytest.raises(ValueError, match=r"'nope' \(for captions\) of the column mapping \(data.hf_columns\)"):
        load({"captions": "nope"})
    with pytest.raises(
        ValueError,
        match=r"no column for captions \(looked for captions: captions, caption.*"
        r"columns: image, split, words\): name it with data.hf_columns",
    ):
        load_captions_hf(datasets.Dataset.from_dict({"image": ["a.jpg"], "split": ["test"], "words": ["a cat."]}))
    with pytest.raises(ValueError, match=r"row 1, column 'caption': needs a caption or a non-empty list"):
        load(caption=["a cat.", "  "])
    with pytest.raises(ValueError, match=r"row 0, column 'split': 'dev2' is not a split name"):
        load(split=["dev2", "test"])
    with pytest.raises(ValueError, match=r"row 1, column 'imgid': must be an integer, got 'b'"):
        load(imgid=["1", "b"])
    with pytest.raises(
        ValueError,
        match=r"has no image in split\(s\) test \(its splits: \(unnamed\);.*"
        r"data.hf_columns",
    ):
        load_captions_hf(datasets.Dataset.from_dict({"image": ["a.jpg"], "caption": ["a cat."]}), cache_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown caption format 'csv'"):
        load_captions("captions.csv", format="csv")
    with pytest.raises(ValueError, match="applies to Hugging Face datasets"):
        load_captions(tmp_path / "dataset_coco.json", columns={"image": "img"})


def test_hf_hub_id_not_cached_offline_is_a_clear_error(offline):
    with pytest.raises(
        FileNotFoundError,
        match="'absvl-test/not-cached' is neither a local path nor in the datasets cache, and offline mode is on",
    ):
        load_captions_hf("absvl-test/not-cached")
