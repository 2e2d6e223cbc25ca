"""Smoke test of scripts/compare_topdown.py: --quick on 2 variants x 1 seed, outputs and skip-done."""

import importlib.util
import json
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


def test_variants_are_the_paper_comparison(compare):
    assert list(compare.VARIANTS) == [
        "vit",
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
        assert (backbone.topdown != "none") == (variant.name in compare.TOPDOWN_VARIANTS)
    no_var = compare.VARIANTS["absvit_no_var"]
    assert no_var.kwargs == {"variational_loss": False} and "model.var_loss_weight=0" in no_var.overrides
    assert compare.parse_seeds("3") == [0, 1, 2] and compare.parse_seeds("0,5") == [0, 5]


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
        assert run["attention"]["bottom_up"] >= 0 and run["attention"]["questions"] > 0
        assert (out / "runs" / f"{run['variant']}_seed0.json").is_file()
    vit, absvit = runs
    assert vit["attention"]["top_down"] is None and vit["prior_mask_score"] is None
    assert absvit["attention"]["top_down"] >= 0 and absvit["prior_mask_score"] >= 0
    summary = {row["variant"]: row for row in report["summary"]}
    assert set(summary) == {"vit", "absvit"} and summary["absvit"]["accuracy"][1] == 0.0  # one seed: std 0
    table = (out / "results.md").read_text()
    assert "| ViT |" in table and "| AbSViT |" in table and "Top-down score" in table
    assert Image.open(out / "comparison.png").size[0] >= 900
    assert Image.open(out / "attention.png").size[0] == 4 * 224  # image | bottom-up | two top-down maps
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
