"""Linear probes of the image tokens a VL model's fusion reads: does an object's token tell its shape, its
colour and where it is?

A Shapes world knows which object owns each patch (its masks). Every patch that an object owns (the
rule of the patch labels, ``absvl.data.patch_labels.patch_targets``) gives one token, labelled with its
object's shape and colour and the patch's grid cell. A ridge-regression classifier (one-hot targets,
closed form) is fitted on the tokens of one set of images and scored on another's: a property that a
linear map cannot read from the tokens is lost to the fusion's first layer too. The same is done for
the bottom-up (first-pass) tokens and for the top-down (second-pass) ones under a question of the
image, so that what the top-down pass keeps and loses shows side by side.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..data.patch_labels import patch_targets
from ..data.shapes_scene import COLORS, SHAPES
from ..images import BadImageError, open_image
from ..io import read_json

PROBED = ("shape", "color", "position")
PASSES = ("bottom_up", "top_down")


def fit_ridge(train_x: torch.Tensor, train_y: torch.Tensor, l2: float = 1e-2) -> Callable[[torch.Tensor], torch.Tensor]:
    """A ridge-regression classifier fitted on features ``[n, C]`` and integer labels ``[n]``: standardised
    features and a bias, one-hot targets, ``l2`` times the number of rows as the ridge. Returns the function
    mapping features ``[m, C]`` to predicted labels ``[m]`` (the argmax of the fitted scores)."""
    x = train_x.double()
    mean, std = x.mean(0), x.std(0).clamp(min=1e-6)

    def design(features: torch.Tensor) -> torch.Tensor:
        z = (features.double() - mean) / std
        return torch.cat([z, torch.ones(len(z), 1, dtype=z.dtype)], 1)

    x = design(train_x)
    targets = torch.nn.functional.one_hot(train_y.long(), int(train_y.max()) + 1).double()
    gram = x.t() @ x + l2 * len(x) * torch.eye(x.shape[1], dtype=x.dtype)
    weights = torch.linalg.solve(gram, x.t() @ targets)
    return lambda features: (design(features) @ weights).argmax(1)


def ridge_probe(
    train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor, l2: float = 1e-2
) -> float:
    """Accuracy (%) on ``test`` of ``fit_ridge`` fitted on ``train`` (features ``[n, C]``, integer labels
    ``[n]``). NaN without train or test rows."""
    if len(test_y) == 0 or len(train_y) == 0:
        return float("nan")
    predict = fit_ridge(train_x, train_y, l2)
    return float(100.0 * (predict(test_x) == test_y.long()).double().mean())


def _image_questions(world: Any, split: str, limit: int | None) -> list[dict[str, Any]]:
    """One question per image of ``split`` (its first in the file), for the first ``limit`` images."""
    chosen: dict[int, dict[str, Any]] = {}
    for q in read_json(world.questions_path(split))["questions"]:
        chosen.setdefault(q["image_id"], q)
        if limit is not None and len(chosen) >= limit:
            break
    return list(chosen.values())


def object_patch_tokens(
    model: Any, world: Any, split: str, limit: int | None = 200, batch_size: int = 50
) -> dict[str, Any]:
    """The normalised tokens the fusion reads (``model.fusion_image_tokens``) of every object-owned patch
    of the first ``limit`` images of ``split``, bottom-up and top-down (under the image's first question),
    with their labels: ``{"bottom_up": [n, C], "top_down": [n, C], "shape": [n], "color": [n],
    "position": [n], "image": [n] (the image id)}``. Unreadable images are left out."""
    scenes = world.load_scenes()
    color_index = {c: i for i, c in enumerate(COLORS)}
    shape_index = {s: i for i, s in enumerate(SHAPES)}
    feats: dict[str, list[torch.Tensor]] = {kind: [] for kind in PASSES}
    labels: dict[str, list[int]] = {name: [] for name in (*PROBED, "image")}
    questions = _image_questions(world, split, limit)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(questions), batch_size):
            chunk = []
            for q in questions[start : start + batch_size]:
                try:
                    chunk.append((q, open_image(world.image_path(split, q["image_id"]))))
                except BadImageError:
                    continue
            if not chunk:
                continue
            inputs = model.prepare_inputs(images=[im for _, im in chunk], text=[q["question"] for q, _ in chunk])
            with torch.no_grad():
                _, xi = model.encode_prior(inputs["input_ids"], inputs["attention_mask"])
                vision = model.encode_vision(inputs["images"], xi)
                tokens = {kind: model.fusion_image_tokens(vision, kind) for kind in PASSES}
            grid = vision.grid_size
            for row, (q, _) in enumerate(chunk):
                scene = scenes[q["image_id"]]
                mask = np.asarray(Image.open(world.mask_path(split, q["image_id"])))
                owners = patch_targets(mask, mask.shape[0] // grid[0], len(scene["objects"]) + 1)
                for cell in np.flatnonzero(owners > 0):
                    obj = scene["objects"][int(owners[cell]) - 1]
                    for kind in PASSES:
                        feats[kind].append(tokens[kind][row, vision.num_prefix_tokens + cell].float().cpu())
                    labels["shape"].append(shape_index[obj["shape"]])
                    labels["color"].append(color_index[obj["color"]])
                    labels["position"].append(int(cell))
                    labels["image"].append(int(q["image_id"]))
    finally:
        model.train(was_training)
    out: dict[str, Any] = {name: torch.tensor(values, dtype=torch.long) for name, values in labels.items()}
    for kind in PASSES:
        out[kind] = torch.stack(feats[kind]) if feats[kind] else torch.zeros(0, 1)
    return out


def token_probes(fit: dict[str, Any], score: dict[str, Any], properties: Sequence[str] = PROBED) -> dict[str, Any]:
    """``{"bottom_up": {"shape": %, "color": %, "position": %}, "top_down": {...}, "patches": n}``: each
    property probed from each pass's tokens, fitted on ``fit`` and scored on ``score``
    (``object_patch_tokens`` of two sets of images)."""
    result: dict[str, Any] = {
        kind: {name: ridge_probe(fit[kind], fit[name], score[kind], score[name]) for name in properties}
        for kind in PASSES
    }
    result["patches"] = len(score["shape"])
    return result


def split_probes(model: Any, world: Any, split: str, limit: int | None = 200) -> dict[str, Any]:
    """``token_probes`` fitted on the first half of ``split``'s first ``limit`` images and scored on the
    second half (validation during training: no other split is read)."""
    tokens = object_patch_tokens(model, world, split, limit)
    images = tokens.pop("image")
    first = images < images.unique()[len(images.unique()) // 2] if len(images) else images.bool()
    return token_probes({k: v[first] for k, v in tokens.items()}, {k: v[~first] for k, v in tokens.items()})


def format_probe_table(result: dict[str, Any]) -> str:
    """The probe accuracies as a table: one row per pass, one column per property."""
    lines = [f"{'tokens the fusion reads':<24} " + " ".join(f"{name:>9}" for name in PROBED)]
    for kind in PASSES:
        lines.append(f"{kind.replace('_', '-'):<24} " + " ".join(f"{result[kind][name]:>8.1f}%" for name in PROBED))
    return "\n".join(lines)
