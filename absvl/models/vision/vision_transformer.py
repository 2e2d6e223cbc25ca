"""Vision Transformer with a top-down path: ViT, AbSViT and the AbSViT paper's baselines.

One model class covers the family; the ``topdown`` field picks how (or whether) a prior
ξ steers the second feedforward pass (AbSViT, Shi et al. CVPR 2023, Sec. 4 and Sec. 5):

``none``       plain pre-norm ViT, one pass (timm/DeiT parameter names, their weights load).
``absvit``     feedforward → prior modulation → feedback decoders → second pass with the
               top-down tokens added to the attention *values* only.
``qkv``        AbSViT-QKV: the top-down tokens are added to queries, keys and values.
``feedback``   the output tokens go through the decoders without prior reweighting.
``perceiver``  PerceiverIO-style: the first-pass tokens reweighted by the prior mask are
               the output; no feedback, no second pass.
``maskatt``    the soft prior mask reweights the value tokens of every attention layer of
               a second pass instead of adding top-down tokens.

Parameter names follow timm's ``vision_transformer.py``; the feedback path adds
``decoders.{i}.linear`` (A_i), ``decoders.{i}.linear2`` (B_i) and ``prompt`` (the free ξ),
as in the authors' checkpoints.
"""
from __future__ import annotations

from dataclasses import replace
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, PatchEmbed, resample_abs_pos_embed, trunc_normal_
from timm.models.vision_transformer_hybrid import ConvStem
from torch import nn

from .output import BackboneOutput, token_norm_map
from .registry import register_backbone
from .topdown import prior_mask, qkv_rows
from .vars_attention import VARSDAttention, VARSSAttention, VARSSDAttention

TOPDOWN_MODES = ("none", "absvit", "qkv", "feedback", "perceiver", "maskatt")
_MODES_WITH_DECODERS = ("absvit", "qkv", "feedback")
_MODES_WITH_PRIOR = ("absvit", "qkv", "perceiver", "maskatt")


class Attention(nn.Module):
    """Multi-head softmax self-attention (fused SDPA) with an optional top-down input.

    ``td`` is added to the values only (``td_target="v"``, AbSViT Eq. 9: Q and K hold the
    object templates, which top-down must not change) or to Q, K and V (``"qkv"``):
    ``V = W_v·x + b_v + W_v·td``, computed as ``W_v·(x + td) + b_v`` (see ``qkv_rows``), so
    the top-down pass costs no more projection work than the bottom-up one. The authors' code sends ``td`` through the full qkv linear,
    adding the value bias a second time; ``td_bias=True`` reproduces that (for their
    checkpoints). ``value_mask`` (``[B, N, 1]``) reweights the values (MaskAtt).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        td_target: str = "v",
        td_bias: bool = False,
        num_prefix_tokens: int = 1,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.td_target = td_target
        self.td_bias = td_bias
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(
        self,
        x: torch.Tensor,
        td: torch.Tensor | None = None,
        value_mask: torch.Tensor | None = None,
        grid_size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        B, N, C = x.shape
        heads = lambda t, n: t.view(B, N, n, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # noqa: E731
        if td is None:
            q, k, v = heads(self.qkv(x), 3)
        elif self.td_target == "qkv":
            q, k, v = heads(qkv_rows(self.qkv, x, 0, 3, td, self.td_bias), 3)
        else:  # Q and K from x alone, V from x + td
            q, k = heads(qkv_rows(self.qkv, x, 0, 2), 2)
            v = heads(qkv_rows(self.qkv, x, 2, 3, td, self.td_bias), 1)[0]
        if value_mask is not None:
            v = v * value_mask.unsqueeze(1)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, C)))


ATTENTION_LAYERS = {
    "softmax": Attention,
    "vars_d": VARSDAttention,
    "vars_s": VARSSAttention,
    "vars_sd": VARSSDAttention,
}


class Block(nn.Module):
    """Pre-norm transformer block: ``x + Attn(LN(x), td)`` then ``x + MLP(LN(x))``."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        attn_layer: type[nn.Module] = Attention,
        attn_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = attn_layer(
            dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop, **(attn_kwargs or {})
        )
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(
        self,
        x: torch.Tensor,
        td: torch.Tensor | None = None,
        value_mask: torch.Tensor | None = None,
        grid_size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x), td=td, value_mask=value_mask, grid_size=grid_size))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


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


def conv_stem(in_chans: int, embed_dim: int, patch_size: int) -> ConvStem:
    """log2(patch_size) stride-2 3×3 convolutions (BatchNorm + ReLU between them, the last one linear)
    from ``in_chans`` to ``embed_dim`` channels, widths doubling up to ``embed_dim``."""
    depth = int(patch_size).bit_length() - 1
    if patch_size < 2 or 2**depth != patch_size:
        raise ValueError(f"stem='conv' needs a power-of-two patch size >= 2, not {patch_size}")
    channels = tuple(max(embed_dim // 2 ** (depth - 1 - i), 8) for i in range(depth))
    return ConvStem(in_chans, depth=depth, channels=channels, kernel_size=3, stride=(2,) * depth)


class VisionTransformer(nn.Module):
    """ViT backbone with an optional AbSViT-style top-down path (see the module docstring)."""

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 0,
        global_pool: str = "token",
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        class_token: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_eps: float = 1e-6,
        topdown: str = "none",
        alpha: float = 1.0,
        variational_loss: bool = True,
        td_bias: bool = False,
        attention: str = "softmax",
        attention_kwargs: dict[str, Any] | None = None,
        map_block: int | None = None,
        stem: str = "patch",
    ) -> None:
        """
        Args:
            topdown: one of ``TOPDOWN_MODES``.
            alpha: scale of the prior modulation ``α·clamp(cos(ξ, z), 0, 1)·z`` (1 for
                ImageNet, 10 for VL finetuning in the paper).
            variational_loss: compute L_var (Eq. 13/14) in training mode for modes with
                decoders; ``False`` is the "AbSViT w/o L_var" ablation (and saves its cost).
            td_bias: add the value bias to the top-down tokens too, as the authors' code does
                (their checkpoints expect it); off by default, following Eq. 9.
            attention: ``softmax`` or a VARS variant (``vars_d``, ``vars_s``, ``vars_sd``);
                ``attention_kwargs`` go to its constructor (λ, steps, ...).
            map_block: the block (0-based, negative from the end) whose output token norms make
                the attention maps; the default is the block at 3/4 of the depth: for 12 blocks
                "after block L-3" (1-based), as in the authors' demo, for 4 blocks after block 3.
            stem: ``patch`` (ViT's linear patch embedding, timm/DeiT weights load) or ``conv``: a
                stack of stride-2 3×3 convolutions (timm's ``ConvStem``) down to the patch grid
                (Xiao et al. 2021, "Early convolutions help transformers see better"): a locality
                prior that lets a small ViT trained from scratch on little data learn shapes.
        """
        super().__init__()
        if topdown not in TOPDOWN_MODES:
            raise ValueError(f"topdown={topdown!r} is not one of {', '.join(TOPDOWN_MODES)}")
        if global_pool not in ("token", "avg"):
            raise ValueError(f"global_pool={global_pool!r} must be 'token' or 'avg'")
        if global_pool == "token" and not class_token:
            raise ValueError("global_pool='token' needs class_token=True")
        if attention not in ATTENTION_LAYERS:
            raise ValueError(f"attention={attention!r} is not one of {', '.join(ATTENTION_LAYERS)}")
        if stem not in ("patch", "conv"):
            raise ValueError(f"stem={stem!r} must be 'patch' or 'conv'")
        norm_layer = partial(nn.LayerNorm, eps=norm_eps)
        self.topdown = topdown
        self.alpha = alpha
        self.variational_loss = variational_loss
        self.global_pool = global_pool
        self.num_features = self.embed_dim = embed_dim
        self.num_classes = num_classes
        self.num_prefix_tokens = 1 if class_token else 0
        self.map_block = round(0.75 * depth) - 1 if map_block is None else map_block

        self.patch_embed = PatchEmbed(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, strict_img_size=False
        )
        if stem == "conv":
            self.patch_embed.proj = conv_stem(in_chans, embed_dim, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + self.num_prefix_tokens, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)

        attn_kwargs = dict(attention_kwargs or {})
        attn_kwargs.update(
            td_target="qkv" if topdown == "qkv" else "v", td_bias=td_bias, num_prefix_tokens=self.num_prefix_tokens
        )
        if attention == "vars_sd":  # its learned token x atom matrix lives on the native grid
            attn_kwargs.setdefault("grid_size", self.patch_embed.grid_size)
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # stochastic depth decay
        self.blocks = nn.ModuleList(
            Block(
                embed_dim,
                num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                proj_drop=drop_rate,
                attn_drop=attn_drop_rate,
                drop_path=dpr[i],
                norm_layer=norm_layer,
                attn_layer=ATTENTION_LAYERS[attention],
                attn_kwargs=attn_kwargs,
            )
            for i in range(depth)
        )
        use_fc_norm = global_pool == "avg"
        self.norm = nn.Identity() if use_fc_norm else norm_layer(embed_dim)
        if topdown in _MODES_WITH_DECODERS:
            self.decoders = nn.ModuleList(TopDownDecoder(embed_dim) for _ in range(depth))
        if topdown in _MODES_WITH_PRIOR:
            self.prompt = nn.Parameter(torch.randn(embed_dim))
        self.fc_norm = norm_layer(embed_dim) if use_fc_norm else nn.Identity()
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()

    def init_weights(self) -> None:
        """timm's ViT init: trunc-normal 0.02 for linears and pos_embed (decoders included)."""
        trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token", "prompt"}

    # --- the passes -------------------------------------------------------------------
    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Patch + position embedding (in_0); position embeddings are resampled to the grid."""
        if images.shape[-2] % self.patch_embed.patch_size[0] or images.shape[-1] % self.patch_embed.patch_size[1]:
            raise ValueError(
                f"image size {tuple(images.shape[-2:])} is not divisible by the patch size {self.patch_embed.patch_size}"
            )
        x = self.patch_embed(images)
        grid = (images.shape[-2] // self.patch_embed.patch_size[0], images.shape[-1] // self.patch_embed.patch_size[1])
        pos_embed = self.pos_embed
        if grid != self.patch_embed.grid_size:
            pos_embed = resample_abs_pos_embed(
                pos_embed, new_size=grid, old_size=self.patch_embed.grid_size, num_prefix_tokens=self.num_prefix_tokens
            )
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.pos_drop(x + pos_embed), grid

    def run_blocks(
        self,
        x: torch.Tensor,
        grid: tuple[int, int],
        td: list[torch.Tensor] | None = None,
        value_mask: torch.Tensor | None = None,
        with_var_loss: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """One feedforward pass. Returns (normed output tokens, L_var or None, map-block output).

        L_var (AbSViT Eq. 13/14 as the authors implement it) is Σ_l MSE(A_l(sg(out_l)), sg(in_l)),
        accumulated block by block so no activations are kept for it.
        """
        var_loss = None
        map_index = self.map_block % len(self.blocks)
        map_tokens = x
        for i, block in enumerate(self.blocks):
            x_in = x
            x = block(x, td=None if td is None else td[i], value_mask=value_mask, grid_size=grid)
            if with_var_loss:
                recon = self.decoders[i].linear(x.detach())
                term = F.mse_loss(recon, x_in.detach())
                var_loss = term if var_loss is None else var_loss + term
            if i == map_index:
                map_tokens = x
        return self.norm(x), var_loss, map_tokens

    def feedback(self, h: torch.Tensor) -> list[torch.Tensor]:
        """Top-down tokens td_l for every block, decoders run from the top block down."""
        td: list[torch.Tensor] = [h] * len(self.decoders)
        for i in range(len(self.decoders) - 1, -1, -1):
            h, td[i] = self.decoders[i](h)
        return td

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        pooled = tokens[:, self.num_prefix_tokens:].mean(dim=1) if self.global_pool == "avg" else tokens[:, 0]
        return self.fc_norm(pooled)

    def forward(
        self,
        images: torch.Tensor,
        xi: torch.Tensor | None = None,
        return_maps: bool = False,
        bottom_up_only: bool = False,
    ) -> BackboneOutput:
        """Run the backbone: the first (bottom-up) pass, then :meth:`top_down`.

        Args:
            images: ``[B, 3, H, W]``, H and W divisible by the patch size.
            xi: optional per-sample prior ``[B, C]`` (or one ``[C]``); the learned ``prompt``
                is used when it is None. Ignored by ``none`` and ``feedback``.
            return_maps: also return bottom-up / top-down token-norm maps.
            bottom_up_only: skip the top-down pass (half the cost when only the query-independent
                bottom-up output is needed, e.g. to index images); ``tokens``/``pooled`` are then
                the bottom-up ones.
        """
        x0, grid = self.embed(images)
        z, _, map_tokens = self.run_blocks(x0, grid)
        pooled = self.pool(z)
        first = BackboneOutput(
            tokens=z,
            pooled=pooled,
            bottom_up_tokens=z,
            bottom_up_pooled=pooled,
            grid_size=grid,
            num_prefix_tokens=self.num_prefix_tokens,
            logits=self.head(pooled) if self.num_classes > 0 else None,
            maps={"bottom_up": token_norm_map(map_tokens, self.num_prefix_tokens, grid)} if return_maps else {},
            embedded=x0,
        )
        return first if bottom_up_only else self.top_down(first, xi, return_maps)

    def top_down(self, first: BackboneOutput, xi: torch.Tensor | None = None, return_maps: bool = False) -> BackboneOutput:
        """Prior modulation, feedback and second pass (AbSViT Eq. 8-10) from a first pass.

        ``first`` is ``forward(images, bottom_up_only=True, return_maps=return_maps)``: it depends on
        the images only, so one first pass serves any number of priors (``first.select(rows)`` pairs
        its rows with the rows of ``xi``). Without a top-down path ``first`` is the output.
        """
        if self.topdown == "none":
            return first
        z, x0, grid, prefix = first.bottom_up_tokens, first.embedded, first.grid_size, self.num_prefix_tokens
        aux, maps, gate = {}, dict(first.maps), None
        if self.topdown in _MODES_WITH_PRIOR:
            prior = self.prompt if xi is None else xi
            gate = prior_mask(z, prior.to(z.dtype))
            mask = self.alpha * gate
        if self.topdown == "perceiver":
            tokens = z * mask
            if return_maps:  # the bottom-up map (the same block) with its tokens masked
                maps["top_down"] = first.maps["bottom_up"] * mask[:, prefix:, 0].reshape(z.shape[0], *grid)
        else:
            td = value_mask = None
            if self.topdown == "maskatt":
                value_mask = mask
            else:
                td = self.feedback(z if self.topdown == "feedback" else z * mask)
            with_var = self.training and self.variational_loss and self.topdown in _MODES_WITH_DECODERS
            tokens, var_loss, td_map_tokens = self.run_blocks(x0, grid, td, value_mask, with_var_loss=with_var)
            if var_loss is not None:
                aux["var"] = var_loss
            if return_maps:
                maps["top_down"] = token_norm_map(td_map_tokens, prefix, grid)
        pooled = self.pool(tokens)
        return replace(
            first,
            tokens=tokens,
            pooled=pooled,
            logits=self.head(pooled) if self.num_classes > 0 else None,
            bottom_up_logits=first.logits,
            aux_losses=aux,
            maps=maps,
            prior_mask=gate,
        )


# --- registered architectures --------------------------------------------------------
_SIZES = {
    "tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
    # test-sized: 4 blocks of width 64, 2 heads
    "test": dict(embed_dim=64, depth=4, num_heads=2),
}


def _register(name: str, family: str, size: str, **fixed: Any) -> None:
    """Register ``name`` as the ``size`` model with ``fixed`` arguments (overridable)."""
    defaults = dict(_SIZES[size], img_size=32 if size == "test" else 224, **fixed)

    def constructor(**kwargs: Any) -> VisionTransformer:
        return VisionTransformer(**{**defaults, **kwargs})

    constructor.__name__ = name
    constructor.__doc__ = f"{family} {size}: " + ", ".join(f"{k}={v}" for k, v in fixed.items())
    register_backbone(family)(constructor)


for _size in ("tiny", "small", "base"):
    _register(f"vit_{_size}_patch16_224", "vit", _size, patch_size=16, topdown="none")
    _register(f"absvit_{_size}_patch16_224", "absvit", _size, patch_size=16, topdown="absvit")
    _register(f"vars_d_vit_{_size}_patch16_224", "vars", _size, patch_size=16, topdown="none", attention="vars_d")
_register("vit_tiny_patch8_224_gap", "vit", "tiny", patch_size=8, topdown="none", global_pool="avg")
_register("absvit_tiny_patch8_224_gap", "absvit", "tiny", patch_size=8, topdown="absvit", global_pool="avg")
_register("vit_test_patch8", "vit", "test", patch_size=8, topdown="none")
_register("absvit_test_patch8", "absvit", "test", patch_size=8, topdown="absvit")
for _attn in ("vars_d", "vars_s", "vars_sd"):
    _register(f"{_attn}_vit_test_patch8", "vars", "test", patch_size=8, topdown="none", attention=_attn)
    _register(f"{_attn}_absvit_test_patch8", "vars", "test", patch_size=8, topdown="absvit", attention=_attn)
_register("vars_sd_vit_tiny_patch16_224", "vars", "tiny", patch_size=16, topdown="none", attention="vars_sd")
_register("vars_d_absvit_tiny_patch16_224", "vars", "tiny", patch_size=16, topdown="absvit", attention="vars_d")
del _size, _attn
