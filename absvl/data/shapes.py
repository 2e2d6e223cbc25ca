"""The embedded "Shapes" world (SPEC §7): procedural multi-object scenes in the official formats.

``generate_shapes(out_dir, ...)`` writes, deterministically from ``seed``::

    out_dir/
      images/{train2014,val2014,test2015}/COCO_{folder}_{image_id:012d}.jpg   JPEG, quality 95
      masks/{folder}/{image_id:012d}.png          uint8 label map: 0 background, index+1 = object
      scenes.json                                 per image: objects with attributes, bbox, area
      v2_OpenEnded_mscoco_{split}_questions.json  VQAv2 questions (+ "target_objects" per question)
      v2_mscoco_{split}_annotations.json          VQAv2 annotations (train/val splits)
      shapes_{test split}_annotations.json        private answers of the test split (for scoring)
      dataset_shapes.json                         Karpathy-style captions, 5 per image
      patch_labels/{train,val}/{images,labels}/     the vision pretraining data: image links + class-index maps
      text_encoder/                               tiny RoBERTa (MLM-pretrained on the train texts) + BPE tokenizer
      shapes_meta.json                            generation arguments + version (written last)

Scenes: a light plain / noisy / gradient background and 2-5 objects (7 colors × 3 shapes × 2
sizes) at random positions. Objects are drawn in ``index`` order (a later one covers an earlier
one); every object keeps at least ``MIN_VISIBLE`` of its pixels. In ``scenes.json`` ``bbox`` is
the full (unoccluded) extent ``[x0, y0, x1, y1]`` with exclusive ``x1, y1``, ``area`` counts the
visible pixels (= the label map's pixels of that object), ``center`` is the shape's nominal
centre (integer pixels), which defines the spatial relations: A is "left of" B when
``B.cx - A.cx >= margin`` and clearly not when ``<= 0``; templates whose answer would fall in
between are never asked. ``target_objects`` lists object indices (0-based; mask label =
index + 1); ``target_mask`` turns them into a boolean mask.

Question families (VQAv2 ``question_type`` / ``answer_type``): color ("what color is the
[size] shape?" / "what color is the object left of the red square?"), shape ("what shape is
the [size] red object?"), existence ("is there a blue triangle?", yes/no), counting ("how many
red objects are there?", "0".."5") and relations ("is the red circle left of the blue
square?"). Every question is unambiguous for its scene; answers are balanced greedily across
the world (the least frequent available answer of a family is asked next), so yes/no is 50/50
and counts and colors are spread. Ten human answers per question: the correct one at least 7
times, the rest (``answer_noise`` each, at most 3) a plausible wrong answer of the same type.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import json
import os
import re
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw

SHAPES_VERSION = "2"

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 215),
    "yellow": (235, 200, 30),
    "purple": (130, 50, 170),
    "orange": (240, 130, 20),
    "cyan": (30, 190, 200),
}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
RELATIONS = ("left of", "right of", "above", "below")
# object "radius" as a fraction of the image side, before a ±10% jitter
SIZE_RADIUS = {"small": 0.09, "large": 0.17}
MIN_VISIBLE = 0.6  # every object keeps at least this fraction of its pixels visible
COLOR_JITTER = 10  # per-channel jitter of an object's fill colour
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

DEFAULT_SPLITS = (("train2014", 0.8), ("val2014", 0.1), ("test-dev2015", 0.1))
FAMILIES = ("color", "shape", "exist", "count", "rel_yn", "rel_what")
# families whose answers are balanced together (relation "what" questions then favour colours,
# which the colour family spreads over 7 answers, over the 3 shapes)
_BALANCE_GROUP = {"color": "other", "shape": "other", "rel_what": "other"}

VQA_INFO = {
    "description": "Shapes: a procedurally generated VQA world in the VQAv2 format (absvl).",
    "url": "https://github.com/absvl/absvl",
    "version": "2.0",
    "year": 2017,
    "contributor": "absvl",
    "date_created": "2017-04-26 17:07:13",
}
VQA_LICENSE = {
    "url": "http://creativecommons.org/licenses/by/4.0/",
    "name": "Creative Commons Attribution 4.0 International License",
}

KARPATHY_FILE = "dataset_shapes.json"
SCENES_FILE = "scenes.json"
META_FILE = "shapes_meta.json"
TEXT_ENCODER_DIR = "text_encoder"
PATCH_LABELS_DIR = "patch_labels"


# --------------------------------------------------------------------------- naming helpers
def image_folder(split: str) -> str:
    """COCO image folder of a VQAv2 split: ``test-dev2015`` questions use ``test2015`` images."""
    if split.startswith("test"):
        year = re.search(r"(\d{4})$", split)
        return "test" + (year.group(1) if year else "2015")
    return split


def karpathy_split(split: str) -> str:
    for name in ("train", "val", "test"):
        if split.startswith(name):
            return name
    raise ValueError(f"split {split!r} must start with train, val or test")


def is_test_split(split: str) -> bool:
    return split.startswith("test")


def image_filename(folder: str, image_id: int) -> str:
    return f"COCO_{folder}_{image_id:012d}.jpg"


def questions_filename(split: str) -> str:
    return f"v2_OpenEnded_mscoco_{split}_questions.json"


def annotations_filename(split: str) -> str:
    """Public annotations for train/val splits; the private scoring file for test splits."""
    return f"shapes_{split}_annotations.json" if is_test_split(split) else f"v2_mscoco_{split}_annotations.json"


# --------------------------------------------------------------------------- the world handle
@dataclass
class ShapesWorld:
    """Paths and counts of a generated world (``ShapesWorld.load(out_dir)`` reads one back)."""

    root: Path
    seed: int
    image_size: int
    num_images: int
    splits: dict[str, int]  # VQAv2 split name → number of images
    num_questions: dict[str, int]  # VQAv2 split name → number of questions
    text_encoder_dir: Path | None = None
    args: dict[str, Any] = field(default_factory=dict, repr=False)

    @staticmethod
    def exists(root: str | Path) -> bool:
        """Whether ``root`` holds a generated world (a dataset folder of another kind does not)."""
        return (Path(root) / META_FILE).is_file()

    @classmethod
    def load(cls, root: str | Path) -> "ShapesWorld":
        root = Path(root)
        meta = json.loads((root / META_FILE).read_text())
        args = meta["args"]
        return cls(
            root=root,
            seed=args["seed"],
            image_size=args["image_size"],
            num_images=sum(meta["images"].values()),
            splits=dict(meta["images"]),
            num_questions=dict(meta["questions"]),
            text_encoder_dir=root / TEXT_ENCODER_DIR if args["text_encoder"] else None,
            args=args,
        )

    @property
    def scenes_path(self) -> Path:
        return self.root / SCENES_FILE

    @property
    def karpathy_path(self) -> Path:
        return self.root / KARPATHY_FILE

    @property
    def meta_path(self) -> Path:
        return self.root / META_FILE

    def questions_path(self, split: str) -> Path:
        return self.root / questions_filename(split)

    def annotations_path(self, split: str) -> Path:
        return self.root / annotations_filename(split)

    def image_dir(self, split: str) -> Path:
        return self.root / "images" / image_folder(split)

    def image_path(self, split: str, image_id: int) -> Path:
        folder = image_folder(split)
        return self.root / "images" / folder / image_filename(folder, image_id)

    def mask_path(self, split: str, image_id: int) -> Path:
        return self.root / "masks" / image_folder(split) / f"{image_id:012d}.png"

    def load_scenes(self) -> dict[int, dict]:
        """image_id → scene (``split``, ``folder``, ``objects``, ...)."""
        return {s["image_id"]: s for s in json.loads(self.scenes_path.read_text())["images"]}


# --------------------------------------------------------------------------- scenes
def _shape_mask(shape: str, cx: int, cy: int, r: float, size: int) -> np.ndarray:
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=1)
    elif shape == "square":
        h = 0.9 * r
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=1)
    else:  # an upward triangle whose bbox is centred on (cx, cy)
        h = 1.15 * r
        draw.polygon([(cx, cy - h), (cx - h, cy + h), (cx + h, cy + h)], fill=1)
    return np.asarray(canvas, dtype=bool)


def _background(rng: np.random.Generator, size: int) -> tuple[np.ndarray, str]:
    base = int(rng.integers(170, 236))
    tint = rng.integers(-12, 13, size=3)
    bg = np.broadcast_to(base + tint, (size, size, 3)).astype(np.int16)
    kind = str(rng.choice(["plain", "noise", "gradient"]))
    if kind == "noise":
        bg = bg + rng.integers(-6, 7, size=(size, size, 1))
    elif kind == "gradient":
        angle = rng.uniform(0, 2 * np.pi)
        ys, xs = np.mgrid[0:size, 0:size] / max(size - 1, 1) - 0.5
        ramp = 30 * (np.cos(angle) * xs + np.sin(angle) * ys)
        bg = bg + np.round(ramp).astype(np.int16)[..., None]
    return np.clip(bg, 0, 255).astype(np.uint8), kind


def _make_scene(rng: np.random.Generator, size: int, min_objects: int, max_objects: int):
    """Returns (image HxWx3 uint8, labels HxW uint8, objects, background kind)."""
    colors = list(COLORS)
    while True:
        n = int(rng.integers(min_objects, max_objects + 1))
        labels = np.zeros((size, size), dtype=np.uint8)
        objects: list[dict] = []
        full_areas: list[int] = []
        for k in range(n):
            color = colors[int(rng.integers(len(colors)))]
            shape = SHAPES[int(rng.integers(len(SHAPES)))]
            obj_size = SIZES[int(rng.integers(len(SIZES)))]
            placed = False
            for _ in range(60):
                r = SIZE_RADIUS[obj_size] * size * float(rng.uniform(0.9, 1.1))
                ext = int(np.ceil(1.15 * r)) + 1
                cx, cy = (int(v) for v in rng.integers(ext, size - ext, size=2))
                mask = _shape_mask(shape, cx, cy, r, size)
                new = labels.copy()
                new[mask] = k + 1
                if all((new == j + 1).sum() >= MIN_VISIBLE * full_areas[j] for j in range(k)):
                    placed = True
                    break
            if not placed:
                break
            labels = new
            ys, xs = np.nonzero(mask)
            jitter = rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, size=3)
            rgb = [int(v) for v in np.clip(np.array(COLORS[color]) + jitter, 0, 255)]
            full_areas.append(int(mask.sum()))
            objects.append(
                dict(
                    index=k,
                    label=k + 1,
                    color=color,
                    shape=shape,
                    size=obj_size,
                    bbox=[int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1],
                    center=[cx, cy],
                    radius=round(r, 2),
                    full_area=int(mask.sum()),
                    rgb=rgb,
                )
            )
        if len(objects) >= min_objects:
            break
    image, bg_kind = _background(rng, size)
    for obj in objects:
        vis = labels == obj["label"]
        obj["area"] = int(vis.sum())
        image[vis] = obj["rgb"]
    return image, labels, objects, bg_kind


# --------------------------------------------------------------------------- language
def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _join(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _desc_phrase(desc: tuple, plural: bool = False) -> str:
    size, color, shape = desc
    noun = (shape or "object") + ("s" if plural else "")
    return " ".join(w for w in (size, color, noun) if w)


def _matches(obj: dict, desc: tuple) -> bool:
    size, color, shape = desc
    return (size is None or obj["size"] == size) and (color is None or obj["color"] == color) and (
        shape is None or obj["shape"] == shape
    )


# attribute subsets used to refer to one object: (size?, color?, shape?)
_REF_SUBSETS = ((0, 0, 1), (0, 1, 1), (1, 0, 1), (1, 1, 1), (0, 1, 0), (1, 1, 0), (1, 0, 0))


def _unique_descs(objects: list[dict], obj: dict, exclude: str | None = None) -> list[tuple]:
    out = []
    for use_size, use_color, use_shape in _REF_SUBSETS:
        if (exclude == "color" and use_color) or (exclude == "shape" and use_shape):
            continue
        desc = (
            obj["size"] if use_size else None,
            obj["color"] if use_color else None,
            obj["shape"] if use_shape else None,
        )
        if sum(_matches(o, desc) for o in objects) == 1:
            out.append(desc)
    return out


def relation(a: dict, b: dict, rel: str, margin: float) -> bool | None:
    """Is ``a`` ``rel`` ``b``? True (clearly), False (clearly not) or None (ambiguous: never asked)."""
    (ax, ay), (bx, by) = a["center"], b["center"]
    d = {"left of": bx - ax, "right of": ax - bx, "above": by - ay, "below": ay - by}[rel]
    if d >= margin:
        return True
    if d <= 0:
        return False
    return None


def _candidates(objects: list[dict], family: str, margin: float, rng: np.random.Generator) -> list[dict]:
    """All questions of ``family`` that are unambiguous for this scene, with answers and targets."""
    out: list[dict] = []

    def add(question, answer, targets, qtype, atype):
        out.append(dict(question=question, answer=answer, targets=list(targets), qtype=qtype, atype=atype))

    if family == "color":
        for o in objects:
            for d in _unique_descs(objects, o, exclude="color"):
                add(f"what color is the {_desc_phrase(d)}?", o["color"], [o["index"]], "what color is the", "other")
    elif family == "shape":
        for o in objects:
            for d in _unique_descs(objects, o, exclude="shape"):
                add(f"what shape is the {_desc_phrase(d)}?", o["shape"], [o["index"]], "what shape is the", "other")
    elif family == "exist":
        descs = [(None, None, s) for s in SHAPES] + [(None, c, None) for c in COLORS]
        descs += [(None, c, s) for c in COLORS for s in SHAPES]
        descs += [(z, c, s) for z in SIZES for c in COLORS for s in SHAPES]
        for d in descs:
            targets = [o["index"] for o in objects if _matches(o, d)]
            add(f"is there {_article(_desc_phrase(d))}?", "yes" if targets else "no", targets, "is there a", "yes/no")
    elif family == "count":
        descs = [(None, None, None)] + [(None, None, s) for s in SHAPES] + [(None, c, None) for c in COLORS]
        descs += [(z, None, None) for z in SIZES] + [(None, c, s) for c in COLORS for s in SHAPES]
        descs += [(z, None, s) for z in SIZES for s in SHAPES]
        for d in descs:
            targets = [o["index"] for o in objects if _matches(o, d)]
            add(f"how many {_desc_phrase(d, plural=True)} are there?", str(len(targets)), targets, "how many", "number")
    elif family in ("rel_yn", "rel_what"):
        # one referring expression per object (random among its unambiguous ones)
        refs = {}
        for o in objects:
            descs = _unique_descs(objects, o)
            if descs:
                refs[o["index"]] = descs[int(rng.integers(len(descs)))]
        for b in objects:
            if b["index"] not in refs:
                continue
            ref_b = _desc_phrase(refs[b["index"]])
            for rel in RELATIONS:
                others = [o for o in objects if o is not b]
                if family == "rel_yn":
                    for a in others:
                        ans = relation(a, b, rel, margin)
                        if a["index"] in refs and ans is not None:
                            q = f"is the {_desc_phrase(refs[a['index']])} {rel} the {ref_b}?"
                            add(q, "yes" if ans else "no", [a["index"], b["index"]], "is the", "yes/no")
                else:
                    verdicts = [relation(a, b, rel, margin) for a in others]
                    if verdicts.count(True) == 1 and None not in verdicts:
                        a = others[verdicts.index(True)]
                        targets = [a["index"], b["index"]]
                        for attr in ("color", "shape"):
                            q = f"what {attr} is the object {rel} the {ref_b}?"
                            add(q, a[attr], targets, f"what {attr} is the", "other")
    else:
        raise ValueError(family)
    return out


def _wrong_answer(answer: str, rng: np.random.Generator) -> str:
    if answer in ("yes", "no"):
        return "no" if answer == "yes" else "yes"
    if answer.isdigit():
        n = int(answer)
        return str(n + 1) if n == 0 or rng.random() < 0.5 else str(n - 1)
    pool = [c for c in COLORS if c != answer] if answer in COLORS else [s for s in SHAPES if s != answer]
    return pool[int(rng.integers(len(pool)))]


def _human_answers(answer: str, noise: float, rng: np.random.Generator) -> list[dict]:
    answers = [answer] * 10
    k = min(3, int(rng.binomial(10, noise))) if noise > 0 else 0
    for i in sorted(int(i) for i in rng.choice(10, size=k, replace=False)):
        answers[i] = _wrong_answer(answer, rng)
    return [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)]


def _object_phrase(o: dict, with_size: bool = True) -> str:
    return _article(" ".join(([o["size"]] if with_size else []) + [o["color"], o["shape"]]))


def _count_phrase(n: int, noun: str) -> str:
    return _article(noun) if n == 1 else f"{NUMBER_WORDS[n]} {noun}s"


def _captions(objects: list[dict], bg_kind: str, margin: float, rng: np.random.Generator) -> list[str]:
    """Five different captions describing the objects."""
    lr = sorted(objects, key=lambda o: (o["center"][0], o["index"]))
    tb = sorted(objects, key=lambda o: (o["center"][1], o["index"]))
    shape_counts = Counter(o["shape"] for o in objects)
    color_counts = Counter(o["color"] for o in objects)
    shapes_cap = _join([_count_phrase(shape_counts[s], s) for s in SHAPES if shape_counts[s]])
    colors_cap = _join([_count_phrase(color_counts[c], f"{c} shape") for c in COLORS if color_counts[c]])

    def rel_caption(rels: tuple[str, ...]) -> str | None:
        pairs = [
            (a, b, rel) for rel in rels for a in objects for b in objects if a is not b and relation(a, b, rel, margin)
        ]
        if not pairs:
            return None
        a, b, rel = pairs[int(rng.integers(len(pairs)))]
        return f"{_object_phrase(a)} {rel} {_object_phrase(b)}"

    order = [objects[int(i)] for i in rng.permutation(len(objects))]
    first = [
        "from left to right: " + _join([_object_phrase(o) for o in lr]) if rng.random() < 0.5
        else "from top to bottom: " + _join([_object_phrase(o) for o in tb]),
        shapes_cap,
        colors_cap,
        rel_caption(("left of", "right of") if rng.random() < 0.5 else ("above", "below")),
        f"{NUMBER_WORDS[len(objects)]} shapes: " + _join([_object_phrase(o, with_size=False) for o in order]),
    ]
    extra = [
        rel_caption(RELATIONS),
        "from left to right: " + _join([_object_phrase(o) for o in lr]),
        "from top to bottom: " + _join([_object_phrase(o) for o in tb]),
        f"{_join([_object_phrase(o) for o in order])} on a {bg_kind} background",
    ]
    out: list[str] = []
    for cap in first + extra:
        if cap and cap + "." not in out and len(out) < 5:
            out.append(cap + ".")
    return out


def _tokens(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


# --------------------------------------------------------------------------- generation
def _split_counts(num_images: int | None, splits: Sequence[tuple[str, float | int]]) -> list[tuple[str, int]]:
    names = [str(s) for s, _ in splits]
    for name in names:
        karpathy_split(name)
    if len(set(map(image_folder, names))) != len(names):
        raise ValueError(f"splits {names} share an image folder")
    values = [v for _, v in splits]
    if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
        counts = [int(v) for v in values]
        if num_images is not None and num_images != sum(counts):
            raise ValueError(f"split counts sum to {sum(counts)}, num_images={num_images}")
    else:
        if num_images is None:
            raise ValueError("fractional splits need num_images")
        if abs(sum(values) - 1) > 1e-6:
            raise ValueError(f"split fractions must sum to 1, got {sum(values)}")
        rest = [int(round(float(v) * num_images)) for v in values[1:]]
        counts = [num_images - sum(rest)] + rest
    if any(c < 0 for c in counts) or sum(counts) < 1:
        raise ValueError(f"bad split sizes {counts}")
    if sum(counts) > 599_999:
        raise ValueError("at most 599,999 images")
    return list(zip(names, counts))


def _normalise_args(
    num_images: int | None,
    seed: int,
    image_size: int,
    splits: Sequence[tuple[str, float | int]],
    questions_per_image: int,
    text_encoder: bool,
    text_kind: str,
    min_objects: int,
    max_objects: int,
    answer_noise: float,
    text_pretrain_steps: int = 600,
) -> dict[str, Any]:
    split_counts = _split_counts(num_images, splits)
    if not 1 <= min_objects <= max_objects <= 9:
        raise ValueError("need 1 <= min_objects <= max_objects <= 9")
    if image_size < 16:
        raise ValueError("image_size must be >= 16")
    if questions_per_image < 1:
        raise ValueError("questions_per_image must be >= 1")
    if not 0 <= answer_noise <= 1:
        raise ValueError("answer_noise must be in [0, 1]")
    if text_pretrain_steps < 0:
        raise ValueError("text_pretrain_steps must be >= 0")
    return dict(
        num_images=sum(c for _, c in split_counts),
        seed=int(seed),
        image_size=int(image_size),
        splits=[[s, c] for s, c in split_counts],
        questions_per_image=int(questions_per_image),
        text_encoder=bool(text_encoder),
        text_kind=str(text_kind),
        min_objects=int(min_objects),
        max_objects=int(max_objects),
        answer_noise=float(answer_noise),
        text_pretrain_steps=int(text_pretrain_steps),
    )


def _dump(path: Path, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f)


def _write_world(root: Path, args: dict[str, Any]) -> dict[str, Any]:
    """Writes every file except the meta into ``root`` (an empty folder). Returns the counts."""
    seed, size, noise = args["seed"], args["image_size"], args["answer_noise"]
    margin = max(2.0, round(0.1 * size))
    split_counts = [(s, c) for s, c in args["splits"]]
    total = args["num_images"]
    image_ids = np.random.default_rng([seed, 2]).choice(599_999, size=total, replace=False) + 1
    q_rng = np.random.default_rng([seed, 1])
    balance: dict[str, Counter] = {f: Counter() for f in FAMILIES}
    for family, group in _BALANCE_GROUP.items():
        balance[family] = balance.setdefault(group, Counter())

    scenes, karpathy_images = [], []
    questions: dict[str, list] = {s: [] for s, _ in split_counts}
    annotations: dict[str, list] = {s: [] for s, _ in split_counts}
    corpus: set[str] = set()  # the tokenizer's vocabulary: every split's words
    lm_texts: list[str] = []  # the text encoder's pretraining: the training split's questions and captions
    sentid = 0
    idx = 0
    for split, count in split_counts:
        folder = image_folder(split)
        (root / "images" / folder).mkdir(parents=True, exist_ok=True)
        (root / "masks" / folder).mkdir(parents=True, exist_ok=True)
        for _ in range(count):
            image_id = int(image_ids[idx])
            scene_rng = np.random.default_rng([seed, 0, idx])
            image, labels, objects, bg_kind = _make_scene(scene_rng, size, args["min_objects"], args["max_objects"])
            fname = image_filename(folder, image_id)
            Image.fromarray(image).save(root / "images" / folder / fname, format="JPEG", quality=95, subsampling=0)
            mask_file = f"{image_id:012d}.png"
            Image.fromarray(labels).save(root / "masks" / folder / mask_file, format="PNG")
            scenes.append(
                dict(image_id=image_id, split=split, folder=folder, file_name=fname, mask_file=mask_file,
                     width=size, height=size, background=bg_kind, objects=objects)
            )

            # questions: cycle over the families in a random order, balancing answers greedily
            used: set[str] = set()
            order = [FAMILIES[int(i)] for i in q_rng.permutation(len(FAMILIES))]
            cands = {f: _candidates(objects, f, margin, q_rng) for f in FAMILIES}
            k = 0
            while k < args["questions_per_image"]:
                progressed = False
                for family in order:
                    if k >= args["questions_per_image"]:
                        break
                    pool = [c for c in cands[family] if c["question"] not in used]
                    if not pool:
                        continue
                    answers = sorted({c["answer"] for c in pool})
                    low = min(balance[family][a] for a in answers)
                    rare = [a for a in answers if balance[family][a] == low]
                    answer = rare[int(q_rng.integers(len(rare)))]
                    pool = [c for c in pool if c["answer"] == answer]
                    cand = pool[int(q_rng.integers(len(pool)))]
                    balance[family][answer] += 1
                    used.add(cand["question"])
                    qid = image_id * 1000 + k
                    questions[split].append(
                        {"image_id": image_id, "question": cand["question"], "question_id": qid,
                         "target_objects": cand["targets"]}
                    )
                    annotations[split].append(
                        {"question_id": qid, "image_id": image_id, "question_type": cand["qtype"],
                         "answer_type": cand["atype"], "multiple_choice_answer": answer,
                         "answers": _human_answers(answer, noise, q_rng)}
                    )
                    corpus.update((cand["question"], answer))
                    if karpathy_split(split) == "train":
                        lm_texts.append(cand["question"])
                    k += 1
                    progressed = True
                if not progressed:
                    break

            caps = _captions(objects, bg_kind, margin, np.random.default_rng([seed, 3, idx]))
            corpus.update(caps)
            if karpathy_split(split) == "train":
                lm_texts.extend(caps)
            sentids = list(range(sentid, sentid + len(caps)))
            sentid += len(caps)
            karpathy_images.append(
                {"filepath": folder, "sentids": sentids, "filename": fname, "imgid": idx,
                 "split": karpathy_split(split), "cocoid": image_id,
                 "sentences": [{"tokens": _tokens(c), "raw": c, "imgid": idx, "sentid": s}
                               for c, s in zip(caps, sentids)]}
            )
            idx += 1

    for split, _ in split_counts:
        _dump(root / questions_filename(split),
              {"info": VQA_INFO, "task_type": "Open-Ended", "data_type": "mscoco", "license": VQA_LICENSE,
               "data_subtype": split, "questions": questions[split]})
        _dump(root / annotations_filename(split),
              {"info": VQA_INFO, "license": VQA_LICENSE, "data_type": "mscoco", "data_subtype": split,
               "annotations": annotations[split]})
    _dump(root / SCENES_FILE,
          {"version": SHAPES_VERSION, "image_size": size, "relation_margin": margin, "colors": COLORS,
           "images": scenes})
    _dump(root / KARPATHY_FILE, {"images": karpathy_images, "dataset": "shapes"})
    _write_patch_labels(root, scenes)
    if args["text_encoder"]:
        from ..models.vl.tiny_text import build_tiny_text_encoder

        build_tiny_text_encoder(root / TEXT_ENCODER_DIR, kind=args["text_kind"], corpus=sorted(corpus), seed=seed,
                                pretrain_texts=lm_texts, pretrain_steps=args["text_pretrain_steps"])
    return dict(images={s: c for s, c in split_counts}, questions={s: len(questions[s]) for s, _ in split_counts})


def patch_label_classes() -> list[str]:
    """The classes of the world's patch labels: ``background``, then every "<color> <shape>"."""
    return ["background"] + [f"{color} {shape}" for color in COLORS for shape in SHAPES]


def _write_patch_labels(root: Path, scenes: list[dict]) -> None:
    """``root/patch_labels``: the train and val images (hard links) with class-index maps whose classes
    are ``patch_label_classes()`` — the vision encoder's pretraining data (``absvl.data.patch_labels``)."""
    classes = patch_label_classes()
    out = root / PATCH_LABELS_DIR
    out.mkdir()
    _dump(out / "classes.json", classes)
    for scene in scenes:
        split = karpathy_split(scene["split"])
        if split == "test":
            continue
        images, labels = out / split / "images", out / split / "labels"
        if not images.is_dir():
            images.mkdir(parents=True)
            labels.mkdir(parents=True)
        source = root / "images" / scene["folder"] / scene["file_name"]
        try:
            os.link(source, images / scene["file_name"])
        except OSError:  # a file system without hard links
            shutil.copyfile(source, images / scene["file_name"])
        lookup = np.zeros(len(scene["objects"]) + 1, dtype=np.uint8)
        for obj in scene["objects"]:
            lookup[obj["label"]] = classes.index(f"{obj['color']} {obj['shape']}")
        mask = np.asarray(Image.open(root / "masks" / scene["folder"] / scene["mask_file"]))
        Image.fromarray(lookup[mask]).save(labels / f"{Path(scene['file_name']).stem}.png")


@contextlib.contextmanager
def _lock(out_dir: Path):
    """An exclusive lock next to ``out_dir`` (POSIX only) so concurrent callers do not race."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(out_dir.parent / f".{out_dir.name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _generate_locked(out_dir: Path, args: dict[str, Any]) -> ShapesWorld:
    if out_dir.exists() and not (out_dir / META_FILE).exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists, is not empty and is not a Shapes world; refusing to replace it")
    prefix = f".{out_dir.name}.tmp-"
    for stale in out_dir.parent.glob(prefix + "*"):  # left by an interrupted run (we hold the lock)
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=out_dir.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the world is an ordinary folder
        counts = _write_world(tmp, args)
        _dump(tmp / META_FILE, {"version": SHAPES_VERSION, "args": args, **counts})
        old = None
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=prefix, dir=out_dir.parent))
            os.rename(out_dir, old / "old")
        os.rename(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ShapesWorld.load(out_dir)


def generate_shapes(
    out_dir: str | Path,
    num_images: int | None = 2000,
    seed: int = 0,
    image_size: int = 64,
    splits: Sequence[tuple[str, float | int]] = DEFAULT_SPLITS,
    questions_per_image: int = 5,
    text_encoder: bool = True,
    text_kind: str = "roberta",
    min_objects: int = 2,
    max_objects: int = 5,
    answer_noise: float = 0.1,
    text_pretrain_steps: int = 600,
) -> ShapesWorld:
    """Generate (always) a Shapes world into ``out_dir``, atomically: it is built in a temporary
    folder next to ``out_dir`` and renamed at the end, replacing a previous world.

    Args:
        num_images: total over the splits (``None`` when ``splits`` gives counts).
        splits: ``(VQAv2 split name, fraction or count)``; names start with train/val/test, test
            splits get questions only (answers go to the private ``shapes_{split}_annotations.json``).
        questions_per_image: questions per image (fewer if the scene has no more unambiguous ones).
        text_encoder: also build the tiny text encoder + tokenizer (``text_kind``: roberta/bert)
            trained on all questions, answers and captions, into ``out_dir/text_encoder``.
        answer_noise: probability that each of the 10 human answers is a plausible wrong one
            (at most 3 per question, so the correct answer is always the majority).
        text_pretrain_steps: masked-language-modelling steps of the text encoder on the training
            split's questions and captions (0: left randomly initialised).
    """
    args = _normalise_args(num_images, seed, image_size, splits, questions_per_image, text_encoder, text_kind,
                           min_objects, max_objects, answer_noise, text_pretrain_steps)
    out_dir = Path(out_dir)
    with _lock(out_dir):
        return _generate_locked(out_dir, args)


def _is_complete(out_dir: Path, args: dict[str, Any]) -> bool:
    try:
        meta = json.loads((out_dir / META_FILE).read_text())
        if meta.get("version") != SHAPES_VERSION or meta.get("args") != args:
            return False
        splits = [s for s, _ in args["splits"]]
        files = [SCENES_FILE, KARPATHY_FILE, f"{PATCH_LABELS_DIR}/classes.json"] + [questions_filename(s) for s in splits]
        files += [annotations_filename(s) for s in splits]
        if args["text_encoder"]:
            files += [f"{TEXT_ENCODER_DIR}/config.json", f"{TEXT_ENCODER_DIR}/tokenizer_config.json"]
        if not all((out_dir / f).is_file() for f in files):
            return False
        scenes = json.loads((out_dir / SCENES_FILE).read_text())["images"]
        if len(scenes) != args["num_images"]:
            return False
        return all(
            (out_dir / "images" / s["folder"] / s["file_name"]).is_file()
            and (out_dir / "masks" / s["folder"] / s["mask_file"]).is_file()
            for s in scenes
        )
    except (OSError, ValueError, KeyError, TypeError):
        return False


def ensure_shapes(out_dir: str | Path, **kwargs) -> ShapesWorld:
    """Like :func:`generate_shapes`, but reuses ``out_dir`` when its meta matches the arguments
    (and version) and no file is missing."""
    params = list(inspect.signature(generate_shapes).parameters.values())[1:]
    defaults = {p.name: p.default for p in params}
    unknown = set(kwargs) - set(defaults)
    if unknown:
        raise TypeError(f"unexpected arguments {sorted(unknown)}")
    args = _normalise_args(**{**defaults, **kwargs})
    out_dir = Path(out_dir)
    with _lock(out_dir):
        if _is_complete(out_dir, args):
            return ShapesWorld.load(out_dir)
        return _generate_locked(out_dir, args)


# --------------------------------------------------------------------------- attention targets
@functools.lru_cache(maxsize=8)
def _index(root: str, mtime_ns: int) -> tuple[dict[int, str], dict[int, dict]]:
    """(image_id → image folder, question_id → question entry) of a world."""
    world = ShapesWorld.load(root)
    folders = {s["image_id"]: s["folder"] for s in json.loads(world.scenes_path.read_text())["images"]}
    questions = {}
    for split in world.splits:
        for q in json.loads(world.questions_path(split).read_text())["questions"]:
            questions[q["question_id"]] = q
    return folders, questions


def target_mask(world: ShapesWorld | str | Path, question: dict | int, others: bool = False) -> np.ndarray:
    """Boolean ``H×W`` mask: union of the visible pixels of the question's target objects (``others``:
    of the image's other objects, the control a question-specific map should not prefer).

    ``question`` is a question entry (with ``image_id`` and ``target_objects``, or just a
    ``question_id``) or a question id. Empty (all False) for questions without targets, e.g.
    "is there a ...?" answered no.
    """
    root = Path(world.root if isinstance(world, ShapesWorld) else world)
    folders, questions = _index(str(root.resolve()), (root / META_FILE).stat().st_mtime_ns)
    if isinstance(question, dict) and "target_objects" in question and "image_id" in question:
        entry = question
    else:
        qid = question["question_id"] if isinstance(question, dict) else int(question)
        entry = questions[qid]
    image_id = int(entry["image_id"])
    labels = np.asarray(Image.open(root / "masks" / folders[image_id] / f"{image_id:012d}.png"))
    targets = np.isin(labels, [int(i) + 1 for i in entry["target_objects"]])
    return (labels > 0) & ~targets if others else targets


__all__ = [
    "COLORS",
    "SHAPES",
    "SIZES",
    "RELATIONS",
    "ShapesWorld",
    "annotations_filename",
    "ensure_shapes",
    "generate_shapes",
    "image_filename",
    "image_folder",
    "karpathy_split",
    "patch_label_classes",
    "questions_filename",
    "relation",
    "target_mask",
]
