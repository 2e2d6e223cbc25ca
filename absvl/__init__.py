"""absvl: vision-language models whose image encoder attends top-down."""

from ._version import __version__
from .models.vision import BackboneOutput, create_backbone, list_backbones
from .models.vl import AbsVLConfig, AbsVLForQuestionAnswering, AbsVLForRetrieval, AbsVLModel
from .pipelines import pipeline

__all__ = [
    "AbsVLConfig",
    "AbsVLForQuestionAnswering",
    "AbsVLForRetrieval",
    "AbsVLModel",
    "BackboneOutput",
    "__version__",
    "create_backbone",
    "list_backbones",
    "pipeline",
]
