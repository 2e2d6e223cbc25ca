"""Text → image search: the query's ξ against the index of bottom-up image embeddings (cosine), then
optionally the top K re-ranked with the query as the top-down prior (ITM score; ALBEF/BLIP, SPEC §5).
The bottom-up first pass depends on the image only: it runs once per candidate image and call."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..images import BadImageError
from ..models.vl import AbsVLForRetrieval
from .faiss_backend import gpu_available
from .identity import check_fingerprint, model_fingerprint
from .index import ImageIndex

logger = logging.getLogger(__name__)


@dataclass
class SearchHit:
    """One ranked image.

    Attributes:
        rank: 1-based position in the returned list.
        id: the image's id in the index.
        path: the image file.
        score: cosine similarity of the query's ξ and the image's bottom-up embedding.
        rerank_score: ``AbsVLForRetrieval.rerank_score`` (ITM log-odds with the query as top-down prior +
            the contrastive logit; None without re-ranking).
    """

    rank: int
    id: int
    path: Path
    score: float
    rerank_score: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "path": str(self.path)}


class Retriever:
    """Searches an :class:`ImageIndex` with text queries encoded by the model that built it."""

    def __init__(
        self, model: torch.nn.Module, index: ImageIndex | str | Path, device: str | torch.device | None = None
    ) -> None:
        """
        Args:
            model: the model (an ``AbsVLForRetrieval`` to re-rank) whose image embeddings the index holds.
            index: a loaded index or its folder.
            device: where the model runs (None: where it is; the model is moved otherwise).

        Raises:
            IndexMismatchError: the index was built by another model (rebuild it with this one).
        """
        if not isinstance(index, ImageIndex):
            index = ImageIndex.load(index, gpu=gpu_available())
        check_fingerprint(index.fingerprint, model_fingerprint(model), index.folder)
        param = next(model.parameters(), None)
        self.device = (
            torch.device(device) if device is not None else (param.device if param is not None else torch.device("cpu"))
        )
        self.model = model.to(self.device).eval()
        self.index = index
        self.num_dropped = 0  # candidates dropped from re-ranking because their image was unreadable
        # seconds of the last search_batch call: "search" (ξ text encoding + FAISS), "rerank" (0.0 without)
        self.last_timings: dict[str, float] = {}

    @torch.no_grad()
    def encode_queries(self, queries: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """``[Q, C]`` float32 L2-normalised ξ of the queries."""
        parts = []
        for i in range(0, len(queries), batch_size):
            text = self.model.prepare_inputs(text=list(queries[i : i + batch_size]))
            parts.append(self.model.encode_text(text["input_ids"], text["attention_mask"]).float().cpu().numpy())
        return np.concatenate(parts)

    def search(self, query: str, k: int = 10, rerank: int = 0, batch_size: int = 32) -> list[SearchHit]:
        """The ``k`` best images for ``query`` (``rerank=K``: the top K re-ranked top-down, k ≤ K)."""
        return self.search_batch([query], k=k, rerank=rerank, batch_size=batch_size)[0]

    def search_batch(
        self, queries: Sequence[str], k: int = 10, rerank: int = 0, batch_size: int = 32
    ) -> list[list[SearchHit]]:
        """:meth:`search` for many queries: batched text encoding and one FAISS call.

        ``k`` and ``rerank`` larger than the index are clamped to its size: never more than N hits,
        and nothing is allocated for the ones that cannot exist."""
        if isinstance(queries, str):
            raise TypeError("queries must be a list of strings (use search() for one query)")
        for query in queries:
            if not isinstance(query, str):
                raise TypeError(f"a query must be a string, not {type(query).__name__}")
            if not query.strip():
                raise ValueError("query is empty")
        if k < 1:
            raise ValueError(f"k={k} must be >= 1")
        if rerank < 0:
            raise ValueError(f"rerank={rerank} must be >= 0 (0: no re-ranking)")
        if rerank and not isinstance(self.model, AbsVLForRetrieval):
            raise ValueError(
                f"re-ranking needs a retrieval model's ITM head; the index's model is an {type(self.model).__name__}: "
                "search with rerank=0, or index with a model from absvl train retrieval"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        if not queries:
            return []
        depth = min(rerank if rerank else k, max(len(self.index), 1))
        start = time.perf_counter()
        scores, ids = self.index.search(self.encode_queries(queries, batch_size), depth)
        results = [
            [SearchHit(0, int(i), self.index.path_of(i), float(s)) for s, i in zip(scores[q], ids[q]) if i >= 0]
            for q in range(len(queries))
        ]
        searched = time.perf_counter()
        if rerank:
            results = self.rerank(queries, results, batch_size)
        self.last_timings = {"search": searched - start, "rerank": time.perf_counter() - searched if rerank else 0.0}
        for hits in results:
            del hits[min(k, rerank) if rerank else k :]
            for rank, hit in enumerate(hits, 1):
                hit.rank = rank
        return results

    @torch.no_grad()
    def rerank(
        self, queries: Sequence[str], candidates: list[list[SearchHit]], batch_size: int
    ) -> list[list[SearchHit]]:
        """Score each query's candidates with ``rerank_score`` (the ITM head under the query's top-down
        prior); best first. Unreadable images are dropped.

        The images are taken ``batch_size`` at a time in order of first appearance; each chunk's
        first pass is computed once and shared by all its (query, image) pairs, scored
        ``batch_size`` pairs at a time.
        """
        order = list(dict.fromkeys(hit.id for hits in candidates for hit in hits))
        paths = {hit.id: hit.path for hits in candidates for hit in hits}
        text = self.model.prepare_inputs(text=list(queries))
        readable: set[int] = set()
        for start in range(0, len(order), batch_size):
            images = {}
            for image_id in order[start : start + batch_size]:
                try:
                    images[image_id] = self.model.prepare_inputs(images=[paths[image_id]])["images"]
                except BadImageError as err:
                    logger.warning("re-ranking skips %s: %s", paths[image_id], err.reason)
            if not images:
                continue
            readable.update(images)
            row = {image_id: r for r, image_id in enumerate(images)}
            first = self.model.first_pass(torch.cat(list(images.values())))
            pairs = [(q, hit) for q, hits in enumerate(candidates) for hit in hits if hit.id in row]
            for i in range(0, len(pairs), batch_size):
                chunk = pairs[i : i + batch_size]
                texts = torch.tensor([q for q, _ in chunk], device=self.device)
                rows = torch.tensor([row[hit.id] for _, hit in chunk], device=self.device)
                scores = self.model.rerank_score(
                    first.select(rows), text["input_ids"][texts], text["attention_mask"][texts]
                )
                for (_, hit), value in zip(chunk, scores.float().cpu().tolist()):
                    hit.rerank_score = value
        self.num_dropped += sum(hit.id not in readable for hits in candidates for hit in hits)
        return [
            sorted((hit for hit in hits if hit.id in readable), key=lambda h: (-h.rerank_score, -h.score))
            for hits in candidates
        ]
