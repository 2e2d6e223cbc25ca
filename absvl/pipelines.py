"""Inference pipelines (Hugging Face ``pipeline`` conventions): ``absvl.pipeline(task, model=...)``.

Tasks:
    ``vqa``        ``(image, question, top_k=5)`` → ``[{"answer", "score"}]`` (sigmoid scores, best first).
    ``attention``  ``(image, text)`` → ``{"bottom_up": array, "top_down": array}`` token-norm maps
                   (AbSViT Fig. 4/6) on the patch grid, or at the image's size with ``upsample=True``.
A list of images with an equal-length list of texts, or one image with a list of texts, gives a
list of results.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .models.vl import AbsVLModel
from .models.vl.processing import ImageInput, load_image


def _pair_up(images: Any, texts: Any) -> tuple[list[Any], list[str], bool]:
    """(images, texts, batched): broadcast one image over several texts; lists must match in length."""
    batched = isinstance(texts, (list, tuple))
    texts = list(texts) if batched else [texts]
    images = list(images) if isinstance(images, (list, tuple)) else [images] * len(texts)
    if len(images) != len(texts):
        raise ValueError(f"got {len(images)} images for {len(texts)} texts")
    return images, texts, batched


class _Pipeline:
    def __init__(self, model: AbsVLModel | str | Path, device: str | torch.device | None = None) -> None:
        if not isinstance(model, AbsVLModel):
            model = AbsVLModel.from_pretrained(model)
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model = model.to(self.device).eval()
        self.processor = model.processor

    def _inputs(self, images: list[Any], texts: list[str]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device) for k, v in self.processor(images=images, text=texts).items()}


class VQAPipeline(_Pipeline):
    """Answers questions about images with the model's VQA head."""

    def __init__(self, model: AbsVLModel | str | Path, device: str | torch.device | None = None) -> None:
        super().__init__(model, device)
        if not self.model.answers:
            raise ValueError("the model has no VQA answer vocabulary (num_answers=0)")

    @torch.no_grad()
    def __call__(
        self, image: ImageInput | Sequence[ImageInput], question: str | Sequence[str], top_k: int = 5
    ) -> list[dict[str, Any]] | list[list[dict[str, Any]]]:
        images, questions, batched = _pair_up(image, question)
        batch = self._inputs(images, questions)
        scores = self.model(batch["images"], batch["input_ids"], batch["attention_mask"]).vqa_logits.sigmoid()
        top = scores.topk(min(top_k, scores.shape[1]), dim=-1)
        results = [
            [{"answer": self.model.answers[i], "score": float(s)} for s, i in zip(values.tolist(), indices.tolist())]
            for values, indices in zip(top.values, top.indices)
        ]
        return results if batched else results[0]


class AttentionMapPipeline(_Pipeline):
    """Bottom-up and top-down (text-steered) attention maps of the vision backbone."""

    @torch.no_grad()
    def __call__(
        self, image: ImageInput | Sequence[ImageInput], text: str | Sequence[str], upsample: bool = False
    ) -> dict[str, np.ndarray] | list[dict[str, np.ndarray]]:
        """``upsample``: bilinear-resize the maps to each input image's height × width."""
        images, texts, batched = _pair_up(image, text)
        batch = self._inputs(images, texts)
        maps = self.model.attention_maps(batch["images"], batch["input_ids"], batch["attention_mask"])
        results = []
        for i, im in enumerate(images):
            sample = {k: v[i : i + 1].float() for k, v in maps.items()}
            if upsample:
                width, height = load_image(im).size
                size = (height, width)
                sample = {k: F.interpolate(v[:, None], size, mode="bilinear")[:, 0] for k, v in sample.items()}
            results.append({k: v[0].cpu().numpy() for k, v in sample.items()})
        return results if batched else results[0]


PIPELINES = {"vqa": VQAPipeline, "attention": AttentionMapPipeline}


def pipeline(task: str, model: AbsVLModel | str | Path, device: str | torch.device | None = None) -> _Pipeline:
    """Build an inference pipeline for ``task`` (``vqa`` or ``attention``) on a model or a saved folder / Hub id."""
    if task not in PIPELINES:
        raise ValueError(f"unknown task {task!r}; available: {', '.join(PIPELINES)}")
    return PIPELINES[task](model, device)
