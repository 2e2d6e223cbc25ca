"""absvl: vision-language models whose image encoder attends top-down."""
__version__ = "0.2.0"

from .models.vision import BackboneOutput, create_backbone, list_backbones  # noqa: E402
from .models.vl import AbsVLConfig, AbsVLModel  # noqa: E402
from .pipelines import pipeline  # noqa: E402

__all__ = ["AbsVLConfig", "AbsVLModel", "BackboneOutput", "__version__", "create_backbone", "list_backbones", "pipeline"]
