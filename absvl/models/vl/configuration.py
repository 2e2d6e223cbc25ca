"""``AbsVLConfig``: everything needed to rebuild an AbSViT-VL model (SPEC §1, §2, §5)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from ...io import version_stamp

PRIOR_POOLINGS = ("cls", "mean")
PRIOR_VISUALS = ("bottom_up", "top_down", "both")
FUSION_READS = ("top_down", "both")
# keys written to config.json for humans and tools, not constructor fields
_META_KEYS = ("model_type", "absvl_version")


# the training objective's weights: a run that starts from an export (``train.init_from``) takes these from
# its own config (``AbsVLModel.with_loss_weights``) and the architecture from the export
LOSS_WEIGHTS = (
    "var_loss_weight",
    "prior_loss_weight",
    "prior_object_weight",
    "itm_loss_weight",
    "itc_loss_weight",
    "gate_sparsity_weight",
    "pointer_loss_weight",
    "count_loss_weight",
    "topdown_object_weight",
)


@dataclass
class AbsVLConfig:
    """Architecture and loss settings of :class:`~absvl.models.vl.AbsVLModel`.

    Attributes:
        backbone: registered vision backbone name (``absvl backbones`` lists them).
        backbone_kwargs: constructor overrides for the backbone (``alpha`` excepted: use ``alpha``).
        backbone_weights: where the backbone's starting weights came from (``timm:<name>``, a file or
            a folder), recorded when the model is built with ``pretrained``/``pretrained_path`` in
            ``backbone_kwargs`` (which are then dropped): the model card's ``base_model``.
        alpha: prior modulation scale ``α·clamp(cos(ξ, z), 0, 1)·z`` (AbSViT Eq. 8; 10 for VL in
            the paper), given to ViT-family backbones; CNN backbones have none.
        image_size: input resolution; ``None`` takes the backbone's own (``patch_embed.img_size``
            for ViTs, 224 for CNNs).
        text_encoder: Hugging Face hub name or local folder of the text encoder and tokenizer.
        text_config: the text encoder's ``transformers`` config as a dict. Filled when the model
            is first built; a saved model is rebuilt from it (its weights are in our safetensors),
            so loading never reaches for ``text_encoder``.
        max_text_len: tokenizer truncation length (METER: 40).
        prior_pooling: text summary projected to ξ: ``cls`` (token 0, the paper) or ``mean``
            (masked mean of all tokens, the authors' released VL code).
        prior_channel_projection: the authors' released VL code's extra rank-1 channel projection
            of the modulated tokens before the feedback path, ``h ← 5·h·(ξξᵀ)``; ViT backbones
            with decoders only. Their code also has no α: set ``alpha=1`` to reproduce it.
        prior_visual: which output tokens the prior loss contrasts with ξ (their normalised mean, in
            the gate's space: see ``ContrastiveHead``): ``bottom_up`` (first pass: query-independent,
            indexable once per image for retrieval), ``top_down`` (the paper's z_L: second pass under
            the sample's own ξ) or ``both`` (the mean of the two losses: the first trains the gate and
            the index, the second rewards a top-down pass that amplifies what the gate selects).
        fusion_hidden_size, fusion_layers, fusion_heads, fusion_mlp_ratio, fusion_dropout,
            fusion_norm_eps: METER co-attention encoder (H=768, 6 layers, 12 heads, FFN 4H,
            dropout 0.1, BERT LayerNorm eps 1e-12).
        fusion_reads: the image tokens the fusion reads: ``top_down`` (the backbone's output, the second
            pass: the paper) or ``both``: each position's first- and second-pass tokens side by side (channels
            concatenated), so that what the top-down pass overwrites stays readable next to what it selects.
        fusion_image_positions: add fixed 2-D sine-cosine position embeddings to the image tokens the
            fusion reads (``FusionEncoder``), for backbones whose output tokens do not keep their position.
        vqa_pointers: the VQA head also reads two object pointers over the fused image tokens
            (``ObjectPointers``: hop 1 finds an object, hop 2 looks from it in a direction the question names) and
            the relation features of where they land; off: METER's head on the pooled pair alone.
        vqa_counter: the VQA head also reads a count of the objects the question describes (``ObjectCounter``: a
            density over the fused image tokens whose sum is the count).
        num_answers: VQA answer vocabulary size, set by ``AbsVLForQuestionAnswering`` (0 for the encoder and the
            retrieval model); the strings are in ``answers.json``.
        retrieval_head_dim: the space a retrieval model (``AbsVLForRetrieval``) ranks and indexes in. 0: ξ and the
            bottom-up image embedding in the gate's space, the prior loss's own; N > 0: its own embedding head
            (``RetrievalEmbedding``, ALBEF's ITC): the text's hidden states and the first pass's tokens each
            attention-pooled and projected to N, trained by ``itc_loss_weight``'s InfoNCE. The prior loss, and with
            it the gate's training signal, is the same either way.
        temperature_init: initial InfoNCE temperature (CLIP: 0.07); learned as a log-scale.
        max_logit_scale: clamp of ``1/temperature`` (CLIP: 100).
        var_loss_weight: weight of L_var (AbSViT Eq. 13/14; 0.3 in the authors' VL code).
        prior_loss_weight: weight of the prior loss L_prior (Eq. 15). 1.0, as ALBEF/BLIP weigh their
            image-text contrastive loss against ITM: the authors' VL code has no working value.
        prior_object_weight: weight of the prior loss's object-level term (``object_prior_loss``): ξ
            against the tokens of its own image, the question's objects positive, the other objects and the
            background negative, with the boundary at the gate's clamp. Needs data that knows its objects (the Shapes world's masks and each
            question's ``target_objects``); 0: off, the paper's image-level loss alone.
        itm_loss_weight: weight of the image-text matching cross-entropy.
        itc_loss_weight: weight of the retrieval head's image-text contrastive loss (``retrieval_head_dim`` > 0).
        gate_sparsity_weight: weight of L_gate, the mean of the prior gate ``clamp(cos(ξ, z_i), 0, 1)``
            over the spatial tokens: a sparsity prior that closes the gate where the prior loss does not
            need it open (0: off).
        pointer_loss_weight: weight of ``pointer_loss``, the object pointers' hops supervised by the question's
            objects (``vqa_pointers``; data that knows its objects, as ``prior_object_weight``); 0: the pointers
            learn from the answers alone.
        count_loss_weight: weight of ``count_loss``, the count density supervised by the question's objects
            (``vqa_counter``; data that knows its objects); 0: the density learns from the answers alone.
        topdown_object_weight: weight of ``topdown_object_loss``: the change the top-down pass makes to the tokens
            the fusion reads, kept on the question's objects (data that knows its objects); 0: off, the paper's
            second pass trained by the task alone.
    """

    backbone: str = "absvit_base_patch16_224"
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    backbone_weights: str | None = None
    alpha: float = 10.0
    image_size: int | None = None
    text_encoder: str = "roberta-base"
    text_config: dict[str, Any] | None = None
    max_text_len: int = 40
    prior_pooling: str = "cls"
    prior_channel_projection: bool = False
    prior_visual: str = "bottom_up"
    fusion_hidden_size: int = 768
    fusion_layers: int = 6
    fusion_heads: int = 12
    fusion_mlp_ratio: float = 4.0
    fusion_dropout: float = 0.1
    fusion_norm_eps: float = 1e-12
    fusion_reads: str = "top_down"
    fusion_image_positions: bool = False
    vqa_pointers: bool = False
    vqa_counter: bool = False
    num_answers: int = 0
    retrieval_head_dim: int = 0
    temperature_init: float = 0.07
    max_logit_scale: float = 100.0
    var_loss_weight: float = 0.3
    prior_loss_weight: float = 1.0
    prior_object_weight: float = 0.0
    itm_loss_weight: float = 1.0
    itc_loss_weight: float = 1.0
    gate_sparsity_weight: float = 0.0
    pointer_loss_weight: float = 0.0
    count_loss_weight: float = 0.0
    topdown_object_weight: float = 0.0

    def __post_init__(self) -> None:
        if self.prior_pooling not in PRIOR_POOLINGS:
            raise ValueError(f"prior_pooling={self.prior_pooling!r} must be one of {', '.join(PRIOR_POOLINGS)}")
        if self.fusion_reads not in FUSION_READS:
            raise ValueError(f"fusion_reads={self.fusion_reads!r} must be one of {', '.join(FUSION_READS)}")
        if self.prior_visual not in PRIOR_VISUALS:
            raise ValueError(f"prior_visual={self.prior_visual!r} must be one of {', '.join(PRIOR_VISUALS)}")
        if "alpha" in self.backbone_kwargs:
            raise ValueError("backbone_kwargs must not set 'alpha': use AbsVLConfig.alpha")
        if self.fusion_hidden_size % self.fusion_heads:
            raise ValueError(
                f"fusion_hidden_size={self.fusion_hidden_size} is not divisible by fusion_heads={self.fusion_heads}"
            )
        if self.num_answers < 0:
            raise ValueError(f"num_answers={self.num_answers} must be >= 0")
        if self.retrieval_head_dim < 0:
            raise ValueError(f"retrieval_head_dim={self.retrieval_head_dim} must be >= 0 (0: the gate's space)")
        if not 0.0 < self.temperature_init:
            raise ValueError(f"temperature_init={self.temperature_init} must be > 0")

    def with_loss_weights(self, other: AbsVLConfig) -> AbsVLConfig:
        """This architecture with ``other``'s training objective (its ``LOSS_WEIGHTS``)."""
        return replace(self, **{name: getattr(other, name) for name in LOSS_WEIGHTS})

    def to_dict(self) -> dict[str, Any]:
        return {"model_type": "absvl", **version_stamp(), **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AbsVLConfig:
        """Build from a ``config.json`` dict; an unknown key is an error that names it."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known - set(_META_KEYS))
        if unknown:
            raise ValueError(f"unknown AbsVLConfig key(s): {', '.join(map(repr, unknown))}")
        if data.get("model_type", "absvl") != "absvl":
            raise ValueError(f"config model_type={data['model_type']!r} is not 'absvl'")
        return cls(**{k: v for k, v in data.items() if k in known})
