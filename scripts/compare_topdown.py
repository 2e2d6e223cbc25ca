"""Compare the AbSViT paper's top-down variants on the Shapes world VQA (issues 7 and 11).

Every variant is the demo's recipe with another backbone name and ``backbone_kwargs``, from the same stage-1
export (``runs/shapes_pretrain/final``: a plain ViT patch classifier, 64 px), with the same optimizer steps,
batch size, data (the demo's world ``data/shapes``: 8,000 images, 10 questions each) and seeds:

- variants whose backbone has a prior gate ``clamp(cos(ξ, z_i), 0, 1)`` (``PRIOR_VARIANTS``: PerceiverIO,
  MaskAtt, AbSViT-QKV, AbSViT w/o L_var, AbSViT, AbSViT + VARS-D) first run the demo's stage 2a, the prior
  alignment (``absvl.training.prior.train_prior``, ``configs/shapes_prior.yaml``, ``--prior-steps``, into
  ``<run>/prior``), then VQA (stage 2b, ``configs/compare_topdown.yaml``) from its export (``train.init_from``:
  the architecture is the export's, the loss weights the VQA config's);
- the others (ViT, Feedback, VARS-D) train VQA from stage 1 with the same VQA steps and
  ``model.prior_object_weight=0`` (that term trains a gate they lack); ViT and VARS-D, without a second pass,
  also with ``model.fusion_reads=top_down`` (their two "passes" are the same tokens);
- ``vit_prior``, a control: the ViT after the same prior alignment, so that a prior variant's lead is not
  its text encoder's extra steps.

The prior stage's time is extra for the prior variants (``prior_seconds`` beside ``train_seconds``). Each
run is scored on Shapes test-dev with the official VQA accuracy, and its maps with the steering score of
``absvl.metrics.steering`` on the question pairs (one family, different objects named) of the first
``--steering-images`` test-dev images: **pointing** (% of questions whose map peaks on one of their
objects; the bottom-up map, which no question changes, is the baseline) and the **paired** ratio (the map's
share on the objects only question A names, under A / under B; 1 = the question changes nothing), for the
bottom-up, top-down and fusion maps (and the prior gate, the map the prior alignment trains: a diagnostic);
with ``--extra-map-block`` also with the maps after another block. Diagnostics: the mean prior gate and
the output tokens' change by the top-down pass, ``‖z_td − z_bu‖ / ‖z_bu‖``.

Each finished run is written to ``OUT/runs/<variant>_seed<k>.json`` at once; a re-run skips the runs whose
file exists with the same budget. At the end: ``OUT/results.md`` (tables), ``OUT/results.json`` (every run),
``OUT/comparison.png`` (accuracy; all-families pointing, bottom-up vs top-down) and ``OUT/attention.png``
(the best AbSViT run's maps for a steering pair's two questions, ``absvl.visualize.attention_figure``).

    .venv/bin/python scripts/compare_topdown.py --variants vit,absvit --seeds 3 --out docs/results/compare_topdown
    .venv/bin/python scripts/compare_topdown.py --out docs/results/compare_topdown      # all 9 variants
    .venv/bin/python scripts/compare_topdown.py --quick --variants vit,absvit --seeds 1 --out /tmp/ct

Stage 1 is trained first when it is missing, as ``make demo`` does (``absvl.demo.pretrain_stage``, cached;
before parallel invocations run one first, or ``make demo``); ``--quick`` trains a 2-step one in its work
folder, then 2 prior and 2 VQA steps of 8 questions at 32 px. ``--seeds 3`` runs seeds 0, 1, 2; ``--seeds
0,5`` those. The default budget is the demo's: 400 prior steps (prior variants only) and 500 VQA steps of
64 questions. Run disjoint ``--variants`` lists in parallel into the same ``--out`` (with
``OMP_NUM_THREADS=1``), then once more without new runs to collect the tables.
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

# scripts/topdown_report.py, beside this file
from topdown_report import TEST_SPLIT, aggregate, markdown, plot, score_model, steering_test_pairs

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "configs" / "compare_topdown.yaml"
PRIOR_CONFIG = ROOT / "configs" / "shapes_prior.yaml"


@dataclass(frozen=True)
class Variant:
    name: str
    label: str
    backbone: str
    kwargs: dict[str, Any]
    overrides: tuple[str, ...] = ()

    @property
    def topdown(self) -> bool:
        """The backbone has a second (top-down) pass or a prior-reweighted output."""
        return self.name in TOPDOWN_VARIANTS

    @property
    def prior(self) -> bool:
        """The backbone has a prior gate: the run starts with the prior alignment."""
        return self.name in PRIOR_VARIANTS

    def model_overrides(self) -> list[str]:
        """The variant's own ``model.*`` overrides and what the recipe needs changed for its backbone."""
        extra = [] if self.topdown else ["model.fusion_reads=top_down"]  # one pass: "both" reads it twice
        extra += [] if self.prior else ["model.prior_object_weight=0"]  # the object prior term trains a gate
        return [*self.overrides, *extra]

    def describe(self) -> str:
        extra = ", ".join(f"{k}: {v}" for k, v in self.kwargs.items())
        text = self.backbone + (f" + {{{extra}}}" if extra else "")
        return text + "".join(f", {o}" for o in self.model_overrides())


VARIANTS = {
    v.name: v
    for v in (
        Variant("vit", "ViT", "vit_test_patch8", {}),
        # control: the ViT after the same prior alignment (its text encoder's extra steps; no gate to steer)
        Variant("vit_prior", "ViT + prior alignment", "vit_test_patch8", {}),
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
# variants whose backbone has a prior gate (its top-down mode reads ξ: ``uses_prior``)
PRIOR_VARIANTS = {"perceiver", "maskatt", "absvit_qkv", "absvit_no_var", "absvit", "vars_d_absvit", "vit_prior"}
CONTROL_VARIANTS = {"vit_prior"}  # the prior alignment without a gate to steer
# a run's top-down pass counts as active when it changes the output tokens by more than this
ACTIVE_CHANGE = 0.05

# --quick: a smoke test of a few seconds per run (and 32 px images)
QUICK = dict(steps=2, prior_steps=2, batch_size=8, steering_images=8, seeds=[0], image_size=32)


# --------------------------------------------------------------------------- one run
def _stage_overrides(variant: Variant, args: argparse.Namespace) -> list[str]:
    """The overrides both stages share: the backbone, its kwargs, the variant's model changes, the data."""
    kwargs = {**_base_backbone_kwargs(args), **variant.kwargs}
    flow = "{" + ", ".join(f"{k}: {json.dumps(v)}" for k, v in kwargs.items()) + "}"
    overrides = [f"model.backbone={variant.backbone}", f"model.backbone_kwargs={flow}", *variant.model_overrides()]
    if args.data_root is not None:
        root = Path(args.data_root)
        overrides += [f"data.root={root}", "data.shapes=null", f"model.text_encoder={root / 'text_encoder'}"]
    return overrides


def prior_overrides(variant: Variant, seed: int, args: argparse.Namespace, prior_dir: Path) -> list[str]:
    """The key=value overrides turning ``--prior-config`` into this variant's prior alignment. ``--set``'s
    ``model.*`` keys apply here too: the VQA run takes its architecture from this stage's export."""
    return [
        *_stage_overrides(variant, args),
        f"train.seed={seed}",
        f"train.max_steps={args.prior_steps}",
        f"train.batch_size={args.batch_size}",
        f"train.output_dir={prior_dir}",
        "train.trackers=[]",
        "train.keep_last=0",
        *(s for s in args.set if s.startswith("model.")),
        *args.prior_set,
    ]


def run_overrides(
    variant: Variant, seed: int, args: argparse.Namespace, run_dir: Path, init_from: str | None = None
) -> list[str]:
    """The key=value overrides turning the base (VQA) config into this variant's run."""
    overrides = [
        *_stage_overrides(variant, args),
        f"train.seed={seed}",
        f"train.max_steps={args.steps}",
        f"train.batch_size={args.batch_size}",
        f"train.output_dir={run_dir}",
    ]
    if init_from is not None:
        overrides.append(f"train.init_from={init_from}")
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
    ``runs/shapes_pretrain``; with ``--quick`` a 2-step smoke stage in the work folder); its validation
    metrics go to ``args.stage1_metrics``."""
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
    export, args.stage1_metrics = pretrain_stage(load_config(args.config, data), stage1)
    return export


def _relative(path: str) -> str:
    resolved = Path(path).resolve()
    return str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else str(path)


def budget(args: argparse.Namespace) -> dict[str, Any]:
    """What makes two runs of a variant and seed comparable (a stored run is reused only if equal)."""
    return {
        "recipe": "prior alignment, then VQA",
        "config": _relative(args.config),
        "prior_config": _relative(args.prior_config),
        "steps": args.steps,
        "prior_steps": args.prior_steps,
        "batch_size": args.batch_size,
        "steering_images": args.steering_images,
        "quick": bool(args.quick),
        "image_size": args.image_size,
        "map_block": args.map_block,
        "extra_map_block": args.extra_map_block,
        "data_root": None if args.data_root is None else str(args.data_root),
        "set": list(args.set),
        "prior_set": list(args.prior_set),
    }


def steering_pairs_for(args: argparse.Namespace, world: Any) -> list[dict[str, Any]]:
    """The steering pairs of the first ``--steering-images`` test-dev images (the same for every run)."""
    if getattr(args, "pairs", None) is None or args.pairs[0] != str(world.root):
        args.pairs = (str(world.root), steering_test_pairs(world, args.steering_images))
    return args.pairs[1]


def _losses(run_dir: Path) -> list[float]:
    """The training losses a run logged (``log.jsonl``)."""
    lines = (run_dir / "log.jsonl").read_text().splitlines() if (run_dir / "log.jsonl").is_file() else []
    return [r["loss"] for r in map(json.loads, filter(str.strip, lines)) if "loss" in r]


def run_one(variant: Variant, seed: int, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Train (the prior alignment for variants with a prior, then VQA: the real trainers), score test-dev
    and the steering; returns the run record."""
    from absvl.data.shapes_world import ShapesWorld
    from absvl.models.vl import AbsVLForQuestionAnswering
    from absvl.training.config import load_config
    from absvl.training.prior import train_prior
    from absvl.training.vqa import train_vqa

    run_dir = Path(args.work) / f"{variant.name}_seed{seed}"
    if run_dir.exists():
        shutil.rmtree(run_dir)  # an unfinished earlier attempt: start clean
    prior_stage, init_from, prior_s = None, None, 0.0
    if variant.prior:
        p_overrides = prior_overrides(variant, seed, args, run_dir / "prior")
        t0 = time.perf_counter()
        p_summary = train_prior(load_config(args.prior_config, p_overrides), notify=print)
        prior_s = time.perf_counter() - t0
        init_from = p_summary["export"]
        prior_stage = {
            "steps": p_summary["step"],
            "val": p_summary["val"],  # prior loss and, on the world's objects, the gate's pointing (val)
            "export": init_from,
            "overrides": p_overrides,
        }
    overrides = run_overrides(variant, seed, args, run_dir / "vqa", init_from)
    config = load_config(args.config, overrides)
    t0 = time.perf_counter()
    summary = train_vqa(config, notify=print)
    train_s = time.perf_counter() - t0

    t1 = time.perf_counter()
    model = AbsVLForQuestionAnswering.from_pretrained(summary["export"]).eval()
    world = ShapesWorld.load(config.data.root)
    scores = score_model(model, config, world, steering_pairs_for(args, world), args.extra_map_block)
    eval_s = time.perf_counter() - t1
    losses = _losses(run_dir / "vqa")
    return {
        "variant": variant.name,
        "label": variant.label,
        "backbone": variant.describe(),
        "seed": seed,
        "budget": budget(args),
        "steps": summary["step"],
        **scores,  # accuracy, per_answer_type, steering, steering_other_block, prior_mask_mean, topdown_change
        "prior_stage": prior_stage,
        "final_loss": losses[-1] if losses else None,
        "prior_seconds": round(prior_s, 1),
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
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = p.add_argument
    add("--out", default="docs/results/compare_topdown", help="results folder (results.md/.json, PNGs, runs/)")
    add("--work", help="training run folders (default: runs/compare_topdown, quick: OUT/work)")
    add("--config", default=str(DEFAULT_CONFIG), help="VQA recipe shared by every variant")
    add("--prior-config", default=str(PRIOR_CONFIG), help="prior-alignment recipe (variants with a prior gate)")
    add("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {', '.join(VARIANTS)}")
    add("--seeds", type=parse_seeds, help="a count (3 → 0,1,2) or a list (0,5); default 3")
    add(
        "--steps",
        "--budget",
        dest="steps",
        type=int,
        help="VQA optimizer steps per run (default 500, the recorded comparison's; the demo now trains 700)",
    )
    add("--prior-steps", type=int, help="prior-alignment steps, variants with a prior gate (default 400, the demo's)")
    add("--batch-size", type=int, help="questions per step, both stages (default 64)")
    add(
        "--steering-images", type=int, help="test-dev images (2+ objects) whose question pairs score the steering (200)"
    )
    add("--image-size", type=int, help="input size in px (default: the config's, 64: 8x8 maps)")
    add("--map-block", type=int, help="backbone map_block of the token-norm maps (default: the backbone's, 3/4 depth)")
    add(
        "--extra-map-block",
        type=lambda v: None if v.lower() == "none" else int(v),
        default=0,
        help="also score the steering with the maps after this block (default 0: the first block); 'none' to skip",
    )
    add("--data-root", help="use this existing Shapes world (with its text_encoder/) instead of the config's")
    add(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override of every VQA run (model.*: prior too)"
    )
    add("--prior-set", action="append", default=[], metavar="KEY=VALUE", help="override of every prior alignment")
    add("--quick", action="store_true", help="smoke test: a few seconds per run (2 steps, batch 8, 32 px)")
    add("--force", action="store_true", help="re-run runs whose results exist")
    args = p.parse_args(argv)
    defaults = dict(steps=500, prior_steps=400, batch_size=64, steering_images=200, seeds=[0, 1, 2])
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
    for key in ("out", "work", "config", "prior_config", "data_root"):
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


def _summary_line(record: dict[str, Any]) -> str:
    scores, topdown = record["steering"]["all"], record["variant"] in TOPDOWN_VARIANTS
    point = {m: f"{v:.0f} %" if topdown or m == "bottom_up" else "—" for m, v in scores["pointing"].items()}
    return (
        f"acc {record['accuracy']:.2f}, pointing bottom-up {point['bottom_up']} top-down {point['top_down']} "
        f"fusion {point['fusion']} (chance {scores['chance']:.0f} %)"
    )


def _main(args: argparse.Namespace, argv: list[str] | None) -> dict[str, Any]:
    import os

    from absvl.data.shapes_world import ShapesWorld
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
        print(
            f"[{k}/{len(todo)}] {variant.name} seed {seed}: {_summary_line(record)} ({time.perf_counter() - t:.0f} s)",
            flush=True,
        )

    config = load_config(
        args.config, run_overrides(args.variant_list[0], args.seeds[0], args, Path(args.work) / "probe")
    )
    world = ShapesWorld.load(config.data.root)
    private = json.loads(world.annotations_path(TEST_SPLIT).read_text())
    train_annotations = json.loads(world.annotations_path("train2014").read_text())
    majority = majority_answer_baseline(train_annotations, private)["overall"]
    pairs = steering_pairs_for(args, world)
    rows = aggregate(runs, args.variant_list, TOPDOWN_VARIANTS)
    meta = {
        "steps": args.steps,
        "prior_steps": args.prior_steps,
        "prior_variants": sorted(v.name for v in args.variant_list if v.prior),
        "batch_size": args.batch_size,
        "seeds": args.seeds,
        "config": my_budget["config"],
        "prior_config": my_budget["prior_config"],
        "set": list(args.set),
        "prior_set": list(args.prior_set),
        "steering_images": args.steering_images,
        "steering_pairs": len(pairs),
        "majority": majority,
        "test_questions": len(private["annotations"]),
        "wall_minutes": (time.perf_counter() - start) / 60,
        "runs_done": done,
        "runs_skipped": skipped,
        "prior_minutes": sum(r.get("prior_seconds", 0.0) for r in runs) / 60,
        "run_minutes": sum(r.get("prior_seconds", 0.0) + r["train_seconds"] + r["eval_seconds"] for r in runs) / 60,
        "machine": f"{os.cpu_count()} CPU cores, torch threads {_threads()}",
        "command": "python scripts/compare_topdown.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "map_block": args.map_block,
        "extra_map_block": args.extra_map_block,
        "stage1_metrics": getattr(args, "stage1_metrics", None),
    }
    (out / "results.json").write_text(json.dumps({"meta": meta, "summary": rows, "runs": runs}, indent=1) + "\n")
    (out / "results.md").write_text(markdown(rows, meta))
    plot(rows, majority, out / "comparison.png")

    # the picture: the most accurate AbSViT run whose top-down pass is active (its gate can stay shut:
    # then the top-down maps are the bottom-up ones and the picture shows nothing top-down) and whose
    # model is still on disk; the image and questions of the first steering pair about a colour or a shape
    absvit = [r for r in runs if r["variant"] == "absvit" and Path(r["export"]).is_dir()]
    active = [r for r in absvit if r.get("topdown_change", 0) > ACTIVE_CHANGE]
    if absvit and pairs:
        from absvl.models.vl import AbsVLForQuestionAnswering

        best = max(active or absvit, key=lambda r: r["accuracy"])
        pair = next((p for p in pairs if p["family"] in ("shape", "color")), pairs[0])
        image_path, texts = world.image_path(TEST_SPLIT, pair["image_id"]), list(pair["questions"])
        model = AbsVLForQuestionAnswering.from_pretrained(best["export"]).eval()
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
