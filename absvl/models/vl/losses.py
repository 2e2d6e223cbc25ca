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


def text_groups(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``[B]`` int64 ids that are equal exactly for rows holding the same tokenised text: a position-weighted
    hash of the unpadded tokens (Knuth's multiplicative constants), the same on every process so that gathered
    rows compare; two different texts of a batch collide with probability ~2^-31."""
    positions = torch.arange(input_ids.shape[1], device=input_ids.device, dtype=torch.int64)
    coefficients = (positions * 2654435761 + 40503) % (2**31 - 1) + 1
    tokens = (input_ids.long() + 1) * attention_mask.long()  # padding counts as 0, a token as its id + 1
    return (tokens * coefficients).sum(dim=1) % (2**31 - 1)


def contrastive_loss(
    text: torch.Tensor,
    image: torch.Tensor,
    logit_scale: torch.Tensor,
    valid: torch.Tensor | None = None,
    groups: torch.Tensor | None = None,
) -> torch.Tensor:
    """Symmetric InfoNCE between matching rows of ``text`` (ξ) and ``image`` (AbSViT Eq. 15, CLIP).

    ``logits = s · t̂ îᵀ`` over the batch gathered from all processes; the loss is the mean of the
    text→image and image→text cross-entropies. Rows are normalised here. ``valid`` (``[B]`` bool)
    drops rows that are not matching pairs (ITM negatives, a question whose answer says its object is
    absent). ``groups`` (``[B]`` int, e.g. :func:`text_groups`) makes the rows of one group one
    positive class (multi-positive InfoNCE): a text's positives are the images of every row with the
    same text, whose pairs would otherwise push each other apart as negatives; each direction's term is
    ``-log Σ_positives softmax``. Without ``groups`` the positives are the diagonal (CLIP).
    Computed in fp32, autocast or not: at a logit scale up to 100 a bf16 matmul's rounding error
    (≈ 0.4 on a logit) would change the loss.
    """
    with torch.autocast(text.device.type, enabled=False):
        return _contrastive_loss(text.float(), image.float(), logit_scale.float(), valid, groups)


def _contrastive_loss(
    text: torch.Tensor,
    image: torch.Tensor,
    logit_scale: torch.Tensor,
    valid: torch.Tensor | None,
    groups: torch.Tensor | None,
) -> torch.Tensor:
    text, image = F.normalize(text, dim=-1), F.normalize(image, dim=-1)
    text, image = gather_with_grad(text), gather_with_grad(image)
    logits = logit_scale * text @ image.t()
    n = logits.shape[0]
    diagonal = torch.eye(n, dtype=torch.bool, device=logits.device)
    if valid is None and groups is None:
        targets = torch.arange(n, device=logits.device)
        return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)) / 2
    # Masks, not boolean indexing (a data-dependent shape: a GPU sync and a torch.compile graph
    # break): a row that is not a matching pair is nobody's negative (-inf) and its own terms weigh 0
    # (its diagonal stays a finite positive so that the terms are too).
    valid = torch.ones(n, dtype=torch.bool, device=logits.device) if valid is None else gather_with_grad(valid.long())
    valid = valid.bool()
    pairs = valid[:, None] & valid[None, :]
    positive = diagonal
    if groups is not None:
        groups = gather_with_grad(groups.long())
        positive = (groups[:, None] == groups[None, :]) & pairs | diagonal
    logits = logits.masked_fill(~pairs & ~diagonal, float("-inf"))
    on_positives = logits.masked_fill(~positive, float("-inf"))
    terms = (logits.logsumexp(1) - on_positives.logsumexp(1)) + (logits.logsumexp(0) - on_positives.logsumexp(0))
    return (terms * valid).sum() / (2 * valid.sum().clamp(min=1))


def object_prior_loss(
    text: torch.Tensor,
    tokens: torch.Tensor,
    patch_objects: torch.Tensor,
    target_objects: torch.Tensor,
    scale: float = 5.0,
) -> torch.Tensor:
    """The prior loss's object-level term: ξ against the tokens of its own image, in the gate's space.

    Each spatial token of ``tokens`` ``[B, P, C]`` is a positive when the object that owns it
    (``patch_objects`` ``[B, P]``, 0 = background, negative = nobody) is one of the question's objects
    (``target_objects`` ``[B, K]``, bool by label), a negative otherwise (the image's other objects and its
    background); the term is a sigmoid cross-entropy on ``scale · cos(ξ, z_i)`` without a bias (SigLIP's
    form), its positive and negative tokens weighted equally, averaged over the rows. Without a bias the
    boundary is at cos = 0, the clamp of the prior gate ``clamp(cos(ξ, z_i), 0, 1)`` (Eq. 8): the gate learns
    to open on the asked-about objects and stay shut elsewhere, including everywhere for a question whose
    object is absent. The scale is fixed and moderate: a token's term is small only when |cos| is large
    (0.07 at |cos| = 0.5 for scale 5), so the gate opens wide; at the contrastive head's learned scale
    (~14) the term was as low with the gate at 0.1-0.2 on its targets, too little for α·gate to steer. A batch's other images rarely tell shape words apart (each shape is in most scenes); the other
    objects of the same image do. In fp32, as ``contrastive_loss``.
    """
    with torch.autocast(text.device.type, enabled=False):
        cos = F.normalize(tokens.float(), dim=-1) @ F.normalize(text.float(), dim=-1).unsqueeze(-1)
        logits = scale * cos.squeeze(-1)  # [B, P]
        return _balanced_sigmoid_loss(logits, patch_objects, target_objects)


def topdown_object_loss(
    change: torch.Tensor, patch_objects: torch.Tensor, target_objects: torch.Tensor
) -> torch.Tensor:
    """Where the top-down pass acts: ``change`` ``[B, P]`` (≥ 0, how much the second pass moved each spatial token the
    fusion reads, e.g. ``‖n(z_td) − n(z_bu)‖²``) should sit on the question's objects. The term is the negative log
    of the change's share on their cells, per row; rows whose question has no visible object (e.g. its answer says
    the object is absent) count 0, and a mean over all rows lets shards of a batch average to the whole batch's.
    Scale-free: shrinking the change everywhere does not lower it. In fp32."""
    with torch.autocast(change.device.type, enabled=False):
        positive, labelled = _on_targets(patch_objects, target_objects)
        change = change.float() * labelled
        share = (change * positive).sum(1) / change.sum(1).clamp(min=1e-12)
        return (-share.clamp(min=1e-6).log() * positive.any(1)).mean()


def _on_targets(patch_objects: torch.Tensor, target_objects: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, P]`` bool each: the cells an object of the question owns, and the labelled cells (owner ≥ 0)."""
    labelled = patch_objects >= 0
    labels = target_objects.shape[1]
    return target_objects.gather(1, patch_objects.long().clamp(0, labels - 1)) & labelled, labelled


def _balanced_sigmoid_loss(
    logits: torch.Tensor, patch_objects: torch.Tensor, target_objects: torch.Tensor
) -> torch.Tensor:
    """Sigmoid cross-entropy of ``logits`` ``[B, P]`` against "the cell is on one of the question's objects", its
    positive and negative cells weighted equally in each row, averaged over the rows."""
    positive, labelled = _on_targets(patch_objects, target_objects)
    negative = ~positive & labelled
    on_positives = (F.softplus(-logits) * positive).sum(1) / positive.sum(1).clamp(min=1)
    on_negatives = (F.softplus(logits) * negative).sum(1) / negative.sum(1).clamp(min=1)
    rows = positive.any(1).float() + negative.any(1).float()
    return ((on_positives + on_negatives) / rows.clamp(min=1)).mean()


def pointer_loss(logits: torch.Tensor, patch_objects: torch.Tensor, pointer_objects: torch.Tensor) -> torch.Tensor:
    """Supervision of the object pointers' hops (``ObjectPointers``): each hop's attention ``softmax(logits)``
    (``[B, K, P]``) against the uniform distribution over the cells of its object (``pointer_objects`` ``[B, K]``,
    the object's label, 0 for none; ``patch_objects`` ``[B, P]`` each cell's owner): a cross-entropy, averaged over
    all ``B·K`` hops with those that have no object with a visible cell counting 0 (a mean per row, as the other
    losses: shards of one batch on several processes average to the whole batch's). In fp32."""
    with torch.autocast(logits.device.type, enabled=False):
        on_object = (patch_objects[:, None, :] == pointer_objects[..., None]) & (pointer_objects[..., None] > 0)
        target = on_object.float() / on_object.sum(-1, keepdim=True).clamp(min=1)
        return -(target * logits.float().log_softmax(-1)).sum(-1).mean()


def count_loss(
    membership: torch.Tensor, share: torch.Tensor, patch_objects: torch.Tensor, target_objects: torch.Tensor
) -> torch.Tensor:
    """Supervision of the count density (``ObjectCounter``): the membership logits ``[B, P]`` against the cells of
    the question's objects (``target_objects`` ``[B, K]``, bool by label; a balanced sigmoid cross-entropy, as
    ``object_prior_loss``; ``K`` covers every label of ``patch_objects``), plus, for every object of the image
    (``patch_objects`` ``[B, P]``, 0 background), the squared error of its cells' summed ``share`` to 1: each object
    counts once, whatever its size. Means per row, so that shards of a batch average to the whole batch's. In fp32."""
    with torch.autocast(membership.device.type, enabled=False):
        members = _balanced_sigmoid_loss(membership.float(), patch_objects, target_objects)
        labels = target_objects.shape[1]  # every label of the batch (``VQACollator``): no device sync for a max
        owners = F.one_hot(patch_objects.long().clamp(min=0), labels).float() * (patch_objects >= 0)[..., None]
        per_object = torch.einsum("bp,bpk->bk", share.float(), owners)[:, 1:]  # [B, objects]
        present = owners.sum(1)[:, 1:] > 0
        errors = ((per_object - 1) ** 2 * present).sum(1) / present.sum(1).clamp(min=1)
        return members + errors.mean()
