"""A tiny AbsVL model (saved to a folder) and a small collection of Shapes images."""

import shutil

import pytest
import torch

from absvl.models.vl import AbsVLConfig, AbsVLForRetrieval


@pytest.fixture(scope="session")
def model_dir(shapes_root, tmp_path_factory):
    """save_pretrained folder of a tiny untrained AbSViT-VL model on 32 px images."""
    torch.manual_seed(0)
    config = AbsVLConfig(
        backbone="absvit_test_patch8",
        backbone_kwargs={"img_size": 32},
        text_encoder=str(shapes_root / "text_encoder"),
        fusion_hidden_size=32,
        fusion_layers=1,
        fusion_heads=2,
        fusion_dropout=0.0,
        max_text_len=16,
    )
    model = AbsVLForRetrieval(config)
    with torch.no_grad():  # a feedback path strong enough for the query to matter in re-ranking
        for p in model.backbone.decoders.parameters():
            p.mul_(10.0)
    out = tmp_path_factory.mktemp("retrieval_model") / "model"
    model.save_pretrained(out)
    return out


@pytest.fixture
def model(model_dir):
    return AbsVLForRetrieval.from_pretrained(model_dir)


@pytest.fixture(scope="session")
def image_files(shapes_root):
    """All Shapes images, sorted (40 JPEGs of 32×32)."""
    return sorted((shapes_root / "images").rglob("*.jpg"))


@pytest.fixture
def collection(image_files, tmp_path):
    """A folder with 12 Shapes images in two sub-folders."""
    root = tmp_path / "collection"
    for i, src in enumerate(image_files[:12]):
        dest = root / ("a" if i < 6 else "b") / src.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dest)
    return root


@pytest.fixture
def embed(model):
    """``embed(paths)`` → ``[N, C]`` bottom-up embeddings computed directly with the model."""
    import numpy as np

    def run(paths):
        images = model.processor(images=[str(p) for p in paths])["images"]
        with torch.no_grad():
            return np.asarray(model.eval().encode_image_bottom_up(images).numpy(), dtype=np.float32)

    return run
