"""``load_model``: a saved AbSViT-VL folder as the class it holds (transformers' ``AutoModel`` idea for a family
of three classes), for tools that take any of them: attention figures, the Hub push, the index, the server."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .modeling import AbsVLModel
from .pretrained import read_saved, resolve_folder
from .tasks import AbsVLForQuestionAnswering, AbsVLForRetrieval

CLASSES = {cls.__name__: cls for cls in (AbsVLModel, AbsVLForQuestionAnswering, AbsVLForRetrieval)}


def saved_class(folder: str | Path) -> type[AbsVLModel]:
    """The class a local model folder holds: ``config.json``'s ``architecture``; for an absvl 0.2 folder (one class,
    both heads) the task model of its trained head, VQA first, else the encoder."""
    saved = read_saved(Path(folder))
    if saved.architecture is not None:
        if saved.architecture not in CLASSES:
            raise ValueError(
                f"{folder}: config.json names the class {saved.architecture!r}, not one of {', '.join(CLASSES)}: "
                "saved by a newer absvl? Upgrade absvl to load it"
            )
        return CLASSES[saved.architecture]
    for task, cls in (("vqa", AbsVLForQuestionAnswering), ("retrieval", AbsVLForRetrieval)):
        if task in saved.heads:
            return cls
    return AbsVLModel


def load_model(name_or_path: str | Path, **hub_options: Any) -> AbsVLModel:
    """The model of a folder written by ``save_pretrained`` (or a Hub repository of one) as the class it holds.
    ``hub_options``: ``from_pretrained``'s revision, cache_dir, force_download, local_files_only, token."""
    folder = resolve_folder(name_or_path, **hub_options)
    return saved_class(folder).from_pretrained(folder)
