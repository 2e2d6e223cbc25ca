"""Flickr30K / COCO retrieval evaluation (Karpathy protocol): a contrastive ranking of bottom-up image and caption
embeddings whose top ``k`` per query (SPEC §5: 128 Flickr30K, 256 COCO) is re-ranked by ``AbsVLModel.rerank_score``
(ITM with the caption steering the image encoder), never the full image × caption product.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch.utils.data import Subset
from tqdm.auto import tqdm

from ..data.captions import CaptionedImage, check_caption_images, load_captions
from ..data.image_files import ImageFiles, collate_image_files
from ..data.loaders import make_loader, process_share
from ..data.shapes_text import caption_check, caption_kind
from ..data.shapes_world import ShapesWorld
from ..metrics.retrieval import RECALL_KS, retrieval_recalls
from ..metrics.scene_retrieval import scene_retrieval_scores
from ..models.vl import AbsVLForRetrieval, AbsVLModel, load_model
from ..runtime import cpu_only


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
    keep_rankings: bool = False,
) -> dict[str, Any]:
    """IR@k / TR@k of ``model`` on ``images`` and their captions (Karpathy protocol).

    Returns ``{"contrastive": recalls, "reranked": recalls (with ``rerank``), "images",
    "captions", "rerank_k", "skipped": [(path, reason)], "seconds"}``. Images that cannot be
    read are left out with their captions, and listed. Images are streamed from disk (embedded,
    then decoded again image by image for re-ranking), never all held in memory, and each query
    keeps only its first ``max(ks, rerank_k)`` candidates; work is split over Accelerate processes.
    ``keep_rankings``: also return the caption → image rankings (``"rankings"``: ``{"contrastive", "reranked"}``
    ``[captions, depth]`` indices into ``"image_paths"``) and the ``"captions"`` texts, for scene-true scores.
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
    rankings = {"contrastive": t2i}
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
        rankings["reranked"] = reranked["ir"]
    if keep_rankings:
        result.update(rankings=rankings, image_paths=kept_paths, query_captions=captions)
    model.train(was_training)
    result["seconds"] = time.perf_counter() - begin
    return result


def evaluate_retrieval_model(
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
    name; ``columns``: the dataset's column mapping). The caption file of a Shapes world adds ``"scene"``:
    the scene-true scores (``shapes_scene_scores``)."""
    accelerator = Accelerator(cpu=cpu_only())
    if not isinstance(model, AbsVLModel):  # re-ranking needs the ITM head; the contrastive ranking any model's space
        model = AbsVLForRetrieval.from_pretrained(model) if rerank else load_model(model)
    model.to(accelerator.device)
    shapes_root = Path(captions_file).parent
    shapes = ShapesWorld.exists(shapes_root)  # a Shapes world keeps its images in images/ and knows every scene
    if shapes and images_root is None:
        images_root = shapes_root / "images"
    with accelerator.main_process_first():
        images = load_captions(captions_file, [split], images_root, format, columns)[:max_images]
    check_caption_images(images, "--images")
    if not shapes:
        return evaluate_retrieval(model, images, accelerator, rerank_k, batch_size, num_workers, rerank)
    # the hits are also checked against what each caption says
    result = evaluate_retrieval(
        model, images, accelerator, rerank_k, batch_size, num_workers, rerank, keep_rankings=True
    )
    result["scene"] = shapes_scene_scores(result, ShapesWorld.load(shapes_root))
    for key in ("rankings", "image_paths", "query_captions"):
        del result[key]
    return result


def shapes_scene_scores(result: dict[str, Any], world: ShapesWorld) -> dict[str, Any]:
    """``scene_retrieval_scores`` of an ``evaluate_retrieval(..., keep_rankings=True)`` result on a Shapes world's
    images: each caption against every evaluated image's scene (``caption_check``)."""
    scenes, margin = world.scene_objects(), world.relation_margin
    objects_of = [scenes[Path(path).name] for path in result["image_paths"]]
    shape = (len(result["query_captions"]), len(objects_of))
    objects, relations, relational = np.zeros(shape, bool), np.zeros(shape, bool), np.zeros(shape[0], bool)
    for q, caption in enumerate(result["query_captions"]):
        check = caption_check(caption)  # parsed once, checked against every scene
        if check is None:
            raise ValueError(f"caption {caption!r} is not one of the Shapes world's: no scene check for it")
        for i, scene in enumerate(objects_of):
            holds = check(scene, margin)
            objects[q, i] = holds[0]
            relations[q, i] = holds[0] and holds[1] is not False
            relational[q] = holds[1] is not None
    kinds = [caption_kind(caption) for caption in result["query_captions"]]
    return scene_retrieval_scores(result["rankings"], objects, relations, relational, kinds)
