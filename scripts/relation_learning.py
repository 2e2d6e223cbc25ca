#!/usr/bin/env python
"""How fast does the fusion learn a spatial relation? (issue 20; docs/results/answering.md §9)

A fresh fusion encoder and VQA head (the export's sizes, 2-D positions on the image tokens) and the export's text
encoder are trained on a Shapes world's "is the A <relation> the B?" questions, reading the export's first-pass
tokens (cached: the backbone is frozen), with the question's two objects marked on them (A's cells +m, B's −m, m
learned): what the fusion would get from a top-down pass that selected both objects and told them apart. Arms:

- ``one``: the questions of one relation ("left of"): the sign of the objects' offset answers them;
- ``all``: the four relations: the answer is the product of the relation word and that sign;
- ``mlp``: no fusion, a two-layer MLP on the marked objects' centroids and the relation as a one-hot (lr 3e-3);
- ``pointers``: the four relations, no marks: the fusion and the VQA head with its object pointers
  (``model.vqa_pointers``, ``absvl.models.vl.pointers``), the hops supervised as in training
  (``pointer_loss``: hop 1 on B, hop 2 on A).

Prints the validation VQA accuracy (yes/no, the human answers) every ``--eval-every`` steps, per arm.

    python scripts/relation_learning.py --model runs/shapes_prior/final      # after `make demo`
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from transformers import get_scheduler

from absvl.data.answers import soft_targets
from absvl.data.patch_labels import patch_targets
from absvl.data.shapes_scene import RELATIONS
from absvl.data.shapes_text import question_family
from absvl.data.shapes_world import ShapesWorld
from absvl.io import read_json
from absvl.metrics.vqa import question_accuracy
from absvl.models.vl import load_model
from absvl.models.vl.fusion import FusionEncoder
from absvl.models.vl.heads import VQAHead
from absvl.models.vl.losses import pointer_loss, vqa_loss
from absvl.models.vl.modeling import init_new_weights
from absvl.models.vl.pointers import ObjectPointers

ANSWERS = ("yes", "no")
ARMS = ("one", "all", "mlp", "pointers")


def relation_questions(world: Any, split: str) -> list[dict[str, Any]]:
    """The split's "is the A <relation> the B?" questions, each with its relation and human answers."""
    annotations = {a["question_id"]: a for a in read_json(world.annotations_path(split))["annotations"]}
    out = []
    for q in read_json(world.questions_path(split))["questions"]:
        if question_family(q["question"]) != "rel_yn":
            continue
        relation = next(r for r in RELATIONS if f" {r} the " in q["question"])
        answers = [a["answer"] for a in annotations[q["question_id"]]["answers"]]
        out.append(dict(q, relation=relation, answers=answers))
    return out


def object_marks(world: Any, split: str, question: dict[str, Any], grid: tuple[int, int]) -> torch.Tensor:
    """``[h·w]``: +1 on the cells of the question's first object (A), −1 on its second's (B), 0 elsewhere."""
    labels = np.asarray(Image.open(world.mask_path(split, question["image_id"])))
    cells = patch_targets(labels, labels.shape[0] // grid[0], int(labels.max()) + 1)
    a, b = (int(i) + 1 for i in question["target_objects"])
    return torch.tensor((cells == a).astype(np.float32) - (cells == b).astype(np.float32))


def centroids(marks: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``[N, 4]``: the (x, y) centres of the +1 and of the −1 cells in [-1, 1] (0 for an object with no cell)."""
    ys, xs = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    coords = torch.stack([xs.flatten() / (grid[1] - 1), ys.flatten() / (grid[0] - 1)], 1).float() * 2 - 1
    out = []
    for sign in (1.0, -1.0):
        w = (marks == sign).float()
        out.append(w @ coords / w.sum(1, keepdim=True).clamp(min=1))
    return torch.cat(out, 1)


def image_tokens(model: Any, world: Any, split: str, image_ids: set[int]) -> dict[int, torch.Tensor]:
    """The tokens the fusion reads from the first pass (``fusion_image_tokens(..., "bottom_up")``) per image."""
    ids = sorted(image_ids)
    out = {}
    with torch.no_grad():
        for start in range(0, len(ids), 128):
            chunk = ids[start : start + 128]
            images = model.prepare_inputs(images=[Image.open(world.image_path(split, i)) for i in chunk])["images"]
            tokens = model.fusion_image_tokens(model.first_pass(images), "bottom_up")
            out.update(zip(chunk, tokens))
    return out


class MarkedFusion(nn.Module):
    """The export's text encoder, a fresh fusion encoder and VQA head over ``ANSWERS``; the marks enter the image
    tokens as ``marks · m``."""

    def __init__(self, model: Any, prefix: int) -> None:
        super().__init__()
        c = model.config
        self.text_encoder = copy.deepcopy(model.text_encoder)
        width = model.backbone.num_features
        self.fusion = FusionEncoder(
            self.text_encoder.config.hidden_size, width, c.fusion_hidden_size, c.fusion_layers, c.fusion_heads,
            c.fusion_mlp_ratio, 0.0, c.fusion_norm_eps, image_mean_after=prefix, image_positions=True,
        )  # fmt: skip
        self.head = VQAHead(2 * c.fusion_hidden_size, len(ANSWERS))
        self.fusion.apply(init_new_weights)
        self.head.apply(init_new_weights)
        self.mark = nn.Parameter(0.5 * torch.randn(width))
        self.prefix = prefix

    def forward(self, tokens, marks, input_ids, attention_mask, grid):
        marks = torch.cat([marks.new_zeros(len(marks), self.prefix), marks], 1)
        text = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.head(self.fusion(text, attention_mask, tokens + marks[..., None] * self.mark, grid)[2])


class PointerFusion(MarkedFusion):
    """:class:`MarkedFusion` without the marks, its VQA head reading the object pointers (``ObjectPointers``)."""

    def __init__(self, model: Any, prefix: int) -> None:
        super().__init__(model, prefix)
        hidden = model.config.fusion_hidden_size
        self.head = VQAHead(2 * hidden, len(ANSWERS), ObjectPointers(hidden))
        self.head.apply(init_new_weights)

    def forward(self, tokens, marks, input_ids, attention_mask, grid):
        text = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        text_tokens, image_tokens, pooled = self.fusion(text, attention_mask, tokens, grid)
        hidden = pooled.shape[1] // 2
        hops = self.head.pointers(text_tokens, attention_mask, image_tokens[:, self.prefix :], grid, pooled[:, :hidden])
        return self.head(pooled, hops), hops.logits


def train_arm(arm: str, data: dict[str, Any], model: Any, args: argparse.Namespace) -> list[dict[str, float]]:
    """Train one arm; returns ``[{"step", "accuracy"}]`` at every evaluation."""
    torch.manual_seed(args.seed)
    relations = RELATIONS[:1] if arm == "one" else RELATIONS
    pointer_logits = None
    train, val = (data[s]["questions"] for s in ("train", "val"))
    train = [i for i, q in enumerate(train) if q["relation"] in relations]
    val = [i for i, q in enumerate(val) if q["relation"] in relations]
    if not train or not val:
        raise SystemExit(f"arm {arm}: the world has no {' / '.join(relations)} questions in its train or val questions")
    index = {a: i for i, a in enumerate(ANSWERS)}

    if arm == "mlp":
        net = nn.Sequential(nn.Linear(4 + 4, 64), nn.GELU(), nn.Linear(64, len(ANSWERS)))
        lr = 3e-3
    else:
        net = (PointerFusion if arm == "pointers" else MarkedFusion)(model, data["prefix"])
        lr = args.lr

    def logits(split: str, rows: list[int]) -> torch.Tensor:
        d = data[split]
        if arm == "mlp":
            onehot = torch.nn.functional.one_hot(d["relation"][rows], 4).float()
            return net(torch.cat([d["centroids"][rows], onehot], 1))
        nonlocal pointer_logits
        enc = model.tokenizer([d["questions"][i]["question"] for i in rows], padding="longest", return_tensors="pt")
        tokens = torch.stack([d["tokens"][d["questions"][i]["image_id"]] for i in rows])
        out = net(tokens, d["marks"][rows], enc["input_ids"], enc["attention_mask"], data["grid"])
        if arm == "pointers":
            out, pointer_logits = out
        return out

    def evaluate() -> float:
        net.eval()
        with torch.no_grad():
            predictions = torch.cat([logits("val", val[s : s + 256]).argmax(1) for s in range(0, len(val), 256)])
        net.train()
        questions = data["val"]["questions"]
        scores = [question_accuracy(ANSWERS[p], questions[i]["answers"]) for i, p in zip(val, predictions.tolist())]
        return 100 * float(np.mean(scores))

    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    # the trainer's schedule: 5 % warmup, then linear decay
    schedule = get_scheduler("linear", optimizer, num_warmup_steps=args.steps // 20, num_training_steps=args.steps)
    generator = torch.Generator().manual_seed(args.seed)
    history = []
    for step in range(1, args.steps + 1):
        rows = [train[i] for i in torch.randint(len(train), (args.batch,), generator=generator).tolist()]
        targets = torch.zeros(len(rows), len(ANSWERS))
        for r, i in enumerate(rows):
            for k, score in soft_targets(data["train"]["questions"][i]["answers"], index).items():
                targets[r, k] = score
        loss = vqa_loss(logits("train", rows), targets)
        if arm == "pointers":  # the marks name the objects: A (+1) is label 1, B (−1) label 2; hop 1 on B, hop 2 on A
            owners = data["train"]["marks"][rows]
            owners = (owners > 0).long() + 2 * (owners < 0).long()
            loss = loss + pointer_loss(pointer_logits, owners, torch.tensor([[2, 1]]).expand(len(rows), 2))
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % args.eval_every == 0 or step == args.steps:
            history.append({"step": step, "accuracy": round(evaluate(), 2)})
            print(f"{arm:>4}  step {step:>5}  val VQA accuracy {history[-1]['accuracy']:6.2f}", flush=True)
    return history


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model", default="runs/shapes_prior/final", help="an absvl export: its backbone, text encoder, sizes"
    )
    p.add_argument("--root", default="data/shapes", help="the Shapes world")
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-4, help="the fusion arms' (the demo's VQA rate)")
    p.add_argument("--val-questions", type=int, default=1000)
    p.add_argument("--val-split", default="val2014", help="the world's split the arms are scored on")
    p.add_argument("--train-questions", type=int, default=None, help="at most this many (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="write the results as JSON")
    args = p.parse_args(argv)
    arms = [a for a in args.arms.split(",") if a]
    if not arms or set(arms) - set(ARMS):
        p.error(f"--arms: a comma-separated subset of {','.join(ARMS)}")

    model = load_model(args.model).eval()
    world = ShapesWorld.load(args.root)
    with torch.no_grad():
        probe = model.first_pass(torch.zeros(1, 3, model.image_size, model.image_size))
    data: dict[str, Any] = {"grid": tuple(probe.grid_size), "prefix": probe.num_prefix_tokens}
    for name, split, limit in (
        ("train", "train2014", args.train_questions),
        ("val", args.val_split, args.val_questions),
    ):
        questions = relation_questions(world, split)[:limit]
        tokens = image_tokens(model, world, split, {q["image_id"] for q in questions})
        marks = torch.stack([object_marks(world, split, q, data["grid"]) for q in questions])
        data[name] = {
            "questions": questions,
            "tokens": tokens,
            "marks": marks,
            "centroids": centroids(marks, data["grid"]),
            "relation": torch.tensor([RELATIONS.index(q["relation"]) for q in questions]),
        }
        print(f"{name}: {len(questions)} relation questions on {len(tokens)} images")
    results = {
        "model": args.model,
        "steps": args.steps,
        "arms": {arm: train_arm(arm, data, model, args) for arm in arms},
    }
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
