"""absvl's files on disk: atomic writes, JSON, the backbone folder format and the version stamp.

Every file or folder absvl publishes goes through here, so all of them behave alike after a crash:
a reader sees the old content or the new one, never a half-written file. A folder is staged beside
its target and swapped in with two renames (target → ``.old-NAME``, staging → target); a crash
between them is undone by :func:`recover_folder`, which the next writer (or reader) calls.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from ._version import __version__

BACKBONE_FORMAT = "absvl-backbone"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def version_stamp() -> dict[str, str]:
    """What every config absvl writes carries: ``{"absvl_version": ...}``."""
    return {"absvl_version": __version__}


def preview(items: Iterable[Any], limit: int = 8, sep: str = ", ") -> str:
    """The first ``limit`` items joined by ``sep``, then ``... (N in all)`` when there are more."""
    items = [str(item) for item in items]
    shown = sep.join(items[:limit])
    return shown + (f"{sep}... ({len(items):,} in all)" if len(items) > limit else "")


# --------------------------------------------------------------------------- files
def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (one per process, so writers of the same file never
    share it); when the block ends without an error the file is flushed to disk and renamed onto
    ``path``, otherwise it is removed."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, obj: Any, indent: int | None = 2) -> None:
    """Write ``obj`` as JSON (UTF-8, non-ASCII kept, trailing newline) atomically."""
    write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def read_json(path: str | Path, what: str = "", fix: str = "") -> Any:
    """Parse a JSON file; a missing or malformed one raises an error naming the file, what it
    should be (``what``, e.g. "a VQAv2 questions file") and what to do (``fix``)."""
    path = Path(path)
    kind = f" ({what})" if what else ""
    hint = f": {fix}" if fix else ""
    if not path.is_file():
        raise FileNotFoundError(f"{path}{kind} does not exist{hint}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}{kind} is not valid JSON ({err}){hint}") from None
    except RecursionError:
        raise ValueError(f"{path}{kind} nests its JSON too deeply to read (a damaged file?){hint}") from None


# --------------------------------------------------------------------------- folders
def backup_of(folder: str | Path) -> Path:
    """Where a folder waits while its replacement is renamed in: ``.old-NAME`` beside it."""
    folder = Path(folder)
    return folder.with_name(f".old-{folder.name}")


def recover_folder(folder: str | Path) -> None:
    """Undo a swap that a crash interrupted: ``folder`` missing and its backup present → the backup
    is renamed back; a backup beside a present ``folder`` is a finished swap's leftover, removed."""
    folder = Path(folder)
    backup = backup_of(folder)
    if not backup.is_dir():
        return
    if folder.exists():
        shutil.rmtree(backup, ignore_errors=True)
    else:
        os.replace(backup, folder)


def publish_folder(staging: str | Path, folder: str | Path, overwrite: bool = True) -> None:
    """Make the complete folder ``staging`` appear as ``folder`` (files flushed to disk first).

    An existing ``folder`` is replaced only with ``overwrite`` (else ``FileExistsError``); at every
    moment ``folder`` or its backup holds a whole folder (see :func:`recover_folder`).
    """
    staging, folder = Path(staging), Path(folder)
    recover_folder(folder)
    if folder.exists() and not overwrite:
        raise FileExistsError(f"{folder} already exists: pass --overwrite (overwrite=True) to replace it")
    for path in staging.rglob("*"):
        if path.is_file():
            _fsync(path)
    if not folder.exists():
        os.replace(staging, folder)
        return
    backup = backup_of(folder)
    shutil.rmtree(backup, ignore_errors=True)
    os.replace(folder, backup)
    os.replace(staging, folder)  # the commit point
    shutil.rmtree(backup, ignore_errors=True)


@contextlib.contextmanager
def atomic_folder(folder: str | Path, overwrite: bool = True, clean_stale: bool = False) -> Iterator[Path]:
    """Yield an empty staging folder beside ``folder``; when the block ends without an error it is
    published as ``folder`` (:func:`publish_folder`), otherwise it is removed.

    ``clean_stale``: first remove the staging folders that killed runs left beside ``folder`` (only
    for a caller that is the folder's one writer, e.g. under a lock).
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    if folder.exists() and not overwrite:
        raise FileExistsError(f"{folder} already exists: pass --overwrite (overwrite=True) to replace it")
    if clean_stale:
        for stale in folder.parent.glob(f".tmp-{folder.name}-*"):
            shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-{folder.name}-", dir=folder.parent))
    try:
        os.chmod(staging, 0o755)  # mkdtemp makes it private; the result is an ordinary folder
        yield staging
        publish_folder(staging, folder, overwrite)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# --------------------------------------------------------------------------- backbone folders
def is_backbone_folder(folder: str | Path) -> bool:
    folder = Path(folder)
    return folder.is_dir() and (folder / CONFIG_NAME).is_file() and (folder / WEIGHTS_NAME).is_file()


def read_backbone_folder(folder: str | Path) -> dict[str, Any]:
    """The ``config.json`` of a backbone folder (``{"format", "name", "overrides", ...}``), checked."""
    folder = Path(folder)
    if not is_backbone_folder(folder):
        raise FileNotFoundError(
            f"{folder} is not a backbone folder (needs {CONFIG_NAME} and {WEIGHTS_NAME}, as written by "
            "`absvl convert` or `absvl train classify`)"
        )
    config = read_json(folder / CONFIG_NAME, what="a backbone folder's config")
    if not isinstance(config, dict) or config.get("format") != BACKBONE_FORMAT or "name" not in config:
        raise ValueError(f"{folder / CONFIG_NAME} is not an {BACKBONE_FORMAT} config (needs format and name)")
    return config


def save_backbone_files(
    folder: str | Path, tensors: Mapping[str, Any], name: str, overrides: Mapping[str, Any], **info: Any
) -> None:
    """Write ``model.safetensors`` + ``config.json`` (the registered ``name``, the constructor
    ``overrides`` and any ``info``: source, classes, metrics...) into the staging folder ``folder``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    weights = {key: value.detach().contiguous() for key, value in tensors.items()}
    save_file(weights, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    config = {"format": BACKBONE_FORMAT, "name": name, "overrides": dict(overrides), **info, **version_stamp()}
    write_json(folder / CONFIG_NAME, config)


def write_backbone_folder(
    folder: str | Path,
    tensors: Mapping[str, Any],
    name: str,
    overrides: Mapping[str, Any],
    overwrite: bool = True,
    **info: Any,
) -> Path:
    """:func:`save_backbone_files` into a staging folder published atomically as ``folder``."""
    with atomic_folder(folder, overwrite=overwrite) as staging:
        save_backbone_files(staging, tensors, name, overrides, **info)
    return Path(folder)
