"""Vision backbones: ViT/AbSViT (+ baselines), VARS attention, TDAM ResNets."""

from . import tdam, vit_models  # noqa: F401  (register the ResNet / TDAM and the ViT families)
from .builder import count_params, create_backbone, estimate_macs
from .output import BackboneOutput
from .registry import backbone_defaults, backbone_family, backbone_options, list_backbones, register_backbone

__all__ = [
    "BackboneOutput",
    "backbone_defaults",
    "backbone_family",
    "backbone_options",
    "count_params",
    "create_backbone",
    "estimate_macs",
    "list_backbones",
    "register_backbone",
]
