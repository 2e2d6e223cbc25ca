"""Compare the AbSViT paper's top-down variants on the Shapes world VQA (issues 7 and 11).

Every variant is the same VL recipe (``configs/compare_topdown.yaml``: the demo's stage 2, from the
same stage-1 pretrained backbone ``runs/shapes_pretrain/final``, 64 px) with another backbone name
and ``backbone_kwargs``; all get the same optimizer steps, batch size, data and seeds. Each run goes
through the real trainer (``absvl.training.vqa.train_vqa``), then is scored on Shapes test-dev with
the official VQA accuracy, and its token-norm maps (bottom-up and top-down) with the
target-attention score of ``absvl.metrics.attention`` (map mass on the question's target objects /
their area share; 1.0 = no preference), also on the image's other objects as a control. As
diagnostics it records the score of the prior mask ``clamp(cos(ξ, z_i), 0, 1)`` itself (paper
Fig. 7, variants with a prior), its mean, and how much the top-down pass changes the output tokens,
``‖z_td − z_bu‖ / ‖z_bu‖``.

Each finished run is written to ``OUT/runs/<variant>_seed<k>.json`` at once; a re-run skips
the runs whose file exists with the same budget. At the end: ``OUT/results.md`` (table),
``OUT/results.json`` (every run), ``OUT/comparison.png`` (accuracy and bottom-up/top-down scores)
and ``OUT/attention.png`` (the best AbSViT run's maps for two questions, via
``absvl.visualize.attention_figure``).

    .venv/bin/python scripts/compare_topdown.py --out docs/results/compare_topdown
    .venv/bin/python scripts/compare_topdown.py --quick --variants vit,absvit --seeds 1 --out /tmp/ct

Stage 1 (``runs/shapes_pretrain/final``) is trained first when it is missing, as ``make demo``
does (``absvl.demo.pretrain_stage``, cached; before parallel invocations run one first, or
``make demo``); ``--quick`` trains a 2-step one in its work folder.
``--seeds 3`` runs seeds 0, 1, 2; ``--seeds 0,5`` runs those. The default budget is the demo's
(500 steps of 64 questions, 4 epochs of the 8,000 training questions); a run takes about 8 minutes
on one CPU core. Run disjoint ``--variants`` lists in parallel into the same ``--out`` (with
``OMP_NUM_THREADS=1``), then once more without new runs to collect the table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from topdown_report import aggregate, markdown, plot  # scripts/topdown_report.py, beside this file

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "configs" / "compare_topdown.yaml"
TEST_SPLIT = "test-dev2015"


@dataclass(frozen=True)
class Variant:
    name: str
    label: str
    backbone: str
    kwargs: dict[str, Any]
    overrides: tuple[str, ...] = ()

    def describe(self) -> str:
        extra = ", ".join(f"{k}: {v}" for k, v in self.kwargs.items())
        text = self.backbone + (f" + {{{extra}}}" if extra else "")
        return text + "".join(f", {o}" for o in self.overrides)


VARIANTS = {
    v.name: v
    for v in (
        Variant("vit", "ViT", "vit_test_patch8", {}),
        Variant("perceiver", "PerceiverIO", "absvit_test_patch8", {"topdown": "perceiver"}),
        Variant("feedback", "Feedback", "absvit_test_patch8", {"topdown": "feedback"}),
        Variant("maskatt", "MaskAtt", "absvit_test_patch8", {"topdown": "maskatt"}),
        Variant("absvit_qkv", "AbSViT-QKV", "absvit_test_patch8", {"topdown": "qkv"}),
        Variant(
            "absvit_no_var",
            "AbSViT w/o L_var",
            "absvit_test_patch8",
            {"variational_loss": False},
            ("model.var_loss_weight=0",),
        ),
        Variant("absvit", "AbSViT", "absvit_test_patch8", {}),
        Variant("vars_d", "VARS-D", "vars_d_vit_test_patch8", {}),
        Variant("vars_d_absvit", "AbSViT + VARS-D", "vars_d_absvit_test_patch8", {}),
    )
}
# variants whose backbone has a second (top-down) pass or a prior-reweighted output
TOPDOWN_VARIANTS = {"perceiver", "feedback", "maskatt", "absvit_qkv", "absvit_no_var", "absvit", "vars_d_absvit"}
# a run's top-down pass counts as active when it changes the output tokens by more than this
ACTIVE_CHANGE = 0.05

# --quick: a smoke test of a few seconds per run (and 32 px images)
QUICK = dict(steps=2, batch_size=8, attention_questions=8, seeds=[0], image_size=32)


# --------------------------------------------------------------------------- one run
def run_overrides(variant: Variant, seed: int, args: argparse.Namespace, run_dir: Path) -> list[str]:
    """The key=value overrides turning the base config into this variant's run."""
    base = _base_backbone_kwargs(args)
    kwargs = {**base, **variant.kwargs}
    flow = "{" + ", ".join(f"{k}: {json.dumps(v)}" for k, v in kwargs.items()) + "}"
    overrides = [
        f"model.backbone={variant.backbone}",
        f"model.backbone_kwargs={flow}",
        *variant.overrides,
        f"train.seed={seed}",
        f"train.max_steps={args.steps}",
        f"train.batch_size={args.batch_size}",
        f"train.output_dir={run_dir}",
    ]
    if args.data_root is not None:
        root = Path(args.data_root)
        overrides += [f"data.root={root}", "data.shapes=null", f"model.text_encoder={root / 'text_encoder'}"]
    return overrides + list(args.set)


def _base_backbone_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    import yaml

    tree = yaml.safe_load(Path(args.config).read_text())
    kwargs = dict(tree.get("model", {}).get("backbone_kwargs") or {})
    if args.image_size is not None:
        kwargs["img_size"] = args.image_size
    if args.map_block is not None:
        kwargs["map_block"] = args.map_block
    if getattr(args, "pretrained", None):
        kwargs["pretrained_path"] = args.pretrained
    return kwargs


def pretrained_backbone(args: argparse.Namespace) -> str | None:
    """The stage-1 export every run starts from (the base config's ``pretrained_path``). When it is
    missing, stage 1 is trained first, as ``make demo`` does (``absvl.demo.pretrain_stage``, cached in
    ``runs/shapes_pretrain``; with ``--quick`` a 2-step smoke stage in the work folder)."""
    from absvl.demo import pretrain_stage
    from absvl.training.config import load_config

    kwargs = _base_backbone_kwargs(args)
    path = kwargs.pop("pretrained_path", None)
    if path is None or (Path(path).exists() and not args.quick):
        return path
    data = [f"data.root={args.data_root}", "data.shapes=null"] if args.data_root is not None else []
    stage1 = []
    if args.quick:
        kwargs.pop("map_block", None)
        flow = "{" + ", ".join(f"{k}: {json.dumps(v)}" for k, v in kwargs.items()) + "}"
        stage1 = [
            f"model.backbone_kwargs={flow}",
            f"train.output_dir={Path(args.work) / 'pretrain'}",
            "train.max_steps=2",
            "train.batch_size=8",
            "train.trackers=[]",
        ]
    return pretrain_stage(load_config(args.config, data), stage1)


def budget(args: argparse.Namespace) -> dict[str, Any]:
    """What makes two runs of a variant and seed comparable (a stored run is reused only if equal)."""
    return {
        "config": str(Path(args.config).resolve().relative_to(ROOT))
        if Path(args.config).resolve().is_relative_to(ROOT)
        else str(args.config),
        "steps": args.steps,
        "batch_size": args.batch_size,
        "attention_questions": args.attention_questions,
        "quick": bool(args.quick),
        "image_size": args.image_size,
        "map_block": args.map_block,
        "extra_map_block": args.extra_map_block,
        "data_root": None if args.data_root is None else str(args.data_root),
        "set": list(args.set),
    }


def _diagnostics(model: Any, world: Any, questions: list[dict], batch_size: int = 32) -> dict[str, Any]:
    """Prior-mask target score and the relative change of the output tokens by the top-down pass."""
    import torch
    from PIL import Image

    from absvl.data.shapes_world import target_mask
    from absvl.metrics.attention import mean_ratio, target_attention_ratio
    from absvl.models.vision.topdown import prior_mask

    backbone = model.backbone
    has_prior = getattr(backbone, "topdown", "none") in ("absvit", "qkv", "perceiver", "maskatt")
    mask_ratios, changes, mask_means = [], [], []
    model.eval()
    with torch.no_grad():
        for start in range(0, len(questions), batch_size):
            chunk = questions[start : start + batch_size]
            images = [Image.open(world.image_path(TEST_SPLIT, q["image_id"])).convert("RGB") for q in chunk]
            inputs = model.processor(images=images, text=[q["question"] for q in chunk])
            out = model(inputs["images"], inputs["input_ids"], inputs["attention_mask"])
            vision = out.vision
            z_bu, z = vision.bottom_up_tokens, vision.tokens
            changes.extend(((z - z_bu).norm(dim=-1).mean(-1) / z_bu.norm(dim=-1).mean(-1)).tolist())
            if has_prior:
                mask = prior_mask(z_bu, out.xi)[:, vision.num_prefix_tokens :, 0]
                mask = mask.reshape(len(chunk), *vision.grid_size)
                mask_means.extend(mask.mean(dim=(1, 2)).tolist())
                for i, q in enumerate(chunk):
                    mask_ratios.append(target_attention_ratio(mask[i].numpy(), target_mask(world, q)))
    return {
        "prior_mask_score": mean_ratio(mask_ratios) if has_prior else None,
        "prior_mask_mean": float(np.mean(mask_means)) if has_prior else None,
        "topdown_change": float(np.mean(changes)),
    }


def run_one(variant: Variant, seed: int, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Train (the real trainer), score test-dev and the attention maps; returns the run record."""
    from absvl.data.shapes_world import ShapesWorld
    from absvl.metrics.attention import mean_ratio, target_attention_ratios, target_questions
    from absvl.metrics.vqa import evaluate_vqa
    from absvl.models.vl import AbsVLModel
    from absvl.training.config import load_config
    from absvl.training.vqa import predict_split, train_vqa

    run_dir = Path(args.work) / f"{variant.name}_seed{seed}"
    if run_dir.exists():
        shutil.rmtree(run_dir)  # an unfinished earlier attempt: start clean
    overrides = run_overrides(variant, seed, args, run_dir)
    config = load_config(args.config, overrides)
    t0 = time.perf_counter()
    summary = train_vqa(config, notify=print)
    train_s = time.perf_counter() - t0

    t1 = time.perf_counter()
    model = AbsVLModel.from_pretrained(summary["export"]).eval()
    world = ShapesWorld.load(config.data.root)
    predictions = predict_split(model, config, "test-dev")
    questions = json.loads(world.questions_path(TEST_SPLIT).read_text())
    private = json.loads((world.root / f"shapes_{TEST_SPLIT}_annotations.json").read_text())
    result = evaluate_vqa(predictions, questions, private)
    attention_qs = target_questions(world, TEST_SPLIT, args.attention_questions)
    ratios = target_attention_ratios(model, world, attention_qs, TEST_SPLIT)
    scores = {kind: mean_ratio(values) for kind, values in ratios.items()}
    other = None
    if args.extra_map_block is not None and hasattr(model.backbone, "map_block"):
        # the maps again at another block (by default the first: the literal "L-3" of a 4-block model)
        default_block, model.backbone.map_block = model.backbone.map_block, args.extra_map_block
        other_ratios = target_attention_ratios(model, world, attention_qs, TEST_SPLIT)
        model.backbone.map_block = default_block
        other = {kind: mean_ratio(values) for kind, values in other_ratios.items()}
        if variant.name not in TOPDOWN_VARIANTS:
            other["top_down"] = None
    diagnostics = _diagnostics(model, world, attention_qs)
    eval_s = time.perf_counter() - t1
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if line.strip()]
    losses = [r["loss"] for r in log if "loss" in r]
    return {
        "variant": variant.name,
        "label": variant.label,
        "backbone": variant.describe(),
        "seed": seed,
        "budget": budget(args),
        "steps": summary["step"],
        "accuracy": result["overall"],
        "per_answer_type": result["perAnswerType"],
        "attention": {
            "bottom_up": scores["bottom_up"],
            "top_down": scores["top_down"] if variant.name in TOPDOWN_VARIANTS else None,
            # the control: the same maps on the image's other objects (a map that follows the question
            # prefers its targets; one that prefers any object scores both alike)
            "bottom_up_others": scores["bottom_up_others"],
            "top_down_others": scores["top_down_others"] if variant.name in TOPDOWN_VARIANTS else None,
            "questions": int(np.sum(~np.isnan(ratios["bottom_up"]))),
        },
        "attention_other_block": other,
        **diagnostics,
        "final_loss": losses[-1] if losses else None,
        "train_seconds": round(train_s, 1),
        "eval_seconds": round(eval_s, 1),
        "export": summary["export"],
        "overrides": overrides,
    }


# --------------------------------------------------------------------------- main
def parse_seeds(text: str) -> list[int]:
    """``3`` → [0, 1, 2]; ``0,5`` → [0, 5]."""
    if "," in text:
        return [int(s) for s in text.split(",") if s.strip()]
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError("--seeds needs a count >= 1 or a comma-separated list")
    return list(range(n))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--out", default="docs/results/compare_topdown", help="results folder (results.md/.json, PNGs, runs/)"
    )
    p.add_argument("--work", default=None, help="training run folders (default: runs/compare_topdown, quick: OUT/work)")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="base VL recipe shared by every variant")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {', '.join(VARIANTS)}")
    p.add_argument("--seeds", type=parse_seeds, default=None, help="a count (3 → 0,1,2) or a list (0,5); default 3")
    p.add_argument(
        "--steps",
        "--budget",
        dest="steps",
        type=int,
        default=None,
        help="optimizer steps per run (default 500, the demo's)",
    )
    p.add_argument("--batch-size", type=int, default=None, help="questions per step (default 64)")
    p.add_argument(
        "--attention-questions", type=int, default=None, help="test-dev questions scored for attention (default 200)"
    )
    p.add_argument(
        "--image-size", type=int, default=None, help="input size in px (default: the config's, 64: 8x8 maps)"
    )
    p.add_argument(
        "--map-block",
        type=int,
        default=None,
        help="backbone map_block for the token-norm maps (default: the backbone's, 3/4 of the depth)",
    )
    p.add_argument(
        "--extra-map-block",
        type=lambda v: None if v.lower() == "none" else int(v),
        default=0,
        help="also score the maps after this block (default 0: the first block); 'none' to skip",
    )
    p.add_argument(
        "--data-root",
        default=None,
        help="use this existing Shapes world (with its text_encoder/) instead of the config's",
    )
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="extra config override for every run"
    )
    p.add_argument("--quick", action="store_true", help="smoke test: a few seconds per run (2 steps, batch 8, 32 px)")
    p.add_argument("--force", action="store_true", help="re-run runs whose results exist")
    args = p.parse_args(argv)
    defaults = dict(steps=500, batch_size=64, attention_questions=200, seeds=[0, 1, 2])
    if args.quick:
        defaults.update(QUICK)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
    args.variant_list = [VARIANTS[n] for n in names]
    if args.work is None:
        args.work = str(Path(args.out) / "work") if args.quick else str(ROOT / "runs" / "compare_topdown")
    # absolute paths: main() runs from the repository root (the config's relative paths are its)
    for key in ("out", "work", "config", "data_root"):
        if getattr(args, key) is not None:
            setattr(args, key, str(Path(getattr(args, key)).resolve()))
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import os

    args = parse_args(argv)
    cwd = os.getcwd()
    os.chdir(ROOT)  # relative paths of the config (data/shapes, ...) are the repository's
    try:
        return _main(args, argv)
    finally:
        os.chdir(cwd)


def _main(args: argparse.Namespace, argv: list[str] | None) -> dict[str, Any]:
    import os

    from absvl.data.shapes_world import ShapesWorld
    from absvl.demo import question_pairs
    from absvl.metrics.vqa import majority_answer_baseline
    from absvl.training.config import load_config
    from absvl.visualize import attention_figure

    out = Path(args.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    my_budget = budget(args)
    start = time.perf_counter()
    done = skipped = 0
    runs: list[dict[str, Any]] = []
    todo = [(v, s) for s in args.seeds for v in args.variant_list]  # seed by seed: partial results stay balanced
    args.pretrained = None  # stage 1, found or trained before the first run that trains
    for k, (variant, seed) in enumerate(todo, 1):
        record_path = out / "runs" / f"{variant.name}_seed{seed}.json"
        if record_path.is_file() and not args.force:
            record = json.loads(record_path.read_text())
            if record.get("budget") == my_budget:
                runs.append(record)
                skipped += 1
                print(f"[{k}/{len(todo)}] {variant.name} seed {seed}: done before, skipped", flush=True)
                continue
        t = time.perf_counter()
        print(f"[{k}/{len(todo)}] {variant.name} seed {seed} ...", flush=True)
        args.pretrained = args.pretrained or pretrained_backbone(args)
        record = run_one(variant, seed, args, out)
        tmp = record_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=1) + "\n")
        tmp.replace(record_path)  # atomic: a killed run leaves no half-written result
        runs.append(record)
        done += 1
        att = record["attention"]
        td = "—" if att["top_down"] is None else f"{att['top_down']:.3f}"
        print(
            f"[{k}/{len(todo)}] {variant.name} seed {seed}: acc {record['accuracy']:.2f}, attention bottom-up "
            f"{att['bottom_up']:.3f} top-down {td} ({time.perf_counter() - t:.0f} s)",
            flush=True,
        )

    config = load_config(
        args.config, run_overrides(args.variant_list[0], args.seeds[0], args, Path(args.work) / "probe")
    )
    world = ShapesWorld.load(config.data.root)
    private = json.loads((world.root / f"shapes_{TEST_SPLIT}_annotations.json").read_text())
    train_annotations = json.loads(world.annotations_path("train2014").read_text())
    majority = majority_answer_baseline(train_annotations, private)["overall"]
    rows = aggregate(runs, args.variant_list, TOPDOWN_VARIANTS)
    meta = {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "seeds": args.seeds,
        "config": my_budget["config"],
        "set": list(args.set),
        "attention_questions": args.attention_questions,
        "majority": majority,
        "test_questions": len(private["annotations"]),
        "wall_minutes": (time.perf_counter() - start) / 60,
        "runs_done": done,
        "runs_skipped": skipped,
        "run_minutes": sum(r["train_seconds"] + r["eval_seconds"] for r in runs) / 60,
        "machine": f"{os.cpu_count()} CPU cores, torch threads {_threads()}",
        "command": "python scripts/compare_topdown.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "map_block": args.map_block,
        "extra_map_block": args.extra_map_block,
    }
    (out / "results.json").write_text(json.dumps({"meta": meta, "summary": rows, "runs": runs}, indent=1) + "\n")
    (out / "results.md").write_text(markdown(rows, meta))
    plot(rows, majority, out / "comparison.png")

    # the picture: the most accurate AbSViT run whose top-down pass is active (its gate can stay shut:
    # then the top-down maps are the bottom-up ones and the picture shows nothing top-down) and whose
    # model is still on disk
    absvit = [r for r in runs if r["variant"] == "absvit" and Path(r["export"]).is_dir()]
    active = [r for r in absvit if r.get("topdown_change", 0) > ACTIVE_CHANGE]
    if absvit:
        from absvl.models.vl import AbsVLModel

        best = max(active or absvit, key=lambda r: r["accuracy"])
        image_path, asked = question_pairs(world, TEST_SPLIT)[0]
        texts = [question for question, _ in asked]
        model = AbsVLModel.from_pretrained(best["export"]).eval()
        attention_figure(model, image_path, texts, out / "attention.png")
        meta["attention_png"] = {
            "run": f"{best['variant']}_seed{best['seed']}",
            "accuracy": best["accuracy"],
            "topdown_change": best.get("topdown_change"),
            "image": image_path.name,
            "texts": texts,
        }
        (out / "results.json").write_text(json.dumps({"meta": meta, "summary": rows, "runs": runs}, indent=1) + "\n")
    else:
        print(
            f"{out / 'attention.png'} not drawn: no AbSViT run of this invocation has its model on disk "
            "(run AbSViT in this invocation, or keep its run folders under the runs root)"
        )
    print((out / "results.md").read_text())
    return {"meta": meta, "summary": rows, "runs": runs}


def _threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    main()
