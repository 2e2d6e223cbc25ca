"""The one output type every vision backbone returns."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch


@dataclass
class BackboneOutput:
    """What a backbone computed for a batch of images.

    ``tokens``/``pooled`` are the model's output: the top-down (second-pass) result for
    backbones with a feedback path, the only pass otherwise. ``bottom_up_*`` hold the
    first, query-independent pass (the same tensors when there is no top-down path); they
    are what a retrieval index stores once per image.

    Attributes:
        tokens: ``[B, N, C]`` output tokens after the final norm; the first
            ``num_prefix_tokens`` are prefix tokens ([cls], or the pooled token of a CNN).
        pooled: ``[B, C]`` pooled representation (cls token, mean of patch tokens, or CNN GAP).
        bottom_up_tokens: ``[B, N, C]`` first-pass tokens.
        bottom_up_pooled: ``[B, C]`` first-pass pooled representation.
        grid_size: ``(h, w)`` of the patch / feature grid behind the non-prefix tokens.
        num_prefix_tokens: how many leading tokens are not spatial.
        logits: classifier output on ``pooled`` when the backbone has a head.
        bottom_up_logits: classifier output on ``bottom_up_pooled`` when it has a head.
        aux_losses: unweighted auxiliary losses, e.g. ``{"var": L_var}`` (AbSViT Eq. 13/14).
        maps: ``[B, h, w]`` maps for visualisation, keyed ``"bottom_up"`` / ``"top_down"``;
            filled only when the forward is called with ``return_maps=True``.
        prior_mask: ``[B, N, 1]`` the prior gate ``clamp(cos(ξ, z_i), 0, 1)`` on the first-pass
            tokens (AbSViT Eq. 8, before the scale α), for backbones whose top-down pass reads a
            prior; None otherwise (and with ``bottom_up_only``).
        embedded: ``[B, N, C]`` the first pass's input tokens in_0 (patch + position embedding), from
            which a ViT's top-down pass restarts; None for CNNs.
    """

    tokens: torch.Tensor
    pooled: torch.Tensor
    bottom_up_tokens: torch.Tensor
    bottom_up_pooled: torch.Tensor
    grid_size: tuple[int, int]
    num_prefix_tokens: int
    logits: torch.Tensor | None = None
    bottom_up_logits: torch.Tensor | None = None
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    maps: dict[str, torch.Tensor] = field(default_factory=dict)
    prior_mask: torch.Tensor | None = None
    embedded: torch.Tensor | None = None

    def select(self, index: torch.Tensor) -> BackboneOutput:
        """The rows ``index`` of every per-sample tensor, e.g. a first pass repeated for several priors.

        Tensors shared between fields stay shared; ``aux_losses`` (batch means) are left out.
        """
        picked: dict[int, torch.Tensor] = {}

        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None:
                return None
            if id(t) not in picked:
                picked[id(t)] = t[index]
            return picked[id(t)]

        return replace(
            self,
            tokens=pick(self.tokens),
            pooled=pick(self.pooled),
            bottom_up_tokens=pick(self.bottom_up_tokens),
            bottom_up_pooled=pick(self.bottom_up_pooled),
            logits=pick(self.logits),
            bottom_up_logits=pick(self.bottom_up_logits),
            aux_losses={},
            maps={k: pick(v) for k, v in self.maps.items()},
            prior_mask=pick(self.prior_mask),
            embedded=pick(self.embedded),
        )

    @property
    def patch_tokens(self) -> torch.Tensor:
        """``[B, h*w, C]`` spatial tokens of the output (prefix tokens dropped)."""
        return self.tokens[:, self.num_prefix_tokens :]


def token_norm_map(tokens: torch.Tensor, num_prefix_tokens: int, grid_size: tuple[int, int]) -> torch.Tensor:
    """Per-token L2 norm of the spatial tokens as a ``[B, h, w]`` map (AbSViT Fig. 4/6)."""
    h, w = grid_size
    return tokens[:, num_prefix_tokens:].norm(dim=-1).reshape(tokens.shape[0], h, w)
