"""The task models: the shared encoder (``AbsVLModel``) with one task's head, which owns its loss, the transformers
way (``ViltForQuestionAnswering``): ``AbsVLForQuestionAnswering`` (METER's VQA classifier, soft-target BCE) and
``AbsVLForRetrieval`` (the ITM head on in-batch negatives; re-ranks the contrastive order top-down). Their loss is
the task's term plus the encoder's (L_var, L_prior, ...), each at its config weight.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ...io import read_json
from ..vision import BackboneOutput
from .configuration import AbsVLConfig
from .counting import ObjectCounter
from .heads import ITMHead, RetrievalEmbedding, VQAHead
from .losses import contrastive_loss, count_loss, pointer_loss, text_groups, vqa_loss
from .modeling import AbsVLModel, AbsVLModelOutput, init_new_weights
from .pointers import ObjectPointers
from .pretrained import ANSWERS_NAME, HEAD_PREFIXES, SavedModel


@dataclass
class AbsVLQuestionAnsweringOutput(AbsVLModelOutput):
    """:class:`AbsVLModelOutput` with ``vqa_logits`` ``[B, num_answers]``; ``losses["vqa"]`` with labels; with
    ``vqa_pointers``, ``pointer_logits`` ``[B, 2, h·w]`` (each hop's attention logits over the spatial tokens); with
    ``vqa_counter``, ``count_density`` ``[B, h·w]`` (its sum over the cells is the count of the question's objects)."""

    vqa_logits: torch.Tensor | None = None
    pointer_logits: torch.Tensor | None = None
    count_density: torch.Tensor | None = None


@dataclass
class AbsVLRetrievalOutput(AbsVLModelOutput):
    """:class:`AbsVLModelOutput` with ``itm_logits`` ``[B, 2]`` (0: mismatch, 1: match); ``losses["itm"]`` with labels.
    With a retrieval head (``retrieval_head_dim``), ``text_embeds``/``image_embeds`` are the head's (what the index
    compares) and ``losses["itc"]`` its contrastive loss."""

    itm_logits: torch.Tensor | None = None


class AbsVLForQuestionAnswering(AbsVLModel, pipeline_tag="visual-question-answering"):
    """AbSViT-VL for VQA: the encoder's pooled pair → METER's VQA classifier over ``answers``."""

    task = "vqa"

    def __init__(self, config: AbsVLConfig, answers: list[str], tokenizer: Any = None) -> None:
        """``answers``: the answer strings, index = logit (``config.num_answers`` follows them)."""
        if not answers:
            raise ValueError("AbsVLForQuestionAnswering needs its answer vocabulary: answers=[...]")
        if config.num_answers not in (0, len(answers)):
            raise ValueError(f"num_answers={config.num_answers} but {len(answers)} answers were given")
        super().__init__(config, tokenizer)
        self.config = replace(self.config, num_answers=len(answers))
        self.answers = list(answers)
        pointers = ObjectPointers(config.fusion_hidden_size) if config.vqa_pointers else None
        counter = ObjectCounter(config.fusion_hidden_size) if config.vqa_counter else None
        self.vqa_head = VQAHead(2 * config.fusion_hidden_size, len(answers), pointers, counter)
        self.vqa_head.apply(init_new_weights)

    def head_description(self) -> str:
        reads = [
            name
            for name, module in (("two object pointers", self.vqa_head.pointers), ("a count", self.vqa_head.counter))
            if module is not None
        ]
        pointers = f", reads {' and '.join(reads)}" if reads else ""
        return (
            f"VQA ({len(self.answers)} answers{pointers}); prior loss on {self.config.prior_visual} tokens in the gate's "
            "space"
        )

    @classmethod
    def _from_folder(
        cls, folder: Path, saved: SavedModel, tokenizer: Any, answers: list[str] | None = None
    ) -> AbsVLForQuestionAnswering:
        """``answers``: start a fresh VQA head over them when the folder holds none (finetuning another task's
        model); a folder with a trained head must have been trained with the same answers."""
        config = saved.config
        if "vqa" in saved.heads:
            saved = read_json(folder / ANSWERS_NAME, what="an absvl VQA model's answer list")
            if answers is not None and list(answers) != saved:
                raise ValueError(f"{folder} was trained with another answer vocabulary than the {len(answers)} given")
            return cls(config, saved, tokenizer)
        if answers is None:
            raise ValueError(
                f"{folder} holds no trained VQA head ({saved.describe()}): give a VQA model's folder, or answers=[...] to "
                "start a VQA head on its encoder (what `absvl train vqa` does with train.init_from)"
            )
        model = cls(replace(config, num_answers=0), answers, tokenizer)
        model._fresh_prefixes = HEAD_PREFIXES["vqa"]
        return model

    def forward(
        self,
        images: torch.Tensor | BackboneOutput,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        return_loss: bool | None = None,
        pointer_objects: torch.Tensor | None = None,
        **encoder_inputs: Any,
    ) -> AbsVLQuestionAnsweringOutput:
        """The encoder's forward and the answer logits. ``labels``: ``[B, num_answers]`` soft VQA scores →
        ``losses["vqa"]``; ``return_loss`` defaults to whether they are given. ``pointer_objects``: ``[B, 2]`` the
        object labels hop 1 and hop 2 of the pointers should land on (0: none; ``VQACollator``), with
        ``patch_objects`` → ``losses["pointers"]`` (``pointer_loss_weight``); ``patch_objects`` and
        ``target_objects`` → ``losses["count"]`` (``count_loss_weight``). ``encoder_inputs``: the encoder's
        other keyword inputs (``prior_positive``, ``patch_objects``, ``target_objects``, ``return_maps``,
        ``image_index``; see :meth:`AbsVLModel.forward`)."""
        return_loss = labels is not None if return_loss is None else return_loss
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        out = super().forward(images, input_ids, attention_mask, return_loss=return_loss, **encoder_inputs)
        hops = counts = None
        spatial = out.image_tokens[:, out.vision.num_prefix_tokens :]
        if self.vqa_head.pointers is not None:
            question = out.pooled[:, : self.config.fusion_hidden_size]
            hops = self.vqa_head.pointers(out.text_tokens, attention_mask, spatial, out.vision.grid_size, question)
        if self.vqa_head.counter is not None:
            counts = self.vqa_head.counter(out.text_tokens, attention_mask, spatial)
        logits = self.vqa_head(out.pooled, hops, counts)
        task_loss = {"vqa": vqa_loss(logits, labels)} if labels is not None else {}
        patch_objects, target_objects = encoder_inputs.get("patch_objects"), encoder_inputs.get("target_objects")
        if return_loss and hops is not None and self.config.pointer_loss_weight > 0:
            if pointer_objects is not None and patch_objects is not None:
                task_loss["pointers"] = pointer_loss(hops.logits, patch_objects, pointer_objects)
        if return_loss and counts is not None and self.config.count_loss_weight > 0:
            if patch_objects is not None and target_objects is not None:
                task_loss["count"] = count_loss(counts.membership, counts.share, patch_objects, target_objects)
        return AbsVLQuestionAnsweringOutput(
            **self.with_task_loss(out, task_loss, return_loss),
            vqa_logits=logits,
            pointer_logits=None if hops is None else hops.logits,
            count_density=None if counts is None else counts.density,
        )


class AbsVLForRetrieval(AbsVLModel, pipeline_tag="image-feature-extraction"):
    """AbSViT-VL for image-text retrieval: a text and a bottom-up image embedding rank (the index; ξ and the gate's
    space, or the retrieval head's: ``retrieval_head_dim``), the ITM head on the pooled pair, under the text's
    top-down pass, re-ranks (:meth:`rerank_score`)."""

    task = "retrieval"

    def __init__(self, config: AbsVLConfig, tokenizer: Any = None) -> None:
        super().__init__(config, tokenizer)
        self.itm_head = ITMHead(2 * config.fusion_hidden_size)
        self.itc_head = None
        if config.retrieval_head_dim:
            self.itc_head = RetrievalEmbedding(
                self.text_encoder.config.hidden_size,
                self.backbone.num_features,
                config.retrieval_head_dim,
                temperature_init=config.temperature_init,
                max_logit_scale=config.max_logit_scale,
            )
        for head in (self.itm_head, self.itc_head):
            if head is not None:
                head.apply(init_new_weights)

    def head_description(self) -> str:
        if self.itc_head is None:
            return f"ITM (re-ranking); prior loss on {self.config.prior_visual} tokens in the gate's space (ranking)"
        return f"ITM (re-ranking); retrieval embedding head of {self.config.retrieval_head_dim} (ranking, the index)"

    @classmethod
    def _from_folder(
        cls,
        folder: Path,
        saved: SavedModel,
        tokenizer: Any,
        new_head: bool = False,
        retrieval_head_dim: int | None = None,
    ) -> AbsVLForRetrieval:
        """``new_head=True``: start fresh retrieval heads when the folder holds none (finetuning another task's model),
        with an embedding head of ``retrieval_head_dim`` (None: the folder config's). A folder with trained retrieval
        heads keeps their space."""
        config = saved.config
        if "retrieval" not in saved.heads:
            if not new_head:
                raise ValueError(
                    f"{folder} holds no trained ITM head ({saved.describe()}): give a retrieval model's folder (absvl train "
                    "retrieval), or new_head=True to start one on its encoder"
                )
            if retrieval_head_dim is not None:
                config = replace(config, retrieval_head_dim=retrieval_head_dim)
            model = cls(config, tokenizer)
            model._fresh_prefixes = HEAD_PREFIXES["retrieval"]
            return model
        return cls(config, tokenizer)  # its trained heads keep their space

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """L2-normalised ``[B, C]`` text side of the ranking: ξ, or the retrieval head's text embedding."""
        if self.itc_head is None:
            return super().encode_text(input_ids, attention_mask)
        hidden, _ = self.encode_prior(input_ids, attention_mask)
        return self.itc_head.text(hidden, attention_mask)

    def encode_image_bottom_up(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised ``[B, C]`` image side of the ranking, of the first pass alone (indexable once)."""
        if self.itc_head is None:
            return super().encode_image_bottom_up(images)
        return self._head_image(self.first_pass(images))

    def _head_image(self, vision: BackboneOutput) -> torch.Tensor:
        spatial = self.fusion_image_tokens(vision, "bottom_up")[:, vision.num_prefix_tokens :]
        return self.itc_head.image(spatial)

    def retrieval_scale(self) -> torch.Tensor:
        return super().retrieval_scale() if self.itc_head is None else self.itc_head.scale()

    @property
    def embedding_dim(self) -> int:
        return super().embedding_dim if self.itc_head is None else self.config.retrieval_head_dim

    def forward(
        self,
        images: torch.Tensor | BackboneOutput,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        prior_positive: torch.Tensor | None = None,
        return_loss: bool | None = None,
        **encoder_inputs: Any,
    ) -> AbsVLRetrievalOutput:
        """The encoder's forward and the ITM logits. ``labels``: ``[B]`` 1 for matching pairs, 0 otherwise →
        ``losses["itm"]`` (and the retrieval head's ``losses["itc"]``, its matching pairs the positives); only
        matching pairs enter the prior loss. ``encoder_inputs``: the encoder's other keyword inputs (``return_maps``,
        ``image_index``; see :meth:`AbsVLModel.forward`)."""
        return_loss = labels is not None if return_loss is None else return_loss
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if labels is not None:
            prior_positive = labels == 1 if prior_positive is None else prior_positive & (labels == 1)
        out = super().forward(
            images, input_ids, attention_mask, prior_positive, return_loss=return_loss, **encoder_inputs
        )
        logits = self.itm_head(out.pooled)
        task_loss = {"itm": F.cross_entropy(logits, labels)} if labels is not None else {}
        if self.itc_head is not None:
            out.text_embeds = self.itc_head.text(out.text_hidden, attention_mask)
            out.image_embeds = self._head_image(out.vision)
            if labels is not None:
                groups = text_groups(input_ids, attention_mask)
                task_loss["itc"] = contrastive_loss(
                    out.text_embeds, out.image_embeds, self.itc_head.scale(), labels == 1, groups
                )
        return AbsVLRetrievalOutput(**self.with_task_loss(out, task_loss, return_loss), itm_logits=logits)

    def itm_score(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``[B]`` probability that each (image, text) pair matches."""
        return self(images, input_ids, attention_mask).itm_logits.softmax(dim=-1)[:, 1]

    def rerank_score(
        self, images: torch.Tensor | BackboneOutput, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """``[B]`` re-ranking score of (image, text) pairs: ITM log-odds + s·cos(text, image embedding).

        The ITM term comes from a forward pass whose top-down pass the text steers; the second is
        the ranking's contrastive logit (the prior loss's, or the retrieval head's). Their sum is the log-product of
        the two matching models (BLIP also adds the two): a confident ITM head decides, an uninformative one leaves
        the contrastive order. ``images`` may be their :meth:`first_pass`, computed once per image
        and paired with many texts by ``first.select(rows)``.
        """
        out = self(images, input_ids, attention_mask)
        log_odds = out.itm_logits[:, 1] - out.itm_logits[:, 0]
        return log_odds + self.retrieval_scale() * (out.text_embeds * out.image_embeds).sum(-1)
