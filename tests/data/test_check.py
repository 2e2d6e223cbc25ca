"""``absvl data check``: the report on clean and broken datasets, and the exit code."""

import json
from pathlib import Path

from absvl.cli import main
from absvl.data.check import check_vqa

ANSWERS = ["yes", "no", "red", "blue", "2", "circle"]
QFILE = "v2_OpenEnded_mscoco_train2014_questions.json"
AFILE = "v2_mscoco_train2014_annotations.json"


def data_check(*args):
    """``absvl data check ARGS``: its exit code (the report is printed)."""
    return main(["data", "check", *map(str, args)])


def _edit(path, fn):
    data = json.loads(Path(path).read_text())
    fn(data)
    Path(path).write_text(json.dumps(data))


def test_clean_dataset_ok(vqa_root, capsys):
    report = check_vqa(vqa_root, answers=ANSWERS, progress=False)
    assert report.ok, report.format()
    assert list(report.counts) == ["train", "val", "test-dev", "test"]
    assert report.counts["train"] == dict(
        questions=8, annotations=8, examples=8, images=4, checked=4, missing=0, unreadable=0, unanswerable=2
    )
    assert report.counts["test"]["annotations"] is None and report.counts["test"]["images"] == 2
    # 2 questions of image 4 answered "zebra" only (20 answers); the 6 others have one "Zebra!" each
    (vocab_warning,) = [w for w in report.warnings if w.startswith("train:")]
    assert "26 of 80 human answers (32.50%)" in vocab_warning and "2 of 8 questions (25.00%)" in vocab_warning
    assert "question_id 40, 41" in vocab_warning
    text = report.format()
    assert "result: OK" in text and "train" in text
    assert data_check(vqa_root) == 0
    out = capsys.readouterr().out
    assert "result: OK" in out and "answers outside the vocabulary not checked" in out


def test_every_kind_of_problem(vqa_root, truncate, capsys):
    images = vqa_root / "images" / "train2014"
    truncate(images / "COCO_train2014_000000000002.jpg")
    (images / "COCO_train2014_000000000003.jpg").unlink()

    def questions(d):
        d["questions"][0]["question"] = ""  # question 10
        d["questions"].append(dict(d["questions"][1]))  # duplicate 11

    def annotations(d):
        d["annotations"].pop(7)  # question 41 without annotation
        d["annotations"][6]["image_id"] = 1  # question 40: image_id 4 vs 1
        d["annotations"][2]["answers"] = d["annotations"][2]["answers"][:9]
        d["annotations"][3]["answer_type"] = "color"
        d["annotations"].append(dict(d["annotations"][0], question_id=99))  # annotation without question

    _edit(vqa_root / QFILE, questions)
    _edit(vqa_root / AFILE, annotations)
    (vqa_root / "v2_mscoco_val2014_annotations.json").write_text('{"annotations": [')
    report = check_vqa(vqa_root, answers=ANSWERS, progress=False)
    assert not report.ok
    errors = "\n".join(report.errors)
    expected = [
        "field 'question': empty question",
        "questions[8]: duplicate question_id 11",
        "question(s) of",
        "have no annotation",
        "question_id 41",
        "annotation(s) of",
        "have no question",
        "question_id 99",
        "question_id 40: image_id 4 vs 1",
        "1 of 3 images are missing",
        "COCO_train2014_000000000003.jpg",
        "1 of 3 images cannot be read",
        "COCO_train2014_000000000002.jpg: cannot be decoded",
        "val: ",
        "v2_mscoco_val2014_annotations.json (a VQAv2 annotations file) is not valid JSON",
    ]
    for text in expected:
        assert text in errors, (text, errors)
    warnings = "\n".join(report.warnings)
    assert "1 annotation(s) do not have 10 answers (counts seen: {9: 1})" in warnings
    assert "answer_type outside yes/no, number, other (seen: 'color')" in warnings
    assert report.counts["train"]["examples"] == 5  # 10, 40, 41 and the duplicate of 11 left out
    assert "val" in report.counts and report.counts["val"]["examples"] is None
    assert data_check(vqa_root, "--splits", "train", "val") == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "COCO_train2014_000000000003.jpg" in out


def test_decompression_bomb_and_max_images(vqa_root):
    report = check_vqa(vqa_root, splits=["train"], max_pixels=100, progress=False)
    assert not report.ok and "4 of 4 images cannot be read" in report.errors[0]
    assert "over the limit of 100" in report.errors[0]
    limited = check_vqa(vqa_root, splits="val", max_images=2, progress=False)
    assert limited.ok and limited.counts["val"]["checked"] == 2 and limited.counts["val"]["images"] == 3
    assert any("val: checked the first 2 of 3 images" in n for n in limited.notes)


def test_answers_file_and_missing_things(vqa_root, tmp_path, capsys):
    from absvl.data.answers import save_answers

    save_answers(tmp_path / "answers.json", ANSWERS)
    assert data_check(vqa_root, "--splits", "train", "--answers", tmp_path / "answers.json") == 0
    assert "unanswerable" in capsys.readouterr().out
    report = check_vqa(vqa_root, answers=tmp_path / "nope.json", progress=False)
    assert not report.ok and "nope.json" in report.errors[0]
    assert data_check(tmp_path / "absent") == 1
    assert "does not exist" in capsys.readouterr().out
    empty = tmp_path / "empty"
    empty.mkdir()
    report = check_vqa(empty, progress=False)
    assert not report.ok and "no VQAv2 questions file" in report.errors[0]
    assert data_check(vqa_root, "--splits", "minival") == 2
    assert "unknown VQAv2 split 'minival'" in capsys.readouterr().err
    (vqa_root / AFILE).unlink()
    report = check_vqa(vqa_root, splits=["train"], progress=False)
    assert not report.ok and AFILE in report.errors[0]


def test_deeply_nested_json_is_a_line_of_the_report(vqa_root, tmp_path, capsys):
    # '[' x 50 MB as a questions file: json's parser recursed into a RecursionError traceback
    deep = "[" * 200_000
    (vqa_root / QFILE).write_text(deep)
    (vqa_root / "v2_mscoco_val2014_annotations.json").write_text('{"annotations": ' + deep)
    (tmp_path / "answers.json").write_text(deep)

    assert data_check(vqa_root, "--splits", "train", "val", "test") == 1
    out = capsys.readouterr().out
    assert f"train: {vqa_root / QFILE} (a VQAv2 questions file) nests its JSON too deeply to read" in out
    assert f"val: {vqa_root / 'v2_mscoco_val2014_annotations.json'} (a VQAv2 annotations file) nests its JSON" in out
    assert "result: FAILED (2 error(s))" in out and "test " in out  # the other splits are still checked
    report = check_vqa(vqa_root, answers=tmp_path / "answers.json", progress=False)
    assert len(report.errors) == 1 and report.errors[0].startswith(
        f"{tmp_path / 'answers.json'} (an answer vocabulary) nests its JSON too deeply to read"
    )


def test_shared_ids_between_train_and_val(vqa_root):
    _edit(vqa_root / "v2_OpenEnded_mscoco_val2014_questions.json", lambda d: d["questions"][0].update(question_id=10))
    _edit(vqa_root / "v2_mscoco_val2014_annotations.json", lambda d: d["annotations"][0].update(question_id=10))
    report = check_vqa(vqa_root, splits=["train", "val"], progress=False)
    assert report.ok and any("1 question_id(s) appear in both train and val" in w for w in report.warnings)


def test_hugging_face_dataset(vqa_root, tmp_path):
    import datasets
    from PIL import Image

    from absvl.data.vqa import load_vqa_split

    examples = load_vqa_split(vqa_root, "train")
    images = [Image.open(e.image_path) for e in examples]
    images_bytes = [Path(e.image_path).read_bytes() for e in examples]
    images_bytes[5] = b"broken"
    ds = datasets.Dataset.from_dict(
        {
            "question_id": [e.question_id for e in examples],
            "image_id": [e.image_id for e in examples],
            "question": [e.question for e in examples],
            "answers": [e.answers for e in examples],
            "answer_type": [e.answer_type for e in examples],
            "image": images,
        }
    )
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "hf"))
    report = check_vqa(tmp_path / "hf", answers=ANSWERS, progress=False)
    assert report.ok, report.format()
    assert report.counts["train"]["examples"] == 8 and "val: not in the dataset" in report.notes
    broken = ds.remove_columns(["image"]).add_column("image", images_bytes)
    broken.save_to_disk(str(tmp_path / "hf_broken"))
    report = check_vqa(tmp_path / "hf_broken", splits=["train"], progress=False)
    assert not report.ok and "row 5 (question_id 31)" in report.errors[0]
