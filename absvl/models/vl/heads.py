"""Task heads on the fused ``[B, 2H]`` pair, and the image side of the prior loss (SPEC §5, §2)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .counting import CountDensity, ObjectCounter
from .pointers import ObjectPointers, PointerHops


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
        return self.logit_scale.clamp(0.0, self.max_log_scale).exp()
