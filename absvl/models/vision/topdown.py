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


def qkv_rows(
    qkv: nn.Linear, x: torch.Tensor, start: int, stop: int, td: torch.Tensor | None = None, td_bias: bool = False
) -> torch.Tensor:
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


# a gate open on fewer tokens than this at the end of training is reported as shut
SHUT_GATE_OPEN_SHARE = 0.01


@torch.no_grad()
def topdown_health(output, xi: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Is the prior steering the backbone? Scalars for the training log, from one batch's forward.

    ``gate/mean``, ``gate/open``, ``gate/max``: the prior gate ``clamp(cos(ξ, z_i), 0, 1)`` on the
    spatial tokens (mean value, share of tokens with a non-zero gate, largest value);
    ``gate/spread``: its standard deviation over a sample's tokens, averaged (0 = the gate does not
    pick anything out); ``prior/xi_pairwise_cos``: mean cosine between the batch's different ξ
    (near 1 = the prior does not tell the texts apart); ``topdown/change``: ‖z_td − z_bu‖ / ‖z_bu‖
    of the output tokens. Only what the backbone has is returned (tensors: no device sync here).
    """
    stats: dict[str, torch.Tensor] = {}
    if output.prior_mask is not None:
        gate = output.prior_mask[:, output.num_prefix_tokens :, 0].float()
        stats["gate/mean"] = gate.mean()
        stats["gate/open"] = (gate > 0).float().mean()
        stats["gate/max"] = gate.amax()
        stats["gate/spread"] = gate.std(dim=1).mean() if gate.shape[1] > 1 else gate.new_zeros(())
    if xi is not None and xi.dim() == 2 and xi.shape[0] > 1:
        unit = F.normalize(xi.float(), dim=-1)
        cos, n = unit @ unit.t(), unit.shape[0]
        stats["prior/xi_pairwise_cos"] = (cos.sum() - cos.diagonal().sum()) / (n * n - n)
    if output.tokens is not output.bottom_up_tokens:
        z, z_bu = output.tokens.float(), output.bottom_up_tokens.float()
        stats["topdown/change"] = (z - z_bu).norm(dim=-1).mean() / z_bu.norm(dim=-1).mean().clamp(min=1e-12)
    return stats


def shut_gate_warning(stats: dict[str, float]) -> str | None:
    """A warning when the logged ``gate/open`` share says the prior gate passes (almost) nothing."""
    share = stats.get("gate/open")
    if share is None or share >= SHUT_GATE_OPEN_SHARE:
        return None
    return (
        f"the prior gate clamp(cos(xi, z), 0, 1) stayed shut: open on {100 * share:.2f} % of the tokens at the last "
        "logged step, so the top-down pass changes nothing. The gate only learns where its cosines are > 0: start the vision "
        "encoder from pretrained weights, raise model.prior_loss_weight, or check that the prior loss is on"
    )
