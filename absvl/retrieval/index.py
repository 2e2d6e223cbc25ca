"""FAISS image index: bottom-up image embeddings of a collection, built in resumable shards.

An index is a folder::

    INDEX/
      index.faiss     faiss.write_index of the vectors (L2-normalised, inner-product metric)
      embeddings.npy  the same vectors, float32 [N, C], row i = id i: a new factory needs no re-embedding
      meta.json       format "absvl-index", version, dim, metric, factory, search_params,
                      fingerprint (of the model that embedded the images), model summary, model_source,
                      recall_at_10 (of the FAISS index against exact search), count, created
      paths.jsonl     one {"id": i, "path": "/abs/path"} per line; ids are 0..N-1 in insertion order
      skipped.json    [[path, reason], ...] images that could not be read (never fatal)

Paths are stored **absolute** (as given, not following symlinks), so an index can be queried from
any working directory; moving the collection means rebuilding (or rewriting ``paths.jsonl``).
``model_source`` is the model's absolute folder (or its Hub id), so ``absvl search`` finds it from
anywhere too.

Building streams the images through a ``DataLoader`` of preprocessed tensors and writes the
embeddings in shards (``INDEX.partial/shards/shard_00000.{npy,json}``, each file written atomically,
the ``.json`` last as the shard's commit marker). An interrupted build is continued from its
written shards; only when every shard exists is the FAISS index built (trained on a sample, then
filled shard by shard) inside ``INDEX.partial``, which then takes the place of ``INDEX``.

Writers (build, add, rebuild) hold an exclusive ``flock`` on ``INDEX.lock`` beside the folder for
their whole run, so two of them never interleave; the OS drops the lock when its process dies, so a
crashed writer never blocks the next one. Replacing an existing ``INDEX`` takes two renames
(``INDEX`` → ``.old-INDEX``, new folder → ``INDEX``). The rule after a crash between them: whoever
next opens or writes the index, finding ``INDEX`` missing and ``.old-INDEX`` present, renames
``.old-INDEX`` back (under the lock): the old index is restored and the finished ``INDEX.partial``
is kept, so re-running the build or add only redoes the swap. At every moment the path holds the old
or the new index, or can be recovered to the old one.

Large collections can be embedded by several processes (``torchrun``/``accelerate launch``; the
CLI initialises the group through Accelerate): shards are dealt out round-robin, each process
writes its own, and process 0 holds the lock and builds and writes the index once all are written.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from ..data.images import ImageFiles, collate_image_files

try:
    import faiss
except ImportError as err:  # FAISS comes from an extra: faiss-cpu and faiss-gpu-cu12 both own the module
    raise ImportError(f"{err}; absvl's image index needs FAISS: pip install 'absvl[cpu]' (faiss-cpu) or 'absvl[gpu]' "
                      "(faiss-gpu-cu12, CUDA 12), or any FAISS build of your own") from err

logger = logging.getLogger(__name__)

INDEX_FORMAT = "absvl-index"
INDEX_VERSION = 1
PARTIAL_FORMAT = "absvl-index-partial"
INDEX_FILE, META_FILE, PATHS_FILE, SKIPPED_FILE = "index.faiss", "meta.json", "paths.jsonl", "skipped.json"
EMBEDDINGS_FILE = "embeddings.npy"
SHARDS_DIR = "shards"
DEFAULT_SHARD_SIZE = 4096
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})

# factory choice by collection size (scripts/bench_retrieval.py, 100k × 256 clustered vectors, 2 cores:
# Flat 530 q/s; IVF1024,Flat nprobe=8 7,200 q/s at recall@10 0.999; HNSW32 needs efSearch=128 for
# recall 0.96 at 1,450 q/s and builds 2.7× slower than IVF; IVF,SQ8 is 4× smaller, recall ≤ 0.99):
FLAT_MAX = 50_000  # exact search up to here: ≤ 50 MB at C=256 and ~1,000 queries/s
IVF_FLAT_MAX = 5_000_000  # IVF over full vectors up to here (5 GB at C=256), then 8-bit codes
HNSW_EF_SEARCH = 64  # default efSearch for an explicitly requested HNSW factory
MIN_TRAIN_PER_CENTROID = 39  # FAISS's own k-means warning threshold
MAX_TRAIN_PER_CENTROID = 256  # FAISS's k-means subsamples to this anyway
QUANTIZER_CENTROIDS = 256  # a PQ/SQ code book needs at least this many training vectors
RECALL_K, RECALL_QUERIES = 10, 1000  # recall@10 of a built index on 1,000 of its own vectors as queries
LOCK_WAIT = 10.0  # seconds a reader waits for a writer to finish its swap before recovering it


class IndexMismatchError(ValueError):
    """The index was built by a different model (its image embeddings live in another space)."""


class IndexLockedError(FileExistsError):
    """Another process is writing the index (it holds ``INDEX.lock``)."""


# --------------------------------------------------------------------------- inputs
def list_images(source: str | Path) -> list[Path]:
    """Image files of ``source``: a folder (recursive, image extensions, sorted) or a text file
    with one path per line (blank lines and ``#`` comments ignored; relative paths resolved against
    the file's folder). Paths are absolute and de-duplicated; listed files may be missing (the build
    skips them and says so)."""
    source = Path(source)
    if source.is_dir():
        found = sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not found:
            raise ValueError(f"no images found in {source} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
        return [_absolute(p) for p in found]
    if not source.exists():
        raise FileNotFoundError(f"image source {source} does not exist: give a folder of images or a text file listing them")
    if source.suffix.lower() in IMAGE_EXTENSIONS:
        raise ValueError(f"image source {source} is an image: give a folder of images or a text file listing them")
    try:
        lines = source.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ValueError(f"image list {source} is not a UTF-8 text file with one image path per line") from None
    entries = [Path(line.strip()) for line in lines if line.strip() and not line.strip().startswith("#")]
    paths = [_absolute(p if p.is_absolute() else source.parent / p) for p in entries]
    paths = list(dict.fromkeys(paths))
    if not paths:
        raise ValueError(f"image list {source} lists no image paths")
    return paths


def _absolute(path: Path) -> Path:
    return Path(os.path.abspath(path))


def _resolve_images(images: str | Path | Iterable[str | Path]) -> list[Path]:
    if isinstance(images, (str, Path)):
        return list_images(images)
    paths = list(dict.fromkeys(_absolute(Path(p)) for p in images))
    if not paths:
        raise ValueError("no images given")
    return paths


# --------------------------------------------------------------------------- model identity
def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over the model's config (less its version/source fields) and every tensor's name,
    dtype, shape and bytes: equal across a save/load round trip, different after any weight change."""
    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None:
        summary = config.to_dict() if hasattr(config, "to_dict") else dict(vars(config))
        summary = {k: v for k, v in summary.items() if k not in ("absvl_version", "text_encoder")}
        digest.update(json.dumps(summary, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_fingerprint(index_fingerprint: str, model_fp: str, index_path: str | Path) -> None:
    """Raise :class:`IndexMismatchError` when the index was built by another model."""
    if index_fingerprint != model_fp:
        raise IndexMismatchError(
            f"index {index_path} was built by a different model (index fingerprint {index_fingerprint[:16]}…, "
            f"this model {model_fp[:16]}…): its image embeddings are not comparable with this model's; "
            "rebuild the index with this model (`absvl index build --model ... --overwrite`)"
        )


def _model_summary(model: torch.nn.Module) -> dict[str, Any]:
    config = getattr(model, "config", None)
    summary: dict[str, Any] = {"class": type(model).__name__}
    for key in ("backbone", "text_encoder", "image_size", "alpha", "prior_visual"):
        if hasattr(config, key):
            summary[key] = getattr(config, key)
    summary["image_size"] = getattr(model, "image_size", summary.get("image_size"))
    return summary


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
    space = faiss.GpuParameterSpace() if _is_gpu_index(index) else faiss.ParameterSpace()
    try:
        space.set_index_parameters(index, text)
    except RuntimeError as err:
        raise ValueError(f"cannot set search parameters {text!r} on this index: {str(err).strip().splitlines()[-1]}") from None


# --------------------------------------------------------------------------- GPU
_GPU_RESOURCES: list[Any] = []
INDEX_DEVICES = ("auto", "cpu", "cuda")


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


def _is_gpu_index(index: faiss.Index) -> bool:
    return "Gpu" in type(faiss.downcast_index(index)).__name__


def _copy_to_gpu(index: faiss.Index) -> faiss.Index:
    """``index`` copied to GPU 0; RuntimeError for index types without a GPU version (HNSW, ...)."""
    if not _GPU_RESOURCES:
        _GPU_RESOURCES.append(faiss.StandardGpuResources())  # one per process, kept alive
    return faiss.index_cpu_to_gpu(_GPU_RESOURCES[0], 0, index)


def to_gpu(index: faiss.Index) -> faiss.Index:
    """The index on GPU 0 when possible (HNSW and some others have no GPU version: kept on CPU)."""
    if not gpu_available() or _is_gpu_index(index):
        return index
    try:
        return _copy_to_gpu(index)
    except (RuntimeError, AttributeError) as err:
        logger.info("keeping the index on CPU: %s", err)
        return index


def to_cpu(index: faiss.Index) -> faiss.Index:
    return faiss.index_gpu_to_cpu(index) if _is_gpu_index(index) else index


# --------------------------------------------------------------------------- writers: lock and swap
def _beside(folder: Path, pattern: str) -> Path:
    """A sibling of the index folder: ``pattern`` with ``{}`` standing for its name."""
    return folder.with_name(pattern.format(folder.name))


@contextlib.contextmanager
def index_lock(folder: str | Path, wait: float = 0.0):
    """Hold the exclusive write lock of an index: ``flock`` on ``INDEX.lock`` beside the folder.

    Raises :class:`IndexLockedError` (naming the holder's pid) when another process still holds it
    after ``wait`` seconds. The lock dies with its process, so a crash never leaves a blocking lock;
    the file itself stays (deleting it would race with a process about to lock it).
    """
    folder = _absolute(Path(folder))
    lock_file = _beside(folder, "{}.lock")
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                    raise IndexLockedError(
                        f"index {folder} is being written by another absvl process (pid {holder}); wait for it "
                        f"or remove the stale lock {lock_file}"
                    ) from None
                time.sleep(0.05)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def _recover_swap(folder: Path) -> None:
    """Undo a swap a crash interrupted (call with the lock held): ``INDEX`` missing and ``.old-INDEX``
    present → rename it back; a ``.old-INDEX`` beside a present ``INDEX`` is a finished swap's leftover."""
    backup = _beside(folder, ".old-{}")
    if not backup.is_dir():
        return
    if folder.exists():
        shutil.rmtree(backup, ignore_errors=True)
    else:
        logger.warning("restoring %s from %s: a previous write was interrupted while swapping folders", folder, backup)
        os.replace(backup, folder)


@contextlib.contextmanager
def _writing(folder: Path):
    """The write lock for a build/add/rebuild, with any interrupted swap undone first.

    In a process group process 0 takes the lock and tells the others whether it got it, so all
    processes fail alike instead of the helpers waiting at a barrier.
    """
    rank, world = process_group()
    with contextlib.ExitStack() as stack:
        error: str | None = None
        if rank == 0:
            try:
                stack.enter_context(index_lock(folder))
                _recover_swap(folder)
            except IndexLockedError as err:
                error = str(err)
        if world > 1:
            box = [error]
            dist.broadcast_object_list(box, src=0)
            error = box[0]
        if error:
            raise IndexLockedError(error)
        yield


def _finalise(staging: Path, out: Path, overwrite: bool) -> None:
    """Move the completed ``staging`` folder to ``out`` (replacing it only with ``overwrite``; see the
    module docstring for the crash rule), then drop the shards (a crash in between leaves a valid index
    with leftover shard files, never a lost build)."""
    if out.exists():
        if not overwrite:
            raise FileExistsError(f"{out} already exists: pass --overwrite (overwrite=True) to replace it")
        backup = _beside(out, ".old-{}")
        shutil.rmtree(backup, ignore_errors=True)
        os.replace(out, backup)
        os.replace(staging, out)  # the commit point; a crash before it restores the backup on next open
        shutil.rmtree(backup, ignore_errors=True)
    else:
        os.replace(staging, out)
    shutil.rmtree(out / SHARDS_DIR, ignore_errors=True)
    (out / "partial.json").unlink(missing_ok=True)


# --------------------------------------------------------------------------- the index
class ImageIndex:
    """A loaded index folder: FAISS vectors + id → image path table.

    The Python API::

        index = ImageIndex.build(model, "photos/", "photos.index")   # or ImageIndex.load("photos.index")
        index.add(model, ["new/1.jpg", "new/2.jpg"])                   # appends (ids continue), reloads
        scores, ids = index.search(query_vector, k=10)                # one [C] vector → [k], [k]
        scores, ids = index.search_batch(query_vectors, k=10)         # [Q, C] → [Q, k], [Q, k]
        index.rebuild("HNSW32")                                       # new FAISS factory, no re-embedding
        index.path_of(int(ids[0]))
    """

    def __init__(self, folder: Path, index: faiss.Index, meta: dict[str, Any], paths: list[Path], skipped: list[tuple[str, str]]):
        self.folder = folder
        self.index = index
        self.meta = meta
        self.paths = paths
        self.skipped = skipped

    @classmethod
    def load(cls, path: str | Path, gpu: bool = False) -> ImageIndex:
        """Read an index folder and apply its search parameters (``gpu=True``: search on GPU if possible)."""
        folder = Path(path)
        if not folder.is_dir() and _beside(_absolute(folder), ".old-{}").is_dir():
            with index_lock(folder, wait=LOCK_WAIT):  # a writer mid-swap finishes; a crashed one is undone
                _recover_swap(_absolute(folder))
        if not folder.is_dir():
            hint = f" (an interrupted build left {folder}.partial: run the build again)" if Path(f"{folder}.partial").is_dir() else ""
            raise FileNotFoundError(f"index {folder} does not exist{hint}")
        for name in (META_FILE, INDEX_FILE, PATHS_FILE):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"index {folder} has no {name}: not an absvl index folder")
        meta = _read_json(folder / META_FILE)
        if not isinstance(meta, dict) or meta.get("format") != INDEX_FORMAT:
            raise ValueError(f"{folder / META_FILE} is not an absvl index meta file (format != {INDEX_FORMAT!r})")
        if meta.get("version", 0) > INDEX_VERSION:
            raise ValueError(f"index {folder} has format version {meta['version']}; this absvl reads up to {INDEX_VERSION}")
        paths = _read_paths(folder / PATHS_FILE)
        index = faiss.read_index(str(folder / INDEX_FILE))
        if index.ntotal != len(paths) or index.d != meta["dim"]:
            raise ValueError(
                f"index {folder} is inconsistent: {index.ntotal} vectors of width {index.d} but {len(paths)} paths "
                f"and dim {meta['dim']} in meta.json; rebuild it"
            )
        skipped_file = folder / SKIPPED_FILE
        skipped = [tuple(s) for s in _read_json(skipped_file)] if skipped_file.is_file() else []
        if gpu:
            index = to_gpu(index)
        apply_search_params(index, meta.get("search_params", {}))
        return cls(folder, index, meta, paths, skipped)

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    @property
    def metric(self) -> str:
        return self.meta["metric"]

    @property
    def factory(self) -> str:
        return self.meta["factory"]

    @property
    def fingerprint(self) -> str:
        return self.meta["fingerprint"]

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

    @property
    def ids(self) -> list[int]:
        return list(range(len(self.paths)))

    def __len__(self) -> int:
        return len(self.paths)

    def path_of(self, image_id: int) -> Path:
        """The image file of an id."""
        if not 0 <= int(image_id) < len(self.paths):
            raise KeyError(f"id {image_id} is not in index {self.folder} (ids are 0..{len(self.paths) - 1})")
        return self.paths[int(image_id)]

    def set_search_params(self, **params: int) -> None:
        """Override search-time parameters (``nprobe=64``, ``efSearch=128``) for this session."""
        apply_search_params(self.index, params)

    def search(self, embeddings: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids) of the ``k`` nearest images by inner product; id -1 where fewer exist.

        One query ``[C]`` gives ``[k]`` arrays, a batch ``[Q, C]`` gives ``[Q, k]`` (in one FAISS call).
        """
        if k < 1:
            raise ValueError(f"k={k} must be >= 1")
        queries = np.ascontiguousarray(embeddings, dtype=np.float32)
        single = queries.ndim == 1
        queries = queries[None] if single else queries
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"query embeddings must have shape [{self.dim}] or [Q, {self.dim}], got {list(np.shape(embeddings))}")
        scores, ids = self.index.search(queries, k)
        return (scores[0], ids[0]) if single else (scores, ids)

    def search_batch(self, embeddings: np.ndarray, k: int, batch_size: int = 4096) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`search` of ``[Q, C]`` queries ``batch_size`` at a time (bounded memory for large Q)."""
        if np.ndim(embeddings) != 2:
            raise ValueError(f"query embeddings must have shape [Q, {self.dim}], got {list(np.shape(embeddings))}")
        parts = [self.search(embeddings[i : i + batch_size], k) for i in range(0, max(len(embeddings), 1), batch_size)]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    @property
    def embeddings_file(self) -> Path | None:
        """``embeddings.npy`` (row i = id i); None for an index written before indexes kept their vectors."""
        path = self.folder / EMBEDDINGS_FILE
        return path if path.is_file() else None

    @classmethod
    def build(cls, model: torch.nn.Module, images: str | Path | Iterable[str | Path], out: str | Path, **kwargs: Any) -> ImageIndex:
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
        return "cuda" if _is_gpu_index(self.index) else "cpu"

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
        elif not _is_gpu_index(self.index):
            reason = gpu_unavailable_reason()
            if reason:
                raise RuntimeError(f"index {self.folder} cannot be held on cuda: {reason}")
            try:
                self.index = _copy_to_gpu(self.index)
            except (RuntimeError, AttributeError) as err:
                raise RuntimeError(f"index {self.folder} cannot be held on cuda: FAISS has no GPU version of its "
                                   f"{self.factory!r} index ({str(err).strip().splitlines()[-1]})") from None
        return self

    def _reload(self) -> None:
        gpu = _is_gpu_index(self.index)
        self.__dict__.update(vars(type(self).load(self.folder, gpu=gpu)))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); the index folder is damaged: rebuild it") from None


def _read_paths(path: Path) -> list[Path]:
    paths = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            row = json.loads(line)
            image_id, image_path = row["id"], row["path"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(f"{path}:{line_no} is not a {{\"id\", \"path\"}} JSON line") from None
        if image_id != len(paths):
            raise ValueError(f"{path}:{line_no} has id {image_id}, expected {len(paths)} (ids are 0..N-1 in order)")
        paths.append(Path(image_path))
    return paths


# --------------------------------------------------------------------------- atomic files
def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _atomic_write(path: Path, writer) -> None:
    """Write via ``writer(tmp_path)`` then rename into place (readers never see a partial file)."""
    tmp = path.with_name(f".tmp-{path.name}")
    writer(tmp)
    _fsync(tmp)
    os.replace(tmp, path)


def _write_json(path: Path, obj: Any) -> None:
    _atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=1) + "\n", encoding="utf-8"))


def _write_npy(path: Path, array: np.ndarray) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            np.save(handle, array, allow_pickle=False)

    _atomic_write(path, write)


# --------------------------------------------------------------------------- extraction
@dataclass
class BuildReport:
    """What a build or an add did.

    Attributes:
        out: the index folder.
        num_indexed: images embedded and added by this call.
        num_total: images this call was given (after de-duplication; ``add`` excludes ones already indexed).
        skipped: ``(path, reason)`` of unreadable or missing images (also in ``skipped.json``).
        factory: the FAISS factory string actually used.
        seconds: wall time of the call.
        index_size: vectors in the index afterwards.
        notes: remarks, e.g. a fallback to exact search for a collection too small to train on.
        recall_at_10: recall@10 of the FAISS index against exact search (:func:`measure_recall`;
            None when the index keeps no embeddings to measure against).
    """

    out: Path
    num_indexed: int
    num_total: int
    skipped: list[tuple[str, str]]
    factory: str
    seconds: float
    index_size: int = 0
    notes: list[str] = field(default_factory=list)
    recall_at_10: float | None = None

    @property
    def images_per_second(self) -> float:
        return (self.num_indexed + len(self.skipped)) / self.seconds if self.seconds > 0 else 0.0


def _model_device(model: torch.nn.Module, device: str | torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _shard_name(shard: int) -> str:
    return f"shard_{shard:05d}"


def _list_hash(paths: Sequence[Path]) -> str:
    return hashlib.sha256("\n".join(map(str, paths)).encode()).hexdigest()


def process_group() -> tuple[int, int]:
    """(rank, world size) of the initialised ``torch.distributed`` group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if process_group()[1] > 1:
        dist.barrier()


def _prepare_partial(partial: Path, expected: dict[str, Any], resume: bool) -> None:
    """Create ``partial`` or check that an existing one belongs to this very build.

    Every process checks (so all raise the same error), then process 0 creates the folder.
    """
    meta_file = partial / "partial.json"
    if partial.exists() and resume:
        found = _read_json(meta_file) if meta_file.is_file() else None
        if found == expected:
            _barrier()
            return
        differing = sorted(k for k in expected if not isinstance(found, dict) or found.get(k) != expected[k])
        raise ValueError(
            f"{partial} holds an interrupted build of a different model or image list (differs in: "
            f"{', '.join(differing) or 'everything'}): delete it or pass --no-resume (resume=False) to start over"
        )
    _barrier()  # everyone has looked before process 0 replaces it
    if process_group()[0] == 0:
        shutil.rmtree(partial, ignore_errors=True)
        (partial / SHARDS_DIR).mkdir(parents=True)
        _write_json(meta_file, expected)
    _barrier()


def _extract_shards(
    model: torch.nn.Module,
    paths: list[Path],
    partial: Path,
    *,
    batch_size: int,
    shard_size: int,
    num_workers: int,
    device: torch.device,
    progress: bool,
) -> None:
    """Embed the images of every shard not yet written under ``partial/shards`` (with several
    processes, this process's round-robin share of them)."""
    from tqdm.auto import tqdm

    shards_dir = partial / SHARDS_DIR
    num_shards = math.ceil(len(paths) / shard_size)
    rank, world = process_group()
    pending = [s for s in range(num_shards)
               if s % world == rank and not (shards_dir / f"{_shard_name(s)}.json").is_file()]
    if not pending:
        return
    batches = []  # batches never straddle two shards
    for s in pending:
        positions = range(s * shard_size, min((s + 1) * shard_size, len(paths)))
        batches += [list(positions[i : i + batch_size]) for i in range(0, len(positions), batch_size)]
    loader = DataLoader(
        ImageFiles(paths, model.image_size),
        batch_sampler=batches,
        num_workers=num_workers,
        collate_fn=collate_image_files,
        pin_memory=device.type == "cuda",
    )
    todo = sum(len(b) for b in batches)
    was_training = model.training
    model.eval()
    current, embeddings, done, bad = None, [], [], []
    try:
        with torch.no_grad(), tqdm(total=todo, unit="img", desc="embedding images", disable=not progress or rank) as bar:
            for positions, images, failures in loader:
                shard = (positions or [p for p, _ in failures])[0] // shard_size
                if shard != current:
                    current, embeddings, done, bad = shard, [], [], []
                if images is not None:
                    embeddings.append(model.encode_image_bottom_up(images.to(device)).float().cpu().numpy())
                    done += positions
                bad += failures
                bar.update(len(positions) + len(failures))
                bar.set_postfix(skipped=len(bad))
                shard_end = min((shard + 1) * shard_size, len(paths))
                if len(done) + len(bad) == shard_end - shard * shard_size:
                    _write_shard(shards_dir, shard, paths, done, embeddings, bad, model)
    finally:
        model.train(was_training)


def _write_shard(shards_dir: Path, shard: int, paths, done, embeddings, bad, model) -> None:
    """``shard_NNNNN.npy`` (embeddings) then ``shard_NNNNN.json`` (paths, skipped): the json commits it."""
    vectors = np.concatenate(embeddings) if embeddings else np.zeros((0, _embedding_dim(model)), dtype=np.float32)
    name = _shard_name(shard)
    _write_npy(shards_dir / f"{name}.npy", np.ascontiguousarray(vectors, dtype=np.float32))
    _write_json(shards_dir / f"{name}.json", {
        "paths": [str(paths[p]) for p in done],
        "skipped": [[str(paths[p]), reason] for p, reason in sorted(bad)],
    })


def _embedding_dim(model: torch.nn.Module) -> int:
    """Width of ``encode_image_bottom_up``: the vision backbone's token width (the gate's space)."""
    return int(getattr(getattr(model, "backbone", None), "num_features", 0) or 0)


def _read_shards(partial: Path) -> tuple[list[Path], list[Path], list[tuple[str, str]]]:
    """(embedding files, image paths in order, skipped) of all written shards."""
    shards_dir = partial / SHARDS_DIR
    files, paths, skipped = [], [], []
    for info_file in sorted(shards_dir.glob("shard_*.json")):
        info = _read_json(info_file)
        vectors_file = info_file.with_suffix(".npy")
        rows = np.load(vectors_file, mmap_mode="r", allow_pickle=False).shape[0]
        if rows != len(info["paths"]):
            raise ValueError(f"{vectors_file} has {rows} rows for {len(info['paths'])} paths: delete {partial} and rebuild")
        files.append(vectors_file)
        paths += [Path(p) for p in info["paths"]]
        skipped += [tuple(s) for s in info["skipped"]]
    return files, paths, skipped


def _training_sample(files: list[Path], total: int, size: int, seed: int = 0) -> np.ndarray:
    """``size`` random rows drawn from the shard files (memory-mapped), or all rows if fewer."""
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(total, size=min(size, total), replace=False))
    parts, start = [], 0
    for f in files:
        vectors = np.load(f, mmap_mode="r", allow_pickle=False)
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
    total = sum(np.load(f, mmap_mode="r", allow_pickle=False).shape[0] for f in vector_files)
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
        try:
            nlist = faiss.extract_index_ivf(index).nlist
        except RuntimeError:
            nlist = QUANTIZER_CENTROIDS
        work.train(_training_sample(vector_files, total, MAX_TRAIN_PER_CENTROID * nlist))
    for _, vectors in _chunks(vector_files):
        work.add(vectors)
    return to_cpu(work), factory, params


def _chunks(files: Iterable[Path], rows: int = 65_536) -> Iterable[tuple[int, np.ndarray]]:
    """(first row, float32 block of at most ``rows`` rows) over ``.npy`` files read memory-mapped,
    rows numbered across the files."""
    start = 0
    for f in files:
        vectors = np.load(f, mmap_mode="r", allow_pickle=False)
        for i in range(0, len(vectors), rows):
            yield start + i, np.ascontiguousarray(vectors[i : i + rows], dtype=np.float32)
        start += len(vectors)


def _write_embeddings(path: Path, files: list[Path], dim: int) -> None:
    """Concatenate the vectors of ``files`` into one float32 ``[N, dim]`` ``.npy`` (streamed, atomic)."""
    total = sum(np.load(f, mmap_mode="r", allow_pickle=False).shape[0] for f in files)

    def write(tmp: Path) -> None:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(total, dim))
        for start, vectors in _chunks(files):
            out[start : start + len(vectors)] = vectors
        out.flush()
        del out

    _atomic_write(path, write)


def measure_recall(index: faiss.Index, vectors_file: Path, k: int = RECALL_K, num_queries: int = RECALL_QUERIES,
                   seed: int = 0) -> float:
    """recall@k of ``index`` against exact inner-product search over the vectors of ``vectors_file``
    (the ones it holds), with ``num_queries`` of those vectors, drawn at random, as queries.

    A returned id counts as a hit when its exact score reaches the exact k-th best score, so ties
    between equal vectors are not misses. Search parameters already set on ``index`` apply.
    """
    vectors = np.load(vectors_file, mmap_mode="r", allow_pickle=False)
    k = min(k, len(vectors))
    rng = np.random.default_rng(seed)
    queries = np.ascontiguousarray(vectors[np.sort(rng.choice(len(vectors), min(num_queries, len(vectors)), replace=False))],
                                   dtype=np.float32)
    exact = faiss.ResultHeap(len(queries), k, keep_max=True)
    for start, block in _chunks([vectors_file]):
        scores, ids = faiss.knn(queries, block, min(k, len(block)), metric=faiss.METRIC_INNER_PRODUCT)
        exact.add_result(np.ascontiguousarray(scores), np.ascontiguousarray(ids + start))
    exact.finalize()
    _, found = index.search(queries, k)
    true_scores = np.einsum("qc,qkc->qk", queries, np.asarray(vectors[np.maximum(found, 0)], dtype=np.float32))
    hits = (found >= 0) & (true_scores >= exact.D[:, -1:] - 1e-5)
    return float(hits.mean())


def _write_index_folder(
    folder: Path,
    index: faiss.Index,
    paths: list[Path],
    skipped: list[tuple[str, str]],
    *,
    factory: str,
    search_params: dict[str, int],
    fingerprint: str,
    model_summary: dict[str, Any],
    model_source: str | None,
    recall_at_10: float | None,
    created: str | None = None,
) -> None:
    _atomic_write(folder / INDEX_FILE, lambda tmp: faiss.write_index(index, str(tmp)))
    lines = "".join(json.dumps({"id": i, "path": str(p)}) + "\n" for i, p in enumerate(paths))
    _atomic_write(folder / PATHS_FILE, lambda tmp: tmp.write_text(lines, encoding="utf-8"))
    _write_json(folder / SKIPPED_FILE, [list(s) for s in skipped])
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    from .. import __version__

    _write_json(folder / META_FILE, {
        "format": INDEX_FORMAT,
        "version": INDEX_VERSION,
        "dim": int(index.d),
        "metric": "ip",
        "factory": factory,
        "search_params": search_params,
        "fingerprint": fingerprint,
        "model": model_summary,
        "model_source": model_source,
        "recall_at_10": recall_at_10,
        "count": len(paths),
        "paths": "absolute",
        "created": created or now,
        "updated": now,
        "absvl_version": __version__,
    })


def _embed_into_partial(model, paths, partial, *, resume, batch_size, shard_size, num_workers, device, progress, fingerprint):
    if batch_size < 1 or shard_size < 1:
        raise ValueError(f"batch_size={batch_size} and shard_size={shard_size} must be >= 1")
    expected = {
        "format": PARTIAL_FORMAT,
        "fingerprint": fingerprint,
        "images_hash": _list_hash(paths),
        "num_images": len(paths),
        "shard_size": shard_size,
    }
    _prepare_partial(partial, expected, resume)
    model.to(device)
    _extract_shards(model, paths, partial, batch_size=batch_size, shard_size=shard_size,
                    num_workers=num_workers, device=device, progress=progress)
    _barrier()  # every process's shards are written
    return _read_shards(partial)


def _helper_report(out: Path, done_paths: list[Path], total: int, skipped, start: float) -> BuildReport:
    """What a process other than 0 returns: it embedded its shards; process 0 writes the index."""
    return BuildReport(out, len(done_paths), total, skipped, "(written by process 0)", time.perf_counter() - start,
                       index_size=len(done_paths), notes=[f"process {process_group()[0]}: shards embedded"])


def build_index(
    model: torch.nn.Module,
    images: str | Path | Iterable[str | Path],
    out: str | Path,
    *,
    batch_size: int = 64,
    factory: str | None = None,
    resume: bool = True,
    num_workers: int = 0,
    device: str | torch.device | None = None,
    progress: bool = True,
    overwrite: bool = False,
    shard_size: int = DEFAULT_SHARD_SIZE,
    model_source: str | None = None,
) -> BuildReport:
    """Embed a collection with ``model.encode_image_bottom_up`` and write a FAISS index folder ``out``.

    Args:
        images: a folder, a text file listing images (see :func:`list_images`) or a list of paths.
        factory: FAISS factory string; None chooses by size (:func:`choose_factory`).
        resume: continue an interrupted build from ``OUT.partial`` (False: start over).
        device: where the model runs (None: where it is); the model is moved there.
        overwrite: replace an existing ``out``.
        shard_size: images per embedding shard (the unit of resumption).
        model_source: the model's folder (stored as an absolute path) or Hub id, recorded so
            ``absvl search`` and ``absvl index add`` can default to it.

    Holds the index's write lock throughout (:class:`IndexLockedError` if another process writes it).
    """
    start = time.perf_counter()
    out = _absolute(Path(out))
    with _writing(out):
        if out.exists() and not overwrite:
            raise FileExistsError(f"{out} already exists: pass --overwrite (overwrite=True) to replace it")
        paths = _resolve_images(images)
        fingerprint = model_fingerprint(model)
        partial = _beside(out, "{}.partial")
        files, done_paths, skipped = _embed_into_partial(
            model, paths, partial, resume=resume, batch_size=batch_size, shard_size=shard_size,
            num_workers=num_workers, device=_model_device(model, device), progress=progress, fingerprint=fingerprint)
        if not done_paths:
            raise ValueError(f"none of the {len(paths)} images could be read (first: {skipped[0][0]}: {skipped[0][1]}); nothing to index")
        if process_group()[0] != 0:
            return _helper_report(out, done_paths, len(paths), skipped, start)
        dim = np.load(files[0], mmap_mode="r", allow_pickle=False).shape[1]
        _write_embeddings(partial / EMBEDDINGS_FILE, files, dim)
        notes: list[str] = []
        index, used_factory, params = fill_index(factory, dim, [partial / EMBEDDINGS_FILE], notes)
        recall = _recall(index, params, partial / EMBEDDINGS_FILE)
        _write_index_folder(partial, index, done_paths, skipped, factory=used_factory, search_params=params,
                            fingerprint=fingerprint, model_summary=_model_summary(model),
                            model_source=resolve_model_source(model_source), recall_at_10=recall)
        _finalise(partial, out, overwrite)
    for note in notes:
        logger.warning(note)
    return BuildReport(out, len(done_paths), len(paths), skipped, used_factory, time.perf_counter() - start,
                       index_size=len(done_paths), notes=notes, recall_at_10=recall)


def resolve_model_source(source: str | None) -> str | None:
    """A model folder that exists as its absolute path (valid from any working directory); a Hub id as given."""
    if source and Path(source).exists():
        return str(_absolute(Path(source)))
    return source


def _recall(index: faiss.Index, params: dict[str, Any], vectors_file: Path) -> float:
    """:func:`measure_recall` with the index's search parameters, logged."""
    apply_search_params(index, params)
    recall = measure_recall(index, vectors_file)
    logger.info("recall@%d against exact search: %.4f", RECALL_K, recall)
    return recall


def add_to_index(
    model: torch.nn.Module,
    images: str | Path | Iterable[str | Path],
    index_path: str | Path,
    *,
    batch_size: int = 64,
    resume: bool = True,
    num_workers: int = 0,
    device: str | torch.device | None = None,
    progress: bool = True,
    shard_size: int = DEFAULT_SHARD_SIZE,
) -> BuildReport:
    """Embed images not yet in the index and append them (ids continue from N); rewrites the folder atomically.

    Refuses (:class:`IndexMismatchError`) a model whose fingerprint differs from the index's, and
    (:class:`IndexLockedError`) while another process writes the index.
    """
    start = time.perf_counter()
    folder = _absolute(Path(index_path))
    with _writing(folder):
        existing = ImageIndex.load(folder)
        fingerprint = model_fingerprint(model)
        check_fingerprint(existing.fingerprint, fingerprint, folder)
        known = set(existing.paths)
        paths = [p for p in _resolve_images(images) if p not in known]
        if not paths:
            return BuildReport(folder, 0, 0, [], existing.factory, time.perf_counter() - start, len(existing),
                               recall_at_10=existing.meta.get("recall_at_10"))
        partial = _beside(folder, "{}.partial")
        files, new_paths, skipped = _embed_into_partial(
            model, paths, partial, resume=resume, batch_size=batch_size, shard_size=shard_size,
            num_workers=num_workers, device=_model_device(model, device), progress=progress, fingerprint=fingerprint)
        if process_group()[0] != 0:
            return _helper_report(folder, new_paths, len(paths), skipped, start)
        index = to_gpu(existing.index) if gpu_available() else existing.index
        for _, vectors in _chunks(files):
            index.add(vectors)
        index = to_cpu(index)
        notes, recall = [], None
        if existing.embeddings_file is not None:
            _write_embeddings(partial / EMBEDDINGS_FILE, [existing.embeddings_file, *files], existing.dim)
            recall = _recall(index, existing.meta.get("search_params", {}), partial / EMBEDDINGS_FILE)
        else:
            notes.append(f"index {folder} keeps no {EMBEDDINGS_FILE} (written by an older absvl): recall not measured, "
                         "and `absvl index rebuild` needs a full `absvl index build --overwrite` first")
        now_indexed = set(new_paths)
        new_skipped = {s[0]: s for s in existing.skipped if Path(s[0]) not in now_indexed}
        new_skipped.update({s[0]: s for s in skipped})
        _write_index_folder(partial, index, existing.paths + new_paths, list(new_skipped.values()),
                            factory=existing.factory, search_params=existing.meta.get("search_params", {}),
                            fingerprint=fingerprint, model_summary=existing.meta.get("model", {}),
                            model_source=existing.meta.get("model_source"), recall_at_10=recall,
                            created=existing.meta.get("created"))
        _finalise(partial, folder, overwrite=True)
    total = len(existing.paths) + len(new_paths)
    return BuildReport(folder, len(new_paths), len(paths), skipped, existing.factory, time.perf_counter() - start, total,
                       notes=notes, recall_at_10=recall)


def rebuild_index(index_path: str | Path, factory: str | None = None) -> BuildReport:
    """Replace the FAISS index of a folder with a new one of ``factory`` (None: chosen by size), built
    from its stored ``embeddings.npy``: no image is read and no model is needed. Paths, ids and the
    fingerprint stay; recall@10 is measured again. Atomic and locked like :func:`build_index`."""
    start = time.perf_counter()
    folder = _absolute(Path(index_path))
    with _writing(folder):
        existing = ImageIndex.load(folder)
        if existing.embeddings_file is None:
            raise ValueError(f"index {folder} keeps no {EMBEDDINGS_FILE} (written by an older absvl): build it again from "
                             "the images once with `absvl index build --overwrite`, then rebuild freely")
        staging = _beside(folder, ".new-{}")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        try:
            try:
                os.link(existing.embeddings_file, staging / EMBEDDINGS_FILE)  # files are only ever replaced, never edited
            except OSError:
                shutil.copyfile(existing.embeddings_file, staging / EMBEDDINGS_FILE)
            notes: list[str] = []
            index, used_factory, params = fill_index(factory, existing.dim, [staging / EMBEDDINGS_FILE], notes)
            recall = _recall(index, params, staging / EMBEDDINGS_FILE)
            meta = existing.meta
            _write_index_folder(staging, index, existing.paths, existing.skipped, factory=used_factory, search_params=params,
                                fingerprint=meta["fingerprint"], model_summary=meta.get("model", {}),
                                model_source=meta.get("model_source"), recall_at_10=recall, created=meta.get("created"))
            _finalise(staging, folder, overwrite=True)
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # gone once renamed; a failed rebuild leaves nothing behind
    for note in notes:
        logger.warning(note)
    return BuildReport(folder, 0, 0, [], used_factory, time.perf_counter() - start, len(existing), notes=notes,
                       recall_at_10=recall)
