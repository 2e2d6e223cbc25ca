"""The prior loss in the gate's space, the top-down prior term, the gate's sparsity prior, old models refused."""

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from absvl import AbsVLModel
from absvl.models.vision.topdown import prior_mask
from absvl.models.vl.losses import contrastive_loss

from .conftest import paper_loss


def test_image_embedding_is_the_gate_space_mean_of_the_bottom_up_tokens(make_model, make_batch):
    model = make_model("absvit_test_patch8").eval()
    assert not any(name.startswith("contrastive.proj") for name, _ in model.named_parameters())
    batch = make_batch(model)
    with torch.no_grad():
        out = model(batch["images"], batch["input_ids"], batch["attention_mask"])
    z = out.vision.bottom_up_tokens[:, out.vision.num_prefix_tokens :]
    torch.testing.assert_close(out.image_embeds, F.normalize(z.mean(dim=1), dim=-1))
    # cos(ξ, embedding) is the norm-weighted mean of the cosines the gate clamps (Eq. 8)
    gate_cos = F.cosine_similarity(z, out.xi[:, None], dim=-1)
    weighted = (z.norm(dim=-1) * gate_cos).sum(1) / z.sum(1).norm(dim=-1)
    torch.testing.assert_close((out.text_embeds * out.image_embeds).sum(-1), weighted)


def test_prior_loss_trains_the_gate_cosines(make_model, make_batch):
    """Its gradient reaches ξ through exactly the cosines the gate reads: the prior projection and the
    backbone both get gradient from the prior loss alone."""
    model = make_model("absvit_test_patch8").train()
    batch = make_batch(model)
    out = model(batch["images"], batch["input_ids"], batch["attention_mask"], return_loss=True)
    out.losses["prior"].backward()
    assert model.prior.proj.weight.grad.abs().sum() > 0
    assert model.backbone.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_prior_visual_both_adds_the_top_down_attended_term(make_model, make_batch):
    model = make_model("absvit_test_patch8", prior_visual="both").train()
    torch.manual_seed(0)
    batch = make_batch(model)
    inputs = {k: batch[k] for k in ("images", "input_ids", "attention_mask")}
    out = model(**inputs, return_loss=True)
    vision, scale = out.vision, model.contrastive.scale()
    assert "top_down" in vision.maps  # asked for in training: the term reads the top-down map
    bottom_up = contrastive_loss(out.text_embeds, out.image_embeds, scale)
    weights = vision.maps["top_down"].flatten(1)
    weights = weights / weights.sum(1, keepdim=True)
    unit = F.normalize(vision.bottom_up_tokens[:, vision.num_prefix_tokens :], dim=-1)
    attended = F.normalize((weights[..., None] * unit).sum(1), dim=-1)
    expected = (bottom_up + contrastive_loss(out.text_embeds, attended, scale)) / 2
    torch.testing.assert_close(out.losses["prior"], expected)
    # the top-down term reaches the feedback decoders (B_l): it trains where the second pass attends
    model.zero_grad()
    (2 * out.losses["prior"] - bottom_up).backward()
    assert model.backbone.decoders[0].linear2.weight.grad.abs().sum() > 0
    # evaluation needs no maps, and the retrieval embedding stays the bottom-up one
    model.eval()
    with torch.no_grad():
        plain = model(**inputs)
    assert plain.vision.maps == {}
    torch.testing.assert_close(plain.image_embeds, model.encode_image_bottom_up(batch["images"]))


def test_gate_sparsity_term(make_model, make_batch):
    model = make_model("absvit_test_patch8", gate_sparsity_weight=0.5).train()
    batch = make_batch(model)
    out = model(**batch)
    vision = out.vision
    gate = prior_mask(vision.bottom_up_tokens, out.xi)[:, vision.num_prefix_tokens :]
    torch.testing.assert_close(vision.prior_mask[:, vision.num_prefix_tokens :], gate)
    torch.testing.assert_close(out.losses["gate"], gate.mean())
    torch.testing.assert_close(out.loss, paper_loss(out, model.config, gate=0.5))
    # backbones without a prior have no gate and no such term
    vit = make_model("vit_test_patch8", gate_sparsity_weight=0.5).train()
    assert "gate" not in vit(**make_batch(vit)).losses


def test_models_of_the_projected_prior_are_refused(make_model, tmp_path):
    model = make_model("absvit_test_patch8").eval()
    model.save_pretrained(tmp_path / "m")
    AbsVLModel.from_pretrained(tmp_path / "m")  # this version's own save loads
    weights = load_file(str(tmp_path / "m" / "model.safetensors"))
    weights["contrastive.proj.weight"] = torch.zeros(64, 64)
    weights["contrastive.proj.bias"] = torch.zeros(64)
    save_file(weights, str(tmp_path / "m" / "model.safetensors"))
    with pytest.raises(ValueError, match=r"absvl < 0.2.*separate projection.*Retrain it"):
        AbsVLModel.from_pretrained(tmp_path / "m")
