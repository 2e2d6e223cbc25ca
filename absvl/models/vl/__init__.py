"""The AbSViT vision-language models: the shared encoder (text prior, top-down backbone, METER co-attention fusion,
the prior and variational losses) and the task models with their heads and losses."""

from .auto import load_model
from .configuration import AbsVLConfig
from .modeling import AbsVLModel, AbsVLModelOutput
from .pretrained import AbsVLPreTrainedModel
from .processing import AbsVLProcessor, load_image, preprocess_image
from .tasks import AbsVLForQuestionAnswering, AbsVLForRetrieval, AbsVLQuestionAnsweringOutput, AbsVLRetrievalOutput
from .tiny_text import build_tiny_text_encoder

__all__ = [
    "AbsVLConfig",
    "AbsVLForQuestionAnswering",
    "AbsVLForRetrieval",
    "AbsVLModel",
    "AbsVLModelOutput",
    "AbsVLPreTrainedModel",
    "AbsVLProcessor",
    "AbsVLQuestionAnsweringOutput",
    "AbsVLRetrievalOutput",
    "build_tiny_text_encoder",
    "load_model",
    "load_image",
    "preprocess_image",
]
