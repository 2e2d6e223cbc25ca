"""``create_backbone`` (timm's ``create_model``): a registered constructor, its overrides and its weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ...errors import InputTypeError
from .pretrained import folder_overrides, load_pretrained
from .registry import backbone_constructor


def create_backbone(
    name: str, pretrained: bool | str = False, pretrained_path: str | Path | None = None, **overrides: Any
) -> nn.Module:
    """Build a registered backbone, overriding any of its constructor arguments.

    The model remembers how it was built in ``model.backbone_config`` (name + overrides),
    which is what checkpoints store to rebuild it.

    Args:
        pretrained: load timm's ImageNet weights of the matching plain architecture (the
            ``pretrained`` of the backbone's default config: DeiT for ViT/AbSViT/VARS-D,
            torchvision's ResNets for (TDAM-)ResNets; a string picks another timm tag, e.g.
            ``"a1_in1k"``). Needs network (or timm's cache).
        pretrained_path: load a local ``.safetensors``/``.pth``/``.pt``/``.bin`` file or a backbone
            folder (``absvl convert``, ``absvl train classify``), whose architecture options, e.g.
            ``td_bias``, apply; explicit ``overrides`` win.
        What the weights lack is initialised as the authors do; ``model.pretrained_report`` (a
        ``LoadReport``) lists missing / unexpected / resampled / dropped keys. See
        :mod:`absvl.models.vision.pretrained`.
    """
    constructor = backbone_constructor(name)
    if pretrained and pretrained_path is not None:
        raise ValueError("give pretrained=True or pretrained_path=..., not both")
    if pretrained_path is not None:
        overrides = {**folder_overrides(pretrained_path, name), **overrides}
    try:
        model = constructor(**overrides)
    except TypeError as err:
        raise InputTypeError(f"bad option for backbone {name!r}: {err}") from err
    model.backbone_config = {"name": name, **overrides}
    if pretrained or pretrained_path is not None:
        load_pretrained(model, name, pretrained=pretrained, pretrained_path=pretrained_path)
    return model


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def estimate_macs(name: str, img_size: int = 224, **overrides: Any) -> tuple[int, int]:
    """(parameters, multiply-accumulates) of one forward at ``img_size``.

    Built on the meta device, so nothing is allocated or computed; MACs are half the FLOPs
    torch's counter reports, the convention of the papers' "GFLOPs" columns.
    """
    with torch.device("meta"):
        model = create_backbone(name, **overrides).eval()
        images = torch.empty(1, 3, img_size, img_size)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(images)
    return count_params(model), counter.get_total_flops() // 2
