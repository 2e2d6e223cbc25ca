"""Generating a Shapes world, deterministically from its arguments and seed, published atomically under a lock.

``generate_shapes`` always writes; ``ensure_shapes`` reuses a complete world made with the same arguments. What the
world holds: data/README.md. Either writes only into a folder of its own: a new one (whose parent exists), an empty
one, or a Shapes world's (which it replaces); anything else is refused before a byte is written, and a generation
says on stderr where it writes.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import shutil
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..errors import InputTypeError
from ..io import atomic_folder
from ..models.vl.tiny_text import build_tiny_text_encoder
from .patch_labels import ATTRIBUTES_FILE
from .shapes_scene import COLORS, make_scene
from .shapes_text import BALANCE_GROUP, FAMILIES, captions, human_answers, question_candidates, tokens
from .shapes_world import (
    KARPATHY_FILE,
    META_FILE,
    PATCH_LABELS_DIR,
    SCENES_FILE,
    TEXT_ENCODER_DIR,
    ShapesWorld,
    annotations_filename,
    image_filename,
    image_folder,
    karpathy_split,
    patch_label_attributes,
    patch_label_classes,
    questions_filename,
)

__all__ = ["DEFAULT_SPLITS", "ensure_shapes", "generate_shapes"]

SHAPES_VERSION = "4"  # 3: patch_labels/attributes.json; 4: patch labels name the object's size

DEFAULT_SPLITS = (("train2014", 0.8), ("val2014", 0.1), ("test-dev2015", 0.1))

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
        f.write(json.dumps(obj))  # json.dumps encodes in C; json.dump streams through the pure-Python encoder


def _write_world(root: Path, args: dict[str, Any]) -> dict[str, Any]:
    """Writes every file except the meta into ``root`` (an empty folder). Returns the counts."""
    seed, size, noise = args["seed"], args["image_size"], args["answer_noise"]
    margin = max(2.0, round(0.1 * size))
    split_counts = [(s, c) for s, c in args["splits"]]
    total = args["num_images"]
    image_ids = np.random.default_rng([seed, 2]).choice(599_999, size=total, replace=False) + 1
    q_rng = np.random.default_rng([seed, 1])
    balance: dict[str, Counter] = {f: Counter() for f in FAMILIES}
    for family, group in BALANCE_GROUP.items():
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
            image, labels, objects, bg_kind = make_scene(scene_rng, size, args["min_objects"], args["max_objects"])
            fname = image_filename(folder, image_id)
            Image.fromarray(image).save(root / "images" / folder / fname, format="JPEG", quality=95, subsampling=0)
            mask_file = f"{image_id:012d}.png"
            Image.fromarray(labels).save(root / "masks" / folder / mask_file, format="PNG")
            scenes.append(
                dict(
                    image_id=image_id,
                    split=split,
                    folder=folder,
                    file_name=fname,
                    mask_file=mask_file,
                    width=size,
                    height=size,
                    background=bg_kind,
                    objects=objects,
                )
            )

            # questions: cycle over the families in a random order, balancing answers greedily
            used: set[str] = set()
            order = [FAMILIES[int(i)] for i in q_rng.permutation(len(FAMILIES))]
            cands = {f: question_candidates(objects, f, margin, q_rng) for f in FAMILIES}
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
                        {
                            "image_id": image_id,
                            "question": cand["question"],
                            "question_id": qid,
                            "target_objects": cand["targets"],
                        }
                    )
                    annotations[split].append(
                        {
                            "question_id": qid,
                            "image_id": image_id,
                            "question_type": cand["qtype"],
                            "answer_type": cand["atype"],
                            "multiple_choice_answer": answer,
                            "answers": human_answers(answer, noise, q_rng),
                        }
                    )
                    corpus.update((cand["question"], answer))
                    if karpathy_split(split) == "train":
                        lm_texts.append(cand["question"])
                    k += 1
                    progressed = True
                if not progressed:
                    break

            caps = captions(objects, bg_kind, margin, np.random.default_rng([seed, 3, idx]))
            corpus.update(caps)
            if karpathy_split(split) == "train":
                lm_texts.extend(caps)
            sentids = list(range(sentid, sentid + len(caps)))
            sentid += len(caps)
            karpathy_images.append(
                {
                    "filepath": folder,
                    "sentids": sentids,
                    "filename": fname,
                    "imgid": idx,
                    "split": karpathy_split(split),
                    "cocoid": image_id,
                    "sentences": [
                        {"tokens": tokens(c), "raw": c, "imgid": idx, "sentid": s} for c, s in zip(caps, sentids)
                    ],
                }
            )
            idx += 1

    for split, _ in split_counts:
        _dump(
            root / questions_filename(split),
            {
                "info": VQA_INFO,
                "task_type": "Open-Ended",
                "data_type": "mscoco",
                "license": VQA_LICENSE,
                "data_subtype": split,
                "questions": questions[split],
            },
        )
        _dump(
            root / annotations_filename(split),
            {
                "info": VQA_INFO,
                "license": VQA_LICENSE,
                "data_type": "mscoco",
                "data_subtype": split,
                "annotations": annotations[split],
            },
        )
    _dump(
        root / SCENES_FILE,
        {"version": SHAPES_VERSION, "image_size": size, "relation_margin": margin, "colors": COLORS, "images": scenes},
    )
    _dump(root / KARPATHY_FILE, {"images": karpathy_images, "dataset": "shapes"})
    _write_patch_labels(root, scenes)
    if args["text_encoder"]:
        build_tiny_text_encoder(
            root / TEXT_ENCODER_DIR,
            kind=args["text_kind"],
            corpus=sorted(corpus),
            seed=seed,
            pretrain_texts=lm_texts,
            pretrain_steps=args["text_pretrain_steps"],
        )
    return dict(images={s: c for s, c in split_counts}, questions={s: len(questions[s]) for s, _ in split_counts})


def _write_patch_labels(root: Path, scenes: list[dict]) -> None:
    """``root/patch_labels``: the train and val images (hard links) with class-index maps whose classes
    are ``patch_label_classes()`` — the vision encoder's pretraining data (``absvl.data.patch_labels``)."""
    classes = patch_label_classes()
    out = root / PATCH_LABELS_DIR
    out.mkdir()
    _dump(out / "classes.json", classes)
    _dump(out / ATTRIBUTES_FILE, patch_label_attributes())
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
            lookup[obj["label"]] = classes.index(f"{obj['size']} {obj['color']} {obj['shape']}")
        mask = np.asarray(Image.open(root / "masks" / scene["folder"] / scene["mask_file"]))
        Image.fromarray(lookup[mask]).save(labels / f"{Path(scene['file_name']).stem}.png")


def _check_target(out_dir: Path) -> str:
    """Refuse, before anything is written, a folder that is not the generator's to write: a file, a non-empty folder
    that is no Shapes world, or a new folder whose parent does not exist either (a misspelt ``data.root`` would
    otherwise get a world, and its lock beside it, wherever it points). Returns what the folder is now."""
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} is a file: a Shapes world is generated into a folder of its own")
    if out_dir.is_dir():
        if (out_dir / META_FILE).exists():
            return "replacing the Shapes world there"
        if any(out_dir.iterdir()):
            raise FileExistsError(
                f"{out_dir} exists, is not empty and is not a Shapes world; refusing to write into it (a Shapes world "
                "is generated into an empty folder or its own: is the path, e.g. data.root, misspelt?)"
            )
        return "an empty folder"
    if not out_dir.parent.is_dir():
        raise FileNotFoundError(
            f"{out_dir} does not exist, nor does its parent {out_dir.parent}: is the path (e.g. data.root) misspelt? "
            f"A Shapes world is generated into an empty folder or its own; create {out_dir.parent} first to generate "
            "one there"
        )
    return "a new folder"


@contextlib.contextmanager
def _lock(out_dir: Path):
    """An exclusive lock (POSIX only) so that concurrent callers do not race: on the folder that holds ``out_dir``,
    which the staging folder shares, so that no lock file is left beside the world."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    fd = os.open(out_dir.parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _generate_locked(out_dir: Path, args: dict[str, Any]) -> ShapesWorld:
    state = _check_target(out_dir)  # again, under the lock: another process may have written meanwhile
    print(
        f"generating a Shapes world ({args['num_images']} images, seed {args['seed']}) in {out_dir.resolve()} "
        f"({state})",
        file=sys.stderr,
        flush=True,
    )
    for stale in out_dir.parent.glob(f".{out_dir.name}.tmp-*"):  # staging folders of absvl <= 0.2
        shutil.rmtree(stale, ignore_errors=True)
    with atomic_folder(out_dir, clean_stale=True) as staging:  # we hold the lock: we are the one writer
        counts = _write_world(staging, args)
        _dump(staging / META_FILE, {"version": SHAPES_VERSION, "args": args, **counts})
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
    args = _normalise_args(
        num_images,
        seed,
        image_size,
        splits,
        questions_per_image,
        text_encoder,
        text_kind,
        min_objects,
        max_objects,
        answer_noise,
        text_pretrain_steps,
    )
    out_dir = Path(out_dir)
    _check_target(out_dir)
    with _lock(out_dir):
        return _generate_locked(out_dir, args)


def _is_complete(out_dir: Path, args: dict[str, Any]) -> bool:
    """Whether ``out_dir`` holds the world these arguments (and this generator's version) make, whole."""
    try:
        world = ShapesWorld.load(out_dir)
        if world.version != SHAPES_VERSION or world.args != args:
            return False
        splits = [s for s, _ in args["splits"]]
        files = [world.scenes_path, world.karpathy_path, world.root / PATCH_LABELS_DIR / "classes.json"]
        files += [world.questions_path(s) for s in splits] + [world.annotations_path(s) for s in splits]
        if world.text_encoder_dir is not None:
            files += [world.text_encoder_dir / "config.json", world.text_encoder_dir / "tokenizer_config.json"]
        if not all(f.is_file() for f in files):
            return False
        scenes = world.load_scenes().values()
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
        raise InputTypeError(f"unexpected arguments {sorted(unknown)}")
    args = _normalise_args(**{**defaults, **kwargs})
    out_dir = Path(out_dir)
    _check_target(out_dir)
    with _lock(out_dir):
        if _is_complete(out_dir, args):
            return ShapesWorld.load(out_dir)
        return _generate_locked(out_dir, args)
