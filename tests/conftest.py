"""A tiny Shapes world and a run config small enough to train in seconds."""

import pytest

from absvl.data.shapes import ensure_shapes

TINY_MODEL = [
    "model.backbone=absvit_test_patch8",
    "model.backbone_kwargs={img_size: 32}",
    "model.fusion_hidden_size=32",
    "model.fusion_layers=1",
    "model.fusion_heads=2",
    "model.fusion_dropout=0.0",
    "model.max_text_len=16",
]


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes") / "world"
    ensure_shapes(root, num_images=40, seed=3, image_size=32, questions_per_image=4, text_pretrain_steps=20)
    return root


@pytest.fixture(scope="session")
def tiny_model_overrides():
    """model.* overrides for a seconds-long run (any run config with an AbsVLConfig model section)."""
    return list(TINY_MODEL)


@pytest.fixture
def tiny_overrides(shapes_root, tmp_path):
    """key=value overrides turning configs/shapes_absvit_tiny.yaml into a seconds-long run."""
    return [
        *TINY_MODEL,
        f"model.text_encoder={shapes_root / 'text_encoder'}",
        f"data.root={shapes_root}",
        "data.shapes=null",
        "data.num_workers=0",
        f"train.output_dir={tmp_path / 'run'}",
        "train.batch_size=8",
        "train.max_steps=6",
        "train.log_every=1",
        "train.trackers=[]",
        "train.lr=1e-3",
    ]
