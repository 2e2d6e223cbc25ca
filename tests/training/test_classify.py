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
from accelerate import Accelerator
from PIL import Image
from safetensors.torch import load_file, save_model

import absvl
from absvl.cli import main
from absvl.data.patch_labels import IGNORE_INDEX
from absvl.io import read_backbone_folder
from absvl.models.vision import create_backbone
from absvl.training.classify import (
    classification_loss,
    classifier_param_groups,
    evaluate_classifier,
    load_classifier,
    patch_classification_loss,
    predict_topk,
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
    loss = classification_loss(out, labels, torch.nn.CrossEntropyLoss(), var_loss_weight=0.1)
    torch.testing.assert_close(loss, expected)
    # soft targets (mixup) go through the same mean
    soft = F.one_hot(labels, 3).float() * 0.9 + 0.1 / 3
    from timm.loss import SoftTargetCrossEntropy

    def soft_ce(logits):
        return (-(soft * logits.log_softmax(-1)).sum(-1)).mean()

    torch.testing.assert_close(
        classification_loss(out, soft, SoftTargetCrossEntropy(), var_loss_weight=0.1),
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


# --------------------------------------------------------------------------- confusion, class weights, attributes
class _Logits(torch.nn.Module):
    """A stand-in classifier whose logits are its input: image labels read ``logits``, patch labels
    ``head(norm_tokens(tokens))`` of the tokens after one prefix token."""

    def __init__(self, patches: bool) -> None:
        super().__init__()
        self.patches = patches
        self.head = torch.nn.Identity()

    def norm_tokens(self, tokens):
        return tokens

    def forward(self, images):
        from types import SimpleNamespace

        if self.patches:
            return SimpleNamespace(tokens=torch.cat([images[:, :1] * 0, images], 1), num_prefix_tokens=1)
        return SimpleNamespace(logits=images)


def _ranked(*top1, classes=6):
    """Logits ``[N, classes]`` whose top-1 is ``top1[i]`` and whose last-ranked class is ``top1[i] + 1``."""
    logits = torch.zeros(len(top1), classes)
    for row, best in enumerate(top1):
        logits[row] = torch.arange(classes, dtype=torch.float).roll(best + 1)
    return logits


def test_predict_topk_counts_a_confusion_matrix_by_hand():
    accelerator = Accelerator(cpu=True)
    # one label per image: two batches, one of them with an unreadable image, and an empty batch
    logits = _ranked(0, 1, 2, 2, 5)
    assert logits.argmax(1).tolist() == [0, 1, 2, 2, 5] and logits.argmin(1).tolist() == [1, 2, 3, 3, 0]
    loader = [
        {"images": logits[:3], "labels": torch.tensor([0, 2, 2]), "skipped": [("bad.jpg", "broken")]},
        {"images": logits[:0], "labels": torch.zeros(0, dtype=torch.long), "skipped": []},
        {"images": logits[3:], "labels": torch.tensor([1, 0])},
    ]
    model = _Logits(patches=False).train()
    counts = predict_topk(model, loader, accelerator, num_classes=6)
    expected = torch.zeros(6, 6, dtype=torch.long)
    for true, predicted in ((0, 0), (2, 1), (2, 2), (1, 2), (0, 5)):
        expected[true, predicted] += 1
    assert torch.equal(counts["confusion"], expected) and counts["images"] == 5
    # rows 2 and 5 rank their label last: the two top-5 misses
    assert counts["correct5"] == 3 and counts["skipped"] == [("bad.jpg", "broken")]
    assert model.training  # the mode is given back
    # patch labels: every labelled patch is an item, unlabelled ones (IGNORE_INDEX) are left out
    tokens = torch.stack([_ranked(0, 0, 3, 1), _ranked(2, 0, 0, 0)])  # [2 images, 4 patches, 6 classes]
    labels = torch.tensor([[0, 1, 3, IGNORE_INDEX], [2, IGNORE_INDEX, 0, 5]])
    counts = predict_topk(_Logits(patches=True), [{"images": tokens, "labels": labels}], accelerator, num_classes=6)
    expected = torch.zeros(6, 6, dtype=torch.long)
    for true, predicted in ((0, 0), (1, 0), (3, 3), (2, 2), (0, 0), (5, 0)):
        expected[true, predicted] += 1
    assert torch.equal(counts["confusion"], expected) and counts["images"] == 6
    assert counts["correct5"] == 5  # the class-1 patch is ranked last by its logits, the class-5 one fifth


def test_patch_loss_weighs_each_patch_by_its_true_class():
    torch.manual_seed(0)
    model = create_backbone("absvit_test_patch8", num_classes=3, img_size=16).train()
    output = model(torch.randn(2, 3, 16, 16))
    targets = torch.tensor([[0, 0, 1, IGNORE_INDEX], [2, 0, 0, 1]])
    weights = torch.tensor([0.1, 1.0, 2.0])

    def weighted_ce(tokens):  # by hand: each labelled patch's CE times its class weight, over the weights' sum
        logits = model.head(model.norm_tokens(tokens[:, output.num_prefix_tokens :])).flatten(0, 1)
        keep = targets.flatten() != IGNORE_INDEX
        nll = -logits[keep].log_softmax(-1).gather(1, targets.flatten()[keep][:, None]).squeeze(1)
        w = weights[targets.flatten()[keep]]
        return (w * nll).sum() / w.sum()

    var = output.aux_losses["var"]
    expected = (weighted_ce(output.tokens) + weighted_ce(output.bottom_up_tokens)) / 2 + 0.1 * var
    got = patch_classification_loss(model, output, targets, var_loss_weight=0.1, class_weights=weights)
    torch.testing.assert_close(got, expected)
    unweighted = patch_classification_loss(model, output, targets, var_loss_weight=0.1)
    torch.testing.assert_close(
        unweighted, patch_classification_loss(model, output, targets, var_loss_weight=0.1, class_weights=torch.ones(3))
    )
    assert not torch.allclose(got, unweighted)


def _with_attributes(root: Path) -> Path:
    (root / "attributes.json").write_text(
        json.dumps({"color": [None, "red", "blue"], "form": [None, "square", "square"]})
    )
    return root


def test_patch_labelled_validation_scores_background_objects_and_attributes(tmp_path, monkeypatch):
    import absvl.training.classify as classify

    data = _with_attributes(_make_patch_dataset(tmp_path / "patches", {"train": 16, "val": 8}))
    seen = []
    loss = classify.patch_classification_loss

    def spy(*args, **kwargs):
        seen.append(args[5] if len(args) > 5 else kwargs.get("class_weights"))
        return loss(*args, **kwargs)

    monkeypatch.setattr(classify, "patch_classification_loss", spy)
    run = tmp_path / "run"
    config = _config(
        data, run, "data.format=patches", "data.background_weight=0.25", "train.max_steps=4", "train.eval_every=2"
    )
    summary = train_classifier(config)
    assert len(seen) == 4 and all(torch.equal(w, torch.tensor([0.25, 1.0, 1.0])) for w in seen)
    vals = [r for r in _log(run) if "val/top1" in r]
    assert [r["step"] for r in vals] == [2, 4]
    for r in vals:
        assert {"val/top1", "val/top5", "val/background", "val/objects", "val/color", "val/form"} <= set(r)
        # 8 val images: 64 background and 64 object patches, so top-1 is the mean of the two
        assert r["val/top1"] == pytest.approx((r["val/background"] + r["val/objects"]) / 2)
        # a class is its colour here: colour right = class right; both classes are squares: form right = any object
        assert r["val/color"] == pytest.approx(r["val/objects"]) and r["val/form"] >= r["val/objects"]
    # the object patches pick the best checkpoint (the earliest of equals); the export keeps every score
    objects = {r["step"]: r["val/objects"] for r in vals}
    assert Path(summary["best_checkpoint"]).name == f"checkpoint-{max(objects, key=lambda s: (objects[s], -s)):08d}"
    info = json.loads((Path(summary["export"]) / "config.json").read_text())
    assert set(info["metrics"]) == {"top1", "top5", "background", "objects", "color", "form"}
    assert info["metrics"]["objects"] == pytest.approx(vals[-1]["val/objects"])
    # weight 1 (the default): no class weights
    seen.clear()
    train_classifier(
        _config(data, tmp_path / "run1", "data.format=patches", "train.max_steps=1", "data.val_split=null")
    )
    assert seen == [None]


def test_eval_classify_scores_patches_by_kind_and_attribute_on_a_known_case(tmp_path, capsys):
    """A patch classifier that calls every patch "red": of 8 val images' 64 background, 32 red and 32 blue
    patches, top-1 = 25 %, background 0 %, objects = colour 50 %, form (both classes are squares) 100 %."""
    data = _with_attributes(_make_patch_dataset(tmp_path / "patches", {"train": 4, "val": 8}))
    run = tmp_path / "run"
    summary = train_classifier(
        _config(data, run, "data.format=patches", "train.max_steps=1", "data.val_split=null", "train.batch_size=4")
    )
    export = Path(summary["export"])
    model, _ = load_classifier(export)
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.copy_(torch.tensor([0.0, 5.0, 1.0]))
    save_model(model, str(export / "model.safetensors"))
    result = evaluate_classifier(export, data, "val", batch_size=4, num_workers=0)
    assert result["images"] == 128 and result["classes"] == 3
    assert result["top1"] == pytest.approx(25.0) and result["top5"] == pytest.approx(100.0)
    assert result["background"] == pytest.approx(0.0) and result["objects"] == pytest.approx(50.0)
    assert result["color"] == pytest.approx(50.0) and result["form"] == pytest.approx(100.0)
    out = tmp_path / "scores.json"
    command = ["eval", "classify", "--model", str(export), "--data", str(data), "--out", str(out), "--num-workers", "0"]
    assert main(command) == 0
    assert "top-1 25.00 %" in capsys.readouterr().out
    scores = json.loads(out.read_text())
    assert (scores["background"], scores["objects"], scores["color"], scores["form"]) == pytest.approx((0, 50, 50, 100))
    # without attributes.json the patches are still scored by kind, the attributes are not
    (data / "attributes.json").unlink()
    plain = evaluate_classifier(export, data, "val", batch_size=4, num_workers=0)
    assert plain["objects"] == pytest.approx(50.0) and "color" not in plain and "form" not in plain
