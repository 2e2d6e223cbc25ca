"""VQAv2 loading (official layout and Hugging Face datasets), hold-out, torch dataset and collator."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from absvl.data.problems import VQAFormatError
from absvl.data.vqa import VQAv2Layout, canonical_split, holdout_split, load_vqa_hf, load_vqa_split
from absvl.data.vqa_dataset import VQACollator, VQADataset
from absvl.data.vqa_examples import VQAExample
from absvl.images import BadImageError, image_transform

ANSWERS = ["yes", "no", "red", "blue", "2", "circle"]
A2I = {a: i for i, a in enumerate(ANSWERS)}
QFILE = "v2_OpenEnded_mscoco_train2014_questions.json"
AFILE = "v2_mscoco_train2014_annotations.json"


def _edit(path, fn):
    data = json.loads(Path(path).read_text())
    fn(data)
    Path(path).write_text(json.dumps(data))


# ---------------------------------------------------------------------------------------------
# layout and official loader


def test_split_names():
    assert canonical_split("val2014") == "val" and canonical_split("validation") == "val"
    assert canonical_split("testdev") == "test-dev" and canonical_split("TEST2015") == "test"
    with pytest.raises(ValueError, match="unknown VQAv2 split 'minival'.*train, val, test-dev, test"):
        canonical_split("minival")


@pytest.mark.parametrize("layout", ["images", "flat"])
def test_layout_resolution(make_vqa, layout):
    root = make_vqa(layout=layout)
    lay = VQAv2Layout(root)
    sub = ("images",) if layout == "images" else ()
    assert lay.image_folder("train") == root.joinpath(*sub, "train2014")
    assert lay.image_path("val", 11) == root.joinpath(*sub, "val2014", "COCO_val2014_000000000011.jpg")
    assert lay.image_path("test-dev", 21) == root.joinpath(*sub, "test2015", "COCO_test2015_000000000021.jpg")
    assert lay.questions_file("test-dev").name == "v2_OpenEnded_mscoco_test-dev2015_questions.json"
    assert lay.annotations_file("test") is None
    assert lay.available_splits() == ["train", "val", "test-dev", "test"]
    for ex in load_vqa_split(root, "train"):
        assert Path(ex.image_path).is_file()


def test_layout_subfolders_and_explicit_dirs(vqa_root, tmp_path):
    moved = tmp_path / "moved"
    (moved / "questions").mkdir(parents=True)
    (moved / "annotations").mkdir()
    shutil.move(str(vqa_root / QFILE), moved / "questions" / QFILE)
    shutil.move(str(vqa_root / AFILE), moved / "annotations" / AFILE)
    shutil.move(str(vqa_root / "images"), moved / "coco")
    assert len(load_vqa_split(VQAv2Layout(moved, images_dir=moved / "coco"), "train")) == 8
    explicit = VQAv2Layout(
        tmp_path / "nowhere",
        questions_dir=moved / "questions",
        annotations_dir=moved / "annotations",
        images_dir=moved / "coco" / "train2014",
    )
    examples = load_vqa_split(explicit, "train")
    assert all(Path(ex.image_path).is_file() for ex in examples)  # images_dir itself holds the files


def test_load_official_fixtures(vqa_root):
    train = load_vqa_split(vqa_root, "train")
    assert len(train) == 8 and [ex.question_id for ex in train[:3]] == [10, 11, 20]
    ex = train[0]
    assert isinstance(ex, VQAExample)
    assert (ex.image_id, ex.question, ex.answer_type, ex.question_type) == (1, "what is object 0?", "other", "what is")
    assert ex.answers == ["2"] * 7 + ["blue"] * 2 + ["Zebra!"] and ex.multiple_choice_answer == "2"
    assert ex.image_path.endswith("images/train2014/COCO_train2014_000000000001.jpg")
    assert ex.open_image().mode == "RGB"
    assert len(load_vqa_split(vqa_root, "val2014")) == 6
    test_dev = load_vqa_split(vqa_root, "test-dev")
    assert len(test_dev) == 2 and test_dev[0].answers is None
    assert len(load_vqa_split(vqa_root, "test")) == 4


def test_target_objects_kept(vqa_root):
    _edit(vqa_root / QFILE, lambda d: d["questions"][0].update(target_objects=[0, 2]))
    train = load_vqa_split(vqa_root, "train")
    assert train[0].target_objects == [0, 2] and train[1].target_objects is None


def test_annotations_required_or_optional(vqa_root):
    with pytest.raises(ValueError, match="'test-dev' has no public annotations"):
        load_vqa_split(vqa_root, "test-dev", require_annotations=True)
    (vqa_root / AFILE).unlink()
    with pytest.raises(FileNotFoundError, match=AFILE):
        load_vqa_split(vqa_root, "train")
    examples = load_vqa_split(vqa_root, "train", require_annotations=False)
    assert len(examples) == 8 and examples[0].answers is None


def test_missing_questions_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{QFILE}.*questions/{QFILE}"):
        load_vqa_split(tmp_path, "train")


def _drop_key(d, key):
    d.pop(key)


BAD_INPUTS = {
    # name: (file, edit, strings the error must contain)
    "bad json": (QFILE, "TRUNCATE", ["not valid JSON", "line 1"]),
    "top-level list": (QFILE, lambda d: d.clear() or d.update(questions=5), ["'questions' must be a list"]),
    "no questions key": (QFILE, lambda d: _drop_key(d, "questions"), ["missing top-level key 'questions'", "'info'"]),
    "no annotations key": (AFILE, lambda d: _drop_key(d, "annotations"), ["missing top-level key 'annotations'"]),
    "question missing field": (
        QFILE,
        lambda d: _drop_key(d["questions"][1], "question"),
        ["questions[1] (question_id 11)", "missing field(s) 'question'"],
    ),
    "annotation missing answers": (
        AFILE,
        lambda d: _drop_key(d["annotations"][2], "answers"),
        ["annotations[2] (question_id 20)", "'answers'"],
    ),
    "question entry not object": (
        QFILE,
        lambda d: d["questions"].__setitem__(0, [1, 2]),
        ["questions[0] must be an object"],
    ),
    "string question id": (
        QFILE,
        lambda d: d["questions"][0].update(question_id="10"),
        ["questions[0], field 'question_id': must be an integer, got '10'"],
    ),
    "float image id": (
        AFILE,
        lambda d: d["annotations"][3].update(image_id=2.0),
        ["annotations[3], field 'image_id': must be an integer, got 2.0"],
    ),
    "bool id": (QFILE, lambda d: d["questions"][0].update(image_id=True), ["field 'image_id'"]),
    "empty question": (
        QFILE,
        lambda d: d["questions"][4].update(question="   "),
        ["questions[4] (question_id 30), field 'question': empty question"],
    ),
    "question not a string": (
        QFILE,
        lambda d: d["questions"][4].update(question=None),
        ["field 'question': must be a string"],
    ),
    "duplicate question id": (
        QFILE,
        lambda d: d["questions"].append(dict(d["questions"][0])),
        ["questions[8]: duplicate question_id 10"],
    ),
    "duplicate annotation id": (
        AFILE,
        lambda d: d["annotations"].append(dict(d["annotations"][5])),
        ["annotations[8]: duplicate question_id 31"],
    ),
    "answers empty": (
        AFILE,
        lambda d: d["annotations"][0].update(answers=[]),
        ["(question_id 10), field 'answers'", "non-empty list"],
    ),
    "answers without answer": (AFILE, lambda d: d["annotations"][0].update(answers=[{"x": 1}]), ["field 'answers'"]),
    "answer_type not a string": (AFILE, lambda d: d["annotations"][0].update(answer_type=3), ["field 'answer_type'"]),
    "question without annotation": (
        AFILE,
        lambda d: d["annotations"].pop(3),
        ["1 question(s)", "have no annotation", "question_id 21", AFILE],
    ),
    "annotation without question": (
        QFILE,
        lambda d: d["questions"].pop(0),
        ["1 annotation(s)", "have no question", "question_id 10", QFILE],
    ),
    "image id mismatch": (
        AFILE,
        lambda d: d["annotations"][1].update(image_id=3),
        ["different image_id", "question_id 11: image_id 1 vs 3", QFILE, AFILE],
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_malformed_inputs_name_file_and_field(vqa_root, case):
    name, edit, expected = BAD_INPUTS[case]
    path = vqa_root / name
    if edit == "TRUNCATE":
        path.write_text(path.read_text()[:50])
    else:
        _edit(path, edit)
    with pytest.raises(VQAFormatError) as info:
        load_vqa_split(vqa_root, "train")
    message = str(info.value)
    assert name in message
    for text in expected:
        assert text in message, (text, message)


def test_many_problems_are_summarised(vqa_root):
    _edit(vqa_root / QFILE, lambda d: [q.update(question="") for q in d["questions"]])
    with pytest.raises(VQAFormatError) as info:
        load_vqa_split(vqa_root, "train")
    message = str(info.value)
    assert "8 problem(s)" in message and "and 5 more like the one above" in message
    assert "no annotation" not in message  # the empty questions are not also reported as unmatched


# ---------------------------------------------------------------------------------------------
# Hugging Face datasets


def _hf_dataset(root, images=True):
    import datasets

    examples = load_vqa_split(root, "train")
    data = {
        "question_id": [e.question_id for e in examples],
        "image_id": [e.image_id for e in examples],
        "question": [e.question for e in examples],
        "answers": [[{"answer": a, "answer_id": i + 1} for i, a in enumerate(e.answers)] for e in examples],
        "answer_type": [e.answer_type for e in examples],
    }
    if images:
        from PIL import Image

        data["image"] = [Image.open(e.image_path) for e in examples]
    else:
        data["image_path"] = [e.image_path for e in examples]
    return datasets.Dataset.from_dict(data), examples


def _same(got, expected):
    assert [(e.question_id, e.image_id, e.question, e.answers, e.answer_type) for e in got] == [
        (e.question_id, e.image_id, e.question, e.answers, e.answer_type) for e in expected
    ]


def test_hf_save_to_disk_roundtrip(vqa_root, tmp_path):
    import numpy as np

    ds, expected = _hf_dataset(vqa_root)
    ds.save_to_disk(str(tmp_path / "hf"))
    got = load_vqa_hf(tmp_path / "hf", "train")
    _same(got, expected)
    assert "row 0" in got[0].image_path
    for g, e in zip(got, expected):
        assert np.array_equal(np.asarray(g.open_image()), np.asarray(e.open_image()))


def test_hf_dataset_dict_parquet_and_paths(vqa_root, tmp_path):
    import datasets

    ds, expected = _hf_dataset(vqa_root, images=False)
    _same(load_vqa_hf(ds, "train"), expected)
    assert load_vqa_hf(ds, "train")[0].image_path == expected[0].image_path
    dd = datasets.DatasetDict({"train": ds, "validation": ds.select(range(3))})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert len(load_vqa_hf(tmp_path / "dd", "val")) == 3
    with pytest.raises(ValueError, match="no split 'test'"):
        load_vqa_hf(dd, "test")
    folder = tmp_path / "parquet"
    folder.mkdir()
    ds.to_parquet(str(folder / "train-00000-of-00001.parquet"))
    ds.select(range(2)).to_parquet(str(folder / "validation-00000-of-00001.parquet"))
    _same(load_vqa_hf(folder, "train"), expected)
    assert len(load_vqa_hf(folder / "validation-00000-of-00001.parquet", "val")) == 2
    plain = ds.remove_columns(["answers"]).add_column("answers", [e.answers for e in expected])  # list of str
    _same(load_vqa_hf(plain, "train"), expected)


def test_hf_bad_inputs(vqa_root):
    ds, _ = _hf_dataset(vqa_root)
    with pytest.raises(VQAFormatError, match="missing column\\(s\\) 'question'"):
        load_vqa_hf(ds.remove_columns(["question"]), "train")
    with pytest.raises(VQAFormatError, match="missing column 'answers'"):
        load_vqa_hf(ds.remove_columns(["answers"]), "train")
    assert load_vqa_hf(ds.remove_columns(["answers"]), "test")[0].answers is None
    with pytest.raises(VQAFormatError, match="missing image column"):
        load_vqa_hf(ds.remove_columns(["image"]), "train")
    questions = list(ds["question"])
    questions[3] = ""
    broken = ds.remove_columns(["question"]).add_column("question", questions)
    with pytest.raises(VQAFormatError, match="row 3 \\(question_id 21\\), field 'question': empty question"):
        load_vqa_hf(broken, "train")


def test_hf_bad_image_bytes(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict(
        {"question_id": [1], "image_id": [5], "question": ["q?"], "answers": [["yes"] * 10], "image": [b"not an image"]}
    )
    (ex,) = load_vqa_hf(ds, "train")
    with pytest.raises(BadImageError, match="row 0 \\(question_id 1\\)"):
        ex.open_image()


# ---------------------------------------------------------------------------------------------
# hold-out


def _examples(n_images=50, per_image=3):
    return [
        VQAExample(question_id=i * 10 + k, image_id=i, question="q?", image_path=f"{i}.jpg", answers=["yes"] * 10)
        for i in range(n_images)
        for k in range(per_image)
    ]


def test_holdout_deterministic_and_disjoint():
    examples = _examples()
    rest, held = holdout_split(examples, 10, seed=3)
    rest2, held2 = holdout_split(list(reversed(examples)), 10, seed=3)
    assert {e.image_id for e in held} == {e.image_id for e in held2}  # order does not matter
    assert len({e.image_id for e in held}) == 10 and len(held) == 30 and len(rest) == 120
    assert not {e.image_id for e in held} & {e.image_id for e in rest}
    assert [e.question_id for e in rest] == sorted(e.question_id for e in rest)  # input order kept
    assert {e.image_id for e in holdout_split(examples, 10, seed=4)[1]} != {e.image_id for e in held}
    assert holdout_split(examples, 0, seed=0) == (examples, [])
    with pytest.raises(ValueError, match="between 0 and the 50 images"):
        holdout_split(examples, 51, seed=0)


# ---------------------------------------------------------------------------------------------
# dataset and collator


def test_dataset_drops_unanswerable_and_targets(vqa_root):
    train = load_vqa_split(vqa_root, "train")
    ds = VQADataset(train, A2I, image_transform(16, train=False))
    assert len(ds) == 6 and ds.num_dropped == 2 and ds.dropped_question_ids == [40, 41]  # image 4: "zebra" only
    item = ds[0]
    assert item["image"].shape == (3, 16, 16) and item["question_id"] == 10 and item["question"] == "what is object 0?"
    assert item["targets"] == {A2I["2"]: 1.0, A2I["blue"]: 0.6}  # 7 × "2", 2 × "blue", "Zebra!" unknown
    assert ds[3]["targets"] == {A2I["blue"]: 1.0}  # question 21: 7 + 2 × "blue"
    keep = VQADataset(train, ANSWERS, image_transform(16, train=False), drop_unanswerable=False)
    assert len(keep) == 8 and keep.num_dropped == 0 and keep[6]["targets"] == {}
    test = VQADataset(load_vqa_split(vqa_root, "test"), A2I, image_transform(16, train=False))
    assert len(test) == 4 and test.num_dropped == 0 and test[0]["targets"] == {}


def test_bad_image_skipped_with_its_id(vqa_root, truncate, tokenizer):
    train = load_vqa_split(vqa_root, "train")
    truncate(train[2].image_path)  # image 2: questions 20 and 21
    Path(train[4].image_path).unlink()  # image 3: questions 30 and 31
    ds = VQADataset(train, A2I, image_transform(16, train=False))
    bad = ds[2]
    assert bad["question_id"] == 20 and bad["image_path"] == train[2].image_path and "decoded" in bad["error"]
    loader = torch.utils.data.DataLoader(
        ds, batch_size=4, shuffle=False, collate_fn=VQACollator(tokenizer, len(ANSWERS), 40, image_size=16)
    )
    batches = list(loader)  # never raises
    assert [b["question_ids"].tolist() for b in batches] == [[10, 11], []]
    skipped = [s for b in batches for s in b["skipped"]]
    assert [s[0] for s in skipped] == [20, 21, 30, 31]
    assert skipped[2][1] == train[4].image_path and skipped[2][2] == "file not found"
    empty = batches[1]
    assert empty["images"].shape == (0, 3, 16, 16) and empty["vqa_targets"].shape == (0, len(ANSWERS))
    assert empty["input_ids"].shape[0] == 0 and empty["questions"] == []


def test_collator_shapes_and_targets(vqa_root, tokenizer):
    ds = VQADataset(load_vqa_split(vqa_root, "train"), A2I, image_transform(16, train=False))
    items = [ds[i] for i in range(3)]
    items[0]["question"] = "yes"
    items[1]["question"] = "what is the color of the big shape left of the small circle above the square?"
    batch = VQACollator(tokenizer, len(ANSWERS), max_text_len=8)(items)
    # questions 10 and 11 ask about one image: it is in the batch once
    assert batch["images"].shape == (2, 3, 16, 16) and batch["image_index"].tolist() == [0, 0, 1]
    torch.testing.assert_close(batch["images"][batch["image_index"]], torch.stack([it["image"] for it in items]))
    assert batch["input_ids"].shape == batch["attention_mask"].shape and batch["input_ids"].shape[1] == 8
    assert batch["attention_mask"][0].sum() < 8 and batch["attention_mask"][1].sum() == 8  # padded, truncated
    assert batch["questions"][0] == "yes"
    assert batch["question_ids"].tolist() == [10, 11, 20] and batch["question_ids"].dtype == torch.long
    expected = torch.zeros(3, len(ANSWERS))
    expected[0, A2I["2"]], expected[0, A2I["blue"]] = 1.0, 0.6
    expected[1, A2I["circle"]], expected[1, A2I["blue"]] = 1.0, 0.6
    expected[2, A2I["red"]], expected[2, A2I["blue"]] = 1.0, 0.6
    torch.testing.assert_close(batch["vqa_targets"], expected)
    assert batch["skipped"] == []
    with pytest.raises(IndexError, match="outside the 3 answers"):
        VQACollator(tokenizer, 3)(items)


def test_batch_feeds_the_model(vqa_root, tokenizer, tmp_path):
    from absvl.models.vl import AbsVLConfig, AbsVLForQuestionAnswering, build_tiny_text_encoder

    text_dir = build_tiny_text_encoder(tmp_path / "text", kind="roberta")
    torch.manual_seed(0)
    model = AbsVLForQuestionAnswering(
        AbsVLConfig(
            backbone="absvit_test_patch8",
            text_encoder=str(text_dir),
            fusion_hidden_size=32,
            fusion_layers=1,
            fusion_heads=2,
        ),
        answers=ANSWERS,
    )
    ds = VQADataset(load_vqa_split(vqa_root, "train"), model.answers, image_transform(model.image_size, train=True))
    batch = VQACollator(model.tokenizer, len(model.answers), model.config.max_text_len)([ds[i] for i in range(2)])
    out = model(
        images=batch["images"],
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        labels=batch["vqa_targets"],
        image_index=batch["image_index"],
    )
    assert torch.isfinite(out.losses["vqa"])


def _repository(root, tmp_path):
    """A script-free dataset repository: data/{train,validation}.jsonl + README.md naming the splits, with
    its own column names (qid, text, file) and image paths relative to the image folder."""
    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    images = Path(root) / "images"
    for split, name in (("train", "train"), ("val", "validation")):
        rows = [
            {
                "qid": e.question_id,
                "image_id": e.image_id,
                "text": e.question,
                "answers": e.answers,
                "answer_type": e.answer_type,
                "file": str(Path(e.image_path).relative_to(images)),
            }
            for e in load_vqa_split(root, split)
        ]
        (repo / "data" / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (repo / "README.md").write_text(
        "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: data/train.jsonl\n"
        "  - split: validation\n    path: data/validation.jsonl\n---\n# a tiny VQA dataset\n"
    )
    return repo, images


def test_hf_dataset_repository_with_a_column_mapping_loads_offline(vqa_root, tmp_path, offline):
    import numpy as np

    repo, images = _repository(vqa_root, tmp_path)
    columns = {"question_id": "qid", "question": "text", "image": "file"}
    got = load_vqa_hf(repo, "train", columns=columns, images_root=images)
    expected = load_vqa_split(vqa_root, "train")
    _same(got, expected)
    assert [g.image_path for g in got] == [e.image_path for e in expected]  # relative paths found under images_root
    assert np.array_equal(np.asarray(got[0].open_image()), np.asarray(expected[0].open_image()))
    assert len(load_vqa_hf(repo, "validation", columns=columns, images_root=images)) == len(
        load_vqa_split(vqa_root, "val")
    )
    assert any(offline.iterdir())  # read through datasets.load_dataset, which cached it

    with pytest.raises(VQAFormatError, match="missing column\\(s\\) 'question_id', 'question'.*data.hf_columns"):
        load_vqa_hf(repo, "train", columns={"image": "file"})
    with pytest.raises(VQAFormatError, match="'nope' \\(for question\\) of the column mapping \\(data.hf_columns\\)"):
        load_vqa_hf(repo, "train", columns={**columns, "question": "nope"})
    with pytest.raises(VQAFormatError, match="unknown field\\(s\\) 'questoin'"):
        load_vqa_hf(repo, "train", columns={"questoin": "text"})


def test_hf_hub_id_not_cached_offline_is_a_clear_error(offline):
    with pytest.raises(
        FileNotFoundError,
        match="'absvl-test/not-cached' is neither a local path nor in the datasets "
        "cache, and offline mode is on \\(HF_HUB_OFFLINE",
    ):
        load_vqa_hf("absvl-test/not-cached", "train")


# ---------------------------------------------------------------------------------------------
# the prior loss's data: which pairs are its positives, which patches are the question's objects


@pytest.mark.parametrize(
    ("question", "answer", "absent"),
    [
        ("is there a red circle?", "no", True),
        ("  Are there any squares?", "No.", True),  # the answer normalised, the question lower-cased
        ("how many circles are there?", "0", True),
        ("How many blue squares?", "none", True),  # the official number words: "none" → "0"
        ("how many circles are there?", "zero", True),
        ("is there a red circle?", "yes", False),
        ("are there two squares?", "yes", False),
        ("how many circles are there?", "2", False),
        ("is the circle red?", "no", False),  # names an object that is there
        ("what color is the circle?", "0", False),
        ("what is there left of the square?", "no", False),
        ("is there a red circle?", None, False),  # unannotated
    ],
)
def test_says_absent(question, answer, absent):
    ex = VQAExample(question_id=1, image_id=1, question=question, image_path="x.jpg", multiple_choice_answer=answer)
    assert ex.says_absent is absent


def test_items_and_batches_say_which_pairs_are_prior_positives(vqa_root, tokenizer):
    train = load_vqa_split(vqa_root, "train")
    train[0].question, train[0].multiple_choice_answer = "is there a red circle?", "no"  # absent
    train[1].question, train[1].multiple_choice_answer = "how many circles?", "0"  # absent
    train[2].question, train[2].multiple_choice_answer = "how many circles?", "2"
    ds = VQADataset(train, A2I, image_transform(16, train=False))
    items = [ds[i] for i in range(4)]
    assert [it["prior_positive"] for it in items] == [False, False, True, True]
    assert "patch_objects" not in items[0] and "target_labels" not in items[0]  # no object masks given
    batch = VQACollator(tokenizer, len(ANSWERS), 16)(items)
    assert batch["prior_positive"].dtype == torch.bool and batch["prior_positive"].tolist() == [
        False,
        False,
        True,
        True,
    ]
    assert "patch_objects" not in batch and "target_objects" not in batch and "pointer_objects" not in batch
    # an item whose image is unreadable leaves its row out of prior_positive too
    bad = {"error": "broken", "question_id": 99, "image_path": "x.jpg"}
    batch = VQACollator(tokenizer, len(ANSWERS), 16)([items[0], bad, items[2]])
    assert batch["prior_positive"].tolist() == [False, True] and batch["question_ids"].tolist() == [10, 20]


def _patch_owners(mask: np.ndarray, cell: int) -> list[int]:
    """Each cell's object (row-major), counted by hand: the object with the most pixels when it covers at
    least a quarter of the cell, else 0 (background)."""
    owners = []
    for y in range(0, mask.shape[0], cell):
        for x in range(0, mask.shape[1], cell):
            counts = np.bincount(mask[y : y + cell, x : x + cell].ravel(), minlength=mask.max() + 1)[1:]
            owners.append(int(counts.argmax()) + 1 if counts.size and counts.max() >= cell * cell / 4 else 0)
    return owners


def test_object_masks_give_each_patch_its_object_and_each_question_its_objects(shapes_root, tokenizer):
    from PIL import Image

    from absvl.data.shapes_world import ShapesWorld

    world = ShapesWorld.load(shapes_root)
    examples = load_vqa_split(shapes_root, "train")[:24]
    assert any(ex.target_objects for ex in examples) and any(not ex.target_objects for ex in examples)
    answers = sorted({ex.multiple_choice_answer for ex in examples})
    size = world.image_size  # 32: a 4x4 grid of 8-pixel patches
    ds = VQADataset(examples, answers, image_transform(size, train=False), object_masks=world.mask_of, grid=(4, 4))
    items = [ds[i] for i in range(len(examples))]
    for ex, item in zip(examples, items):
        mask = np.asarray(Image.open(world.mask_path("train2014", ex.image_id)))
        assert item["patch_objects"].shape == (16,) and item["patch_objects"].dtype == torch.long
        assert item["patch_objects"].tolist() == _patch_owners(mask, 8)
        assert item["target_labels"] == [k + 1 for k in ex.target_objects or ()]
        assert item["prior_positive"] is not ex.says_absent
    batch = VQACollator(tokenizer, len(answers), 16)(items)
    assert batch["patch_objects"].shape == (24, 16)
    torch.testing.assert_close(batch["patch_objects"], torch.stack([it["patch_objects"] for it in items]))
    labels = max(int(batch["patch_objects"].max()), max(max(it["target_labels"], default=0) for it in items)) + 1
    assert batch["target_objects"].shape == (24, labels) and batch["target_objects"].dtype == torch.bool
    for row, ex in enumerate(examples):
        expected = {k + 1 for k in ex.target_objects or ()}
        assert set(batch["target_objects"][row].nonzero().flatten().tolist()) == expected
        assert not batch["target_objects"][row, 0]  # background is nobody's object
        # the pointers' hops: hop 1 on the last object the question names (a relation's reference), hop 2 on the first
        named = [k + 1 for k in ex.target_objects or ()]
        assert batch["pointer_objects"][row].tolist() == ([named[-1], named[0]] if named else [0, 0])
    assert batch["pointer_objects"].dtype == torch.long
    # a coarser grid: the map is put on it at 8 pixels a cell (nearest neighbour), then owned as above
    coarse = VQADataset(examples, answers, image_transform(size, train=False), object_masks=world.mask_of, grid=(2, 3))
    for i in range(4):
        with Image.open(world.mask_path("train2014", examples[i].image_id)) as mask:
            small = np.asarray(mask.resize((24, 16), Image.Resampling.NEAREST))
        assert coarse[i]["patch_objects"].tolist() == _patch_owners(small, 8)


def test_object_masks_need_the_grid_and_a_missing_mask_skips_the_item(shapes_root, tokenizer, tmp_path):
    from absvl.data.shapes_world import ShapesWorld

    world = ShapesWorld.load(shapes_root)
    examples = load_vqa_split(shapes_root, "train")[:2]
    transform = image_transform(world.image_size, train=False)
    with pytest.raises(ValueError, match="object_masks need the backbone's patch grid"):
        VQADataset(examples, ["yes"], transform, object_masks=world.mask_of)
    missing = tmp_path / "nowhere.png"
    ds = VQADataset(examples, ["yes"], transform, drop_unanswerable=False, object_masks=lambda *_: missing, grid=(4, 4))
    item = ds[0]
    assert item["image_path"] == str(missing) and "unreadable object mask" in item["error"]
    batch = VQACollator(tokenizer, 1, 16)([ds[0], ds[1]])
    assert len(batch["question_ids"]) == 0 and [s[0] for s in batch["skipped"]] == [ex.question_id for ex in examples]
    assert "patch_objects" not in batch


def test_grouped_training_order_puts_an_images_questions_in_one_batch(vqa_root, tokenizer):
    from absvl.training.data import EpochOrder

    examples = load_vqa_split(vqa_root, "train")
    ds = VQADataset(examples, A2I, image_transform(16, train=False), group_size=2)
    assert ds.group_keys == [ex.image_path for ex in ds.examples]
    first, second, other = ds[0], ds[1], ds[2]  # questions 10 and 11 ask about one image, 20 about another
    assert second["image"] is first["image"]  # decoded once for consecutive questions of an image
    assert not torch.equal(other["image"], first["image"]) and ds[1]["image"] is not first["image"]
    loader = torch.utils.data.DataLoader(
        EpochOrder(ds, seed=0, epoch=0), batch_size=2, collate_fn=VQACollator(tokenizer, len(ANSWERS), 40)
    )
    batches = list(loader)
    # every image has two questions: each batch of two holds one image, asked twice
    assert [len(b["images"]) for b in batches] == [1] * len(batches)
    assert all(b["image_index"].tolist() == [0, 0] for b in batches)
    assert sorted(q for b in batches for q in b["question_ids"].tolist()) == sorted(
        ex.question_id for ex in ds.examples
    )
    with pytest.raises(ValueError, match="group_size"):
        VQADataset(examples, A2I, image_transform(16, train=False), group_size=0)
