"""Image-text retrieval: training (``RetrievalTask`` on the shared loop: prior loss + ITM on in-batch hard
negatives, ALBEF/BLIP style, all 3B pairs in one forward so that DDP marks each parameter ready once) and the
Flickr30K / COCO evaluation: a contrastive ranking of bottom-up image and caption embeddings whose top ``k``
per query (SPEC §5: 128 Flickr30K, 256 COCO) is re-ranked by ``AbsVLModel.rerank_score`` (ITM with the
caption steering the image encoder), never the full image × caption product.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch.utils.data import Subset
from tqdm.auto import tqdm

from ..data.captions import CaptionCollator, CaptionedImage, CaptionedImageDataset, load_captions
from ..data.image_files import ImageFiles, check_image_root, collate_image_files
from ..images import image_transform
from ..metrics.retrieval import RECALL_KS, retrieval_recalls
from ..models.vision.topdown import topdown_health
from ..models.vl import AbsVLModel
from ..runtime import cpu_only
from .config import ConfigError, RetrievalConfig, check_vision_start
from .loop import Validation, make_loader, process_share, run_training

RETRIEVAL_CARD_TASK = "image-feature-extraction"  # the Hub's task id for what the index embeds


def _ensure_data(config: RetrievalConfig) -> None:
    if config.data.shapes:
        from ..data.shapes import ensure_shapes

        ensure_shapes(Path(config.data.captions).parent, **config.data.shapes)


def check_caption_images(images: Sequence[CaptionedImage], key: str = "data.images") -> None:
    """``check_image_root`` on the images of a caption file."""
    check_image_root(
        [im.path for im in images[:20]], f"point {key} at the folder holding the caption file's filepath/filename"
    )


def build_model(config: RetrievalConfig) -> AbsVLModel:
    """A fresh model from ``config.model``, or ``train.init_from`` (e.g. a VQA-finetuned model)."""
    if config.train.init_from:
        model = AbsVLModel.from_pretrained(config.train.init_from).with_loss_weights(config.model).train()
        if model.config.prior_visual == "top_down":
            raise ConfigError(
                f"train.init_from={config.train.init_from!r} contrasts only the top-down image output "
                "(prior_visual=top_down): retrieval indexes bottom-up embeddings"
            )
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
    other items (ALBEF), mined in eval mode (no dropout; BatchNorm statistics, e.g. TDAM's, are
    not updated by the extra pass); otherwise uniformly. Needs ``B ≥ 2``.
    """
    n = images.shape[0]
    if n < 2:
        raise ValueError("negatives need a batch of at least 2 pairs")
    if hard:
        was_training = model.training
        model.eval()
        try:
            sims = (
                model.contrastive.scale()
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
        self.model = model = build_model(self.config)
        transform = image_transform(model.image_size, train=True, randaugment=d.randaugment)
        self.train_set = CaptionedImageDataset(self.train_images, transform)
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
        if self.diagnose:
            self.measured = self.model.loss_gradient_norms(out.losses)
            self.measured.update({f"loss/{k}": v.detach() for k, v in out.losses.items()})
        return out.loss

    def diagnostics(self) -> dict[str, torch.Tensor]:
        return {**topdown_health(*self.last_forward), **self.measured}

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
        self.model = build_model(self.config)

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
        model.config.trained_tasks = ["retrieval"]  # the VQA head was frozen while the rest changed: it no longer fits
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


# --- evaluation ------------------------------------------------------------------------
def _image_batches(
    paths: Sequence[str],
    positions: Sequence[int],
    image_size: int,
    batch_size: int,
    num_workers: int,
    desc: str,
    show: bool,
) -> Any:
    """``(positions read, pixels [B, 3, S, S] or None, [(position, reason)] unreadable)`` batches of
    the images at ``positions`` of ``paths``, decoded as they are needed (never all held at once)."""
    dataset = Subset(ImageFiles(list(paths), image_size), list(positions))
    return tqdm(
        make_loader(dataset, collate_image_files, batch_size, num_workers), desc=desc, disable=not show, leave=False
    )


def _gather(parts: list[Any], accelerator: Accelerator) -> list[Any]:
    return gather_object(parts) if accelerator.num_processes > 1 else parts


@torch.no_grad()
def _embed_images(
    model: AbsVLModel, paths: Sequence[str], batch_size: int, num_workers: int, accelerator: Accelerator
) -> tuple[list[int], torch.Tensor, list[tuple[int, str]]]:
    """Bottom-up embeddings ``[I, C]`` of every readable image (split over processes), their
    positions in ``paths``, and ``(position, reason)`` of the unreadable ones."""
    kept, embeddings, bad = [], [], []
    batches = _image_batches(
        paths,
        process_share(len(paths), accelerator),
        model.image_size,
        batch_size,
        num_workers,
        "embed images",
        accelerator.is_local_main_process,
    )
    for positions, pixels, unreadable in batches:
        bad.extend(unreadable)
        if pixels is not None:
            with accelerator.autocast():
                embeddings.append(model.encode_image_bottom_up(pixels.to(accelerator.device)).float().cpu())
            kept.extend(positions)
    parts = _gather([(kept, torch.cat(embeddings) if embeddings else None, bad)], accelerator)
    kept = [p for part in parts for p in part[0]]
    if not kept:
        bad = [b for part in parts for b in part[2]]
        raise ValueError(
            f"none of the {len(paths)} evaluation images could be read (first: {paths[bad[0][0]]}: {bad[0][1]})"
        )
    return kept, torch.cat([part[1] for part in parts if part[1] is not None]), [b for part in parts for b in part[2]]


def _batched(fn, n: int, batch_size: int, accelerator: Accelerator, desc: str) -> list[Any]:
    """``fn(slice)`` over this process's share of ``range(n)`` in batches, gathered from every process in order."""
    mine = process_share(n, accelerator)
    out: list[Any] = []
    starts = range(mine.start, mine.stop, batch_size)
    for start in tqdm(starts, desc=desc, disable=not accelerator.is_local_main_process, leave=False):
        with accelerator.autocast():
            out.extend(fn(slice(start, min(mine.stop, start + batch_size))))
    return _gather(out, accelerator)


@torch.no_grad()
def _pair_scores(
    model: AbsVLModel,
    paths: Sequence[str],
    image_rows: np.ndarray,
    text_inputs: Any,
    text_rows: np.ndarray,
    batch_size: int,
    num_workers: int,
    accelerator: Accelerator,
    desc: str,
) -> np.ndarray:
    """``model.rerank_score`` of the pairs (image ``paths[image_rows[i]]``, caption ``text_rows[i]``).

    The pairs are visited image by image (the images split over processes), so each image is
    decoded and passes bottom-up once (``model.first_pass``), and only ``batch_size`` images are
    in memory at a time; pairs are scored ``batch_size`` at a time."""
    by_image = np.argsort(image_rows, kind="stable")
    images, first = np.unique(image_rows[by_image], return_index=True)
    pairs_of = dict(zip(images.tolist(), np.split(by_image, first[1:])))
    mine = images[list(process_share(len(images), accelerator))]
    scored: list[tuple[np.ndarray, np.ndarray]] = []
    batches = _image_batches(
        paths, mine, model.image_size, batch_size, num_workers, desc, accelerator.is_local_main_process
    )
    for positions, pixels, unreadable in batches:
        if unreadable:
            position, reason = unreadable[0]
            raise ValueError(f"{paths[position]} was read moments ago and now cannot be ({reason}): was it changed?")
        pairs = np.concatenate([pairs_of[p] for p in positions])
        rows = torch.from_numpy(np.concatenate([np.full(len(pairs_of[p]), row) for row, p in enumerate(positions)]))
        with accelerator.autocast():
            first = model.first_pass(pixels.to(accelerator.device))  # once per image, shared by its pairs
            for start in range(0, len(pairs), batch_size):
                chunk = slice(start, start + batch_size)
                score = model.rerank_score(
                    first.select(rows[chunk].to(accelerator.device)), *text_inputs(text_rows[pairs[chunk]])
                )
                scored.append((pairs[chunk], score.float().cpu().numpy()))
    scores = np.empty(len(image_rows), dtype=np.float32)
    for pairs, values in _gather(scored, accelerator):
        scores[pairs] = values
    return scores


def _ranked(queries: torch.Tensor, items: torch.Tensor, depth: int, chunk: int = 1024) -> np.ndarray:
    """Each query's first ``depth`` items by descending cosine (ties in item order), ``chunk``
    queries at a time: the full similarity matrix and its orders (COCO 5k: 25k × 5k, 2.5 GB
    with both argsorts) are never held."""
    ranked = []
    for start in range(0, len(queries), chunk):
        sims = queries[start : start + chunk] @ items.t()
        ranked.append(torch.sort(sims, dim=1, descending=True, stable=True).indices[:, :depth].numpy())
    return np.concatenate(ranked)


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
    read are left out with their captions, and listed. Images are streamed from disk (embedded,
    then decoded again image by image for re-ranking), never all held in memory, and each query
    keeps only its first ``max(ks, rerank_k)`` candidates; work is split over Accelerate processes.
    """
    accelerator = accelerator or Accelerator(cpu=cpu_only())
    begin = time.perf_counter()
    was_training = model.training
    model.eval()
    kept, image_emb, unreadable = _embed_images(
        model, [str(im.path) for im in images], batch_size, num_workers, accelerator
    )
    skipped = [(str(images[position].path), reason) for position, reason in unreadable]
    kept_images = [images[i] for i in kept]
    kept_paths = [str(im.path) for im in kept_images]
    captions = [c for im in kept_images for c in im.captions]
    caption_image = [i for i, im in enumerate(kept_images) for _ in im.captions]
    image_captions, start = [], 0
    for im in kept_images:
        image_captions.append(frozenset(range(start, start + len(im.captions))))
        start += len(im.captions)
    encoded = model.tokenizer(
        captions, padding="longest", truncation=True, max_length=model.config.max_text_len, return_tensors="pt"
    )
    ids, mask = encoded["input_ids"], encoded["attention_mask"]
    device = accelerator.device

    def text_inputs(rows: Any) -> tuple[torch.Tensor, torch.Tensor]:
        sub_mask = mask[rows]
        length = int(sub_mask.sum(1).max())
        return ids[rows][:, :length].to(device), sub_mask[:, :length].to(device)

    text_emb = _batched(
        lambda s: model.encode_text(*text_inputs(s)).float().cpu(),
        len(captions),
        batch_size,
        accelerator,
        "embed captions",
    )
    text_emb = torch.stack(text_emb)
    depth = max(max(ks), rerank_k if rerank else 0)
    t2i, i2t = _ranked(text_emb, image_emb, depth), _ranked(image_emb, text_emb, depth)
    result: dict[str, Any] = {
        "contrastive": retrieval_recalls(t2i, caption_image, i2t, image_captions, ks),
        "images": len(kept_images),
        "captions": len(captions),
        "rerank_k": rerank_k,
        "skipped": skipped,
    }
    if rerank:
        reranked = {}
        for name, order, query_is_text in (("ir", t2i, True), ("tr", i2t, False)):
            k = min(rerank_k, order.shape[1])
            queries = np.repeat(np.arange(order.shape[0]), k)
            candidates = order[:, :k].reshape(-1)
            image_rows, text_rows = (candidates, queries) if query_is_text else (queries, candidates)
            scores = _pair_scores(
                model,
                kept_paths,
                image_rows,
                text_inputs,
                text_rows,
                batch_size,
                num_workers,
                accelerator,
                f"re-rank {name.upper()}",
            )
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
    format: str | None = None,
    columns: dict[str, str] | None = None,
) -> dict[str, Any]:
    """``evaluate_retrieval`` of a saved model on one split of a Karpathy caption file or a Hugging
    Face caption dataset (``load_captions``: ``format`` ``karpathy``/``hf``, ``None`` to tell by the
    name; ``columns``: the dataset's column mapping)."""
    accelerator = Accelerator(cpu=cpu_only())
    model = model if isinstance(model, AbsVLModel) else AbsVLModel.from_pretrained(model)
    model.to(accelerator.device)
    with accelerator.main_process_first():
        images = load_captions(captions_file, [split], images_root, format, columns)[:max_images]
    check_caption_images(images, "--images")
    return evaluate_retrieval(model, images, accelerator, rerank_k, batch_size, num_workers, rerank)
