"""What a logged training step costs: a VQA step with ``AbsVLModel.loss_gradient_norms`` (the per-loss
gradient norms every logged step records) against a plain step, measured in the same run.

    .venv/bin/python scripts/bench_grad_norms.py                       # the demo's model and data
    .venv/bin/python scripts/bench_grad_norms.py --model DIR --config CONFIG --steps 10

Prints seconds per step of each and their ratio, and the share of the training time at ``--log-every``.
"""

from __future__ import annotations

import argparse
import time

import torch

from absvl.data.vqa_dataset import VQACollator, VQADataset
from absvl.images import image_transform
from absvl.models.vl import AbsVLForQuestionAnswering
from absvl.training.config import load_config
from absvl.training.vqa import object_regions, prepare_data


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="runs/shapes_absvit_tiny/final", help="a save_pretrained folder")
    p.add_argument("--config", default="configs/shapes_absvit_tiny.yaml", help="the run config of its data")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=5, help="timed steps of each kind, after one warm-up each")
    p.add_argument("--log-every", type=int, default=50)
    args = p.parse_args()

    torch.manual_seed(0)
    model = AbsVLForQuestionAnswering.from_pretrained(args.model).train()
    config = load_config(args.config)
    examples = prepare_data(config, model.answers).train[: args.batch_size]
    dataset = VQADataset(
        examples,
        {a: i for i, a in enumerate(model.answers)},
        image_transform(model.image_size, train=True),
        **object_regions(config, model),
    )
    batch = VQACollator(model.tokenizer, len(model.answers), model.config.max_text_len)(
        [dataset[i] for i in range(len(dataset))]
    )
    inputs = {k: batch[k] for k in ("prior_positive", "patch_objects", "target_objects", "image_index") if k in batch}
    inputs["labels"] = batch["vqa_targets"]

    def step(logged: bool) -> None:
        out = model(batch["images"], batch["input_ids"], batch["attention_mask"], **inputs)
        if logged:
            model.loss_gradient_norms(out.losses)
        out.loss.backward()
        model.zero_grad(set_to_none=True)

    seconds = {}
    for logged in (False, True):
        step(logged)  # warm-up
        start = time.perf_counter()
        for _ in range(args.steps):
            step(logged)
        seconds[logged] = (time.perf_counter() - start) / args.steps
    ratio = seconds[True] / seconds[False]
    print(f"plain step {seconds[False]:.3f} s, logged step (gradient norms) {seconds[True]:.3f} s: {ratio:.2f}x")
    print(f"at log_every {args.log_every}: +{100 * (ratio - 1) / args.log_every:.1f} % of the training time")


if __name__ == "__main__":
    main()
