"""Pretrained weights: timm/DeiT/ResNet state dicts from local files into every backbone family."""

import argparse
import logging

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed
from timm.models.resnet import BasicBlock, Bottleneck, ResNet

from absvl import create_backbone
from absvl.models.vision import pretrained as pt
from absvl.models.vision.pretrained import LoadReport, load_weights, timm_pretrained_name

TEST_VIT = dict(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=2)
DECODER_KEYS = {f"decoders.{i}.linear{s}.weight" for i in range(4) for s in ("", "2")}


def _images(size=32, b=2, seed=0):
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _timm_vit(num_classes=10, seed=1):
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", num_classes=num_classes, **TEST_VIT).eval()


def _timm_resnet(block=BasicBlock, seed=1, num_classes=10):
    torch.manual_seed(seed)
    model = ResNet(block, (1, 1, 2, 2), channels=(8, 16, 32, 64), num_classes=num_classes).eval()
    with torch.no_grad():  # non-trivial BatchNorms, so copies and statistics matter
        for name, buf in model.named_buffers():
            if name.endswith("running_mean"):
                buf.normal_(0, 0.1)
            elif name.endswith("running_var"):
                buf.uniform_(0.5, 1.5)
        for name, p in model.named_parameters():
            if ".bn" in name or name.startswith("bn"):
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.1)
    return model


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_vit_loads_from_file_and_matches_timm(tmp_path, suffix):
    ref = _timm_vit()
    path = tmp_path / f"vit{suffix}"
    (save_file if suffix == ".safetensors" else torch.save)(ref.state_dict(), str(path))
    model = create_backbone("vit_test_patch8", num_classes=10, pretrained_path=path).eval()
    report = model.pretrained_report
    assert isinstance(report, LoadReport)
    assert (report.missing, report.unexpected, report.resampled, report.dropped) == ([], [], [], [])
    assert model.backbone_config == {"name": "vit_test_patch8", "num_classes": 10}
    x = _images()
    with torch.no_grad():
        out = model(x)
        torch.testing.assert_close(out.tokens, ref.forward_features(x), rtol=0, atol=1e-5)
        torch.testing.assert_close(out.logits, ref(x), rtol=0, atol=1e-5)


def test_absvit_from_deit_like_weights_misses_only_decoders_and_prompt(tmp_path, caplog):
    ref = _timm_vit()
    path = tmp_path / "deit.safetensors"
    save_file(ref.state_dict(), str(path))
    with caplog.at_level(logging.WARNING, logger=pt.__name__):
        model = create_backbone("absvit_test_patch8", pretrained_path=path).eval()
    report = model.pretrained_report
    assert set(report.missing) == DECODER_KEYS | {"prompt"}
    assert set(report.fresh) == set(report.missing) and report.missing_unexpectedly == []
    assert report.unexpected == [] and sorted(report.dropped) == ["head.bias", "head.weight"]  # backbone has no head
    assert not caplog.records  # expected-fresh keys are not warned about
    with torch.no_grad():
        for dec in model.decoders:
            dec.linear2.weight.zero_()
        x = _images()
        torch.testing.assert_close(model(x).tokens, ref.forward_features(x), rtol=0, atol=1e-5)


def test_vars_d_loads_timm_vit_only_random_matrix_missing(tmp_path):
    path = tmp_path / "vit.pth"
    torch.save(_timm_vit().state_dict(), path)
    model = create_backbone("vars_d_vit_test_patch8", num_classes=10, pretrained_path=path)
    report = model.pretrained_report
    assert set(report.missing) == {f"blocks.{i}.attn.random_matrix" for i in range(4)}
    assert report.fresh == report.missing and report.unexpected == [] and report.dropped == []


@pytest.mark.parametrize("block,name", [(BasicBlock, "_test"), (Bottleneck, "_test_bottleneck")])
def test_resnet_and_tdam_load_timm_resnet(tmp_path, block, name):
    ref = _timm_resnet(block)
    path = tmp_path / "resnet.safetensors"
    save_file(ref.state_dict(), str(path))

    plain = create_backbone(f"resnet{name}", num_classes=10, pretrained_path=path).eval()
    assert plain.pretrained_report.missing == [] and plain.pretrained_report.unexpected == []
    x = _images(64)
    with torch.no_grad():
        torch.testing.assert_close(plain(x).logits, ref(x), rtol=0, atol=1e-5)

    model = create_backbone(f"tdam_resnet{name}", num_classes=10, pretrained_path=path).eval()
    report = model.pretrained_report
    assert report.missing and report.missing_unexpectedly == [] and report.unexpected == []
    assert all(".tdam." in k or "_1." in k for k in report.missing)
    blocks = model.tdam_blocks()
    assert len(blocks) == 4
    for b in blocks:
        for i in range(b.first_recomputed, b.num_layers):
            step0, step1 = b.norm(i, 0).state_dict(), b.norm(i, 1).state_dict()
            assert step0.keys() == step1.keys()
            for k in step0:
                assert torch.equal(step0[k], step1[k]), k
    ref_sd = ref.state_dict()
    for k, v in model.state_dict().items():
        if k in ref_sd:
            assert torch.equal(v, ref_sd[k]), k


def test_tdam_step_norms_in_the_file_are_kept(tmp_path):
    """Only *missing* per-step BatchNorms are copied from step 0."""
    torch.manual_seed(0)
    src = create_backbone("tdam_resnet_test_bottleneck")
    with torch.no_grad():
        src.layer3[0].bn3_1.weight.fill_(3.0)
    path = tmp_path / "tdam.safetensors"
    save_file(src.state_dict(), str(path))
    model = create_backbone("tdam_resnet_test_bottleneck", pretrained_path=path)
    assert model.pretrained_report.missing == []
    assert torch.all(model.layer3[0].bn3_1.weight == 3.0)


def test_pos_embed_resampled_to_another_grid(tmp_path):
    ref = _timm_vit(num_classes=0)
    path = tmp_path / "vit.safetensors"
    save_file(ref.state_dict(), str(path))
    model = create_backbone("vit_test_patch8", img_size=48, pretrained_path=path)
    report = model.pretrained_report
    assert report.resampled == ["pos_embed (1, 17, 64) -> (1, 37, 64)"] and report.missing == []
    expected = resample_abs_pos_embed(ref.pos_embed.detach(), new_size=[6, 6], old_size=[4, 4], num_prefix_tokens=1)
    torch.testing.assert_close(model.pos_embed.detach(), expected)


def test_patch_embed_resampled_for_another_patch_size():
    ref = timm.create_model(
        "vit_tiny_patch16_224", num_classes=0, img_size=32, patch_size=16, embed_dim=64, depth=4, num_heads=2
    )
    model = create_backbone("absvit_test_patch8", global_pool="avg")
    report = load_weights(model, ref.state_dict(), "patch16")
    assert any(r.startswith("patch_embed.proj.weight (64, 3, 16, 16) -> (64, 3, 8, 8)") for r in report.resampled)
    assert any(r.startswith("pos_embed") for r in report.resampled)
    assert report.renamed == ["norm.weight -> fc_norm.weight", "norm.bias -> fc_norm.bias"]
    assert torch.equal(model.fc_norm.weight, ref.norm.weight)


def test_wrapped_and_module_prefixed_files(tmp_path):
    ref = _timm_vit()
    sd = ref.state_dict()
    wrapped = tmp_path / "deit_style.pth"  # the DeiT/AbSViT trainers' layout, args included
    torch.save({"model": sd, "epoch": 3, "args": argparse.Namespace(lr=1e-3, model="deit")}, wrapped)
    ddp = tmp_path / "timm_style.pth.tar.bin"  # timm trainer: state_dict of a DDP-wrapped model
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 1, "arch": "vit"}, ddp)
    x = _images()
    for path in (wrapped, ddp):
        model = create_backbone("vit_test_patch8", num_classes=10, pretrained_path=path).eval()
        assert model.pretrained_report.missing == [] and model.pretrained_report.unexpected == []
        with torch.no_grad():
            torch.testing.assert_close(model(x).logits, ref(x), rtol=0, atol=1e-5)


def test_shape_mismatch_is_an_error_naming_the_key(tmp_path):
    sd = _timm_vit().state_dict()
    sd["blocks.1.mlp.fc1.weight"] = torch.zeros(128, 64)
    path = tmp_path / "bad.safetensors"
    save_file(sd, str(path))
    with pytest.raises(ValueError, match=r"blocks\.1\.mlp\.fc1\.weight: weights \(128, 64\), model \(256, 64\)"):
        create_backbone("vit_test_patch8", pretrained_path=path)


def test_head_with_other_classes_dropped_and_unexpected_reported(tmp_path, caplog):
    sd = _timm_vit(num_classes=10).state_dict()
    sd["extra.weight"] = torch.zeros(3)
    path = tmp_path / "w.safetensors"
    save_file(sd, str(path))
    with caplog.at_level(logging.WARNING, logger=pt.__name__):
        model = create_backbone("vit_test_patch8", num_classes=5, pretrained_path=path)
    report = model.pretrained_report
    assert sorted(report.dropped) == ["head.bias", "head.weight"] and report.unexpected == ["extra.weight"]
    assert sorted(report.missing) == ["head.bias", "head.weight"] and report.missing_unexpectedly == report.missing
    assert "extra.weight" in caplog.text and "head.weight" in caplog.text


class _NotATensor:
    pass


def test_file_needing_pickle_is_refused(tmp_path):
    path = tmp_path / "pickled.pth"
    torch.save({"model": _timm_vit().state_dict(), "extra": _NotATensor()}, path)
    with pytest.raises(ValueError, match=r"weights_only=True.*never unpickles") as err:
        create_backbone("vit_test_patch8", pretrained_path=path)
    assert "torch.save(" in str(err.value)  # tells how to extract the tensors


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="not both"):
        create_backbone("vit_test_patch8", pretrained=True, pretrained_path=tmp_path / "x.pth")
    with pytest.raises(FileNotFoundError):
        create_backbone("vit_test_patch8", pretrained_path=tmp_path / "absent.pth")
    (tmp_path / "w.npz").write_bytes(b"")
    with pytest.raises(ValueError, match="unknown weights format"):
        create_backbone("vit_test_patch8", pretrained_path=tmp_path / "w.npz")
    with pytest.raises(ValueError, match="no timm ImageNet weights"):
        timm_pretrained_name("vit_test_patch8")


def test_timm_weights_mapping():
    assert timm_pretrained_name("vit_small_patch16_224") == "deit_small_patch16_224.fb_in1k"
    assert timm_pretrained_name("absvit_base_patch16_224") == "deit_base_patch16_224.fb_in1k"
    assert timm_pretrained_name("vars_d_vit_tiny_patch16_224") == "deit_tiny_patch16_224.fb_in1k"
    assert timm_pretrained_name("absvit_tiny_patch8_224_gap") == "deit_tiny_patch16_224.fb_in1k"
    assert timm_pretrained_name("tdam_resnet50") == "resnet50.tv_in1k"
    assert timm_pretrained_name("resnet18", tag="a1_in1k") == "resnet18.a1_in1k"
    for name in ("deit_tiny_patch16_224.fb_in1k", "resnet34.tv_in1k", "resnet101.tv_in1k"):
        assert name in timm.list_pretrained(name)


def test_pretrained_true_goes_through_timm(monkeypatch):
    """The network path, with timm's download replaced by a random model of the same architecture."""
    calls = []
    real = timm.create_model

    def fake(name, pretrained=False, **kw):
        calls.append((name, pretrained))
        torch.manual_seed(2)
        return real(name, pretrained=False, **kw)

    monkeypatch.setattr(timm, "create_model", fake)
    model = create_backbone("tdam_resnet18", pretrained=True)
    assert calls == [("resnet18.tv_in1k", True)]
    report = model.pretrained_report
    assert report.source == "timm:resnet18.tv_in1k" and report.dropped == ["fc.weight", "fc.bias"]
    assert report.missing_unexpectedly == [] and report.unexpected == []
    torch.manual_seed(2)
    ref = real("resnet18.tv_in1k").state_dict()
    assert torch.equal(model.layer4[1].bn2_1.running_var, ref["layer4.1.bn2.running_var"])
    assert model.backbone_config == {"name": "tdam_resnet18"}
