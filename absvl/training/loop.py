"""The one training loop every task runs on (VQA finetuning, retrieval, image classification).

``run_training(config, task)`` owns everything that is not about the task: Accelerate (one process or
``accelerate launch`` / ``torchrun``; bf16/fp16), accumulation, clipping, AdamW with warmup + linear decay,
the deterministic data order, exact mid-epoch resume (refused when the run's shape changed, unless
``train.force_resume``), rotated atomic checkpoints, validation, logs and trackers, unreadable images
(skipped, listed in ``skipped.json``), and the ``final/`` and ``best/`` exports. A task (``Task``) builds
its data and model and says how to compute the loss, validate and export.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from safetensors.torch import load_model
from torch.utils.data import Dataset
from tqdm.auto import tqdm
from transformers import get_scheduler

from ..data.loaders import make_loader, to_device
from ..io import atomic_folder, write_json, write_text
from ..runtime import cpu_only, keep_freed_memory
from .checkpoint import (
    STATE_NAME,
    list_checkpoints,
    load_checkpoint,
    read_trainer_state,
    resolve_resume,
    rotate_checkpoints,
    save_checkpoint,
)
from .config import ConfigError, TrainConfig, dump_config
from .data import EpochOrder


@dataclass
class Validation:
    """What a task's validation returns.

    Attributes:
        score: higher is better; selects the best checkpoint.
        metrics: logged as they are (``{"val/accuracy": ..., ...}``) with the step.
        result: the task's full result (returned in the run summary and given to ``export``).
    """

    score: float
    metrics: dict[str, Any] = field(default_factory=dict)
    result: Any = None


class Task(Protocol):
    """What ``run_training`` needs from a task.

    ``setup`` runs once, after the seed is set and the checkpoint to resume from (if any) is
    known, and builds ``model`` (fresh, not yet prepared) and ``train_set`` / ``collator``. The
    collator's batches may carry ``skipped``: a list of tuples describing unreadable items.
    """

    model: torch.nn.Module
    train_set: Dataset
    collator: Any
    diagnose: bool  # set by the loop: this forward's step is logged (a task may measure more, e.g. gradients)

    def setup(self, accelerator: Accelerator, output_dir: Path, checkpoint: Path | None) -> None: ...

    def param_groups(self) -> list[dict[str, Any]]:
        """AdamW parameter groups of ``model`` (every trainable parameter in exactly one)."""

    def describe(self) -> str:
        """One line on the data, reported before training ("training on ... images")."""

    def batch_size(self, batch: dict[str, Any]) -> int:
        """Number of samples in ``batch`` (0: every item was unreadable)."""

    def loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        """The training loss of a non-empty batch (``model`` is the prepared, wrapped model)."""

    def validate(self, model: torch.nn.Module, accelerator: Accelerator) -> Validation | None:
        """Validate the unwrapped ``model`` (all processes call it); None when there is no validation data."""

    def export(self, model: torch.nn.Module, out_dir: Path, last: Validation | None) -> None:
        """Save the unwrapped ``model`` into ``out_dir`` (main process only); ``last`` is the
        validation of these weights (its ``metrics`` go into the model card) or None."""

    def restore(self, output_dir: Path) -> None:
        """Build ``model`` (fresh weights) for the finished run in ``output_dir`` from what the run
        wrote there (answers.json, classes.json), without reading the data: ``export_checkpoint``
        then loads a checkpoint's weights into it."""

    def diagnostics(self) -> dict[str, torch.Tensor]:
        """Scalars about the last training forward, logged with the loss (e.g. the top-down path's
        ``topdown_health``); ``{}`` for none. ``loss`` measures them when ``diagnose`` is set (log steps
        only), so no step keeps its forward's outputs for later."""

    def health_warning(self, stats: dict[str, float]) -> str | None:
        """A warning about the run read from the last logged ``diagnostics`` (e.g. a prior gate that stayed
        shut), said at the end of training; None when all is well."""


def agreement_group(accelerator: Accelerator) -> Any:
    """A process group that agrees on host-side facts (how many processes have data) on the CPU: the default one
    under gloo, else a gloo group beside NCCL, so that agreeing never waits for the GPU. None for one process."""
    if accelerator.num_processes == 1:
        return None
    if torch.distributed.get_backend() == "gloo":
        return torch.distributed.group.WORLD
    return torch.distributed.new_group(backend="gloo")  # every process calls this at the same point


def processes_with_data(size: int, group: Any) -> int:
    """How many processes' micro-batches hold a readable item (``size`` is this process's count; ``group`` from
    :func:`agreement_group`, None for one process); the same number on every process."""
    if group is None:
        return int(size > 0)
    has = torch.tensor([1 if size else 0])
    torch.distributed.all_reduce(has, group=group)
    return int(has.item())


def train_step(
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    task: Task,
    batch: dict[str, Any],
    max_grad_norm: float,
    stand_in: Callable[[], dict[str, Any]],
    group: Any = None,
) -> torch.Tensor | None:
    """One micro-step: loss, backward, clipping and the optimizer step when gradients sync; returns the loss.

    A micro-step where no process's batch holds a readable item is skipped on every process and returns None: no
    forward (BatchNorm statistics stay), no optimizer step (AdamW's moments, its step count and weight decay stay),
    no gradient accumulated; the next micro-batch takes its place. Where only some processes have items, the
    others run ``stand_in()`` at loss weight 0 (the same forward and gradient all-reduce as everyone, no gradient
    of their own; their buffers, e.g. BatchNorm statistics, are put back) and the step averages the gradients of
    the processes with items. ``group``: :func:`agreement_group` (None for one process).
    """
    mine = task.batch_size(batch) > 0
    with_data = processes_with_data(int(mine), group)
    if with_data == 0:
        return None
    unwrapped = accelerator.unwrap_model(model)
    kept = None if mine else {name: b.detach().clone() for name, b in unwrapped.named_buffers()}
    with accelerator.accumulate(model):
        loss = task.loss(model, batch if mine else stand_in())
        # DDP averages over all processes: those with items carry the step
        scale = accelerator.num_processes / with_data if mine else 0.0
        accelerator.backward(loss * scale)
        if accelerator.sync_gradients and max_grad_norm > 0:
            accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if kept is not None:
        with torch.no_grad():
            for name, buffer in unwrapped.named_buffers():
                buffer.copy_(kept[name])
    return loss


def flatten_config(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as flat ``section.key`` → scalar (what trackers accept)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_config(value, f"{name}."))
        else:
            flat[name] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


def readable_batch(task: Task, train_set: Dataset, collator: Any, seed: int, size: int = 2) -> dict[str, Any]:
    """A batch of the first ``size`` readable training items (in dataset order; their augmentation
    draws from its own generators, so the run's random stream is untouched)."""
    ordered = EpochOrder(train_set, seed, epoch=0, shuffle=False)
    items = []
    for position in range(len(ordered)):
        item = ordered[position]
        if task.batch_size(collator([item])):
            items.append(item)
            if len(items) == size:
                break
    if not items:
        raise ValueError(f"none of the {len(ordered)} training items could be read: check the dataset's image paths")
    return collator(items)


def freeze_unreached(task: Task, batch: dict[str, Any], device: torch.device) -> list[str]:
    """Freeze the parameters that the task's loss never reaches; returns their names.

    DDP all-reduces every trainable parameter's gradient and stops ("Expected to have finished
    reduction") when one gets none, e.g. the contrastive head with ``prior_loss_weight: 0`` or the
    prior's projection under a backbone that ignores ξ. One probe step on ``batch`` finds them
    (random states and buffers such as BatchNorm statistics are restored afterwards). Such
    parameters never change in a single-process run either (AdamW skips a parameter without a
    gradient), so freezing them changes nothing but the reduction.
    """
    model = task.model.to(device)
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        task.loss(model, to_device(batch, device)).backward()
    unreached = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    for name, p in model.named_parameters():
        if name in unreached:
            p.requires_grad_(False)
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        for name, b in model.named_buffers():
            b.copy_(buffers[name])
    return unreached


def merge_skipped(accelerator: Accelerator, skipped: list[list[Any]]) -> list[list[Any]]:
    """Every process's skipped items, each once (an item skipped again in a later epoch, or by two
    processes, counts once), in first-seen order; the same list on every process."""
    everyone = gather_object([skipped]) if accelerator.num_processes > 1 else [skipped]
    merged: dict[str, list[Any]] = {}
    for items in everyone:
        for item in items:
            merged.setdefault(json.dumps(item), list(item))
    return list(merged.values())


def describe_skipped(skipped: list[list[Any]]) -> str:
    """ "N items (M unreadable images)": entries end with (image path, reason)."""
    images = len({str(item[-2]) for item in skipped})
    return f"{len(skipped)} items ({images} unreadable images)"


_NOT_TRAINING_DATA = {"num_workers", "val_split", "max_val_questions", "max_val_images", "images"}


def run_shape(config: Any, num_processes: int, total_steps: int, train_items: int) -> dict[str, Any]:
    """What a resume must share with the checkpoint for the data order and the schedule to continue
    as an uninterrupted run would (the data section but for what does not change the training
    items: loader processes and the validation set)."""
    t = config.train
    data = {k: v for k, v in config.to_dict().get("data", {}).items() if k not in _NOT_TRAINING_DATA}
    return {
        "train.batch_size": t.batch_size,
        "train.grad_accum": t.grad_accum,
        "processes": num_processes,
        "steps": total_steps,
        "train items": train_items,
        **{f"data.{k}": v for k, v in data.items()},
    }


def check_resume(checkpoint: Path, saved: dict[str, Any] | None, now: dict[str, Any], force: bool) -> None:
    """Refuse a resume whose run shape differs from the checkpoint's (see ``run_shape``); a setting the checkpoint
    does not record (added to absvl after it was written) is not compared."""
    if saved is None:  # written before the shape was recorded
        return
    changed = [f"{k} was {saved.get(k)!r}, now {now.get(k)!r}" for k in sorted(saved) if saved[k] != now.get(k)]
    if changed and not force:
        raise ConfigError(
            f"cannot resume from {checkpoint}: " + "; ".join(changed) + ". Resume with the checkpoint's settings, "
            "or pass train.force_resume=true to continue anyway (the data order and the schedule then differ "
            "from an uninterrupted run)"
        )


def write_run_config(out: Path, text: str, step: int) -> str | None:
    """Write the run's ``config.yaml``; a different one already there (a resume with changed
    settings) is kept as ``config-before-step-{step}.yaml``. Returns that file's name, if any."""
    path = out / "config.yaml"
    kept = None
    if path.is_file() and path.read_text(encoding="utf-8") != text:
        kept = f"config-before-step-{step:08d}.yaml"
        os.replace(path, out / kept)
    write_text(path, text)
    return kept


def export_atomically(task: Task, model: torch.nn.Module, export: Path, last: Validation | None) -> None:
    """``task.export`` into an (existing, empty) staging folder published as ``export`` when complete:
    a run killed while exporting leaves the previous ``final/`` (or none), never a half-written one."""
    with atomic_folder(export, clean_stale=True) as staging:  # runs on the main process only
        task.export(model, staging, last)


def export_checkpoint(task: Task, model: torch.nn.Module, checkpoint: Path, out_dir: Path) -> None:
    """Load a training checkpoint's weights into ``model`` and export them atomically to
    ``out_dir`` as ``task.export`` does (with the checkpoint's validation metrics, when it was
    validated at its own step)."""
    for name in ("model.safetensors", STATE_NAME):
        if not (checkpoint / name).is_file():
            raise FileNotFoundError(f"{checkpoint} has no {name}: not a complete absvl training checkpoint")
    load_model(model, str(checkpoint / "model.safetensors"), strict=True)
    state = read_trainer_state(checkpoint)
    val = state.get("validation")
    last = Validation(val["score"], val["metrics"]) if val and val["step"] == state["step"] else None
    export_atomically(task, model, out_dir, last)


class JsonLog:
    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def run_training(config: Any, task: Task, notify: Callable[[str], Any] | None = None) -> dict[str, Any]:
    """Train ``task`` as ``config.train`` says; returns a summary (final step, best/last
    validation result, export folders, checkpoints, number of skipped items).

    ``notify`` (e.g. ``print``) receives the run's messages on the main process: what it trains on,
    a resume, changed settings, skipped items, a prior gate that stayed shut.

    The run ends with two exports: ``final/`` (the last step) and, when validation picked a best
    checkpoint, ``best/`` (its weights, which the task's model holds afterwards).

    ``config`` is a run config (``RunConfig``, ``ClassifyConfig``): its ``train`` section drives
    the loop and the whole of it is saved as ``config.yaml`` and sent to the trackers.
    """
    t: TrainConfig = config.train
    keep_freed_memory()
    out = Path(t.output_dir)
    accelerator = Accelerator(
        cpu=cpu_only(),
        gradient_accumulation_steps=t.grad_accum,
        mixed_precision=t.mixed_precision,
        log_with=list(t.trackers) or None,
        project_dir=str(out),
    )
    main = accelerator.is_main_process

    def say(message: str) -> None:
        if main and notify is not None:
            notify(message)

    if main:
        out.mkdir(parents=True, exist_ok=True)
    set_seed(t.seed)
    checkpoint = resolve_resume(t.resume, out, notify=say, set_aside=main)  # skips damaged checkpoints
    task.setup(accelerator, out, checkpoint)
    train_set, collator = task.train_set, task.collator
    stand_in_batch: dict[str, Any] = {}

    def stand_in() -> dict[str, Any]:  # built on first use: most runs never need it
        if not stand_in_batch:
            stand_in_batch.update(to_device(readable_batch(task, train_set, collator, t.seed), accelerator.device))
        return stand_in_batch

    if accelerator.num_processes > 1:
        frozen = freeze_unreached(task, stand_in(), accelerator.device)
        if frozen:
            say(
                f"{len(frozen)} parameters get no gradient in this run and are frozen: "
                f"{', '.join(frozen[:4])}{', ...' if len(frozen) > 4 else ''}"
            )
    optimizer = torch.optim.AdamW(
        task.param_groups(), lr=t.lr, betas=tuple(t.betas), eps=t.eps, fused=accelerator.device.type == "cuda"
    )
    model, optimizer = accelerator.prepare(task.model, optimizer)
    group = agreement_group(accelerator)
    unwrapped = accelerator.unwrap_model(model)

    micro_batches = math.ceil(len(train_set) / (t.batch_size * accelerator.num_processes))
    steps_per_epoch = math.ceil(micro_batches / t.grad_accum)
    total_steps = t.max_steps or t.epochs * steps_per_epoch
    scheduler = get_scheduler(
        "linear", optimizer, num_warmup_steps=int(t.warmup_ratio * total_steps), num_training_steps=total_steps
    )
    state: dict[str, Any] = {
        "step": 0,
        "epoch": 0,
        "batches_in_epoch": 0,
        "best_checkpoint": None,
        "best_accuracy": None,
        "skipped": [],
        "skipped_steps": 0,
        "samples": 0,
    }
    shape = run_shape(config, accelerator.num_processes, total_steps, len(train_set))
    if checkpoint is not None:
        saved = read_trainer_state(checkpoint).get("run") if (checkpoint / STATE_NAME).is_file() else None
        check_resume(checkpoint, saved, shape, t.force_resume)
        state = load_checkpoint(accelerator, checkpoint, model, optimizer, scheduler)
        state.setdefault("skipped_steps", 0)  # checkpoints written before absvl counted them
        say(f"resumed from {checkpoint} at step {state['step']}")
    state["run"] = shape
    if main:
        kept = write_run_config(out, dump_config(config), state["step"])
        if kept:
            say(f"the run's settings changed since its config.yaml: the old one is kept as {out / kept}")
    if t.trackers:
        accelerator.init_trackers("absvl", config=flatten_config(config.to_dict()))
    log = JsonLog(out / "log.jsonl", main)
    say(f"{task.describe()}; {total_steps} steps of {t.batch_size * accelerator.num_processes * t.grad_accum} samples")

    def validate() -> Validation | None:
        result = task.validate(unwrapped, accelerator)
        if result is not None:
            state["validation"] = {"step": state["step"], "score": result.score, "metrics": result.metrics}
            record = {"step": state["step"], **result.metrics}
            accelerator.log(record, step=state["step"])
            log.write(record)
        return result

    def checkpoint_now(score: float | None) -> None:
        state["skipped"] = merge_skipped(accelerator, state["skipped"])
        # "best_accuracy" keeps its name (checkpoints written before the loop was shared use it)
        if score is not None and (state["best_accuracy"] is None or score > state["best_accuracy"]):
            state["best_accuracy"] = score
            state["best_checkpoint"] = str(out / f"checkpoint-{state['step']:08d}")
        save_checkpoint(accelerator, out, state["step"], model, optimizer, scheduler, state)
        if main:
            rotate_checkpoints(out, t.keep_last, state["best_checkpoint"])

    def score(result: Validation | None) -> float | None:
        return result.score if result is not None else None

    bar = tqdm(
        total=total_steps, initial=state["step"], desc="train", unit="step", disable=not main, dynamic_ncols=True
    )
    window_start, window_samples, last_result = time.perf_counter(), 0, None
    last_stats: dict[str, float] = {}  # the last logged diagnostics
    model.train()
    while state["step"] < total_steps:
        epoch_set = EpochOrder(train_set, t.seed, state["epoch"])
        loader = accelerator.prepare_data_loader(make_loader(epoch_set, collator, t.batch_size, _num_workers(config)))
        whole_epoch, stepped = state["batches_in_epoch"] == 0, False
        if not whole_epoch:
            loader = accelerator.skip_first_batches(loader, state["batches_in_epoch"])
        for batch in loader:
            state["skipped"].extend(list(s) for s in batch.get("skipped", []))
            batch = to_device(batch, accelerator.device)
            size = task.batch_size(batch)
            task.diagnose = (state["step"] + 1) % t.log_every == 0 or state["step"] + 1 == total_steps
            loss = train_step(accelerator, model, optimizer, task, batch, t.max_grad_norm, stand_in, group)
            state["batches_in_epoch"] += 1
            if loss is None:
                state["skipped_steps"] += 1
                continue
            stepped = True
            window_samples += size * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue
            scheduler.step()
            state["step"] += 1
            state["samples"] += window_samples
            bar.update(1)
            if state["step"] % t.log_every == 0 or state["step"] == total_steps:
                elapsed = time.perf_counter() - window_start
                record = {
                    "step": state["step"],
                    "epoch": state["epoch"],
                    "loss": loss.item(),
                    "lr": scheduler.get_last_lr()[0],
                    "samples_per_s": window_samples / max(elapsed, 1e-9),
                }
                last_stats = {k: float(v) for k, v in task.diagnostics().items()}
                record.update(last_stats)
                bar.set_postfix(loss=f"{record['loss']:.4f}", samples_s=f"{record['samples_per_s']:.1f}")
                accelerator.log(record, step=state["step"])
                log.write(record)
                window_start, window_samples = time.perf_counter(), 0
            at_end = state["step"] >= total_steps
            if (t.eval_every and state["step"] % t.eval_every == 0) or at_end:
                last_result = validate()
            if (t.save_every and state["step"] % t.save_every == 0) or at_end:
                checkpoint_now(score(last_result))
            if at_end:
                break
        else:  # the epoch ran out
            if whole_epoch and not stepped:  # every process agrees: steps are skipped together
                raise ValueError(
                    f"none of the {len(train_set)} training items could be read in a whole epoch: check the dataset's "
                    "image paths"
                )
            state["epoch"] += 1
            state["batches_in_epoch"] = 0
            if not t.eval_every:
                last_result = validate()
            if not t.save_every and state["step"] < total_steps:
                checkpoint_now(score(last_result))
    bar.close()
    warning = task.health_warning(last_stats)  # e.g. a gate may close for a while and re-open: judged at the end
    if warning:
        say(f"warning: {warning}")
    export = out / "final"
    best = out / Path(state["best_checkpoint"]).name if state["best_checkpoint"] else None  # by name: the run may move
    best = best if best is not None and best.is_dir() else None
    state["skipped"] = merge_skipped(accelerator, state["skipped"])
    if main:
        if state["skipped_steps"]:
            say(
                f"{state['skipped_steps']} micro-batches were skipped on every process: no process's share of "
                "them held a readable image"
            )
        if state["skipped"]:
            say(f"{describe_skipped(state['skipped'])} were skipped, listed in {out / 'skipped.json'}")
            write_json(out / "skipped.json", state["skipped"], indent=1)
        export_atomically(task, unwrapped, export, last_result)
        if best is not None:  # the model holds the best weights from here on
            export_checkpoint(task, unwrapped, best, out / "best")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return {
        "step": state["step"],
        "export": str(export),
        "best_export": str(out / "best") if best else None,
        "val": last_result.result if last_result else None,
        "val_score": score(last_result),
        "best_checkpoint": state["best_checkpoint"],
        "skipped": len(state["skipped"]),
        "skipped_steps": state["skipped_steps"],
        "checkpoints": [str(p) for p in list_checkpoints(out)],
    }


def _num_workers(config: Any) -> int:
    return int(getattr(getattr(config, "data", None), "num_workers", 0) or 0)
