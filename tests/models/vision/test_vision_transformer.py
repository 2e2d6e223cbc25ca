"""ViT / AbSViT and the paper's top-down baselines (SPEC §2)."""

import pytest
import timm
import torch
import torch.nn.functional as F

from absvl import create_backbone
from absvl.models.vision import vision_transformer as vt
from absvl.models.vision.topdown import prior_mask, qkv_rows
from absvl.models.vision.topdown_modes import TOPDOWN_MODES
from absvl.models.vision.vision_transformer import Attention


def _images(b=2, h=32, w=32, seed=0):
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _absvit(**kw):
    torch.manual_seed(0)
    return create_backbone("absvit_test_patch8", **kw).eval()


def _zero_feedback_outputs(model):
    with torch.no_grad():
        for dec in model.decoders:
            dec.linear2.weight.zero_()


def test_timm_vit_weights_load_unchanged_and_match():
    ref = timm.create_model("vit_tiny_patch16_224", num_classes=10).eval()
    ours = create_backbone("vit_tiny_patch16_224", num_classes=10).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = _images(1, 224, 224)
    with torch.no_grad():
        out = ours(x)
        torch.testing.assert_close(out.tokens, ref.forward_features(x), rtol=0, atol=1e-5)
        torch.testing.assert_close(out.logits, ref(x), rtol=0, atol=1e-5)


def test_absvit_with_zero_feedback_equals_vit_of_same_weights():
    ref = timm.create_model("vit_tiny_patch16_224", num_classes=0).eval()
    model = create_backbone("absvit_tiny_patch16_224").eval()
    report = model.load_state_dict(ref.state_dict(), strict=False)
    assert report.unexpected_keys == []
    assert set(report.missing_keys) == {"prompt"} | {
        f"decoders.{i}.linear{s}.weight" for i in range(12) for s in ("", "2")
    }
    _zero_feedback_outputs(model)
    x = _images(1, 224, 224)
    with torch.no_grad():
        out = model(x)
        torch.testing.assert_close(out.tokens, ref.forward_features(x), rtol=0, atol=1e-5)
    assert not torch.equal(out.tokens, create_backbone("absvit_tiny_patch16_224").eval()(x).tokens)


def test_alpha_zero_second_pass_equals_first():
    model = _absvit(alpha=0.0)
    with torch.no_grad():
        out = model(_images())
    torch.testing.assert_close(out.tokens, out.bottom_up_tokens, rtol=0, atol=1e-6)
    model = _absvit(alpha=1.0)
    with torch.no_grad():
        out = model(_images())
    assert (out.tokens - out.bottom_up_tokens).abs().max() > 1e-4


def test_topdown_changes_values_only(monkeypatch):
    """Q and K with a top-down input equal those without; V changes by exactly W_v·td."""
    seen, sdpa = [], F.scaled_dot_product_attention

    def recording_sdpa(q, k, v, **kw):
        seen.append((q, k, v))
        return sdpa(q, k, v, **kw)

    monkeypatch.setattr(vt.F, "scaled_dot_product_attention", recording_sdpa)
    torch.manual_seed(0)
    attn = Attention(16, num_heads=2).eval()
    x, td = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    attn(x)
    attn(x, td=td)
    (q0, k0, v0), (q1, k1, v1) = seen
    assert torch.equal(q0, q1) and torch.equal(k0, k1)
    v_td = (td @ attn.qkv.weight[32:].T).view(2, 5, 2, 8).transpose(1, 2)
    torch.testing.assert_close(v1 - v0, v_td)

    seen.clear()
    attn_qkv = Attention(16, num_heads=2, td_target="qkv").eval()
    attn_qkv(x)
    attn_qkv(x, td=td)
    (q0, k0, _), (q1, k1, _) = seen
    assert not torch.allclose(q0, q1) and not torch.allclose(k0, k1)


def test_qkv_rows_adds_topdown_by_linearity_with_optional_second_bias():
    torch.manual_seed(0)
    qkv = torch.nn.Linear(16, 48)
    x, td = torch.randn(1, 3, 16), torch.randn(1, 3, 16)
    torch.testing.assert_close(qkv_rows(qkv, x, 0, 3), qkv(x))
    v_rows = slice(32, 48)
    torch.testing.assert_close(qkv_rows(qkv, x, 2, 3, td), qkv(x)[..., v_rows] + td @ qkv.weight[v_rows].T)
    # the authors' code: td through the whole linear, value bias included a second time
    torch.testing.assert_close(qkv_rows(qkv, x, 2, 3, td, td_bias=True), qkv(x)[..., v_rows] + qkv(td)[..., v_rows])
    torch.testing.assert_close(qkv_rows(qkv, x, 0, 3, td, td_bias=True), qkv(x) + qkv(td))


def test_td_bias_option_reaches_the_attention_values():
    torch.manual_seed(0)
    x, td = torch.randn(1, 3, 16), torch.zeros(1, 3, 16)
    attn = Attention(16, num_heads=2, td_bias=True).eval()
    with torch.no_grad():
        attn.qkv.bias.normal_()
        plain = Attention(16, num_heads=2).eval()
        plain.load_state_dict(attn.state_dict())
        # a zero top-down input still adds b_v once more with td_bias, and nothing without it
        assert not torch.allclose(attn(x, td=td), attn(x))
        torch.testing.assert_close(plain(x, td=td), plain(x))


def test_prior_aligned_with_a_token_raises_its_modulation_weight():
    model = _absvit()
    with torch.no_grad():
        z = model(_images()).bottom_up_tokens
    target = 7
    mask = prior_mask(z, z[:, target])
    assert mask.shape == (2, z.shape[1], 1)
    assert torch.allclose(mask[:, target, 0], torch.ones(2))
    assert (mask[:, target, 0] >= mask[..., 0].max(dim=1).values - 1e-6).all()
    # hand computation of the gate for one token
    cos = F.cosine_similarity(z[0, 3], z[0, target], dim=0).clamp(0, 1)
    torch.testing.assert_close(mask[0, 3, 0], cos)


def test_per_sample_prior_steers_the_output():
    model = _absvit(alpha=10.0)
    x = _images(1).expand(2, -1, -1, -1)
    xi = torch.randn(2, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(x, xi=xi)
    assert torch.equal(out.bottom_up_tokens[0], out.bottom_up_tokens[1])
    assert (out.tokens[0] - out.tokens[1]).abs().max() > 1e-3


def test_variational_loss_is_the_sum_of_block_mses_and_trains_only_the_decoders_a():
    model = _absvit()
    model.train()
    x0, grid = model.embed(_images())
    mask = model.alpha * prior_mask(model.run_blocks(x0, grid)[0], model.prompt)
    td = model.feedback(model.run_blocks(x0, grid)[0] * mask)
    ins, outs, x = [], [], x0
    for i, block in enumerate(model.blocks):
        ins.append(x)
        x = block(x, td=td[i], grid_size=grid)
        outs.append(x)
    expected = sum(F.mse_loss(model.decoders[i].linear(outs[i]), ins[i]) for i in range(len(ins)))
    out = model(_images())
    torch.testing.assert_close(out.aux_losses["var"], expected)

    out.aux_losses["var"].backward()
    for name, p in model.named_parameters():
        if name.startswith("decoders.") and name.endswith(".linear.weight"):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None or p.grad.abs().sum() == 0, name


def test_variational_loss_only_in_training_and_can_be_switched_off():
    assert "var" not in _absvit()(_images()).aux_losses  # eval mode: not computed
    assert "var" not in _absvit(variational_loss=False).train()(_images()).aux_losses


@pytest.mark.parametrize("mode", TOPDOWN_MODES)
def test_every_topdown_mode_runs_forward_and_backward(mode):
    torch.manual_seed(0)
    model = create_backbone("vit_test_patch8", topdown=mode, num_classes=3).train()
    out = model(_images(), return_maps=True)  # the learned prompt is the prior
    assert out.tokens.shape == (2, 17, 64) and out.pooled.shape == (2, 64)
    assert out.maps["bottom_up"].shape == (2, 4, 4)
    loss = out.logits.sum() + sum(out.aux_losses.values(), torch.zeros(()))
    if out.bottom_up_logits is not None:
        loss = loss + out.bottom_up_logits.sum()
    loss.backward()
    assert model.patch_embed.proj.weight.grad is not None
    has_decoders = mode in ("absvit", "qkv", "feedback")
    assert hasattr(model, "decoders") == has_decoders
    assert ("var" in out.aux_losses) == has_decoders
    if mode != "none":
        assert out.maps["top_down"].shape == (2, 4, 4)
        assert not torch.equal(out.tokens, out.bottom_up_tokens)
    if mode in ("absvit", "qkv", "perceiver", "maskatt"):
        assert model.prompt.grad is not None


@pytest.mark.parametrize("mode", TOPDOWN_MODES)
def test_one_first_pass_serves_many_priors(mode):
    """top_down(first pass rows, ξ) is the full forward of those images under ξ (re-ranking reuses it)."""
    torch.manual_seed(0)
    model = create_backbone("vit_test_patch8", topdown=mode, num_classes=3).eval()
    images, rows = _images(3), torch.tensor([2, 0, 2, 1, 0])
    xi = torch.randn(5, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        first = model(images, return_maps=True, bottom_up_only=True)
        reused = model.top_down(first.select(rows), xi, return_maps=True)
        full = model(images[rows], xi, return_maps=True)
    for name in ("tokens", "pooled", "bottom_up_tokens", "bottom_up_pooled", "logits"):
        torch.testing.assert_close(getattr(reused, name), getattr(full, name), rtol=1e-5, atol=1e-5)
    assert reused.maps.keys() == full.maps.keys()
    for kind in full.maps:
        torch.testing.assert_close(reused.maps[kind], full.maps[kind], rtol=1e-5, atol=1e-5)
    assert (reused.tokens is reused.bottom_up_tokens) == (mode == "none")


def test_select_keeps_shared_tensors_shared():
    torch.manual_seed(0)
    first = create_backbone("absvit_test_patch8").eval()(_images(3), bottom_up_only=True)
    picked = first.select(torch.tensor([1, 1]))
    assert picked.tokens is picked.bottom_up_tokens and picked.pooled is picked.bottom_up_pooled
    torch.testing.assert_close(picked.embedded, first.embedded[[1, 1]])


def test_perceiver_output_is_the_masked_first_pass():
    torch.manual_seed(0)
    model = create_backbone("vit_test_patch8", topdown="perceiver", alpha=2.0).eval()
    with torch.no_grad():
        out = model(_images())
    expected = out.bottom_up_tokens * 2.0 * prior_mask(out.bottom_up_tokens, model.prompt)
    torch.testing.assert_close(out.tokens, expected)


def test_maskatt_with_unit_mask_equals_plain_pass():
    torch.manual_seed(0)
    model = create_backbone("vit_test_patch8", topdown="maskatt").eval()
    with torch.no_grad():
        x0, grid = model.embed(_images())
        plain = model.run_blocks(x0, grid)[0]
        masked = model.run_blocks(x0, grid, value_mask=torch.ones(2, x0.shape[1], 1))[0]
        halved = model.run_blocks(x0, grid, value_mask=torch.full((2, x0.shape[1], 1), 0.5))[0]
    torch.testing.assert_close(plain, masked)
    assert not torch.allclose(plain, halved)


def test_gap_variant_pools_patch_tokens_with_fc_norm():
    torch.manual_seed(0)
    model = create_backbone("absvit_tiny_patch8_224_gap", depth=2).eval()
    x = _images(1, 64, 64)
    with torch.no_grad():
        out = model(x)
    assert out.tokens.shape == (1, 1 + 64, 192)
    torch.testing.assert_close(out.pooled, model.fc_norm(out.tokens[:, 1:].mean(1)))


def test_other_resolutions_interpolate_position_embeddings():
    model = _absvit()
    out = model(_images(1, 48, 64))
    assert out.grid_size == (6, 8) and out.tokens.shape == (1, 49, 64)
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        model(_images(1, 30, 32))


def test_bad_options_are_clear_errors():
    with pytest.raises(ValueError, match="topdown='bogus'"):
        create_backbone("vit_test_patch8", topdown="bogus")
    with pytest.raises(ValueError, match="attention='nope'"):
        create_backbone("vit_test_patch8", attention="nope")
    with pytest.raises(ValueError, match="unknown backbone 'absvit_tiny'.*Did you mean"):
        create_backbone("absvit_tiny")
    with pytest.raises(TypeError, match="bad option for backbone 'vit_test_patch8'"):
        create_backbone("vit_test_patch8", not_an_option=1)


@pytest.mark.parametrize(
    "name", ["vars_d_absvit_test_patch8", "vars_s_absvit_test_patch8", "vars_sd_absvit_test_patch8"]
)
def test_vit_options_reach_vars_attention_layers(name):
    model = create_backbone(name, td_bias=True, topdown="qkv")
    attn = model.blocks[0].attn
    assert attn.td_bias is True and attn.td_target == "qkv" and attn.num_prefix_tokens == 1
    if name.startswith("vars_sd"):
        assert tuple(attn.static_atoms.shape[-2:]) == model.patch_embed.grid_size
