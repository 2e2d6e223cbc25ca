"""What the fusion reads: normalised image tokens (``fusion_image_tokens``), both passes side by side
(``fusion_reads``), 2-D position embeddings (``fusion_image_positions``), the mean pooler, the width-scaled init
and the round trip of these options through save_pretrained / from_pretrained."""

import json
import math

import pytest
import torch
from timm.layers import build_sincos2d_pos_embed
from torch import nn

from absvl import AbsVLConfig, AbsVLModel
from absvl.models.vl.fusion import IMAGE_TYPE, FusionEncoder, Pooler
from absvl.models.vl.modeling import init_new_weights


# --- the pooler and the fusion encoder alone ------------------------------------------------
def test_pooler_reads_token_zero_or_the_mean_after_the_prefix():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8)
    token, mean = Pooler(8), Pooler(8, mean_after=1)
    mean.load_state_dict(token.state_dict())
    torch.testing.assert_close(token(x), torch.tanh(token.dense(x[:, 0])))
    torch.testing.assert_close(mean(x), torch.tanh(token.dense(x[:, 1:].mean(dim=1))))
    every = Pooler(8, mean_after=0)
    every.load_state_dict(token.state_dict())
    torch.testing.assert_close(every(x), torch.tanh(token.dense(x.mean(dim=1))))
    # the prefix token does not count in the mean
    x2 = x.clone()
    x2[:, 0] = 100.0
    torch.testing.assert_close(mean(x2), mean(x))


def _encoder(image_positions, image_mean_after=None, seed=0):
    torch.manual_seed(seed)
    encoder = FusionEncoder(
        12,
        10,
        hidden_size=16,
        num_layers=1,
        num_heads=2,
        dropout=0.0,
        image_positions=image_positions,
        image_mean_after=image_mean_after,
    )
    return encoder.eval()


def _inputs(n_image=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    text, image = torch.randn(2, 3, 12, generator=g), torch.randn(2, n_image, 10, generator=g)
    return text, torch.tensor([[1, 1, 1], [1, 1, 0]]), image


def test_fusion_adds_sincos_positions_to_the_spatial_image_tokens_only():
    encoder = _encoder(image_positions=True)
    text, mask, image = _inputs(n_image=7)  # 1 prefix token and a 2x3 grid
    with pytest.raises(ValueError, match="grid_size"):
        encoder(text, mask, image)
    seen = {}

    def hook(module, args):
        seen["y"] = args[0]

    encoder.image_layers[0].register_forward_pre_hook(hook)
    with torch.no_grad():
        encoder(text, mask, image, grid_size=(2, 3))
        plain = encoder.image_proj(image) + encoder.token_type_embeddings.weight[IMAGE_TYPE]
    positions = build_sincos2d_pos_embed([2, 3], 16)
    assert positions.shape == (6, 16) and not torch.allclose(positions[0], positions[1])
    torch.testing.assert_close(seen["y"][:, :1], plain[:, :1])  # the prefix token keeps no position
    torch.testing.assert_close(seen["y"][:, 1:], plain[:, 1:] + positions)


def test_without_positions_the_fusion_cannot_tell_where_a_token_is():
    """Swapping two spatial image tokens only swaps their outputs without positions; with them it changes
    what the fusion computes (the pooled pair and the text tokens)."""
    text, mask, image = _inputs(n_image=5)  # 1 prefix token, 2x2 grid
    swapped = image[:, [0, 2, 1, 3, 4]]
    for positions in (False, True):
        encoder = _encoder(image_positions=positions, image_mean_after=1)
        with torch.no_grad():
            t, y, pooled = encoder(text, mask, image, grid_size=(2, 2))
            t_s, y_s, pooled_s = encoder(text, mask, swapped, grid_size=(2, 2))
        if positions:
            assert (pooled - pooled_s).abs().max() > 1e-4 and (t - t_s).abs().max() > 1e-4
        else:
            torch.testing.assert_close(pooled_s, pooled)
            torch.testing.assert_close(t_s, t)
            torch.testing.assert_close(y_s, y[:, [0, 2, 1, 3, 4]])


def test_the_image_pooler_of_the_fusion_is_the_mean_after_the_prefix():
    encoder = _encoder(image_positions=False, image_mean_after=1)
    assert encoder.image_pooler.mean_after == 1 and encoder.text_pooler.mean_after is None
    text, mask, image = _inputs()
    with torch.no_grad():
        t, y, pooled = encoder(text, mask, image)
    torch.testing.assert_close(pooled[:, 16:], torch.tanh(encoder.image_pooler.dense(y[:, 1:].mean(1))))
    torch.testing.assert_close(pooled[:, :16], torch.tanh(encoder.text_pooler.dense(t[:, 0])))


# --- the model: which tokens the fusion reads -------------------------------------------------
def _forward_capturing_fusion(model, batch):
    seen = {}

    def hook(module, args, kwargs):
        seen["args"] = args

    handle = model.fusion.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            out = model(batch["images"], batch["input_ids"], batch["attention_mask"])
    finally:
        handle.remove()
    return out, seen["args"]


def test_an_average_pooled_backbone_feeds_the_fusion_its_fc_norm_tokens(make_model, make_batch):
    model = make_model("absvit_test_patch8", backbone_kwargs={"global_pool": "avg"}).eval()
    backbone = model.backbone
    assert backbone.pools_mean and isinstance(backbone.fc_norm, nn.LayerNorm)
    assert model.fusion.image_pooler.mean_after == backbone.num_prefix_tokens == 1
    with torch.no_grad():  # a LayerNorm that is not the identity
        backbone.fc_norm.weight.uniform_(0.5, 1.5)
        backbone.fc_norm.bias.normal_()
    batch = make_batch(model)
    out, args = _forward_capturing_fusion(model, batch)
    vision = out.vision
    top_down, bottom_up = backbone.fc_norm(vision.tokens), backbone.fc_norm(vision.bottom_up_tokens)
    torch.testing.assert_close(model.fusion_image_tokens(vision), top_down)
    torch.testing.assert_close(model.fusion_image_tokens(vision, "top_down"), top_down)
    torch.testing.assert_close(model.fusion_image_tokens(vision, "bottom_up"), bottom_up)
    assert not torch.allclose(top_down, vision.tokens)
    # each token normalised on its own: zero mean and unit variance before the affine map
    plain = nn.functional.layer_norm(vision.tokens, (vision.tokens.shape[-1],), eps=backbone.fc_norm.eps)
    torch.testing.assert_close(top_down, plain * backbone.fc_norm.weight + backbone.fc_norm.bias)
    # what the fusion got, with the grid
    torch.testing.assert_close(args[2], top_down)
    assert tuple(args[3]) == tuple(vision.grid_size) == (4, 4)
    # the prior loss's image side reads the gate's space: the raw tokens (the authors' code) by default ...
    torch.testing.assert_close(out.image_embeds, model.contrastive(vision.bottom_up_tokens, 1))
    torch.testing.assert_close(model.encode_image_bottom_up(batch["images"]), out.image_embeds)
    with pytest.raises(ValueError, match="kind"):
        model.fusion_image_tokens(vision, "second")
    # ... and the fusion's normalised tokens with gate_fc_norm, where the gate reads them too
    normed = make_model("absvit_test_patch8", backbone_kwargs={"global_pool": "avg", "gate_fc_norm": True}).eval()
    with torch.no_grad():
        normed.backbone.fc_norm.load_state_dict(backbone.fc_norm.state_dict())
        out = normed(**batch)
    bottom_up = normed.backbone.fc_norm(out.vision.bottom_up_tokens)
    torch.testing.assert_close(out.image_embeds, normed.contrastive(bottom_up, 1))
    gate = torch.nn.functional.cosine_similarity(bottom_up, out.xi[:, None], dim=-1).clamp(0, 1)
    torch.testing.assert_close(out.vision.prior_mask[..., 0], gate)


@pytest.mark.parametrize("backbone", ["absvit_test_patch8", "tdam_resnet_test"])
def test_token_pooled_backbones_feed_their_tokens_as_they_are(make_model, make_batch, backbone):
    model = make_model(backbone).eval()
    assert not model.backbone.pools_mean and model.fusion.image_pooler.mean_after is None
    out, args = _forward_capturing_fusion(model, make_batch(model))
    torch.testing.assert_close(model.fusion_image_tokens(out.vision), out.vision.tokens)
    torch.testing.assert_close(model.fusion_image_tokens(out.vision, "bottom_up"), out.vision.bottom_up_tokens)
    torch.testing.assert_close(args[2], out.vision.tokens)


def test_fusion_reads_both_passes_side_by_side(make_model, make_batch):
    model = make_model("absvit_test_patch8", fusion_reads="both").eval()
    width = model.backbone.num_features
    assert model.fusion.image_proj.in_features == 2 * width
    assert make_model("absvit_test_patch8").fusion.image_proj.in_features == width
    batch = make_batch(model)
    out, args = _forward_capturing_fusion(model, batch)
    vision = out.vision
    expected = torch.cat([vision.bottom_up_tokens, vision.tokens], dim=-1)
    torch.testing.assert_close(model.fusion_input(vision), expected)
    torch.testing.assert_close(args[2], expected)
    assert out.image_tokens.shape == (len(batch["images"]), vision.tokens.shape[1], model.config.fusion_hidden_size)
    # the first half of the projection reads the bottom-up tokens: zeroing it removes their effect
    with torch.no_grad():
        model.fusion.image_proj.weight[:, :width] = 0
        zeroed = model(batch["images"], batch["input_ids"], batch["attention_mask"]).pooled
        model.fusion.image_proj.weight[:, width:] = 0
        nothing = model(batch["images"], batch["input_ids"], batch["attention_mask"]).pooled
    assert (zeroed - out.pooled).abs().max() > 1e-5 and (nothing - zeroed).abs().max() > 1e-5
    # trains end to end
    model.train()
    model(**batch).loss.backward()
    assert model.fusion.image_proj.weight.grad[:, :width].abs().sum() > 0
    assert model.fusion.image_proj.weight.grad[:, width:].abs().sum() > 0


def test_fusion_image_positions_in_the_model(make_model, make_batch):
    with_positions = make_model("absvit_test_patch8", fusion_image_positions=True).eval()
    without = make_model("absvit_test_patch8").eval()
    assert with_positions.fusion.image_positions and not without.fusion.image_positions
    without.load_state_dict(with_positions.state_dict())  # no parameter of its own: the same weights
    batch = make_batch(without)
    inputs = (batch["images"], batch["input_ids"], batch["attention_mask"])
    with torch.no_grad():
        a, b = with_positions(*inputs), without(*inputs)
    torch.testing.assert_close(a.vision.tokens, b.vision.tokens)
    assert (a.pooled - b.pooled).abs().max() > 1e-4


def test_config_refuses_an_unknown_fusion_reads():
    with pytest.raises(ValueError, match="fusion_reads"):
        AbsVLConfig(fusion_reads="bottom_up")
    config = AbsVLConfig()
    assert (config.fusion_reads, config.fusion_image_positions, config.prior_object_weight) == ("top_down", False, 0.0)


def test_new_options_survive_save_and_load(make_model, make_batch, tmp_path):
    options = {"fusion_reads": "both", "fusion_image_positions": True, "prior_object_weight": 0.25}
    model = make_model("absvit_test_patch8", backbone_kwargs={"global_pool": "avg"}, **options).eval()
    model.save_pretrained(tmp_path / "m")
    written = json.loads((tmp_path / "m" / "config.json").read_text())
    assert {k: written[k] for k in options} == options
    loaded = AbsVLModel.from_pretrained(tmp_path / "m")
    assert {k: getattr(loaded.config, k) for k in options} == options
    assert loaded.fusion.image_positions and loaded.fusion.image_proj.in_features == 2 * loaded.backbone.num_features
    assert loaded.fusion.image_pooler.mean_after == 1
    batch = make_batch(model)
    inputs = (batch["images"], batch["input_ids"], batch["attention_mask"])
    with torch.no_grad():
        torch.testing.assert_close(loaded(*inputs).pooled, model(*inputs).pooled)


# --- the init of the new layers ----------------------------------------------------------------
@pytest.mark.parametrize("fan_in", [48, 192, 768, 3072])
def test_new_linears_keep_meters_gain_whatever_the_width(fan_in):
    torch.manual_seed(0)
    linear = nn.Linear(fan_in, 2000)
    init_new_weights(linear)
    expected = 0.02 * math.sqrt(768 / fan_in)
    assert linear.weight.std().item() == pytest.approx(expected, rel=0.03)
    assert abs(linear.weight.mean().item()) < 0.05 * expected
    assert torch.all(linear.bias == 0)
    # the gain per layer, std(w)·√fan_in, is METER's 0.02·√768 at every width
    assert linear.weight.std().item() * math.sqrt(fan_in) == pytest.approx(0.02 * math.sqrt(768), rel=0.03)


def test_embeddings_and_norms_keep_berts_init():
    torch.manual_seed(0)
    embedding, norm = nn.Embedding(3000, 32), nn.LayerNorm(16)
    with torch.no_grad():
        norm.weight.fill_(3.0)
        norm.bias.fill_(1.0)
    init_new_weights(embedding)
    init_new_weights(norm)
    assert embedding.weight.std().item() == pytest.approx(0.02, rel=0.03)  # no width scaling
    assert torch.all(norm.weight == 1) and torch.all(norm.bias == 0)


def test_the_model_inits_its_new_layers_width_scaled(make_model):
    model = make_model("absvit_test_patch8")
    hidden = model.config.fusion_hidden_size
    fc1 = model.fusion.text_layers[0].ffn.fc1
    assert fc1.in_features == hidden
    assert fc1.weight.std().item() == pytest.approx(0.02 * math.sqrt(768 / hidden), rel=0.1)
    assert torch.all(fc1.bias == 0)
    fc2 = model.fusion.text_layers[0].ffn.fc2  # fan_in 4H: a smaller std than fc1
    assert fc2.weight.std().item() == pytest.approx(0.02 * math.sqrt(768 / fc2.in_features), rel=0.1)
    proj = model.fusion.image_proj
    assert proj.weight.std().item() == pytest.approx(0.02 * math.sqrt(768 / proj.in_features), rel=0.15)
    assert model.fusion.token_type_embeddings.weight.std().item() < 0.05  # 0.02, not width-scaled (~0.1)
    # the backbone and the text encoder keep their own init
    qkv = model.backbone.blocks[0].attn.qkv
    assert qkv.weight.std().item() != pytest.approx(0.02 * math.sqrt(768 / qkv.in_features), rel=0.1)
