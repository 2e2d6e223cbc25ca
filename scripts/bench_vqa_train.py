#!/usr/bin/env python
"""End-to-end VQA training throughput of the VL model, AbSViT against ViT in the same run.

The model is the paper's VQA setup (SPEC §5): AbSViT-B (or the ViT-B baseline) + RoBERTa-base
(built from ``transformers.RobertaConfig()``, random init, nothing downloaded) + 6 METER
co-attention fusion layers (H=768, 12 heads), 224 px, 3,129 answers. Every model is timed in two
modes:

* **full step**: the real data path. A DataLoader over a VQAv2-format folder of JPEGs, the real
  ``VQADataset`` + ``VQACollator`` (in the trainer's ``EpochOrder`` wrapper), prepared by
  Accelerate (pinned memory and non-blocking copies on CUDA), then forward / backward / AdamW.
* **model-only step**: the same step on one batch already on the device, repeated.

Data-loading overhead = 1 − model_only_time / full_time (median step times: robust to the odd
step stalled by another process), the share of the step spent waiting for data; throughput is
batch / mean step time, with the spread (std, min, max) printed. Warmup steps are not timed. The
step is the one ``absvl.training.loop.run_training`` runs for ``VQATask``: the task's
loss (VQA BCE + 0.3·L_var + prior InfoNCE), ``accelerator.backward``, gradient clipping, AdamW
over ``AbsVLModel.parameter_groups`` (fused on CUDA), ``zero_grad``, the linear LR schedule,
with Accelerate's mixed precision (bf16 autocast) on GPU.

Training FLOPs per sample are counted with ``torch.utils.flop_counter.FlopCounterMode`` on one
forward + backward (attention counted through the math SDPA path, so every matmul is seen; the
optimizer and element-wise ops are not counted); on GPU the model FLOPs utilisation (MFU) is the
achieved FLOP/s over the device's dense bf16 peak. As a sanity check the backbone's counted
training FLOPs are printed next to 3 × 2 × MACs of ``estimate_macs`` (forward = 2·MACs,
backward ≈ 2 × forward).

    # CPU (2 cores: a paper-size step takes seconds; keep batch and steps small)
    python scripts/bench_vqa_train.py --batch 4 --steps 3 --warmup 1
    # GPU (bf16, fused SDPA, TF32, fused AdamW, pinned memory; goal: MFU >= 40 %, data <= 10 %)
    python scripts/bench_vqa_train.py --device cuda --batch 64 --precision bf16 --compile \\
        --num-workers 8 --steps 30 --warmup 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the collator tokenises inside forked workers

import torch  # noqa: E402
from vqa_train_measure import measure_model  # noqa: E402 - scripts/vqa_train_measure.py, beside this file

# dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, most specific name first
PEAK_BF16_TFLOPS: tuple[tuple[str, float | None], ...] = (
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100 PCIE", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM
    ("H800", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10G", None),  # not listed by NVIDIA: pass --peak-tflops
    ("A10", 125.0),
)
GOAL_MFU, GOAL_DATA_OVERHEAD = 0.40, 0.10
DEFAULT_MODELS = "absvit_base_patch16_224,vit_base_patch16_224"
COCO_SIZE = (640, 480)  # the typical COCO image (VQAv2's images are COCO's)


def peak_tflops(device_name: str) -> float | None:
    name = device_name.upper()
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


# ----------------------------------------------------------------------------------------------
# data


def _shapes_world(root: Path, num_images: int, image_size: int) -> Path:
    from absvl.data.shapes import ensure_shapes

    root.parent.mkdir(parents=True, exist_ok=True)  # the generator writes into an existing folder's child
    ensure_shapes(root, num_images=num_images, image_size=image_size, seed=0, splits=(("train2014", 1.0),))
    return root


def write_coco_standins(
    world: Path, out: Path, size: tuple[int, int] = COCO_SIZE, quality: int = 90, noise: float = 18.0
) -> Path:
    """A VQAv2-format copy of the Shapes world's train split whose images are COCO-sized JPEGs.

    Each scene is resized to ``size`` and given a per-pixel texture (Gaussian, std ``noise``), so
    that the files are about as large (and as slow to decode) as COCO's (~160 kB on average)
    rather than small flat-colour ones.
    Cached: reused when the marker matches.
    """
    import numpy as np
    from PIL import Image

    from absvl.data.shapes_world import annotations_filename, image_folder, questions_filename

    marker = out / "standins.json"
    key = {
        "world": str(world.resolve()),
        "size": list(size),
        "quality": quality,
        "noise": noise,
        "mtime": (world / "shapes_meta.json").stat().st_mtime_ns,
    }
    if marker.is_file() and json.loads(marker.read_text()) == key:
        return out
    shutil.rmtree(out, ignore_errors=True)
    folder = image_folder("train2014")
    (out / "images" / folder).mkdir(parents=True)
    for name in (questions_filename("train2014"), annotations_filename("train2014")):
        shutil.copy(world / name, out / name)
    for i, src in enumerate(sorted((world / "images" / folder).glob("*.jpg"))):
        rng = np.random.default_rng(i)
        image = np.asarray(Image.open(src).convert("RGB").resize(size, Image.BICUBIC), dtype=np.float32)
        image = np.clip(image + rng.normal(0.0, noise, image.shape), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(out / "images" / folder / src.name, quality=quality)
    marker.write_text(json.dumps(key))
    return out


def prepare_data(args: argparse.Namespace) -> tuple[Path, Path, str]:
    """(VQAv2-format data root, tokenizer folder, description)."""
    work = Path(args.work_dir)
    if args.data_root:
        root = Path(args.data_root)
        tokenizer = Path(args.tokenizer) if args.tokenizer else root / "text_encoder"
        if not tokenizer.is_dir():  # e.g. real VQAv2: take the tiny Shapes tokenizer (only ids matter)
            tokenizer = _shapes_world(work / "shapes_tokenizer", 16, 32) / "text_encoder"
        return root, tokenizer, f"{root} ({args.split})"
    source = args.source_size or max(224, args.image_size)
    world = _shapes_world(work / f"shapes_{source}px_{args.num_images}", args.num_images, source)
    tokenizer = Path(args.tokenizer) if args.tokenizer else world / "text_encoder"
    if args.images == "shapes":
        return world, tokenizer, f"Shapes world, {args.num_images} images of {source}x{source} px"
    root = write_coco_standins(world, work / f"coco_standins_{source}px_{args.num_images}")
    kb = statistics.mean(p.stat().st_size for p in (root / "images").rglob("*.jpg")) / 1024
    w, h = COCO_SIZE
    return root, tokenizer, f"COCO-sized stand-ins, {args.num_images} JPEGs of {w}x{h} px (mean {kb:.0f} kB)"


# ----------------------------------------------------------------------------------------------
# reporting


def machine_info(device: torch.device) -> dict[str, Any]:
    import transformers

    cpu = platform.processor() or "CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def _pct(x: float | None) -> str:
    return f"{100 * x:5.1f}%" if x is not None else "    -"


def print_report(results: dict[str, Any]) -> None:
    args, machine = results["args"], results["machine"]
    gpu = f", GPU {machine['gpu']} (CUDA {machine['cuda']})" if "gpu" in machine else ""
    peak = results["peak_tflops"]
    print(
        f"# machine: {machine['cpu']}, {machine['cores']} cores, {machine['torch_threads']} torch threads{gpu}, "
        f"torch {machine['torch']}, transformers {machine['transformers']}, {machine['date']}"
    )
    print(
        f"# VQA train step: batch {args['batch']}, {args['image_size']} px, text {args['text_layers']}x{args['text_hidden'] or 768}"
        f"{'' if not args['text_vocab'] else ' vocab ' + str(args['text_vocab'])}, "
        f"fusion {args['fusion_layers']}x{args['fusion_hidden']} ({args['fusion_heads']} heads), "
        f"{results['num_answers']} answers, {args['precision']}, compile={args['compile']}, "
        f"fused AdamW={results['fused_adamw']}, {args['num_workers']} workers, "
        f"{args['steps']} timed steps after {args['warmup']} warmup"
    )
    print(f"# data: {results['data']}")
    print(f"# peak bf16: {peak} TFLOP/s" if peak else "# peak: none (CPU, or unknown GPU: --peak-tflops)")
    header = (
        f"{'model':26s} {'params':>7s} {'GFLOP/smp':>9s} {'model-only smp/s':>17s} {'full smp/s':>15s} "
        f"{'data ovh':>8s} {'wait':>6s} {'TFLOP/s':>8s} {'MFU':>6s}"
    )
    print(header)
    for r in results["models"]:
        mo, fu = r["model_only"], r["full"]
        print(
            f"{r['model']:26s} {r['params_m']:6.1f}M {r['train_flops_per_sample'] / 1e9:9.3g} "
            f"{mo['samples_per_s']:8.2f} ±{100 * mo['step_s_std'] / mo['step_s_mean']:4.1f}%   "
            f"{fu['samples_per_s']:7.2f} ±{100 * fu['step_s_std'] / fu['step_s_mean']:4.1f}% "
            f"{_pct(r['data_loading_overhead']):>8s} {_pct(r['data_wait_fraction']):>6s} "
            f"{r['achieved_tflops_full']:8.3f} {_pct(r.get('mfu_full')):>6s}"
        )
    print(
        "# step times (s), mean ± std [min, median, max]; data ovh = 1 - median model-only / median full step, "
        "wait = mean time in next(loader) / mean full step"
    )
    for r in results["models"]:
        for mode in ("model_only", "full"):
            s = r[mode]
            print(
                f"#   {r['model']:26s} {mode:10s} {s['step_s_mean']:8.3f} ± {s['step_s_std']:.3f} "
                f"[{s['step_s_min']:.3f}, {s['step_s_median']:.3f}, {s['step_s_max']:.3f}]"
            )
    print("# backbone training FLOPs per sample: counted (fwd+bwd) vs 3 x 2 x estimate_macs:")
    for r in results["models"]:
        counted, analytic = r["backbone_train_flops_per_sample"], r["backbone_analytic_train_flops_per_sample"]
        ratio = f"{counted / analytic:.2f}" if counted else "-"
        counted_s = f"{counted / 1e9:.3g}" if counted else "-"
        print(
            f"#   {r['model']:26s} counted {counted_s} G, analytic {analytic / 1e9:.3g} G "
            f"(MACs {r['backbone_macs_per_sample'] / 1e9:.2f} G), counted/analytic {ratio}"
        )
    print(
        "# SDPA kernels (forward calls per step): "
        + "; ".join(
            f"{r['model']}: " + (", ".join(f"{k} {v}" for k, v in sorted(r["sdpa_kernels"].items())) or "none seen")
            for r in results["models"]
        )
    )
    for pair, ratio in results["ratios"].items():
        print(
            f"# {pair}: model-only throughput x{ratio['model_only_samples_per_s']:.3f} "
            f"(step time x{1 / ratio['model_only_samples_per_s']:.2f}), full throughput "
            f"x{ratio['full_samples_per_s']:.3f} (step time x{1 / ratio['full_samples_per_s']:.2f}), "
            f"FLOPs/sample x{ratio['train_flops_per_sample']:.2f}"
        )
    if "gpu" in machine:
        for r in results["models"]:
            mfu, ovh = r.get("mfu_full"), r["data_loading_overhead"]
            ok_mfu = "?" if mfu is None else ("met" if mfu >= GOAL_MFU else "NOT met")
            ok_data = "met" if ovh <= GOAL_DATA_OVERHEAD else "NOT met"
            print(
                f"# goal {r['model']}: MFU >= {GOAL_MFU:.0%} {ok_mfu} ({_pct(mfu).strip()}), "
                f"data loading <= {GOAL_DATA_OVERHEAD:.0%} {ok_data} ({_pct(ovh).strip()})"
            )


# ----------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=DEFAULT_MODELS, help="comma-separated backbones (default: %(default)s)")
    p.add_argument("--baseline", help="backbone the others are compared with (default: the first vit_*, else the last)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=2, help="timed steps per mode")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per mode (more with --compile)")
    p.add_argument("--num-workers", type=int, default=2, help="DataLoader workers (the trainer's default: 2)")
    p.add_argument("--prefetch", type=int, default=2, help="batches prefetched per worker")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--text-layers", type=int, default=12, help="RoBERTa layers (12: RoBERTa-base)")
    p.add_argument("--text-hidden", type=int, help="text encoder width (default: RoBERTa-base's 768)")
    p.add_argument("--text-vocab", type=int, help="text vocabulary (default: RoBERTa-base's 50,265)")
    p.add_argument("--fusion-layers", type=int, default=6)
    p.add_argument("--fusion-hidden", type=int, default=768)
    p.add_argument("--fusion-heads", type=int, default=12)
    p.add_argument("--num-answers", type=int, default=3129, help="VQA answers (VQAv2: 3,129)")
    p.add_argument("--max-text-len", type=int, default=40)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--precision", choices=["fp32", "bf16"], help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (in place)")
    p.add_argument("--fused-adamw", choices=["auto", "on", "off"], default="auto", help="auto: fused on CUDA")
    p.add_argument("--no-tf32", action="store_true", help="keep fp32 matmuls in full precision on CUDA")
    p.add_argument(
        "--images",
        choices=["coco", "shapes"],
        default="coco",
        help="generated data: COCO-sized 640x480 JPEG stand-ins, or the Shapes world's own images",
    )
    p.add_argument("--source-size", type=int, help="Shapes image size (default: max(224, --image-size))")
    p.add_argument("--num-images", type=int, default=64, help="distinct images generated (the loader cycles over them)")
    p.add_argument("--data-root", help="an existing VQAv2-format folder (e.g. real VQAv2) instead of generated data")
    p.add_argument("--split", default="train")
    p.add_argument("--tokenizer", help="local tokenizer folder (default: the Shapes world's)")
    p.add_argument("--work-dir", default=str(Path.home() / ".cache" / "absvl" / "bench_vqa_train"))
    p.add_argument("--peak-tflops", type=float, help="device peak (dense bf16) in TFLOP/s, for the MFU")
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args(argv)
    args.precision = args.precision or ("bf16" if args.device == "cuda" else "fp32")
    if args.batch < 1 or args.steps < 1 or args.warmup < 0:
        p.error("need --batch >= 1, --steps >= 1, --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    import transformers
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, set_seed

    from absvl.data.answers import build_answer_vocab
    from absvl.data.vqa import load_vqa_split
    from absvl.data.vqa_dataset import VQACollator
    from absvl.evaluation.vqa import annotation_entry
    from absvl.images import image_transform
    from absvl.runtime import keep_freed_memory
    from absvl.training.config import RunConfig

    names = [m.strip() for m in args.models.split(",") if m.strip()]
    baseline = args.baseline or next((m for m in names if m.startswith("vit_")), names[-1])
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no GPU")
    keep_freed_memory()  # as run_training
    if cuda and not args.no_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    accelerator = Accelerator(
        cpu=not cuda,
        mixed_precision="bf16" if args.precision == "bf16" else "no",
        dataloader_config=DataLoaderConfiguration(non_blocking=cuda),
    )
    set_seed(0)
    device = accelerator.device
    machine = machine_info(device)
    peak = args.peak_tflops or (peak_tflops(machine["gpu"]) if cuda else None)

    root, tokenizer_dir, data_desc = prepare_data(args)
    examples = load_vqa_split(root, args.split, require_annotations=True)
    answers = build_answer_vocab([annotation_entry(ex) for ex in examples], 1)[: args.num_answers]
    answers += [f"<unused answer {i}>" for i in range(args.num_answers - len(answers))]
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    if args.text_vocab and args.text_vocab < len(tokenizer):
        raise SystemExit(f"--text-vocab {args.text_vocab} is smaller than the tokenizer's {len(tokenizer)} tokens")
    run_config = RunConfig()
    run_config = replace(run_config, train=replace(run_config.train, mixed_precision=accelerator.mixed_precision))
    data = {
        "run_config": run_config,
        "examples": examples,
        "answers": answers,
        "answer_index": {a: i for i, a in enumerate(answers)},
        "tokenizer": tokenizer,
        "tokenizer_dir": tokenizer_dir,
        "transform": image_transform(args.image_size, train=True, randaugment=run_config.data.randaugment),
        "collator": VQACollator(tokenizer, len(answers), args.max_text_len),
        "peak_tflops": peak,
    }
    models = []
    for name in names:
        print(f"... {name}", file=sys.stderr, flush=True)
        models.append(measure_model(name, args, accelerator, data))
    by_name = {r["model"]: r for r in models}
    base = by_name.get(baseline)
    ratios = {}
    if base is not None:
        for r in models:
            if r["model"] == baseline:
                continue
            ratios[f"{r['model']}/{baseline}"] = {
                "model_only_samples_per_s": r["model_only"]["samples_per_s"] / base["model_only"]["samples_per_s"],
                "full_samples_per_s": r["full"]["samples_per_s"] / base["full"]["samples_per_s"],
                "train_flops_per_sample": r["train_flops_per_sample"] / base["train_flops_per_sample"],
            }
    results = {
        "args": vars(args),
        "machine": machine,
        "data": data_desc,
        "num_answers": len(answers),
        "peak_tflops": peak,
        "fused_adamw": {"auto": cuda, "on": True, "off": False}[args.fused_adamw],
        "models": models,
        "ratios": ratios,
    }
    print_report(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str) + "\n")
    return results


if __name__ == "__main__":
    main()
