"""Attention pictures: overlays, the Fig. 4/6 layout, and `absvl attend`."""

import numpy as np
import pytest
import torch
from PIL import Image

from absvl.cli import main
from absvl.models.vl import AbsVLConfig, AbsVLForQuestionAnswering
from absvl.visualize import attention_figure, heatmap, overlay, side_by_side


def test_heatmap_scales_the_map_and_overlay_keeps_the_image_size():
    values = np.array([[0.0, 1.0], [2.0, 4.0]])
    heat = np.asarray(heatmap(values, (2, 2)), dtype=int)
    assert heat.shape == (2, 2, 3)
    assert tuple(heat[0, 0]) == (0, 0, 255) and tuple(heat[1, 1]) == (255, 153, 0)  # min blue, max orange
    image = Image.new("RGB", (40, 30), "white")
    assert overlay(image, values).size == (40, 30)
    flat = np.asarray(overlay(image, np.ones((4, 4)), strength=0.0))
    assert (flat == 255).all()  # strength 0: the image itself


def test_side_by_side_lays_out_labelled_square_panels():
    panels = [(Image.new("RGB", (10, 20), c), label) for c, label in (("red", "a"), ("blue", "b " * 40))]
    canvas = side_by_side(panels, size=50)
    assert canvas.size == (100, 50 + 34)
    assert canvas.getpixel((25, 60)) == (255, 0, 0) and canvas.getpixel((75, 60)) == (0, 0, 255)


@pytest.fixture(scope="module")
def saved_model(shapes_root, tmp_path_factory):
    torch.manual_seed(0)
    config = AbsVLConfig(
        backbone="absvit_test_patch8",
        backbone_kwargs={"img_size": 32},
        text_encoder=str(shapes_root / "text_encoder"),
        fusion_hidden_size=32,
        fusion_layers=1,
        fusion_heads=2,
    )
    model = AbsVLForQuestionAnswering(config, answers=["red", "blue", "yes"])
    with torch.no_grad():  # a feedback path strong enough for the text to change the top-down map
        for p in model.backbone.decoders.parameters():
            p.mul_(10.0)
    out = tmp_path_factory.mktemp("attend") / "model"
    model.save_pretrained(out)
    return out


def test_attention_figure_has_one_top_down_map_per_text(saved_model, shapes_root, tmp_path):
    model = AbsVLForQuestionAnswering.from_pretrained(saved_model)
    image = next((shapes_root / "images").rglob("*.jpg"))
    figure, maps = attention_figure(
        model, image, ["what color is the circle?", "is there a square?"], tmp_path / "a.png", size=64
    )
    # image | bottom-up | two top-down maps | the gate each text opens
    assert figure.size == (6 * 64, 64 + 34) and Image.open(tmp_path / "a.png").size == figure.size
    assert maps["bottom_up"].shape == (4, 4) and len(maps["top_down"]) == 2
    inputs = model.prepare_inputs(images=[image], text=["is there a square?"])
    with torch.no_grad():
        _, xi = model.encode_prior(inputs["input_ids"], inputs["attention_mask"])
        first = model.first_pass(inputs["images"])
    z = model.backbone.gate_tokens(first.bottom_up_tokens)[0, first.num_prefix_tokens :]
    gate = torch.nn.functional.cosine_similarity(z, xi, dim=-1).clamp(0, 1).reshape(4, 4)
    np.testing.assert_allclose(maps["gate"][1], gate.numpy(), rtol=1e-4, atol=1e-6)
    assert not np.allclose(maps["top_down"][0], maps["top_down"][1])  # the text steers the top-down map
    assert all(a in model.answers for a in maps["answers"])
    with pytest.raises(ValueError, match="at least one text"):
        attention_figure(model, image, [])


def test_attend_command_writes_the_png(saved_model, shapes_root, tmp_path, capsys):
    image = next((shapes_root / "images").rglob("*.jpg"))
    out = tmp_path / "attend.png"
    assert (
        main(
            [
                "attend",
                str(image),
                "--text",
                "what color is the circle?",
                "--model",
                str(saved_model),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert Image.open(out).size == (4 * 224, 224 + 34)  # image | bottom-up | top-down | gate
    assert "answers:" in capsys.readouterr().out
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"nope")
    assert main(["attend", str(broken), "--text", "q", "--model", str(saved_model), "--out", str(out)]) == 2
    assert "broken.jpg" in capsys.readouterr().err
