"""``absvl convert``: the authors' released AbSViT and TDAM checkpoints → absvl backbone folders.

AbSViT files keep their key names (built with ``td_bias=True``, as the authors' code adds the
value bias to the top-down tokens); TDAM files have their ``RA_block`` keys renamed and their
options read off the keys and shapes. Every key is checked (:func:`map_verified`); the folder
format is :mod:`absvl.io`'s. Details in docs/backbones.md.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .io import preview, read_backbone_folder, write_backbone_folder
from .models.vision import backbone_family, create_backbone
from .models.vision.pretrained import extract_state_dict, read_checkpoint

_TDAM_RENAMES = {
    "joint": {"Ug_top_mlp.0": "top_proj", "Ug_bottom_mlp.0": "bottom_proj", "Ug_mlp.0": "searchlight"},
    "top": {"Ug_mlp.0": "top_proj", "Ug_mlp.2": "searchlight"},
}
_RA_KEY = re.compile(r"^(layer\d+\.\d+)\.RA_block\.(.+)\.(weight|bias)$")
_STEP_BN_KEY = re.compile(r"^layer(\d+)\.(\d+)\.bn(\d+)_(\d+)\.")


def load_backbone(folder: str | Path, **overrides: Any) -> nn.Module:
    """Build the backbone of a folder written by ``absvl convert`` and load its weights."""
    config = read_backbone_folder(folder)
    return create_backbone(config["name"], pretrained_path=folder, **overrides)


def map_verified(
    state: dict[str, torch.Tensor], model: nn.Module, rename: Callable[[str], str | None], source: str = "checkpoint"
) -> dict[str, torch.Tensor]:
    """Rename every source key and check the result fills ``model`` exactly (keys and shapes).

    BatchNorm ``num_batches_tracked`` counters are the one thing a source may lack (they do
    not affect the model's outputs); they keep the model's value.
    """
    target = model.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    unknown, collisions, shapes, mismatched = [], [], [], set()
    for key, value in state.items():
        new = rename(key)
        if new is None or new not in target:
            unknown.append(key if new in (None, key) else f"{key} (-> {new})")
        elif new in mapped:
            collisions.append(f"{key} -> {new}")
        elif tuple(value.shape) != tuple(target[new].shape):
            shapes.append(f"{key}: checkpoint {tuple(value.shape)}, model {new} {tuple(target[new].shape)}")
            mismatched.add(new)
        else:
            mapped[new] = value
    missing = [k for k in target if k not in mapped and k not in mismatched and not k.endswith("num_batches_tracked")]
    problems = []
    if unknown:
        problems.append(f"{len(unknown)} checkpoint key(s) with no place in the model: {preview(unknown, 12)}")
    if collisions:
        problems.append(f"keys mapped twice: {preview(collisions, 12)}")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatch(es): {preview(shapes)}")
    if missing:
        problems.append(f"{len(missing)} model key(s) the checkpoint does not fill: {preview(missing, 12)}")
    if problems:
        raise ValueError(f"{source} does not convert to {model.backbone_config['name']!r}: " + "; ".join(problems))
    for key in target:
        if key not in mapped:  # num_batches_tracked only
            mapped[key] = target[key]
    return mapped


def _absvit_overrides(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    overrides: dict[str, Any] = {"td_bias": True}
    if "head.weight" in state:
        overrides["num_classes"] = int(state["head.weight"].shape[0])
    if "fc_norm.weight" in state and "norm.weight" not in state:
        overrides["global_pool"] = "avg"
    return overrides


def _tdam_overrides(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    ra = [_RA_KEY.match(k) for k in state]
    ra = [m for m in ra if m]
    if not ra:
        raise ValueError("the checkpoint has no `layer*.*.RA_block.*` keys: not a TDAM checkpoint")
    parts = {m.group(2) for m in ra}
    mode = "joint" if any(p.startswith("Ug_top_mlp") for p in parts) else "top"
    overrides: dict[str, Any] = {}
    if mode != "joint":
        overrides["mode"] = mode
    stages = tuple(sorted({int(m.group(1).split(".")[0][len("layer") :]) for m in ra}))
    if stages != (3, 4):
        overrides["stages"] = stages
    steps = 1 + max((int(m.group(4)) for k in state if (m := _STEP_BN_KEY.match(k))), default=1)
    if steps != 2:
        overrides["steps"] = steps
    first = ra[0].group(1)
    w1 = state[f"{first}.RA_block.{'Ug_top_mlp.0' if mode == 'joint' else 'Ug_mlp.0'}.weight"]
    hidden, top = int(w1.shape[0]), int(w1.shape[1])
    if top % hidden == 0 and top // hidden != 16:
        overrides["reduction"] = top // hidden
    overrides["_m"] = len(
        {
            int(m.group(3))
            for k in state
            if (m := _STEP_BN_KEY.match(k)) and f"layer{m.group(1)}.{m.group(2)}" == first and m.group(4) == "1"
        }
    )
    if "fc.weight" in state:
        overrides["num_classes"] = int(state["fc.weight"].shape[0])
    return overrides


def _tdam_rename(mode: str) -> Callable[[str], str | None]:
    renames = _TDAM_RENAMES[mode]

    def rename(key: str) -> str | None:
        match = _RA_KEY.match(key)
        if not match:
            return key
        new = renames.get(match.group(2))
        return None if new is None else f"{match.group(1)}.tdam.{new}.{match.group(3)}"

    return rename


def convert_state_dict(state: dict[str, torch.Tensor], arch: str, source: str = "checkpoint") -> nn.Module:
    """Build ``arch`` with the options the authors' checkpoint implies and load it, verified."""
    family = backbone_family(arch)  # raises the registry's "unknown backbone ... did you mean" error
    is_tdam = any(_RA_KEY.match(k) for k in state)
    if family == "absvit":
        if is_tdam:
            raise ValueError(f"{source} is a TDAM checkpoint (RA_block keys): use --arch tdam_resnet{{18,34,50,101}}")
        if not any(k.startswith("decoders.") for k in state):
            raise ValueError(f"{source} has no `decoders.*` keys: not an AbSViT checkpoint")
        overrides = _absvit_overrides(state)
        model = create_backbone(arch, **overrides)
        mapped = map_verified(state, model, lambda k: k, source)
    elif family == "tdam":
        if any(k.startswith(("decoders.", "blocks.")) for k in state):
            raise ValueError(f"{source} is a ViT/AbSViT checkpoint: use --arch absvit_*")
        overrides = _tdam_overrides(state)
        m = overrides.pop("_m")
        model = create_backbone(arch, **overrides)
        blocks = model.tdam_blocks()
        if blocks and m and blocks[0].m != m:
            overrides["m"] = m
            model = create_backbone(arch, **overrides)
        mapped = map_verified(state, model, _tdam_rename(overrides.get("mode", "joint")), source)
    else:
        raise ValueError(
            f"--arch {arch!r} (family {family!r}): convert handles the authors' AbSViT (absvit_*) and TDAM "
            f"(tdam_resnet*) checkpoints; plain timm/DeiT weights load directly with pretrained_path=..."
        )
    model.load_state_dict(mapped, strict=True)
    return model


def convert_checkpoint(checkpoint: str | Path, arch: str, out: str | Path, overwrite: bool = False) -> Path:
    """Convert an authors' checkpoint file into the backbone folder ``out`` (written atomically)."""
    checkpoint, out = Path(checkpoint), Path(out)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (pass overwrite=True / --overwrite)")
    state = extract_state_dict(read_checkpoint(checkpoint), str(checkpoint))
    model = convert_state_dict(state, arch, checkpoint.name)
    overrides = {k: v for k, v in model.backbone_config.items() if k != "name"}
    return write_backbone_folder(out, model.state_dict(), arch, overrides, source=checkpoint.name)
