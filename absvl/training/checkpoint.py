"""Training checkpoints: complete (everything a bit-exact resume needs), atomic, rotated.

A checkpoint is a folder ``checkpoint-{step:08d}``: ``model.safetensors``, the optimizer's, scheduler's
and (fp16) scaler's state dicts (read with weights_only=True), every process's RNG states
(``rng-{rank}.pt``) and ``trainer_state.json``. All processes write into one staging folder, which
the main process publishes only when complete (``absvl.io.publish_folder``).
"""

from __future__ import annotations

import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_model, save_model

from ..io import backup_of, publish_folder, read_json, recover_folder, write_json

STATE_NAME = "trainer_state.json"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def rng_state() -> dict[str, Any]:
    """The torch (CPU and every CUDA device's), numpy and python RNG states as tensors and plain
    values (weights_only-loadable)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": pos,
            "has_gauss": has_gauss,
            "cached": cached,
        },
        "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda", [])  # absent in checkpoints written before CUDA states were saved
    here = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if len(cuda) > here:
        warnings.warn(
            f"the checkpoint holds the RNG states of {len(cuda)} CUDA devices and this machine has {here}: "
            "the resumed run's random draws on the GPU differ from an uninterrupted run's",
            stacklevel=2,
        )
    for device, device_state in enumerate(cuda[:here]):
        torch.cuda.set_rng_state(device_state, device)
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in output_dir.iterdir()
        if (m := _CHECKPOINT_RE.match(p.name)) and (p / STATE_NAME).is_file()
    ]
    return [p for _, p in sorted(found)]


def save_checkpoint(
    accelerator: Any,
    output_dir: str | Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    trainer_state: dict[str, Any],
) -> Path:
    """Write ``checkpoint-{step}`` atomically (all processes call this; rank 0 writes the shared files).

    The staging folder has a fixed name, ``.tmp-checkpoint-{step}``, so that every process finds it."""
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{step:08d}"
    staging = output_dir / f".tmp-checkpoint-{step:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(rng_state(), staging / f"rng-{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        save_model(accelerator.unwrap_model(model), str(staging / "model.safetensors"))
        torch.save(optimizer.state_dict(), staging / "optimizer.pt")
        torch.save(scheduler.state_dict(), staging / "scheduler.pt")
        scaler = getattr(accelerator, "scaler", None)
        if scaler is not None:
            torch.save(scaler.state_dict(), staging / "scaler.pt")
        write_json(staging / STATE_NAME, trainer_state)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        publish_folder(staging, final, overwrite=True)
    accelerator.wait_for_everyone()
    return final


def read_trainer_state(checkpoint: str | Path) -> dict[str, Any]:
    """The ``trainer_state.json`` of a checkpoint (step, epoch, validation, run shape, ...)."""
    return read_json(Path(checkpoint) / STATE_NAME, what="a training checkpoint's trainer state")


def load_checkpoint(
    accelerator: Any,
    checkpoint: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
) -> dict[str, Any]:
    """Restore everything ``save_checkpoint`` wrote; returns the trainer state."""
    checkpoint = Path(checkpoint)
    for name in ("model.safetensors", "optimizer.pt", "scheduler.pt", STATE_NAME):
        if not (checkpoint / name).is_file():
            raise FileNotFoundError(f"checkpoint {checkpoint} has no {name}: not a complete absvl checkpoint")
    load_model(accelerator.unwrap_model(model), str(checkpoint / "model.safetensors"), strict=True)
    optimizer.load_state_dict(torch.load(checkpoint / "optimizer.pt", weights_only=True, map_location="cpu"))
    scheduler.load_state_dict(torch.load(checkpoint / "scheduler.pt", weights_only=True))
    scaler = getattr(accelerator, "scaler", None)
    if scaler is not None and (checkpoint / "scaler.pt").is_file():
        scaler.load_state_dict(torch.load(checkpoint / "scaler.pt", weights_only=True))
    rng_file = checkpoint / f"rng-{accelerator.process_index}.pt"
    if not rng_file.is_file():
        raise FileNotFoundError(
            f"checkpoint {checkpoint} has no {rng_file.name}: it was written by fewer processes; "
            "resume with the same number of processes"
        )
    set_rng_state(torch.load(rng_file, weights_only=True))
    return read_trainer_state(checkpoint)


def rotate_checkpoints(output_dir: str | Path, keep_last: int, best: str | None) -> None:
    """Delete all but the newest ``keep_last`` checkpoints and the best one; clear stale staging folders
    and undo a replacement of a checkpoint that a crash interrupted (main process only)."""
    output_dir = Path(output_dir)
    for backup in output_dir.glob(backup_of(output_dir / "checkpoint-*").name):
        recover_folder(output_dir / f"checkpoint-{backup.name.rsplit('-', 1)[-1]}")
    checkpoints = list_checkpoints(output_dir)
    keep = set(checkpoints[-keep_last:] if keep_last > 0 else [])
    if best:
        keep.add(output_dir / Path(best).name)  # by name: the run folder may have moved since
    for path in checkpoints:
        if path not in keep:
            shutil.rmtree(path, ignore_errors=True)
    for stale in output_dir.glob(".tmp-checkpoint-*"):
        shutil.rmtree(stale, ignore_errors=True)


def resolve_resume(resume: str | None, output_dir: str | Path) -> Path | None:
    """``None``, ``latest`` (the newest complete checkpoint, or None on a fresh run) or a folder."""
    if not resume:
        return None
    if resume == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    path = Path(resume)
    if not (path / STATE_NAME).is_file():
        raise FileNotFoundError(f"train.resume={resume!r} is not a checkpoint folder (no {STATE_NAME})")
    return path
