"""Starting backbones from pretrained weights: timm's ImageNet weights, local weight files and
folders written by ``absvl convert`` (:mod:`absvl.convert`).

``create_backbone(name, pretrained=True)`` loads timm's ImageNet weights of the matching plain
architecture (``timm_pretrained_name``); ``create_backbone(name, pretrained_path=...)`` loads a
local ``.safetensors`` / ``.pth`` / ``.pt`` / ``.bin`` file or a converted folder. Files are read
with ``safetensors`` or ``torch.load(weights_only=True)`` only: nothing is ever unpickled beyond
what ``weights_only`` allows (plus ``argparse.Namespace``, the ``args`` entry of timm/DeiT
trainer checkpoints, which ``weights_only`` rebuilds as a plain attribute bag).

What the plain architecture lacks starts as the authors initialise it: AbSViT's decoders
truncated-normal 0.02 and ξ (``prompt``) random (the model's own init), VARS-D's random
feature matrix random, TDAM's searchlight convolutions timm's init and its per-step BatchNorms
copied from the step-0 BatchNorm (``sync_step_norms``). Everything is reported in a
:class:`LoadReport` (``model.pretrained_report``).
"""
from __future__ import annotations

import argparse
import json
import logging
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

logger = logging.getLogger(__name__)

BACKBONE_FORMAT = "absvl-backbone"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")

# keys a model may lack in a plain checkpoint: they start fresh, as the authors start them
_FRESH_PATTERNS = (
    r"^decoders\.",  # AbSViT feedback decoders A_l, B_l
    r"^prompt$",  # AbSViT's free prior ξ
    r"\.attn\.(?!qkv\.|proj\.)",  # VARS extras (random feature matrix, atoms, λ...)
    r"\.tdam\.",  # TDAM searchlight
    r"\.bn\d+_\d+\.",  # TDAM per-step BatchNorms (copied from step 0)
)
_HEAD_PREFIXES = ("head.", "fc.")  # ViT / ResNet classifiers

# timm's ImageNet weights of the matching plain architecture (see docs/backbones.md)
_TIMM_WEIGHTS = (
    (r"^(vit|absvit|vars_d_vit|vars_d_absvit)_(tiny|small|base)_patch16_224$", "deit_{1}_patch16_224.fb_in1k"),
    (r"^(vit|absvit)_tiny_patch8_224_gap$", "deit_tiny_patch16_224.fb_in1k"),  # patch embedding resampled 16 → 8
    (r"^(tdam_)?resnet(18|34|50|101)$", "resnet{1}.tv_in1k"),
)


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
                parts.append(f"{name}: {_short(keys)}")
        if self.missing_unexpectedly:
            parts.append(f"MISSING (random init): {_short(self.missing_unexpectedly)}")
        return "; ".join(parts)


def _short(keys: list[str], n: int = 8) -> str:
    return ", ".join(keys[:n]) + (f" ... ({len(keys)} in all)" if len(keys) > n else "")


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
            entry = next((k for k in ("model", "state_dict", "model_state_dict", "module") if isinstance(obj.get(k), Mapping)), None)
            if entry is not None:
                obj = obj[entry]
                continue
        break
    if not isinstance(obj, Mapping) or not obj:
        raise ValueError(f"{source} holds no state dict (expected tensors, or a 'model' / 'state_dict' entry)")
    bad = [k for k, v in obj.items() if not torch.is_tensor(v)]
    if bad:
        raise ValueError(f"{source}: entries that are not tensors: {_short(bad)}")
    state = dict(obj)
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def is_converted_folder(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / CONFIG_NAME).is_file() and (path / WEIGHTS_NAME).is_file()


def read_folder_config(path: str | Path) -> dict[str, Any]:
    """``config.json`` of a folder written by ``absvl convert``."""
    path = Path(path)
    if not is_converted_folder(path):
        raise FileNotFoundError(f"{path} is not a converted backbone folder (needs {CONFIG_NAME} and {WEIGHTS_NAME})")
    config = json.loads((path / CONFIG_NAME).read_text())
    if config.get("format") != BACKBONE_FORMAT or "name" not in config:
        raise ValueError(f"{path / CONFIG_NAME} is not an {BACKBONE_FORMAT} config")
    return config


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a local weights file (or of a converted folder)."""
    path = Path(path)
    if path.is_dir():
        if not is_converted_folder(path):
            raise FileNotFoundError(f"{path} is a folder without {CONFIG_NAME} + {WEIGHTS_NAME} (not written by absvl convert)")
        path = path / WEIGHTS_NAME
    elif path.suffix not in WEIGHT_SUFFIXES:
        raise ValueError(f"{path}: unknown weights format {path.suffix!r} (use one of {', '.join(WEIGHT_SUFFIXES)})")
    return extract_state_dict(read_checkpoint(path), str(path))


def folder_overrides(path: str | Path, name: str) -> dict[str, Any]:
    """Architecture overrides a converted folder was built with (``{}`` for plain files).

    They apply when the folder holds ``name``; a folder of another architecture only lends
    its weights (with a warning)."""
    if not is_converted_folder(path):
        return {}
    config = read_folder_config(path)
    if config["name"] != name:
        logger.warning(
            "%s holds a converted %r, loaded into %r: its options %s are not applied", path, config["name"], name,
            config.get("overrides", {}),
        )
        return {}
    return dict(config.get("overrides", {}))


# --- timm's ImageNet weights ------------------------------------------------------------
def timm_pretrained_name(name: str, tag: str | None = None) -> str:
    """timm model (``arch.tag``) whose ImageNet weights ``create_backbone(name, pretrained=True)`` loads.

    ViT / AbSViT / VARS-D → DeiT (what the AbSViT authors start from); ResNet / TDAM-ResNet →
    torchvision's weights in timm (``tv_in1k``). ``tag`` picks another timm tag of that arch.
    """
    for pattern, template in _TIMM_WEIGHTS:
        match = re.match(pattern, name)
        if match:
            timm_name = template.format(*match.groups())
            return timm_name if tag is None else f"{timm_name.split('.')[0]}.{tag}"
    raise ValueError(
        f"no timm ImageNet weights are mapped to backbone {name!r} (mapped: ViT/AbSViT/VARS-D tiny/small/base "
        f"patch16, *_tiny_patch8_224_gap, (tdam_)resnet18/34/50/101); load a file with pretrained_path=... instead"
    )


def timm_state_dict(name: str, pretrained: bool | str = True) -> tuple[dict[str, torch.Tensor], str]:
    """Download (or take from the cache) timm's weights for backbone ``name``. Needs network once."""
    import timm

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
    if "fc_norm.weight" in target and "norm.weight" not in target and "norm.weight" in state and "fc_norm.weight" not in state:
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
                from timm.layers import resample_patch_embed

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
    from timm.layers import resample_abs_pos_embed

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


@torch.no_grad()
def _sync_missing_step_norms(model: nn.Module, missing: set[str]) -> None:
    """TDAM: per-step BatchNorms the weights lacked start as copies of the step-0 BatchNorm."""
    from .tdam import _TopDownBlock

    for prefix, block in model.named_modules():
        if not isinstance(block, _TopDownBlock):
            continue
        for t in range(1, block.steps):
            for i in range(block.first_recomputed, block.num_layers):
                if f"{prefix}.bn{i + 1}_{t}.weight" in missing:
                    block.norm(i, t).load_state_dict(block.norm(i, 0).state_dict())


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str = "") -> LoadReport:
    """Load ``state`` into ``model`` non-strictly, adapting what may be adapted; see :class:`LoadReport`.

    Raises ``ValueError`` on a shape mismatch other than position/patch embeddings and heads.
    """
    report = LoadReport(source=source)
    adapted = _adapt(model, state, report)
    result = model.load_state_dict(adapted, strict=False)
    report.missing = list(result.missing_keys)
    report.fresh = [k for k in report.missing if any(re.search(p, k) for p in _FRESH_PATTERNS)]
    _sync_missing_step_norms(model, set(report.missing))
    if report.missing_unexpectedly:
        logger.warning("%s: keys missing from the weights (left randomly initialised): %s", source or "weights",
                       _short(report.missing_unexpectedly, 20))
    if report.unexpected:
        logger.warning("%s: keys the model has no place for (ignored): %s", source or "weights", _short(report.unexpected, 20))
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
