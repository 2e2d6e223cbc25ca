"""``absvl.pipeline``: VQA answers and attention maps from PIL images, paths and arrays."""
import numpy as np
import pytest
import torch
from PIL import Image

import absvl
from absvl import AbsVLConfig, AbsVLModel
from absvl.models.vl import build_tiny_text_encoder, preprocess_image

ANSWERS = ["yes", "no", "red", "blue", "circle", "square"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    text_dir = build_tiny_text_encoder(tmp_path_factory.mktemp("text"))
    torch.manual_seed(0)
    config = AbsVLConfig(backbone="absvit_test_patch8", text_encoder=str(text_dir),
                         fusion_hidden_size=32, fusion_layers=1, fusion_heads=2)
    model = AbsVLModel(config, answers=ANSWERS)
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
