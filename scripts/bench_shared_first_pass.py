#!/usr/bin/env python
"""The questions of one image sharing its first pass (``data.image_group_size``), against one first pass per
question, in the same run: the VQA training step and the evaluation forward of the demo's model.

The step is the trainer's (``VQATask.loss``: VQA BCE + L_var + the prior terms, backward, AdamW) on a batch of
``--batch`` Shapes training questions: the per-question baseline draws them in the plain shuffled order, the grouped
run in the order ``EpochOrder`` gives with ``--group`` questions per image; both are timed interleaved (median of
``--steps``). Evaluation: ``predict_answers`` over the first ``--eval-questions`` val questions (the file keeps an
image's questions together, so its batches share first passes whatever the group size), against the same batches
with every image repeated per question.

    python scripts/bench_shared_first_pass.py --model runs/shapes_prior/final      # after `make demo`
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    from accelerate import Accelerator

    from absvl.data.loaders import make_loader
    from absvl.training.config import load_config
    from absvl.training.data import EpochOrder
    from absvl.training.vqa import VQATask

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/shapes_absvit_tiny.yaml")
    p.add_argument("--model", default="runs/shapes_prior/final", help="train.init_from: the model the step trains")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--group", type=int, default=4, help="questions per image in the grouped order")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--eval-questions", type=int, default=640)
    args = p.parse_args()

    config = load_config(args.config, [f"train.init_from={args.model}", f"train.batch_size={args.batch}"])
    task = VQATask(config)
    task.setup(Accelerator(cpu=True), Path(tempfile.mkdtemp()), None)  # it writes answers.json there
    model = task.model.train()
    optimizer = torch.optim.AdamW(task.param_groups(), lr=1e-6)

    def first_batch(group: int) -> dict:
        task.train_set.group_size = group
        return next(iter(make_loader(EpochOrder(task.train_set, 0, 0), task.collator, args.batch, 0)))

    batches = {
        "one first pass per question": first_batch(1),
        f"{args.group} questions per image": first_batch(args.group),
    }

    def step(batch: dict) -> None:
        task.loss(model, batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times: dict[str, list[float]] = {name: [] for name in batches}
    for i in range(args.steps + 1):  # interleaved; the first round warms up
        for name, batch in batches.items():
            start = time.perf_counter()
            step(batch)
            if i:
                times[name].append(time.perf_counter() - start)
    print(f"training step, batch {args.batch} ({torch.get_num_threads()} threads), median of {args.steps}:")
    base = None
    for name, batch in batches.items():
        median = statistics.median(times[name])
        base = base or median
        print(
            f"  {name:30s} {len(batch['images']):3d} images  {median:.3f} s  {args.batch / median:6.1f} questions/s  "
            f"{base / median:.2f}x"
        )

    model.eval()
    loader = make_loader(task.val_loader.dataset, task.collator, args.batch, 0)
    eval_batches = [b for _, b in zip(range(args.eval_questions // args.batch), loader)]

    @torch.no_grad()
    def predict(shared: bool) -> float:
        start = time.perf_counter()
        for b in eval_batches:
            images, index = (b["images"], b["image_index"]) if shared else (b["images"][b["image_index"]], None)
            model(images, b["input_ids"], b["attention_mask"], image_index=index)
        return time.perf_counter() - start

    runs = {False: [], True: []}
    for _ in range(3):
        for shared in runs:
            runs[shared].append(predict(shared))
    questions = sum(len(b["question_ids"]) for b in eval_batches)
    images = sum(len(b["images"]) for b in eval_batches)
    per_question, shared = statistics.median(runs[False]), statistics.median(runs[True])
    print(f"evaluation forward, {questions} val questions of {images} images (median of 3):")
    print(f"  one first pass per question    {per_question:.2f} s  {questions / per_question:6.1f} questions/s  1.00x")
    print(
        f"  one first pass per image       {shared:.2f} s  {questions / shared:6.1f} questions/s  {per_question / shared:.2f}x"
    )


if __name__ == "__main__":
    main()
