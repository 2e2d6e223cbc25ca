"""AbsVLModel and its task models: every backbone family end to end, the prior ξ, each task's head and loss,
parameter groups, config errors."""

import pytest
import torch
from torch import nn

from absvl import AbsVLConfig, AbsVLForQuestionAnswering, AbsVLModel
from absvl.models.vl.modeling import LR_MULTIPLIERS

FAMILIES = ["absvit_test_patch8", "vit_test_patch8", "vars_d_absvit_test_patch8", "tdam_resnet_test"]
WITH_VAR_LOSS = {"absvit_test_patch8", "vars_d_absvit_test_patch8"}


@pytest.mark.parametrize("task", ["vqa", "retrieval"])
@pytest.mark.parametrize("backbone", FAMILIES)
def test_forward_backward_and_loss_decreases(make_model, make_batch, backbone, task):
    model = make_model(backbone, task=task).train()
    batch = make_batch(model)
    out = model(**batch)
    B, T = batch["input_ids"].shape
    logits = out.vqa_logits if task == "vqa" else out.itm_logits
    assert logits.shape == (B, len(model.answers) if task == "vqa" else 2)
    assert not hasattr(model, "itm_head" if task == "vqa" else "vqa_head")  # one task's head, one task's loss
    assert out.pooled.shape == (B, 2 * model.config.fusion_hidden_size)
    assert out.text_tokens.shape == (B, T, model.config.fusion_hidden_size)
    assert out.image_tokens.shape[:2] == out.vision.tokens.shape[:2]
    assert out.text_embeds.shape == out.image_embeds.shape == (B, model.backbone.num_features)
    task_loss = "vqa" if task == "vqa" else "itm"
    expected = {task_loss, "prior"} | ({"var"} if backbone in WITH_VAR_LOSS else set())
    assert set(out.losses) == expected and next(iter(out.losses)) == task_loss
    cfg = model.config
    weight = 1.0 if task == "vqa" else cfg.itm_loss_weight
    total = weight * out.losses[task_loss] + cfg.prior_loss_weight * out.losses["prior"]
    if "var" in out.losses:
        total = total + cfg.var_loss_weight * out.losses["var"]
    torch.testing.assert_close(out.loss, total)

    out.loss.backward()
    # (zero gradients are fine: timm's ResNets zero-init the last BN of each block)
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, f"parameters outside the graph (DDP would fail): {no_grad}"

    optimizer = torch.optim.AdamW(model.parameter_groups(lr=5e-4), betas=(0.9, 0.98), eps=1e-8)
    losses = []
    for _ in range(12):
        optimizer.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def _vision_tokens(model, make_batch, questions):
    with torch.no_grad():  # a "trained" feedback path: at init (std 0.02) its effect is ~1e-5
        for p in model.backbone.decoders.parameters():
            p.mul_(10.0)
    batch = make_batch(model, questions=questions)
    images = batch["images"][:1].expand(len(questions), -1, -1, -1)  # the same image for every question
    return model(images, batch["input_ids"], batch["attention_mask"]).vision


def test_prior_steers_the_vision_tokens(make_model, make_batch):
    questions = ["what color is the circle?", "how many yellow objects are there?"]
    model = make_model("absvit_test_patch8").eval()
    assert model.backbone.alpha == 10.0 == model.config.alpha
    with torch.no_grad():
        vision = _vision_tokens(model, make_batch, questions)
    torch.testing.assert_close(vision.bottom_up_tokens[0], vision.bottom_up_tokens[1])
    assert (vision.tokens[0] - vision.tokens[1]).abs().max() > 1e-3

    model_zero = make_model("absvit_test_patch8", alpha=0.0).eval()
    with torch.no_grad():
        vision = _vision_tokens(model_zero, make_batch, questions)
    assert torch.equal(vision.tokens[0], vision.tokens[1])


@pytest.mark.parametrize("options", [{}, {"prior_pooling": "mean"}, {"prior_channel_projection": True, "alpha": 1.0}])
def test_gradient_reaches_the_prior_projection_through_the_backbone(make_model, make_batch, options):
    model = make_model("absvit_test_patch8", **options).train()
    batch = make_batch(model)
    out = model(batch["images"], batch["input_ids"], batch["attention_mask"])
    out.vision.tokens.square().sum().backward()  # only the top-down path links ξ to the vision tokens
    assert model.prior.proj.weight.grad.abs().sum() > 0
    assert model.prior.proj.bias.grad.abs().sum() > 0


def test_prior_options_change_the_computation(make_model, make_batch):
    outs = {}
    variants = {"cls": {}, "mean": {"prior_pooling": "mean"}, "chan": {"prior_channel_projection": True}}
    for name, options in variants.items():
        model = make_model("absvit_test_patch8", **options).eval()
        batch = make_batch(model)
        with torch.no_grad():
            outs[name] = model(batch["images"], batch["input_ids"], batch["attention_mask"]).vision.tokens
    assert not torch.allclose(outs["cls"], outs["mean"])
    assert not torch.allclose(outs["cls"], outs["chan"])


def test_encoders_for_retrieval(make_model, make_batch):
    model = make_model("absvit_test_patch8", task="retrieval").eval()
    batch = make_batch(model)
    with torch.no_grad():
        out = model(batch["images"], batch["input_ids"], batch["attention_mask"])
        text = model.encode_text(batch["input_ids"], batch["attention_mask"])
        image = model.encode_image_bottom_up(batch["images"])
        scores = model.itm_score(batch["images"], batch["input_ids"], batch["attention_mask"])
        rerank = model.rerank_score(batch["images"], batch["input_ids"], batch["attention_mask"])
        bottom_up_only = model.backbone(batch["images"], bottom_up_only=True)
    torch.testing.assert_close(text, out.text_embeds)
    torch.testing.assert_close(image, out.image_embeds)  # query-independent: same with or without the text
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(len(text)))
    torch.testing.assert_close(scores, out.itm_logits.softmax(-1)[:, 1])
    log_odds = out.itm_logits.log_softmax(-1)[:, 1] - out.itm_logits.log_softmax(-1)[:, 0]
    torch.testing.assert_close(rerank, log_odds + model.contrastive.scale() * (text * image).sum(-1))
    # the one-pass bottom-up output equals the first pass of the full backbone
    torch.testing.assert_close(bottom_up_only.pooled, out.vision.bottom_up_pooled)
    assert "top_down" not in model.backbone(batch["images"], bottom_up_only=True, return_maps=True).maps


@pytest.mark.parametrize(
    "backbone, options",
    [("absvit_test_patch8", {}), ("absvit_test_patch8", {"prior_channel_projection": True}), ("tdam_resnet_test", {})],
)
def test_rerank_score_from_one_first_pass_per_image(make_model, make_batch, backbone, options):
    """Pairs sharing an image share its first pass: the scores equal a full forward per pair."""
    model = make_model(backbone, task="retrieval", **options).eval()
    batch = make_batch(model)
    rows = torch.tensor([0, 0, 1, 0])  # texts 0-3 paired with images 0, 0, 1, 0
    with torch.no_grad():
        first = model.first_pass(batch["images"][:2])
        reused = model.rerank_score(first.select(rows), batch["input_ids"], batch["attention_mask"])
        full = model.rerank_score(batch["images"][rows], batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(reused, full, rtol=1e-5, atol=1e-5)


def test_return_loss_without_labels_and_itm_negatives_leave_the_prior_loss(make_model, make_batch):
    model = make_model("absvit_test_patch8", task="retrieval").train()
    batch = make_batch(model)
    inputs = {k: batch[k] for k in ("images", "input_ids", "attention_mask")}
    assert model(**inputs).loss is None
    out = model(**inputs, return_loss=True)
    assert set(out.losses) == {"var", "prior"}
    encoder = make_model("absvit_test_patch8", task=None).train()
    encoder.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("itm_head.")})
    torch.manual_seed(0)
    alone = encoder(**inputs, return_loss=True)
    torch.manual_seed(0)
    torch.testing.assert_close(alone.loss, model(**inputs, return_loss=True).loss)  # the encoder's own losses
    from absvl.models.vl.losses import contrastive_loss

    out = model(**inputs, labels=batch["labels"])
    keep = batch["labels"] == 1
    expected = contrastive_loss(out.text_embeds[keep], out.image_embeds[keep], model.contrastive.scale())
    torch.testing.assert_close(out.losses["prior"], expected)


def test_parameter_groups(make_model):
    model = make_model("absvit_test_patch8")
    lr, wd = 1e-5, 0.01
    groups = model.parameter_groups(lr=lr, weight_decay=wd)
    names = {id(p): n for n, p in model.named_parameters()}
    by_name = {names[id(p)]: g for g in groups for p in g["params"]}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sum(len(g["params"]) for g in groups) == len(trainable) == len(by_name)
    assert "backbone.prompt" not in by_name and not model.backbone.prompt.requires_grad

    def group_of(name):
        return by_name[name]["name"].split("/")[0]

    assert group_of("backbone.blocks.0.attn.qkv.weight") == "backbone"
    assert group_of("text_encoder.encoder.layer.0.attention.self.query.weight") == "text_encoder"
    assert group_of("backbone.decoders.0.linear.weight") == "decoders"
    assert group_of("fusion.text_layers.0.cross_attn.q.weight") == "fusion"
    for head in ("vqa_head.fc2.weight", "contrastive.logit_scale", "prior.proj.weight"):
        assert group_of(head) == "heads"
    multipliers = {**LR_MULTIPLIERS, "backbone": LR_MULTIPLIERS["encoders"], "text_encoder": LR_MULTIPLIERS["encoders"]}
    for g in groups:
        assert g["lr"] == pytest.approx(lr * multipliers[g["name"].split("/")[0]])
    assert {g["lr_scale"] for g in groups} == {1.0, 3.0, 5.0, 50.0}
    no_decay = {n for n, g in by_name.items() if g["weight_decay"] == 0.0}
    decay = set(by_name) - no_decay
    assert all(by_name[n]["weight_decay"] == wd for n in decay)
    for name in by_name:
        if name.endswith(".bias") or "norm" in name or "LayerNorm" in name:
            assert name in no_decay, name
    embeddings = ("backbone.pos_embed", "backbone.cls_token", "fusion.token_type_embeddings.weight")
    for name in embeddings + ("contrastive.logit_scale",):
        assert name in no_decay
    assert "fusion.text_layers.0.ffn.fc1.weight" in decay and "backbone.decoders.0.linear.weight" in decay


@pytest.mark.parametrize(
    "given, backbone, text_encoder",
    [
        ({"encoders": 0.5}, 0.5, 0.5),  # the default of both encoders
        ({"backbone": 0.1}, 0.1, 1.0),
        ({"encoders": 0.5, "text_encoder": 0.2}, 0.5, 0.2),
    ],
)
def test_encoder_lr_multipliers(make_model, given, backbone, text_encoder):
    groups = make_model("absvit_test_patch8").parameter_groups(lr=1.0, lr_multipliers={**given, "fusion": 2.0})
    scales = {g["name"].split("/")[0]: g["lr_scale"] for g in groups}
    assert scales == {"backbone": backbone, "text_encoder": text_encoder, "decoders": 3.0, "fusion": 2.0, "heads": 50.0}
    assert all(g["lr"] == g["lr_scale"] for g in groups)


def test_output_is_a_transformers_model_output(make_model, make_batch):
    from transformers.utils import ModelOutput

    model = make_model("absvit_test_patch8").eval()
    batch = make_batch(model)
    with torch.no_grad():
        out = model(batch["images"], batch["input_ids"], batch["attention_mask"])
        trained = model(**batch)
    assert isinstance(out, ModelOutput) and out.loss is None and "loss" not in out
    assert out["pooled"] is out.pooled and out[1] is out.pooled  # None fields are skipped
    assert list(out.keys())[:2] == ["losses", "pooled"] and list(out.keys())[-1] == "vqa_logits"
    assert len(out.to_tuple()) == len(out.keys())
    loss, losses, pooled = trained[:3]
    assert loss is trained.loss and losses is trained.losses and pooled is trained.pooled
    assert trained["vision"].tokens.shape[0] == batch["images"].shape[0]


def test_parameter_groups_name_a_parameter_they_would_drop(make_model):
    model = make_model("vit_test_patch8")
    model.stray = nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="'stray'"):
        model.parameter_groups(lr=1e-5)
    with pytest.raises(ValueError, match="lr_multipliers"):
        make_model("vit_test_patch8").parameter_groups(lr=1e-5, lr_multipliers={"fuson": 5.0})
    with pytest.raises(ValueError, match=r"unknown lr_multipliers key\(s\) \['vision'\]; known: .*'backbone'"):
        make_model("vit_test_patch8").parameter_groups(lr=1e-5, lr_multipliers={"vision": 0.1})


def test_config_errors_name_the_field(make_model, roberta_dir):
    with pytest.raises(ValueError, match="prior_pooling"):
        AbsVLConfig(prior_pooling="max")
    with pytest.raises(ValueError, match="alpha"):
        AbsVLConfig(backbone_kwargs={"alpha": 3})
    with pytest.raises(ValueError, match="fusion_heads"):
        AbsVLConfig(fusion_hidden_size=30, fusion_heads=4)
    with pytest.raises(ValueError, match="'colour'"):
        AbsVLConfig.from_dict({"backbone": "vit_test_patch8", "colour": "red"})
    with pytest.raises(ValueError, match="prior_channel_projection"):
        make_model("vit_test_patch8", prior_channel_projection=True)
    config = AbsVLConfig(backbone="vit_test_patch8", text_encoder=str(roberta_dir))
    with pytest.raises(ValueError, match="num_answers=4 but 2 answers"):
        AbsVLForQuestionAnswering(AbsVLConfig(**{**config.__dict__, "num_answers": 4}), answers=["yes", "no"])
    with pytest.raises(ValueError, match="needs its answer vocabulary"):
        AbsVLForQuestionAnswering(config, answers=[])
    assert AbsVLModel(AbsVLConfig(**{**config.__dict__, "num_answers": 4})).config.num_answers == 0


def test_bert_style_text_encoder(make_model, make_batch, bert_dir):
    model = make_model("absvit_test_patch8", text_dir=bert_dir).train()
    assert model.config.text_config["model_type"] == "bert"
    out = model(**make_batch(model))
    out.loss.backward()
    assert model.prior.proj.bias.grad.abs().sum() > 0


def test_prior_visual_top_down_contrasts_the_second_pass(make_model, make_batch):
    model = make_model("absvit_test_patch8", prior_visual="top_down").eval()
    batch = make_batch(model)
    with torch.no_grad():
        out = model(batch["images"], batch["input_ids"], batch["attention_mask"])
    prefix = out.vision.num_prefix_tokens
    torch.testing.assert_close(out.image_embeds, model.contrastive(out.vision.tokens, prefix))
    assert not torch.allclose(out.image_embeds, model.contrastive(out.vision.bottom_up_tokens, prefix))
