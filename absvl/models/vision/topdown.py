"""The two pieces of AbSViT's top-down path that every attention layer shares (Shi et al. 2023)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def prior_mask(tokens: torch.Tensor, xi: torch.Tensor) -> torch.Tensor:
    """``clamp(cos(ξ, z_i), 0, 1)`` for every token: ``[B, N, 1]`` (AbSViT Eq. 8).

    ``xi`` is ``[C]`` (one prior for the batch) or ``[B, C]`` (one per sample).
    """
    xi = xi.expand(tokens.shape[0], -1) if xi.dim() == 1 else xi
    cos = F.normalize(tokens, dim=-1) @ F.normalize(xi, dim=-1).unsqueeze(-1)
    return cos.clamp(0.0, 1.0)


def qkv_rows(qkv: nn.Linear, x: torch.Tensor, start: int, stop: int, td: torch.Tensor | None = None, td_bias: bool = False) -> torch.Tensor:
    """Rows ``[start·C, stop·C)`` of a fused qkv projection (0 q, 1 k, 2 v) applied to ``x``,
    with the top-down tokens ``td`` added to the input when given (AbSViT Eq. 9).

    By linearity ``W·x + W·td = W·(x + td)``: the top-down signal costs one addition, not a
    second projection. ``td_bias`` adds the bias once more, as the authors' code does when it
    sends ``td`` through the whole qkv linear.
    """
    dim = x.shape[-1]
    rows = slice(start * dim, stop * dim)
    bias = qkv.bias[rows] if qkv.bias is not None else None
    if td is None:
        return F.linear(x, qkv.weight[rows], bias)
    if td_bias and bias is not None:
        bias = 2 * bias
    return F.linear(x + td, qkv.weight[rows], bias)
