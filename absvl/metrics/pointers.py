"""Where do the VQA head's object pointers land (``absvl.models.vl.pointers``), and what does its count density count
(``absvl.models.vl.counting``)? On a Shapes world, which knows each question's objects.

For each question that names an object, hop 1 should land on the last object it names (a relation's reference,
"the blue square" of "is the red circle left of the blue square?") and hop 2 on the first (the object related to
it; both on the object of a one-object question). A hop is on its object when the cell of its attention's peak is
one of the object's cells (``patch_objects``, the cell's owner as the training data labels it). The chance of that
is the share of the image's cells the object owns, printed beside it. For each "how many" question, the density's
sum rounded to a whole number should be the number of objects the world says match it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader

from ..data.shapes_text import FAMILY_TEMPLATES, question_family
from ..data.vqa_dataset import VQACollator, VQADataset
from ..data.vqa_examples import VQAExample
from ..images import image_transform

HOPS = ("hop 1", "hop 2")


def hop_hits(
    logits: torch.Tensor, patch_objects: torch.Tensor, pointer_objects: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per hop (``[B, 2]`` each): whether its object is named and has a cell, whether the peak of ``logits``
    (``[B, 2, cells]``) is on one of its cells, and the share of the cells it owns (the chance of a hit)."""
    on_object = patch_objects[:, None, :] == pointer_objects[..., None]  # [B, 2, cells]
    visible = (pointer_objects > 0) & on_object.any(-1)
    hit = on_object.gather(-1, logits.float().argmax(-1, keepdim=True)).squeeze(-1) & visible
    return visible, hit, on_object.float().mean(-1)


def _readouts(model: Any, world: Any, examples: list[VQAExample], batch_size: int) -> Iterator[tuple[dict, Any]]:
    """``(batch, output)`` of the VQA model in eval mode over ``examples``, each batch with its objects
    (``VQACollator``'s ``patch_objects``, ``pointer_objects``)."""
    was_training = model.training
    model.eval()
    dataset = VQADataset(
        examples,
        model.answers,
        image_transform(model.image_size, train=False),
        drop_unanswerable=False,
        object_masks=world.mask_of,
        grid=tuple(model.backbone.patch_embed.grid_size),
    )
    collator = VQACollator(model.tokenizer, len(model.answers), model.config.max_text_len)
    try:
        with torch.no_grad():
            for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=collator):
                if len(batch["question_ids"]):
                    yield (
                        batch,
                        model(
                            batch["images"],
                            batch["input_ids"],
                            batch["attention_mask"],
                            image_index=batch["image_index"],
                        ),
                    )
    finally:
        model.train(was_training)


def pointer_hits(model: Any, world: Any, examples: list[VQAExample], batch_size: int = 64) -> dict[str, dict]:
    """``{family: {"questions", "hop 1", "hop 2", "chance 1", "chance 2"}}`` in % (``"all"`` over every family), over
    the ``examples`` that name an object whose cells are visible; {} for a model without pointers."""
    if getattr(model.vqa_head, "pointers", None) is None:
        return {}
    sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros(5))
    for batch, out in _readouts(model, world, examples, batch_size):
        visible, hit, share = hop_hits(out.pointer_logits, batch["patch_objects"], batch["pointer_objects"])
        for row, question in enumerate(batch["questions"]):
            if visible[row].all():
                family = FAMILY_TEMPLATES.get(question_family(question), "other")
                counts = torch.cat([torch.ones(1), hit[row].float(), share[row]])
                sums[family] += counts
                sums["all"] += counts
    return {
        family: {
            "questions": int(s[0]),
            **{hop: round(100 * float(s[1 + k] / s[0]), 2) for k, hop in enumerate(HOPS)},
            **{f"chance {k + 1}": round(100 * float(s[3 + k] / s[0]), 2) for k in range(2)},
        }
        for family, s in sums.items()
    }


def count_hits(model: Any, world: Any, examples: list[VQAExample], batch_size: int = 64) -> dict[str, dict]:
    """``{n: {"questions", "exact", "mean error"}}`` over the "how many" ``examples``, by the number ``n`` of objects
    the world says match (``"all"`` over every n): the share (%) whose density sum rounds to ``n`` and the mean
    absolute difference; {} for a model without a count density."""
    if getattr(model.vqa_head, "counter", None) is None:
        return {}
    counting = [ex for ex in examples if question_family(ex.question) == "count" and ex.target_objects is not None]
    sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros(3))
    for batch, out in _readouts(model, world, counting, batch_size):
        counted = out.count_density.float().sum(-1)
        numbers = batch["target_objects"].sum(-1).float()
        for n, c in zip(numbers.tolist(), counted.tolist()):
            row = torch.tensor([1.0, float(round(c) == n), abs(c - n)])
            sums[str(int(n))] += row
            sums["all"] += row
    return {
        n: {
            "questions": int(s[0]),
            "exact": round(100 * float(s[1] / s[0]), 2),
            "mean error": round(float(s[2] / s[0]), 3),
        }
        for n, s in sorted(sums.items(), key=lambda kv: (kv[0] == "all", kv[0]))
    }


def format_pointer_table(hits: dict[str, dict]) -> str:
    """The families' rows (``"all"`` last): questions, each hop's hits and its chance."""
    lines = [f"{'question family':<52}{'questions':>10}{'hop 1':>8}{'chance':>8}{'hop 2':>8}{'chance':>8}"]
    for family in sorted(hits, key=lambda f: f == "all"):
        h = hits[family]
        lines.append(
            f"{family:<52}{h['questions']:>10}{h['hop 1']:>8.1f}{h['chance 1']:>8.1f}{h['hop 2']:>8.1f}{h['chance 2']:>8.1f}"
        )
    return "\n".join(lines)


def format_count_table(hits: dict[str, dict]) -> str:
    """One row per number of objects (``"all"`` last): questions, the density's exact share and mean error."""
    lines = [f"{'objects that match':<20}{'questions':>10}{'exact %':>10}{'mean |error|':>14}"]
    for n, h in hits.items():
        lines.append(f"{n:<20}{h['questions']:>10}{h['exact']:>10.1f}{h['mean error']:>14.3f}")
    return "\n".join(lines)
