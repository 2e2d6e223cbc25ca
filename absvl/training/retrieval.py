"""Image-text retrieval training: ``RetrievalTask`` on the shared loop (prior loss, the retrieval head's ITC, ITM on
in-batch hard negatives, ALBEF/BLIP style, and on a Shapes world the foils of ``data.foils``; all pairs in one
forward so that DDP marks each parameter ready once); its validation is ``absvl.evaluation.retrieval``'s.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from ..data.captions import CaptionCollator, CaptionedImageDataset, check_caption_images, load_captions
from ..data.shapes_world import ShapesWorld
from ..evaluation.retrieval import evaluate_retrieval
from ..images import image_transform
from ..models.vision.topdown import shut_gate_warning
from ..models.vl import AbsVLForRetrieval, AbsVLModel
from .config import ConfigError, RetrievalConfig, check_vision_start
from .loop import Validation, run_training

RETRIEVAL_CARD_TASK = "image-feature-extraction"  # the Hub's task id for what the index embeds


def _ensure_data(config: RetrievalConfig) -> None:
    if config.data.shapes:
        from ..data.shapes import ensure_shapes

        ensure_shapes(Path(config.data.captions).parent, **config.data.shapes)


def build_retrieval_model(config: RetrievalConfig) -> AbsVLForRetrieval:
    """A fresh model from ``config.model``, or ``train.init_from``'s: a retrieval model (its heads and their space
    kept), or any other absvl model (e.g. a VQA-finetuned one), whose encoder gets fresh retrieval heads
    (``model.retrieval_head_dim``'s)."""
    if config.train.init_from:
        model = AbsVLForRetrieval.from_pretrained(
            config.train.init_from, new_head=True, retrieval_head_dim=config.model.retrieval_head_dim
        )
        model = model.with_loss_weights(config.model).train()
        if model.config.prior_visual == "top_down":
            raise ConfigError(
                f"train.init_from={config.train.init_from!r} contrasts only the top-down image output "
                "(prior_visual=top_down): retrieval indexes bottom-up embeddings"
            )
    else:
        model_config = config.model
        if config.data.image_size is not None:
            model_config = replace(model_config, image_size=config.data.image_size)
        model = AbsVLForRetrieval(model_config)
    return model


@torch.no_grad()
def sample_negatives(
    model: AbsVLModel, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, hard: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """(negative image per caption ``[B]``, negative caption per image ``[B]``), never the item itself.

    ``hard``: drawn ∝ softmax(scale · cosine) of the ranking's text and bottom-up image embeddings
    (``encode_text``, ``encode_image_bottom_up``) over the other items (ALBEF), mined in eval mode (no dropout;
    BatchNorm statistics, e.g. TDAM's, are not updated by the extra pass); otherwise uniformly. Needs ``B ≥ 2``.
    """
    n = images.shape[0]
    if n < 2:
        raise ValueError("negatives need a batch of at least 2 pairs")
    if hard:
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():  # only drawn from
                sims = (
                    model.retrieval_scale()
                    * model.encode_text(input_ids, attention_mask)
                    @ model.encode_image_bottom_up(images).t()
                )
        finally:
            model.train(was_training)
    else:
        sims = torch.zeros(n, n, device=images.device)
    self_pairs = torch.eye(n, dtype=torch.bool, device=sims.device)
    text_to_image = sims.float().masked_fill(self_pairs, float("-inf")).softmax(dim=1)
    image_to_text = sims.t().float().masked_fill(self_pairs, float("-inf")).softmax(dim=1)
    return torch.multinomial(text_to_image, 1).squeeze(1), torch.multinomial(image_to_text, 1).squeeze(1)


class RetrievalTask:
    """Image-text retrieval as a ``run_training`` task; validation recall (re-ranked R mean) selects
    the best checkpoint; ``save_pretrained`` export."""

    diagnose = False  # set by the loop on the forward of a logged step
    health_warning = staticmethod(shut_gate_warning)

    def __init__(self, config: RetrievalConfig) -> None:
        self.config = config
        self.measured: dict[str, torch.Tensor] = {}

    def setup(self, accelerator: Accelerator, output_dir: Path, checkpoint: Path | None) -> None:
        d = self.config.data
        _ensure_data(self.config)
        self.accelerator = accelerator
        with accelerator.main_process_first():  # one process writes a Hugging Face dataset's images to the cache
            self.train_images = load_captions(d.captions, d.train_splits, d.images, d.format, d.hf_columns)
            val = load_captions(d.captions, [d.val_split], d.images, d.format, d.hf_columns) if d.val_split else []
            self.val_images = val[: d.max_val_images]
        check_caption_images(self.train_images)
        foil = None
        if d.foils:
            root = Path(d.captions).parent
            if not ShapesWorld.exists(root):
                raise ConfigError(
                    f"data.foils=true: {root} holds no Shapes world (foils are made against its scenes); "
                    "set data.foils=false for other captions"
                )
            foil = ShapesWorld.load(root).caption_foils()
        self.model = model = build_retrieval_model(self.config)
        transform = image_transform(model.image_size, train=True, randaugment=d.randaugment)
        self.train_set = CaptionedImageDataset(self.train_images, transform, foil=foil)
        self.collator = CaptionCollator(model.tokenizer, model.config.max_text_len, model.image_size)

    def param_groups(self) -> list[dict[str, Any]]:
        t = self.config.train
        return self.model.parameter_groups(t.lr, t.weight_decay, t.lr_multipliers)

    def describe(self) -> str:
        captions = sum(len(im.captions) for im in self.train_images)
        return (
            f"training on {len(self.train_images)} images ({captions} captions, one drawn per image and epoch), "
            f"{len(self.val_images)} validation images"
        )

    def batch_size(self, batch: dict[str, Any]) -> int:
        return len(batch["indices"])

    def loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        images, ids, mask = batch["images"], batch["input_ids"], batch["attention_mask"]
        n = images.shape[0]
        labels = torch.ones(n, dtype=torch.long, device=images.device)
        image_index = torch.arange(n, device=images.device)
        if n >= 2 and self.config.model.itm_loss_weight > 0:
            with self.accelerator.autocast():
                neg_image, neg_text = sample_negatives(
                    self.accelerator.unwrap_model(model), images, ids, mask, self.config.train.hard_negatives
                )
            # the pairs (image, its caption), (another image, the caption), (image, another caption): each image's
            # first pass runs once for its three pairs
            image_index = torch.cat([image_index, neg_image, image_index])
            ids, mask = torch.cat([ids, ids, ids[neg_text]]), torch.cat([mask, mask, mask[neg_text]])
            labels = torch.cat([labels, labels.new_zeros(2 * n)])
            if "foil_rows" in batch:  # (image, its caption changed in one attribute or the relation)
                rows = batch["foil_rows"]
                image_index = torch.cat([image_index, rows])
                ids, mask = torch.cat([ids, batch["foil_ids"]]), torch.cat([mask, batch["foil_mask"]])
                labels = torch.cat([labels, labels.new_zeros(len(rows))])
        out = model(images, ids, mask, labels=labels, image_index=image_index)
        if self.diagnose:
            self.measured = self.model.training_diagnostics(out)
        return out.loss

    def diagnostics(self) -> dict[str, torch.Tensor]:
        return self.measured

    def validate(self, model: AbsVLModel, accelerator: Accelerator) -> Validation | None:
        if not self.val_images:
            return None
        t = self.config.train
        result = evaluate_retrieval(
            model,
            self.val_images,
            accelerator,
            rerank_k=t.rerank_k,
            batch_size=t.batch_size,
            num_workers=self.config.data.num_workers,
        )
        best = result["reranked"]
        metrics = {f"val/{k}": v for k, v in best.items()}
        metrics.update({f"val/contrastive_{k}": v for k, v in result["contrastive"].items()})
        metrics["val/skipped"] = len(result["skipped"])
        return Validation(score=best["r_mean"], metrics=metrics, result=result)

    def restore(self, output_dir: Path) -> None:
        self.model = build_retrieval_model(self.config)

    def export(self, model: AbsVLModel, out_dir: Path, last: Validation | None) -> None:
        d = self.config.data
        metrics = {}
        if last:  # the re-ranked recalls (val/ir@1, ..., val/r_mean)
            metrics = {
                f"{k[4:].upper()} (val)": round(v, 2)
                for k, v in last.metrics.items()
                if k.startswith(("val/ir@", "val/tr@")) or k == "val/r_mean"
            }
        data = "the generated Shapes world" if d.shapes else f"captions {d.captions}"
        model.save_pretrained(
            out_dir,
            model_card_kwargs={
                "training_data": f"{data}, splits {', '.join(d.train_splits)} (image-text retrieval)",
                "metrics": metrics,
                "task": RETRIEVAL_CARD_TASK,
            },
        )


def train_retrieval(config: RetrievalConfig, notify: Callable[[str], Any] | None = None) -> dict[str, Any]:
    """Run a retrieval training job; returns the loop's summary (step, validation, export folder).
    ``notify`` receives the run's messages (see ``run_training``)."""
    check_vision_start(config)
    return run_training(config, RetrievalTask(config), notify)
