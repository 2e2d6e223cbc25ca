"""TDAM ResNets (SPEC §4): block semantics, per-step BatchNorms, timm weight compatibility."""

import io

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.resnet import BasicBlock, Bottleneck, downsample_conv

from absvl import create_backbone
from absvl.models.vision import count_params, estimate_macs
from absvl.models.vision.tdam import TDAMBasicBlock, TDAMBottleneck, TopDownAttention

BLOCKS = {"bottleneck": (Bottleneck, TDAMBottleneck, 4), "basic": (BasicBlock, TDAMBasicBlock, 1)}
TEST_MODELS = ("tdam_resnet_test", "tdam_resnet_test_bottleneck")


def _images(b=2, h=64, w=64, seed=0):
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _randomize_norms(module, seed=0):
    """Non-trivial BatchNorm parameters and running statistics, so that copies are checkable."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in module.modules():
            if isinstance(bn, torch.nn.BatchNorm2d):
                bn.weight.uniform_(0.5, 1.5, generator=g)
                bn.bias.uniform_(-0.2, 0.2, generator=g)
                bn.running_mean.uniform_(-0.2, 0.2, generator=g)
                bn.running_var.uniform_(0.5, 1.5, generator=g)
    return module


def _block_pair(kind, steps, mode="joint", inplanes=32, planes=16, stride=2):
    """A timm block and a TDAM block of the same shape, the TDAM one carrying the timm weights."""
    plain_cls, tdam_cls, expansion = BLOCKS[kind]
    torch.manual_seed(0)

    def down():
        return downsample_conv(inplanes, planes * expansion, 1, stride=stride)

    plain = _randomize_norms(plain_cls(inplanes, planes, stride, down()))
    tdam = tdam_cls(inplanes, planes, stride, down(), steps=steps, mode=mode)
    report = tdam.load_state_dict(plain.state_dict(), strict=False)
    assert report.unexpected_keys == []
    return plain.eval(), tdam.eval(), report.missing_keys


@pytest.mark.parametrize("kind", BLOCKS)
def test_one_step_block_is_the_timm_block(kind):
    plain, tdam, missing = _block_pair(kind, steps=1)
    assert missing == [] and not hasattr(tdam, "tdam")
    x = torch.randn(2, 32, 12, 10)
    with torch.no_grad():
        torch.testing.assert_close(tdam(x), plain(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", BLOCKS)
def test_two_step_block_lowered_to_one_step_is_the_timm_block(kind):
    plain, tdam, missing = _block_pair(kind, steps=2)
    step_norms = {"bottleneck": {"bn3_1"}, "basic": {"bn1_1", "bn2_1"}}[kind]
    assert {k.split(".")[0] for k in missing} == {"tdam"} | step_norms
    x = torch.randn(2, 32, 12, 10)
    with torch.no_grad():
        two = tdam(x)
        tdam.steps = 1
        torch.testing.assert_close(tdam(x), plain(x), rtol=0, atol=1e-6)
    assert (two - plain(x)).abs().max() > 1e-3


def _searchlight_reference(att, bottom, top):
    """TDAM Eq. 2-5 written out on pooled vectors."""
    h = F.relu(top.mean((2, 3)) @ att.top_proj.weight[:, :, 0, 0].T)
    if att.bottom_proj is not None:
        h = torch.cat([h, F.relu(bottom.mean((2, 3)) @ att.bottom_proj.weight[:, :, 0, 0].T)], dim=1)
    s = h @ att.searchlight.weight[:, :, 0, 0].T
    x1 = torch.sigmoid(s)[:, :, None, None] * bottom
    a = torch.sigmoid(torch.einsum("bc,bchw->bhw", s, x1))
    return a[:, None] * x1, a


@pytest.mark.parametrize("mode", ["joint", "top"])
def test_searchlight_matches_equations(mode):
    torch.manual_seed(0)
    att = TopDownAttention(bottom_channels=12, top_channels=48, mode=mode, reduction=16)
    assert att.top_proj.weight.shape == (3, 48, 1, 1)
    assert att.searchlight.weight.shape == (12, 6 if mode == "joint" else 3, 1, 1)
    assert (att.bottom_proj is not None) == (mode == "joint")
    bottom, top = torch.randn(2, 12, 5, 7), torch.randn(2, 48, 3, 4)
    out, a = att(bottom, top)
    ref_out, ref_a = _searchlight_reference(att, bottom, top)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(a, ref_a)
    assert a.shape == (2, 5, 7)


@pytest.mark.parametrize("kind", BLOCKS)
def test_two_step_block_matches_a_written_out_reference(kind):
    """Bottleneck m=1: bottom = act2 output, top = bn3 output; BasicBlock m=2: bottom = block input,
    top = bn2 output. Step 2 reruns those layers from the modulated bottom with its own BNs; the
    residual adds the unmodulated block input."""
    _, blk, _ = _block_pair(kind, steps=2)
    _randomize_norms(blk, seed=1)
    x = torch.randn(2, 32, 12, 10)
    if kind == "bottleneck":
        bottom = F.relu(blk.bn2(blk.conv2(F.relu(blk.bn1(blk.conv1(x))))))
        top = blk.bn3(blk.conv3(bottom))
        bottom, _ = _searchlight_reference(blk.tdam, bottom, top)
        top = blk.bn3_1(blk.conv3(bottom))
    else:
        top = blk.bn2(blk.conv2(F.relu(blk.bn1(blk.conv1(x)))))
        bottom, _ = _searchlight_reference(blk.tdam, x, top)
        top = blk.bn2_1(blk.conv2(F.relu(blk.bn1_1(blk.conv1(bottom)))))
    with torch.no_grad():
        torch.testing.assert_close(blk(x), F.relu(top + blk.downsample(x)))


@pytest.mark.parametrize("name", TEST_MODELS)
@pytest.mark.parametrize("mode", ["joint", "top"])
def test_two_steps_run_at_two_resolutions_forward_and_backward(name, mode):
    torch.manual_seed(0)
    model = create_backbone(name, mode=mode, num_classes=5, zero_init_last=False).train()
    joint_keys = [k for k in model.state_dict() if "tdam.bottom_proj" in k]
    assert bool(joint_keys) == (mode == "joint")
    width = model.num_features
    for h, w in ((64, 64), (96, 128)):
        out = model(_images(2, h, w), xi=torch.randn(2, 7))
        grid = (h // 32, w // 32)
        assert out.grid_size == grid and out.num_prefix_tokens == 1
        assert out.tokens.shape == (2, 1 + grid[0] * grid[1], width)
        assert out.pooled.shape == (2, width) and out.logits.shape == (2, 5)
        torch.testing.assert_close(out.tokens[:, 0], out.pooled)
        torch.testing.assert_close(out.patch_tokens.mean(1), out.pooled)
        assert out.bottom_up_tokens is out.tokens and out.bottom_up_pooled is out.pooled
        assert out.bottom_up_logits is out.logits and out.aux_losses == {} and out.maps == {}
        model.zero_grad()
        (out.logits.square().mean() + out.tokens.mean()).backward()
        blk = model.layer4[-1]
        for p in (blk.tdam.top_proj.weight, blk.tdam.searchlight.weight, blk.norm(blk.num_layers - 1, 1).weight):
            assert p.grad is not None and p.grad.abs().sum() > 0


def test_step_norms_exist_and_only_the_second_step_uses_them():
    torch.manual_seed(0)
    model = _randomize_norms(create_backbone("tdam_resnet_test_bottleneck")).eval()
    keys = model.state_dict()
    for stage in ("layer3", "layer4"):
        for i in range(2):
            assert f"{stage}.{i}.bn3_1.weight" in keys and f"{stage}.{i}.bn3_1.running_var" in keys
            assert f"{stage}.{i}.bn2_1.weight" not in keys
    assert not any(k.startswith(("layer1", "layer2")) and ("tdam" in k or "_1." in k) for k in keys)
    basic = create_backbone("tdam_resnet_test").state_dict()
    assert "layer3.0.bn1_1.weight" in basic and "layer4.1.bn2_1.weight" in basic

    x = _images()
    with torch.no_grad():
        before = model(x).tokens
        for blk in model.tdam_blocks():
            blk.steps = 1
        one_before = model(x).tokens
        for blk in model.tdam_blocks():
            blk.bn3_1.weight.mul_(1.5)
        one_after = model(x).tokens
        for blk in model.tdam_blocks():
            blk.steps = 2
        after = model(x).tokens
    assert (after - before).abs().max() > 1e-3
    torch.testing.assert_close(one_after, one_before, rtol=0, atol=0)


def test_new_step_norms_start_as_copies_and_sync_after_loading():
    model = create_backbone("tdam_resnet_test")
    for blk in model.tdam_blocks():
        for i in range(2):
            for k, v in blk.norm(i, 0).state_dict().items():
                torch.testing.assert_close(blk.norm(i, 1).state_dict()[k], v, rtol=0, atol=0)
    _randomize_norms(model)
    blk = model.layer3[0]
    assert not torch.equal(blk.bn1_1.weight, blk.bn1.weight)
    model.sync_step_norms()
    for name in ("weight", "bias", "running_mean", "running_var"):
        assert torch.equal(getattr(blk.bn1_1, name), getattr(blk.bn1, name))
        assert torch.equal(getattr(blk.bn2_1, name), getattr(blk.bn2, name))


def test_timm_resnet18_weights_load_unchanged_and_match():
    torch.manual_seed(0)
    ref = _randomize_norms(timm.create_model("resnet18", pretrained=False, num_classes=10)).eval()
    ours = create_backbone("resnet18", num_classes=10).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = _images(1, 64, 96)
    with torch.no_grad():
        out = ours(x)
        feats = ref.forward_features(x)
        torch.testing.assert_close(out.patch_tokens, feats.flatten(2).transpose(1, 2), rtol=0, atol=1e-6)
        torch.testing.assert_close(out.pooled, ref.forward_head(feats, pre_logits=True), rtol=0, atol=1e-6)
        torch.testing.assert_close(out.logits, ref(x), rtol=0, atol=1e-5)
    assert out.grid_size == (2, 3)

    tdam = create_backbone("tdam_resnet18", num_classes=10).eval()
    report = tdam.load_state_dict(ref.state_dict(), strict=False)
    assert report.unexpected_keys == []
    assert report.missing_keys and all(
        k.startswith(("layer3.", "layer4.")) and (".tdam." in k or k.split(".")[2] in ("bn1_1", "bn2_1"))
        for k in report.missing_keys
    )
    assert {k for k in report.missing_keys if ".tdam." in k} == {
        f"layer{s}.{i}.tdam.{p}.weight"
        for s in (3, 4)
        for i in range(2)
        for p in ("top_proj", "bottom_proj", "searchlight")
    }
    tdam.sync_step_norms()
    assert torch.equal(tdam.layer4[1].bn2_1.running_var, ref.layer4[1].bn2.running_var)
    with torch.no_grad():
        for blk in tdam.tdam_blocks():
            blk.steps = 1
        torch.testing.assert_close(tdam(x).tokens, out.tokens, rtol=0, atol=1e-6)


def test_resnet50_parameter_counts_and_cost_match_the_paper():
    """Paper Table 1: ResNet-50 25.56M → TDjoint(t=2, m=1) 27.65M, TDtop 27.06M (1000 classes);
    4.12 → 4.59 GFLOPs (multiply-accumulates): TDAM adds ~0.47 G."""
    (_, base), (_, td) = estimate_macs("resnet50"), estimate_macs("tdam_resnet50")
    assert abs((td - base) / 1e9 - 0.47) < 0.01
    counts = [
        round(count_params(create_backbone(name, num_classes=1000, **kw)) / 1e6, 2)
        for name, kw in (("resnet50", {}), ("tdam_resnet50", {}), ("tdam_resnet50", {"mode": "top"}))
    ]
    assert counts == [25.56, 27.65, 27.06]
    ref = timm.create_model("resnet50", pretrained=False)
    report = create_backbone("tdam_resnet50", num_classes=1000).load_state_dict(ref.state_dict(), strict=False)
    assert report.unexpected_keys == []
    assert set(report.missing_keys) == {
        f"layer{s}.{i}.{k}"
        for s, n in ((3, 6), (4, 3))
        for i in range(n)
        for k in ("tdam.top_proj.weight", "tdam.bottom_proj.weight", "tdam.searchlight.weight")
        + tuple(f"bn3_1.{p}" for p in ("weight", "bias", "running_mean", "running_var"))
    }


@pytest.mark.parametrize("name", TEST_MODELS)
def test_state_dict_round_trip(name):
    torch.manual_seed(0)
    model = _randomize_norms(create_backbone(name, num_classes=3)).eval()
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    torch.manual_seed(1)
    clone = create_backbone(name, num_classes=3).eval()
    clone.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
    x = _images(2, 64, 80)
    with torch.no_grad():
        torch.testing.assert_close(clone(x).logits, model(x).logits, rtol=0, atol=0)
        torch.testing.assert_close(clone(x).tokens, model(x).tokens, rtol=0, atol=0)


@pytest.mark.parametrize("name", TEST_MODELS)
@pytest.mark.parametrize("layers", [(1, 1, 2, 2), (1, 1, 1, 1)])
def test_maps(name, layers):
    """``top_down`` is the last TDAM block's spatial map, pooled to the grid when that block is strided."""
    model = create_backbone(name, layers=layers).eval()
    with torch.no_grad():
        out = model(_images(2, 96, 128), return_maps=True)
    assert set(out.maps) == {"bottom_up", "top_down"}
    for m in out.maps.values():
        assert m.shape == (2, 3, 4)
    assert ((out.maps["top_down"] > 0) & (out.maps["top_down"] < 1)).all()
    torch.testing.assert_close(out.maps["bottom_up"], out.patch_tokens.norm(dim=-1).view(2, 3, 4))
    plain = create_backbone(name.removeprefix("tdam_"), layers=layers).eval()
    assert set(plain(_images(1), return_maps=True).maps) == {"bottom_up"}


def test_bad_options_are_rejected():
    with pytest.raises(ValueError, match="mode"):
        create_backbone("tdam_resnet_test", mode="bottom")
    with pytest.raises(ValueError, match="stages"):
        create_backbone("tdam_resnet_test", stages=(5,))
    with pytest.raises(ValueError, match="m=3"):
        create_backbone("tdam_resnet_test", m=3)
    with pytest.raises(ValueError, match="steps"):
        create_backbone("tdam_resnet_test", steps=0)
