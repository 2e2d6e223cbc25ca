"""Deterministic per-epoch data order and augmentation, so a resumed run sees what an
uninterrupted one would have seen."""

from __future__ import annotations

import hashlib
import random
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset


def epoch_permutation(num_items: int, seed: int, epoch: int) -> list[int]:
    """The shuffled item order of one epoch: a function of (seed, epoch) only."""
    generator = torch.Generator().manual_seed(_mix(seed, epoch))
    return torch.randperm(num_items, generator=generator).tolist()


def _mix(*values: int) -> int:
    digest = hashlib.blake2b(repr(values).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class EpochOrder(Dataset):
    """``dataset`` in the shuffled order of ``epoch``; each item's random draws (augmentation)
    come from generators seeded by (seed, epoch, item), not from the process's RNG: torch's,
    and python's ``random`` and numpy's global ones (timm's transforms draw from those), all
    restored afterwards.

    That makes an item independent of which worker loads it and of what was loaded before,
    which is what an exact resume in the middle of an epoch needs.
    """

    def __init__(self, dataset: Dataset, seed: int, epoch: int, shuffle: bool = True) -> None:
        self.dataset = dataset
        self.seed = seed
        self.epoch = epoch
        n = len(dataset)  # type: ignore[arg-type]
        self.order = epoch_permutation(n, seed, epoch) if shuffle else list(range(n))

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, position: int) -> Any:
        index = self.order[position]
        item_seed = _mix(self.seed, self.epoch, index)
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(item_seed)
                random.seed(item_seed)
                np.random.seed(item_seed & (2**32 - 1))
                return self.dataset[index]
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
