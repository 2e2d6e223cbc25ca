"""scripts/compare_topdown.py: the variants and their recipe, the report's arithmetic on hand-made records, and
--quick end to end on 2 variants x 1 seed (prior alignment then VQA for AbSViT, VQA alone for ViT)."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
from PIL import Image

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "compare_topdown.py"


@pytest.fixture(scope="module")
def compare():
    spec = importlib.util.spec_from_file_location("compare_topdown", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    with pytest.MonkeyPatch.context() as patch:
        # as when run as a script, its folder is on sys.path: it imports its sibling module from there
        patch.syspath_prepend(str(SCRIPT.parent))
        patch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
        spec.loader.exec_module(module)
        yield module


@pytest.fixture(scope="module")
def report(compare):
    return sys.modules["topdown_report"]


def test_variants_are_the_paper_comparison(compare):
    assert list(compare.VARIANTS) == [
        "vit",
        "vit_prior",
        "perceiver",
        "feedback",
        "maskatt",
        "absvit_qkv",
        "absvit_no_var",
        "absvit",
        "vars_d",
        "vars_d_absvit",
    ]
    from absvl.models.vision.builder import create_backbone

    for variant in compare.VARIANTS.values():  # every variant builds from the registry as configured
        backbone = create_backbone(variant.backbone, img_size=32, **variant.kwargs)
        assert (backbone.topdown != "none") == variant.topdown == (variant.name in compare.TOPDOWN_VARIANTS)
        # the prior alignment runs exactly for the backbones with a prior gate, and for the controls
        uses_prior = backbone.topdown_mode.uses_prior or variant.name in compare.CONTROL_VARIANTS
        assert uses_prior == variant.prior == (variant.name in compare.PRIOR_VARIANTS)
    no_var = compare.VARIANTS["absvit_no_var"]
    assert no_var.kwargs == {"variational_loss": False} and "model.var_loss_weight=0" in no_var.overrides
    assert compare.parse_seeds("3") == [0, 1, 2] and compare.parse_seeds("0,5") == [0, 5]


def test_each_variant_gets_the_recipe_it_can_use(compare, tmp_path):
    vit, feedback, absvit = (compare.VARIANTS[n] for n in ("vit", "feedback", "absvit"))
    # no gate: the object-level prior term is off; no second pass: the fusion reads the one pass once
    assert vit.model_overrides() == ["model.fusion_reads=top_down", "model.prior_object_weight=0"]
    assert feedback.model_overrides() == ["model.prior_object_weight=0"]
    assert absvit.model_overrides() == []
    args = compare.parse_args(
        ["--quick", "--set", "model.alpha=5", "--set", "train.lr=1e-3", "--prior-set", "train.lr=2e-3"]
    )
    prior = compare.prior_overrides(absvit, 1, args, tmp_path / "prior")
    assert (
        "train.max_steps=2" in prior and "train.seed=1" in prior and f"train.output_dir={tmp_path / 'prior'}" in prior
    )
    # --set's model keys reach the prior stage (the VQA run takes the export's architecture), the rest does not
    assert "model.alpha=5" in prior and "train.lr=1e-3" not in prior and prior[-1] == "train.lr=2e-3"
    vqa = compare.run_overrides(absvit, 1, args, tmp_path / "vqa", init_from="P/final")
    assert (
        "train.init_from=P/final" in vqa
        and "train.lr=2e-3" not in vqa
        and vqa[-2:] == ["model.alpha=5", "train.lr=1e-3"]
    )
    assert not any(o.startswith("train.init_from") for o in compare.run_overrides(vit, 1, args, tmp_path))
    assert any(o.startswith("model.backbone_kwargs=") and "img_size: 32" in o for o in prior)
    from absvl.training.config import load_config

    for variant in compare.VARIANTS.values():  # every variant's overrides make valid configs of both stages
        config = load_config(args.config, compare.run_overrides(variant, 0, args, tmp_path))
        assert config.model.backbone == variant.backbone and config.train.max_steps == 2
        if variant.prior:
            load_config(args.prior_config, compare.prior_overrides(variant, 0, args, tmp_path))
        else:
            assert config.model.prior_object_weight == 0
    assert compare.parse_args([]).steering_images == 200 and compare.parse_args([]).prior_steps == 400


def _scores(bu, td, fusion, gate=None, paired_td=1.0, chance=20.0, families=("color", "shape")):
    """steering_scores-shaped output: the same numbers on every family and ``all``."""
    maps = {"bottom_up": bu, "top_down": td, "fusion": fusion, **({"gate": gate} if gate is not None else {})}
    block = {
        "questions": 4,
        "pairs": 2,
        "pointing": dict(maps),
        "paired": {m: {"median": paired_td if m == "top_down" else 1.0, "mean": 9.0} for m in maps},
        "chance": chance,
    }
    return {"families": {f: json.loads(json.dumps(block)) for f in families}, "all": block}


def _record(variant, seed, accuracy, steering, change=0.5, gate=None):
    return {
        "variant": variant,
        "seed": seed,
        "accuracy": accuracy,
        "steering": steering,
        "steering_other_block": steering,
        "prior_mask_mean": gate,
        "topdown_change": change,
        "prior_seconds": 10.0 if gate is not None else 0.0,
        "train_seconds": 100.0,
    }


def test_report_aggregates_the_steering_over_seeds(compare, report):
    runs = [
        _record("absvit", 1, 52.0, _scores(20.0, 60.0, 50.0, gate=90.0, paired_td=3.0), gate=0.2),
        _record("absvit", 0, 50.0, _scores(30.0, 40.0, 30.0, gate=80.0, paired_td=1.0), gate=0.1),
        _record("vit", 0, 51.0, _scores(25.0, 25.0, 0.0), change=0.0),
    ]
    variants = [compare.VARIANTS["vit"], compare.VARIANTS["absvit"]]
    vit, absvit = report.aggregate(runs, variants, compare.TOPDOWN_VARIANTS)
    assert absvit["seeds"] == [0, 1] and absvit["accuracies"] == [50.0, 52.0]
    assert absvit["accuracy"] == pytest.approx((51.0, math.sqrt(2)))  # mean, sample std
    assert absvit["pointing"]["bottom_up"] == pytest.approx((25.0, math.sqrt(50)))
    assert absvit["pointing"]["top_down"] == pytest.approx((50.0, math.sqrt(200)))
    assert absvit["pointing"]["fusion"] == pytest.approx((40.0, math.sqrt(200)))
    assert absvit["pointing"]["gate"] == pytest.approx((85.0, math.sqrt(50)))
    assert absvit["paired"]["top_down"] == pytest.approx((2.0, math.sqrt(2)))  # the medians, not the means
    assert absvit["family_pointing"]["shape"]["top_down"] == pytest.approx((50.0, math.sqrt(200)))
    assert list(absvit["family_pointing"]) == ["color", "shape", "all"] and absvit["chance"]["all"] == (20.0, 0.0)
    assert absvit["other_pointing"]["top_down"] == pytest.approx((50.0, math.sqrt(200)))
    assert absvit["prior_mask_mean"] == pytest.approx((0.15, math.sqrt(0.005)))
    assert absvit["prior_seconds"] == 10.0 and absvit["train_seconds"] == 100.0
    # one seed: std 0; no top-down pass: its top-down copy and its zero fusion map are not reported, no gate
    assert vit["accuracy"] == (51.0, 0.0) and vit["pointing"]["bottom_up"] == (25.0, 0.0)
    assert vit["pointing"]["top_down"] is None and vit["pointing"]["fusion"] is None
    assert vit["pointing"]["gate"] is None and vit["paired"]["top_down"] is None
    assert vit["topdown_change"] is None and vit["prior_mask_mean"] is None
    # a family without pairs in one seed is averaged over the other seeds; NaN alone is "n/a"
    runs[0]["steering"]["families"].pop("color")
    runs[1]["steering"]["families"]["color"]["pointing"]["top_down"] = float("nan")
    (_, absvit) = report.aggregate(runs, variants, compare.TOPDOWN_VARIANTS)
    assert math.isnan(absvit["family_pointing"]["color"]["top_down"][0])
    assert absvit["family_pointing"]["color"]["bottom_up"] == (30.0, 0.0)

    meta = {
        "steps": 500,
        "prior_steps": 400,
        "prior_variants": ["absvit"],
        "batch_size": 64,
        "seeds": [0, 1],
        "config": "configs/compare_topdown.yaml",
        "prior_config": "configs/shapes_prior.yaml",
        "set": [],
        "prior_set": [],
        "steering_images": 200,
        "steering_pairs": 1000,
        "majority": 22.5,
        "test_questions": 8000,
        "wall_minutes": 1.0,
        "runs_done": 3,
        "runs_skipped": 0,
        "prior_minutes": 0.3,
        "run_minutes": 5.0,
        "machine": "2 CPU cores",
        "command": "python scripts/compare_topdown.py",
        "extra_map_block": 0,
    }
    table = report.markdown(report.aggregate(runs, variants, compare.TOPDOWN_VARIANTS), meta)
    for column in (
        "Test-dev acc.",
        "Pointing BU %",
        "Pointing TD %",
        "Pointing fusion %",
        "Paired TD",
        "Paired fusion",
    ):
        assert column in table
    absvit_line = next(line for line in table.splitlines() if line.startswith("| AbSViT | `"))
    cells = [c.strip() for c in absvit_line.split("|")[1:-1]]
    assert cells[2:9] == ["yes", "51.00 ± 1.41", "25 ± 7", "50 ± 14", "40 ± 14", "2.00 ± 1.41", "1.00 ± 0.00"]
    assert cells[-1] == "10 + 100"  # prior + VQA seconds
    vit_line = next(line for line in table.splitlines() if line.startswith("| ViT | `"))
    assert [c.strip() for c in vit_line.split("|")[1:-1]][2:9] == ["no", "51.00 ± 0.00", "25 ± 0", "—", "—", "—", "—"]
    assert "| Variant | color | shape | all |" in table and "| chance | 20 | 20 | 20 |" in table
    assert "| AbSViT | n/a (30 ± 0) | 50 ± 14 (25 ± 7) | 50 ± 14 (25 ± 7) |" in table


def test_quick_run_writes_the_results_and_skips_done_runs(compare, shapes_root, tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["--quick", "--variants", "vit,absvit", "--seeds", "1", "--out", str(out), "--data-root", str(shapes_root)]
    report = compare.main(argv)
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert [(r["variant"], r["seed"]) for r in runs] == [("vit", 0), ("absvit", 0)]
    # stage 1 (as in make demo) ran first, into the work folder, and the runs started from it
    assert "stage 1 (vision pretraining)" in capsys.readouterr().out
    assert (out / "work" / "pretrain" / "final" / "model.safetensors").is_file()
    for run in runs:
        assert run["steps"] == 2 and 0 <= run["accuracy"] <= 100
        assert run["steering"]["all"]["pairs"] > 0 and 0 <= run["steering"]["all"]["pointing"]["bottom_up"] <= 100
        assert set(run["steering"]["families"]) <= {"color", "shape", "exist", "count", "rel_yn", "rel_what"}
        assert run["steering_other_block"]["all"]["pairs"] == run["steering"]["all"]["pairs"]
        assert (out / "runs" / f"{run['variant']}_seed0.json").is_file()
        assert run["budget"]["steering_images"] == 8 and "attention" not in run
    vit, absvit = runs
    # ViT: VQA straight from stage 1; AbSViT: the prior alignment first, VQA from its export
    assert vit["prior_stage"] is None and vit["prior_mask_mean"] is None and vit["prior_seconds"] == 0
    assert "model.prior_object_weight=0" in vit["overrides"] and "model.fusion_reads=top_down" in vit["overrides"]
    prior_export = out / "work" / "absvit_seed0" / "prior" / "final"
    assert absvit["prior_stage"]["steps"] == 2 and absvit["prior_stage"]["export"] == str(prior_export)
    assert f"train.init_from={prior_export}" in absvit["overrides"] and prior_export.is_dir()
    assert "gate_pointing" in absvit["prior_stage"]["val"] and absvit["prior_mask_mean"] >= 0
    assert "gate" in absvit["steering"]["all"]["pointing"] and "gate" not in vit["steering"]["all"]["pointing"]
    summary = {row["variant"]: row for row in report["summary"]}
    assert set(summary) == {"vit", "absvit"} and summary["absvit"]["accuracy"][1] == 0.0  # one seed: std 0
    assert summary["vit"]["pointing"]["top_down"] is None and summary["absvit"]["pointing"]["top_down"] is not None
    table = (out / "results.md").read_text()
    assert "| ViT |" in table and "| AbSViT |" in table and "Pointing TD %" in table and "Paired fusion" in table
    assert "absvl.metrics.steering" in table and "| chance |" in table
    assert Image.open(out / "comparison.png").size[0] >= 900
    assert Image.open(out / "attention.png").size[0] == 6 * 224  # image | bottom-up | two top-down maps | two gates
    # a second invocation reuses both runs
    capsys.readouterr()
    again = compare.main(argv)
    assert "done before, skipped" in capsys.readouterr().out
    assert again["meta"]["runs_done"] == 0 and again["meta"]["runs_skipped"] == 2
    assert [r["accuracy"] for r in again["runs"]] == [r["accuracy"] for r in runs]
    # without an AbSViT model on disk the picture is not drawn (and no other variant is drawn as AbSViT)
    (out / "attention.png").unlink()
    capsys.readouterr()
    compare.main(["--quick", "--variants", "vit", "--seeds", "1", "--out", str(out), "--data-root", str(shapes_root)])
    assert "attention.png not drawn" in capsys.readouterr().out and not (out / "attention.png").exists()
