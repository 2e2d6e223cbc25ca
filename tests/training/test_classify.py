"""ImageFolder classification on the shared trainer: learning, exact resume, the AbSViT loss,
mixup/cutmix, unreadable images, config errors, evaluation and the CLI."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_model

import absvl
from absvl.cli import main
from absvl.io import read_backbone_folder
from absvl.models.vision import create_backbone
from absvl.training.classify import (
    classification_loss,
    classifier_param_groups,
    evaluate_classifier,
    load_classifier,
    train_classifier,
)
from absvl.training.config import ClassifyConfig, ConfigError, load_config

COLOURS = {"blue": (40, 40, 210), "green": (40, 190, 40), "red": (210, 40, 40)}


def _make_imagefolder(root: Path, per_class: dict[str, int], colours=COLOURS, seed=0) -> Path:
    rng = np.random.default_rng(seed)
    for split, count in per_class.items():
        for name, colour in colours.items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = np.clip(np.array(colour) + rng.normal(0, 35, (32, 32, 3)), 0, 255).astype(np.uint8)
                y, x = rng.integers(0, 20, 2)
                pixels[y : y + 10, x : x + 10] = rng.integers(0, 256, 3)  # a distractor square
                Image.fromarray(pixels).save(folder / f"{i:03d}.jpg", quality=90)
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """3 classes of noisy solid-colour 32x32 JPEGs: 20 train and 6 val images each."""
    return _make_imagefolder(tmp_path_factory.mktemp("imagefolder"), {"train": 20, "val": 6})


def _overrides(root, out, *extra):
    return [
        f"data.root={root}",
        "model.backbone=absvit_test_patch8",
        "model.backbone_kwargs={img_size: 32}",
        "data.num_workers=0",
        "data.mixup=0",
        "data.cutmix=0",
        "data.randaugment=null",
        "data.color_jitter=0",
        "data.crop_scale=[0.6, 1.0]",
        "train.batch_size=12",
        "train.lr=2e-3",
        "train.warmup_ratio=0.1",
        "train.log_every=1",
        "train.trackers=[]",
        f"train.output_dir={out}",
        *extra,
    ]


def _config(root, out, *extra):
    return load_config(None, _overrides(root, out, *extra), ClassifyConfig)


def _log(run):
    return [json.loads(line) for line in (Path(run) / "log.jsonl").read_text().splitlines()]


def _assert_same_weights(a, b):
    a, b = load_file(str(Path(a) / "model.safetensors")), load_file(str(Path(b) / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_tiny_imagefolder_run_learns_and_exports(folder, tmp_path):
    run = tmp_path / "run"
    summary = train_classifier(_config(folder, run, "train.epochs=3", "data.label_smoothing=0"))
    assert summary["step"] == 15  # 60 images / 12 = 5 steps per epoch
    log = _log(run)
    losses = [r["loss"] for r in log if "loss" in r]
    top1 = [r["val/top1"] for r in log if "val/top1" in r]
    assert len(top1) == 3  # once per epoch (the last one at the final step)
    assert sum(losses[-3:]) < 0.6 * sum(losses[:3])  # the loss drops a lot (from ~ln 3 + 0.1 L_var)
    assert top1[-1] >= 80.0 > 100 / 3 + 10  # well above chance (33 %)
    assert summary["val"]["top1"] == top1[-1] and summary["val"]["top5"] == 100.0  # 3 classes: top-5 is everything

    # the export is an absvl-backbone folder: create_backbone loads it, with the head
    export = Path(summary["export"])
    info = json.loads((export / "config.json").read_text())
    assert info["format"] == "absvl-backbone" and info["name"] == "absvit_test_patch8"
    assert info["overrides"] == {"img_size": 32, "num_classes": 3} and info["classes"] == ["blue", "green", "red"]
    assert read_backbone_folder(export) == info and info["absvl_version"] == absvl.__version__  # absvl.io's format
    assert sorted(p.name for p in export.iterdir()) == ["config.json", "model.safetensors"]
    assert not [p.name for p in run.iterdir() if p.name.startswith((".tmp-", ".old-"))]  # no staging left behind
    model, _ = load_classifier(export)
    again = create_backbone("absvit_test_patch8", pretrained_path=export).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(images).logits, again(images).logits)
    assert json.loads((run / "classes.json").read_text()) == info["classes"]


def _straight_then_resumed(folder, tmp_path, extra, kill_after):
    straight = _config(folder, tmp_path / "a", *extra)
    train_classifier(straight)
    # what a run killed right after checkpoint `kill_after` leaves behind
    b = tmp_path / "b"
    b.mkdir()
    shutil.copytree(tmp_path / "a" / f"checkpoint-{kill_after:08d}", b / f"checkpoint-{kill_after:08d}")
    shutil.copy(tmp_path / "a" / "classes.json", b / "classes.json")
    summary = train_classifier(_config(folder, b, *extra, "train.resume=latest"))
    _assert_same_weights(tmp_path / "a" / "final", summary["export"])
    resumed_log = _log(b)
    assert resumed_log[0]["step"] == kill_after + 1


def test_resume_mid_epoch_with_mixup_and_randaugment_is_exact(folder, tmp_path):
    extra = [
        "train.max_steps=8",
        "train.save_every=3",
        "train.keep_last=10",
        "train.batch_size=8",
        "data.mixup=0.8",
        "data.cutmix=1.0",
        "data.randaugment=rand-m9-mstd0.5-inc1",
        "model.backbone_kwargs={img_size: 32, drop_path_rate: 0.1}",
    ]
    _straight_then_resumed(folder, tmp_path, extra, kill_after=3)  # 60/8 = 8 batches: step 3 is mid-epoch


def _train_cmd(root, out, *extra, resume=False):
    cmd = [
        sys.executable,
        "-m",
        "absvl.cli",
        "train",
        "classify",
        "--data",
        str(root),
        "--backbone",
        "absvit_test_patch8",
        *_overrides(root, out, *extra)[2:],
    ]
    return cmd + (["--resume"] if resume else [])


@pytest.mark.slow
def test_sigkill_and_resume_with_worker_processes_ends_with_identical_weights(folder, tmp_path):
    extra = [
        "train.max_steps=16",
        "train.save_every=2",
        "train.batch_size=8",
        "data.num_workers=2",
        "data.mixup=0.8",
        "data.cutmix=1.0",
        "data.randaugment=rand-m9-mstd0.5-inc1",
    ]
    subprocess.run(_train_cmd(folder, tmp_path / "a", *extra), check=True, capture_output=True)
    killed = tmp_path / "b"
    proc = subprocess.Popen(_train_cmd(folder, killed, *extra), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / "checkpoint-00000004").exists() and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (killed / "final").exists(), "the run finished before it could be killed"
    subprocess.run(_train_cmd(folder, killed, *extra, resume=True), check=True, capture_output=True)
    _assert_same_weights(tmp_path / "a" / "final", killed / "final")


@pytest.mark.slow
def test_two_process_torchrun_matches_one_process_with_the_same_global_batch(folder, tmp_path):
    # eps=1 makes AdamW's step ~linear in the gradient: with the default 1e-8 a weight whose
    # gradient is ~0 moves by ±lr on the sign of float noise, which no reduction order controls.
    common = [
        "train.max_steps=3",
        "data.randaugment=rand-m9-mstd0.5-inc1",
        "train.lr=0.05",
        "train.eps=1.0",
        "train.warmup_ratio=0",
    ]
    subprocess.run(_train_cmd(folder, tmp_path / "one", *common, "train.batch_size=8"), check=True, capture_output=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29547"]
    cmd = _train_cmd(folder, tmp_path / "two", *common, "train.batch_size=4")
    result = subprocess.run([*torchrun, *cmd[1:]], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "3 steps of 8 samples" in result.stdout
    a = load_file(str(tmp_path / "one" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "final" / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-5, msg=key)
    torch.manual_seed(0)  # the runs' seed: their initial weights
    initial = create_backbone("absvit_test_patch8", img_size=32, num_classes=3).state_dict()
    assert max((a[k] - w).abs().max().item() for k, w in initial.items()) > 1e-3  # the three steps did train


def test_absvit_loss_is_mean_ce_of_both_passes_plus_var():
    torch.manual_seed(0)
    model = create_backbone("absvit_test_patch8", num_classes=3).train()
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 2, 1, 2])
    out = model(images)
    assert out.bottom_up_logits is not None and not torch.allclose(out.logits, out.bottom_up_logits)
    var = out.aux_losses["var"]
    assert var > 0

    def ce(logits):  # by hand
        return -(logits.log_softmax(-1)[torch.arange(4), labels]).mean()

    expected = (ce(out.logits) + ce(out.bottom_up_logits)) / 2 + 0.1 * var
    loss = classification_loss(out, labels, torch.nn.CrossEntropyLoss(), var_weight=0.1)
    torch.testing.assert_close(loss, expected)
    # soft targets (mixup) go through the same mean
    soft = F.one_hot(labels, 3).float() * 0.9 + 0.1 / 3
    from timm.loss import SoftTargetCrossEntropy

    def soft_ce(logits):
        return (-(soft * logits.log_softmax(-1)).sum(-1)).mean()

    torch.testing.assert_close(
        classification_loss(out, soft, SoftTargetCrossEntropy(), var_weight=0.1),
        (soft_ce(out.logits) + soft_ce(out.bottom_up_logits)) / 2 + 0.1 * var,
    )
    # a plain ViT has one pass and no L_var: plain cross-entropy
    plain = create_backbone("vit_test_patch8", num_classes=3).train()
    plain_out = plain(images)
    assert plain_out.bottom_up_logits is None and not plain_out.aux_losses
    torch.testing.assert_close(
        classification_loss(plain_out, labels, torch.nn.CrossEntropyLoss()), ce(plain_out.logits)
    )
    # eval mode: no L_var; inference uses the second pass
    assert "var" not in model.eval()(images).aux_losses


def test_param_groups_cover_every_parameter_once_without_decay_on_biases_norms_embeddings():
    model = create_backbone("absvit_test_patch8", num_classes=3)
    groups = classifier_param_groups(model, lr=1e-3, weight_decay=0.05, lr_multipliers={"head": 10})
    names = {id(p): n for n, p in model.named_parameters()}
    seen = [names[id(p)] for g in groups for p in g["params"]]
    assert sorted(seen) == sorted(names.values())
    by_name = {names[id(p)]: g for g in groups for p in g["params"]}
    for name in ("pos_embed", "cls_token", "prompt", "blocks.0.norm1.weight", "blocks.0.attn.qkv.bias", "head.bias"):
        assert by_name[name]["weight_decay"] == 0.0, name
    assert by_name["blocks.0.attn.qkv.weight"]["weight_decay"] == 0.05
    assert by_name["head.weight"]["lr"] == pytest.approx(1e-2) and by_name["head.weight"]["weight_decay"] == 0.05


def test_odd_batches_with_mixup_and_cutmix_train(folder, tmp_path):
    summary = train_classifier(
        _config(
            folder,
            tmp_path / "run",
            "train.max_steps=3",
            "train.batch_size=5",
            "data.mixup=0.8",
            "data.cutmix=1.0",
            "data.randaugment=rand-m9-mstd0.5",
            "data.val_split=null",
        )
    )
    assert summary["step"] == 3 and summary["val"] is None
    assert all(np.isfinite(r["loss"]) for r in _log(tmp_path / "run"))


def test_unreadable_images_are_skipped_counted_and_listed(folder, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    (broken / "train" / "red" / "000.jpg").write_bytes(b"not a jpeg")
    (broken / "val" / "green" / "001.jpg").write_bytes(b"")
    summary = train_classifier(_config(broken, tmp_path / "run", "train.epochs=1"))
    assert summary["step"] == 5 and summary["skipped"] == 1 and summary["val"]["skipped"] == 1
    listed = json.loads((tmp_path / "run" / "skipped.json").read_text())
    assert len(listed) == 1 and listed[0][0].endswith("red/000.jpg")
    assert summary["val"]["images"] == 17  # the unreadable validation image is left out of validation


def test_a_batch_of_only_unreadable_images_takes_a_zero_step(tmp_path):
    root = _make_imagefolder(tmp_path / "data", {"train": 2}, colours={"a": (0, 0, 0), "b": (255, 255, 255)})
    for image in (root / "train" / "a").iterdir():
        image.write_bytes(b"broken")
    summary = train_classifier(
        _config(root, tmp_path / "run", "train.epochs=1", "train.batch_size=2", "data.val_split=null")
    )
    assert summary["step"] == 2 and summary["skipped"] == 2


def test_config_errors_name_the_key_or_folder(folder, tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"unknown config key 'model.bakbone' in the command line .*'model.backbone'"):
        load_config(None, ["model.bakbone=x"], ClassifyConfig)
    with pytest.raises(ConfigError, match=r"unknown config key 'data.answers_min_count'"):
        load_config(None, ["data.answers_min_count=3"], ClassifyConfig)  # a VQA key
    with pytest.raises(ConfigError, match=r"data.label_smoothing=1.5 is invalid"):
        load_config(None, ["data.label_smoothing=1.5"], ClassifyConfig)
    config_file = tmp_path / "run.yaml"
    config_file.write_text("data: {mixpu: 0.2}\n")
    with pytest.raises(ConfigError, match=r"'data.mixpu' in .*run.yaml \(did you mean 'data.mixup'\?\)"):
        load_config(config_file, [], ClassifyConfig)

    assert main(["train", "classify", "--data", str(folder), "--backbone", "absvit_test_patch8", "train.lrr=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("absvl: error: unknown config key 'train.lrr'") and "Traceback" not in err

    odd = tmp_path / "odd"
    shutil.copytree(folder, odd)
    (odd / "val" / "purple").mkdir()
    shutil.copy(odd / "val" / "red" / "000.jpg", odd / "val" / "purple" / "000.jpg")
    assert main(["train", "classify", "--data", str(odd), *_overrides(odd, tmp_path / "run")[1:]]) == 2
    err = capsys.readouterr().err
    assert "class folder(s) the model does not know" in err and str(odd / "val" / "purple") in err


def test_eval_classify_top1_top5_on_a_known_case(tmp_path, capsys):
    """A classifier that always ranks class 0 > 1 > ... > 5 on 6 classes x 2 images + 1 unreadable:
    top-1 = the 2 images of class 0, top-5 = the 10 of classes 0-4, out of 13."""
    names = [f"c{i}" for i in range(6)]
    root = _make_imagefolder(tmp_path / "data", {"val": 2}, colours={n: (i * 40, 0, 0) for i, n in enumerate(names)})
    (root / "val" / "c0" / "bad.jpg").write_bytes(b"\x89PNG broken")
    model = create_backbone("vit_test_patch8", num_classes=6)
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.copy_(torch.arange(6, 0, -1, dtype=torch.float))
    export = tmp_path / "model"
    export.mkdir()
    save_model(model, str(export / "model.safetensors"))
    (export / "config.json").write_text(
        json.dumps(
            {
                "format": "absvl-backbone",
                "name": "vit_test_patch8",
                "overrides": {"num_classes": 6},
                "classes": names,
            }
        )
    )
    result = evaluate_classifier(export, root, "val", batch_size=4, num_workers=0)
    assert result["images"] == 13 and result["skipped"] == 1
    assert [Path(path).name for path, _ in result["unreadable"]] == ["bad.jpg"]
    assert result["top1"] == pytest.approx(100 * 2 / 13) and result["top5"] == pytest.approx(100 * 10 / 13)
    assert capsys.readouterr().out == ""  # the library reports in its result; the command prints

    out = tmp_path / "scores.json"
    assert (
        main(["eval", "classify", "--model", str(export), "--data", str(root), "--out", str(out), "--num-workers", "0"])
        == 0
    )
    printed = capsys.readouterr().out
    assert "1 images skipped (unreadable): they count as wrong" in printed and "bad.jpg" in printed
    assert "top-1 15.38 %  top-5 76.92 %" in printed
    scores = json.loads(out.read_text())
    assert scores["top5"] == pytest.approx(100 * 10 / 13) and "unreadable" not in scores


def test_train_and_eval_commands_agree(folder, tmp_path, capsys):
    run = tmp_path / "run"
    overrides = _overrides(folder, run, "train.max_steps=4")[2:]
    assert main(["train", "classify", "--data", str(folder), "--backbone", "absvit_test_patch8", *overrides]) == 0
    assert "model exported to" in capsys.readouterr().out
    val_top1 = [r["val/top1"] for r in _log(run) if "val/top1" in r][-1]
    out = tmp_path / "val.json"
    assert (
        main(
            [
                "eval",
                "classify",
                "--model",
                str(run / "final"),
                "--data",
                str(folder),
                "--out",
                str(out),
                "--num-workers",
                "0",
            ]
        )
        == 0
    )
    assert json.loads(out.read_text())["top1"] == pytest.approx(val_top1)


# --------------------------------------------------------------------------- patch labels
def _make_patch_dataset(root: Path, per_split: dict[str, int], seed=0) -> Path:
    """32x32 images, each with a red and a blue 16x16 square at random cells; labels: background, red, blue."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    (root / "classes.json").write_text(json.dumps(["background", "red", "blue"]))
    for split, count in per_split.items():
        (root / split / "images").mkdir(parents=True)
        (root / split / "labels").mkdir(parents=True)
        for i in range(count):
            pixels = np.full((32, 32, 3), 200, np.uint8)
            labels = np.zeros((32, 32), np.uint8)
            cells = rng.permutation(4)[:2]
            for cell, (cls, colour) in zip(cells, [(1, COLOURS["red"]), (2, COLOURS["blue"])]):
                y, x = 16 * (cell // 2), 16 * (cell % 2)
                pixels[y : y + 16, x : x + 16] = colour
                labels[y : y + 16, x : x + 16] = cls
            Image.fromarray(pixels).save(root / split / "images" / f"{i:03d}.png")
            Image.fromarray(labels).save(root / split / "labels" / f"{i:03d}.png")
    return root


def test_patch_labelled_run_classifies_every_patch_and_logs_the_gate(tmp_path, capsys):
    data = _make_patch_dataset(tmp_path / "patches", {"train": 24, "val": 8})
    run = tmp_path / "run"
    config = _config(data, run, "data.format=patches", "data.hflip=0.5", "train.epochs=4", "data.label_smoothing=0")
    summary = train_classifier(config)
    # patch top-1 over every labelled patch of the 8 val images (16 patches of 8x8 each)
    assert summary["val"]["images"] == 8 * 16 and summary["val"]["top1"] >= 90.0
    info = json.loads((Path(summary["export"]) / "config.json").read_text())
    assert info["labels"] == "patch" and info["classes"] == ["background", "red", "blue"]
    log = [r for r in _log(run) if "loss" in r]
    assert {"gate/mean", "gate/open", "topdown/change"} <= set(log[-1])  # AbSViT's learned prior at work
    # absvl eval classify scores the same patches
    assert (
        main(
            [
                "eval",
                "classify",
                "--model",
                summary["export"],
                "--data",
                str(data),
                "--split",
                "val",
                "--num-workers",
                "0",
            ]
        )
        == 0
    )
    assert f"{summary['val']['top1']:.2f}" in capsys.readouterr().out
    # geometric augmentation would move pixels away from their labels: refused with the key to change
    with pytest.raises(ConfigError, match="data.format"):
        _config(data, run, "data.format=patches", "data.mixup=0.8")
    with pytest.raises(ConfigError, match="patch labels need a ViT-family backbone"):
        train_classifier(
            _config(
                data,
                tmp_path / "cnn",
                "data.format=patches",
                "model.backbone=resnet_test",
                "model.backbone_kwargs={}",
                "train.max_steps=1",
            )
        )
