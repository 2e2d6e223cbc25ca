"""The one training loop every task runs on (VQA finetuning, image classification).

``run_training(config, task)`` owns everything that is not about the task: Hugging Face
Accelerate (one process, ``accelerate launch`` or ``torchrun``; bf16/fp16), gradient accumulation,
clipping, AdamW with linear warmup + linear decay, the deterministic per-epoch data order
(``EpochOrder``), exact mid-epoch resume (``skip_first_batches``), atomic rotated checkpoints
with the best one kept, validation (every ``eval_every`` steps or at each epoch end, and at the
final step), the JSONL log, trackers, the progress bar, and unreadable images (skipped, counted
and listed in ``skipped.json``; a batch whose images were all unreadable takes a zero step).

A task is a small object (see ``Task``) that builds its data and model and says how to compute
the loss, how to validate and how to export.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm
from transformers import get_scheduler

from ..models.vision.topdown import shut_gate_warning
from ..runtime import cpu_only, keep_freed_memory
from .checkpoint import list_checkpoints, load_checkpoint, resolve_resume, rotate_checkpoints, save_checkpoint
from .config import TrainConfig, dump_config
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

    def setup(self, accelerator: Accelerator, output_dir: Path, checkpoint: Path | None) -> None: ...

    def param_groups(self) -> list[dict[str, Any]]:
        """AdamW parameter groups of ``model`` (every trainable parameter in exactly one)."""

    def describe(self) -> str:
        """One line on the data, printed before training ("training on ... images")."""

    def batch_size(self, batch: dict[str, Any]) -> int:
        """Number of samples in ``batch`` (0: every item was unreadable)."""

    def loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        """The training loss of a non-empty batch (``model`` is the prepared, wrapped model)."""

    def validate(self, model: torch.nn.Module, accelerator: Accelerator) -> Validation | None:
        """Validate the unwrapped ``model`` (all processes call it); None when there is no validation data."""

    def export(self, model: torch.nn.Module, out_dir: Path, last: Validation | None) -> None:
        """Save the unwrapped final ``model`` into ``out_dir`` (main process only)."""

    def diagnostics(self) -> dict[str, torch.Tensor]:
        """Scalars about the last training batch's forward, logged with the loss (e.g. the
        top-down path's ``topdown_health``); ``{}`` for none. Called at log steps only: tasks keep
        the last forward's outputs and compute here, not on every step."""


def make_loader(dataset: Any, collator: Any, batch_size: int, num_workers: int) -> DataLoader:
    """A loader that never draws from the process's RNG (its own generator seeds the workers),
    so creating one, e.g. for validation or on resume, leaves dropout's random stream alone."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,  # the order is EpochOrder's
        num_workers=num_workers,
        collate_fn=collator,
        generator=torch.Generator().manual_seed(0),
        pin_memory=torch.cuda.is_available(),  # page-locked batches: asynchronous copies to the GPU
        persistent_workers=num_workers > 0,
    )


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Tensors of ``batch`` on ``device`` (non-blocking: the loader pins memory on CUDA machines)."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def train_step(
    accelerator: Accelerator, model: torch.nn.Module, optimizer: torch.optim.Optimizer, task: Task,
    batch: dict[str, Any], max_grad_norm: float,
) -> torch.Tensor:
    """One micro-step: loss, backward, clipping and the optimizer step when gradients sync.

    A batch whose every image was unreadable takes a zero step, which keeps processes in step.
    """
    with accelerator.accumulate(model):
        if task.batch_size(batch):
            loss = task.loss(model, batch)
        else:
            loss = sum(p.sum() for p in model.parameters()) * 0.0
        accelerator.backward(loss)
        if accelerator.sync_gradients and max_grad_norm > 0:
            accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
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


class JsonLog:
    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def run_training(config: Any, task: Task) -> dict[str, Any]:
    """Train ``task`` as ``config.train`` says; returns a summary (final step, best/last
    validation result, export folder, checkpoints, number of skipped items).

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
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(dump_config(config))
    set_seed(t.seed)
    checkpoint = resolve_resume(t.resume, out)
    task.setup(accelerator, out, checkpoint)
    train_set, collator = task.train_set, task.collator
    optimizer = torch.optim.AdamW(task.param_groups(), lr=t.lr, betas=tuple(t.betas), eps=t.eps,
                                  fused=accelerator.device.type == "cuda")
    model, optimizer = accelerator.prepare(task.model, optimizer)
    unwrapped = accelerator.unwrap_model(model)

    micro_batches = math.ceil(len(train_set) / (t.batch_size * accelerator.num_processes))
    steps_per_epoch = math.ceil(micro_batches / t.grad_accum)
    total_steps = t.max_steps or t.epochs * steps_per_epoch
    scheduler = get_scheduler(
        "linear", optimizer, num_warmup_steps=int(t.warmup_ratio * total_steps), num_training_steps=total_steps
    )
    state: dict[str, Any] = {
        "step": 0, "epoch": 0, "batches_in_epoch": 0, "best_checkpoint": None, "best_accuracy": None,
        "skipped": [], "samples": 0,
    }
    if checkpoint is not None:
        state = load_checkpoint(accelerator, checkpoint, model, optimizer, scheduler)
        accelerator.print(f"resumed from {checkpoint} at step {state['step']}")
    if t.trackers:
        accelerator.init_trackers("absvl", config=flatten_config(config.to_dict()))
    log = JsonLog(out / "log.jsonl", main)
    accelerator.print(
        f"{task.describe()}; {total_steps} steps of {t.batch_size * accelerator.num_processes * t.grad_accum} samples"
    )

    def validate() -> Validation | None:
        result = task.validate(unwrapped, accelerator)
        if result is not None:
            record = {"step": state["step"], **result.metrics}
            accelerator.log(record, step=state["step"])
            log.write(record)
        return result

    def checkpoint_now(score: float | None) -> None:
        # "best_accuracy" keeps its name (checkpoints written before the loop was shared use it)
        if score is not None and (state["best_accuracy"] is None or score > state["best_accuracy"]):
            state["best_accuracy"] = score
            state["best_checkpoint"] = str(out / f"checkpoint-{state['step']:08d}")
        save_checkpoint(accelerator, out, state["step"], model, optimizer, scheduler, state)
        if main:
            rotate_checkpoints(out, t.keep_last, state["best_checkpoint"])

    def score(result: Validation | None) -> float | None:
        return result.score if result is not None else None

    bar = tqdm(total=total_steps, initial=state["step"], desc="train", unit="step", disable=not main, dynamic_ncols=True)
    window_start, window_samples, last_result = time.perf_counter(), 0, None
    last_stats: dict[str, float] = {}  # the last logged diagnostics (the gate's health)
    model.train()
    while state["step"] < total_steps:
        epoch_set = EpochOrder(train_set, t.seed, state["epoch"])
        loader = accelerator.prepare_data_loader(make_loader(epoch_set, collator, t.batch_size, _num_workers(config)))
        whole_epoch, epoch_samples = state["batches_in_epoch"] == 0, 0
        if state["batches_in_epoch"]:
            loader = accelerator.skip_first_batches(loader, state["batches_in_epoch"])
        for batch in loader:
            state["skipped"].extend(list(s) for s in batch.get("skipped", []))
            batch = to_device(batch, accelerator.device)
            size = task.batch_size(batch)
            epoch_samples += size
            loss = train_step(accelerator, model, optimizer, task, batch, t.max_grad_norm)
            state["batches_in_epoch"] += 1
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
                    "step": state["step"], "epoch": state["epoch"], "loss": loss.item(),
                    "lr": scheduler.get_last_lr()[0], "samples_per_s": window_samples / max(elapsed, 1e-9),
                }
                if task.batch_size(batch):  # a zero step ran no forward: nothing new to report
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
            if whole_epoch and _sum_over_processes(accelerator, epoch_samples) == 0:
                raise ValueError(f"every item of epoch {state['epoch']} was unreadable, e.g. "
                                 f"{state['skipped'][:2]}: check the dataset's image paths")
            state["epoch"] += 1
            state["batches_in_epoch"] = 0
            if not t.eval_every:
                last_result = validate()
            if not t.save_every and state["step"] < total_steps:
                checkpoint_now(score(last_result))
    bar.close()
    shut = shut_gate_warning(last_stats)  # the gate may close for a while and re-open: judged at the end
    if shut:
        accelerator.print(f"warning: {shut}")
    export = out / "final"
    if main:
        if state["skipped"]:
            accelerator.print(f"{len(state['skipped'])} items were skipped (unreadable images), listed in {out / 'skipped.json'}")
            (out / "skipped.json").write_text(json.dumps(state["skipped"], indent=1) + "\n")
        task.export(unwrapped, export, last_result)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return {
        "step": state["step"], "export": str(export), "val": last_result.result if last_result else None,
        "val_score": score(last_result), "best_checkpoint": state["best_checkpoint"],
        "skipped": len(state["skipped"]), "checkpoints": [str(p) for p in list_checkpoints(out)],
    }


def _sum_over_processes(accelerator: Accelerator, value: int) -> int:
    return int(accelerator.reduce(torch.tensor(value, device=accelerator.device), "sum").item())


def _num_workers(config: Any) -> int:
    return int(getattr(getattr(config, "data", None), "num_workers", 0) or 0)
