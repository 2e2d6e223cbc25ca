"""ResNets with the Top-Down Attention Module (TDAM, Jaiswal et al. ECCV 2022), as vision backbones.

A TDAM block runs its last ``m`` layers ``steps`` times; between steps a searchlight from the
block's top map modulates its bottom map (Eq. 2-5, :class:`TopDownAttention`), and each step
has its own BatchNorms (``bn{i}_{t}``, the authors' names). Parameter names are timm's
``resnet.py`` (its weights load); docs/backbones.md has the placement, the maps and how the
authors' ``RA_block`` keys map.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Sequence
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from torch import nn

from .output import BackboneOutput, token_norm_map
from .registry import register_backbone

TDAM_MODES = ("joint", "top")
_EXTRA_KEYS = re.compile(r"\.tdam\.|\.bn\d+_\d+\.")  # searchlight, per-step BatchNorms: not in plain weights


class TopDownAttention(nn.Module):
    """The searchlight and its channel-then-spatial modulation of the bottom map (TDAM Eq. 2-5).

    ``top_proj`` is W1, ``bottom_proj`` W2 (joint mode only), ``searchlight`` W3; all bias-free
    1×1 convolutions on pooled vectors, hidden width ``C_top // reduction`` for both branches.
    """

    def __init__(self, bottom_channels: int, top_channels: int, mode: str = "joint", reduction: int = 16) -> None:
        super().__init__()
        if mode not in TDAM_MODES:
            raise ValueError(f"mode={mode!r} is not one of {', '.join(TDAM_MODES)}")
        hidden = max(1, top_channels // reduction)
        self.top_proj = nn.Conv2d(top_channels, hidden, 1, bias=False)
        self.bottom_proj = nn.Conv2d(bottom_channels, hidden, 1, bias=False) if mode == "joint" else None
        self.searchlight = nn.Conv2d(hidden * (2 if mode == "joint" else 1), bottom_channels, 1, bias=False)

    def forward(self, bottom: torch.Tensor, top: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the modulated bottom map x'' ``[B, C_b, h, w]`` and the spatial map a ``[B, h, w]``."""
        h = F.relu(self.top_proj(top.mean((2, 3), keepdim=True)))
        if self.bottom_proj is not None:
            h = torch.cat([h, F.relu(self.bottom_proj(bottom.mean((2, 3), keepdim=True)))], dim=1)
        s = self.searchlight(h)
        x = torch.sigmoid(s) * bottom
        a = torch.sigmoid((s * x).sum(1, keepdim=True))
        return a * x, a.squeeze(1)


class _TopDownBlock(nn.Module):
    """Residual block whose last ``m`` layers run ``steps`` times with TDAM feedback in between.

    Mixed in before timm's block class, whose layers it runs through ``layer(i, x, t)``:
    layer i (0-based) is conv{i+1} → BatchNorm of step t → the block's activation etc.
    ``steps`` may be lowered after construction to output an earlier step (1 = feedforward).
    """

    num_layers: int
    last_act: str

    def _init_tdam(self, steps: int, mode: str, reduction: int, m: int) -> None:
        if steps < 1:
            raise ValueError(f"steps={steps} must be >= 1")
        if not 1 <= m <= self.num_layers:
            raise ValueError(f"m={m} must be in 1..{self.num_layers} for {type(self).__name__}")
        self.steps, self.m = steps, m
        self.first_recomputed = self.num_layers - m
        self.searchlight_map: torch.Tensor | None = None  # the last forward's a [B, h, w] (the top-down map)
        if steps > 1:
            bottom = getattr(self, f"conv{self.first_recomputed + 1}").in_channels
            top = getattr(self, f"conv{self.num_layers}").out_channels
            self.tdam = TopDownAttention(bottom, top, mode, reduction)
        for t in range(1, steps):
            for i in range(self.first_recomputed, self.num_layers):
                self.add_module(f"bn{i + 1}_{t}", copy.deepcopy(getattr(self, f"bn{i + 1}")))

    def norm(self, i: int, t: int) -> nn.Module:
        """BatchNorm of layer i at step t: timm's ``bn{i+1}`` for t = 0, ``bn{i+1}_{t}`` after."""
        return getattr(self, f"bn{i + 1}" if t == 0 else f"bn{i + 1}_{t}")

    @torch.no_grad()
    def sync_step_norms(self) -> None:
        """Copy every step-0 BatchNorm (parameters and statistics) into its step ≥ 1 copies."""
        for t in range(1, self.steps):
            for i in range(self.first_recomputed, self.num_layers):
                self.norm(i, t).load_state_dict(self.norm(i, 0).state_dict())

    def zero_init_last(self) -> None:
        super().zero_init_last()
        self.sync_step_norms()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        for i in range(self.first_recomputed):
            x = self.layer(i, x, 0)
        bottom = top = x
        for t in range(self.steps):
            if t:  # the previous step's output steers this step's input
                bottom, self.searchlight_map = self.tdam(bottom, top)
            top = bottom
            for i in range(self.first_recomputed, self.num_layers):
                top = self.layer(i, top, t)
        if self.se is not None:
            top = self.se(top)
        if self.drop_path is not None:
            top = self.drop_path(top)
        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        return getattr(self, self.last_act)(top + shortcut)


class TDAMBottleneck(_TopDownBlock, Bottleneck):
    """timm Bottleneck with TDAM (default m = 1: conv3/bn3 recomputed from the modulated act2 output)."""

    num_layers, last_act = 3, "act3"

    def __init__(self, *args: Any, steps: int = 2, mode: str = "joint", reduction: int = 16, m: int = 1, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._init_tdam(steps, mode, reduction, m)

    def layer(self, i: int, x: torch.Tensor, t: int) -> torch.Tensor:
        x = self.norm(i, t)(getattr(self, f"conv{i + 1}")(x))
        if i == 0:
            return self.act1(x)
        if i == 1:
            return self.aa(self.act2(self.drop_block(x)))
        return x


class TDAMBasicBlock(_TopDownBlock, BasicBlock):
    """timm BasicBlock with TDAM (default m = 2: both convs recomputed from the modulated block input)."""

    num_layers, last_act = 2, "act2"

    def __init__(self, *args: Any, steps: int = 2, mode: str = "joint", reduction: int = 16, m: int = 2, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._init_tdam(steps, mode, reduction, m)

    def layer(self, i: int, x: torch.Tensor, t: int) -> torch.Tensor:
        x = self.norm(i, t)(getattr(self, f"conv{i + 1}")(x))
        if i == 0:
            return self.aa(self.act1(self.drop_block(x)))
        return x


_TDAM_BLOCKS = {Bottleneck: TDAMBottleneck, BasicBlock: TDAMBasicBlock}


class ResNetBackbone(ResNet):
    """timm ResNet (its parameter names and init) with TDAM blocks in ``stages``, as a vision backbone."""

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: tuple[int, ...],
        num_classes: int = 0,
        stages: tuple[int, ...] = (),
        steps: int = 2,
        mode: str = "joint",
        reduction: int = 16,
        m: int | None = None,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            block, layers, num_classes, **kwargs: as for timm's ``ResNet``.
            stages: which of ``layer1``..``layer4`` get TDAM blocks (``()``: a plain ResNet).
            steps: computation steps T (1 = feedforward only, no TDAM parameters).
            mode: ``joint`` (top and bottom maps make the searchlight) or ``top``.
            reduction: hidden width of the searchlight MLPs is ``C_top // reduction``.
            m: feedback distance (layers recomputed per step); default 1 for Bottleneck, 2 for BasicBlock.
        """
        if not set(stages) <= {1, 2, 3, 4}:
            raise ValueError(f"stages={stages} must be a subset of (1, 2, 3, 4)")
        if stages:
            options = dict(steps=steps, mode=mode, reduction=reduction, **({} if m is None else {"m": m}))
            tdam_block = partial(_TDAM_BLOCKS[block], **options)
            tdam_block.expansion = block.expansion
            block = tuple(tdam_block if s in stages else block for s in (1, 2, 3, 4))
        super().__init__(block, layers, num_classes=num_classes, **kwargs)
        self.num_prefix_tokens = 1

    def tdam_blocks(self) -> list[_TopDownBlock]:
        return [b for b in self.modules() if isinstance(b, _TopDownBlock)]

    def sync_step_norms(self) -> None:
        """Copy step-0 BatchNorms into the per-step copies of every TDAM block (after loading plain weights)."""
        for b in self.tdam_blocks():
            b.sync_step_norms()

    @torch.no_grad()
    def init_missing_weights(self, missing: Iterable[str]) -> list[str]:
        """After loading plain (timm ResNet) weights: the per-step BatchNorms the weights lacked start as
        copies of the step-0 ones (the searchlight keeps timm's init); returns the ``missing`` keys TDAM adds."""
        missing = list(missing)
        lacking = set(missing)
        for prefix, block in self.named_modules():
            if isinstance(block, _TopDownBlock):
                for t in range(1, block.steps):
                    for i in range(block.first_recomputed, block.num_layers):
                        if f"{prefix}.bn{i + 1}_{t}.weight" in lacking:
                            block.norm(i, t).load_state_dict(block.norm(i, 0).state_dict())
        return [k for k in missing if _EXTRA_KEYS.search(k)]

    pools_mean = False  # the prefix token is the global average itself

    def norm_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """The tokens as they are: timm's ResNet head reads the feature map unnormalised."""
        return tokens

    gate_tokens = norm_tokens  # the space the prior loss aligns ξ with

    # --- timm's interface, xi accepted and ignored: TDAM's top-down signal is inside each block
    def forward_features(self, images: torch.Tensor, xi: torch.Tensor | None = None) -> torch.Tensor:
        """The last feature map ``[B, C, h, w]`` (timm's ``ResNet.forward_features``)."""
        return super().forward_features(images)

    def forward_intermediates(
        self,
        images: torch.Tensor,
        xi: torch.Tensor | None = None,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """timm's ``ResNet.forward_intermediates`` (the stem and the four stages)."""
        return super().forward_intermediates(images, indices, norm, stop_early, output_fmt, intermediates_only)

    def forward(
        self,
        images: torch.Tensor,
        xi: torch.Tensor | None = None,
        return_maps: bool = False,
        bottom_up_only: bool = False,
    ) -> BackboneOutput:
        """Run the backbone on ``[B, 3, H, W]`` images of any size; ``xi`` is ignored (TDAM's
        top-down signal comes from each block's own top layers, inside the one pass, so
        ``bottom_up_only`` changes nothing).

        Tokens: the last feature map's positions after its global average (``num_prefix_tokens = 1``).
        Maps: ``bottom_up`` the per-position norm of the last feature map, ``top_down`` the spatial
        searchlight map a of the last TDAM block's last step (average-pooled to the last grid).
        """
        features = self.forward_features(images)
        grid = (features.shape[-2], features.shape[-1])
        pooled = self.global_pool(features)
        tokens = torch.cat([pooled.unsqueeze(1), features.flatten(2).transpose(1, 2)], dim=1)
        logits = self.forward_head(features) if self.num_classes > 0 else None
        return BackboneOutput(
            tokens=tokens,
            pooled=pooled,
            bottom_up_tokens=tokens,
            bottom_up_pooled=pooled,
            grid_size=grid,
            num_prefix_tokens=1,
            logits=logits,
            bottom_up_logits=logits,
            maps=self._maps(tokens, grid) if return_maps else {},
        )

    def _maps(self, tokens: torch.Tensor, grid: tuple[int, int]) -> dict[str, torch.Tensor]:
        maps = {"bottom_up": token_norm_map(tokens, 1, grid)}
        last = next((b for b in reversed(self.tdam_blocks()) if b.steps > 1), None)
        if last is not None:
            a = last.searchlight_map
            maps["top_down"] = a if a.shape[-2:] == grid else F.adaptive_avg_pool2d(a.unsqueeze(1), grid).squeeze(1)
        return maps

    def top_down(
        self, first: BackboneOutput, xi: torch.Tensor | None = None, return_maps: bool = False
    ) -> BackboneOutput:
        """``first``: TDAM's top-down signal is inside the one pass and ξ is ignored (the ViT interface)."""
        return first


# --- registered architectures: timm's ResNets and their TDAM versions (layer3 + layer4, joint, T = 2)
_TEST = dict(layers=(1, 1, 2, 2), channels=(8, 16, 32, 64))  # test-sized: widths 8-64 (Bottleneck outputs 32-256)
_TDAM = dict(stages=(3, 4))


def _resnet(
    block: type[BasicBlock] | type[Bottleneck], fixed: dict[str, Any], overrides: dict[str, Any]
) -> ResNetBackbone:
    return ResNetBackbone(**{"block": block, **fixed, **overrides})


@register_backbone("resnet", pretrained="resnet18.tv_in1k")
def resnet18(**kwargs: Any) -> ResNetBackbone:
    """ResNet-18 (BasicBlock, [2, 2, 2, 2])."""
    return _resnet(BasicBlock, dict(layers=(2, 2, 2, 2)), kwargs)


@register_backbone("tdam", pretrained="resnet18.tv_in1k")
def tdam_resnet18(**kwargs: Any) -> ResNetBackbone:
    """TDAM ResNet-18."""
    return _resnet(BasicBlock, dict(layers=(2, 2, 2, 2), **_TDAM), kwargs)


@register_backbone("resnet", pretrained="resnet34.tv_in1k")
def resnet34(**kwargs: Any) -> ResNetBackbone:
    """ResNet-34 (BasicBlock, [3, 4, 6, 3])."""
    return _resnet(BasicBlock, dict(layers=(3, 4, 6, 3)), kwargs)


@register_backbone("tdam", pretrained="resnet34.tv_in1k")
def tdam_resnet34(**kwargs: Any) -> ResNetBackbone:
    """TDAM ResNet-34."""
    return _resnet(BasicBlock, dict(layers=(3, 4, 6, 3), **_TDAM), kwargs)


@register_backbone("resnet", pretrained="resnet50.tv_in1k")
def resnet50(**kwargs: Any) -> ResNetBackbone:
    """ResNet-50 (Bottleneck, [3, 4, 6, 3])."""
    return _resnet(Bottleneck, dict(layers=(3, 4, 6, 3)), kwargs)


@register_backbone("tdam", pretrained="resnet50.tv_in1k")
def tdam_resnet50(**kwargs: Any) -> ResNetBackbone:
    """TDAM ResNet-50."""
    return _resnet(Bottleneck, dict(layers=(3, 4, 6, 3), **_TDAM), kwargs)


@register_backbone("resnet", pretrained="resnet101.tv_in1k")
def resnet101(**kwargs: Any) -> ResNetBackbone:
    """ResNet-101 (Bottleneck, [3, 4, 23, 3])."""
    return _resnet(Bottleneck, dict(layers=(3, 4, 23, 3)), kwargs)


@register_backbone("tdam", pretrained="resnet101.tv_in1k")
def tdam_resnet101(**kwargs: Any) -> ResNetBackbone:
    """TDAM ResNet-101."""
    return _resnet(Bottleneck, dict(layers=(3, 4, 23, 3), **_TDAM), kwargs)


@register_backbone("resnet", test_size=True)
def resnet_test(**kwargs: Any) -> ResNetBackbone:
    """Test-sized ResNet (BasicBlock, [1, 1, 2, 2], widths 8-64)."""
    return _resnet(BasicBlock, dict(_TEST), kwargs)


@register_backbone("tdam", test_size=True)
def tdam_resnet_test(**kwargs: Any) -> ResNetBackbone:
    """Test-sized TDAM ResNet (BasicBlock)."""
    return _resnet(BasicBlock, dict(_TEST, **_TDAM), kwargs)


@register_backbone("resnet", test_size=True)
def resnet_test_bottleneck(**kwargs: Any) -> ResNetBackbone:
    """Test-sized ResNet (Bottleneck, [1, 1, 2, 2], widths 8-64)."""
    return _resnet(Bottleneck, dict(_TEST), kwargs)


@register_backbone("tdam", test_size=True)
def tdam_resnet_test_bottleneck(**kwargs: Any) -> ResNetBackbone:
    """Test-sized TDAM ResNet (Bottleneck)."""
    return _resnet(Bottleneck, dict(_TEST, **_TDAM), kwargs)
