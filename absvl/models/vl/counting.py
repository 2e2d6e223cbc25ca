"""Object counting: a density over the fused image tokens whose sum is the number of objects a question names.

"How many red circles are there?" asks for a number of objects, not of cells, and the object pointers
(``absvl.models.vl.pointers``) land on one object. Counting by density (Lempitsky & Zisserman, NIPS 2010) turns
the question into a sum: each spatial token ``y_j`` gets

- a membership ``σ(μ_j)``, ``μ_j = q·W_k y_j / √H`` with the query ``q = W_q m`` pooled from the fused text tokens
  (``m = Σ_t softmax_t(u·x_t) x_t``): does the cell belong to an object the question describes?
- a share ``s_j = softplus(w·y_j + b)``, the question-independent fraction of its object the cell stands for: the
  shares of one object's cells sum to 1 whatever its size;

and the count is ``ĉ = Σ_j σ(μ_j) s_j``. The head reads ``ĉ`` and radial encodings of it around each whole number
``n = 0 … max_count``, ``exp(−(ĉ − n)² / 2b²)``, so that a count maps to its answer through a linear layer.

A world that knows each question's objects (the Shapes world's masks) supervises both factors (``count_loss``):
the membership on the cells of the question's objects, the shares so that each object's sum to one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .pointers import attention_pool


@dataclass
class CountDensity:
    """``features`` ``[B, num_features]`` for the head; ``membership`` ``[B, N]`` logits and ``share`` ``[B, N]`` per
    spatial token (``count_loss`` reads them); ``density = σ(membership)·share`` sums to the count."""

    features: torch.Tensor
    membership: torch.Tensor
    share: torch.Tensor

    @property
    def density(self) -> torch.Tensor:
        return self.membership.sigmoid() * self.share

    @property
    def count(self) -> torch.Tensor:
        """``[B]`` the counted number of objects."""
        return self.density.sum(-1)


class ObjectCounter(nn.Module):
    """The count density over the fused image tokens and the count's features (module docstring)."""

    def __init__(self, hidden_size: int, max_count: int = 10, bandwidth: float = 0.35) -> None:
        """``max_count``: the largest whole number with its own radial feature; ``bandwidth`` ``b``: their width."""
        super().__init__()
        self.hidden_size, self.max_count, self.bandwidth = hidden_size, max_count, bandwidth
        self.role = nn.Linear(hidden_size, 1)
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size)
        self.share = nn.Linear(hidden_size, 1)

    @property
    def num_features(self) -> int:
        return self.max_count + 2

    def forward(
        self, text_tokens: torch.Tensor, attention_mask: torch.Tensor, image_tokens: torch.Tensor
    ) -> CountDensity:
        """``text_tokens`` ``[B, T, H]`` (``attention_mask`` ``[B, T]``), ``image_tokens`` ``[B, N, H]`` the fused
        spatial tokens."""
        query = self.query(attention_pool(self.role, text_tokens, attention_mask)[:, 0])  # [B, H]
        membership = torch.einsum("bh,bnh->bn", query, self.key(image_tokens)) / math.sqrt(self.hidden_size)
        share = F.softplus(self.share(image_tokens).squeeze(-1))
        count = (membership.sigmoid() * share).sum(-1, keepdim=True)
        numbers = torch.arange(self.max_count + 1, device=count.device, dtype=count.dtype)
        radial = torch.exp(-((count - numbers) ** 2) / (2 * self.bandwidth**2))
        return CountDensity(features=torch.cat([count, radial], dim=1), membership=membership, share=share)
