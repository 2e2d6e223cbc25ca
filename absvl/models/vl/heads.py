"""Task heads on the fused ``[B, 2H]`` pair, the image side of the prior loss (SPEC §5, §2), and retrieval's own
embedding head."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .counting import CountDensity, ObjectCounter
from .pointers import ObjectPointers, PointerHops, attention_pool


class VQAHead(nn.Module):
    """METER's VQA classifier: 2H → 2H → LayerNorm → GELU → #answers; with ``pointers``
    (:class:`ObjectPointers`) and ``counter`` (:class:`ObjectCounter`), their features join the pooled pair at its
    input."""

    def __init__(
        self,
        in_features: int,
        num_answers: int,
        pointers: ObjectPointers | None = None,
        counter: ObjectCounter | None = None,
    ) -> None:
        super().__init__()
        self.pointers, self.counter = pointers, counter
        width = in_features + sum(m.num_features for m in (pointers, counter) if m is not None)
        self.fc1 = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)
        self.fc2 = nn.Linear(width, num_answers)

    def forward(
        self, pooled: torch.Tensor, hops: PointerHops | None = None, counts: CountDensity | None = None
    ) -> torch.Tensor:
        x = torch.cat([pooled, *(r.features for r in (hops, counts) if r is not None)], dim=-1)
        return self.fc2(F.gelu(self.norm(self.fc1(x))))


class ITMHead(nn.Module):
    """Image-text matching: 2H → 2 logits (0: mismatch, 1: match)."""

    def __init__(self, in_features: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_features, 2)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.fc(pooled)


class ContrastiveHead(nn.Module):
    """The image side of the prior loss, in the space the prior gate reads, and its temperature.

    The gate is ``clamp(cos(ξ, z_i), 0, 1)`` on each output token z_i (AbSViT Eq. 8). The image
    embedding is the normalised mean of the spatial tokens themselves, so ``cos(ξ, embedding)``
    is the norm-weighted mean of the gate's cosines ``Σ_i ‖z_i‖ cos(ξ, z_i) / ‖Σ_i z_i‖`` and the
    prior loss (Eq. 15) trains exactly what the gate reads. There is no projection: a learned one
    would align ξ with P·z and leave the gate untrained (SPEC §2, prior loss). Of the first-pass
    tokens the embedding depends on the image only (a retrieval index stores it once per image);
    of the second-pass tokens it rewards a top-down pass that amplifies what ξ selects.

    The logit scale 1/τ is learned as ``log(1/τ)`` (CLIP), initialised from ``temperature_init``
    and clamped to ``[1, max_logit_scale]`` where it is used.
    """

    def __init__(self, temperature_init: float = 0.07, max_logit_scale: float = 100.0) -> None:
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature_init)))
        self.max_log_scale = math.log(max_logit_scale)

    def forward(self, tokens: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
        """L2-normalised ``[B, C]`` mean of ``[B, N, C]`` output tokens (prefix tokens left out)."""
        return F.normalize(tokens[:, num_prefix_tokens:].mean(dim=1), dim=-1)

    def attended(self, tokens: torch.Tensor, num_prefix_tokens: int, attention_map: torch.Tensor) -> torch.Tensor:
        """L2-normalised ``[B, C]`` mean of the normalised spatial ``tokens`` weighted by ``attention_map``
        (``[B, h, w]``, non-negative, e.g. the top-down token-norm map): what the map attends to."""
        weights = attention_map.flatten(1)
        weights = weights / weights.sum(dim=1, keepdim=True).clamp(min=1e-12)
        unit = F.normalize(tokens[:, num_prefix_tokens:], dim=-1)
        return F.normalize((weights.unsqueeze(-1) * unit).sum(dim=1), dim=-1)

    def scale(self) -> torch.Tensor:
        return clamped_scale(self.logit_scale, self.max_log_scale)


def clamped_scale(log_scale: torch.Tensor, max_log_scale: float) -> torch.Tensor:
    """A learned InfoNCE logit scale ``exp(log_scale)`` clamped to ``[1, exp(max_log_scale)]`` (CLIP)."""
    return log_scale.clamp(0.0, max_log_scale).exp()


class RetrievalEmbedding(nn.Module):
    """Retrieval's own embedding space (ALBEF's ITC head), beside the gate's: the prior loss must align ξ with what
    the gate reads, one mean of every token, where background outnumbers a small object; this head is free to pool.

    Each side: LayerNorm, ``queries`` attention poolings (each a learned softmax over the positions; the text's
    padding left out) concatenated, a linear map to ``dim``, L2-normalised. The text side pools the text encoder's
    hidden states, the image side the first pass's tokens (query-independent: indexable once). Its own learned
    logit scale.
    """

    def __init__(
        self,
        text_width: int,
        vision_width: int,
        dim: int,
        queries: int = 4,
        temperature_init: float = 0.07,
        max_logit_scale: float = 100.0,
    ) -> None:
        super().__init__()
        self.text_norm, self.image_norm = nn.LayerNorm(text_width), nn.LayerNorm(vision_width)
        self.text_pool, self.image_pool = nn.Linear(text_width, queries), nn.Linear(vision_width, queries)
        self.text_proj = nn.Linear(queries * text_width, dim)
        self.image_proj = nn.Linear(queries * vision_width, dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature_init)))
        self.max_log_scale = math.log(max_logit_scale)

    def text(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``[B, dim]`` of the text encoder's ``[B, T, D]`` hidden states."""
        pooled = attention_pool(self.text_pool, self.text_norm(hidden), attention_mask).flatten(1)
        return F.normalize(self.text_proj(pooled), dim=-1)

    def image(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, dim]`` of ``[B, N, C]`` spatial image tokens."""
        pooled = attention_pool(self.image_pool, self.image_norm(tokens)).flatten(1)
        return F.normalize(self.image_proj(pooled), dim=-1)

    def scale(self) -> torch.Tensor:
        return clamped_scale(self.logit_scale, self.max_log_scale)
