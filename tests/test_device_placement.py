"""Every inference entry point puts the processor's outputs on the model's device.

No GPU needed: the model runs on the ``meta`` device, where mixing a parameter with an input left
on the CPU raises ("Tensor on device cpu is not on the expected device meta") just as a CUDA model
given CPU inputs does. ``MetaReadout`` lets the results be read back to the host (as zeros), so
the entry points run to the end.
"""

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

import absvl
from absvl.data.shapes_world import ShapesWorld
from absvl.metrics.baselines import pooled_image_features
from absvl.metrics.probes import object_patch_tokens
from absvl.metrics.steering import steering_pairs, steering_scores
from absvl.models.vl import AbsVLConfig, AbsVLForQuestionAnswering, AbsVLForRetrieval
from absvl.retrieval import Retriever, build_index
from absvl.visualize import attention_figure


class MetaReadout(TorchDispatchMode):
    """Copies of meta tensors to the CPU, and their scalars, read as zeros (meta tensors hold no data)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        source = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if source is not None and source.is_meta:
            if func is torch.ops.aten._local_scalar_dense.default:
                return False if source.dtype == torch.bool else 0
            if func is torch.ops.aten._to_copy.default and torch.device(kwargs.get("device") or "meta").type == "cpu":
                return torch.zeros(source.shape, dtype=kwargs.get("dtype") or source.dtype)
        return func(*args, **kwargs)


@pytest.fixture
def model(shapes_root):
    torch.manual_seed(0)
    config = AbsVLConfig(
        backbone="absvit_test_patch8",
        backbone_kwargs={"img_size": 32},
        text_encoder=str(shapes_root / "text_encoder"),
        fusion_hidden_size=32,
        fusion_layers=1,
        fusion_heads=2,
        max_text_len=16,
    )
    return AbsVLForQuestionAnswering(config, answers=["yes", "no", "red"]).eval()


@pytest.fixture
def image():
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, size=(32, 32, 3), dtype=np.uint8))


def test_a_cpu_input_on_a_meta_model_raises(model, image):
    """The mechanism: an entry point that forgets to move its inputs fails here."""
    inputs = model.to("meta").processor(images=[image], text=["is it red?"])
    with MetaReadout(), pytest.raises(RuntimeError, match="device"):
        model.attention_maps(inputs["images"], inputs["input_ids"], inputs["attention_mask"])


def test_prepare_inputs_puts_tensors_on_the_model_device(model, image):
    inputs = model.to("meta").prepare_inputs(images=[image], text=["is it red?"])
    assert model.device == torch.device("meta")
    assert {k: v.device.type for k, v in inputs.items()} == dict.fromkeys(
        ("images", "input_ids", "attention_mask"), "meta"
    )


def test_pipelines_run_on_the_model_device(model, image):
    with MetaReadout():
        answers = absvl.pipeline("vqa", model=model, device="meta")(image, "is it red?", top_k=2)
        maps = absvl.pipeline("attention", model=model, device="meta")(image, ["is it red?", "a circle"], upsample=True)
    assert len(answers) == 2 and {r["answer"] for r in answers} <= {"yes", "no", "red"}
    assert [m["top_down"].shape for m in maps] == [(32, 32)] * 2


def test_steering_probes_baselines_and_figures_run_on_the_model_device(model, image, shapes_root, tmp_path):
    world = ShapesWorld.load(shapes_root)
    pairs = steering_pairs(world, "test-dev2015", limit=2)
    paths = [world.image_path("test-dev2015", pair["image_id"]) for pair in pairs]
    model.to("meta")
    with MetaReadout():
        scores = steering_scores(model, world, "test-dev2015", pairs, batch_size=2)
        tokens = object_patch_tokens(model, world, "test-dev2015", limit=2)
        features = pooled_image_features(model, paths, batch_size=2)
        figure, maps = attention_figure(model, image, ["is it red?", "a circle"], tmp_path / "figure.png")
    assert pairs and scores["all"]["questions"] == 2 * len(pairs)
    assert len(tokens["bottom_up"]) == len(tokens["shape"]) > 0
    assert set(features) == set(paths)
    assert len(maps["top_down"]) == 2 and (tmp_path / "figure.png").is_file()


def test_retriever_search_and_rerank_run_on_the_model_device(model, shapes_root, tmp_path):
    model = AbsVLForRetrieval(model.config).eval()  # the same architecture with the ITM head
    images = sorted((shapes_root / "images").rglob("*.jpg"))[:6]
    index = build_index(model, images, tmp_path / "index", batch_size=4, progress=False)
    retriever = Retriever(model, index.out, device="meta")
    with MetaReadout():
        hits = retriever.search_batch(["a red circle", "a blue square"], k=3, rerank=4, batch_size=3)
    assert [len(h) for h in hits] == [3, 3] and all(h.rerank_score is not None for q in hits for h in q)
