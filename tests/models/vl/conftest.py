"""Tiny text encoders (built locally, loaded from temp dirs), tiny AbSViT-VL models, and ``hub``: the
local stand-in of the Hub API (tests/hub_stand_in.py)."""

import sys
from pathlib import Path

import pytest
import torch

from absvl.models.vl import (
    AbsVLConfig,
    AbsVLForQuestionAnswering,
    AbsVLForRetrieval,
    AbsVLModel,
    build_tiny_text_encoder,
)

sys.path.append(str(Path(__file__).resolve().parents[2]))  # tests/ (pytest runs with --import-mode=importlib)
from hub_stand_in import hub  # noqa: E402,F401

ANSWERS = ["yes", "no", "red", "blue", "circle", "square", "2", "3"]
QUESTIONS = ["what color is the circle?", "is there a blue square?", "how many triangles?", "what shape is red?"]
CNN_IMAGE_SIZE = 64


@pytest.fixture(scope="session")
def roberta_dir(tmp_path_factory):
    return build_tiny_text_encoder(tmp_path_factory.mktemp("tiny_roberta"), kind="roberta")


@pytest.fixture(scope="session")
def bert_dir(tmp_path_factory):
    return build_tiny_text_encoder(tmp_path_factory.mktemp("tiny_bert"), kind="bert")


@pytest.fixture
def make_model(roberta_dir):
    """``make_model(backbone, text_dir=None, seed=0, task="vqa", **config_overrides)`` → a tiny model in train mode:
    ``AbsVLForQuestionAnswering`` (``task="vqa"``), ``AbsVLForRetrieval`` (``"retrieval"``) or the encoder (None)."""

    def make(backbone="absvit_test_patch8", text_dir=None, seed=0, task="vqa", **overrides):
        torch.manual_seed(seed)
        if backbone.startswith(("resnet", "tdam")):
            overrides.setdefault("image_size", CNN_IMAGE_SIZE)
        config = AbsVLConfig(
            backbone=backbone,
            text_encoder=str(text_dir or roberta_dir),
            fusion_hidden_size=32,
            fusion_layers=2,
            fusion_heads=2,
            fusion_dropout=0.0,
            **overrides,
        )
        if task == "vqa":
            return AbsVLForQuestionAnswering(config, answers=ANSWERS)
        return AbsVLForRetrieval(config) if task == "retrieval" else AbsVLModel(config)

    return make


def _make_batch(model, questions=QUESTIONS, seed=0):
    """Random images, tokenised questions and the model's labels: soft VQA targets for a VQA model, ITM labels for
    a retrieval model, none for the encoder."""
    g = torch.Generator().manual_seed(seed)
    n = len(questions)
    text = model.processor(text=questions)
    images = torch.randn(n, 3, model.image_size, model.image_size, generator=g)
    batch = dict(images=images, input_ids=text["input_ids"], attention_mask=text["attention_mask"])
    if isinstance(model, AbsVLForQuestionAnswering):
        targets = torch.zeros(n, len(model.answers))
        targets[torch.arange(n), torch.arange(n) % len(model.answers)] = 1.0
        targets[0, 1] = 0.3
        batch["labels"] = targets
    elif isinstance(model, AbsVLForRetrieval):
        batch["labels"] = torch.tensor([1, 1, 0, 1])[:n]
    return batch


@pytest.fixture
def make_batch():
    """``make_batch(model, questions=QUESTIONS, seed=0)`` → forward keyword arguments."""
    return _make_batch


def paper_loss(out, config, **extra):
    """The total a forward should report: the task's loss (VQA at weight 1, ITM at its config weight) plus the L_var
    and prior terms at the config's weights, plus each ``extra`` term (``name=weight``) of ``out.losses``."""
    task = out.losses["vqa"] if "vqa" in out.losses else config.itm_loss_weight * out.losses["itm"]
    total = task + config.var_loss_weight * out.losses["var"] + config.prior_loss_weight * out.losses["prior"]
    return total + sum(weight * out.losses[name] for name, weight in extra.items())


@pytest.fixture
def two_objects():
    """``two_objects(model, rows=4)`` → ``patch_objects`` ``[rows, cells]`` on the model's patch grid: object 1 owns the
    first three cells, object 2 the last two, the background the rest."""

    def make(model, rows=4):
        grid = model.backbone.patch_embed.grid_size
        patch_objects = torch.zeros(rows, grid[0] * grid[1], dtype=torch.long)
        patch_objects[:, :3] = 1
        patch_objects[:, -2:] = 2
        return patch_objects

    return make


@pytest.fixture
def check_head_part(tmp_path):
    """``check_head_part(model, module, batch, logits)``: ``module`` of the VQA head trains at the heads' learning rate
    and is saved and loaded with the head (the loaded model answers ``batch`` with ``logits``)."""

    def check(model, module, batch, logits):
        heads = {id(p) for g in model.parameter_groups(1e-3) if g["name"].startswith("heads/") for p in g["params"]}
        assert all(id(p) in heads for p in module.parameters())
        model.save_pretrained(tmp_path / "head_part")
        loaded = AbsVLForQuestionAnswering.from_pretrained(tmp_path / "head_part").eval()
        torch.testing.assert_close(loaded(**batch).vqa_logits, logits)
        return loaded

    return check


@pytest.fixture
def check_loss_term():
    """``check_loss_term(model, out, name, expected, weight)``: ``out.losses[name]`` is ``expected`` and enters the
    total at ``weight``."""

    def check(model, out, name, expected, weight):
        torch.testing.assert_close(out.losses[name], expected)
        weighted = model.weighted_losses(out.losses)
        torch.testing.assert_close(weighted[name], weight * expected)
        torch.testing.assert_close(out.loss, sum(weighted.values()))

    return check


@pytest.fixture
def reading_head(make_model, make_batch, two_objects):
    """``reading_head(part, words, **config)`` → ``(model, plain, batch, patch_objects)``: a VQA model in eval mode
    whose head has ``part`` (an attribute; ``config``: the overrides that add it) and METER's ``plain`` one, checked:
    only the model's head has the part, only its description says ``words``, and the head's input grows by the
    part's features; a batch for them and ``two_objects`` on their grid."""

    def make(part, words, **config):
        model, plain = make_model(**config).eval(), make_model().eval()
        assert getattr(plain.vqa_head, part) is None and getattr(model.vqa_head, part) is not None
        assert words in model.head_description() and words not in plain.head_description()
        hidden = model.config.fusion_hidden_size
        assert model.vqa_head.fc1.in_features == 2 * hidden + getattr(model.vqa_head, part).num_features
        return model, plain, make_batch(model), two_objects(model)

    return make
