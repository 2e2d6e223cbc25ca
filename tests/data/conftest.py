"""Tiny VQAv2 datasets in the official layout, written to temp folders, and image-file helpers."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ANSWERS = ["yes", "no", "red", "blue", "2", "circle"]  # the fixture's answer vocabulary

# image_id → how the fixture writes the file (every name ends in .jpg as in COCO; PIL reads the content)
TRAIN_IMAGES = {1: "RGB", 2: "L", 3: "CMYK", 4: "RGBA"}
VAL_IMAGES = {11: "I;16", 12: "P", 13: "RGB"}
TEST_IMAGES = {21: "RGB", 22: "RGB"}
QUESTIONS_PER_IMAGE = 2


def write_image(path, mode="RGB", size=(40, 30), seed=0):
    """Write an image of ``mode`` with recognisable content; returns the path.

    RGB/L/CMYK: JPEG. RGBA: PNG, left half opaque red, right half fully transparent (black
    underneath). P: PNG palette with a transparent index. I;16: 16-bit PNG ramp to 65535.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    rng = np.random.default_rng(seed)
    if mode == "RGB":
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path, format="JPEG", quality=95)
    elif mode == "L":
        Image.fromarray(np.full((h, w), 100, np.uint8)).save(path, format="JPEG", quality=95)
    elif mode == "CMYK":
        Image.new("CMYK", size, (0, 255, 255, 0)).save(path, format="JPEG", quality=95)  # pure red
    elif mode == "RGBA":
        arr = np.zeros((h, w, 4), np.uint8)
        arr[:, : w // 2] = (255, 0, 0, 255)
        Image.fromarray(arr, mode="RGBA").save(path, format="PNG")
    elif mode == "P":
        img = Image.new("P", size, 1)
        img.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)  # index 0 black (transparent), 1 blue
        img.paste(0, (0, 0, w // 2, h))
        img.save(path, format="PNG", transparency=0)
    elif mode == "I;16":
        ramp = np.linspace(0, 65535, w).round().astype(np.uint16)
        Image.fromarray(np.tile(ramp, (h, 1))).save(path, format="PNG")
    else:
        raise ValueError(mode)
    return path


def truncate_file(path, keep=0.5):
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: int(len(data) * keep)])


def _answers(qid):
    """10 human answers for question ``qid``: mostly one in-vocabulary answer."""
    main = ANSWERS[qid % len(ANSWERS)]
    answers = [main] * 7 + ["blue"] * 2 + ["Zebra!"]
    return [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)]


def build_vqa(root, layout="images", splits=("train", "val", "test-dev", "test")):
    """Write a tiny official-format VQAv2 dataset under ``root``; returns ``root``.

    layout "images": images in ROOT/images/<folder>/, "flat": in ROOT/<folder>/. JSONs in ROOT.
    Question ids: image_id * 10 + k. Each train/val question has 10 answers; questions of image 4
    (train) have only out-of-vocabulary answers.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tags = {
        "train": ("train2014", "train2014", TRAIN_IMAGES),
        "val": ("val2014", "val2014", VAL_IMAGES),
        "test-dev": ("test-dev2015", "test2015", {21: "RGB"}),
        "test": ("test2015", "test2015", TEST_IMAGES),
    }
    for split in splits:
        tag, folder, images = tags[split]
        image_dir = root / "images" / folder if layout == "images" else root / folder
        questions, annotations = [], []
        for image_id, mode in images.items():
            write_image(image_dir / f"COCO_{folder}_{image_id:012d}.jpg", mode, seed=image_id)
            for k in range(QUESTIONS_PER_IMAGE):
                qid = image_id * 10 + k
                questions.append({"image_id": image_id, "question": f"what is object {k}?", "question_id": qid})
                answers = _answers(qid)
                if image_id == 4:
                    answers = [dict(a, answer="zebra") for a in answers]
                annotations.append(
                    {
                        "question_id": qid,
                        "image_id": image_id,
                        "question_type": "what is",
                        "answer_type": "yes/no" if answers[0]["answer"] in ("yes", "no") else "other",
                        "multiple_choice_answer": answers[0]["answer"],
                        "answers": answers,
                    }
                )
        (root / f"v2_OpenEnded_mscoco_{tag}_questions.json").write_text(
            json.dumps(
                {
                    "info": {},
                    "task_type": "Open-Ended",
                    "data_type": "mscoco",
                    "data_subtype": tag,
                    "license": {},
                    "questions": questions,
                }
            )
        )
        if split in ("train", "val"):
            (root / f"v2_mscoco_{tag}_annotations.json").write_text(
                json.dumps(
                    {"info": {}, "data_type": "mscoco", "data_subtype": tag, "license": {}, "annotations": annotations}
                )
            )
    return root


@pytest.fixture
def vqa_root(tmp_path):
    """A clean tiny dataset, images under ROOT/images/<folder>/."""
    return build_vqa(tmp_path / "vqa")


@pytest.fixture
def make_vqa(tmp_path):
    """``make_vqa(layout="images", splits=...)`` → root of a fresh tiny dataset."""
    count = [0]

    def make(layout="images", splits=("train", "val", "test-dev", "test")):
        count[0] += 1
        return build_vqa(tmp_path / f"vqa{count[0]}", layout=layout, splits=splits)

    return make


@pytest.fixture
def image_file(tmp_path):
    """``image_file(mode, name=None, **kw)`` → path of a written image (see ``write_image``)."""

    def make(mode="RGB", name=None, **kwargs):
        return write_image(tmp_path / "img" / (name or f"{mode.replace(';', '_')}.img"), mode, **kwargs)

    return make


@pytest.fixture
def truncate():
    return truncate_file


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    import transformers

    from absvl.models.vl import build_tiny_text_encoder

    folder = build_tiny_text_encoder(tmp_path_factory.mktemp("tiny_text"), kind="roberta")
    return transformers.AutoTokenizer.from_pretrained(folder)


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """HF_HUB_OFFLINE=1 as datasets and huggingface_hub read it at import, and a fresh datasets cache."""
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")
    return tmp_path / "datasets-cache"
