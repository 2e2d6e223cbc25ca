"""Which model built an index: its fingerprint (image embeddings of two models are not comparable),
a summary and where to load it from."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch


class IndexMismatchError(ValueError):
    """The index was built by a different model (its image embeddings live in another space)."""


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


def model_summary(model: torch.nn.Module) -> dict[str, Any]:
    """What ``meta.json`` records of the model: its class and the config fields that shape its embeddings."""
    config = getattr(model, "config", None)
    summary: dict[str, Any] = {"class": type(model).__name__}
    for key in ("backbone", "text_encoder", "image_size", "alpha", "prior_visual"):
        if hasattr(config, key):
            summary[key] = getattr(config, key)
    summary["image_size"] = getattr(model, "image_size", summary.get("image_size"))
    return summary


def resolve_model_source(source: str | None) -> str | None:
    """A model folder that exists as its absolute path (valid from any working directory); a Hub id as given."""
    if source and Path(source).exists():
        return os.path.abspath(source)
    return source
