"""``AbsVLModel``: the shared encoder of AbSViT-VL, text prior → top-down vision backbone → METER fusion (SPEC §1,
§2, §5), and its auxiliary losses.

The text's prior ξ steers the backbone's second pass (AbSViT Eq. 8; ViT/CNN backbones ignore it); the co-attention
fusion of text states and output tokens gives the pooled pair the task heads read (``AbsVLForQuestionAnswering``,
``AbsVLForRetrieval`` in ``tasks.py``). Its own losses, which every task adds to its task loss: w_var·L_var +
w_prior·L_prior (+ w_objects·L_objects + w_gate·L_gate), L_prior the symmetric InfoNCE between ξ and the image
embedding in the gate's own space (``ContrastiveHead``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers.utils import ModelOutput

from ..param_groups import param_groups
from ..vision import BackboneOutput, backbone_options, create_backbone
from ..vision.topdown import topdown_health
from .configuration import AbsVLConfig
from .fusion import FusionEncoder
from .heads import ContrastiveHead
from .losses import contrastive_loss, object_prior_loss, text_groups, topdown_object_loss
from .pretrained import AbsVLPreTrainedModel
from .processing import AbsVLProcessor, ImageInput, backbone_image_size
from .text import PriorProjection, channel_projection, load_text_encoder, text_config_dict, text_encoder_from_config

# METER's fusion width, at which BERT's init std 0.02 is tuned (see init_new_weights)
METER_WIDTH = 768

# SPEC §5: encoders lr, fusion ×5, heads ×50, AbSViT decoders ×3; ``encoders`` is the default of the
# two encoder groups, each settable alone (a pretrained text encoder with a differently pretrained backbone)
LR_MULTIPLIERS = {"encoders": 1.0, "decoders": 3.0, "fusion": 5.0, "heads": 50.0}
ENCODER_GROUPS = ("backbone", "text_encoder")
# first matching prefix wins; the prior projection, the temperature and the task heads are new layers: heads
_GROUP_PREFIXES = (
    ("backbone.decoders.", "decoders"),
    ("backbone.", "backbone"),
    ("text_encoder.", "text_encoder"),
    ("fusion.", "fusion"),
    ("prior.", "heads"),
    ("vqa_head.", "heads"),
    ("itm_head.", "heads"),
    ("itc_head.", "heads"),
    ("contrastive.", "heads"),
)
# each loss term's weight in the config (``vqa`` weighs 1)
_LOSS_WEIGHT_FIELDS = {
    "itm": "itm_loss_weight",
    "itc": "itc_loss_weight",
    "var": "var_loss_weight",
    "prior": "prior_loss_weight",
    "prior_objects": "prior_object_weight",
    "gate": "gate_sparsity_weight",
    "pointers": "pointer_loss_weight",
    "count": "count_loss_weight",
    "topdown_objects": "topdown_object_weight",
}


@dataclass
class AbsVLModelOutput(ModelOutput):
    """What :meth:`AbsVLModel.forward` computed: a transformers ``ModelOutput`` (attribute, key and tuple access;
    fields that are None are left out of the keys and the tuple). The task models' outputs add their logits.

    Attributes:
        loss: weighted total of ``losses``, when a loss was asked for.
        losses: the unweighted terms: the task's (``vqa``, ``pointers`` and ``count``, ``itm``) and the encoder's: ``var`` (training mode,
            backbones with a feedback path), ``prior``, ``prior_objects``, ``gate`` (with ``gate_sparsity_weight > 0``).
        pooled: ``[B, 2H]`` fused [text; image] pooled pair.
        text_tokens, image_tokens: fusion outputs ``[B, T, H]``, ``[B, N, H]``.
        xi: ``[B, C]`` prior given to the backbone.
        text_hidden: ``[B, T, D]`` the text encoder's last hidden states.
        text_embeds, image_embeds: L2-normalised ξ and the image embedding in the gate's space (the
            prior loss pair; the retrieval index stores the bottom-up one, or a retrieval model's head's: see
            ``AbsVLRetrievalOutput``).
        vision: the backbone's full output (tokens, bottom-up tokens, maps, ...).
    """

    loss: torch.Tensor | None = None
    losses: dict[str, torch.Tensor] | None = None
    pooled: torch.Tensor | None = None
    text_tokens: torch.Tensor | None = None
    image_tokens: torch.Tensor | None = None
    xi: torch.Tensor | None = None
    text_hidden: torch.Tensor | None = None
    text_embeds: torch.Tensor | None = None
    image_embeds: torch.Tensor | None = None
    vision: BackboneOutput | None = field(default=None, repr=False)


class AbsVLModel(AbsVLPreTrainedModel, pipeline_tag="feature-extraction"):
    """AbSViT-VL's shared encoder: a METER-style text-image encoder whose image encoder attends top-down."""

    def __init__(self, config: AbsVLConfig, tokenizer: Any = None) -> None:
        """
        Args:
            config: architecture; ``config.text_config`` None loads the pretrained text encoder from
                ``config.text_encoder`` (hub name or folder), otherwise it is built from that config.
            tokenizer: defaults to the one of ``config.text_encoder``.
        """
        super().__init__()
        config = replace(config, num_answers=0)  # a VQA head's size: AbsVLForQuestionAnswering sets it
        if config.text_config is None:
            self.text_encoder, loaded_tokenizer = load_text_encoder(config.text_encoder)
            tokenizer = tokenizer or loaded_tokenizer
            config = replace(config, text_config=text_config_dict(self.text_encoder))
        else:
            self.text_encoder = text_encoder_from_config(config.text_config)
        self.tokenizer = tokenizer or transformers.AutoTokenizer.from_pretrained(config.text_encoder)
        self.config = config
        # what the model card records about training (see save_pretrained)
        self.card_data: dict[str, Any] = {}

        overrides = dict(config.backbone_kwargs)
        if "alpha" in backbone_options(config.backbone):  # the top-down modulation scale (VisionTransformer)
            overrides["alpha"] = config.alpha
        self.backbone = create_backbone(config.backbone, **overrides)
        if {"pretrained", "pretrained_path"} & set(config.backbone_kwargs):
            # the weights are the model's own from now on: keep only the architecture options (with
            # those a converted folder set, e.g. td_bias) so saved configs rebuild without the file
            arch = {k: v for k, v in self.backbone.backbone_config.items() if k not in ("name", "alpha")}
            source = self.backbone.pretrained_report.source
            self.config = config = replace(config, backbone_kwargs=arch, backbone_weights=source)
        if config.prior_channel_projection and not hasattr(self.backbone, "decoders"):
            raise ValueError(f"prior_channel_projection=True needs a backbone with decoders, not {config.backbone!r}")
        if isinstance(getattr(self.backbone, "prompt", None), nn.Parameter):
            # the free classification ξ: here ξ always comes from the text, so it would get no gradient
            self.backbone.prompt.requires_grad_(False)
        self.image_size = config.image_size or backbone_image_size(self.backbone)

        text_width, vision_width = self.text_encoder.config.hidden_size, self.backbone.num_features
        self.prior = PriorProjection(text_width, vision_width, config.prior_pooling)
        self.fusion = FusionEncoder(
            text_width,
            vision_width * (2 if config.fusion_reads == "both" else 1),
            hidden_size=config.fusion_hidden_size,
            num_layers=config.fusion_layers,
            num_heads=config.fusion_heads,
            mlp_ratio=config.fusion_mlp_ratio,
            dropout=config.fusion_dropout,
            norm_eps=config.fusion_norm_eps,
            image_mean_after=self.backbone.num_prefix_tokens if self.backbone.pools_mean else None,
            image_positions=config.fusion_image_positions,
        )
        self.contrastive = ContrastiveHead(config.temperature_init, config.max_logit_scale)
        for module in (self.prior, self.fusion):
            module.apply(init_new_weights)
        self.train()  # AutoModel.from_pretrained returns the text encoder in eval mode

    # --- encoders ---------------------------------------------------------------------
    @property
    def processor(self) -> AbsVLProcessor:
        """Image/text preprocessing matching this model (size, tokenizer, max text length)."""
        return AbsVLProcessor(self.tokenizer, self.image_size, self.config.max_text_len)

    @property
    def device(self) -> torch.device:
        """Where the model's parameters are."""
        return next(self.parameters()).device

    def prepare_inputs(
        self, images: ImageInput | Sequence[ImageInput] | None = None, text: str | Sequence[str] | None = None
    ) -> dict[str, torch.Tensor]:
        """:attr:`processor` outputs on the model's device: how every inference entry point (pipelines,
        retrieval, attention metrics and figures) gets its inputs."""
        return {k: v.to(self.device) for k, v in self.processor(images=images, text=text).items()}

    def encode_prior(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(text hidden states ``[B, T, D]``, prior ξ ``[B, C]``)."""
        hidden = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return hidden, self.prior(hidden, attention_mask)

    def first_pass(self, images: torch.Tensor, return_maps: bool = False) -> BackboneOutput:
        """The backbone's bottom-up pass: it depends on the images only, so one serves every text
        (``first.select(rows)`` repeats rows to pair them with texts; see :meth:`encode_vision`)."""
        return self.backbone(images, return_maps=return_maps, bottom_up_only=True)

    def encode_vision(
        self, images: torch.Tensor | BackboneOutput, xi: torch.Tensor, return_maps: bool = False
    ) -> BackboneOutput:
        """The backbone steered by ξ (with the authors' channel projection when configured): the
        first pass (or ``images`` given as their :meth:`first_pass`), then the top-down pass."""
        first = images if isinstance(images, BackboneOutput) else self.first_pass(images, return_maps)
        projected = self.config.prior_channel_projection
        with channel_projection(self.backbone, xi) if projected else contextlib.nullcontext():
            return self.backbone.top_down(first, xi, return_maps)

    def fusion_image_tokens(self, vision: BackboneOutput, kind: str = "top_down") -> torch.Tensor:
        """``[B, N, C]`` the image tokens the fusion reads: the backbone's output tokens normalised as its
        head reads them (``norm_tokens``; SPEC §5), positions kept. ``kind``: ``top_down`` (the output,
        what the fusion gets) or ``bottom_up`` (the first pass's, e.g. to probe what the second pass changed)."""
        if kind not in ("top_down", "bottom_up"):
            raise ValueError(f"kind={kind!r} must be 'top_down' or 'bottom_up'")
        return self.backbone.norm_tokens(vision.tokens if kind == "top_down" else vision.bottom_up_tokens)

    def fusion_change(self, vision: BackboneOutput, top_down: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, h·w, C]`` what the second pass changed in each spatial token the fusion reads, ``n(z_td) − n(z_bu)``
        (``fusion_image_tokens``; ``top_down``: ``n(z_td)`` when the caller has it): where the top-down pass acts on
        the answer. 0 for a backbone without one."""
        top_down = self.fusion_image_tokens(vision) if top_down is None else top_down
        change = top_down - self.fusion_image_tokens(vision, "bottom_up")
        return change[:, vision.num_prefix_tokens :]

    def fusion_input(self, vision: BackboneOutput, top_down: torch.Tensor | None = None) -> torch.Tensor:
        """What the fusion reads (``config.fusion_reads``): the top-down tokens, or each position's
        bottom-up and top-down tokens concatenated along the channels (``top_down``: the first, when the caller
        has them already)."""
        tokens = self.fusion_image_tokens(vision) if top_down is None else top_down
        if self.config.fusion_reads == "both":
            tokens = torch.cat([self.fusion_image_tokens(vision, "bottom_up"), tokens], dim=-1)
        return tokens

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """L2-normalised ξ ``[B, C]``: the text side of the retrieval space."""
        return F.normalize(self.encode_prior(input_ids, attention_mask)[1], dim=-1)

    def encode_image_bottom_up(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, C]`` image side of the prior loss from the bottom-up tokens (see ``ContrastiveHead``):
        query-independent, indexable once."""
        vision = self.first_pass(images)
        return self.contrastive(self.backbone.gate_tokens(vision.bottom_up_tokens), vision.num_prefix_tokens)

    def retrieval_scale(self) -> torch.Tensor:
        """The logit scale of the space :meth:`encode_text` and :meth:`encode_image_bottom_up` embed in."""
        return self.contrastive.scale()

    @property
    def embedding_dim(self) -> int:
        """The width of :meth:`encode_text` / :meth:`encode_image_bottom_up` (an index's vectors)."""
        return self.backbone.num_features

    # --- forward ----------------------------------------------------------------------
    def forward(
        self,
        images: torch.Tensor | BackboneOutput,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        prior_positive: torch.Tensor | None = None,
        patch_objects: torch.Tensor | None = None,
        target_objects: torch.Tensor | None = None,
        return_loss: bool = False,
        return_maps: bool = False,
        prior_only: bool = False,
        image_index: torch.Tensor | None = None,
    ) -> AbsVLModelOutput:
        """
        Args:
            images: ``[B, 3, S, S]`` normalised images (see :meth:`prepare_inputs`), or their
                :meth:`first_pass` (computed with ``return_maps`` when maps are asked for); with ``image_index``,
                ``[U, 3, S, S]``, each distinct image once.
            input_ids, attention_mask: ``[B, T]`` tokenised texts (mask defaults to all ones).
            prior_positive: ``[B]`` bool, false for pairs that are no positive of the prior loss (a question whose
                answer says its object is absent: ``VQAExample.says_absent``; a mismatched ITM pair); default all.
                Rows with the same text are one positive class of it (``text_groups``).
            patch_objects, target_objects: ``[B, h·w]`` each patch's object label (0 background) and ``[B, K]``
                the question's objects by label → ``losses["prior_objects"]`` (``prior_object_weight``).
            return_loss: compute the encoder's losses (``out.losses``: L_var, L_prior, ...; ``out.loss`` their
                weighted sum); the task models add their own term.
            return_maps: ask the backbone for bottom-up / top-down maps (``out.vision.maps``).
            image_index: ``[B]`` row i's image in ``images`` (``VQACollator``): the first pass runs once per image
                and its tokens serve each of the image's texts (it does not read ξ), gradients summed over them.
            prior_only: compute the prior loss's terms alone (``out.loss``, ``out.losses``), from the text and the
                backbone's first pass (without gradients when the backbone is frozen): no second pass, no fusion,
                a small share of a VQA step; what the prior alignment trains (``absvl train prior``).
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        needs_map = self.config.prior_visual == "both" and self.training and not prior_only
        if image_index is not None:
            images = self.first_pass(images, return_maps or needs_map).select(image_index)
        elif (rows := len(images.tokens if isinstance(images, BackboneOutput) else images)) != len(input_ids):
            raise ValueError(
                f"{rows} images for {len(input_ids)} texts: give one image per text, or each distinct image "
                "once and image_index (a VQACollator batch's), row i's image"
            )
        hidden, xi = self.encode_prior(input_ids, attention_mask)
        if prior_only:
            if self.config.prior_visual == "top_down" and self.config.prior_loss_weight > 0:
                raise ValueError("prior_only runs the first pass alone: it cannot train prior_visual=top_down")
            frozen = not any(p.requires_grad for p in self.backbone.parameters())
            with torch.no_grad() if frozen else contextlib.nullcontext():
                first = images if isinstance(images, BackboneOutput) else self.first_pass(images)
            losses = self.prior_losses(
                xi, first, input_ids, attention_mask, prior_positive, patch_objects, target_objects
            )
            if not losses:
                raise ValueError("prior_only needs prior_loss_weight > 0, or prior_object_weight > 0 and the objects")
            return AbsVLModelOutput(loss=self.total_loss(losses), losses=losses, xi=xi, vision=first)
        vision = self.encode_vision(images, xi, return_maps or needs_map)
        top_down = self.fusion_image_tokens(vision)  # normalised once: the fusion and the top-down term read it
        text_tokens, image_tokens, pooled = self.fusion(
            hidden, attention_mask, self.fusion_input(vision, top_down), vision.grid_size
        )
        prior_visual, prefix = self.config.prior_visual, vision.num_prefix_tokens
        image_embeds = self.contrastive(
            self.backbone.gate_tokens(vision.tokens if prior_visual == "top_down" else vision.bottom_up_tokens), prefix
        )
        losses: dict[str, torch.Tensor] = {}
        if return_loss:
            if "var" in vision.aux_losses:
                losses["var"] = vision.aux_losses["var"]
            if self.config.gate_sparsity_weight > 0 and vision.prior_mask is not None:
                losses["gate"] = vision.prior_mask[:, vision.num_prefix_tokens :].mean()
            losses.update(
                self.prior_losses(xi, vision, input_ids, attention_mask, prior_positive, patch_objects, target_objects)
            )
            if (
                self.config.topdown_object_weight > 0
                and patch_objects is not None
                and target_objects is not None
                and vision.tokens is not vision.bottom_up_tokens
            ):
                change = self.fusion_change(vision, top_down).pow(2).sum(-1)
                losses["topdown_objects"] = topdown_object_loss(change, patch_objects, target_objects)
        return AbsVLModelOutput(
            loss=self.total_loss(losses) if return_loss else None,
            losses=losses,
            pooled=pooled,
            text_tokens=text_tokens,
            image_tokens=image_tokens,
            xi=xi,
            text_hidden=hidden,
            text_embeds=F.normalize(xi, dim=-1),
            image_embeds=image_embeds,
            vision=vision,
        )

    def prior_losses(
        self,
        xi: torch.Tensor,
        vision: BackboneOutput,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        valid: torch.Tensor | None = None,
        patch_objects: torch.Tensor | None = None,
        target_objects: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """The prior loss's terms (unweighted) for ξ and a backbone output: ``prior`` (Eq. 15, the symmetric
        InfoNCE with the image's pooled tokens in the gate's space; rows of the same text are one positive class,
        rows not ``valid`` none), averaged with the top-down-attended term when ``prior_visual`` is ``both`` and
        the output holds the top-down map; ``prior_objects`` (``object_prior_loss``) when the data gives the
        objects. Terms whose weight is 0 are left out."""
        losses: dict[str, torch.Tensor] = {}
        # the gate's space (``gate_tokens``): the prior loss trains what the gate reads (SPEC §2)
        prefix, tokens = vision.num_prefix_tokens, self.backbone.gate_tokens(vision.bottom_up_tokens)
        if self.config.prior_loss_weight > 0:
            text_embeds, groups, scale = (
                F.normalize(xi, dim=-1),
                text_groups(input_ids, attention_mask),
                self.contrastive.scale(),
            )
            pooled = tokens if self.config.prior_visual != "top_down" else self.backbone.gate_tokens(vision.tokens)
            losses["prior"] = contrastive_loss(text_embeds, self.contrastive(pooled, prefix), scale, valid, groups)
            if self.config.prior_visual == "both" and "top_down" in vision.maps:
                attended = self.contrastive.attended(tokens, prefix, vision.maps["top_down"])
                top_down = contrastive_loss(text_embeds, attended, scale, valid, groups)
                losses["prior"] = (losses["prior"] + top_down) / 2
        if self.config.prior_object_weight > 0 and patch_objects is not None and target_objects is not None:
            losses["prior_objects"] = object_prior_loss(xi, tokens[:, prefix:], patch_objects, target_objects)
        return losses

    def weighted_losses(self, losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each loss term times its weight (``vqa`` 1, the others their config weights)."""
        return {
            k: (getattr(self.config, _LOSS_WEIGHT_FIELDS[k]) if k in _LOSS_WEIGHT_FIELDS else 1.0) * v
            for k, v in losses.items()
        }

    def with_task_loss(
        self, out: AbsVLModelOutput, task_loss: dict[str, torch.Tensor], return_loss: bool
    ) -> dict[str, Any]:
        """The fields of an encoder output with a task model's loss term first among ``losses`` and ``loss`` the
        weighted sum of them all (when ``return_loss``): what the task models return."""
        losses = {**task_loss, **out.losses}
        return {**out, "losses": losses, "loss": self.total_loss(losses) if return_loss else None}

    def total_loss(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        """The loss: the weighted terms summed in their order."""
        return sum(self.weighted_losses(losses).values())

    def loss_gradient_norms(self, losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{"grad/<loss>/<part>": ‖∇ w·L‖}``: the gradient norm that each weighted loss term of a forward
        (``out.losses``, graph still alive: it is kept) puts on the backbone and on the text encoder, so that a
        log shows which loss drives the encoders. One extra backward per term: for log steps only."""
        parts = {
            "backbone": [p for p in self.backbone.parameters() if p.requires_grad],
            "text_encoder": [p for p in self.text_encoder.parameters() if p.requires_grad],
        }
        parts = {part: params for part, params in parts.items() if params}  # a frozen part has no gradient
        params = [p for part_params in parts.values() for p in part_params]
        norms: dict[str, torch.Tensor] = {}
        for name, term in self.weighted_losses(losses).items():
            if not term.requires_grad or not params:
                continue
            grads = iter(torch.autograd.grad(term, params, retain_graph=True, allow_unused=True))
            for part, part_params in parts.items():
                present = [g.float().norm() for g in (next(grads) for _ in part_params) if g is not None]
                norms[f"grad/{name}/{part}"] = torch.stack(present).norm() if present else term.new_zeros(())
        return norms

    def training_diagnostics(self, out: AbsVLModelOutput) -> dict[str, torch.Tensor]:
        """What a log step records of a training forward (graph still alive): the top-down path's health
        (``topdown_health``), the gradient norm each loss term puts on the encoders (:meth:`loss_gradient_norms`)
        and the unweighted loss terms (``loss/<term>``)."""
        return {
            **topdown_health(out.vision, out.xi),
            **self.loss_gradient_norms(out.losses),
            **{f"loss/{k}": v.detach() for k, v in out.losses.items()},
        }

    def with_loss_weights(self, config: AbsVLConfig) -> AbsVLModel:
        """Take the training objective's weights (``AbsVLConfig.with_loss_weights``) from ``config``, keeping this model's
        architecture: a run that starts from an export trains with its own config's losses. Returns ``self``."""
        self.config = self.config.with_loss_weights(config)
        return self

    def attention_maps(
        self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """``{"bottom_up", "top_down"}`` ``[B, h, w]`` token-norm maps of the backbone under the text's ξ.

        Backbones without a top-down path return their only (bottom-up) map for both.
        """
        _, xi = self.encode_prior(input_ids, attention_mask)
        maps = self.encode_vision(images, xi, return_maps=True).maps
        return {"bottom_up": maps["bottom_up"], "top_down": maps.get("top_down", maps["bottom_up"])}

    # --- optimisation -----------------------------------------------------------------
    def parameter_groups(
        self, lr: float, weight_decay: float = 0.01, lr_multipliers: dict[str, float] | None = None
    ) -> list[dict[str, Any]]:
        """AdamW parameter groups (SPEC §5): encoders lr, fusion ×5, heads ×50, AbSViT decoders ×3.

        ``lr_multipliers`` overrides :data:`LR_MULTIPLIERS`; ``encoders`` sets both the ``backbone``
        and the ``text_encoder`` group, which a key of their own overrides, e.g.
        ``{"encoders": 0.5, "backbone": 0.1}``.

        No weight decay on biases, norm weights, the logit scale (all ≤ 1-D) and the backbone's
        ``no_weight_decay()`` embeddings (pos_embed, cls_token, prompt) and the token-type
        embeddings. Every trainable parameter lands in exactly one group; otherwise a
        ``ValueError`` names it. Each group carries ``name`` and ``lr_scale`` for schedulers.
        """
        given = dict(lr_multipliers or {})
        known = [*LR_MULTIPLIERS, *ENCODER_GROUPS]
        unknown = set(given) - set(known)
        if unknown:
            raise ValueError(f"unknown lr_multipliers key(s) {sorted(unknown)}; known: {sorted(known)}")
        multipliers = {**LR_MULTIPLIERS, **given}
        for group in ENCODER_GROUPS:
            multipliers.setdefault(group, multipliers["encoders"])
        backbone_no_decay = getattr(self.backbone, "no_weight_decay", lambda: set())()
        no_decay = {f"backbone.{n}" for n in backbone_no_decay} | {"fusion.token_type_embeddings.weight"}
        return param_groups(self, lr, weight_decay, _parameter_group, multipliers, no_decay)

    # --- Hub ----------------------------------------------------------------------------


def _parameter_group(name: str) -> str:
    """The parameter group of a parameter, by the first of :data:`_GROUP_PREFIXES` its name starts with."""
    group = next((g for prefix, g in _GROUP_PREFIXES if name.startswith(prefix)), None)
    if group is None:
        prefixes = [p for p, _ in _GROUP_PREFIXES]
        raise ValueError(f"parameter {name!r} matches no parameter group (prefixes: {prefixes})")
    return group


def init_new_weights(module: nn.Module) -> None:
    """METER/BERT init of the layers this model adds, kept at METER's per-layer gain whatever the width:
    linears normal(0, 0.02·√(768 / fan_in)) (0.02 at METER's 768), embeddings normal(0, 0.02), zero biases.

    BERT's fixed 0.02 is tuned for width 768; at the demo's width 128 each linear would pass ~0.23 of its
    input's scale instead of ~0.55, the product over a fusion layer, the pooler and the head vanishes,
    and a fusion trained from scratch sat at the language prior: on the Shapes world's "what shape is the
    <colour> object?" 55 % after 1,000 steps with 0.02, 86 % after 250 with this init (frozen stage-1
    tokens, docs/results/answering.md).
    """
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02 * math.sqrt(METER_WIDTH / module.in_features))
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
