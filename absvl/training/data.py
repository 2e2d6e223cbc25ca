"""Deterministic per-epoch data order and augmentation, so a resumed run sees what an
uninterrupted one would have seen."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset


def epoch_permutation(num_items: int, seed: int, epoch: int) -> list[int]:
    """The shuffled item order of one epoch: a function of (seed, epoch) only."""
    generator = torch.Generator().manual_seed(_mix(seed, epoch))
    return torch.randperm(num_items, generator=generator).tolist()


def grouped_permutation(keys: Sequence[Hashable], group_size: int, seed: int, epoch: int) -> list[int]:
    """:func:`epoch_permutation` with the items of one key (the questions of one image) placed together in
    runs of up to ``group_size``, the runs in the order of their first item in the permutation (a shuffled
    order): a function of (keys, group_size, seed, epoch) only. Every item appears once."""
    runs: list[list[int]] = []
    open_run: dict[Hashable, list[int]] = {}
    for index in epoch_permutation(len(keys), seed, epoch):
        run = open_run.get(keys[index])
        if run is None or len(run) == group_size:
            run = open_run[keys[index]] = []
            runs.append(run)
        run.append(index)
    return [index for run in runs for index in run]


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

    A dataset that declares ``group_keys`` (one per item) and ``group_size`` > 1 is shuffled by
    :func:`grouped_permutation`: ``VQADataset`` groups the questions of one image, whose batch then runs the
    image's first pass once for them all.
    """

    def __init__(self, dataset: Dataset, seed: int, epoch: int, shuffle: bool = True) -> None:
        self.dataset = dataset
        self.seed = seed
        self.epoch = epoch
        n = len(dataset)  # type: ignore[arg-type]
        group_size = getattr(dataset, "group_size", 1)
        if not shuffle:
            self.order = list(range(n))
        elif group_size > 1:
            self.order = grouped_permutation(dataset.group_keys, group_size, seed, epoch)  # type: ignore[attr-defined]
        else:
            self.order = epoch_permutation(n, seed, epoch)

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, position: int) -> Any:
        index = self.order[position]
        item_seed = _mix(self.seed, self.epoch, index)
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                # the CPU generator, which the transforms draw from and fork_rng restores (torch.manual_seed would
                # also reseed every GPU's, unrestored, at ~75 µs an item)
                torch.default_generator.manual_seed(item_seed)
                random.seed(item_seed)
                np.random.seed(item_seed & (2**32 - 1))
                return self.dataset[index]
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
