"""Run by torchrun (2 processes, see test_multiprocess.py): the trainer's micro-step when no process's batch, or
one process's batch, holds a readable item. Writes ``{rank}.json`` into the folder given as the first argument."""

import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn

from absvl.training.loop import agreement_group, train_step


class RegressionTask:
    """The two methods of a task that ``train_step`` calls."""

    def batch_size(self, batch):
        return len(batch["x"])

    def loss(self, model, batch):
        return nn.functional.mse_loss(model(batch["x"]).squeeze(-1), batch["y"])


def state(model, optimizer):
    """Every float the step may change: weights, buffers (BatchNorm statistics), AdamW's moments and count."""
    tensors = {f"param/{n}": p for n, p in model.named_parameters()}
    tensors.update({f"buffer/{n}": b for n, b in model.named_buffers()})
    for index, values in optimizer.state_dict()["state"].items():
        tensors.update({f"adamw/{index}/{k}": torch.as_tensor(v) for k, v in values.items()})
    return {name: t.detach().clone().float() for name, t in tensors.items()}


def main(out: Path) -> None:
    accelerator = Accelerator(cpu=True)
    rank = accelerator.process_index
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    task, data = RegressionTask(), torch.Generator().manual_seed(rank)

    def batch(n):
        return {"x": torch.randn(n, 4, generator=data), "y": torch.randn(n, generator=data)}

    group = agreement_group(accelerator)

    def step(n):
        return train_step(accelerator, model, optimizer, task, batch(n), 1.0, lambda: batch(4), group)

    first = step(4)
    before = state(model, optimizer)
    # no process's share of this micro-batch was readable: skipped everywhere
    skipped = step(0)
    after_skip = state(model, optimizer)
    # rank 1's share was all unreadable, rank 0's was fine: rank 0's gradient carries the step
    partial = step(4 if rank == 0 else 0)
    after_partial = state(model, optimizer)
    third = step(4)
    final = state(model, optimizer)
    # weights and AdamW's state are the same on every process (DDP averages the gradients); BatchNorm
    # statistics are each process's own until DDP broadcasts rank 0's at the next forward
    synced = torch.cat([t.flatten() for name, t in after_partial.items() if not name.startswith("buffer/")])
    everyone = accelerator.gather(synced[None])

    def changed(a, b, prefix):
        return sorted(name for name in a if name.startswith(prefix) and not torch.equal(a[name], b[name]))

    report = {
        "ran": [first is not None, partial is not None, third is not None],
        "skipped_returned_none": skipped is None,
        "changed_by_skip": sorted(name for name in before if not torch.equal(before[name], after_skip[name])),
        "params_changed_by_partial": changed(after_skip, after_partial, "param/"),
        "buffers_changed_by_partial": changed(after_skip, after_partial, "buffer/"),
        "params_changed_by_third": changed(after_partial, final, "param/"),
        "ranks_agree": bool((everyone == everyone[0]).all()),
        "adamw_steps": sorted({float(v) for k, v in final.items() if k.endswith("/step")}),
    }
    (out / f"{rank}.json").write_text(json.dumps(report))
    # a gloo group left alive at interpreter exit can abort the process ("terminate called without an active
    # exception"): tear it down as the trainer does
    accelerator.end_training()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
