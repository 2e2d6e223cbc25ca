"""Text → image retrieval: a FAISS index of bottom-up image embeddings, searched with the text
prior ξ and re-ranked with the query steering the vision encoder top-down (SPEC §1, §5)."""

import importlib
from typing import Any

# Imported on first use (PEP 562): FAISS loads only for the commands that search or index.
_HOMES = {
    **dict.fromkeys(["BuildReport", "add_to_index", "build_index", "list_images", "rebuild_index"], "build"),
    "ImageIndex": "index",
    "IndexCorruptError": "folder",
    "IndexLockedError": "lock",
    **dict.fromkeys(["VerifyReport", "verify_index"], "integrity"),
    **dict.fromkeys(["IndexMismatchError", "model_fingerprint"], "identity"),
    "choose_factory": "faiss_backend",
    "measure_recall": "vectors",
    **dict.fromkeys(["Retriever", "SearchHit"], "search"),
}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)


__all__ = [
    "BuildReport",
    "ImageIndex",
    "IndexCorruptError",
    "IndexLockedError",
    "IndexMismatchError",
    "Retriever",
    "SearchHit",
    "VerifyReport",
    "add_to_index",
    "build_index",
    "choose_factory",
    "list_images",
    "measure_recall",
    "model_fingerprint",
    "rebuild_index",
    "verify_index",
]
