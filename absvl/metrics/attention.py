"""How much of an attention map falls on the objects a question is about."""
from __future__ import annotations

import numpy as np


def target_attention_ratio(attention: np.ndarray, target: np.ndarray) -> float:
    """Share of the map's mass on the target divided by the target's area share.

    ``attention`` is a non-negative ``h×w`` map (e.g. token norms), ``target`` a boolean
    ``H×W`` mask whose sides are multiples of ``h`` and ``w``; each map cell is weighted by
    the fraction of its pixels inside the target. 1.0 means no preference for the target,
    above 1 attention concentrated on it. NaN when the target is empty.
    """
    attention = np.asarray(attention, dtype=np.float64)
    target = np.asarray(target, dtype=bool)
    h, w = attention.shape
    H, W = target.shape
    if H % h or W % w:
        raise ValueError(f"mask {H}x{W} is not a whole multiple of the map {h}x{w}")
    if (attention < 0).any():
        raise ValueError("attention map must be non-negative")
    cover = target.reshape(h, H // h, w, W // w).mean(axis=(1, 3))
    area_share = cover.mean()
    if area_share == 0:
        return float("nan")
    total = attention.sum()
    mass_share = (attention * cover).sum() / total if total > 0 else area_share
    return float(mass_share / area_share)
