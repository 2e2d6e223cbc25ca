"""Pretrained weights into a backbone: timm's ImageNet weights, local weight files and backbone folders.

Files are read with ``safetensors`` or ``torch.load(weights_only=True)`` only (plus
``argparse.Namespace``, the ``args`` entry of timm/DeiT trainer files): nothing else is ever unpickled.
What the weights lack is the model's business: its ``init_missing_weights(missing)`` initialises it
as the authors do and names the keys its architecture adds (see docs/backbones.md).
"""

from __future__ import annotations

import argparse
import logging
import pickle
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from timm.layers import resample_abs_pos_embed, resample_patch_embed
from torch import nn

from ...io import WEIGHTS_NAME, is_backbone_folder, preview, read_backbone_folder
from .registry import backbone_defaults, list_backbones

logger = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
_HEAD_PREFIXES = ("head.", "fc.")  # ViT / ResNet classifiers


@dataclass
class LoadReport:
    """What loading pretrained weights into a backbone did.

    ``missing``: model keys the weights lacked (``fresh`` lists those expected for the
    architecture, initialised as the authors do; any other is warned about). ``unexpected``:
    weight keys the model has no place for (ignored). ``resampled``: keys resampled to the
    model's shape (position embeddings of another grid, a patch embedding of another patch
    size). ``dropped``: classifier keys that do not fit the model's head (another number of
    classes, or no head). ``renamed``: ``old -> new`` adaptations (``norm`` → ``fc_norm`` for
    average-pooled ViTs).
    """

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    resampled: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    fresh: list[str] = field(default_factory=list)
    renamed: list[str] = field(default_factory=list)
    source: str = ""

    @property
    def missing_unexpectedly(self) -> list[str]:
        return [k for k in self.missing if k not in set(self.fresh)]

    def summary(self) -> str:
        parts = [f"loaded {self.source or 'weights'}"]
        for name in ("fresh", "resampled", "dropped", "renamed", "unexpected"):
            keys = getattr(self, name)
            if keys:
                parts.append(f"{name}: {preview(keys)}")
        if self.missing_unexpectedly:
            parts.append(f"MISSING (random init): {preview(self.missing_unexpectedly)}")
        return "; ".join(parts)


# --- reading files ----------------------------------------------------------------------
def read_checkpoint(path: str | Path) -> Any:
    """The raw content of a weights file: safetensors, or ``torch.load(weights_only=True)``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no weights file {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{path} holds Python objects that torch.load(weights_only=True) refuses to unpickle, and absvl "
            f"never unpickles anything else ({str(err).splitlines()[0]}). If you trust the file, extract its "
            f"tensors once yourself, e.g.\n  python -c \"import torch; ck = torch.load('{path}', map_location='cpu', "
            f"weights_only=False); sd = ck.get('model', ck.get('state_dict', ck)); "
            f"torch.save({{k: v for k, v in sd.items() if torch.is_tensor(v)}}, 'weights.pth')\"\n"
            f"and load weights.pth instead."
        ) from None


def extract_state_dict(obj: Any, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint: unwraps ``{"model": ...}`` / ``{"state_dict": ...}`` and a
    ``module.`` prefix (DataParallel / DDP)."""
    for _ in range(3):
        if isinstance(obj, Mapping):
            entry = next(
                (k for k in ("model", "state_dict", "model_state_dict", "module") if isinstance(obj.get(k), Mapping)),
                None,
            )
            if entry is not None:
                obj = obj[entry]
                continue
        break
    if not isinstance(obj, Mapping) or not obj:
        raise ValueError(f"{source} holds no state dict (expected tensors, or a 'model' / 'state_dict' entry)")
    bad = [k for k, v in obj.items() if not torch.is_tensor(v)]
    if bad:
        raise ValueError(f"{source}: entries that are not tensors: {preview(bad)}")
    state = dict(obj)
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a local weights file (or of a converted folder)."""
    path = Path(path)
    if path.is_dir():
        read_backbone_folder(path)  # raises: not a backbone folder
        path = path / WEIGHTS_NAME
    elif path.suffix not in WEIGHT_SUFFIXES:
        raise ValueError(f"{path}: unknown weights format {path.suffix!r} (use one of {', '.join(WEIGHT_SUFFIXES)})")
    return extract_state_dict(read_checkpoint(path), str(path))


def folder_overrides(path: str | Path, name: str) -> dict[str, Any]:
    """Architecture overrides a converted folder was built with (``{}`` for plain files).

    They apply when the folder holds ``name``; a folder of another architecture only lends
    its weights (with a warning)."""
    if not is_backbone_folder(path):
        return {}
    config = read_backbone_folder(path)
    if config["name"] != name:
        logger.warning(
            "%s holds a %r: its weights load into %r, built with its own options (the folder's %s do not apply)",
            path,
            config["name"],
            name,
            config.get("overrides", {}),
        )
        return {}
    return dict(config.get("overrides", {}))


# --- timm's ImageNet weights ------------------------------------------------------------
def timm_pretrained_name(name: str, tag: str | None = None) -> str:
    """timm model (``arch.tag``) whose ImageNet weights ``create_backbone(name, pretrained=True)`` loads:
    the ``pretrained`` of the backbone's default config; ``tag`` picks another timm tag of that arch."""
    source = backbone_defaults(name).pretrained
    if source is None:
        mapped = [n for n in list_backbones() if backbone_defaults(n).pretrained]
        raise ValueError(
            f"no timm ImageNet weights are mapped to backbone {name!r} (mapped: {preview(mapped, 40)}); "
            "load a file with pretrained_path=... instead"
        )
    return source if tag is None else f"{source.split('.')[0]}.{tag}"


def timm_state_dict(name: str, pretrained: bool | str = True) -> tuple[dict[str, torch.Tensor], str]:
    """Download (or take from the cache) timm's weights for backbone ``name``. Needs network once."""
    tag = pretrained if isinstance(pretrained, str) else None
    timm_name = tag if tag and "." in tag else timm_pretrained_name(name, tag)
    model = timm.create_model(timm_name, pretrained=True)
    return model.state_dict(), f"timm:{timm_name}"


# --- adapting and loading ---------------------------------------------------------------
def _adapt(model: nn.Module, state: dict[str, torch.Tensor], report: LoadReport) -> dict[str, torch.Tensor]:
    """Resample position / patch embeddings, drop non-fitting heads, check the other shapes."""
    target = model.state_dict()
    state = dict(state)
    # average-pooled ViTs: a token-pooled checkpoint's final norm becomes fc_norm
    if (
        "fc_norm.weight" in target
        and "norm.weight" not in target
        and "norm.weight" in state
        and "fc_norm.weight" not in state
    ):
        for p in ("weight", "bias"):
            if f"norm.{p}" in state:
                state[f"fc_norm.{p}"] = state.pop(f"norm.{p}")
                report.renamed.append(f"norm.{p} -> fc_norm.{p}")
    out: dict[str, torch.Tensor] = {}
    mismatched = []
    for key, value in state.items():
        if key.startswith(_HEAD_PREFIXES) and (key not in target or target[key].shape != value.shape):
            report.dropped.append(key)
            continue
        if key not in target:
            report.unexpected.append(key)
            continue
        want = target[key].shape
        if value.shape != want:
            if key == "pos_embed" and value.dim() == 3 and value.shape[-1] == want[-1]:
                value = _resample_pos_embed(model, value)
                report.resampled.append(f"pos_embed {tuple(state[key].shape)} -> {tuple(want)}")
            elif key == "patch_embed.proj.weight" and value.dim() == 4 and value.shape[:2] == want[:2]:
                value = resample_patch_embed(value.float(), list(want[-2:])).to(value.dtype)
                report.resampled.append(f"patch_embed.proj.weight {tuple(state[key].shape)} -> {tuple(want)}")
            else:
                mismatched.append(f"{key}: weights {tuple(value.shape)}, model {tuple(want)}")
                continue
        out[key] = value
    if mismatched:
        raise ValueError(
            f"{report.source or 'weights'} do not fit the model (shape mismatch): " + "; ".join(mismatched)
        )
    return out


def _resample_pos_embed(model: nn.Module, posemb: torch.Tensor) -> torch.Tensor:
    prefix = model.num_prefix_tokens
    target_len = model.pos_embed.shape[1]
    if posemb.shape[1] - prefix < 1 or target_len - prefix < 1:
        raise ValueError(f"pos_embed {tuple(posemb.shape)} cannot be resampled to {tuple(model.pos_embed.shape)}")
    old = int(round((posemb.shape[1] - prefix) ** 0.5))
    if old * old != posemb.shape[1] - prefix:
        raise ValueError(f"pos_embed {tuple(posemb.shape)} is not a square grid after {prefix} prefix token(s)")
    return resample_abs_pos_embed(
        posemb.float(), new_size=list(model.patch_embed.grid_size), old_size=[old, old], num_prefix_tokens=prefix
    ).to(posemb.dtype)


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str = "") -> LoadReport:
    """Load ``state`` into ``model`` non-strictly, adapting what may be adapted; see :class:`LoadReport`.

    Raises ``ValueError`` on a shape mismatch other than position/patch embeddings and heads.
    """
    report = LoadReport(source=source)
    adapted = _adapt(model, state, report)
    result = model.load_state_dict(adapted, strict=False)
    report.missing = list(result.missing_keys)
    init_missing = getattr(model, "init_missing_weights", None)
    report.fresh = list(init_missing(report.missing)) if init_missing is not None else []
    if report.missing_unexpectedly:
        logger.warning(
            "%s: keys missing from the weights (left randomly initialised): %s",
            source or "weights",
            preview(report.missing_unexpectedly, 20),
        )
    if report.unexpected:
        logger.warning(
            "%s: keys the model has no place for (ignored): %s", source or "weights", preview(report.unexpected, 20)
        )
    logger.info(report.summary())
    return report


def load_pretrained(
    model: nn.Module, name: str, pretrained: bool | str = False, pretrained_path: str | Path | None = None
) -> LoadReport:
    """Load timm's ImageNet weights (``pretrained``) or a local file / converted folder into ``model``."""
    if pretrained_path is not None:
        state, source = load_state_dict_file(pretrained_path), str(pretrained_path)
    else:
        state, source = timm_state_dict(name, pretrained)
    report = load_weights(model, state, source)
    model.pretrained_report = report
    return report
