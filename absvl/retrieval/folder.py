"""The index folder on disk (its files: docs/retrieval.md): reading and checking it, writing its files."""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..io import atomic_file, backup_of, read_json, version_stamp, write_json, write_text
from .faiss_backend import apply_search_params, faiss
from .lock import LOCK_WAIT, index_lock, recover_swap

INDEX_FORMAT = "absvl-index"
INDEX_VERSION = 1
INDEX_FILE, META_FILE, PATHS_FILE, SKIPPED_FILE = "index.faiss", "meta.json", "paths.jsonl", "skipped.json"
EMBEDDINGS_FILE = "embeddings.npy"
DAMAGED = "the index folder is damaged: rebuild it"


def partial_folder(folder: Path) -> Path:
    """Where a build or add of ``folder`` is staged (and resumed from): ``INDEX.partial`` beside it."""
    return folder.with_name(f"{folder.name}.partial")


class IndexFolder:
    """An index folder as read: the FAISS index (stored search parameters set), ``meta.json``, the
    image paths (row i = id i) and the skipped images."""

    def __init__(
        self, folder: Path, index: faiss.Index, meta: dict[str, Any], paths: list[Path], skipped: list[tuple[str, str]]
    ):
        self.folder = folder
        self.index = index
        self.meta = meta
        self.paths = paths
        self.skipped = skipped

    @classmethod
    def read(cls, path: str | Path):
        """Read and check an index folder; a swap a crash interrupted is undone first (under the lock)."""
        folder = Path(path)
        absolute = Path(os.path.abspath(folder))
        if not folder.is_dir() and backup_of(absolute).is_dir():
            with index_lock(absolute, wait=LOCK_WAIT):  # a writer mid-swap finishes; a crashed one is undone
                recover_swap(absolute)
        if not folder.is_dir():
            partial = partial_folder(folder)
            hint = f" (an interrupted build left {partial}: run the build again)" if partial.is_dir() else ""
            raise FileNotFoundError(f"index {folder} does not exist{hint}")
        for name in (META_FILE, INDEX_FILE, PATHS_FILE):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"index {folder} has no {name}: not an absvl index folder")
        meta = read_json(folder / META_FILE, what="an absvl index's meta file", fix=DAMAGED)
        if not isinstance(meta, dict) or meta.get("format") != INDEX_FORMAT:
            raise ValueError(f"{folder / META_FILE} is not an absvl index meta file (format != {INDEX_FORMAT!r})")
        if meta.get("version", 0) > INDEX_VERSION:
            raise ValueError(
                f"index {folder} has format version {meta['version']}; this absvl reads up to {INDEX_VERSION}"
            )
        paths = _read_paths(folder / PATHS_FILE)
        index = faiss.read_index(str(folder / INDEX_FILE))
        if index.ntotal != len(paths) or index.d != meta["dim"]:
            raise ValueError(
                f"index {folder} is inconsistent: {index.ntotal} vectors of width {index.d} but {len(paths)} paths "
                f"and dim {meta['dim']} in meta.json; rebuild it"
            )
        skipped_file = folder / SKIPPED_FILE
        skipped = [tuple(s) for s in read_json(skipped_file, fix=DAMAGED)] if skipped_file.is_file() else []
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

    @property
    def ids(self) -> list[int]:
        return list(range(len(self.paths)))

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def embeddings_file(self) -> Path | None:
        """``embeddings.npy`` (row i = id i); None for an index written before indexes kept their vectors."""
        path = self.folder / EMBEDDINGS_FILE
        return path if path.is_file() else None


def _read_paths(path: Path) -> list[Path]:
    paths = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            row = json.loads(line)
            image_id, image_path = row["id"], row["path"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(f'{path}:{line_no} is not a {{"id", "path"}} JSON line') from None
        if image_id != len(paths):
            raise ValueError(f"{path}:{line_no} has id {image_id}, expected {len(paths)} (ids are 0..N-1 in order)")
        paths.append(Path(image_path))
    return paths


def write_index_folder(
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
    """Write the index files into ``folder`` (each atomically; ``meta.json`` last)."""
    with atomic_file(folder / INDEX_FILE) as tmp:
        faiss.write_index(index, str(tmp))
    write_text(folder / PATHS_FILE, "".join(json.dumps({"id": i, "path": str(p)}) + "\n" for i, p in enumerate(paths)))
    write_json(folder / SKIPPED_FILE, [list(s) for s in skipped])
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    write_json(
        folder / META_FILE,
        {
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
            **version_stamp(),
        },
    )
