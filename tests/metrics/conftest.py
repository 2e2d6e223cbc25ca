import pytest
import torch

from absvl.data.shapes_world import ShapesWorld
from absvl.models.vl import AbsVLConfig, AbsVLForQuestionAnswering


@pytest.fixture(scope="module")
def world(shapes_root):
    return ShapesWorld.load(shapes_root)


@pytest.fixture(scope="module")
def tiny_vl(shapes_root):
    """``tiny_vl(backbone="absvit_test_patch8", config=None, **backbone_kwargs)`` → a tiny VL model at 32 px in eval
    mode, its feedback path (if any) strong enough that the question changes the tokens; ``config``: other
    ``AbsVLConfig`` fields."""

    def make(backbone="absvit_test_patch8", config=None, **backbone_kwargs):
        torch.manual_seed(0)
        vl_config = AbsVLConfig(
            backbone=backbone,
            backbone_kwargs={"img_size": 32, **backbone_kwargs},
            text_encoder=str(shapes_root / "text_encoder"),
            max_text_len=16,
            fusion_hidden_size=32,
            fusion_layers=1,
            fusion_heads=2,
            fusion_dropout=0.0,
            **(config or {}),
        )
        model = AbsVLForQuestionAnswering(vl_config, answers=["yes", "no"]).eval()
        if hasattr(model.backbone, "decoders"):
            with torch.no_grad():
                for p in model.backbone.decoders.parameters():
                    p.mul_(10.0)
        return model

    return make
