"""Vision backbones: ViT/AbSViT (+ baselines), VARS attention, TDAM ResNets."""
from . import vision_transformer  # noqa: F401  (registers the ViT family)
from . import tdam  # noqa: F401  (registers the ResNet / TDAM family)
from .output import BackboneOutput
from .registry import backbone_family, count_params, create_backbone, estimate_macs, list_backbones, register_backbone

__all__ = [
    "BackboneOutput",
    "backbone_family",
    "count_params",
    "create_backbone",
    "estimate_macs",
    "list_backbones",
    "register_backbone",
]
