"""Attention pictures: heat-map overlays and the paper's Fig. 4/6 layout (image | bottom-up | top-down).

Used by ``absvl attend``, the demo, the web service and the comparison script.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from .io import atomic_file
from .models.vl import AbsVLForQuestionAnswering
from .models.vl.processing import ImageInput, load_image

LABEL_HEIGHT = 34
LABEL_CHARS = 34  # characters per label line at the default panel width


def heatmap(values: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """An RGB heat map (blue = low, orange = high) of a 2-D map, min-max scaled, resized to ``(width, height)``."""
    values = np.asarray(values, dtype=np.float32)
    v = (values - values.min()) / (values.max() - values.min() + 1e-8)
    gray = Image.fromarray((v * 255).astype(np.uint8)).resize(size, Image.Resampling.BILINEAR)
    g = np.asarray(gray, dtype=np.float32) / 255
    return Image.fromarray((np.stack([g, g * 0.6, 1 - g], -1) * 255).astype(np.uint8))


def overlay(image: Image.Image, values: np.ndarray, strength: float = 0.55) -> Image.Image:
    """``image`` blended with the heat map of ``values`` (any grid; resized to the image)."""
    image = image.convert("RGB")
    return Image.blend(image, heatmap(values, image.size), strength)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _wrap(label: str, width: int = LABEL_CHARS, lines: int = 2) -> str:
    out, line = [], ""
    for word in label.split():
        if line and len(line) + 1 + len(word) > width:
            out.append(line)
            line = ""
        line = f"{line} {word}".strip()
    out.append(line)
    return "\n".join(out[:lines])


def side_by_side(panels: Sequence[tuple[Image.Image, str]], size: int = 224) -> Image.Image:
    """Square panels in a row, each with a (wrapped, two-line) label above it."""
    canvas = Image.new("RGB", (size * len(panels), size + LABEL_HEIGHT), "white")
    draw = ImageDraw.Draw(canvas)
    for k, (panel, label) in enumerate(panels):
        canvas.paste(panel.resize((size, size), Image.Resampling.NEAREST), (k * size, LABEL_HEIGHT))
        draw.multiline_text((k * size + 4, 2), _wrap(label), fill="black")
    return canvas


@torch.no_grad()
def attention_figure(
    model: Any, image: ImageInput, texts: Sequence[str], out_png: str | Path | None = None, size: int = 224
) -> tuple[Image.Image, dict[str, Any]]:
    """The image, its bottom-up map, one top-down map per text (AbSViT Fig. 4/6 layout) and, for a
    backbone with a prior, the gate ``clamp(cos(ξ, z_i), 0, 1)`` each text opens (what ξ selects).

    A model with a VQA head labels each top-down panel with its answer. Returns the picture
    (also written to ``out_png`` when given) and ``{"bottom_up": map, "top_down": [maps],
    "gate": [maps] | None, "answers": [str] | None}`` on the patch grid.
    """
    texts = list(texts)
    if not texts:
        raise ValueError("attention_figure needs at least one text")
    picture = load_image(image)
    inputs = model.prepare_inputs(images=[picture] * len(texts), text=texts)
    out = model(inputs["images"], inputs["input_ids"], inputs["attention_mask"], return_maps=True)
    maps = out.vision.maps
    bottom_up = maps["bottom_up"][0].float().cpu().numpy()
    top_down = [m.float().cpu().numpy() for m in maps.get("top_down", maps["bottom_up"])]
    gate = None
    if out.vision.prior_mask is not None:
        spatial = out.vision.prior_mask[:, out.vision.num_prefix_tokens :, 0].reshape(len(texts), *bottom_up.shape)
        gate = list(spatial.float().cpu().numpy())
    answers = None
    if isinstance(model, AbsVLForQuestionAnswering):
        answers = [model.answers[i] for i in out.vqa_logits.argmax(-1).tolist()]
    square = picture.resize((size, size), Image.Resampling.BICUBIC)
    panels = [(square, "image"), (overlay(square, bottom_up), "bottom-up")]
    for i, text in enumerate(texts):
        label = f"top-down: {text}" + (f" -> {answers[i]}" if answers else "")
        panels.append((overlay(square, top_down[i]), label))
    for i, text in enumerate(texts if gate is not None else ()):
        panels.append((overlay(square, gate[i]), f"gate: {text}"))
    figure = side_by_side(panels, size)
    if out_png is not None:
        Path(out_png).parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(out_png) as tmp:
            figure.save(tmp)  # the format follows the suffix, which tmp keeps
    return figure, {"bottom_up": bottom_up, "top_down": top_down, "gate": gate, "answers": answers}
