"""Text → image search: ξ of the query against the bottom-up image index, then top-down re-ranking.

Stage 1 (fast, query-independent images): the query's L2-normalised prior ξ is searched in the
FAISS index of bottom-up image embeddings (cosine similarity).
Stage 2 (``rerank=K``, optional): the top K candidates are run through the full model with the
query as the top-down prior — ξ modulates the AbSViT output tokens, the feedback path steers the
second pass, the fusion encoder and ITM head score the pair — and re-sorted by the ITM match
probability (ties: by the stage-1 score). This is the ALBEF/BLIP recipe (SPEC §5).
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..data.images import BadImageError
from ..models.vl.processing import preprocess_image
from .index import ImageIndex, check_fingerprint, gpu_available, model_fingerprint

logger = logging.getLogger(__name__)


@dataclass
class SearchHit:
    """One ranked image.

    Attributes:
        rank: 1-based position in the returned list.
        id: the image's id in the index.
        path: the image file.
        score: cosine similarity of the query's ξ and the image's bottom-up embedding.
        rerank_score: ``AbsVLModel.rerank_score`` (ITM log-odds with the query as top-down prior +
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

    def __init__(self, model: torch.nn.Module, index: ImageIndex | str | Path, device: str | torch.device | None = None) -> None:
        """
        Args:
            model: the :class:`~absvl.models.vl.AbsVLModel` whose image embeddings the index holds.
            index: a loaded index or its folder.
            device: where the model runs (None: where it is; the model is moved otherwise).

        Raises:
            IndexMismatchError: the index was built by another model (rebuild it with this one).
        """
        if not isinstance(index, ImageIndex):
            index = ImageIndex.load(index, gpu=gpu_available())
        check_fingerprint(index.fingerprint, model_fingerprint(model), index.folder)
        param = next(model.parameters(), None)
        self.device = torch.device(device) if device is not None else (param.device if param is not None else torch.device("cpu"))
        self.model = model.to(self.device).eval()
        self.index = index
        self.processor = model.processor
        self.num_dropped = 0  # candidates dropped from re-ranking because their image was unreadable

    @torch.no_grad()
    def encode_queries(self, queries: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """``[Q, C]`` float32 L2-normalised ξ of the queries."""
        parts = []
        for i in range(0, len(queries), batch_size):
            text = self.processor(text=list(queries[i : i + batch_size]))
            ids, mask = text["input_ids"].to(self.device), text["attention_mask"].to(self.device)
            parts.append(self.model.encode_text(ids, mask).float().cpu().numpy())
        return np.concatenate(parts)

    def search(self, query: str, k: int = 10, rerank: int = 0, batch_size: int = 32) -> list[SearchHit]:
        """The ``k`` best images for ``query`` (``rerank=K``: the top K re-ranked top-down, k ≤ K)."""
        return self.search_batch([query], k=k, rerank=rerank, batch_size=batch_size)[0]

    def search_batch(self, queries: Sequence[str], k: int = 10, rerank: int = 0, batch_size: int = 32) -> list[list[SearchHit]]:
        """:meth:`search` for many queries: batched text encoding and one FAISS call."""
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
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        if not queries:
            return []
        depth = rerank if rerank else k
        scores, ids = self.index.search(self.encode_queries(queries, batch_size), depth)
        results = []
        for q, query in enumerate(queries):
            hits = [SearchHit(0, int(i), self.index.path_of(i), float(s)) for s, i in zip(scores[q], ids[q]) if i >= 0]
            if rerank:
                hits = self._rerank(query, hits, batch_size)
            hits = hits[: min(k, rerank) if rerank else k]
            for rank, hit in enumerate(hits, 1):
                hit.rank = rank
            results.append(hits)
        return results

    @torch.no_grad()
    def _rerank(self, query: str, hits: list[SearchHit], batch_size: int) -> list[SearchHit]:
        """Score each candidate with ``rerank_score`` (the ITM head under the query's top-down prior); best first."""
        readable = []
        for hit in hits:
            try:
                readable.append((hit, preprocess_image(hit.path, self.model.image_size)))
            except BadImageError as err:
                self.num_dropped += 1
                logger.warning("re-ranking skips %s: %s", hit.path, err.reason)
        text = self.processor(text=[query])
        for i in range(0, len(readable), batch_size):
            chunk = readable[i : i + batch_size]
            images = torch.stack([x for _, x in chunk]).to(self.device)
            n = len(chunk)
            ids = text["input_ids"].expand(n, -1).to(self.device)
            mask = text["attention_mask"].expand(n, -1).to(self.device)
            for (hit, _), value in zip(chunk, self.model.rerank_score(images, ids, mask).float().cpu().tolist()):
                hit.rerank_score = value
        return sorted((hit for hit, _ in readable), key=lambda h: (-h.rerank_score, -h.score))
