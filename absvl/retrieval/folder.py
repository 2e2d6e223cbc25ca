"""The index folder on disk (its files: docs/retrieval.md): reading and checking it, writing its files.

Every write records each file's size and sha256 in ``meta.json`` (written last, atomically); every
load checks the sizes and ``embeddings.npy``'s header (cheap), ``absvl index verify`` the checksums.
A damaged file is an :class:`IndexCorruptError` naming it and the way back.
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from ..io import atomic_file, backup_of, read_json, version_stamp, write_json, write_text
from .faiss_backend import apply_search_params, faiss
from .lock import LOCK_WAIT, index_lock, recover_swap

INDEX_FORMAT = "absvl-index"
INDEX_VERSION = 1
INDEX_FILE, META_FILE, PATHS_FILE, SKIPPED_FILE = "index.faiss", "meta.json", "paths.jsonl", "skipped.json"
EMBEDDINGS_FILE = "embeddings.npy"
DAMAGED = "the index folder is damaged: rebuild it"
FILES_KEY = "files"  # meta.json: {name: {"bytes": size, "sha256": hex}} of every other file
RECORDED_FILES = (INDEX_FILE, EMBEDDINGS_FILE, PATHS_FILE, SKIPPED_FILE)
_READ_TRIES = 3  # a folder swapped by a writer while it is read is read again


class IndexCorruptError(ValueError):
    """A file of an index folder is truncated, damaged or missing.

    Attributes:
        file: the damaged file.
        problem: what is wrong with it.
        fix: what to do (rebuild the FAISS index from the stored embeddings, or build the index again).
    """

    def __init__(self, file: Path, problem: str, fix: str) -> None:
        self.file, self.problem, self.fix = Path(file), problem, fix
        super().__init__(f"index file {file} {problem}: {fix}")


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
    def read(cls, path: str | Path, *, faiss_index: bool = True):
        """Read and check an index folder; a swap a crash interrupted is undone first (under the lock).

        Checked on every read (cheap, no file read whole): the sizes ``meta.json`` records, the header
        of ``embeddings.npy`` against its size, the paths and the FAISS index (a file FAISS cannot
        read is an :class:`IndexCorruptError` naming it, never a FAISS traceback). Checksums are
        checked by :func:`absvl.retrieval.integrity.verify_index`. ``faiss_index=False``: leave
        ``index.faiss`` unread (``self.index`` is None), for a rebuild that replaces it.
        """
        folder = Path(path)
        absolute = Path(os.path.abspath(folder))
        for attempt in range(_READ_TRIES):
            if not folder.is_dir() and backup_of(absolute).is_dir():
                with index_lock(absolute, wait=LOCK_WAIT):  # a writer mid-swap finishes; a crashed one is undone
                    recover_swap(absolute)
            before = _identity(folder)
            try:
                return cls._read_once(folder, faiss_index)
            except (IndexCorruptError, FileNotFoundError):
                if attempt == _READ_TRIES - 1 or _identity(folder) == before:
                    raise  # not a writer's swap in the middle of this read: the folder is damaged
        raise AssertionError("unreachable")

    @classmethod
    def _read_once(cls, folder: Path, faiss_index: bool):
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
        check_sizes(folder, meta, skip=() if faiss_index else (INDEX_FILE,))
        paths = _read_paths(folder / PATHS_FILE)
        if (folder / EMBEDDINGS_FILE).is_file():
            check_embeddings_header(folder, meta, len(paths))
        index = None
        if faiss_index:
            index = read_faiss(folder, meta)
            if index.ntotal != len(paths) or index.d != meta["dim"]:
                raise IndexCorruptError(
                    folder / INDEX_FILE,
                    f"does not match the folder: {index.ntotal} vectors of width {index.d} but {len(paths)} paths "
                    f"and dim {meta['dim']} in meta.json",
                    repair_hint(folder, meta, INDEX_FILE),
                )
        skipped_file = folder / SKIPPED_FILE
        skipped = [tuple(s) for s in read_json(skipped_file, fix=DAMAGED)] if skipped_file.is_file() else []
        if index is not None:
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
    known_records: dict[str, dict[str, Any]] | None = None,
) -> None:
    """Write the index files into ``folder`` (each atomically; ``meta.json`` last, recording the size
    and sha256 of every other file; ``known_records``: records of files already hashed, by name)."""
    with atomic_file(folder / INDEX_FILE) as tmp:
        faiss.write_index(index, str(tmp))
    write_text(folder / PATHS_FILE, "".join(json.dumps({"id": i, "path": str(p)}) + "\n" for i, p in enumerate(paths)))
    write_json(folder / SKIPPED_FILE, [list(s) for s in skipped])
    known = known_records or {}
    records = {
        name: known.get(name) or file_record(folder / name) for name in RECORDED_FILES if (folder / name).is_file()
    }
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
            FILES_KEY: records,
            **version_stamp(),
        },
    )


# --------------------------------------------------------------------------- checks
def sha256_of(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def file_record(path: Path) -> dict[str, Any]:
    """What ``meta.json`` records of a file: its size and sha256."""
    return {"bytes": path.stat().st_size, "sha256": sha256_of(path)}


def recorded_files(meta: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The file records of ``meta.json`` (empty for an index written before absvl recorded them)."""
    files = meta.get(FILES_KEY)
    return files if isinstance(files, dict) else {}


def _identity(folder: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(folder)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def repair_hint(folder: Path, meta: dict[str, Any], damaged: str) -> str:
    """The way back from a damaged file: a new FAISS index from intact stored embeddings when only
    ``index.faiss`` is damaged (no images or model needed), else building the index again."""
    if damaged == INDEX_FILE and (folder / EMBEDDINGS_FILE).is_file():
        try:
            check_sizes(folder, meta, only=(EMBEDDINGS_FILE,))
            check_embeddings_header(folder, meta, None)
        except IndexCorruptError:
            pass
        else:
            factory = meta.get("factory") or "Flat"
            return (
                f"rebuild it from the stored embeddings with `absvl index rebuild --index {folder} --factory "
                f"'{factory}'` (no images or model needed)"
            )
    model = meta.get("model_source") or "MODEL"
    return (
        f"the index cannot be used as it is; build it again from its images with `absvl index build --model "
        f"{model} --images IMAGES --out {folder} --overwrite` (its {PATHS_FILE} lists them)"
    )


def check_sizes(
    folder: Path, meta: dict[str, Any], skip: tuple[str, ...] = (), only: tuple[str, ...] | None = None
) -> None:
    """Raise :class:`IndexCorruptError` for a recorded file that is missing or not of its recorded size."""
    for name, record in recorded_files(meta).items():
        if name in skip or (only is not None and name not in only) or not isinstance(record, dict):
            continue
        path = folder / name
        if not path.is_file():
            raise IndexCorruptError(path, "is missing (meta.json records it)", repair_hint(folder, meta, name))
        size = path.stat().st_size
        if size != record.get("bytes"):
            state = "truncated" if isinstance(record.get("bytes"), int) and size < record["bytes"] else "damaged"
            raise IndexCorruptError(
                path,
                f"is {state}: {size:,} bytes where meta.json records {record.get('bytes'):,}"
                if isinstance(record.get("bytes"), int)
                else f"is {state}: {size:,} bytes, meta.json records no valid size",
                repair_hint(folder, meta, name),
            )


def check_embeddings_header(folder: Path, meta: dict[str, Any], rows: int | None) -> None:
    """Raise :class:`IndexCorruptError` unless ``embeddings.npy`` holds a float32 ``[rows, dim]`` array
    (any rows for ``rows=None``) in exactly the bytes its header promises (reads the header only)."""
    path = folder / EMBEDDINGS_FILE
    fix = repair_hint(folder, meta, EMBEDDINGS_FILE) if rows is not None else ""
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    try:
        with open(path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            if version not in readers:
                raise ValueError(f".npy format version {version} is not one absvl writes")
            shape, fortran, dtype = readers[version](handle)
            offset = handle.tell()
    except (ValueError, OSError, EOFError) as err:
        raise IndexCorruptError(path, f"has no valid .npy header ({err})", fix) from None
    dim = meta.get("dim")
    if len(shape) != 2 or dtype != np.float32 or fortran or shape[1] != dim or rows not in (None, shape[0]):
        want = f"float32 [{rows if rows is not None else 'N'}, {dim}]"
        raise IndexCorruptError(path, f"holds a {dtype} array of shape {list(shape)}, not {want}", fix)
    want, size = offset + shape[0] * shape[1] * 4, path.stat().st_size
    if size != want:
        raise IndexCorruptError(
            path,
            f"is {'truncated' if size < want else 'damaged'}: {size:,} bytes where its header promises "
            f"{shape[0]:,} x {shape[1]} float32 ({want:,} bytes)",
            fix,
        )


def read_faiss(folder: Path, meta: dict[str, Any]) -> faiss.Index:
    """``faiss.read_index`` of ``index.faiss``; a file FAISS cannot read is an :class:`IndexCorruptError`."""
    path = folder / INDEX_FILE
    try:
        return faiss.read_index(str(path))
    except (RuntimeError, MemoryError) as err:
        reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise IndexCorruptError(
            path, f"is damaged or truncated: FAISS cannot read it ({reason})", repair_hint(folder, meta, INDEX_FILE)
        ) from None
