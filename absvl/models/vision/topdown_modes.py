"""The ViT's ``topdown`` modes: AbSViT and the paper's baselines (Shi et al. CVPR 2023, Sec. 4, Sec. 5).

Each mode is a stateless object looked up by name in ``TOPDOWN_MODES``; the model asks it, after
its first pass, for the output of the top-down pass (:meth:`TopDown.run`). The model provides
``prompt`` (the free ξ), ``alpha``, ``feedback`` (the decoders), ``run_blocks``, ``map_index``
and ``variational_loss``; the table of what each mode changes is in docs/backbones.md.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .output import BackboneOutput, token_norm_map
from .topdown import prior_mask


class TopDownDecoder(nn.Module):
    """Feedback path of one block (AbSViT Eq. 10): ``h_l = A_l h_{l+1}``, ``td_l = B_l h_l``.

    ``linear`` is A_l and ``linear2`` is B_l, both bias-free and token-wise.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, dim, bias=False)
        self.linear2 = nn.Linear(dim, dim, bias=False)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.linear(h)
        return h, self.linear2(h)


@dataclass
class TopDownPass:
    """What a mode made of a first pass.

    ``tokens``: the normed output tokens; ``gate``: the prior gate on the first-pass tokens (Eq. 8,
    before α) for modes that read ξ; ``aux_losses``: e.g. ``{"var": L_var}``; ``top_down_map``: the
    ``[B, h, w]`` map when asked for; ``intermediates``: the outputs of the blocks ``take`` of the
    second pass (None when the blocks did not run again).
    """

    tokens: torch.Tensor
    gate: torch.Tensor | None = None
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    top_down_map: torch.Tensor | None = None
    intermediates: list[torch.Tensor] | None = None


class TopDown:
    """``none``: no top-down path; the first pass is the output (:meth:`run` returns None)."""

    needs_decoders = False  # the model builds ``decoders`` (A_l, B_l) and trains them with L_var
    uses_prior = False  # the model builds the free ξ ``prompt``; ``xi`` steers the output
    td_target = "v"  # where the attention layers add top-down tokens: ``v`` (Eq. 9) or ``qkv``

    def run(
        self,
        model: Any,
        first: BackboneOutput,
        xi: torch.Tensor | None,
        return_maps: bool = False,
        take: Sequence[int] = (),
    ) -> TopDownPass | None:
        """The top-down output from the first pass ``first`` (which holds ``embedded`` in_0)."""
        return None

    def gate(self, model: Any, z: torch.Tensor, xi: torch.Tensor | None) -> torch.Tensor:
        """``clamp(cos(ξ, z_i), 0, 1)`` with ξ = ``xi``, or the learned ``prompt`` when it is None (Eq. 8)."""
        prior = model.prompt if xi is None else xi
        return prior_mask(z, prior.to(z.dtype))


class Perceiver(TopDown):
    """PerceiverIO-style: the first-pass tokens reweighted by ``α·gate`` are the output; no second pass."""

    uses_prior = True

    def run(self, model, first, xi, return_maps=False, take=()):
        z, grid = first.bottom_up_tokens, first.grid_size
        gate = self.gate(model, model.gate_tokens(z), xi)
        mask = model.alpha * gate
        # the bottom-up map (the same block) with its tokens masked
        maps = (
            first.maps["bottom_up"] * mask[:, first.num_prefix_tokens :, 0].reshape(z.shape[0], *grid)
            if return_maps
            else None
        )
        return TopDownPass(z * mask, gate=gate, top_down_map=maps)


class SecondPass(TopDown, ABC):
    """Modes that run the blocks again from in_0 with top-down tokens ``td`` or a value mask."""

    @abstractmethod
    def inputs(
        self, model: Any, z: torch.Tensor, gate: torch.Tensor | None
    ) -> tuple[list[torch.Tensor] | None, torch.Tensor | None]:
        """(top-down tokens per block, value mask) for the second pass."""

    def run(self, model, first, xi, return_maps=False, take=()):
        # z_L: the first pass's output tokens as the top-down pass reads them (Eq. 8; ``gate_tokens``)
        z, grid = model.gate_tokens(first.bottom_up_tokens), first.grid_size
        gate = self.gate(model, z, xi) if self.uses_prior else None
        td, value_mask = self.inputs(model, z, gate)
        with_var = model.training and model.variational_loss and self.needs_decoders
        map_index = model.map_index
        wanted = (*take, map_index) if return_maps else tuple(take)
        tokens, var_loss, taken = model.run_blocks(first.embedded, grid, td, value_mask, with_var, take=wanted)
        return TopDownPass(
            tokens,
            gate=gate,
            aux_losses={} if var_loss is None else {"var": var_loss},
            top_down_map=token_norm_map(taken[map_index], first.num_prefix_tokens, grid) if return_maps else None,
            intermediates=[taken[i] for i in take],
        )


class AbSViT(SecondPass):
    """AbSViT: ``α·gate·z`` fed back through the decoders; ``td_l`` added to the values (Eq. 8-10)."""

    needs_decoders = uses_prior = True

    def inputs(self, model, z, gate):
        return model.feedback(z * (model.alpha * gate)), None


class QKV(AbSViT):
    """AbSViT-QKV: as AbSViT with ``td_l`` added to queries, keys and values."""

    td_target = "qkv"


class Feedback(SecondPass):
    """The output tokens fed back through the decoders without prior reweighting."""

    needs_decoders = True

    def inputs(self, model, z, gate):
        return model.feedback(z), None


class MaskAtt(SecondPass):
    """The soft mask ``α·gate`` reweights the values of every attention layer of a second pass."""

    uses_prior = True

    def inputs(self, model, z, gate):
        return None, model.alpha * gate


TOPDOWN_MODES: dict[str, TopDown] = {
    "none": TopDown(),
    "absvit": AbSViT(),
    "qkv": QKV(),
    "feedback": Feedback(),
    "perceiver": Perceiver(),
    "maskatt": MaskAtt(),
}


def get_topdown(name: str) -> TopDown:
    if name not in TOPDOWN_MODES:
        raise ValueError(f"topdown={name!r} is not one of {', '.join(TOPDOWN_MODES)}")
    return TOPDOWN_MODES[name]
