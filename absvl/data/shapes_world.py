"""A generated Shapes world on disk: its file names (the VQAv2 and Karpathy conventions), ``ShapesWorld`` to find
and read them, the patch-label classes and the target masks of questions. What each file holds: data/README.md."""

from __future__ import annotations

import functools
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..io import read_json
from .shapes_scene import COLORS, SHAPES, SIZES
from .shapes_text import caption_foil

__all__ = [
    "PATCH_LABELS_DIR",
    "ShapesWorld",
    "annotations_filename",
    "image_filename",
    "image_folder",
    "karpathy_split",
    "patch_label_attributes",
    "patch_label_classes",
    "questions_filename",
    "target_mask",
]

KARPATHY_FILE = "dataset_shapes.json"
SCENES_FILE = "scenes.json"
META_FILE = "shapes_meta.json"
TEXT_ENCODER_DIR = "text_encoder"
PATCH_LABELS_DIR = "patch_labels"


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
    version: str = ""  # of the generator that wrote it

    @staticmethod
    def exists(root: str | Path) -> bool:
        """Whether ``root`` holds a generated world (a dataset folder of another kind does not)."""
        return (Path(root) / META_FILE).is_file()

    @classmethod
    def load(cls, root: str | Path) -> ShapesWorld:
        root = Path(root)
        meta = read_json(root / META_FILE, what="a Shapes world's meta file")
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
            version=meta.get("version", ""),
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

    @functools.cached_property
    def relation_margin(self) -> float:
        """Pixels by which centres must differ for a spatial relation to hold (its questions' margin); read once."""
        return float(read_json(self.scenes_path, what="a Shapes world's scenes")["relation_margin"])

    def mask_of(self, image_path: str | Path, image_id: int) -> Path:
        """The object label map of the world's image ``image_path`` (of any split)."""
        return self.root / "masks" / Path(image_path).parent.name / f"{int(image_id):012d}.png"

    def load_scenes(self) -> dict[int, dict]:
        """image_id → scene (``split``, ``folder``, ``objects``, ...)."""
        return {s["image_id"]: s for s in read_json(self.scenes_path, what="a Shapes world's scenes")["images"]}

    def scene_objects(self) -> dict[str, list[dict]]:
        """image file name → its scene's objects: what a caption or a retrieval hit is checked against."""
        return {scene["file_name"]: scene["objects"] for scene in self.load_scenes().values()}

    def caption_foils(self) -> Callable[[str | Path, str], str | None]:
        """``foil(image_path, caption)``: a caption of the image changed in one attribute or its relation so that it
        no longer holds for the image's scene (``caption_foil``; None when none can be made), drawn from python's
        ``random`` (which ``EpochOrder`` seeds per item): the world's hard ITM negatives."""
        scenes, margin = self.scene_objects(), self.relation_margin

        def foil(image_path: str | Path, caption: str) -> str | None:
            rng = np.random.default_rng(random.getrandbits(64))
            return caption_foil(caption, scenes[Path(image_path).name], margin, rng)

        return foil


def _object_kinds() -> list[tuple[str, str, str]]:
    return [(size, color, shape) for size in SIZES for color in COLORS for shape in SHAPES]


def patch_label_classes() -> list[str]:
    """The classes of the world's patch labels: ``background``, then every "<size> <color> <shape>" (the
    questions name objects by size too: a patch that knows only its colour and shape cannot tell "the small
    circle" from the large one)."""
    return ["background"] + [" ".join(kind) for kind in _object_kinds()]


def patch_label_attributes() -> dict[str, list[str | None]]:
    """Each patch-label class's size, colour and shape (None for background): the world's ``attributes.json``,
    so that stage 1 is judged by the object patches' shape, colour and size (``absvl.data.patch_labels``)."""
    kinds = _object_kinds()
    return {name: [None] + [kind[k] for kind in kinds] for k, name in enumerate(("size", "color", "shape"))}


@functools.lru_cache(maxsize=8)
def _index(root: str, mtime_ns: int) -> tuple[dict[int, str], dict[int, dict]]:
    """(image_id → image folder, question_id → question entry) of a world."""
    world = ShapesWorld.load(root)
    folders = {s["image_id"]: s["folder"] for s in read_json(world.scenes_path)["images"]}
    questions = {}
    for split in world.splits:
        for q in read_json(world.questions_path(split))["questions"]:
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
