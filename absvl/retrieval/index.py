"""The loaded image index: FAISS search over a collection's bottom-up image embeddings, id → image path."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .build import BuildReport, add_to_index, build_index, rebuild_index
from .faiss_backend import (
    INDEX_DEVICES,
    apply_search_params,
    copy_to_gpu,
    gpu_unavailable_reason,
    is_gpu_index,
    to_cpu,
    to_gpu,
)
from .folder import IndexFolder


class ImageIndex(IndexFolder):
    """A loaded index folder: FAISS vectors + id → image path table.

    The Python API::

        index = ImageIndex.build(model, "photos/", "photos.index")   # or ImageIndex.load("photos.index")
        index.add(model, ["new/1.jpg", "new/2.jpg"])                   # appends (ids continue), reloads
        scores, ids = index.search(query_vector, k=10)                # one [C] vector → [k], [k]
        scores, ids = index.search_batch(query_vectors, k=10)         # [Q, C] → [Q, k], [Q, k]
        index.rebuild("HNSW32")                                       # new FAISS factory, no re-embedding
        index.path_of(int(ids[0]))
    """

    @classmethod
    def load(cls, path: str | Path, gpu: bool = False) -> ImageIndex:
        """Read an index folder and apply its search parameters (``gpu=True``: search on GPU if possible)."""
        loaded = cls.read(path)
        if gpu:
            loaded.index = to_gpu(loaded.index)
            apply_search_params(loaded.index, loaded.meta.get("search_params", {}))
        return loaded

    def model_source(self) -> str:
        """The model that built the index, to load it again: its absolute folder, or a Hub id.

        Raises ValueError when the index records none, FileNotFoundError when that folder is gone
        (both ask for ``--model``).
        """
        source = self.meta.get("model_source")
        if not source:
            raise ValueError(f"index {self.folder} records no model: pass --model")
        if os.path.isabs(source) and not Path(source).exists():
            raise FileNotFoundError(f"the index's model {source} no longer exists; pass --model")
        return source

    def path_of(self, image_id: int) -> Path:
        """The image file of an id."""
        if not 0 <= int(image_id) < len(self.paths):
            raise KeyError(f"id {image_id} is not in index {self.folder} (ids are 0..{len(self.paths) - 1})")
        return self.paths[int(image_id)]

    def set_search_params(self, **params: int) -> None:
        """Override search-time parameters (``nprobe=64``, ``efSearch=128``) for this session."""
        apply_search_params(self.index, params)

    def search(self, embeddings: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids) of the ``k`` nearest images by inner product; id -1 where fewer are found.

        ``k`` is clamped to the index size N (a larger k finds nothing more, and FAISS would allocate
        ``Q × k`` results): one query ``[C]`` gives ``[min(k, N)]`` arrays, a batch ``[Q, C]`` gives
        ``[Q, min(k, N)]`` (in one FAISS call).
        """
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
            raise TypeError(f"k must be an integer, not {type(k).__name__}")
        if k < 1:
            raise ValueError(f"k={k} must be >= 1")
        k = min(int(k), max(int(self.index.ntotal), 1))
        queries = np.ascontiguousarray(embeddings, dtype=np.float32)
        single = queries.ndim == 1
        queries = queries[None] if single else queries
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(
                f"query embeddings must have shape [{self.dim}] or [Q, {self.dim}], got {list(np.shape(embeddings))}"
            )
        scores, ids = self.index.search(queries, k)
        return (scores[0], ids[0]) if single else (scores, ids)

    def search_batch(self, embeddings: np.ndarray, k: int, batch_size: int = 4096) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`search` of ``[Q, C]`` queries ``batch_size`` at a time (bounded memory for large Q)."""
        if np.ndim(embeddings) != 2:
            raise ValueError(f"query embeddings must have shape [Q, {self.dim}], got {list(np.shape(embeddings))}")
        parts = [self.search(embeddings[i : i + batch_size], k) for i in range(0, max(len(embeddings), 1), batch_size)]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    @classmethod
    def build(
        cls, model: torch.nn.Module, images: str | Path | Iterable[str | Path], out: str | Path, **kwargs: Any
    ) -> ImageIndex:
        """Embed ``images`` with ``model`` into a new index folder ``out`` and load it (options: :func:`build_index`)."""
        report = build_index(model, images, out, **kwargs)
        return cls.load(report.out)

    def add(self, model: torch.nn.Module, images: str | Path | Iterable[str | Path], **kwargs: Any) -> BuildReport:
        """Append images not yet indexed (options: :func:`add_to_index`) and reload this object."""
        report = add_to_index(model, images, self.folder, **kwargs)
        self._reload()
        return report

    def rebuild(self, factory: str | None = None) -> BuildReport:
        """A new FAISS index from the stored embeddings (see :func:`rebuild_index`), then reload."""
        report = rebuild_index(self.folder, factory)
        self._reload()
        return report

    @property
    def device(self) -> str:
        """Where FAISS searches: ``"cuda"`` or ``"cpu"``."""
        return "cuda" if is_gpu_index(self.index) else "cpu"

    def to(self, device: str) -> ImageIndex:
        """Hold the FAISS index on ``device`` and return self: ``"cpu"``; ``"cuda"`` (GPU 0, or a
        RuntimeError saying why not); ``"auto"`` (GPU 0 when FAISS can use one and the index type has a
        GPU version, else CPU)."""
        if device not in INDEX_DEVICES:
            raise ValueError(f"index device {device!r} must be one of {', '.join(INDEX_DEVICES)}")
        if device == "cpu":
            self.index = to_cpu(self.index)
        elif device == "auto":
            self.index = to_gpu(self.index)
        elif not is_gpu_index(self.index):
            reason = gpu_unavailable_reason()
            if reason:
                raise RuntimeError(f"index {self.folder} cannot be held on cuda: {reason}")
            try:
                self.index = copy_to_gpu(self.index)
            except (RuntimeError, AttributeError) as err:
                raise RuntimeError(
                    f"index {self.folder} cannot be held on cuda: FAISS has no GPU version of its "
                    f"{self.factory!r} index ({str(err).strip().splitlines()[-1]})"
                ) from None
        return self

    def _reload(self) -> None:
        gpu = is_gpu_index(self.index)
        self.__dict__.update(vars(type(self).load(self.folder, gpu=gpu)))
