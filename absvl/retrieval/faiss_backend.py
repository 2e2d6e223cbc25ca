"""FAISS itself: the guarded import, the choice of factory and search parameters, GPU placement.

The factory thresholds come from scripts/bench_retrieval.py (100k × 256 clustered vectors, 2 cores):
Flat 530 queries/s; IVF1024,Flat at nprobe 8 7,200 q/s at recall@10 0.999; HNSW32 needs efSearch 128
for recall 0.96 at 1,450 q/s and builds 2.7× slower than IVF; IVF,SQ8 is 4× smaller, recall ≤ 0.99.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

try:
    import faiss
except ImportError as err:  # FAISS comes from an extra: faiss-cpu and faiss-gpu-cu12 both own the module
    raise ImportError(
        f"{err}; absvl's image index needs FAISS: pip install 'absvl[cpu]' (faiss-cpu) or 'absvl[gpu]' "
        "(faiss-gpu-cu12, CUDA 12), or any FAISS build of your own"
    ) from err

logger = logging.getLogger(__name__)

FLAT_MAX = 50_000  # exact search up to here: ≤ 50 MB at C=256 and ~1,000 queries/s
IVF_FLAT_MAX = 5_000_000  # IVF over full vectors up to here (5 GB at C=256), then 8-bit codes
HNSW_EF_SEARCH = 64  # default efSearch for an explicitly requested HNSW factory
MIN_TRAIN_PER_CENTROID = 39  # FAISS's own k-means warning threshold
MAX_TRAIN_PER_CENTROID = 256  # FAISS's k-means subsamples to this anyway
QUANTIZER_CENTROIDS = 256  # a PQ/SQ code book needs at least this many training vectors
INDEX_DEVICES = ("auto", "cpu", "cuda")


# --------------------------------------------------------------------------- factory choice
def round_pow2(x: float) -> int:
    """The power of two nearest to ``x`` (at least 1)."""
    return 1 << max(0, round(math.log2(max(x, 1.0))))


def ivf_nlist(n: int) -> int:
    """IVF list count ≈ 4·√N, a power of two (1M vectors → 4096)."""
    return round_pow2(4 * math.sqrt(n))


def ivf_nprobe(nlist: int) -> int:
    """Lists visited per query: 1/256 of the lists, at least 8 (IVF1024 → 8, IVF4096 → 16).

    On 1M clustered vectors (BENCHMARKS.md) IVF4096 at nprobe 16 kept recall@10 ≥ 0.99 at ~5,500
    queries/s on 2 cores; harder embeddings may want more (``absvl search --nprobe``).
    """
    return min(nlist, max(8, nlist // 256))


def choose_factory(n: int, dim: int) -> tuple[str, dict[str, int]]:
    """(FAISS factory string, search-time parameters) for ``n`` vectors of width ``dim``.

    Exact ``Flat`` up to :data:`FLAT_MAX`; then ``IVF{4√N},Flat`` (trained on a sample) up to
    :data:`IVF_FLAT_MAX`; beyond, ``IVF{4√N},SQ8`` (8-bit codes: 4× less memory).
    """
    if n <= FLAT_MAX:
        return "Flat", {}
    nlist = ivf_nlist(n)
    codes = "Flat" if n <= IVF_FLAT_MAX else "SQ8"
    return f"IVF{nlist},{codes}", {"nprobe": ivf_nprobe(nlist)}


def default_search_params(index: faiss.Index) -> dict[str, int]:
    """Search parameters for an explicitly requested factory: IVF nprobe, HNSW efSearch."""
    try:
        return {"nprobe": ivf_nprobe(faiss.extract_index_ivf(index).nlist)}
    except RuntimeError:
        pass
    if hasattr(faiss.downcast_index(index), "hnsw"):
        return {"efSearch": HNSW_EF_SEARCH}
    return {}


def training_centroids(index: faiss.Index) -> int:
    """The centroids an untrained ``index`` learns: its IVF lists, else a code book's."""
    try:
        return faiss.extract_index_ivf(index).nlist
    except RuntimeError:
        return QUANTIZER_CENTROIDS


def min_training_vectors(index: faiss.Index) -> int:
    """How many vectors ``index`` needs to be trained sensibly (0 when it needs no training)."""
    if index.is_trained:
        return 0
    try:
        return MIN_TRAIN_PER_CENTROID * faiss.extract_index_ivf(index).nlist
    except RuntimeError:
        return QUANTIZER_CENTROIDS


def new_faiss_index(dim: int, factory: str) -> faiss.Index:
    """An empty inner-product index from a factory string; a bad string is a ValueError naming it."""
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as err:
        raise ValueError(f"bad FAISS factory string {factory!r}: {str(err).strip().splitlines()[-1]}") from None
    return index


def apply_search_params(index: faiss.Index, params: dict[str, Any]) -> None:
    """Set nprobe / efSearch (any FAISS ParameterSpace name) on a CPU or GPU index."""
    if not params:
        return
    text = ",".join(f"{k}={v}" for k, v in params.items())
    space = faiss.GpuParameterSpace() if is_gpu_index(index) else faiss.ParameterSpace()
    try:
        space.set_index_parameters(index, text)
    except RuntimeError as err:
        raise ValueError(
            f"cannot set search parameters {text!r} on this index: {str(err).strip().splitlines()[-1]}"
        ) from None


# --------------------------------------------------------------------------- GPU
_GPU_RESOURCES: list[Any] = []


def gpu_unavailable_reason() -> str | None:
    """Why FAISS cannot search on a GPU here; None when it can."""
    if not hasattr(faiss, "StandardGpuResources"):
        return "this FAISS build has no GPU support (pip install 'absvl[gpu]' instead of 'absvl[cpu]')"
    if not torch.cuda.is_available() or faiss.get_num_gpus() < 1:
        return "no CUDA device is visible"
    return None


def gpu_available() -> bool:
    """True when this faiss build has GPU support and torch sees a CUDA device."""
    return gpu_unavailable_reason() is None


def is_gpu_index(index: faiss.Index) -> bool:
    return "Gpu" in type(faiss.downcast_index(index)).__name__


def copy_to_gpu(index: faiss.Index) -> faiss.Index:
    """``index`` copied to GPU 0; RuntimeError for index types without a GPU version (HNSW, ...)."""
    if not _GPU_RESOURCES:
        _GPU_RESOURCES.append(faiss.StandardGpuResources())  # one per process, kept alive
    return faiss.index_cpu_to_gpu(_GPU_RESOURCES[0], 0, index)


def to_gpu(index: faiss.Index) -> faiss.Index:
    """The index on GPU 0 when possible (HNSW and some others have no GPU version: kept on CPU)."""
    if not gpu_available() or is_gpu_index(index):
        return index
    try:
        return copy_to_gpu(index)
    except (RuntimeError, AttributeError) as err:
        logger.info("keeping the index on CPU: %s", err)
        return index


def to_cpu(index: faiss.Index) -> faiss.Index:
    return faiss.index_gpu_to_cpu(index) if is_gpu_index(index) else index
