"""``absvl export CHECKPOINT --out DIR``: any training checkpoint as a ``from_pretrained`` folder.

The task is told by what its run folder holds (``task.json`` saying ``prior``: prior alignment, ``answers.json``: VQA, ``classes.json``: classification,
``data.captions`` in ``config.yaml``: retrieval); its model is rebuilt without reading the data and the
task's own export writes the folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from ..io import read_json
from .checkpoint import STATE_NAME, list_checkpoints
from .loop import export_checkpoint


def run_task(run: str | Path) -> tuple[str, Any]:
    """(task name, task with its run config) of a run folder: ``prior``, ``classify``, ``vqa`` or ``retrieval``."""
    from .config import ClassifyConfig, RetrievalConfig, RunConfig, load_config

    run = Path(run)
    config_file = run / "config.yaml"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: the run folder of a checkpoint holds the run's config.yaml")
    task_file = run / "task.json"
    if task_file.is_file() and read_json(task_file, what="a run's task marker").get("task") == "prior":
        from .prior import PriorTask

        return "prior", PriorTask(load_config(config_file, (), RunConfig))
    if (run / "classes.json").is_file():
        from .classify import ClassifyTask

        return "classify", ClassifyTask(load_config(config_file, (), ClassifyConfig))
    if (run / "answers.json").is_file():
        from .vqa import VQATask

        return "vqa", VQATask(load_config(config_file, (), RunConfig))
    data = (yaml.safe_load(config_file.read_text()) or {}).get("data") or {}
    if "captions" in data:
        from .retrieval import RetrievalTask

        return "retrieval", RetrievalTask(load_config(config_file, (), RetrievalConfig))
    raise ValueError(
        f"cannot tell the task of the run {run}: it has no answers.json (VQA), no classes.json "
        "(classification) and its config.yaml has no data.captions (retrieval)"
    )


def export_run_checkpoint(checkpoint: str | Path, out: str | Path, overwrite: bool = False) -> str:
    """Export ``checkpoint`` (a ``checkpoint-XXXXXXXX`` folder of a run) into ``out``; returns the task name."""
    checkpoint, out = Path(checkpoint), Path(out)
    if not (checkpoint / STATE_NAME).is_file():
        found = ", ".join(p.name for p in list_checkpoints(checkpoint))
        hint = f": it is a run folder, give one of its checkpoints ({found})" if found else ""
        raise FileNotFoundError(f"{checkpoint} is not a training checkpoint (no {STATE_NAME}){hint}")
    if out.exists() and (out.is_file() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty: choose another --out or pass --overwrite")
    name, task = run_task(checkpoint.parent)
    task.restore(checkpoint.parent)
    export_checkpoint(task, task.model, checkpoint, out)
    return name
