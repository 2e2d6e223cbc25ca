#!/usr/bin/env python
"""Train-step and inference throughput of every backbone family against its plain baseline.

Each row is measured in the same run as its baseline (ViT of the same size; ResNet of the
same depth) and reported as a ratio. Targets (BENCHMARKS.md): AbSViT train step <= 2.25x
ViT (the FLOPs ratio; a second projection of the top-down tokens through the qkv
linear, as the authors compute it, would cost ~2.4x), VARS-D <= 1.3x ViT, TDAM-ResNet-50 throughput >= 0.88x ResNet-50.

    python scripts/bench_backbones.py --size tiny --batch 16            # CPU
    python scripts/bench_backbones.py --size base --batch 64 --device cuda --dtype bf16
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext

import torch

from absvl.models.vision import create_backbone, estimate_macs
from absvl.runtime import keep_freed_memory


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_steps(name: str, args: argparse.Namespace, **overrides) -> dict[str, Callable[[], None]]:
    """A train step (forward, loss incl. aux losses, backward, AdamW) and an inference step."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = create_backbone(name, **overrides).to(device)
    images = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == "bf16" else nullcontext()

    def train_step() -> None:
        model.train()
        with autocast:
            out = model(images)
            loss = out.pooled.float().square().mean() + sum(out.aux_losses.values(), torch.zeros((), device=device))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def infer_step() -> None:
        model.eval()
        with autocast:
            model(images)

    return {"train": train_step, "infer": infer_step}


def measure(rows: list[tuple[str, str, dict, str | None]], args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Median step time of every row; iterations are interleaved across rows so that a
    slow-down of the machine hits baseline and candidate alike."""
    device = torch.device(args.device)
    steps = {label: make_steps(name, args, **overrides) for label, name, overrides, _ in rows}
    times: dict[str, dict[str, list[float]]] = {label: {"train": [], "infer": []} for label in steps}
    for kind in ("train", "infer"):
        for i in range(args.warmup + args.iters):
            for label, fns in steps.items():
                _sync(device)
                start = time.perf_counter()
                fns[kind]()
                _sync(device)
                if i >= args.warmup:
                    times[label][kind].append(time.perf_counter() - start)
    results = {}
    for label, name, overrides, _ in rows:
        r = {f"{k}_s": statistics.median(v) for k, v in times[label].items()}
        r.update(train_img_s=args.batch / r["train_s"], infer_img_s=args.batch / r["infer_s"])
        r["gmacs"] = estimate_macs(name, img_size=args.img_size, **overrides)[1] / 1e9
        results[label] = r
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="tiny", choices=["tiny", "small", "base"])
    parser.add_argument("--resnet-depth", type=int, default=50, choices=[18, 34, 50, 101])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--default-malloc", action="store_true", help="leave glibc's allocator settings as they are")
    args = parser.parse_args()
    allocator = "glibc defaults" if args.default_malloc else f"freed memory kept: {keep_freed_memory()}"

    vit = f"vit_{args.size}_patch16_224"
    resnet = f"resnet{args.resnet_depth}"
    rows = [  # (label, backbone, overrides, baseline label)
        ("ViT", vit, {}, None),
        ("AbSViT", f"absvit_{args.size}_patch16_224", {}, "ViT"),
        ("AbSViT-QKV", vit, {"topdown": "qkv"}, "ViT"),
        ("VARS-D", f"vars_d_vit_{args.size}_patch16_224", {}, "ViT"),
        ("ResNet", resnet, {}, None),
        ("TDAM-ResNet", f"tdam_{resnet}", {}, "ResNet"),
    ]
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "CPU"
    print(
        f"# backbones, {args.size} / resnet{args.resnet_depth}, batch {args.batch}, {args.img_size}px, {args.dtype}, "
        f"{args.device} ({device_name}, {torch.get_num_threads()} threads), torch {torch.__version__}, {allocator}"
    )
    print(
        f"{'model':34s} {'GMACs':>6s} {'train ms':>9s} {'train img/s':>11s} {'x base':>7s} {'infer img/s':>11s} {'thr x base':>10s}"
    )
    results = measure(rows, args)
    for label, _, _, base in rows:
        r, b = results[label], results[base or label]
        r.update(
            train_time_ratio=r["train_s"] / b["train_s"], infer_throughput_ratio=r["infer_img_s"] / b["infer_img_s"]
        )
        print(
            f"{label:34s} {r['gmacs']:6.2f} {r['train_s'] * 1e3:9.1f} {r['train_img_s']:11.1f} "
            f"{r['train_time_ratio']:7.2f} {r['infer_img_s']:11.1f} {r['infer_throughput_ratio']:10.2f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "device": device_name, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
