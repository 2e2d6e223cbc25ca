"""The AbSViT vision-language model: text prior, METER co-attention fusion, heads, losses."""

from .configuration import AbsVLConfig
from .modeling import AbsVLModel, AbsVLOutput
from .processing import AbsVLProcessor, load_image, preprocess_image
from .tiny_text import build_tiny_text_encoder

__all__ = [
    "AbsVLConfig",
    "AbsVLModel",
    "AbsVLOutput",
    "AbsVLProcessor",
    "build_tiny_text_encoder",
    "load_image",
    "preprocess_image",
]
