"""Verifying an index folder whole: every file against the size and sha256 ``meta.json`` records
(``absvl index verify``), and the writers' check of the files they are about to copy."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..io import read_json
from .folder import (
    DAMAGED,
    EMBEDDINGS_FILE,
    INDEX_FILE,
    META_FILE,
    IndexCorruptError,
    IndexFolder,
    recorded_files,
    repair_hint,
    sha256_of,
)

OK, DAMAGED_FILE, MISSING, UNRECORDED = "ok", "damaged", "missing", "unrecorded"


@dataclass
class FileCheck:
    """One file of the folder: ``status`` is ok, damaged, missing or unrecorded (no checksum in meta.json)."""

    name: str
    status: str
    detail: str = ""


@dataclass
class VerifyReport:
    """What :func:`verify_index` found.

    Attributes:
        folder: the index folder.
        files: one :class:`FileCheck` per file meta.json records (or, for an index written before
            absvl recorded checksums, per file present).
        recorded: whether meta.json records checksums at all.
        problem: the first damage found (an :class:`IndexCorruptError`'s message, or a file's), None when none.
        fix: what to do about it (or, with no checksums recorded, how to record them).
    """

    folder: Path
    files: list[FileCheck] = field(default_factory=list)
    recorded: bool = True
    problem: str | None = None
    fix: str = ""

    @property
    def ok(self) -> bool:
        """Every file matches its recorded checksum (and the folder reads)."""
        return self.recorded and self.problem is None


def verify_index(path: str | Path) -> VerifyReport:
    """Check every file of an index folder against the size and sha256 in its ``meta.json``, then read
    it as a search would (:meth:`IndexFolder.read`). Never raises for a damaged file: the report says
    which file and what to do. Reads every file whole (seconds per GB)."""
    folder = Path(path)
    meta = read_json(folder / META_FILE, what="an absvl index's meta file", fix=DAMAGED)
    records = recorded_files(meta) if isinstance(meta, dict) else {}
    report = VerifyReport(folder, recorded=bool(records))
    if records:
        report.files = [_check_file(folder, name, record) for name, record in records.items()]
        damaged = [check for check in report.files if check.status != OK]
        if damaged:
            report.problem = "; ".join(f"index file {folder / c.name} {c.detail}" for c in damaged)
            only_faiss = {c.name for c in damaged} == {INDEX_FILE}  # else the stored embeddings cannot help
            report.fix = repair_hint(folder, meta, INDEX_FILE if only_faiss else EMBEDDINGS_FILE)
    else:
        report.files = [
            FileCheck(p.name, UNRECORDED, f"{p.stat().st_size:,} bytes")
            for p in sorted(folder.iterdir())
            if p.is_file() and p.name != META_FILE
        ]
        report.fix = _record_hint(folder, meta)
    if report.problem is None:
        try:
            IndexFolder.read(folder)
        except IndexCorruptError as err:
            report.problem, report.fix = f"index file {err.file} {err.problem}", err.fix
    return report


def _check_file(folder: Path, name: str, record: Any) -> FileCheck:
    path = folder / name
    if not isinstance(record, dict):
        return FileCheck(name, DAMAGED_FILE, "has no valid record in meta.json")
    if not path.is_file():
        return FileCheck(name, MISSING, "is missing (meta.json records it)")
    size, recorded = path.stat().st_size, record.get("bytes")
    if size != recorded:
        if not isinstance(recorded, int):
            return FileCheck(name, DAMAGED_FILE, f"is {size:,} bytes, meta.json records no valid size")
        state = "truncated" if size < recorded else "damaged"
        return FileCheck(name, DAMAGED_FILE, f"is {state}: {size:,} bytes where meta.json records {recorded:,}")
    if sha256_of(path) != record.get("sha256"):
        return FileCheck(name, DAMAGED_FILE, "does not match its sha256 in meta.json (its bytes changed)")
    return FileCheck(name, OK, f"{size:,} bytes, sha256 {record['sha256'][:16]}…")


def _record_hint(folder: Path, meta: Any) -> str:
    """How to record checksums in an index written before absvl recorded them."""
    if (folder / EMBEDDINGS_FILE).is_file():
        factory = meta.get("factory", "Flat") if isinstance(meta, dict) else "Flat"
        return (
            f"no checksums recorded (written by an older absvl): record them with `absvl index rebuild --index "
            f"{folder} --factory '{factory}'` (from the stored embeddings: no images or model needed)"
        )
    return (
        f"no checksums recorded (written by an older absvl, which kept no {EMBEDDINGS_FILE} either): build it again "
        f"with `absvl index build ... --out {folder} --overwrite` to record them"
    )


def verify_checksums(folder: Path, meta: dict[str, Any], names: Iterable[str]) -> dict[str, dict[str, Any]]:
    """Raise :class:`IndexCorruptError` for a file of ``names`` whose bytes differ from its recorded
    sha256 (for a writer about to copy it: a damaged file is never carried into a new index).
    Returns the records checked (files with no record are not checked)."""
    records = recorded_files(meta)
    checked = {}
    for name in names:
        record = records.get(name)
        if not isinstance(record, dict) or not (folder / name).is_file():
            continue
        check = _check_file(folder, name, record)
        if check.status != OK:
            raise IndexCorruptError(folder / name, check.detail, repair_hint(folder, meta, name))
        checked[name] = record
    return checked
