"""Every registered backbone honours the contract: output type, two resolutions, backward, save/load."""

import io

import pytest
import torch

from absvl import BackboneOutput, create_backbone, list_backbones
from absvl.models.vision import backbone_family, estimate_macs


def _sizes(model):
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if patch is None:  # CNN: any size
        return [(64, 64), (64, 96)]
    p = patch[0]
    return [(2 * p, 2 * p), (3 * p, 4 * p)]


@pytest.mark.parametrize("name", list_backbones())
def test_backbone_contract(name):
    torch.manual_seed(0)
    model = create_backbone(name).train()
    assert model.backbone_config == {"name": name}
    for h, w in _sizes(model):
        images = torch.randn(2, 3, h, w)
        out = model(images, xi=torch.randn(2, model.num_features), return_maps=True)
        assert isinstance(out, BackboneOutput)
        gh, gw = out.grid_size
        assert out.tokens.shape == (2, out.num_prefix_tokens + gh * gw, model.num_features)
        assert out.pooled.shape == (2, model.num_features)
        assert out.bottom_up_tokens.shape == out.tokens.shape
        assert out.maps["bottom_up"].shape == (2, gh, gw)
        loss = out.pooled.square().mean() + out.tokens.mean() + sum(out.aux_losses.values(), torch.zeros(()))
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert any(g is not None and g.abs().sum() > 0 for g in grads)
        model.zero_grad()

    # state-dict round trip through torch.save / torch.load(weights_only=True)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    torch.manual_seed(123)  # a different init, overwritten by the load
    clone = create_backbone(name)
    clone.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
    model.eval(), clone.eval()
    images = torch.randn(1, 3, *_sizes(model)[0])
    with torch.no_grad():
        assert torch.equal(model(images).tokens, clone(images).tokens)


def test_families_and_listing():
    names = list_backbones()
    assert {"vit_base_patch16_224", "absvit_base_patch16_224", "absvit_tiny_patch8_224_gap"} <= set(names)
    assert all(backbone_family(n) == "absvit" for n in list_backbones("absvit"))
    assert names == sorted(names)


def test_macs_estimate_matches_the_papers_cost_ratio():
    vit_params, vit_macs = estimate_macs("vit_base_patch16_224")
    abs_params, abs_macs = estimate_macs("absvit_base_patch16_224")
    # paper: ViT-B 87M/17.2G -> AbSViT-B 99M/38.9G; params grow by 2C^2 per block + C
    assert abs_params - vit_params == 12 * 2 * 768 * 768 + 768
    assert 17.0e9 < vit_macs < 17.8e9
    assert 2.1 < abs_macs / vit_macs < 2.35
