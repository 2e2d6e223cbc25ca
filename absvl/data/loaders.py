"""Data loaders that leave the run's random stream alone, and each process's share of an evaluation set."""

from __future__ import annotations

from typing import Any

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, Subset


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


def process_share(n: int, accelerator: Accelerator) -> range:
    """This process's contiguous part of ``range(n)`` for evaluation (no padding, no item twice;
    ``gather_object`` then concatenates the parts in rank order)."""
    per = -(-n // accelerator.num_processes)
    start = min(n, accelerator.process_index * per)
    return range(start, min(n, start + per))


def eval_loader(dataset: Any, collator: Any, batch_size: int, num_workers: int, accelerator: Accelerator) -> DataLoader:
    """A loader over this process's share of ``dataset`` (see ``process_share``): processes may
    then skip different numbers of unreadable items, as no collective runs per batch."""
    share = Subset(dataset, process_share(len(dataset), accelerator))
    return make_loader(share, collator, batch_size, num_workers)


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Tensors of ``batch`` on ``device`` (non-blocking: the loader pins memory on CUDA machines)."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
