"""Text → image retrieval: a FAISS index of bottom-up image embeddings, searched with the text
prior ξ and re-ranked with the query steering the vision encoder top-down (SPEC §1, §5)."""
from .index import (
    BuildReport,
    ImageIndex,
    IndexMismatchError,
    add_to_index,
    build_index,
    choose_factory,
    list_images,
    model_fingerprint,
)
from .search import Retriever, SearchHit

__all__ = [
    "BuildReport",
    "ImageIndex",
    "IndexMismatchError",
    "Retriever",
    "SearchHit",
    "add_to_index",
    "build_index",
    "choose_factory",
    "list_images",
    "model_fingerprint",
]
