"""timm's interface on the backbones (forward_features / forward_head / reset_classifier /
forward_intermediates), the top-down mode objects and the registry's default configs."""

import pytest
import torch

from absvl import create_backbone
from absvl.models.vision.registry import backbone_defaults, list_backbones
from absvl.models.vision.topdown_modes import TOPDOWN_MODES, TopDown, get_topdown


def _images(b=2, size=32, seed=0):
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _vit(mode, **kw):
    torch.manual_seed(0)
    return create_backbone("vit_test_patch8", topdown=mode, num_classes=3, **kw).eval()


@pytest.mark.parametrize("mode", TOPDOWN_MODES)
def test_vit_features_and_head_are_the_forward_output(mode):
    model = _vit(mode)
    x, xi = _images(), torch.randn(2, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(x, xi)
        tokens = model.forward_features(x, xi)
        torch.testing.assert_close(tokens, out.tokens, rtol=0, atol=0)
        torch.testing.assert_close(model.forward_head(tokens, pre_logits=True), out.pooled, rtol=0, atol=0)
        torch.testing.assert_close(model.forward_head(tokens), out.logits, rtol=0, atol=0)
        assert torch.equal(model.forward_features(x), model(x).tokens)  # the learned prompt as prior


@pytest.mark.parametrize("mode", TOPDOWN_MODES)
def test_vit_intermediates_are_the_output_pass_blocks(mode):
    model = _vit(mode)
    x, xi = _images(), torch.randn(2, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        final, inter = model.forward_intermediates(x, xi)
        assert len(inter) == 4 and all(t.shape == (2, 64, 4, 4) for t in inter)
        torch.testing.assert_close(final, model(x, xi).tokens, rtol=0, atol=0)
        # the last block's output, normed, is the output tokens of the pass that ran the blocks last
        last = model.forward_intermediates(x, xi, indices=1, norm=True, output_fmt="NLC", intermediates_only=True)
        assert len(last) == 1 and last[0].shape == (2, 16, 64)
        if mode != "perceiver":
            torch.testing.assert_close(last[0], final[:, 1:], rtol=0, atol=1e-6)
        # the map block's output is what the maps are made of
        out = model(x, xi, return_maps=True)
        (block,) = model.forward_intermediates(
            x, xi, indices=[model.map_index], output_fmt="NLC", intermediates_only=True
        )
        kind = "bottom_up" if mode in ("none", "perceiver") else "top_down"
        if mode != "perceiver":
            torch.testing.assert_close(block.norm(dim=-1).reshape(2, 4, 4), out.maps[kind], rtol=0, atol=1e-6)
        with_prefix = model.forward_intermediates(x, xi, indices=2, return_prefix_tokens=True, intermediates_only=True)
        assert [tuple(p.shape) for _, p in with_prefix] == [(2, 1, 64)] * 2
    with pytest.raises(ValueError, match="output_fmt"):
        model.forward_intermediates(x, output_fmt="NHWC")


def test_vit_topdown_intermediates_differ_from_bottom_up():
    model = _vit("absvit")
    x = _images()
    with torch.no_grad():
        _, top_down = model.forward_intermediates(x, indices=[0, 3], output_fmt="NLC")
        first, bottom_up = model.first_pass(x, take=[0, 3])
    assert all(not torch.allclose(top_down[j], bottom_up[i][:, 1:]) for j, i in enumerate((0, 3)))
    torch.testing.assert_close(model.norm(bottom_up[3]), first.bottom_up_tokens, rtol=0, atol=0)


def test_vit_reset_classifier():
    model = _vit("absvit")
    x = _images()
    model.reset_classifier(7)
    assert model.num_classes == 7 and model.head.out_features == 7
    with torch.no_grad():
        out = model(x)
    assert out.logits.shape == (2, 7) and out.bottom_up_logits.shape == (2, 7)
    model.reset_classifier(0, global_pool="avg")
    with torch.no_grad():
        out = model(x)
    assert out.logits is None and isinstance(model.head, torch.nn.Identity)
    torch.testing.assert_close(out.pooled, out.tokens[:, 1:].mean(1), rtol=0, atol=0)  # fc_norm stays the identity
    with pytest.raises(ValueError, match="global_pool"):
        model.reset_classifier(3, global_pool="max")


@pytest.mark.parametrize("name", ["tdam_resnet_test", "resnet_test_bottleneck"])
def test_resnet_timm_interface(name):
    torch.manual_seed(0)
    model = create_backbone(name, num_classes=5).eval()
    x = _images(size=64)
    with torch.no_grad():
        out = model(x, return_maps=True)
        features = model.forward_features(x, xi=torch.randn(2, model.num_features))
        assert features.shape == (2, model.num_features, 2, 2)
        torch.testing.assert_close(out.tokens[:, 1:], features.flatten(2).transpose(1, 2), rtol=0, atol=0)
        torch.testing.assert_close(model.forward_head(features, pre_logits=True), out.pooled, rtol=0, atol=0)
        torch.testing.assert_close(model.forward_head(features), out.logits, rtol=0, atol=0)
        final, inter = model.forward_intermediates(x, None, indices=2)
        torch.testing.assert_close(final, features, rtol=0, atol=0)
        assert [t.shape[1] for t in inter] == [model.feature_info[3]["num_chs"], model.num_features]
    model.reset_classifier(2)
    with torch.no_grad():
        assert model(x).logits.shape == (2, 2)


def test_mode_objects():
    assert list(TOPDOWN_MODES) == ["none", "absvit", "qkv", "feedback", "perceiver", "maskatt"]
    assert all(isinstance(m, TopDown) for m in TOPDOWN_MODES.values())
    assert {n for n, m in TOPDOWN_MODES.items() if m.needs_decoders} == {"absvit", "qkv", "feedback"}
    assert {n for n, m in TOPDOWN_MODES.items() if m.uses_prior} == {"absvit", "qkv", "perceiver", "maskatt"}
    assert {n for n, m in TOPDOWN_MODES.items() if m.td_target == "qkv"} == {"qkv"}
    with pytest.raises(ValueError, match="topdown='x' is not one of none, absvit"):
        get_topdown("x")
    model = _vit("feedback")
    assert model.topdown == "feedback" and model.topdown_mode is TOPDOWN_MODES["feedback"]
    first, _ = model.first_pass(_images())
    assert TOPDOWN_MODES["none"].run(model, first, None) is None
    with torch.no_grad():
        second = TOPDOWN_MODES["feedback"].run(model, first, None, return_maps=False, take=[1])
    assert second.gate is None and second.top_down_map is None and second.aux_losses == {}
    assert len(second.intermediates) == 1 and second.intermediates[0].shape == (2, 17, 64)


def test_default_configs_name_the_pretrained_weights():
    assert backbone_defaults("absvit_base_patch16_224").pretrained == "deit_base_patch16_224.fb_in1k"
    assert backbone_defaults("tdam_resnet50").family == "tdam"
    assert backbone_defaults("vit_test_patch8").pretrained is None
    with_weights = {n for n in list_backbones() if backbone_defaults(n).pretrained}
    assert "vars_sd_vit_tiny_patch16_224" not in with_weights and len(with_weights) == 20
