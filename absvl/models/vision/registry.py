"""Backbone registry and ``create_backbone`` (timm's ``create_model`` pattern)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

_BACKBONES: dict[str, Callable[..., nn.Module]] = {}
_FAMILIES: dict[str, str] = {}


def register_backbone(family: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Register a backbone constructor under its function name, tagged with a family."""

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if fn.__name__ in _BACKBONES:
            raise ValueError(f"backbone {fn.__name__!r} is registered twice")
        _BACKBONES[fn.__name__] = fn
        _FAMILIES[fn.__name__] = family
        return fn

    return wrap


def list_backbones(family: str | None = None) -> list[str]:
    """Names of the registered backbones, sorted; optionally only those of one family."""
    return sorted(n for n in _BACKBONES if family is None or _FAMILIES[n] == family)


def backbone_family(name: str) -> str:
    _check_name(name)
    return _FAMILIES[name]


def _check_name(name: str) -> None:
    if name not in _BACKBONES:
        import difflib

        close = difflib.get_close_matches(name, _BACKBONES, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else " Run `absvl backbones` to list them."
        raise ValueError(f"unknown backbone {name!r}.{hint}")


def create_backbone(
    name: str, pretrained: bool | str = False, pretrained_path: str | Path | None = None, **overrides: Any
) -> nn.Module:
    """Build a registered backbone, overriding any of its constructor arguments.

    The model remembers how it was built in ``model.backbone_config`` (name + overrides),
    which is what checkpoints store to rebuild it.

    Args:
        pretrained: load timm's ImageNet weights of the matching plain architecture (DeiT for
            ViT/AbSViT/VARS-D, torchvision's ResNets for (TDAM-)ResNets; a string picks another
            timm tag, e.g. ``"a1_in1k"``). Needs network (or timm's cache).
        pretrained_path: load a local ``.safetensors``/``.pth``/``.pt``/``.bin`` file or a folder
            written by ``absvl convert`` (whose architecture options, e.g. ``td_bias``, apply;
            explicit ``overrides`` win).
        What the weights lack is initialised as the authors do; ``model.pretrained_report`` (a
        ``LoadReport``) lists missing / unexpected / resampled / dropped keys. See
        ``absvl.models.vision.pretrained``.
    """
    _check_name(name)
    if pretrained and pretrained_path is not None:
        raise ValueError("give pretrained=True or pretrained_path=..., not both")
    if pretrained_path is not None:
        from .pretrained import folder_overrides

        overrides = {**folder_overrides(pretrained_path, name), **overrides}
    try:
        model = _BACKBONES[name](**overrides)
    except TypeError as err:
        raise TypeError(f"bad option for backbone {name!r}: {err}") from err
    model.backbone_config = {"name": name, **overrides}
    if pretrained or pretrained_path is not None:
        from .pretrained import load_pretrained

        load_pretrained(model, name, pretrained=pretrained, pretrained_path=pretrained_path)
    return model


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def estimate_macs(name: str, img_size: int = 224, **overrides: Any) -> tuple[int, int]:
    """(parameters, multiply-accumulates) of one forward at ``img_size``.

    Built on the meta device, so nothing is allocated or computed; MACs are half the FLOPs
    torch's counter reports, the convention of the papers' "GFLOPs" columns.
    """
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = create_backbone(name, **overrides).eval()
        images = torch.empty(1, 3, img_size, img_size)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(images)
    return count_params(model), counter.get_total_flops() // 2
