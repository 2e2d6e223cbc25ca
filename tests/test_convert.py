"""``absvl convert``: synthetic checkpoints with the authors' exact key names and shapes (SPEC §2, §4),
converted and checked against forward passes computed directly from the original tensors."""

import argparse
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from timm.models.resnet import BasicBlock, Bottleneck, ResNet

from absvl import create_backbone
from absvl.cli import main
from absvl.convert import convert_checkpoint, load_backbone

WIDTH, DEPTH, HEADS, PATCH, IMG, CLASSES = 64, 4, 2, 8, 32, 10  # absvit_test_patch8


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# --- AbSViT ---------------------------------------------------------------------------
def absvit_checkpoint(seed=0, gap=False):
    """The authors' AbSViT state dict: timm ViT keys + decoders.{i}.linear/linear2 + prompt."""
    g = _gen(seed)
    r = lambda *shape, s=0.05: torch.randn(*shape, generator=g) * s  # noqa: E731
    C, N = WIDTH, (IMG // PATCH) ** 2 + 1
    sd = {
        "cls_token": r(1, 1, C, s=0.5),
        "pos_embed": r(1, N, C, s=0.5),
        "patch_embed.proj.weight": r(C, 3, PATCH, PATCH),
        "patch_embed.proj.bias": r(C),
    }
    for i in range(DEPTH):
        p = f"blocks.{i}."
        sd.update(
            {
                p + "norm1.weight": 1 + r(C),
                p + "norm1.bias": r(C),
                p + "attn.qkv.weight": r(3 * C, C, s=0.15),
                p + "attn.qkv.bias": r(3 * C, s=0.3),
                p + "attn.proj.weight": r(C, C, s=0.1),
                p + "attn.proj.bias": r(C),
                p + "norm2.weight": 1 + r(C),
                p + "norm2.bias": r(C),
                p + "mlp.fc1.weight": r(4 * C, C, s=0.1),
                p + "mlp.fc1.bias": r(4 * C),
                p + "mlp.fc2.weight": r(C, 4 * C, s=0.1),
                p + "mlp.fc2.bias": r(C),
            }
        )
        sd[f"decoders.{i}.linear.weight"] = r(C, C, s=0.2)
        sd[f"decoders.{i}.linear2.weight"] = r(C, C, s=0.2)
    norm = "fc_norm" if gap else "norm"
    sd.update(
        {
            f"{norm}.weight": 1 + r(C),
            f"{norm}.bias": r(C),
            "head.weight": r(CLASSES, C, s=0.2),
            "head.bias": r(CLASSES),
            "prompt": r(C, s=1.0),
        }
    )
    return sd


def reference_absvit(sd, images, gap=False):
    """The authors' AbSViT forward in plain torch ops on the checkpoint's tensors (eval mode)."""
    C, H = WIDTH, HEADS
    ln = lambda x, p: F.layer_norm(x, (C,), sd[p + ".weight"], sd[p + ".bias"], eps=1e-6)  # noqa: E731
    lin = lambda x, p: x @ sd[p + ".weight"].T + sd[p + ".bias"]  # noqa: E731

    def attention(x, p, td):
        B, N, _ = x.shape
        qkv = lin(x, p + ".qkv").reshape(B, N, 3, H, C // H).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        if td is not None:  # the authors: v = v + qkv(td)[v], bias included
            v = v + lin(td, p + ".qkv").reshape(B, N, 3, H, C // H).permute(2, 0, 3, 1, 4)[2]
        attn = ((q @ k.transpose(-2, -1)) * (C // H) ** -0.5).softmax(-1)
        return lin((attn @ v).transpose(1, 2).reshape(B, N, C), p + ".proj")

    def features(td=None):
        x = F.conv2d(images, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=PATCH)
        x = torch.cat([sd["cls_token"].expand(x.shape[0], -1, -1), x.flatten(2).transpose(1, 2)], 1) + sd["pos_embed"]
        for i in range(DEPTH):
            p = f"blocks.{i}"
            x = x + attention(ln(x, p + ".norm1"), p + ".attn", None if td is None else td[i])
            h = lin(F.gelu(lin(ln(x, p + ".norm2"), p + ".mlp.fc1")), p + ".mlp.fc2")
            x = x + h
        return x if gap else ln(x, "norm")

    def pool(x):
        return ln(x[:, 1:].mean(1), "fc_norm") if gap else x[:, 0]

    z = features()
    prompt = sd["prompt"]
    mask = (F.normalize(z, dim=-1) @ F.normalize(prompt[None, :, None], dim=1)).clamp(0, 1)
    h, td = z * mask, [None] * DEPTH
    for i in range(DEPTH - 1, -1, -1):
        h = h @ sd[f"decoders.{i}.linear.weight"].T
        td[i] = h @ sd[f"decoders.{i}.linear2.weight"].T
    x = features(td)
    return x, lin(pool(x), "head")


@pytest.mark.parametrize("gap", [False, True])
def test_absvit_conversion_reproduces_the_authors_forward(tmp_path, gap):
    sd = absvit_checkpoint(gap=gap)
    ckpt = tmp_path / "absvit.pth"
    torch.save({"model": sd, "epoch": 299, "args": argparse.Namespace(model="absvit_tiny_patch16_224")}, ckpt)
    out = convert_checkpoint(ckpt, "absvit_test_patch8", tmp_path / "converted")
    config = json.loads((out / "config.json").read_text())
    expected_overrides = {"td_bias": True, "num_classes": CLASSES, **({"global_pool": "avg"} if gap else {})}
    assert config["format"] == "absvl-backbone" and config["name"] == "absvit_test_patch8"
    assert config["overrides"] == expected_overrides and config["source"] == "absvit.pth"
    tensors = load_file(str(out / "model.safetensors"))
    assert tensors.keys() == sd.keys()
    for k, v in sd.items():
        assert torch.equal(tensors[k], v), k
    assert not list(tmp_path.glob(".converted*"))  # no temp folder left behind

    images = torch.randn(2, 3, IMG, IMG, generator=_gen(5))
    with torch.no_grad():
        ref_tokens, ref_logits = reference_absvit(sd, images, gap)
        for model in (load_backbone(out), create_backbone("absvit_test_patch8", pretrained_path=out)):
            model.eval()
            assert model.backbone_config == {"name": "absvit_test_patch8", **expected_overrides}
            assert model.pretrained_report.missing == [] and model.pretrained_report.unexpected == []
            res = model(images)
            torch.testing.assert_close(res.tokens, ref_tokens, rtol=0, atol=2e-5)
            torch.testing.assert_close(res.logits, ref_logits, rtol=0, atol=2e-5)
        # the reference is sensitive to the authors' extra value bias: without td_bias it differs
        plain = create_backbone("absvit_test_patch8", pretrained_path=out, td_bias=False).eval()
        assert (plain(images).logits - ref_logits).abs().max() > 1e-3


def test_absvit_conversion_errors(tmp_path):
    def convert(sd, arch="absvit_test_patch8", name="c"):
        path = tmp_path / f"{name}.pth"
        torch.save({"model": sd}, path)
        return convert_checkpoint(path, arch, tmp_path / name)

    sd = absvit_checkpoint()
    with pytest.raises(ValueError, match=r"no place in the model: blocks\.0\.attn\.extra\.weight"):
        convert({**sd, "blocks.0.attn.extra.weight": torch.zeros(2)}, name="extra")
    with pytest.raises(ValueError, match=r"does not fill: decoders\.2\.linear2\.weight"):
        convert({k: v for k, v in sd.items() if k != "decoders.2.linear2.weight"}, name="missing")
    with pytest.raises(
        ValueError,
        match=r"shape mismatch.*blocks\.3\.mlp\.fc1\.weight: checkpoint \(128, 64\), model blocks\.3\.mlp\.fc1\.weight \(256, 64\)",
    ):
        convert({**sd, "blocks.3.mlp.fc1.weight": torch.zeros(128, 64)}, name="shape")
    with pytest.raises(ValueError, match="convert handles the authors' AbSViT"):
        convert(sd, arch="vit_test_patch8", name="vit")
    with pytest.raises(ValueError, match="ViT/AbSViT checkpoint: use --arch absvit"):
        convert(sd, arch="tdam_resnet_test", name="tdam")
    with pytest.raises(ValueError, match="unknown backbone 'absvit_tset_patch8'"):
        convert(sd, arch="absvit_tset_patch8", name="typo")
    with pytest.raises(ValueError, match="not an AbSViT checkpoint"):
        convert({k: v for k, v in sd.items() if not k.startswith("decoders.")}, name="nodec")
    assert not (tmp_path / "extra").exists()


# --- TDAM -----------------------------------------------------------------------------
def tdam_checkpoint(block, seed=0, mode="joint"):
    """The authors' TDAM state dict (timm ResNet keys + RA_block + per-step BNs), shapes from a
    plain timm ResNet of the test size. Joint: Ug_top_mlp.0 / Ug_bottom_mlp.0 / Ug_mlp.0;
    top: Ug_mlp.0 (W1) and Ug_mlp.2 (W3)."""
    torch.manual_seed(seed)
    resnet = ResNet(block, (1, 1, 2, 2), channels=(8, 16, 32, 64), num_classes=CLASSES)
    g = _gen(seed)
    sd = {}
    for k, v in resnet.state_dict().items():
        if k.endswith("num_batches_tracked"):
            sd[k] = torch.tensor(7)
        elif k.endswith("running_var"):
            sd[k] = torch.rand(v.shape, generator=g) + 0.5
        elif k.endswith("running_mean") or k.endswith(".bias"):
            sd[k] = torch.randn(v.shape, generator=g) * 0.1
        elif "bn" in k or "downsample.1" in k:
            sd[k] = 1 + torch.randn(v.shape, generator=g) * 0.1
        else:
            sd[k] = torch.randn(v.shape, generator=g) * (2 / v[0].numel()) ** 0.5
    steps = ("conv3",) if block is Bottleneck else ("conv1", "conv2")  # m = 1 / m = 2
    for layer in (3, 4):
        for i, b in enumerate(getattr(resnet, f"layer{layer}")):
            p = f"layer{layer}.{i}."
            bottom = getattr(b, steps[0]).in_channels
            top = getattr(b, steps[-1]).out_channels
            hidden = top // 16
            w = lambda *s: torch.randn(*s, 1, 1, generator=g) * 0.3  # noqa: E731
            if mode == "joint":
                sd[p + "RA_block.Ug_top_mlp.0.weight"] = w(hidden, top)
                sd[p + "RA_block.Ug_bottom_mlp.0.weight"] = w(hidden, bottom)
                sd[p + "RA_block.Ug_mlp.0.weight"] = w(bottom, 2 * hidden)
            else:
                sd[p + "RA_block.Ug_mlp.0.weight"] = w(hidden, top)
                sd[p + "RA_block.Ug_mlp.2.weight"] = w(bottom, hidden)
            for conv in steps:
                bn = conv.replace("conv", "bn")
                for suffix in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
                    base = sd[f"{p}{bn}.{suffix}"]
                    sd[f"{p}{bn}_1.{suffix}"] = (
                        base.clone()
                        if suffix == "num_batches_tracked"
                        else (base + torch.rand(base.shape, generator=g) * 0.2)
                    )
    return sd


def reference_tdam(sd, x, bottleneck):
    """TDAM ResNet forward (T = 2, joint, layer3+4) in plain torch ops on the checkpoint (eval)."""

    def bn(x, p):
        return F.batch_norm(
            x, sd[p + ".running_mean"], sd[p + ".running_var"], sd[p + ".weight"], sd[p + ".bias"], False, 0.0, 1e-5
        )

    def conv(x, p, stride=1):
        w = sd[p + ".weight"]
        return F.conv2d(x, w, stride=stride, padding=w.shape[-1] // 2)

    def searchlight(p, bottom, top):
        h_top = F.relu(F.conv2d(top.mean((2, 3), keepdim=True), sd[p + ".RA_block.Ug_top_mlp.0.weight"]))
        h_bot = F.relu(F.conv2d(bottom.mean((2, 3), keepdim=True), sd[p + ".RA_block.Ug_bottom_mlp.0.weight"]))
        s = F.conv2d(torch.cat([h_top, h_bot], 1), sd[p + ".RA_block.Ug_mlp.0.weight"])
        x = torch.sigmoid(s) * bottom
        return torch.sigmoid((s * x).sum(1, keepdim=True)) * x

    def block(x, p, stride, tdam):
        if bottleneck:
            bottom = F.relu(bn(conv(F.relu(bn(conv(x, p + ".conv1"), p + ".bn1")), p + ".conv2", stride), p + ".bn2"))
            top = bn(conv(bottom, p + ".conv3"), p + ".bn3")
            if tdam:
                top = bn(conv(searchlight(p, bottom, top), p + ".conv3"), p + ".bn3_1")
        else:

            def layers(inp, t):
                return bn(
                    conv(F.relu(bn(conv(inp, p + ".conv1", stride), p + ".bn1" + t)), p + ".conv2"), p + ".bn2" + t
                )

            top = layers(x, "")
            if tdam:
                top = layers(searchlight(p, x, top), "_1")
        shortcut = x
        if p + ".downsample.0.weight" in sd:
            shortcut = bn(F.conv2d(x, sd[p + ".downsample.0.weight"], stride=stride), p + ".downsample.1")
        return F.relu(top + shortcut)

    x = F.max_pool2d(F.relu(bn(F.conv2d(x, sd["conv1.weight"], stride=2, padding=3), "bn1")), 3, 2, 1)
    for layer, n in zip((1, 2, 3, 4), (1, 1, 2, 2)):
        for i in range(n):
            x = block(x, f"layer{layer}.{i}", 2 if layer > 1 and i == 0 else 1, layer >= 3)
    pooled = x.mean((2, 3))
    return pooled, pooled @ sd["fc.weight"].T + sd["fc.bias"]


def _manual_tdam_map(key, mode="joint"):
    """The SPEC §4 renaming, written out independently of absvl.convert."""
    table = {
        "joint": {"Ug_top_mlp.0": "top_proj", "Ug_bottom_mlp.0": "bottom_proj", "Ug_mlp.0": "searchlight"},
        "top": {"Ug_mlp.0": "top_proj", "Ug_mlp.2": "searchlight"},
    }[mode]
    for old, new in table.items():
        key = key.replace(f".RA_block.{old}.", f".tdam.{new}.")
    return key


@pytest.mark.parametrize("block,arch", [(BasicBlock, "tdam_resnet_test"), (Bottleneck, "tdam_resnet_test_bottleneck")])
def test_tdam_conversion_reproduces_the_reference(tmp_path, block, arch):
    sd = tdam_checkpoint(block)
    ckpt = tmp_path / "model_best.pth.tar"  # timm trainer file: state_dict of a DDP model
    torch.save({"epoch": 99, "arch": "resnet50", "state_dict": {f"module.{k}": v for k, v in sd.items()}}, ckpt)
    out = convert_checkpoint(ckpt, arch, tmp_path / "converted")
    assert json.loads((out / "config.json").read_text())["overrides"] == {"num_classes": CLASSES}
    tensors = load_file(str(out / "model.safetensors"))
    mapped = {_manual_tdam_map(k): v for k, v in sd.items()}
    assert tensors.keys() == mapped.keys()
    for k, v in mapped.items():
        assert torch.equal(tensors[k], v), k

    model = load_backbone(out).eval()
    independent = create_backbone(arch, num_classes=CLASSES).eval()
    independent.load_state_dict(mapped, strict=True)
    x = torch.randn(2, 3, 64, 64, generator=_gen(3))
    with torch.no_grad():
        ref_pooled, ref_logits = reference_tdam(sd, x, block is Bottleneck)
        res = model(x)
        torch.testing.assert_close(res.pooled, ref_pooled, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(res.logits, ref_logits, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(res.logits, independent(x).logits, rtol=0, atol=0)


def test_tdam_top_mode_and_options_read_off_the_checkpoint(tmp_path):
    sd = tdam_checkpoint(Bottleneck, mode="top")
    ckpt = tmp_path / "top.pth"
    torch.save({"state_dict": sd}, ckpt)
    out = convert_checkpoint(ckpt, "tdam_resnet_test_bottleneck", tmp_path / "top")
    assert json.loads((out / "config.json").read_text())["overrides"] == {"mode": "top", "num_classes": CLASSES}
    model = load_backbone(out)
    assert model.layer4[1].tdam.bottom_proj is None
    for k, v in sd.items():
        assert torch.equal(model.state_dict()[_manual_tdam_map(k, "top")], v), k


def test_tdam_conversion_errors(tmp_path):
    sd = tdam_checkpoint(Bottleneck)

    def convert(state, arch="tdam_resnet_test_bottleneck", name="c"):
        path = tmp_path / f"{name}.pth"
        torch.save({"state_dict": state}, path)
        return convert_checkpoint(path, arch, tmp_path / name)

    with pytest.raises(ValueError, match=r"no place in the model: layer3\.0\.RA_block\.Ug_extra\.0\.weight"):
        convert({**sd, "layer3.0.RA_block.Ug_extra.0.weight": torch.zeros(1, 1, 1, 1)}, name="extra")
    with pytest.raises(ValueError, match=r"does not fill: layer4\.1\.bn3_1\.running_var"):
        convert({k: v for k, v in sd.items() if k != "layer4.1.bn3_1.running_var"}, name="missing")
    with pytest.raises(ValueError, match=r"shape mismatch"):
        convert(sd, arch="tdam_resnet_test", name="basic")  # Bottleneck weights into BasicBlocks
    with pytest.raises(ValueError, match="TDAM checkpoint .RA_block keys.: use --arch tdam_resnet"):
        convert(sd, arch="absvit_test_patch8", name="absvit")
    with pytest.raises(ValueError, match="not a TDAM checkpoint"):
        convert({k: v for k, v in sd.items() if "RA_block" not in k}, name="plain")


def test_converted_folder_in_the_vl_model(tmp_path):
    from absvl.models.vl import AbsVLConfig, AbsVLForQuestionAnswering, build_tiny_text_encoder

    sd = absvit_checkpoint()
    ckpt = tmp_path / "absvit.pth"
    torch.save({"model": sd}, ckpt)
    out = convert_checkpoint(ckpt, "absvit_test_patch8", tmp_path / "converted")
    text = build_tiny_text_encoder(tmp_path / "text", kind="roberta")
    config = AbsVLConfig(
        backbone="absvit_test_patch8",
        backbone_kwargs={"pretrained_path": str(out)},
        text_encoder=str(text),
        fusion_hidden_size=32,
        fusion_layers=1,
        fusion_heads=2,
    )
    model = AbsVLForQuestionAnswering(config, answers=["yes", "no"])
    assert model.backbone.blocks[0].attn.td_bias
    assert torch.equal(model.backbone.blocks[2].attn.qkv.weight, sd["blocks.2.attn.qkv.weight"])
    assert model.config.backbone_kwargs == {"td_bias": True, "num_classes": CLASSES}  # self-contained config
    model.save_pretrained(tmp_path / "vl")
    import shutil

    shutil.rmtree(out)  # the saved model no longer needs the converted folder
    again = AbsVLForQuestionAnswering.from_pretrained(tmp_path / "vl")
    assert again.backbone.blocks[0].attn.td_bias
    assert torch.equal(again.backbone.blocks[2].attn.qkv.weight, sd["blocks.2.attn.qkv.weight"])


def test_cli_convert(tmp_path, capsys):
    ckpt = tmp_path / "absvit.pth"
    torch.save({"model": absvit_checkpoint()}, ckpt)
    out = tmp_path / "out"
    assert main(["convert", str(ckpt), "--arch", "absvit_test_patch8", "--out", str(out)]) == 0
    assert "converted" in capsys.readouterr().out
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert main(["convert", str(ckpt), "--arch", "absvit_test_patch8", "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["convert", str(ckpt), "--arch", "absvit_test_patch8", "--out", str(out), "--overwrite"]) == 0
    assert main(["convert", str(ckpt), "--arch", "vit_test_patch8", "--out", str(tmp_path / "o2")]) == 2
    assert "convert handles the authors' AbSViT" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()
