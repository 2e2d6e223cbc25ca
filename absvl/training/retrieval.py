"""Image-text retrieval: training (contrastive prior loss + ITM with hard negatives) and the
Flickr30K / COCO evaluation (contrastive top-k re-ranked by ITM with the query as top-down prior).

Training (``absvl train retrieval``) runs ``RetrievalTask`` on the shared loop of
``absvl.training.loop``. One step, ALBEF/BLIP style:

1. without gradients, embed the batch's captions (ξ) and images (bottom-up, one backbone pass)
   and draw for every caption a negative image and for every image a negative caption with
   probability ∝ softmax(similarity / τ) over the other items of the batch (hard negatives);
2. one forward pass over the B matching pairs and the 2B negative pairs, each image's top-down
   pass steered by its caption: ITM cross-entropy over the 3B pairs, the prior loss L_prior
   (AbSViT Eq. 15, in-batch negatives gathered over processes) on the B matching pairs, and
   L_var.

One forward per step keeps DistributedDataParallel happy (a second forward before backward
would mark parameters ready twice).

Evaluation never scores the full image × caption product (METER's ~1.5 GPU-days on COCO): the
query-independent bottom-up image embeddings and the caption embeddings give a contrastive
ranking, and its top ``k`` per query (SPEC §5: 128 on Flickr30K, 256 on COCO) are re-ranked by
``AbsVLModel.rerank_score``: the ITM log-odds of a forward pass in which the caption steers the
image encoder, plus the contrastive logit.
"""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from ..data.captions import CaptionCollator, CaptionedImage, CaptionedImageDataset, load_karpathy
from ..data.images import ImageFiles, collate_image_files, image_transform
from ..metrics.retrieval import RECALL_KS, retrieval_recalls
from ..models.vision.topdown import topdown_health
from ..models.vl import AbsVLModel
from ..runtime import cpu_only
from .config import ConfigError, RetrievalConfig, check_vision_start
from .loop import Validation, make_loader, run_training


def _ensure_data(config: RetrievalConfig) -> None:
    if config.data.shapes:
        from ..data.shapes import ensure_shapes

        ensure_shapes(Path(config.data.captions).parent, **config.data.shapes)


def check_image_root(images: Sequence[CaptionedImage], key: str = "data.images", probe: int = 20) -> None:
    """Fail early (not after an epoch of skipped items) when none of the first images exists."""
    sample = list(images[:probe])
    if sample and not any(im.path.is_file() for im in sample):
        raise FileNotFoundError(f"none of the first {len(sample)} images exists (e.g. {sample[0].path}): "
                                f"point {key} at the folder holding the caption file's filepath/filename")


def build_model(config: RetrievalConfig) -> AbsVLModel:
    """A fresh model from ``config.model``, or ``train.init_from`` (e.g. a VQA-finetuned model)."""
    if config.train.init_from:
        model = AbsVLModel.from_pretrained(config.train.init_from).train()
        if model.config.prior_visual == "top_down":
            raise ConfigError(f"train.init_from={config.train.init_from!r} contrasts only the top-down image output "
                              "(prior_visual=top_down): retrieval indexes bottom-up embeddings")
    else:
        model_config = config.model
        if config.data.image_size is not None:
            model_config = replace(model_config, image_size=config.data.image_size)
        model = AbsVLModel(model_config)
    if model.vqa_head is not None:
        model.vqa_head.requires_grad_(False)  # no VQA term here; DDP needs every trainable weight used
    return model


@torch.no_grad()
def sample_negatives(
    model: AbsVLModel, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, hard: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """(negative image per caption ``[B]``, negative caption per image ``[B]``), never the item itself.

    ``hard``: drawn ∝ softmax(scale · cosine) of ξ and the bottom-up image embedding over the
    other items (ALBEF); otherwise uniformly. Needs ``B ≥ 2``.
    """
    n = images.shape[0]
    if n < 2:
        raise ValueError("negatives need a batch of at least 2 pairs")
    if hard:
        sims = model.contrastive.scale() * model.encode_text(input_ids, attention_mask) @ model.encode_image_bottom_up(images).t()
    else:
        sims = torch.zeros(n, n, device=images.device)
    self_pairs = torch.eye(n, dtype=torch.bool, device=sims.device)
    text_to_image = sims.float().masked_fill(self_pairs, float("-inf")).softmax(dim=1)
    image_to_text = sims.t().float().masked_fill(self_pairs, float("-inf")).softmax(dim=1)
    return torch.multinomial(text_to_image, 1).squeeze(1), torch.multinomial(image_to_text, 1).squeeze(1)


class RetrievalTask:
    """Image-text retrieval as a ``run_training`` task; validation recall (re-ranked R mean) selects
    the best checkpoint; ``save_pretrained`` export."""

    def __init__(self, config: RetrievalConfig) -> None:
        self.config = config

    def setup(self, accelerator: Accelerator, output_dir: Path, checkpoint: Path | None) -> None:
        d = self.config.data
        _ensure_data(self.config)
        self.accelerator = accelerator
        self.train_images = load_karpathy(d.captions, d.train_splits, d.images)
        self.val_images = load_karpathy(d.captions, [d.val_split], d.images)[: d.max_val_images] if d.val_split else []
        check_image_root(self.train_images)
        self.model = model = build_model(self.config)
        transform = image_transform(model.image_size, train=True, randaugment=d.randaugment)
        self.train_set = CaptionedImageDataset(self.train_images, transform)
        self.collator = CaptionCollator(model.tokenizer, model.config.max_text_len, model.image_size)

    def param_groups(self) -> list[dict[str, Any]]:
        t = self.config.train
        return self.model.parameter_groups(t.lr, t.weight_decay, t.lr_multipliers)

    def describe(self) -> str:
        captions = sum(len(im.captions) for im in self.train_images)
        return (f"training on {len(self.train_images)} images ({captions} captions, one drawn per image and epoch), "
                f"{len(self.val_images)} validation images")

    def batch_size(self, batch: dict[str, Any]) -> int:
        return len(batch["indices"])

    def loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        images, ids, mask = batch["images"], batch["input_ids"], batch["attention_mask"]
        n = images.shape[0]
        labels = torch.ones(n, dtype=torch.long, device=images.device)
        if n >= 2 and self.config.model.itm_loss_weight > 0:
            with self.accelerator.autocast():
                neg_image, neg_text = sample_negatives(
                    self.accelerator.unwrap_model(model), images, ids, mask, self.config.train.hard_negatives
                )
            images = torch.cat([images, images[neg_image], images])
            ids, mask = torch.cat([ids, ids, ids[neg_text]]), torch.cat([mask, mask, mask[neg_text]])
            labels = torch.cat([labels, labels.new_zeros(2 * n)])
        out = model(images, ids, mask, itm_labels=labels)
        self.last_forward = (out.vision, out.xi)  # read only at log steps (diagnostics)
        return out.loss

    def diagnostics(self) -> dict[str, torch.Tensor]:
        return topdown_health(*self.last_forward)

    def validate(self, model: AbsVLModel, accelerator: Accelerator) -> Validation | None:
        if not self.val_images:
            return None
        t = self.config.train
        result = evaluate_retrieval(model, self.val_images, accelerator, rerank_k=t.rerank_k,
                                    batch_size=t.batch_size, num_workers=self.config.data.num_workers)
        best = result["reranked"]
        metrics = {f"val/{k}": v for k, v in best.items()}
        metrics.update({f"val/contrastive_{k}": v for k, v in result["contrastive"].items()})
        return Validation(score=best["r_mean"], metrics=metrics, result=result)

    def export(self, model: AbsVLModel, out_dir: Path, last: Validation | None) -> None:
        d = self.config.data
        metrics = {}
        if last:
            metrics = {f"{k.upper()} (val)": round(v, 2) for k, v in last.result["reranked"].items()}
        data = "the generated Shapes world" if d.shapes else f"captions {d.captions}"
        model.save_pretrained(out_dir, model_card_kwargs={
            "training_data": f"{data}, splits {', '.join(d.train_splits)} (image-text retrieval)", "metrics": metrics,
        })


def train_retrieval(config: RetrievalConfig) -> dict[str, Any]:
    """Run a retrieval training job; returns the loop's summary (step, validation, export folder)."""
    check_vision_start(config)
    return run_training(config, RetrievalTask(config))


# --- evaluation ------------------------------------------------------------------------
def _shard(n: int, accelerator: Accelerator) -> range:
    """This process's contiguous part of ``range(n)`` (gather_object concatenates in rank order)."""
    per = -(-n // accelerator.num_processes)
    start = min(n, accelerator.process_index * per)
    return range(start, min(n, start + per))


def _load_images(
    model: AbsVLModel, images: Sequence[CaptionedImage], batch_size: int, num_workers: int, show: bool
) -> tuple[torch.Tensor, list[int], list[tuple[str, str]]]:
    """Every readable image as a model input ``[I, 3, S, S]``, the indices kept, and (path, reason) of the others."""
    dataset = ImageFiles([im.path for im in images], model.image_size)
    loader = make_loader(dataset, collate_image_files, batch_size, num_workers)
    tensors, kept, skipped = [], [], []
    for positions, pixels, bad in tqdm(loader, desc="load images", disable=not show, leave=False):
        if pixels is not None:
            tensors.append(pixels)
        kept.extend(positions)
        skipped.extend((str(images[pos].path), reason) for pos, reason in bad)
    if not kept:
        raise ValueError(f"none of the {len(images)} evaluation images could be read (first: {skipped[:1]})")
    return torch.cat(tensors), kept, skipped


def _batched(fn, n: int, batch_size: int, accelerator: Accelerator, desc: str) -> list[Any]:
    """``fn(slice)`` over this process's share of ``range(n)`` in batches, gathered from every process in order."""
    mine = _shard(n, accelerator)
    out: list[Any] = []
    starts = range(mine.start, mine.stop, batch_size)
    for start in tqdm(starts, desc=desc, disable=not accelerator.is_local_main_process, leave=False):
        with accelerator.autocast():
            out.extend(fn(slice(start, min(mine.stop, start + batch_size))))
    return gather_object(out) if accelerator.num_processes > 1 else out


def _rerank(order: np.ndarray, k: int, scores: np.ndarray) -> np.ndarray:
    """Each row's first ``k`` candidates re-sorted by ``scores`` ``[Q, k]`` (stable: ties keep the
    contrastive order), the rest of the row unchanged."""
    head = np.take_along_axis(order[:, :k], np.argsort(-scores, axis=1, kind="stable"), axis=1)
    return np.concatenate([head, order[:, k:]], axis=1)


@torch.no_grad()
def evaluate_retrieval(
    model: AbsVLModel,
    images: Sequence[CaptionedImage],
    accelerator: Accelerator | None = None,
    rerank_k: int = 128,
    batch_size: int = 64,
    num_workers: int = 0,
    rerank: bool = True,
    ks: Sequence[int] = RECALL_KS,
) -> dict[str, Any]:
    """IR@k / TR@k of ``model`` on ``images`` and their captions (Karpathy protocol).

    Returns ``{"contrastive": recalls, "reranked": recalls (with ``rerank``), "images",
    "captions", "rerank_k", "skipped": [(path, reason)], "seconds"}``. Images that cannot be
    read are left out with their captions, and listed. Work is split over Accelerate processes.
    """
    accelerator = accelerator or Accelerator(cpu=cpu_only())
    begin = time.perf_counter()
    was_training = model.training
    model.eval()
    show = accelerator.is_local_main_process
    pixels, kept, skipped = _load_images(model, images, batch_size, num_workers, show)
    kept_images = [images[i] for i in kept]
    captions = [c for im in kept_images for c in im.captions]
    caption_image = [i for i, im in enumerate(kept_images) for _ in im.captions]
    image_captions, start = [], 0
    for im in kept_images:
        image_captions.append(frozenset(range(start, start + len(im.captions))))
        start += len(im.captions)
    encoded = model.tokenizer(captions, padding="longest", truncation=True, max_length=model.config.max_text_len,
                              return_tensors="pt")
    ids, mask = encoded["input_ids"], encoded["attention_mask"]
    device = accelerator.device

    def text_inputs(rows: Any) -> tuple[torch.Tensor, torch.Tensor]:
        sub_mask = mask[rows]
        length = int(sub_mask.sum(1).max())
        return ids[rows][:, :length].to(device), sub_mask[:, :length].to(device)

    image_emb = _batched(lambda s: model.encode_image_bottom_up(pixels[s].to(device)).float().cpu(),
                         len(kept_images), batch_size, accelerator, "embed images")
    text_emb = _batched(lambda s: model.encode_text(*text_inputs(s)).float().cpu(), len(captions), batch_size,
                        accelerator, "embed captions")
    sims = (torch.stack(text_emb) @ torch.stack(image_emb).t()).numpy()  # [captions, images]
    t2i = np.argsort(-sims, axis=1, kind="stable")
    i2t = np.argsort(-sims.T, axis=1, kind="stable")
    result: dict[str, Any] = {
        "contrastive": retrieval_recalls(t2i, caption_image, i2t, image_captions, ks),
        "images": len(kept_images), "captions": len(captions), "rerank_k": rerank_k, "skipped": skipped,
    }
    if rerank:
        reranked = {}
        for name, order, query_is_text in (("ir", t2i, True), ("tr", i2t, False)):
            k = min(rerank_k, order.shape[1])
            queries = np.repeat(np.arange(order.shape[0]), k)
            candidates = order[:, :k].reshape(-1)
            image_rows, text_rows = (candidates, queries) if query_is_text else (queries, candidates)

            def itm(s: slice, image_rows=image_rows, text_rows=text_rows) -> list[float]:
                return model.rerank_score(pixels[image_rows[s]].to(device), *text_inputs(text_rows[s])).float().cpu().tolist()

            scores = np.asarray(_batched(itm, len(candidates), batch_size, accelerator, f"re-rank {name.upper()}"))
            reranked[name] = _rerank(order, k, scores.reshape(order.shape[0], k))
        result["reranked"] = retrieval_recalls(reranked["ir"], caption_image, reranked["tr"], image_captions, ks)
    model.train(was_training)
    result["seconds"] = time.perf_counter() - begin
    return result


def evaluate_model(
    model: AbsVLModel | str | Path,
    captions_file: str | Path,
    split: str = "test",
    images_root: str | Path | None = None,
    rerank_k: int = 128,
    batch_size: int = 64,
    num_workers: int = 2,
    rerank: bool = True,
    max_images: int | None = None,
) -> dict[str, Any]:
    """``evaluate_retrieval`` of a saved model on one split of a Karpathy caption file."""
    accelerator = Accelerator(cpu=cpu_only())
    model = model if isinstance(model, AbsVLModel) else AbsVLModel.from_pretrained(model)
    model.to(accelerator.device)
    images = load_karpathy(captions_file, [split], images_root)[:max_images]
    check_image_root(images, "--images")
    return evaluate_retrieval(model, images, accelerator, rerank_k, batch_size, num_workers, rerank)
