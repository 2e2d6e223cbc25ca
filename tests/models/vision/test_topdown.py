"""The top-down path's health figures, the shut-gate warning, and the conv stem."""

import pytest
import torch

from absvl.models.vision import BackboneOutput, create_backbone
from absvl.models.vision.topdown import SHUT_GATE_OPEN_SHARE, shut_gate_warning, topdown_health


def test_health_figures_on_a_known_output():
    bottom_up = torch.ones(2, 5, 4)  # 1 prefix token + 4 spatial tokens
    tokens = bottom_up * 1.5  # the second pass changed every token by half its norm
    gate = torch.tensor([[0.9, 0.0, 0.5, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0, 0.0]]).unsqueeze(-1)
    output = BackboneOutput(
        tokens=tokens,
        pooled=tokens[:, 0],
        bottom_up_tokens=bottom_up,
        bottom_up_pooled=bottom_up[:, 0],
        grid_size=(2, 2),
        num_prefix_tokens=1,
        prior_mask=gate,
    )
    xi = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    stats = {k: float(v) for k, v in topdown_health(output, xi).items()}
    spatial = gate[:, 1:, 0]  # the prefix token's gate is left out
    assert stats["gate/mean"] == pytest.approx(spatial.mean().item())
    assert stats["gate/open"] == pytest.approx(2 / 8) and stats["gate/max"] == pytest.approx(1.0)
    assert stats["gate/spread"] == pytest.approx(spatial.std(dim=1).mean().item())
    # pairwise cosines of the 3 priors: 0, 1/√2, 1/√2
    assert stats["prior/xi_pairwise_cos"] == pytest.approx((2 / 2**0.5) / 3)
    assert stats["topdown/change"] == pytest.approx(0.5)
    # a backbone without prior or second pass reports nothing of them
    plain = BackboneOutput(
        tokens=bottom_up,
        pooled=bottom_up[:, 0],
        bottom_up_tokens=bottom_up,
        bottom_up_pooled=bottom_up[:, 0],
        grid_size=(2, 2),
        num_prefix_tokens=1,
    )
    assert topdown_health(plain) == {}


def test_shut_gate_warning():
    assert shut_gate_warning({"loss": 1.0}) is None  # no gate: nothing to say
    assert shut_gate_warning({"gate/open": 0.2}) is None
    message = shut_gate_warning({"gate/open": SHUT_GATE_OPEN_SHARE / 2})
    assert "prior gate" in message and "stayed shut" in message and "pretrained" in message


def test_absvit_reports_its_gate():
    model = create_backbone("absvit_test_patch8").eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32), xi=torch.randn(2, 64))
        assert out.prior_mask.shape == (2, 17, 1) and 0 <= out.prior_mask.min() <= out.prior_mask.max() <= 1
        assert model(torch.randn(2, 3, 32, 32), bottom_up_only=True).prior_mask is None
        assert create_backbone("vit_test_patch8")(torch.randn(1, 3, 32, 32)).prior_mask is None


def test_conv_stem_embeds_patches_with_convolutions():
    model = create_backbone("absvit_test_patch8", img_size=32, stem="conv").eval()
    names = [n for n, _ in model.named_parameters() if n.startswith("patch_embed.")]
    assert "patch_embed.proj.0.conv.weight" in names and "patch_embed.proj.2.conv.bias" in names
    stem = model.patch_embed.proj
    assert [m.conv.stride for m in stem] == [(2, 2)] * 3 and stem[-1].conv.out_channels == 64
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32), return_maps=True)
        other = model(torch.randn(1, 3, 48, 64))  # any size divisible by the patch size
    assert out.tokens.shape == (2, 17, 64) and out.maps["top_down"].shape == (2, 4, 4)
    assert other.grid_size == (6, 8)
    with pytest.raises(ValueError, match="power-of-two patch size"):
        create_backbone("absvit_test_patch8", patch_size=6, stem="conv")
    with pytest.raises(ValueError, match="stem='pixels'"):
        create_backbone("absvit_test_patch8", stem="pixels")
