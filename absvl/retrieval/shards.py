"""Embedding a collection into ``INDEX.partial/shards``: resumable, one shard per ``shard_size`` images,
shards dealt out round-robin to the processes of a group. A shard's ``.json`` is written after its
``.npy`` and commits it; an interrupted build continues from the committed shards."""

from __future__ import annotations

import hashlib
import math
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..data.image_files import ImageFiles, collate_image_files
from ..io import read_json, write_json
from .lock import barrier, process_group
from .vectors import open_rows, write_npy

PARTIAL_FORMAT = "absvl-index-partial"
PARTIAL_META = "partial.json"
SHARDS_DIR = "shards"
DEFAULT_SHARD_SIZE = 4096


def _shard_name(shard: int) -> str:
    return f"shard_{shard:05d}"


def _list_hash(paths: Sequence[Path]) -> str:
    return hashlib.sha256("\n".join(map(str, paths)).encode()).hexdigest()


class Embedded(NamedTuple):
    """What :func:`embed_into_partial` produced: all committed shards, and what this call embedded."""

    files: list[Path]  # embedding files of every committed shard, in order
    paths: list[Path]  # the embedded images, in row order
    skipped: list[tuple[str, str]]  # (path, reason) of unreadable images
    num_embedded: int  # images this process read in this call (resumed shards excluded)
    seconds: float  # wall time of that reading and embedding


def embed_into_partial(
    model: torch.nn.Module,
    paths: list[Path],
    partial: Path,
    *,
    fingerprint: str,
    resume: bool,
    batch_size: int,
    shard_size: int,
    num_workers: int,
    device: torch.device,
    progress: bool,
    check_lock: Callable[[], None] | None = None,
) -> Embedded:
    """Embed ``paths`` with ``model.encode_image_bottom_up`` into the shards of ``partial`` (every
    process its share; all wait for all) and return what the shards hold (:class:`Embedded`).

    ``check_lock`` is called before the partial folder is touched and before each shard is written
    (the writer's :meth:`~absvl.retrieval.lock.HeldLock.check`: it raises once the lock is lost)."""
    check = check_lock or (lambda: None)
    if batch_size < 1 or shard_size < 1:
        raise ValueError(f"batch_size={batch_size} and shard_size={shard_size} must be >= 1")
    expected = {
        "format": PARTIAL_FORMAT,
        "fingerprint": fingerprint,
        "images_hash": _list_hash(paths),
        "num_images": len(paths),
        "shard_size": shard_size,
    }
    check()
    _prepare_partial(partial, expected, resume)
    model.to(device)
    start = time.perf_counter()
    num_embedded = _extract_shards(
        model,
        paths,
        partial,
        batch_size=batch_size,
        shard_size=shard_size,
        num_workers=num_workers,
        device=device,
        progress=progress,
        check_lock=check,
    )
    seconds = time.perf_counter() - start
    barrier()  # every process's shards are written
    return Embedded(*_read_shards(partial), num_embedded, seconds)


def drop_shards(folder: Path) -> None:
    """Remove the shards and the partial-build record from a published index folder."""
    shutil.rmtree(folder / SHARDS_DIR, ignore_errors=True)
    (folder / PARTIAL_META).unlink(missing_ok=True)


def _prepare_partial(partial: Path, expected: dict[str, Any], resume: bool) -> None:
    """Create ``partial`` or check that an existing one belongs to this very build.

    Every process checks (so all raise the same error), then process 0 creates the folder.
    """
    meta_file = partial / PARTIAL_META
    if partial.exists() and resume:
        found = read_json(meta_file) if meta_file.is_file() else None
        if found == expected:
            barrier()
            return
        differing = sorted(k for k in expected if not isinstance(found, dict) or found.get(k) != expected[k])
        raise ValueError(
            f"{partial} holds an interrupted build of a different model or image list (differs in: "
            f"{', '.join(differing) or 'everything'}): delete it or pass --no-resume (resume=False) to start over"
        )
    barrier()  # everyone has looked before process 0 replaces it
    if process_group()[0] == 0:
        shutil.rmtree(partial, ignore_errors=True)
        (partial / SHARDS_DIR).mkdir(parents=True)
        write_json(meta_file, expected)
    barrier()


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
    check_lock: Callable[[], None],
) -> int:
    """Embed the images of every shard not yet written under ``partial/shards`` (with several
    processes, this process's round-robin share of them); return how many images it read."""
    from tqdm.auto import tqdm

    shards_dir = partial / SHARDS_DIR
    num_shards = math.ceil(len(paths) / shard_size)
    rank, world = process_group()
    pending = [
        s for s in range(num_shards) if s % world == rank and not (shards_dir / f"{_shard_name(s)}.json").is_file()
    ]
    if not pending:
        return 0
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
        with (
            torch.no_grad(),
            tqdm(total=todo, unit="img", desc="embedding images", disable=not progress or rank) as bar,
        ):
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
                    check_lock()
                    _write_shard(shards_dir, shard, paths, done, embeddings, bad, model)
    finally:
        model.train(was_training)
    return todo


def _write_shard(shards_dir: Path, shard: int, paths, done, embeddings, bad, model) -> None:
    """``shard_NNNNN.npy`` (embeddings) then ``shard_NNNNN.json`` (paths, skipped): the json commits it."""
    vectors = np.concatenate(embeddings) if embeddings else np.zeros((0, _embedding_dim(model)), dtype=np.float32)
    name = _shard_name(shard)
    write_npy(shards_dir / f"{name}.npy", np.ascontiguousarray(vectors, dtype=np.float32))
    write_json(
        shards_dir / f"{name}.json",
        {
            "paths": [str(paths[p]) for p in done],
            "skipped": [[str(paths[p]), reason] for p, reason in sorted(bad)],
        },
    )


def _embedding_dim(model: torch.nn.Module) -> int:
    """Width of ``encode_image_bottom_up`` (``embedding_dim``; 0 for a model that does not say)."""
    return int(getattr(model, "embedding_dim", 0) or 0)


def _read_shards(partial: Path) -> tuple[list[Path], list[Path], list[tuple[str, str]]]:
    """(embedding files, image paths in order, skipped) of all written shards."""
    shards_dir = partial / SHARDS_DIR
    files, paths, skipped = [], [], []
    for info_file in sorted(shards_dir.glob("shard_*.json")):
        info = read_json(info_file, fix=f"delete {partial} and rebuild")
        vectors_file = info_file.with_suffix(".npy")
        rows = open_rows(vectors_file).shape[0]
        if rows != len(info["paths"]):
            raise ValueError(
                f"{vectors_file} has {rows} rows for {len(info['paths'])} paths: delete {partial} and rebuild"
            )
        files.append(vectors_file)
        paths += [Path(p) for p in info["paths"]]
        skipped += [tuple(s) for s in info["skipped"]]
    return files, paths, skipped
