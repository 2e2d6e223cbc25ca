"""Text side: the ``transformers`` encoder and the AbSViT prior ξ projected from it (SPEC §2).

ξ = W·pool(h) + b, with ``pool`` the [cls] (token 0) hidden state (paper) or the masked mean
of all tokens (authors' released VL code). ξ lives in the vision width C: it is compared by
cosine with the vision tokens (Eq. 8) and is the text side of the prior loss (Eq. 15).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import transformers
from torch import nn
from transformers.models.auto.modeling_auto import MODEL_FOR_TEXT_ENCODING_MAPPING_NAMES

# authors' released VL code: ``x = x @ (p pᵀ) * 5`` between the modulation and the feedback path
CHANNEL_PROJECTION_SCALE = 5.0


def _without_pooler(model: nn.Module) -> nn.Module:
    """Drop the encoder's own pooler: the fusion has its own, and unused parameters break DDP."""
    if getattr(model, "pooler", None) is not None:
        model.pooler = None
    return model


def _encoder_class(config: Any) -> Any:
    """``AutoModelForTextEncoding`` where it knows the model type (for encoder-decoders such as
    T5, mT5, UMT5 it is the encoder alone: ``AutoModel`` would also run the decoder), else ``AutoModel``."""
    if config.model_type in MODEL_FOR_TEXT_ENCODING_MAPPING_NAMES:
        return transformers.AutoModelForTextEncoding
    return transformers.AutoModel


def load_text_encoder(name_or_path: str) -> tuple[nn.Module, Any]:
    """Pretrained encoder and tokenizer from a hub name or a local folder (``AutoModel``/``AutoTokenizer``)."""
    config = transformers.AutoConfig.from_pretrained(name_or_path)
    model = _encoder_class(config).from_pretrained(name_or_path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(name_or_path)
    return _without_pooler(model), tokenizer


def text_encoder_from_config(text_config: dict[str, Any]) -> nn.Module:
    """Randomly initialised encoder of a saved ``config.to_dict()`` (weights are loaded afterwards)."""
    if "model_type" not in text_config:
        raise ValueError("text_config has no 'model_type': it must be a transformers config dict")
    config = transformers.AutoConfig.for_model(**text_config)
    return _without_pooler(_encoder_class(config).from_config(config))


def text_config_dict(model: nn.Module) -> dict[str, Any]:
    """The encoder's config as saved in ``config.json`` (its load path dropped: it is not needed)."""
    config = model.config.to_dict()
    config.pop("_name_or_path", None)
    return config


# the special tokens whose ids a transformers config may hold: the tokenizer's must be the same
SPECIAL_TOKEN_IDS = ("pad_token_id", "bos_token_id", "eos_token_id", "cls_token_id", "sep_token_id")


def tokenizer_mismatches(tokenizer: Any, text_config: dict[str, Any]) -> list[str]:
    """How a tokenizer disagrees with the text encoder's config it should feed (empty: it fits): more entries than
    the embedding table has rows (ids past its end), far fewer (another model's tokenizer, or none: transformers
    then builds a near-empty one that encodes every text to its special tokens alone; a table padded to a round
    size has up to 1 % or 128 rows more), or a special token (pad, bos, eos, cls, sep) at another id than the
    config's, where both name one."""
    problems = []
    vocab_size, size = text_config.get("vocab_size"), len(tokenizer)
    if isinstance(vocab_size, int):
        if size > vocab_size:
            problems.append(f"the tokenizer has {size:,} entries, more than the {vocab_size:,} of the embedding table")
        elif vocab_size - size > max(128, vocab_size // 100):
            problems.append(f"the tokenizer has {size:,} entries where the text encoder has {vocab_size:,}")
    for name in SPECIAL_TOKEN_IDS:
        expected, found = text_config.get(name), getattr(tokenizer, name, None)
        if isinstance(expected, int) and found is not None and found != expected:
            problems.append(f"its {name} is {found} where the text encoder's is {expected}")
    return problems


class PriorProjection(nn.Module):
    """ξ = Linear(pool(text hidden states)) in the vision width (AbSViT Sec. 4, VL prior)."""

    def __init__(self, text_width: int, vision_width: int, pooling: str = "cls") -> None:
        super().__init__()
        self.pooling = pooling
        self.proj = nn.Linear(text_width, vision_width)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return self.proj(pooled)


@contextmanager
def channel_projection(backbone: nn.Module, xi: torch.Tensor) -> Iterator[None]:
    """Apply the authors' rank-1 channel projection ``h ← 5·h·(ξξᵀ)`` to the feedback input.

    The modulated tokens h_L enter the feedback path at the top decoder (AbSViT Eq. 10), so a
    forward pre-hook there rewrites its input; the decoders are otherwise used only by L_var,
    which calls their ``linear`` directly and is unaffected. ξ is not normalised, as in their code.
    """
    decoders = getattr(backbone, "decoders", None)
    if decoders is None:
        raise ValueError("prior_channel_projection needs a backbone with a feedback path (decoders)")

    def project(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        h = args[0]
        p = xi.to(h.dtype).unsqueeze(-1)  # [B, C, 1]
        return (CHANNEL_PROJECTION_SCALE * (h @ p) @ p.transpose(1, 2),)

    handle = decoders[-1].register_forward_pre_hook(project)
    try:
        yield
    finally:
        handle.remove()
