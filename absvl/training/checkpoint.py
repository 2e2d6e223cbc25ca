"""Training checkpoints: complete (everything a bit-exact resume needs), atomic, rotated.

A checkpoint is a folder ``checkpoint-{step:08d}``: ``model.safetensors``, the optimizer's, scheduler's
and (fp16) scaler's state dicts (read with weights_only=True), every process's RNG states
(``rng-{rank}.pt``) and ``trainer_state.json``. All processes write into one staging folder, which
the main process publishes only when complete (``absvl.io.publish_folder``).

A resume (``train.resume=latest``) takes the newest checkpoint that verifies (``verify_checkpoint``: every file
there, ``model.safetensors`` as long as its header says, the ``.pt`` archives whole, the trainer state valid
JSON); a damaged newer one is named, with why, and set aside as ``checkpoint-XXXXXXXX.broken``.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_model, save_model

from ..io import backup_of, publish_folder, read_json, recover_folder, write_json

STATE_NAME = "trainer_state.json"
REQUIRED_FILES = ("model.safetensors", "optimizer.pt", "scheduler.pt", STATE_NAME)
BROKEN_SUFFIX = ".broken"  # a damaged checkpoint that a resume skipped is renamed to checkpoint-XXXXXXXX.broken
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from (missing, truncated or unreadable files); the message names
    the file and why."""


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


def _safetensors_problem(path: Path) -> str | None:
    """Why a ``.safetensors`` file cannot be whole, from its header alone (``None``: its size is what its
    header says): the format's 8-byte header length, the JSON header, then the tensors' bytes."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"{path.name} is truncated ({size:,} bytes: not even its header length)"
        header_len = int.from_bytes(head, "little")
        if 8 + header_len > size:
            return f"{path.name} is truncated ({size:,} bytes, shorter than its own header of {header_len:,})"
        try:
            header = json.loads(f.read(header_len))
            ends = [int(entry["data_offsets"][1]) for key, entry in header.items() if key != "__metadata__"]
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as err:
            return f"{path.name} has a damaged header ({err})"
    expected = 8 + header_len + max(ends, default=0)
    if size < expected:
        return f"{path.name} is truncated ({size:,} of {expected:,} bytes)"
    if size > expected:
        return f"{path.name} is damaged ({size - expected:,} bytes more than its tensors: {size:,} of {expected:,})"
    return None


def _archive_problem(path: Path) -> str | None:
    """Why a ``torch.save`` file cannot be whole (``None``: its zip directory, at the end, is there and every
    entry lies inside the file): a truncated file has lost its directory."""
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.header_offset + info.compress_size > size:
                    return f"{path.name} is truncated ({size:,} bytes; its entry {info.filename} lies past the end)"
    except (zipfile.BadZipFile, OSError, ValueError) as err:
        return f"{path.name} is truncated or damaged ({size:,} bytes, not a complete torch.save archive: {err})"
    return None


def verify_checkpoint(checkpoint: str | Path) -> list[str]:
    """What is wrong with a checkpoint folder, one line per problem (empty: it verifies). Cheap: every file
    that ``load_checkpoint`` reads is there, ``model.safetensors`` has the size its header says, every
    ``.pt`` (optimizer, scheduler, scaler, each process's RNG states) is a complete archive and
    ``trainer_state.json`` is valid JSON. Content is checked when it is loaded."""
    checkpoint = Path(checkpoint)
    problems = [f"{name} is missing" for name in REQUIRED_FILES if not (checkpoint / name).is_file()]
    if not any(checkpoint.glob("rng-*.pt")):
        problems.append("rng-0.pt is missing")
    try:
        if (checkpoint / "model.safetensors").is_file():
            problems.append(_safetensors_problem(checkpoint / "model.safetensors"))
        for path in sorted(checkpoint.glob("*.pt")):
            problems.append(_archive_problem(path))
        if (checkpoint / STATE_NAME).is_file():
            try:
                read_trainer_state(checkpoint)
            except ValueError as err:
                problems.append(f"{STATE_NAME} is not valid JSON ({err})")
    except OSError as err:  # unreadable (permissions, I/O error) or gone meanwhile
        problems.append(f"cannot be read ({err})")
    return [p for p in problems if p]


def _restore(path: Path, restore: Callable[[], Any]) -> Any:
    """Run ``restore`` (which reads ``path``); an error names the file."""
    try:
        return restore()
    except (RuntimeError, OSError, ValueError, EOFError, KeyError, TypeError) as err:
        raise CheckpointError(f"cannot restore {path}: {type(err).__name__}: {err}") from err


def load_checkpoint(
    accelerator: Any,
    checkpoint: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
) -> dict[str, Any]:
    """Restore everything ``save_checkpoint`` wrote; returns the trainer state. A file that cannot be read
    raises ``CheckpointError`` naming it."""
    checkpoint = Path(checkpoint)
    for name in REQUIRED_FILES:
        if not (checkpoint / name).is_file():
            raise FileNotFoundError(f"checkpoint {checkpoint} has no {name}: not a complete absvl checkpoint")
    weights, optimizer_file, scheduler_file = (checkpoint / n for n in REQUIRED_FILES[:3])
    _restore(weights, lambda: load_model(accelerator.unwrap_model(model), str(weights), strict=True))
    _restore(
        optimizer_file,
        lambda: optimizer.load_state_dict(torch.load(optimizer_file, weights_only=True, map_location="cpu")),
    )
    _restore(scheduler_file, lambda: scheduler.load_state_dict(torch.load(scheduler_file, weights_only=True)))
    scaler = getattr(accelerator, "scaler", None)
    scaler_file = checkpoint / "scaler.pt"
    if scaler is not None and scaler_file.is_file():
        _restore(scaler_file, lambda: scaler.load_state_dict(torch.load(scaler_file, weights_only=True)))
    rng_file = checkpoint / f"rng-{accelerator.process_index}.pt"
    if not rng_file.is_file():
        raise FileNotFoundError(
            f"checkpoint {checkpoint} has no {rng_file.name}: it was written by fewer processes; "
            "resume with the same number of processes"
        )
    _restore(rng_file, lambda: set_rng_state(torch.load(rng_file, weights_only=True)))
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


def _set_aside(checkpoint: Path) -> Path:
    """Rename a damaged checkpoint out of the run's checkpoints (kept for a look, never rotated or resumed)."""
    target = checkpoint.with_name(checkpoint.name + BROKEN_SUFFIX)
    n = 1
    while target.exists():
        n += 1
        target = checkpoint.with_name(f"{checkpoint.name}{BROKEN_SUFFIX}-{n}")
    checkpoint.rename(target)
    return target


def resolve_resume(
    resume: str | None,
    output_dir: str | Path,
    notify: Callable[[str], Any] | None = None,
    set_aside: bool = False,
) -> Path | None:
    """``None``, ``latest`` (the newest checkpoint that verifies, or None on a fresh run) or a folder.

    ``latest`` skips damaged checkpoints (``verify_checkpoint``), telling ``notify`` which and why; with
    ``set_aside`` (the main process) they are renamed ``checkpoint-XXXXXXXX.broken`` so that rotation and
    later resumes pass them by. None verifying, or a named folder that does not, raises ``CheckpointError``.
    """
    if not resume:
        return None
    if resume != "latest":
        path = Path(resume)
        if not (path / STATE_NAME).is_file():
            raise FileNotFoundError(f"train.resume={resume!r} is not a checkpoint folder (no {STATE_NAME})")
        problems = verify_checkpoint(path)
        if problems:
            raise CheckpointError(
                f"cannot resume from {path}: {'; '.join(problems)}. Resume from its run folder ({path.parent}) to "
                "take the newest checkpoint that verifies"
            )
        return path
    checkpoints = list_checkpoints(output_dir)
    skipped: list[tuple[Path, list[str]]] = []
    for path in reversed(checkpoints):
        problems = verify_checkpoint(path)
        if not problems:
            break
        skipped.append((path, problems))
    else:
        if skipped:
            found = "; ".join(f"{p.name}: {', '.join(why)}" for p, why in skipped)
            raise CheckpointError(
                f"no checkpoint of {output_dir} verifies ({found}): nothing to resume from. Set train.resume=null "
                "(or move the run folder away) to start afresh"
            )
        return None
    for broken, problems in skipped:
        kept = _set_aside(broken) if set_aside else None
        if notify is not None:
            notify(
                f"skipped {broken}: {', '.join(problems)}"
                + (f" (kept as {kept.name}; delete it when done)" if kept else "")
                + f"; resuming from the newest checkpoint that verifies, {path.name}"
            )
    return path
