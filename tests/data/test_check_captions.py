"""The Hugging Face Karpathy layout (``filepath`` + ``filename`` columns) and ``absvl data check`` of caption
datasets: Karpathy JSON, local Hugging Face datasets, Hub ids."""

import json

import pytest
import torch
from PIL import Image

from absvl.cli import main
from absvl.data.captions import CaptionedImageDataset, load_captions_hf
from absvl.data.check import check_dataset, detect_kind

# (filepath, split) of images 0..3; image i has cocoid 100 + i and i + 1 captions
IMAGES = [("train2014", "train"), ("val2014", "restval"), ("val2014", "test"), ("val2014", "test")]


def coco_name(i):
    return f"COCO_{IMAGES[i][0]}_{100 + i:012d}.jpg"


def karpathy_repo(tmp_path, drop=(), images="coco"):
    """Images (tiny PNGs named .jpg, as COCO's) under tmp/IMAGES/<filepath>/ and a dataset repository folder
    tmp/repo/data/<split>-00000-of-00001.parquet in the Hub's Karpathy layout (one row per image, a file per
    split), without the columns ``drop``."""
    import datasets

    rows = []
    for i, (folder, split) in enumerate(IMAGES):
        (tmp_path / images / folder).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (60 * i, 0, 0)).save(tmp_path / images / folder / coco_name(i), format="PNG")
        captions = [f"image {i} caption {k}." for k in range(i + 1)]
        rows.append(
            dict(filepath=folder, filename=coco_name(i), sentences=captions, split=split, imgid=i, cocoid=100 + i)
        )
    (tmp_path / "repo" / "data").mkdir(parents=True)
    for split in dict.fromkeys(split for _, split in IMAGES):
        table = {k: [r[k] for r in rows if r["split"] == split] for k in rows[0] if k not in drop}
        datasets.Dataset.from_dict(table).to_parquet(
            str(tmp_path / "repo" / "data" / f"{split}-00000-of-00001.parquet")
        )
    return tmp_path / "repo"


def data_check(*args):
    return main(["data", "check", *map(str, args)])


def test_filepath_and_filename_columns_load_without_a_mapping(tmp_path, offline):
    repo = karpathy_repo(tmp_path)
    got = load_captions_hf(repo, ["train", "restval", "test"], images_root=tmp_path / "coco")
    got.sort(key=lambda g: g.image_id)  # dataset order: the files restval, test, train
    assert [(g.image_id, g.path, g.split) for g in got] == [
        (i, tmp_path / "coco" / folder / coco_name(i), split) for i, (folder, split) in enumerate(IMAGES)
    ]
    assert got[2].captions == ("image 2 caption 0.", "image 2 caption 1.", "image 2 caption 2.")

    # without imgid the COCO id is the image id; without images_root the dataset's folder is looked in;
    # without a split column the file's name tells it (restval too)
    other = karpathy_repo(tmp_path / "other", drop=("imgid", "split"), images="repo")
    (test,) = load_captions_hf(other, ["restval"])
    assert test.image_id == 101 and test.path == other / "val2014" / coco_name(1)

    # a missing file is loaded and then skipped while loading batches, as for the caption file
    (tmp_path / "coco" / "val2014" / coco_name(3)).unlink()
    got = load_captions_hf(repo, ["test"], images_root=tmp_path / "coco")
    item = CaptionedImageDataset(got, lambda im: torch.zeros(3, 4, 4))[1]
    assert item["error"] == "file not found" and item["image_path"].endswith(coco_name(3))


def test_check_a_hugging_face_caption_dataset(tmp_path, offline, capsys):
    repo = karpathy_repo(tmp_path)
    assert detect_kind(repo) == "captions"
    report = check_dataset(repo, images=tmp_path / "coco", progress=False)
    assert report.ok, report.format()
    assert report.counts["test"] == {
        "images": 2,
        "captions": 7,
        "min/image": 3,
        "max/image": 4,
        "checked": 2,
        "missing": 0,
        "unreadable": 0,
    }
    assert list(report.counts) == ["train", "restval", "test"]

    (tmp_path / "coco" / "val2014" / coco_name(3)).unlink()
    (tmp_path / "coco" / "val2014" / coco_name(1)).write_bytes(b"not an image")
    assert data_check(repo, "--images", tmp_path / "coco", "--splits", "restval", "test", "val") == 1
    out = capsys.readouterr().out
    assert "caption dataset check:" in out and "val: not in the dataset" in out
    assert "test: 1 of 2 images are missing (4 caption(s) use them)" in out
    assert f"{tmp_path / 'coco' / 'val2014' / coco_name(3)} (image_id 3)" in out
    assert "restval: 1 of 1 images cannot be read (2 caption(s) use them)" in out
    assert f"{coco_name(1)} (image_id 1): not a recognised image" in out
    assert "result: FAILED (2 error(s))" in out
    assert data_check(repo, "--splits", "testing") == 2
    assert "unknown Karpathy split" in capsys.readouterr().err


def test_check_a_karpathy_caption_file(tmp_path, capsys):
    images = [
        {"filepath": folder, "filename": coco_name(i), "imgid": i, "split": split, "sentences": [{"raw": "a."}] * 5}
        for i, (folder, split) in enumerate(IMAGES)
    ]
    for i, (folder, _) in enumerate(IMAGES[:3]):  # image 3 has no file
        (tmp_path / folder).mkdir(exist_ok=True)
        Image.new("RGB", (8, 8)).save(tmp_path / folder / coco_name(i), format="PNG")
    f = tmp_path / "dataset_coco.json"
    f.write_text(json.dumps({"images": images}))
    assert data_check(f) == 1
    out = capsys.readouterr().out
    assert "caption dataset check:" in out and f"{coco_name(3)} (image_id 3)" in out
    report = check_dataset(f, splits="train,restval", progress=False)
    assert report.ok and report.counts["train"]["captions"] == 5 and report.counts["restval"]["max/image"] == 5

    images[1]["sentences"] = []
    f.write_text(json.dumps({"images": images}))
    report = check_dataset(f, progress=False)
    assert not report.ok and "images[1], field 'sentences': needs a non-empty list" in report.errors[0]


def test_errors_name_the_column_and_say_what_to_do(tmp_path, offline, capsys):
    import datasets

    folder = tmp_path / "words"
    folder.mkdir()
    table = {"img": ["a.png"], "words": [["a cat."]], "split": ["test"]}
    datasets.Dataset.from_dict(table).to_parquet(str(folder / "all.parquet"))
    assert detect_kind(folder) == "vqa"  # no caption column under a known name
    assert data_check(folder, "--kind", "captions") == 1
    out = capsys.readouterr().out
    assert "words: no column for captions" in out and "--column FIELD=COLUMN" in out
    assert data_check(folder, "--kind", "captions", "--column", "captions=words") == 1
    out = capsys.readouterr().out  # the mapping is taken; the image is not there
    assert "test: 1 of 1 images are missing (1 caption(s) use them)" in out and "a.png (image_id 0)" in out

    bad = tmp_path / "bad"
    bad.mkdir()
    table = {"image": ["a.png", "b.png"], "caption": ["a cat.", ""], "split": ["test", "test"]}
    datasets.Dataset.from_dict(table).to_parquet(str(bad / "all.parquet"))
    report = check_dataset(bad, progress=False)
    assert report.kind == "caption" and not report.ok
    assert f"{bad} row 1, column 'caption': needs a caption" in report.errors[0]


def test_hub_id_not_cached_is_one_line(offline, tmp_path, capsys):
    assert data_check("absvl-test/not-cached") == 1
    captured = capsys.readouterr()
    assert "'absvl-test/not-cached' is neither a local path nor in the datasets cache" in captured.out
    assert "Traceback" not in captured.out + captured.err
    report = check_dataset("absvl-test/not-cached", kind="captions", progress=False)
    assert len(report.errors) == 1 and "load it once online to cache it" in report.errors[0]
    assert data_check(tmp_path / "absent.parquet", "--kind", "captions") == 1
    assert "absent.parquet does not exist" in capsys.readouterr().out


@pytest.mark.parametrize("kind", ["vqa", "captions"])
def test_kind_of_a_vqa_root(vqa_root, kind):
    assert detect_kind(vqa_root) == "vqa"
    report = check_dataset(vqa_root, kind=kind, splits=["train"], progress=False)
    assert report.kind == ("VQA" if kind == "vqa" else "caption")
