"""Inference pipelines (Hugging Face ``pipeline`` conventions): ``absvl.pipeline(task, model=...)``.

Tasks:
    ``vqa``        ``(image, question, top_k=5)`` → ``[{"answer", "score"}]`` (sigmoid scores, best first).
    ``attention``  ``(image, text)`` → ``{"bottom_up": array, "top_down": array}`` token-norm maps
                   (AbSViT Fig. 4/6) on the patch grid, or at the image's size with ``upsample=True``.
One input gives one result; a list gives a list, computed ``batch_size`` pairs at a time (the
pipeline's, or the call's). Lists are a list of images with an equal-length list of texts, one image
with a list of texts, or a list of ``{"image", "question"}`` (``{"image", "text"}``) dicts.
:func:`answer_file` answers a JSONL / CSV file of (image, question) pairs (``absvl predict vqa-file``).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .images import BadImageError
from .io import atomic_file
from .models.vl import AbsVLForQuestionAnswering, AbsVLModel, load_model
from .models.vl.processing import ImageInput, load_image


def _pair_up(images: Any, texts: Any, key: str) -> tuple[list[Any], list[str], bool]:
    """(images, texts, batched): dicts ``{"image", key}`` split; one image broadcast over several texts;
    lists must match in length."""
    if texts is None:
        batched = isinstance(images, (list, tuple))
        pairs = list(images) if batched else [images]
        if not all(isinstance(p, dict) for p in pairs):
            raise ValueError(f"give an image and a {key}, or {{'image': ..., '{key}': ...}} dicts")
        return [p["image"] for p in pairs], [p[key] for p in pairs], batched
    batched = isinstance(texts, (list, tuple))
    texts = list(texts) if batched else [texts]
    images = list(images) if isinstance(images, (list, tuple)) else [images] * len(texts)
    if len(images) != len(texts):
        raise ValueError(f"got {len(images)} images for {len(texts)} texts")
    return images, texts, batched


class _Pipeline:
    text_key = "text"

    def __init__(
        self, model: AbsVLModel | str | Path, device: str | torch.device | None = None, batch_size: int = 8
    ) -> None:
        if not isinstance(model, AbsVLModel):
            model = load_model(model)
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model = model.to(self.device).eval()
        self.batch_size = batch_size

    @torch.no_grad()
    def _batched(self, images: Any, texts: Any, batch_size: int | None, **kwargs: Any) -> Any:
        """The subclass's ``_forward(images, texts, **kwargs)`` over the pairs, ``batch_size`` at a time;
        one result for one input."""
        images, texts, batched = _pair_up(images, texts, self.text_key)
        size = batch_size or self.batch_size
        results = []
        for start in range(0, len(texts), size):
            results += self._forward(images[start : start + size], texts[start : start + size], **kwargs)
        return results if batched else results[0]


class VQAPipeline(_Pipeline):
    """Answers questions about images with the model's VQA head."""

    text_key = "question"

    def __init__(
        self, model: AbsVLModel | str | Path, device: str | torch.device | None = None, batch_size: int = 8
    ) -> None:
        super().__init__(model, device, batch_size)
        if not isinstance(self.model, AbsVLForQuestionAnswering):
            raise ValueError(
                f"the vqa pipeline needs a VQA model (AbsVLForQuestionAnswering), not {type(self.model).__name__}: "
                "give the folder of a model trained with absvl train vqa"
            )

    def __call__(
        self,
        image: ImageInput | Sequence[ImageInput] | dict | Sequence[dict],
        question: str | Sequence[str] | None = None,
        top_k: int = 5,
        batch_size: int | None = None,
    ) -> list[dict[str, Any]] | list[list[dict[str, Any]]]:
        """The ``top_k`` answers of each (image, question) pair."""
        return self._batched(image, question, batch_size, top_k=top_k)

    def _forward(self, images: list[Any], questions: list[str], top_k: int) -> list[list[dict[str, Any]]]:
        batch = self.model.prepare_inputs(images=images, text=questions)
        scores = self.model(batch["images"], batch["input_ids"], batch["attention_mask"]).vqa_logits.sigmoid()
        top = scores.topk(min(top_k, scores.shape[1]), dim=-1)
        return [
            [{"answer": self.model.answers[i], "score": float(s)} for s, i in zip(values.tolist(), indices.tolist())]
            for values, indices in zip(top.values, top.indices)
        ]


class AttentionMapPipeline(_Pipeline):
    """Bottom-up and top-down (text-steered) attention maps of the vision backbone."""

    def __call__(
        self,
        image: ImageInput | Sequence[ImageInput] | dict | Sequence[dict],
        text: str | Sequence[str] | None = None,
        upsample: bool = False,
        batch_size: int | None = None,
    ) -> dict[str, np.ndarray] | list[dict[str, np.ndarray]]:
        """``upsample``: bilinear-resize the maps to each input image's height × width."""
        return self._batched(image, text, batch_size, upsample=upsample)

    def _forward(self, images: list[Any], texts: list[str], upsample: bool) -> list[dict[str, np.ndarray]]:
        batch = self.model.prepare_inputs(images=images, text=texts)
        maps = self.model.attention_maps(batch["images"], batch["input_ids"], batch["attention_mask"])
        results = []
        for i, im in enumerate(images):
            sample = {k: v[i : i + 1].float() for k, v in maps.items()}
            if upsample:
                width, height = load_image(im).size
                size = (height, width)
                sample = {k: F.interpolate(v[:, None], size, mode="bilinear")[:, 0] for k, v in sample.items()}
            results.append({k: v[0].cpu().numpy() for k, v in sample.items()})
        return results


PIPELINES = {"vqa": VQAPipeline, "attention": AttentionMapPipeline}


def _read_pairs(path: Path) -> list[dict[str, Any]]:
    """The rows of a JSONL or CSV (with a header) file; each must have ``image`` and ``question``."""
    with path.open(newline="", encoding="utf-8") as f:
        if path.suffix.lower() == ".csv":
            rows = list(csv.DictReader(f))
        else:
            rows = [json.loads(line) for line in f if line.strip()]
    for n, row in enumerate(rows, 1):
        if not (isinstance(row, dict) and row.get("image") and row.get("question")):
            raise ValueError(f"{path}: row {n} needs an 'image' and a 'question': {row}")
    return rows


def answer_file(
    vqa: VQAPipeline, pairs: str | Path, out: str | Path, batch_size: int | None = None, progress: bool = True
) -> dict[str, Any]:
    """Answer a JSONL or CSV file of (``image``, ``question``) rows into ``out``: JSONL, or CSV for a
    ``.csv`` path; each row as given (other fields kept) with the top ``answer`` and its ``score``.

    Image paths are relative to the file's folder. Rows whose image cannot be read are left out.
    Returns ``{"answered": n, "skipped": [(image path, reason), ...]}``.
    """
    pairs, out = Path(pairs), Path(out)
    rows = _read_pairs(pairs)
    size = batch_size or vqa.batch_size
    answered, skipped = [], []
    with tqdm(total=len(rows), unit="question", desc=f"answering {pairs.name}", disable=not progress) as bar:
        for start in range(0, len(rows), size):
            batch = []
            for row in rows[start : start + size]:
                try:
                    batch.append((row, load_image(pairs.parent / str(row["image"]))))
                except BadImageError as err:
                    skipped.append((str(err.path), err.reason))
            if batch:
                results = vqa([im for _, im in batch], [row["question"] for row, _ in batch], top_k=1, batch_size=size)
                answered += [{**row, **top[0]} for (row, _), top in zip(batch, results)]
            bar.update(len(rows[start : start + size]))
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out) as tmp, tmp.open("w", newline="", encoding="utf-8") as f:
        if out.suffix.lower() == ".csv":
            writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for row in answered for k in row)))
            writer.writeheader()
            writer.writerows(answered)
        else:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in answered)
    return {"answered": len(answered), "skipped": skipped}


def pipeline(
    task: str, model: AbsVLModel | str | Path, device: str | torch.device | None = None, batch_size: int = 8
) -> _Pipeline:
    """Build an inference pipeline for ``task`` (``vqa`` or ``attention``) on a model or a saved folder /
    Hub id; lists of inputs are computed ``batch_size`` pairs at a time."""
    if task not in PIPELINES:
        raise ValueError(f"unknown task {task!r}; available: {', '.join(PIPELINES)}")
    return PIPELINES[task](model, device, batch_size)
