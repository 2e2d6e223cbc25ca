"""The measurement of ``scripts/bench_vqa_train.py``: one model's VQA training step, timed.

``measure_model`` builds the VL model, counts the training FLOPs of one step
(``FlopCounterMode``, attention through the math SDPA path), records which SDPA kernels a step
dispatches to (``SDPAKernels``), then times the model-only steps (one batch already on the device)
and the full steps (the trainer's loader, cycled over the data set) and returns the numbers of that
model; ``backbone_train_flops`` counts the backbone's own training FLOPs on the meta device.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections import Counter
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch


class _Cycle(torch.utils.data.Sampler):
    """Indices 0, 1, ..., len-1, 0, 1, ... for ``total`` items: one loader iterator covers the run."""

    def __init__(self, length: int, total: int) -> None:
        self.length, self.total = length, total

    def __iter__(self):
        return (i % self.length for i in range(self.total))

    def __len__(self) -> int:
        return self.total


def build_model(name: str, args: argparse.Namespace, answers: list[str], tokenizer: Any, tokenizer_dir: Path):
    import transformers

    from absvl.models.vl import AbsVLConfig, AbsVLForQuestionAnswering

    text = transformers.RobertaConfig(num_hidden_layers=args.text_layers).to_dict()
    if args.text_hidden:  # a reduced encoder (tests): heads of 64 channels, FFN 4x
        hidden = args.text_hidden
        text.update(hidden_size=hidden, num_attention_heads=max(1, hidden // 64), intermediate_size=4 * hidden)
    if args.text_vocab:
        text["vocab_size"] = args.text_vocab
    text.pop("_name_or_path", None)
    config = AbsVLConfig(
        backbone=name,
        backbone_kwargs={"img_size": args.image_size},
        image_size=args.image_size,
        text_encoder=str(tokenizer_dir),  # never read: text_config is given and so is the tokenizer
        text_config=text,
        max_text_len=args.max_text_len,
        fusion_hidden_size=args.fusion_hidden,
        fusion_layers=args.fusion_layers,
        fusion_heads=args.fusion_heads,
    )
    torch.manual_seed(0)
    model = AbsVLForQuestionAnswering(config, answers=answers, tokenizer=tokenizer)
    return model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _stats(times: list[float], batch: int) -> dict[str, float]:
    mean = statistics.mean(times)
    return {
        "step_s_mean": mean,
        "step_s_median": statistics.median(times),
        "step_s_std": statistics.stdev(times) if len(times) > 1 else 0.0,
        "step_s_min": min(times),
        "step_s_max": max(times),
        "samples_per_s": batch / mean,
        "steps": len(times),
    }


class SDPAKernels:
    """Counts, while active, the calls of ``F.scaled_dot_product_attention`` and the fused kernels
    (flash / efficient / cudnn, forward) they dispatch to; the rest ran the unfused math path."""

    def __enter__(self) -> SDPAKernels:
        from torch.utils._python_dispatch import TorchDispatchMode

        self.calls, self.kernels = 0, Counter()
        functional, original = torch.nn.functional, torch.nn.functional.scaled_dot_product_attention
        owner = self

        def counted(*args: Any, **kwargs: Any) -> torch.Tensor:
            owner.calls += 1
            return original(*args, **kwargs)

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = func.__name__
                if "attention" in name and "backward" not in name:
                    kind = next((k for k in ("flash", "efficient", "cudnn") if k in name), None)
                    if kind:
                        owner.kernels[kind] += 1
                return func(*args, **(kwargs or {}))

        self._restore = lambda: setattr(functional, "scaled_dot_product_attention", original)
        functional.scaled_dot_product_attention = counted
        self._mode = Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._mode.__exit__(*exc)
        self._restore()

    def summary(self) -> dict[str, int]:
        out = dict(self.kernels)
        fused = sum(out.values())
        if self.calls > fused:
            out["math"] = self.calls - fused
        return out


def backbone_train_flops(name: str, image_size: int) -> int | None:
    """FLOPs of one backbone forward + backward (with L_var) for one image, as in the VL model
    (ξ needs a gradient), counted on the meta device: nothing is computed. None if that fails."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from absvl.models.vision import create_backbone

    try:
        with torch.device("meta"):
            backbone = create_backbone(name, img_size=image_size).train()
            images = torch.empty(1, 3, image_size, image_size)
            xi = torch.empty(1, backbone.num_features, requires_grad=True)
        counter = FlopCounterMode(display=False)
        with counter, sdpa_kernel([SDPBackend.MATH]):
            out = backbone(images, xi=xi)
            loss = out.tokens.float().mean() + sum(out.aux_losses.values(), torch.zeros((), device="meta"))
            loss.backward()
        return counter.get_total_flops()
    except Exception:  # noqa: BLE001 - a sanity check only
        return None


def measure_model(name: str, args: argparse.Namespace, accelerator, data: dict[str, Any]) -> dict[str, Any]:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import get_scheduler

    from absvl.data.loaders import make_loader, to_device
    from absvl.data.vqa_dataset import VQADataset
    from absvl.models.vision import count_params, estimate_macs
    from absvl.training.data import EpochOrder
    from absvl.training.loop import train_step
    from absvl.training.vqa import VQATask

    device = accelerator.device
    cuda = device.type == "cuda"
    task = VQATask(data["run_config"])  # only its loss() and batch_size() are used
    t = data["run_config"].train
    model = build_model(name, args, data["answers"], data["tokenizer"], data["tokenizer_dir"]).to(device)
    task.model = model
    params = count_params(model)
    fused = {"auto": cuda, "on": True, "off": False}[args.fused_adamw]
    optimizer = torch.optim.AdamW(
        model.parameter_groups(t.lr, t.weight_decay, t.lr_multipliers),
        lr=t.lr,
        betas=tuple(t.betas),
        eps=t.eps,
        fused=fused or None,
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    total = 10 * (args.steps + args.warmup + 2)
    scheduler = get_scheduler(
        "linear", optimizer, num_warmup_steps=int(t.warmup_ratio * total), num_training_steps=total
    )

    def step(batch: dict[str, Any]) -> torch.Tensor:
        # the trainer's own step (absvl.training.loop.train_step), then the scheduler as run_training does
        # (the names are deleted only after the last step: ruff cannot see it)
        loss = train_step(accelerator, model, optimizer, task, batch, t.max_grad_norm, lambda: fixed)  # noqa: F821
        scheduler.step()  # noqa: F821
        return loss

    def mark(batch: dict[str, Any]) -> dict[str, Any]:
        if args.compile:  # question length varies between batches: one graph for every length
            for key in ("input_ids", "attention_mask"):
                torch._dynamo.maybe_mark_dynamic(batch[key], 1)
        return batch

    dataset = VQADataset(data["examples"], data["answer_index"], data["transform"])
    needed = args.batch * (args.warmup + args.steps)

    # one fixed batch on the device for the model-only step (same items as the loader's first batch)
    first = make_loader(EpochOrder(dataset, t.seed, 0), data["collator"], args.batch, 0)
    fixed = mark(to_device(next(iter(first)), device))
    size = task.batch_size(fixed)

    # 1. FLOPs of one training step (forward + backward), eager, attention through the math path so
    #    that its matmuls are counted on every device (the fused CPU kernel has no flop formula)
    counter = FlopCounterMode(display=False)
    with sdpa_kernel([SDPBackend.MATH]), counter:
        loss = task.loss(model, fixed)
        accelerator.backward(loss)
    optimizer.zero_grad(set_to_none=True)
    flops = counter.get_total_flops()
    macs = estimate_macs(name, img_size=args.image_size)[1]
    backbone_flops = backbone_train_flops(name, args.image_size)

    # 2. which SDPA kernels a step dispatches to (eager, default backends): the first model-only
    #    warmup step, or an extra untimed step before compiling
    sdpa = SDPAKernels()
    if args.compile or not args.warmup:
        with sdpa:
            step(fixed)
    if args.compile:
        accelerator.unwrap_model(model).compile()  # in place: the optimizer keeps the same parameters

    # 3. model-only steps
    times: list[float] = []
    for i in range(args.warmup + args.steps):
        _sync(device)
        start = time.perf_counter()
        with sdpa if i == 0 and not args.compile and args.warmup else nullcontext():
            step(fixed)
        _sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    model_only = _stats(times, size)

    # 4. full steps: the trainer's loader (EpochOrder → DataLoader → Accelerate), cycling over the set
    loader = torch.utils.data.DataLoader(
        EpochOrder(dataset, t.seed, 0),
        batch_size=args.batch,
        sampler=_Cycle(len(dataset), needed),
        num_workers=args.num_workers,
        collate_fn=data["collator"],
        pin_memory=cuda,
        persistent_workers=False,
        prefetch_factor=args.prefetch if args.num_workers else None,
        generator=torch.Generator().manual_seed(0),
    )
    loader = accelerator.prepare_data_loader(loader)
    times, waits, sizes = [], [], []
    iterator = iter(loader)
    for i in range(args.warmup + args.steps):
        _sync(device)
        start = time.perf_counter()
        batch = mark(to_device(next(iterator), device))
        got = time.perf_counter()
        step(batch)
        _sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
            waits.append(got - start)
            sizes.append(task.batch_size(batch))
    del iterator, loader
    full = _stats(times, args.batch)
    full["samples_per_s"] = sum(sizes) / sum(times)
    full["data_wait_s_mean"] = statistics.mean(waits)

    per_sample = flops / size
    result: dict[str, Any] = {
        "model": name,
        "params_m": params / 1e6,
        "model_only": model_only,
        "full": full,
        # medians: robust to the odd step stalled by another process (shared CPUs)
        "data_loading_overhead": 1.0 - model_only["step_s_median"] / full["step_s_median"],
        "data_loading_overhead_mean": 1.0 - model_only["step_s_mean"] / full["step_s_mean"],
        "data_wait_fraction": full["data_wait_s_mean"] / full["step_s_mean"],
        "train_flops_per_sample": per_sample,
        "backbone_train_flops_per_sample": backbone_flops,
        "backbone_macs_per_sample": macs,
        "backbone_analytic_train_flops_per_sample": 3 * 2 * macs,
        "achieved_tflops_full": per_sample * full["samples_per_s"] / 1e12,
        "achieved_tflops_model_only": per_sample * model_only["samples_per_s"] / 1e12,
        "sdpa_kernels": sdpa.summary(),
        "loss": float(loss.detach().float()),
    }
    if data["peak_tflops"]:
        result["mfu_full"] = result["achieved_tflops_full"] / data["peak_tflops"]
        result["mfu_model_only"] = result["achieved_tflops_model_only"] / data["peak_tflops"]
    accelerator.free_memory(model, optimizer)
    del model, optimizer, scheduler, task, fixed
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result
