"""AdamW parameter groups by part of a model, each at its own learning-rate multiplier (SPEC §5)."""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

from torch import nn


def param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    group_of: Callable[[str], str],
    multipliers: dict[str, float],
    no_decay: Collection[str] = (),
) -> list[dict[str, Any]]:
    """One AdamW group per (part, decay) of ``model``'s trainable parameters: ``group_of(name)`` names the
    part (it raises for a parameter that belongs to none), whose learning rate is ``lr · multipliers[part]``.
    No weight decay on ≤ 1-D parameters (biases, norm weights, scales) and the names in ``no_decay``
    (embeddings). Each group carries ``name`` (``part/decay`` or ``part/no_decay``) and ``lr_scale`` for
    schedulers; groups come in the order their first parameter does."""
    buckets: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            decay = param.ndim > 1 and name not in no_decay
            buckets.setdefault((group_of(name), decay), []).append(param)
    return [
        {
            "name": f"{part}/{'decay' if decay else 'no_decay'}",
            "params": params,
            "lr": lr * multipliers[part],
            "lr_scale": multipliers[part],
            "weight_decay": weight_decay if decay else 0.0,
        }
        for (part, decay), params in buckets.items()
    ]
