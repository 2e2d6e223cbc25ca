"""``absvl.pipeline``: VQA answers and attention maps from PIL images, paths and arrays, one or a
list at a time; ``absvl predict vqa-file``."""

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

import absvl
from absvl import AbsVLConfig, AbsVLForQuestionAnswering
from absvl.cli import main
from absvl.models.vl import build_tiny_text_encoder, preprocess_image

ANSWERS = ["yes", "no", "red", "blue", "circle", "square"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    text_dir = build_tiny_text_encoder(tmp_path_factory.mktemp("text"))
    torch.manual_seed(0)
    config = AbsVLConfig(
        backbone="absvit_test_patch8",
        text_encoder=str(text_dir),
        fusion_hidden_size=32,
        fusion_layers=1,
        fusion_heads=2,
    )
    model = AbsVLForQuestionAnswering(config, answers=ANSWERS)
    with torch.no_grad():  # a feedback path strong enough for visible top-down effects
        for p in model.backbone.decoders.parameters():
            p.mul_(10.0)
    return model.eval()


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8))


def test_vqa_pipeline_ranks_answers(model, image, tmp_path):
    vqa = absvl.pipeline("vqa", model=model)
    result = vqa(image, "what color is the circle?", top_k=3)
    assert [set(r) for r in result] == [{"answer", "score"}] * 3
    assert all(r["answer"] in ANSWERS for r in result)
    scores = [r["score"] for r in result]
    assert scores == sorted(scores, reverse=True) and all(0.0 <= s <= 1.0 for s in scores)
    assert len(vqa(image, "is it red?", top_k=100)) == len(ANSWERS)

    path = tmp_path / "image.png"
    image.save(path)
    assert vqa(str(path), "what color is the circle?", top_k=3) == result
    assert vqa(np.asarray(image), "what color is the circle?", top_k=3) == result

    batched = vqa(image, ["what color is the circle?", "is there a square?"], top_k=2)
    assert len(batched) == 2 and [r["answer"] for r in batched[0]] == [r["answer"] for r in result[:2]]
    # a batch of two runs other matrix kernels than one item: equal up to float rounding
    assert [r["score"] for r in batched[0]] == pytest.approx([r["score"] for r in result[:2]], rel=1e-6)
    with pytest.raises(ValueError, match="2 images for 3 texts"):
        vqa([image, image], ["a", "b", "c"])


def _count_forwards(model, monkeypatch):
    """The batch size of every forward pass of ``model`` through a pipeline."""
    sizes = []
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda images, *a, **k: sizes.append(len(images)) or forward(images, *a, **k))
    return sizes


def test_vqa_pipeline_batches_lists_like_transformers(model, image, monkeypatch):
    vqa = absvl.pipeline("vqa", model=model, batch_size=2)
    questions = ["what color is the circle?", "is there a square?", "how many shapes?", "is it red?", "what shape?"]
    sizes = _count_forwards(model, monkeypatch)
    one_by_one = [vqa(image, q, top_k=2) for q in questions]
    assert isinstance(one_by_one[0], list) and isinstance(one_by_one[0][0], dict)  # one input: one result
    del sizes[:]
    batched = vqa([image] * 5, questions, top_k=2)
    assert sizes == [2, 2, 1] and len(batched) == 5
    for got, want in zip(batched, one_by_one):
        assert [r["answer"] for r in got] == [r["answer"] for r in want]
        assert [r["score"] for r in got] == pytest.approx([r["score"] for r in want], rel=1e-5)
    del sizes[:]
    as_dicts = vqa([{"image": image, "question": q} for q in questions], top_k=2, batch_size=4)
    assert sizes == [4, 1] and [[r["answer"] for r in x] for x in as_dicts] == [
        [r["answer"] for r in x] for x in batched
    ]
    assert [r["answer"] for r in vqa({"image": image, "question": questions[0]}, top_k=2)] == [
        r["answer"] for r in as_dicts[0]
    ]
    with pytest.raises(ValueError, match="batch_size=0"):
        absvl.pipeline("vqa", model=model, batch_size=0)
    with pytest.raises(ValueError, match="'question'"):
        vqa([image, image])


def test_attention_pipeline_batches_lists(model, image, monkeypatch):
    attention = absvl.pipeline("attention", model=model)
    texts = ["what color is the circle?", "how many yellow objects are there?", "is it red?"]
    single = [attention(image, t) for t in texts]
    batched = attention([{"image": image, "text": t} for t in texts], batch_size=2)
    assert len(batched) == 3
    for got, want in zip(batched, single):
        np.testing.assert_allclose(got["top_down"], want["top_down"], rtol=1e-4, atol=1e-6)


def test_predict_vqa_file_answers_jsonl_and_csv(model, image, tmp_path, capsys):
    model.save_pretrained(tmp_path / "model")
    images = tmp_path / "pairs" / "images"
    images.mkdir(parents=True)
    image.save(images / "a.png")
    (images / "broken.png").write_bytes(b"not a png")
    rows = [
        {"image": "images/a.png", "question": "what color is the circle?", "question_id": 7},
        {"image": "images/broken.png", "question": "is it red?", "question_id": 8},
        {"image": "images/missing.png", "question": "is it red?", "question_id": 9},
        {"image": str(images / "a.png"), "question": "is there a square?", "question_id": 10},
    ]
    pairs = tmp_path / "pairs" / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "answers.jsonl"
    assert (
        main(
            [
                "predict",
                "vqa-file",
                "--model",
                str(tmp_path / "model"),
                "--input",
                str(pairs),
                "--out",
                str(out),
                "--batch-size",
                "2",
                "--device",
                "cpu",
            ]
        )
        == 0
    )

    printed = capsys.readouterr()
    assert "2 questions of" in printed.out and "2 left out (unreadable images)" in printed.out
    assert "broken.png" in printed.out and "missing.png" in printed.out
    answers = [json.loads(line) for line in out.read_text().splitlines()]
    assert [a["question_id"] for a in answers] == [7, 10]
    vqa = absvl.pipeline("vqa", model=model)
    assert answers[0]["answer"] == vqa(image, "what color is the circle?", top_k=1)[0]["answer"]
    assert answers[0]["score"] == pytest.approx(vqa(image, "what color is the circle?", top_k=1)[0]["score"], rel=1e-5)
    assert "answering pairs.jsonl" in printed.err  # the progress bar

    with (tmp_path / "pairs" / "pairs.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["image", "question"])
        writer.writeheader()
        writer.writerows({"image": r["image"], "question": r["question"]} for r in rows)
    out_csv = tmp_path / "answers.csv"
    assert (
        main(
            [
                "predict",
                "vqa-file",
                "--model",
                str(tmp_path / "model"),
                "--input",
                str(tmp_path / "pairs" / "pairs.csv"),
                "--out",
                str(out_csv),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    with out_csv.open() as f:
        table = list(csv.DictReader(f))
    assert [r["answer"] for r in table] == [a["answer"] for a in answers] and set(table[0]) == {
        "image",
        "question",
        "answer",
        "score",
    }

    (tmp_path / "bad.jsonl").write_text(json.dumps({"image": "images/a.png"}) + "\n")
    assert (
        main(
            [
                "predict",
                "vqa-file",
                "--model",
                str(tmp_path / "model"),
                "--input",
                str(tmp_path / "bad.jsonl"),
                "--out",
                str(out),
            ]
        )
        == 2
    )
    assert "row 1 needs an 'image' and a 'question'" in capsys.readouterr().err


def test_vqa_pipeline_from_a_saved_folder(model, image, tmp_path):
    model.save_pretrained(tmp_path / "saved")
    from_folder = absvl.pipeline("vqa", model=tmp_path / "saved")
    assert from_folder(image, "is it red?") == absvl.pipeline("vqa", model=model)(image, "is it red?")


def test_attention_pipeline_returns_bottom_up_and_top_down_maps(model, image):
    attention = absvl.pipeline("attention", model=model)
    a = attention(image, "what color is the circle?")
    b = attention(image, "how many yellow objects are there?")
    grid = model.image_size // 8
    for maps in (a, b):
        assert set(maps) == {"bottom_up", "top_down"}
        assert all(isinstance(m, np.ndarray) and m.shape == (grid, grid) for m in maps.values())
    np.testing.assert_array_equal(a["bottom_up"], b["bottom_up"])  # the feedforward pass ignores the text
    assert np.abs(a["top_down"] - b["top_down"]).max() > 1e-4
    up = attention(image, "what color is the circle?", upsample=True)
    assert up["top_down"].shape == (image.height, image.width)


def test_preprocessing_normalises_with_imagenet_statistics():
    mean = (np.array([0.485, 0.456, 0.406]) * 255).round().astype(np.uint8)
    x = preprocess_image(np.broadcast_to(mean, (10, 12, 3)).copy(), size=16)
    assert x.shape == (3, 16, 16)
    assert x.abs().max() < 0.01
    with pytest.raises(TypeError, match="PIL image"):
        preprocess_image(42, size=16)


def test_unknown_task_is_named(model):
    with pytest.raises(ValueError, match="'captioning'"):
        absvl.pipeline("captioning", model=model)
