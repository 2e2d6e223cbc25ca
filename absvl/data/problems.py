"""Problems found in a dataset's files, grouped by kind: raised together (loaders) or reported (``absvl data check``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..io import read_json

__all__ = ["Issues", "VQAFormatError", "is_int", "read_dataset_json", "top_list"]


class VQAFormatError(ValueError):
    """A VQA questions/annotations file (or dataset) that does not follow the official format."""


class Issues:
    """Problems grouped by kind: each kind counted, its first few messages kept."""

    def __init__(self, keep: int = 3) -> None:
        self.keep = keep
        self._groups: dict[Any, list] = {}
        self.rejected: set[int] = set()  # question ids of entries dropped for a problem of their own

    def add(self, kind: Any, message: str) -> None:
        group = self._groups.setdefault(kind, [0, []])
        group[0] += 1
        if len(group[1]) < self.keep:
            group[1].append(message)

    def __bool__(self) -> bool:
        return bool(self._groups)

    def __len__(self) -> int:
        return sum(count for count, _ in self._groups.values())

    def messages(self) -> list[str]:
        out = []
        for count, examples in self._groups.values():
            out.extend(examples)
            if count > len(examples):
                out.append(f"... and {count - len(examples):,} more like the one above")
        return out

    def raise_if_any(self, what: str) -> None:
        if self:
            lines = "\n  ".join(self.messages())
            raise VQAFormatError(f"{len(self):,} problem(s) in {what}:\n  {lines}")


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_dataset_json(path: Path, what: str) -> Any:
    """:func:`absvl.io.read_json` of a dataset file (``what``: "questions", "Karpathy captions", ...); a malformed
    file raises ``VQAFormatError``."""
    try:
        return read_json(
            path, what=f"a {what} file", fix="is it complete (not cut short by a failed download or unzip)?"
        )
    except FileNotFoundError:
        raise
    except ValueError as err:
        raise VQAFormatError(str(err)) from None


def top_list(path: Path, data: Any, key: str) -> list:
    if not isinstance(data, dict):
        raise VQAFormatError(f"{path}: the top level must be an object with key {key!r}, got a {type(data).__name__}")
    if key not in data:
        found = ", ".join(repr(k) for k in list(data)[:10]) or "none"
        raise VQAFormatError(f"{path}: missing top-level key {key!r} (keys found: {found})")
    entries = data[key]
    if not isinstance(entries, list):
        raise VQAFormatError(f"{path}: top-level key {key!r} must be a list, got a {type(entries).__name__}")
    return entries
