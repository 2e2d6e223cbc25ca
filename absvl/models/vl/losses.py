"""Losses: VQA soft-target BCE and the CLIP-style prior loss with cross-process negatives."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def vqa_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """BCE-with-logits on soft VQA scores, mean over batch and answers × #answers (METER/ViLT).

    In fp32 whatever the logits' dtype: soft targets such as 0.3 are not representable in bf16.
    """
    return F.binary_cross_entropy_with_logits(logits.float(), targets.float()) * targets.shape[1]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every process along dim 0; the local shard keeps its gradient.

    Without an initialised process group this is ``x``. Processes may hold different batch
    sizes (e.g. a last partial batch): sizes are exchanged first and shards padded for the
    collective. Every process then computes the same global loss, and its gradient reaches only
    the local shard; that gradient is multiplied by the world size because DDP *averages*
    parameter gradients over processes, while the global loss needs their *sum*. (Without the
    factor a W-process run trains the prior loss W times more slowly than one process with the
    same global batch.)
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    world, rank = dist.get_world_size(), dist.get_rank()
    size = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    sizes = [int(s) for s in sizes]
    padded = F.pad(x.detach(), (0, 0) * (x.dim() - 1) + (0, max(sizes) - x.shape[0]))
    shards = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(shards, padded.contiguous())
    shards = [s[:n] for s, n in zip(shards, sizes)]
    shards[rank] = x + (world - 1) * (x - x.detach())  # value x, gradient × world
    return torch.cat(shards)


def contrastive_loss(
    text: torch.Tensor, image: torch.Tensor, logit_scale: torch.Tensor, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Symmetric InfoNCE between matching rows of ``text`` (ξ) and ``image`` (AbSViT Eq. 15, CLIP).

    ``logits = s · t̂ îᵀ`` over the batch gathered from all processes; the loss is the mean of the
    text→image and image→text cross-entropies with the diagonal as targets. Rows are normalised
    here. ``valid`` (``[B]`` bool) drops rows that are not matching pairs (e.g. ITM negatives).
    Computed in fp32, autocast or not: at a logit scale up to 100 a bf16 matmul's rounding error
    (≈ 0.4 on a logit) would change the loss.
    """
    with torch.autocast(text.device.type, enabled=False):
        return _contrastive_loss(text.float(), image.float(), logit_scale.float(), valid)


def _contrastive_loss(
    text: torch.Tensor, image: torch.Tensor, logit_scale: torch.Tensor, valid: torch.Tensor | None
) -> torch.Tensor:
    text, image = F.normalize(text, dim=-1), F.normalize(image, dim=-1)
    text, image = gather_with_grad(text), gather_with_grad(image)
    logits = logit_scale * text @ image.t()
    targets = torch.arange(logits.shape[0], device=logits.device)
    if valid is None:
        return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)) / 2
    # Masks, not boolean indexing (a data-dependent shape: a GPU sync and a torch.compile graph
    # break): a non-matching row is nobody's negative (-inf) and its own term weighs 0 (its
    # diagonal stays finite so that the term is too).
    valid = gather_with_grad(valid.long()).bool()
    outside = ~(valid[:, None] & valid[None, :]) & ~torch.eye(len(valid), dtype=torch.bool, device=valid.device)
    logits = logits.masked_fill(outside, float("-inf"))
    terms = F.cross_entropy(logits, targets, reduction="none") + F.cross_entropy(logits.t(), targets, reduction="none")
    return (terms * valid).sum() / (2 * valid.sum().clamp(min=1))
