"""Object pointers: a two-hop readout of the fused image tokens for questions about objects and their relations.

METER's VQA head reads the pooled [text; image] pair. A relation between two objects ("is the red circle left of
the blue square?", "what color is the object above the green triangle?") asks for the product of the relation
word and the two objects' offset, which neither the pooled pair nor a co-attention layer learns from a few
thousand questions (docs/results/answering.md §9: four relations stay at chance after 1,500 steps even with both
objects marked; an MLP on their centres learns them in 200). The pointers give the head that computation:

- three summaries pooled from the fused text tokens, ``m_k = Σ_t softmax_t(u_k·x_t) x_t``: the queries of the two
  hops, ``q_k = W_q m_k`` (k = 1, 2), and the words of the relation, ``m_3``;
- hop 1 attends over the spatial image tokens ``y_j`` by content, ``a_1 = softmax_j(q_1·W_k y_j / √H)``, and
  lands at ``c_1 = Σ_j a_1j p_j`` (``p_j`` the cell's centre in [-1, 1]²);
- hop 2 adds a direction read from the question, ``d = W_d s`` (``s`` the pooled text), towards which it looks
  from hop 1: ``a_2 = softmax_j(q_2·W_k y_j / √H + g·d·tanh(κ(p_j − c_1)))``, landing at ``c_2``;
- the head gets what each hop read, ``Σ_j a_kj W_v y_j``, the offset between the landing points as a soft sign,
  ``e = tanh(κ(c_2 − c_1))``, a bilinear map of the relation's words and the landing points ``(W_r m_3)[c_1; c_2;
  e]``, and ``r ⊙ e`` and ``r·e`` for the direction the relation names, ``r = W_e m_3``: what a yes/no question
  about a relation asks. Hop 2's ``d`` does not serve there: it steers the hop, and the pointers' supervision
  keeps hop 2 on the object the question names even where the relation does not hold. In the demo's training
  ``r`` tends to one direction for all four relations (from ``s`` or ``m_3`` alike), and the yes/no relations are
  read from the bilinear features (docs/results/answering.md §10).

A world that knows each question's objects (the Shapes world: ``target_objects``, the related object first)
supervises the hops (``pointer_loss``): hop 1 on the last object the question names (a relation's reference,
"the blue square"), hop 2 on the first (the object related to it); a question about one object puts both on it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class PointerHops:
    """``features`` ``[B, num_features]`` for the head; ``logits`` ``[B, 2, N]`` each hop's attention logits over the
    ``N`` spatial tokens (``pointer_loss`` reads them; their softmax is the hop's map)."""

    features: torch.Tensor
    logits: torch.Tensor


def cell_centres(grid_size: tuple[int, int], device: torch.device | None = None) -> torch.Tensor:
    """``[h·w, 2]``: the (x, y) centre of each cell of the grid, row by row, in [-1, 1]."""
    h, w = grid_size
    ys, xs = torch.meshgrid(
        torch.linspace(-1, 1, h, device=device), torch.linspace(-1, 1, w, device=device), indexing="ij"
    )
    return torch.stack([xs.flatten(), ys.flatten()], dim=1)


def attention_pool(role: nn.Linear, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, K, H]``: ``K`` summaries of the tokens ``[B, T, H]``, ``m_k = Σ_t softmax_t(u_k·x_t) x_t`` with ``role``
    the ``H → K`` scores ``u_k``; padding (``attention_mask`` 0) takes no part (None: every token does)."""
    scores = role(tokens)
    if attention_mask is not None:
        scores = scores.masked_fill(~attention_mask.bool()[..., None], float("-inf"))
    return torch.einsum("btk,bth->bkh", scores.softmax(dim=1), tokens)


class ObjectPointers(nn.Module):
    """Two hops over the fused image tokens and the relation features of their landing points (module docstring)."""

    def __init__(
        self, hidden_size: int, relation_features: int = 16, direction_gain: float = 5.0, sharpness: float = 4.0
    ) -> None:
        """``direction_gain`` g scales hop 2's direction term; ``sharpness`` κ turns an offset into a soft sign."""
        super().__init__()
        self.hidden_size, self.relation_features = hidden_size, relation_features
        self.direction_gain, self.sharpness = direction_gain, sharpness
        self.role = nn.Linear(hidden_size, 3)
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size)
        self.value = nn.Linear(hidden_size, hidden_size)
        self.direction = nn.Linear(hidden_size, 2)
        self.relation = nn.Linear(hidden_size, relation_features * 6)
        self.relation_direction = nn.Linear(hidden_size, 2)

    @property
    def num_features(self) -> int:
        return 2 * self.hidden_size + self.relation_features + 5

    def forward(
        self,
        text_tokens: torch.Tensor,
        attention_mask: torch.Tensor,
        image_tokens: torch.Tensor,
        grid_size: tuple[int, int],
        question: torch.Tensor,
    ) -> PointerHops:
        """``text_tokens`` ``[B, T, H]`` (``attention_mask`` ``[B, T]``), ``image_tokens`` ``[B, h·w, H]`` the fused
        spatial tokens row by row, ``question`` ``[B, H]`` the pooled text."""
        centres = cell_centres(grid_size, image_tokens.device).to(image_tokens.dtype)
        summaries = attention_pool(self.role, text_tokens, attention_mask)  # [B, 3, H]
        queries, relation_words = self.query(summaries[:, :2]), summaries[:, 2]
        keys, values = self.key(image_tokens), self.value(image_tokens)
        content = torch.einsum("bkh,bnh->bkn", queries, keys) / math.sqrt(self.hidden_size)
        first = content[:, 0]
        landing_1 = first.softmax(-1) @ centres
        direction = self.direction(question)
        towards = torch.tanh(self.sharpness * (centres[None] - landing_1[:, None])) @ direction[..., None]
        second = content[:, 1] + self.direction_gain * towards.squeeze(-1)
        landing_2 = second.softmax(-1) @ centres
        logits = torch.stack([first, second], dim=1)
        read = (logits.softmax(-1) @ values).flatten(1)  # [B, 2H]
        offset = torch.tanh(self.sharpness * (landing_2 - landing_1))
        points = torch.cat([landing_1, landing_2, offset], dim=1)
        relation = (self.relation(relation_words).view(-1, self.relation_features, 6) @ points[..., None]).squeeze(-1)
        aligned = self.relation_direction(relation_words) * offset
        features = torch.cat([read, relation, offset, aligned, aligned.sum(-1, keepdim=True)], dim=1)
        return PointerHops(features=features, logits=logits)
