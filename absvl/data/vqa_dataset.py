"""The torch side of VQA: examples as training/evaluation items (soft targets, unreadable images set aside)
and their collation into model batches."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..images import DEFAULT_MAX_PIXELS, BadImageError
from .answers import soft_targets
from .patch_labels import patch_targets
from .vqa_examples import VQAExample

__all__ = ["VQACollator", "VQADataset"]

MASK_CELL = 8  # pixels per patch cell when an object label map is put on the backbone's grid


class VQADataset(torch.utils.data.Dataset):
    """Torch dataset of VQA examples: image tensor, question, soft targets, question id.

    Args:
        examples: from ``load_vqa_split``/``load_vqa_hf``.
        answer_to_index: answer string → index (or the answer list itself).
        transform: PIL RGB image → tensor (``image_transform``).
        drop_unanswerable: drop annotated questions none of whose answers is in the vocabulary
            (training, SPEC §6); their number is ``num_dropped``. Unannotated questions are kept.
        max_pixels: decompression-bomb limit for ``open_image``.
        object_masks: for data that knows its objects (the Shapes world): (image path, image id) → the image's object
            label map (0 background, ``k + 1`` object ``k``), read into ``patch_objects`` (each patch's
            owner on the ``grid``, ``absvl.data.patch_labels.patch_targets``) and ``target_labels`` (the labels
            of the question's ``target_objects``): the object-level prior loss's data.
        grid: the backbone's patch grid ``(h, w)`` at the transform's image size, with ``object_masks``.
        group_size: training order (``EpochOrder``): up to this many questions of one image next to each other,
            so that a batch holds several questions per image and runs each image's first pass once
            (``VQACollator``'s ``image_index``); 1: every question shuffled on its own.

    An unreadable image never raises: the item is ``{"error": reason, "question_id", "image_path"}``
    and ``VQACollator`` drops it from the batch and lists it in ``batch["skipped"]``. An item whose image is the
    previous item's reuses its decoded tensors (with RandAugment: its augmentation too, as ``VQACollator`` does).
    """

    def __init__(
        self,
        examples: Sequence[VQAExample],
        answer_to_index: Mapping[str, int] | Sequence[str],
        transform: Callable[[Any], torch.Tensor],
        drop_unanswerable: bool = True,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        object_masks: Callable[[str, int], Path] | None = None,
        grid: tuple[int, int] | None = None,
        group_size: int = 1,
    ) -> None:
        if group_size < 1:
            raise ValueError(f"group_size={group_size} must be >= 1")
        self.group_size = group_size
        self._last_image: tuple[str, dict[str, Any]] | None = None  # (path, decoded) of the last item's image
        if object_masks is not None and grid is None:
            raise ValueError("object_masks need the backbone's patch grid")
        self.object_masks, self.grid = object_masks, grid
        if not isinstance(answer_to_index, Mapping):
            answer_to_index = {a: i for i, a in enumerate(answer_to_index)}
        self.answer_to_index = answer_to_index
        self.transform = transform
        self.max_pixels = max_pixels
        self.examples: list[VQAExample] = []
        self.targets: list[dict[int, float]] = []
        self.dropped_question_ids: list[int] = []
        for ex in examples:
            targets = dict(soft_targets(ex.answers, answer_to_index)) if ex.answers is not None else {}
            if drop_unanswerable and ex.answers is not None and not targets:
                self.dropped_question_ids.append(ex.question_id)
                continue
            self.examples.append(ex)
            self.targets.append(targets)

    @property
    def group_keys(self) -> list[str]:
        """Each item's image (its path), the key ``EpochOrder`` groups by."""
        return [ex.image_path for ex in self.examples]

    @property
    def num_dropped(self) -> int:
        return len(self.dropped_question_ids)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        ex = self.examples[index]
        pixels = self._last_image[1] if self._last_image and self._last_image[0] == ex.image_path else None
        if pixels is None:  # an image's questions come one after another in a grouped order: decode it once
            pixels = self._read_image(ex)
            if "error" in pixels:
                return pixels
            self._last_image = (ex.image_path, pixels)
        item = {
            **pixels,
            "question": ex.question,
            "targets": dict(self.targets[index]),
            "question_id": ex.question_id,
            "image_key": ex.image_path,
            "prior_positive": not ex.says_absent,
        }
        if self.object_masks is not None:
            item["target_labels"] = [int(i) + 1 for i in ex.target_objects or ()]
        return item

    def _read_image(self, ex: VQAExample) -> dict[str, Any]:
        """``{"image"}`` (and ``{"patch_objects"}`` with ``object_masks``) of ``ex``'s image, or the item of an
        unreadable one."""
        try:
            image = ex.open_image(self.max_pixels)
        except BadImageError as exc:
            return {"error": exc.reason, "question_id": ex.question_id, "image_path": exc.path}
        pixels = {"image": self.transform(image)}
        if self.object_masks is not None:
            path, (h, w) = self.object_masks(ex.image_path, ex.image_id), self.grid
            try:  # the label map on the patch grid, MASK_CELL pixels a cell
                with Image.open(path) as mask:
                    labels = np.asarray(mask.resize((w * MASK_CELL, h * MASK_CELL), Image.Resampling.NEAREST))
            except OSError as exc:
                reason = f"unreadable object mask {path} ({exc})"
                return {"error": reason, "question_id": ex.question_id, "image_path": str(path)}
            pixels["patch_objects"] = torch.from_numpy(patch_targets(labels, MASK_CELL, int(labels.max()) + 1))
        return pixels


class VQACollator:
    """Items of ``VQADataset`` → a model batch.

    Returns ``images [U,3,S,S]`` (each distinct image of the batch once, in the order of its first question),
    ``image_index [B]`` (row i's image in ``images``: the model runs each image's first pass once, see
    ``AbsVLModel.forward``), ``input_ids``/``attention_mask [B,T]`` (padded to the longest,
    truncated to ``max_text_len``), ``vqa_targets [B, num_answers]`` (dense soft scores; zero rows
    for unannotated questions), ``question_ids [B]``, ``prior_positive [B]`` (bool: the pair is a positive
    of the prior loss, i.e. its answer does not say the named object is absent, ``VQAExample.says_absent``),
    ``questions`` (list of str), with a dataset's ``object_masks`` also ``patch_objects [B, h·w]`` (each
    patch's object label, 0 background) and ``target_objects [B, K]`` (bool: label k is one of the question's
    objects; K = the batch's largest label + 1) and ``pointer_objects [B, 2]`` (the labels of the last and the
    first of the question's objects, 0 for none: where the VQA head's object pointers should land), and ``skipped``:
    ``[(question_id, image_path, reason), ...]`` for the items whose image could not be read. If
    every item was bad the batch has ``B = 0`` (the trainer skips it; ``images`` is
    ``[0,3,S,S]`` with ``S = image_size`` or 0 when not given).

    Questions of one image are one image when their items say so (``image_key``, the image's path): with
    RandAugment the first question's augmented image serves the others.
    """

    def __init__(self, tokenizer: Any, num_answers: int, max_text_len: int = 40, image_size: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.num_answers = int(num_answers)
        self.max_text_len = int(max_text_len)
        self.image_size = image_size

    def __call__(self, items: Sequence[dict[str, Any] | None]) -> dict[str, Any]:
        good = [it for it in items if it is not None and "error" not in it]
        bad = [it for it in items if it is not None and "error" in it]
        skipped = [(it["question_id"], it["image_path"], it["error"]) for it in bad]
        n = len(good)
        targets = torch.zeros(n, self.num_answers, dtype=torch.float32)
        for row, it in enumerate(good):
            for index, score in it["targets"].items():
                if not 0 <= index < self.num_answers:
                    raise IndexError(
                        f"answer index {index} of question {it['question_id']} is outside "
                        f"the {self.num_answers} answers"
                    )
                targets[row, index] = float(score)
        questions = [it["question"] for it in good]
        rows: dict[Any, int] = {}  # image key → its row in images
        distinct: list[torch.Tensor] = []
        for row, it in enumerate(good):
            key = it.get("image_key", row)
            if key not in rows:
                rows[key] = len(distinct)
                distinct.append(it["image"])
        image_index = torch.tensor([rows[it.get("image_key", row)] for row, it in enumerate(good)], dtype=torch.long)
        if n:
            images = torch.stack(distinct)
            enc = self.tokenizer(
                questions, padding="longest", truncation=True, max_length=self.max_text_len, return_tensors="pt"
            )
            input_ids, attention_mask = enc["input_ids"], enc["attention_mask"]
        else:
            size = self.image_size or 0
            images = torch.zeros(0, 3, size, size)
            input_ids = torch.zeros(0, 0, dtype=torch.long)
            attention_mask = torch.zeros(0, 0, dtype=torch.long)
        batch = {
            "images": images,
            "image_index": image_index,
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "vqa_targets": targets,
            "question_ids": torch.tensor([it["question_id"] for it in good], dtype=torch.long),
            "prior_positive": torch.tensor([it["prior_positive"] for it in good], dtype=torch.bool),
            "questions": questions,
            "skipped": skipped,
        }
        if n and "patch_objects" in good[0]:
            patch_objects = torch.stack([it["patch_objects"] for it in good])
            labels = max([int(patch_objects.max()), *(max(it["target_labels"], default=0) for it in good)]) + 1
            target_objects = torch.zeros(n, labels, dtype=torch.bool)
            for row, it in enumerate(good):
                target_objects[row, it["target_labels"]] = True
            # the object pointers' hops (``pointer_loss``): hop 1 on the last object the question names (a relation's
            # reference), hop 2 on the first (the object related to it); 0 for a question that names none
            pointer_objects = torch.tensor(
                [[it["target_labels"][-1], it["target_labels"][0]] if it["target_labels"] else [0, 0] for it in good],
                dtype=torch.long,
            )
            batch.update(patch_objects=patch_objects, target_objects=target_objects, pointer_objects=pointer_objects)
        return batch
