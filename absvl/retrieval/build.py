"""Writing an index: build it from a collection, add images to it, rebuild it with another factory.

Each holds the write lock (:mod:`.lock`), checks before each shard and before publishing that it
still holds it, and stages the new folder beside the old one, which it replaces with
:func:`absvl.io.publish_folder`. ``add`` and ``rebuild`` check the checksums of the files they copy.
In a process group every process embeds its shards; process 0 builds and writes the index.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..io import atomic_folder, publish_folder
from .faiss_backend import gpu_available, to_cpu, to_gpu
from .folder import EMBEDDINGS_FILE, INDEX_FILE, IndexFolder, partial_folder, write_index_folder
from .identity import check_fingerprint, model_fingerprint, model_summary, resolve_model_source
from .integrity import verify_checksums
from .lock import process_group, writing
from .shards import DEFAULT_SHARD_SIZE, Embedded, drop_shards, embed_into_partial
from .vectors import chunks, fill_index, open_rows, recall_with, write_embeddings

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})


# --------------------------------------------------------------------------- inputs
def list_images(source: str | Path) -> list[Path]:
    """Image files of ``source``: a folder (recursive, image extensions, sorted) or a text file
    with one path per line (blank lines and ``#`` comments ignored; relative paths resolved against
    the file's folder). Paths are absolute (not following symlinks) and de-duplicated; listed files
    may be missing (the build skips them and says so)."""
    source = Path(source)
    if source.is_dir():
        found = sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not found:
            raise ValueError(f"no images found in {source} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
        return [_absolute(p) for p in found]
    if not source.exists():
        raise FileNotFoundError(
            f"image source {source} does not exist: give a folder of images or a text file listing them"
        )
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


def _absolute(path: str | Path) -> Path:
    return Path(os.path.abspath(path))


def _resolve_images(images: str | Path | Iterable[str | Path]) -> list[Path]:
    if isinstance(images, (str, Path)):
        return list_images(images)
    paths = list(dict.fromkeys(_absolute(p) for p in images))
    if not paths:
        raise ValueError("no images given")
    return paths


def _model_device(model: torch.nn.Module, device: str | torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


# --------------------------------------------------------------------------- reports
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
        num_embedded: images this call read and embedded (shards resumed from an interrupted
            build excluded; with several processes, this process's share).
        embedding_seconds: wall time of that embedding pass (decoding included).
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
    num_embedded: int = 0
    embedding_seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        """Images handled per second of the whole call (embedding, index training and filling, recall)."""
        return (self.num_indexed + len(self.skipped)) / self.seconds if self.seconds > 0 else 0.0

    @property
    def embedding_images_per_second(self) -> float:
        """Embedding throughput: images read and embedded per second of the embedding pass."""
        return self.num_embedded / self.embedding_seconds if self.embedding_seconds > 0 else 0.0


def _helper_report(out: Path, embedded: Embedded, total: int, start: float) -> BuildReport:
    """What a process other than 0 returns: it embedded its shards; process 0 writes the index."""
    return BuildReport(
        out,
        len(embedded.paths),
        total,
        embedded.skipped,
        "(written by process 0)",
        time.perf_counter() - start,
        index_size=len(embedded.paths),
        notes=[f"process {process_group()[0]}: shards embedded"],
        num_embedded=embedded.num_embedded,
        embedding_seconds=embedded.seconds,
    )


def _publish(partial: Path, out: Path, overwrite: bool) -> None:
    """Swap the finished ``partial`` in as ``out``, then drop its shards (a crash in between leaves a
    valid index with leftover shard files, never a lost build)."""
    publish_folder(partial, out, overwrite)
    drop_shards(out)


# --------------------------------------------------------------------------- writers
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
    out = _absolute(out)
    with writing(out) as lock:
        if out.exists() and not overwrite:
            raise FileExistsError(f"{out} already exists: pass --overwrite (overwrite=True) to replace it")
        paths = _resolve_images(images)
        fingerprint = model_fingerprint(model)
        partial = partial_folder(out)
        embedded = embed_into_partial(
            model,
            paths,
            partial,
            fingerprint=fingerprint,
            resume=resume,
            batch_size=batch_size,
            shard_size=shard_size,
            num_workers=num_workers,
            device=_model_device(model, device),
            progress=progress,
            check_lock=lock.check,
        )
        files, done_paths, skipped = embedded.files, embedded.paths, embedded.skipped
        if not done_paths:
            raise ValueError(
                f"none of the {len(paths)} images could be read (first: {skipped[0][0]}: {skipped[0][1]}); nothing to index"
            )
        if process_group()[0] != 0:
            return _helper_report(out, embedded, len(paths), start)
        dim = open_rows(files[0]).shape[1]
        write_embeddings(partial / EMBEDDINGS_FILE, files, dim)
        notes: list[str] = []
        index, used_factory, params = fill_index(factory, dim, [partial / EMBEDDINGS_FILE], notes)
        recall = recall_with(index, params, partial / EMBEDDINGS_FILE)
        write_index_folder(
            partial,
            index,
            done_paths,
            skipped,
            factory=used_factory,
            search_params=params,
            fingerprint=fingerprint,
            model_summary=model_summary(model),
            model_source=resolve_model_source(model_source),
            recall_at_10=recall,
        )
        lock.check()
        _publish(partial, out, overwrite)
    for note in notes:
        logger.warning(note)
    return BuildReport(
        out,
        len(done_paths),
        len(paths),
        skipped,
        used_factory,
        time.perf_counter() - start,
        index_size=len(done_paths),
        notes=notes,
        recall_at_10=recall,
        num_embedded=embedded.num_embedded,
        embedding_seconds=embedded.seconds,
    )


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
    folder = _absolute(index_path)
    with writing(folder) as lock:
        existing = IndexFolder.read(folder)
        fingerprint = model_fingerprint(model)
        check_fingerprint(existing.fingerprint, fingerprint, folder)
        known = set(existing.paths)
        paths = [p for p in _resolve_images(images) if p not in known]
        if not paths:
            return BuildReport(
                folder,
                0,
                0,
                [],
                existing.factory,
                time.perf_counter() - start,
                len(existing),
                recall_at_10=existing.meta.get("recall_at_10"),
            )
        verify_checksums(folder, existing.meta, (INDEX_FILE, EMBEDDINGS_FILE))  # never carry damage over
        partial = partial_folder(folder)
        embedded = embed_into_partial(
            model,
            paths,
            partial,
            fingerprint=fingerprint,
            resume=resume,
            batch_size=batch_size,
            shard_size=shard_size,
            num_workers=num_workers,
            device=_model_device(model, device),
            progress=progress,
            check_lock=lock.check,
        )
        files, new_paths, skipped = embedded.files, embedded.paths, embedded.skipped
        if process_group()[0] != 0:
            return _helper_report(folder, embedded, len(paths), start)
        index = to_gpu(existing.index) if gpu_available() else existing.index
        for _, vectors in chunks(files):
            index.add(vectors)
        index = to_cpu(index)
        notes, recall = [], None
        if existing.embeddings_file is not None:
            write_embeddings(partial / EMBEDDINGS_FILE, [existing.embeddings_file, *files], existing.dim)
            recall = recall_with(index, existing.meta.get("search_params", {}), partial / EMBEDDINGS_FILE)
        else:
            notes.append(
                f"index {folder} keeps no {EMBEDDINGS_FILE} (written by an older absvl): recall not measured, "
                "and `absvl index rebuild` needs a full `absvl index build --overwrite` first"
            )
        now_indexed = set(new_paths)
        new_skipped = {s[0]: s for s in existing.skipped if Path(s[0]) not in now_indexed}
        new_skipped.update({s[0]: s for s in skipped})
        write_index_folder(
            partial,
            index,
            existing.paths + new_paths,
            list(new_skipped.values()),
            factory=existing.factory,
            search_params=existing.meta.get("search_params", {}),
            fingerprint=fingerprint,
            model_summary=existing.meta.get("model", {}),
            model_source=existing.meta.get("model_source"),
            recall_at_10=recall,
            created=existing.meta.get("created"),
        )
        lock.check()
        _publish(partial, folder, overwrite=True)
    total = len(existing.paths) + len(new_paths)
    return BuildReport(
        folder,
        len(new_paths),
        len(paths),
        skipped,
        existing.factory,
        time.perf_counter() - start,
        total,
        notes=notes,
        recall_at_10=recall,
        num_embedded=embedded.num_embedded,
        embedding_seconds=embedded.seconds,
    )


def rebuild_index(index_path: str | Path, factory: str | None = None) -> BuildReport:
    """Replace the FAISS index of a folder with a new one of ``factory`` (None: chosen by size), built
    from its stored ``embeddings.npy``: no image is read and no model is needed. Paths, ids and the
    fingerprint stay; recall@10 is measured again. Atomic and locked like :func:`build_index`.

    The old ``index.faiss`` is not read, so this is also the repair of a damaged one; the stored
    embeddings are checked against their recorded checksum first. An index written before absvl
    recorded checksums gets them recorded."""
    start = time.perf_counter()
    folder = _absolute(index_path)
    with writing(folder) as lock:
        existing = IndexFolder.read(folder, faiss_index=False)
        if existing.embeddings_file is None:
            raise ValueError(
                f"index {folder} keeps no {EMBEDDINGS_FILE} (written by an older absvl): build it again from "
                "the images once with `absvl index build --overwrite`, then rebuild freely"
            )
        known = verify_checksums(folder, existing.meta, (EMBEDDINGS_FILE,))
        with atomic_folder(folder) as staging:  # a failed rebuild leaves nothing behind
            try:
                os.link(
                    existing.embeddings_file, staging / EMBEDDINGS_FILE
                )  # files are only ever replaced, never edited
            except OSError:
                shutil.copyfile(existing.embeddings_file, staging / EMBEDDINGS_FILE)
            notes: list[str] = []
            index, used_factory, params = fill_index(factory, existing.dim, [staging / EMBEDDINGS_FILE], notes)
            recall = recall_with(index, params, staging / EMBEDDINGS_FILE)
            meta = existing.meta
            write_index_folder(
                staging,
                index,
                existing.paths,
                existing.skipped,
                factory=used_factory,
                search_params=params,
                fingerprint=meta["fingerprint"],
                model_summary=meta.get("model", {}),
                model_source=meta.get("model_source"),
                recall_at_10=recall,
                created=meta.get("created"),
                known_records=known,
            )
            lock.check()
    for note in notes:
        logger.warning(note)
    return BuildReport(
        folder, 0, 0, [], used_factory, time.perf_counter() - start, len(existing), notes=notes, recall_at_10=recall
    )
