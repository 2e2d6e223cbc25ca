"""Embedding files (float32 ``[N, C]`` ``.npy``, read memory-mapped) into FAISS: fill an index from
them, concatenate them, and measure an index's recall against exact search over them."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from ..io import atomic_file
from .faiss_backend import (
    MAX_TRAIN_PER_CENTROID,
    apply_search_params,
    choose_factory,
    default_search_params,
    faiss,
    min_training_vectors,
    new_faiss_index,
    to_cpu,
    to_gpu,
    training_centroids,
)

logger = logging.getLogger(__name__)

RECALL_K, RECALL_QUERIES = 10, 1000  # recall@10 of a built index on 1,000 of its own vectors as queries


def open_rows(path: Path) -> np.ndarray:
    """The ``.npy`` file memory-mapped; a truncated or damaged one is a ValueError naming it."""
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        if isinstance(err, FileNotFoundError):
            raise
        raise ValueError(f"embedding file {path} is truncated or damaged ({err})") from None


def chunks(files: Iterable[Path], rows: int = 65_536) -> Iterable[tuple[int, np.ndarray]]:
    """(first row, float32 block of at most ``rows`` rows) over ``.npy`` files read memory-mapped,
    rows numbered across the files."""
    start = 0
    for f in files:
        vectors = open_rows(f)
        for i in range(0, len(vectors), rows):
            yield start + i, np.ascontiguousarray(vectors[i : i + rows], dtype=np.float32)
        start += len(vectors)


def write_npy(path: Path, array: np.ndarray) -> None:
    """``array`` as a ``.npy`` file, written atomically."""
    with atomic_file(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, array, allow_pickle=False)


def write_embeddings(path: Path, files: list[Path], dim: int) -> None:
    """Concatenate the vectors of ``files`` into one float32 ``[N, dim]`` ``.npy`` (streamed, atomic)."""
    total = sum(open_rows(f).shape[0] for f in files)
    with atomic_file(path) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(total, dim))
        for start, vectors in chunks(files):
            out[start : start + len(vectors)] = vectors
        out.flush()
        del out


def _training_sample(files: list[Path], total: int, size: int, seed: int = 0) -> np.ndarray:
    """``size`` random rows drawn from the files (memory-mapped), or all rows if fewer."""
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(total, size=min(size, total), replace=False))
    parts, start = [], 0
    for f in files:
        vectors = open_rows(f)
        local = chosen[(chosen >= start) & (chosen < start + len(vectors))] - start
        parts.append(np.asarray(vectors[local], dtype=np.float32))
        start += len(vectors)
    return np.ascontiguousarray(np.concatenate(parts))


def fill_index(
    factory: str | None, dim: int, vector_files: list[Path], notes: list[str]
) -> tuple[faiss.Index, str, dict[str, int]]:
    """Create (chosen by size when ``factory`` is None), train and fill an index from ``.npy`` files.

    A training-based factory with too few vectors falls back to exact ``Flat`` (noted in ``notes``).
    Training and adding run on GPU when available; the returned index is on CPU.
    """
    total = sum(open_rows(f).shape[0] for f in vector_files)
    if factory is None:
        factory, params = choose_factory(total, dim)
        index = new_faiss_index(dim, factory)
    else:
        index = new_faiss_index(dim, factory)
        params = default_search_params(index)
    needed = min_training_vectors(index)
    if needed and total < needed:
        notes.append(f"{total} vectors are too few to train {factory!r} (needs ≥ {needed}): using exact 'Flat' search")
        factory, params, index = "Flat", {}, new_faiss_index(dim, "Flat")
    work = to_gpu(index)
    if not index.is_trained:
        work.train(_training_sample(vector_files, total, MAX_TRAIN_PER_CENTROID * training_centroids(index)))
    for _, vectors in chunks(vector_files):
        work.add(vectors)
    return to_cpu(work), factory, params


def measure_recall(
    index: faiss.Index, vectors_file: Path, k: int = RECALL_K, num_queries: int = RECALL_QUERIES, seed: int = 0
) -> float:
    """recall@k of ``index`` against exact inner-product search over the vectors of ``vectors_file``
    (the ones it holds), with ``num_queries`` of those vectors, drawn at random, as queries.

    A returned id counts as a hit when its exact score reaches the exact k-th best score, so ties
    between equal vectors are not misses. Search parameters already set on ``index`` apply.
    """
    vectors = open_rows(vectors_file)
    k = min(k, len(vectors))
    rng = np.random.default_rng(seed)
    queries = np.ascontiguousarray(
        vectors[np.sort(rng.choice(len(vectors), min(num_queries, len(vectors)), replace=False))], dtype=np.float32
    )
    exact = faiss.ResultHeap(len(queries), k, keep_max=True)
    for start, block in chunks([vectors_file]):
        scores, ids = faiss.knn(queries, block, min(k, len(block)), metric=faiss.METRIC_INNER_PRODUCT)
        exact.add_result(np.ascontiguousarray(scores), np.ascontiguousarray(ids + start))
    exact.finalize()
    _, found = index.search(queries, k)
    true_scores = np.einsum("qc,qkc->qk", queries, np.asarray(vectors[np.maximum(found, 0)], dtype=np.float32))
    hits = (found >= 0) & (true_scores >= exact.D[:, -1:] - 1e-5)
    return float(hits.mean())


def recall_with(index: faiss.Index, params: dict[str, Any], vectors_file: Path) -> float:
    """:func:`measure_recall` with the search parameters ``params`` set on ``index``, logged."""
    apply_search_params(index, params)
    recall = measure_recall(index, vectors_file)
    logger.info("recall@%d against exact search: %.4f", RECALL_K, recall)
    return recall
