"""Task heads on the fused ``[B, 2H]`` pair and the contrastive image projection (SPEC §5, §2)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class VQAHead(nn.Module):
    """METER's VQA classifier: 2H → 2H → LayerNorm → GELU → #answers."""

    def __init__(self, in_features: int, num_answers: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, in_features)
        self.norm = nn.LayerNorm(in_features)
        self.fc2 = nn.Linear(in_features, num_answers)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.norm(self.fc1(pooled))))


class ITMHead(nn.Module):
    """Image-text matching: 2H → 2 logits (0: mismatch, 1: match)."""

    def __init__(self, in_features: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_features, 2)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.fc(pooled)


class ContrastiveHead(nn.Module):
    """Projects the pooled image output into ξ space and holds the InfoNCE temperature.

    The logit scale 1/τ is learned as ``log(1/τ)`` (CLIP), initialised from ``temperature_init``
    and clamped to ``[1, max_logit_scale]`` where it is used.
    """

    def __init__(
        self, vision_width: int, embed_dim: int, temperature_init: float = 0.07, max_logit_scale: float = 100.0
    ) -> None:
        super().__init__()
        self.proj = nn.Linear(vision_width, embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature_init)))
        self.max_log_scale = math.log(max_logit_scale)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embedding ``[B, embed_dim]``."""
        return F.normalize(self.proj(pooled), dim=-1)

    def scale(self) -> torch.Tensor:
        return self.logit_scale.clamp(0.0, self.max_log_scale).exp()
