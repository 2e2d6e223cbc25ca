"""Vision Transformer with a top-down path: ViT, AbSViT and the AbSViT paper's baselines.

timm's pre-norm ViT (its parameter names, so timm/DeiT weights load) run twice when ``topdown``
names a mode with a second pass (:mod:`.topdown_modes`); the feedback path adds
``decoders.{i}.linear`` (A_i), ``decoders.{i}.linear2`` (B_i) and ``prompt`` (the free ξ), the
names of the authors' checkpoints. The registered models are in :mod:`.vit_models`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import replace
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, PatchEmbed, resample_abs_pos_embed, trunc_normal_
from timm.models._features import feature_take_indices
from timm.models.vision_transformer_hybrid import ConvStem
from torch import nn

from .output import BackboneOutput, token_norm_map
from .topdown import qkv_rows
from .topdown_modes import TopDownDecoder, get_topdown
from .vars_attention import VARSDAttention, VARSSAttention, VARSSDAttention

# keys a plain ViT checkpoint lacks; this model's own init is the authors' (decoders, ξ, VARS extras)
_EXTRA_KEYS = re.compile(r"^decoders\.|^prompt$|\.attn\.(?!qkv\.|proj\.)")


class Attention(nn.Module):
    """Multi-head softmax self-attention (fused SDPA) with an optional top-down input.

    ``td`` is added to the values only (``td_target="v"``, AbSViT Eq. 9: Q and K hold the
    object templates, which top-down must not change) or to Q, K and V (``"qkv"``):
    ``V = W_v·x + b_v + W_v·td``, computed as ``W_v·(x + td) + b_v`` (see ``qkv_rows``), so
    the top-down pass costs no more projection work than the bottom-up one. The authors' code sends ``td`` through the full qkv linear,
    adding the value bias a second time; ``td_bias=True`` reproduces that (for their
    checkpoints). ``value_mask`` (``[B, N, 1]``) reweights the values (MaskAtt).

    ``token_grid``: whether the layer needs the token layout (``num_prefix_tokens`` when built, ``grid_size``
    when called); softmax attention does not, the VARS layers do.
    """

    token_grid = False

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        td_target: str = "v",
        td_bias: bool = False,
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
        layout = {"grid_size": grid_size} if self.attn.token_grid else {}
        x = x + self.drop_path1(self.attn(self.norm1(x), td=td, value_mask=value_mask, **layout))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


def conv_stem(in_chans: int, embed_dim: int, patch_size: int) -> ConvStem:
    """log2(patch_size) stride-2 3×3 convolutions (BatchNorm + ReLU between them, the last one linear)
    from ``in_chans`` to ``embed_dim`` channels, widths doubling up to ``embed_dim``."""
    depth = int(patch_size).bit_length() - 1
    if patch_size < 2 or 2**depth != patch_size:
        raise ValueError(f"stem='conv' needs a power-of-two patch size >= 2, not {patch_size}")
    channels = tuple(max(embed_dim // 2 ** (depth - 1 - i), 8) for i in range(depth))
    return ConvStem(in_chans, depth=depth, channels=channels, kernel_size=3, stride=(2,) * depth)


class VisionTransformer(nn.Module):
    """ViT backbone with an optional AbSViT-style top-down path (``topdown``, see docs/backbones.md)."""

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
        gate_fc_norm: bool = False,
    ) -> None:
        """
        Args:
            topdown: a name of ``topdown_modes.TOPDOWN_MODES`` (see docs/backbones.md).
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
            gate_fc_norm: with ``global_pool="avg"``, the top-down pass reads z_L through ``fc_norm`` per
                token (the normalised tokens the head and the VL fusion read) for its gate and feedback;
                ``False`` is the authors' code, where z_L is the output after ``norm`` (Identity there).
                A token-pooled ViT's z_L passed ``norm`` either way.
        """
        super().__init__()
        mode = get_topdown(topdown)
        if global_pool not in ("token", "avg"):
            raise ValueError(f"global_pool={global_pool!r} must be 'token' or 'avg'")
        if global_pool == "token" and not class_token:
            raise ValueError("global_pool='token' needs class_token=True")
        if attention not in ATTENTION_LAYERS:
            raise ValueError(f"attention={attention!r} is not one of {', '.join(ATTENTION_LAYERS)}")
        if stem not in ("patch", "conv"):
            raise ValueError(f"stem={stem!r} must be 'patch' or 'conv'")
        norm_layer = partial(nn.LayerNorm, eps=norm_eps)
        self.topdown = topdown  # the mode's name (configs and checkpoints store it)
        self.topdown_mode = mode
        self.alpha = alpha
        self.variational_loss = variational_loss
        self.global_pool = global_pool
        self.gate_fc_norm = gate_fc_norm
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
        attn_kwargs.update(td_target=mode.td_target, td_bias=td_bias)
        if ATTENTION_LAYERS[attention].token_grid:
            attn_kwargs["num_prefix_tokens"] = self.num_prefix_tokens
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
        if mode.needs_decoders:
            self.decoders = nn.ModuleList(TopDownDecoder(embed_dim) for _ in range(depth))
        if mode.uses_prior:
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

    def init_missing_weights(self, missing: Iterable[str]) -> list[str]:
        """After loading plain (timm/DeiT) weights: the ``missing`` keys this architecture adds. They keep
        this model's init, which is the authors' (decoders trunc-normal 0.02, ξ random, VARS extras)."""
        return [k for k in missing if _EXTRA_KEYS.search(k)]

    # --- the passes -------------------------------------------------------------------
    @property
    def map_index(self) -> int:
        """The block whose output token norms make the maps (``map_block`` may be changed after construction)."""
        return self.map_block % len(self.blocks)

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
        take: Sequence[int] = (),
    ) -> tuple[torch.Tensor, torch.Tensor | None, dict[int, torch.Tensor]]:
        """One feedforward pass. Returns (normed output tokens, L_var or None, {i: output of block i for i in take}).

        L_var (AbSViT Eq. 13/14 as the authors implement it) is Σ_l MSE(A_l(sg(out_l)), sg(in_l)),
        accumulated block by block so no activations are kept for it.
        """
        var_loss = None
        taken: dict[int, torch.Tensor] = {}
        for i, block in enumerate(self.blocks):
            x_in = x
            x = block(x, td=None if td is None else td[i], value_mask=value_mask, grid_size=grid)
            if with_var_loss:
                recon = self.decoders[i].linear(x.detach())
                term = F.mse_loss(recon, x_in.detach())
                var_loss = term if var_loss is None else var_loss + term
            if i in take:
                taken[i] = x
        return self.norm(x), var_loss, taken

    def feedback(self, h: torch.Tensor) -> list[torch.Tensor]:
        """Top-down tokens td_l for every block, decoders run from the top block down."""
        td: list[torch.Tensor] = [h] * len(self.decoders)
        for i in range(len(self.decoders) - 1, -1, -1):
            h, td[i] = self.decoders[i](h)
        return td

    def first_pass(
        self, images: torch.Tensor, return_maps: bool = False, take: Sequence[int] = ()
    ) -> tuple[BackboneOutput, dict[int, torch.Tensor]]:
        """The bottom-up pass as an output (its ``embedded`` is in_0) and the outputs of the blocks ``take``."""
        x0, grid = self.embed(images)
        map_index = self.map_index
        z, _, taken = self.run_blocks(x0, grid, take=(*take, map_index) if return_maps else tuple(take))
        pooled = self.forward_head(z, pre_logits=True)
        first = BackboneOutput(
            tokens=z,
            pooled=pooled,
            bottom_up_tokens=z,
            bottom_up_pooled=pooled,
            grid_size=grid,
            num_prefix_tokens=self.num_prefix_tokens,
            logits=self._logits(pooled),
            maps={"bottom_up": token_norm_map(taken[map_index], self.num_prefix_tokens, grid)} if return_maps else {},
            embedded=x0,
        )
        return first, taken

    def top_down(
        self, first: BackboneOutput, xi: torch.Tensor | None = None, return_maps: bool = False
    ) -> BackboneOutput:
        """Prior modulation, feedback and second pass (AbSViT Eq. 8-10) from a first pass.

        ``first`` is ``forward(images, bottom_up_only=True, return_maps=return_maps)``: it depends on
        the images only, so one first pass serves any number of priors (``first.select(rows)`` pairs
        its rows with the rows of ``xi``). Without a top-down path ``first`` is the output.
        """
        second = self.topdown_mode.run(self, first, xi, return_maps)
        if second is None:
            return first
        pooled = self.forward_head(second.tokens, pre_logits=True)
        maps = dict(first.maps)
        if return_maps:
            maps["top_down"] = second.top_down_map
        return replace(
            first,
            tokens=second.tokens,
            pooled=pooled,
            logits=self._logits(pooled),
            bottom_up_logits=first.logits,
            aux_losses=second.aux_losses,
            maps=maps,
            prior_mask=second.gate,
        )

    # --- timm's interface ---------------------------------------------------------------
    def forward_features(self, images: torch.Tensor, xi: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, N, C]`` normed output tokens: those of the top-down pass under ``xi`` where there is one."""
        first, _ = self.first_pass(images)
        second = self.topdown_mode.run(self, first, xi)
        return first.tokens if second is None else second.tokens

    @property
    def pools_mean(self) -> bool:
        """Whether the pooled output is the mean of the spatial tokens (``global_pool="avg"``), not token 0."""
        return self.global_pool == "avg"

    def norm_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, N, C]`` output tokens normalised as the head reads them, for a model that reads every token
        (the VL fusion, SPEC §5; the patch classifier): a token-pooled ViT's tokens passed ``norm`` already
        (its ``fc_norm`` is Identity); an average-pooled one's ``norm`` is Identity and its ``fc_norm``,
        which normalises the pooled token, is applied to each token."""
        return self.fc_norm(tokens)

    def gate_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, N, C]`` z_L as the top-down pass reads it (Eq. 8: the gate ``clamp(cos(ξ, z_L))`` and the
        feedback), and so the space the prior loss aligns ξ with: ``norm_tokens`` with ``gate_fc_norm``,
        the tokens as they are otherwise."""
        return self.norm_tokens(tokens) if self.gate_fc_norm else tokens

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool ``[B, N, C]`` tokens ([cls] token, or ``fc_norm`` of the mean patch token); logits unless ``pre_logits``."""
        pooled = x[:, self.num_prefix_tokens :].mean(dim=1) if self.global_pool == "avg" else x[:, 0]
        pooled = self.fc_norm(pooled)
        return pooled if pre_logits else self.head(pooled)

    def _logits(self, pooled: torch.Tensor) -> torch.Tensor | None:
        return self.head(pooled) if self.num_classes > 0 else None

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new (initialised) head for ``num_classes`` (0: none); ``global_pool`` ``token``/``avg`` changes the
        pooling, the norm placement (``norm`` or ``fc_norm``) stays as built."""
        if global_pool is not None:
            if global_pool not in ("token", "avg") or (global_pool == "token" and self.cls_token is None):
                raise ValueError(f"global_pool={global_pool!r} must be 'avg' or 'token' (with a class token)")
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = nn.Identity()
        if num_classes > 0:
            self.head = nn.Linear(self.embed_dim, num_classes, device=self.pos_embed.device, dtype=self.pos_embed.dtype)
            trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)

    def forward_intermediates(
        self,
        images: torch.Tensor,
        xi: torch.Tensor | None = None,
        indices: int | Sequence[int] | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """timm's ``forward_intermediates``: (final tokens, block outputs) of the pass that made the output.

        That is the top-down pass (under ``xi``) for modes with a second pass, else the one bottom-up
        pass (``none``; ``perceiver``, whose final tokens are the masked ones). ``indices``: the last n
        blocks (int), those listed, or all (None); ``norm`` applies the final norm to them;
        ``output_fmt`` ``NCHW`` (``[B, C, h, w]``, prefix tokens dropped) or ``NLC``.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt={output_fmt!r} must be 'NCHW' or 'NLC'")
        take, _ = feature_take_indices(len(self.blocks), indices)
        first, taken = self.first_pass(images, take=take)
        x, intermediates = first.tokens, [taken[i] for i in take]
        second = self.topdown_mode.run(self, first, xi, take=take)
        if second is not None:
            x = second.tokens
            intermediates = intermediates if second.intermediates is None else second.intermediates
        if norm:
            intermediates = [self.norm(y) for y in intermediates]
        prefix = [y[:, : self.num_prefix_tokens] for y in intermediates]
        intermediates = [y[:, self.num_prefix_tokens :] for y in intermediates]
        if output_fmt == "NCHW":
            h, w = first.grid_size
            intermediates = [y.reshape(y.shape[0], h, w, -1).permute(0, 3, 1, 2).contiguous() for y in intermediates]
        if return_prefix_tokens and self.num_prefix_tokens:
            intermediates = list(zip(intermediates, prefix))
        return intermediates if intermediates_only else (x, intermediates)

    def forward(
        self,
        images: torch.Tensor,
        xi: torch.Tensor | None = None,
        return_maps: bool = False,
        bottom_up_only: bool = False,
    ) -> BackboneOutput:
        """Run the backbone: :meth:`first_pass`, then :meth:`top_down`.

        Args:
            images: ``[B, 3, H, W]``, H and W divisible by the patch size.
            xi: optional per-sample prior ``[B, C]`` (or one ``[C]``); the learned ``prompt``
                is used when it is None. Ignored by ``none`` and ``feedback``.
            return_maps: also return bottom-up / top-down token-norm maps.
            bottom_up_only: skip the top-down pass (half the cost when only the query-independent
                bottom-up output is needed, e.g. to index images); ``tokens``/``pooled`` are then
                the bottom-up ones.
        """
        first, _ = self.first_pass(images, return_maps)
        return first if bottom_up_only else self.top_down(first, xi, return_maps)
