"""Where do the VQA head's object pointers land? (``absvl.models.vl.pointers``), on a Shapes world.

For each question that names an object, hop 1 should land on the last object it names (a relation's reference,
"the blue square" of "is the red circle left of the blue square?") and hop 2 on the first (the object related to
it; both on the object of a one-object question). A hop is on its object when the cell of its attention's peak is
one of the object's cells (``patch_objects``, the cell's owner as the training data labels it). The chance of that
is the share of the image's cells the object owns, printed beside it.
"""

from __future__ import annotations

from collections import defaultdict
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


@torch.no_grad()
def pointer_hits(model: Any, world: Any, examples: list[VQAExample], batch_size: int = 64) -> dict[str, dict]:
    """``{family: {"questions", "hop 1", "hop 2", "chance 1", "chance 2"}}`` in % (``"all"`` over every family), over
    the ``examples`` that name an object whose cells are visible; {} for a model without pointers."""
    if getattr(model.vqa_head, "pointers", None) is None:
        return {}
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
    sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros(5))
    for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=collator):
        if len(batch["question_ids"]) == 0:
            continue
        out = model(batch["images"], batch["input_ids"], batch["attention_mask"], image_index=batch["image_index"])
        visible, hit, share = hop_hits(out.pointer_logits, batch["patch_objects"], batch["pointer_objects"])
        for row, question in enumerate(batch["questions"]):
            if visible[row].all():
                family = FAMILY_TEMPLATES.get(question_family(question), "other")
                counts = torch.cat([torch.ones(1), hit[row].float(), share[row]])
                sums[family] += counts
                sums["all"] += counts
    model.train(was_training)
    return {
        family: {
            "questions": int(s[0]),
            **{hop: round(100 * float(s[1 + k] / s[0]), 2) for k, hop in enumerate(HOPS)},
            **{f"chance {k + 1}": round(100 * float(s[3 + k] / s[0]), 2) for k in range(2)},
        }
        for family, s in sums.items()
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
