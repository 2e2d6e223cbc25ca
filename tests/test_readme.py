"""The README walked through as a new user would: its commands, in its order, in a fresh folder,
on the Shapes world and local stand-ins (paper-size configs → the tiny model, the Hub → a local
server, /data/... → the world). Every command must succeed, and every command line of the
README (command, sub-command and flags) must be one this walk ran."""

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from absvl.cli import main

from .conftest import TINY_MODEL
from .hub_stand_in import HubStandIn
from .test_convert import absvit_checkpoint, tdam_checkpoint

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
SUBCOMMANDS = {"train", "eval", "predict", "data", "index"}


def signature(args):
    """``(command, sub-command, flags)`` of an absvl argument list."""
    command = args[0]
    sub = args[1] if command in SUBCOMMANDS else None
    return command, sub, frozenset(a.split("=")[0] for a in args if a.startswith("-"))


def readme_commands():
    """Every ``absvl`` (or ``torchrun ... -m absvl.cli``) command line of the README's bash blocks."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words[:1] == ["absvl"]:
                lines.append(words[1:])
            elif words[:1] == ["torchrun"]:
                lines.append(words[words.index("absvl.cli") + 1 :])
    return lines


class Walk:
    """Runs absvl commands in the walk's folder and remembers their signatures."""

    def __init__(self, folder, env):
        self.folder, self.env, self.ran = folder, env, []

    def absvl(self, *args):
        self.ran.append(signature(args))
        assert main(list(args)) == 0, args

    def process(self, command, args, timeout=420, **env):
        self.ran.append(signature(args))
        return subprocess.run(
            command + list(args),
            cwd=self.folder,
            env={**self.env, **env},
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def serve(self, *args):
        """``absvl serve ARGS`` until its /health answers: the loaded models' half of it."""
        self.ran.append(signature(("serve", *args)))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        proc = subprocess.Popen(
            [sys.executable, "-m", "absvl.cli", "serve", *args, "--port", str(port)],
            cwd=self.folder,
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            deadline = time.time() + 120
            while time.time() < deadline:
                assert proc.poll() is None, proc.stderr.read()
                try:
                    request = urllib.request.Request(f"http://127.0.0.1:{port}/health", headers={"Host": "localhost"})
                    with urllib.request.urlopen(request, timeout=2) as reply:
                        return json.loads(reply.read())
                except OSError:
                    time.sleep(0.3)
            raise AssertionError(f"absvl serve {args} did not answer /health")
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def _image_folder(world, root):
    """An ImageFolder (train/<class>, val/<class>) made of the world's images, two classes."""
    images = sorted((world / "images" / "train2014").iterdir())
    for split, part in (("train", images[:16]), ("val", images[16:24])):
        for i, path in enumerate(part):
            folder = root / split / ("even" if i % 2 == 0 else "odd")
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, folder / path.name)
    return root


def test_the_readme_walk_through(shapes_root, tmp_path, monkeypatch):
    world = shapes_root
    folder = tmp_path / "walk"
    folder.mkdir()
    monkeypatch.chdir(folder)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    walk = Walk(folder, env)
    tiny = [
        *TINY_MODEL,
        f"model.text_encoder={world / 'text_encoder'}",
        "data.shapes=null",
        "data.num_workers=0",
        "train.trackers=[]",
        "train.log_every=1",
    ]
    vqa_config, retrieval_config = (
        str(REPO / "configs/shapes_absvit_tiny.yaml"),
        str(REPO / "configs/shapes_retrieval.yaml"),
    )

    # --- Finetune on VQAv2 -----------------------------------------------------------------
    walk.absvl("data", "check", str(world), "--images", str(world / "images"))
    vqa_run = [
        *tiny,
        f"data.root={world}",
        f"data.images={world / 'images'}",
        "train.output_dir=runs/vqa",
        "train.max_steps=4",
        "train.save_every=2",
        "train.eval_every=2",
        "train.batch_size=8",
    ]
    walk.absvl("train", "vqa", "--config", vqa_config, *vqa_run)
    two = walk.process(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            "29591",
            "-m",
            "absvl.cli",
        ],
        [
            "train",
            "vqa",
            "--config",
            vqa_config,
            *tiny,
            f"data.root={world}",
            "train.output_dir=runs/vqa2",
            "train.max_steps=2",
            "train.batch_size=4",
            "data.val_split=null",
        ],
    )
    assert two.returncode == 0, two.stderr[:4000]
    walk.absvl("train", "vqa", "--resume", "runs/vqa")  # the run's folder is all it needs
    walk.absvl(
        "eval",
        "vqa",
        "--model",
        "runs/vqa/best",
        "--data",
        str(world),
        "--images",
        str(world / "images"),
        "--split",
        "val",
        "--out",
        "val.json",
    )
    walk.absvl(
        "predict",
        "vqa",
        "--model",
        "runs/vqa/best",
        "--data",
        str(world),
        "--images",
        str(world / "images"),
        "--split",
        "test-dev",
        "--out",
        "submission.json",
    )
    walk.absvl("export", "runs/vqa/checkpoint-00000002", "--out", "vqa-step2")
    walk.absvl(
        "eval",
        "vqa",
        "--predictions",
        "submission.json",
        "--questions",
        str(world / "v2_OpenEnded_mscoco_test-dev2015_questions.json"),
        "--annotations",
        str(world / "shapes_test-dev2015_annotations.json"),
    )
    assert json.loads(Path("val.json").read_text())["overall"] >= 0

    # --- Search images by text -------------------------------------------------------------
    walk.absvl(
        "train",
        "retrieval",
        "--config",
        retrieval_config,
        *tiny,
        "model.max_text_len=40",
        f"data.captions={world / 'dataset_shapes.json'}",
        f"data.images={world / 'images'}",
        "train.output_dir=runs/retrieval",
        "train.max_steps=3",
        "train.batch_size=8",
        "train.rerank_k=2",
    )
    walk.absvl(
        "eval",
        "retrieval",
        "--model",
        "runs/retrieval/final",
        "--data",
        str(world / "dataset_shapes.json"),
        "--images",
        str(world / "images"),
        "--split",
        "test",
        "--k",
        "3",
        "--out",
        "recall.json",
    )
    train_images = sorted((world / "images" / "train2014").iterdir())
    photos = folder / "photos"
    photos.mkdir()
    for path in train_images[:20]:
        shutil.copy(path, photos / path.name)
    Path("new_photos.txt").write_text("\n".join(str(p) for p in train_images[20:24]) + "\n")
    walk.absvl("index", "build", "--model", "runs/retrieval/final", "--images", str(photos), "--out", "photos.index")
    walk.absvl("index", "add", "--index", "photos.index", "--images", "new_photos.txt")
    walk.absvl("index", "rebuild", "--index", "photos.index", "--factory", "HNSW32")
    walk.absvl("index", "verify", "--index", "photos.index")
    walk.absvl("search", "a red circle left of a blue square", "--index", "photos.index", "--k", "5", "--rerank", "8")
    health = walk.serve("--model", "runs/retrieval/final", "--index", "photos.index")
    assert health["index_size"] == 24 and not health["vqa"]  # a retrieval model claims no VQA
    health = walk.serve("--model", "runs/vqa/final", "--index", "photos.index")
    assert health["vqa"] and "retrieval/final" in health["retrieval_model"]
    walk.serve(
        "--model",
        "runs/vqa/final",
        "--retrieval-model",
        "runs/retrieval/final",
        "--index",
        "photos.index",
        "--index-device",
        "auto",
    )  # the README's `cuda`: no GPU here
    walk.serve(
        "--model",
        "runs/vqa/final",
        "--index",
        "photos.index",
        "--host",
        "127.0.0.1",
        "--allowed-host",
        "vqa.example.org",
        "--max-pending",
        "32",
        "--request-timeout",
        "30",
    )
    shutil.copy(train_images[0], "photo.jpg")
    walk.absvl(
        "attend",
        "photo.jpg",
        "--text",
        "what color is the circle?",
        "--model",
        "runs/vqa/final",
        "--out",
        "attention.png",
    )
    assert Path("attention.png").stat().st_size > 0

    # --- Start from pretrained weights (before the classifier that loads them) -----------------
    save_file(absvit_checkpoint(), "absvit_test.safetensors")
    walk.absvl("convert", "absvit_test.safetensors", "--arch", "absvit_test_patch8", "--out", "weights/absvit_small")
    from timm.models.resnet import Bottleneck

    torch.save(tdam_checkpoint(Bottleneck), "tdam_test.pth.tar")
    walk.absvl("convert", "tdam_test.pth.tar", "--arch", "tdam_resnet_test_bottleneck", "--out", "weights/tdam_r50")

    # --- Train or finetune an image classifier -------------------------------------------------
    images = _image_folder(world, folder / "imagefolder")
    classify = [
        "model.backbone_kwargs={img_size: 32}",
        "data.num_workers=0",
        "train.trackers=[]",
        "train.max_steps=2",
        "train.batch_size=4",
        "data.randaugment=null",
    ]
    walk.absvl(
        "train",
        "classify",
        "--data",
        str(images),
        "--backbone",
        "vit_test_patch8",
        *classify,
        "train.output_dir=runs/classify",
    )
    walk.absvl(
        "train",
        "classify",
        "--config",
        str(REPO / "configs/imagenet_absvit_small.yaml"),
        "--data",
        str(images),
        "--resume",
        "model.backbone=vit_test_patch8",
        *classify,
        "train.output_dir=runs/imagenet",
        "train.mixed_precision=no",
    )
    walk.absvl(
        "train",
        "classify",
        "--data",
        str(images),
        "--backbone",
        "absvit_test_patch8",
        "model.backbone_kwargs={pretrained_path: weights/absvit_small, img_size: 32}",
        "train.epochs=30",
        "data.mixup=0",
        *classify[1:],
        "train.output_dir=runs/flowers",
    )
    walk.absvl(
        "eval",
        "classify",
        "--model",
        "runs/classify/final",
        "--data",
        str(images),
        "--split",
        "val",
        "--out",
        "classify.json",
    )
    walk.absvl(
        "train",
        "classify",
        "--config",
        str(REPO / "configs/shapes_pretrain.yaml"),
        f"data.root={world / 'patch_labels'}",
        "model.backbone_kwargs={img_size: 32}",
        "data.num_workers=0",
        "train.trackers=[]",
        "train.max_steps=2",
        "train.batch_size=4",
        "train.output_dir=runs/pretrain",
    )

    # --- Use from Python ------------------------------------------------------------------------
    for name in ("image.jpg", "a.jpg", "b.jpg"):
        shutil.copy(train_images[1], name)
    code = re.search(r"```python\n(.*?)```", README.read_text(), flags=re.S).group(1)
    exec(compile(code.replace("runs/shapes_absvit_tiny/final", "runs/vqa/final"), "README.md", "exec"), {})
    Path("pairs.jsonl").write_text(
        "".join(json.dumps({"image": n, "question": "is it red?"}) + "\n" for n in ("a.jpg", "b.jpg"))
    )
    walk.absvl(
        "predict",
        "vqa-file",
        "--model",
        "runs/vqa/final",
        "--input",
        "pairs.jsonl",
        "--out",
        "answers.jsonl",
        "--batch-size",
        "64",
    )
    assert len(Path("answers.jsonl").read_text().splitlines()) == 2

    # --- Publish to the Hugging Face Hub (a local stand-in of its API) ---------------------------
    with HubStandIn() as hub:
        pushed = walk.process(
            [sys.executable, "-m", "absvl.cli"],
            ["push", "runs/vqa", "--repo-id", "me/absvl-shapes"],
            HF_ENDPOINT=hub.url,
            HF_TOKEN="hf_walk",
            HF_HOME=str(tmp_path / "hf"),
        )
        assert pushed.returncode == 0, pushed.stderr[-3000:]
        assert "hf_walk" not in pushed.stdout + pushed.stderr

    # every command line of the README is one this walk ran (same command, sub-command, flags)
    for args in readme_commands():
        command, sub, flags = signature(args)
        assert any(c == command and s == sub and flags <= f for c, s, f in walk.ran), f"README line not walked: {args}"
