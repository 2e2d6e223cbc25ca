"""A Shapes scene: a light background and 2-5 coloured shapes drawn in ``index`` order (a later one covers an
earlier one, each keeps ``MIN_VISIBLE`` of its pixels), with the label map and the objects' attributes; and the
spatial relations between objects, decided on their nominal centres with a margin (ambiguous pairs: ``None``)."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["COLORS", "RELATIONS", "SHAPES", "SIZES", "make_scene", "relation"]

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


def make_scene(rng: np.random.Generator, size: int, min_objects: int, max_objects: int):
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


def relation(a: dict, b: dict, rel: str, margin: float) -> bool | None:
    """Is ``a`` ``rel`` ``b``? True (clearly), False (clearly not) or None (ambiguous: never asked)."""
    (ax, ay), (bx, by) = a["center"], b["center"]
    d = {"left of": bx - ax, "right of": ax - bx, "above": by - ay, "below": ay - by}[rel]
    if d >= margin:
        return True
    if d <= 0:
        return False
    return None
