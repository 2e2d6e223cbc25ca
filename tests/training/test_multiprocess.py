"""Two-process (torchrun, gloo) training with unreadable images on every rank, and with
parameters that get no gradient: every run finishes, with the counts a one-process run gives."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .test_train_retrieval import retrieval_overrides

pytestmark = pytest.mark.slow

CONFIG = "configs/shapes_absvit_tiny.yaml"
RETRIEVAL_CONFIG = "configs/shapes_retrieval.yaml"


def _torchrun(args, port, timeout=420, program=("-m", "absvl.cli")):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]
    # a rank left waiting in a collective would hang: the timeout turns that into a failure
    result = subprocess.run([*torchrun, *program, *args], capture_output=True, text=True, env=env, timeout=timeout)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[:6000]
    return result


def _one_process(args):
    result = subprocess.run(
        [sys.executable, "-m", "absvl.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def _break_images(root, folder, keep):
    """Overwrite every image of ``root/images/folder`` but the first ``keep`` with junk; returns their names."""
    broken = []
    for path in sorted((root / "images" / folder).iterdir())[keep:]:
        path.write_bytes(b"not an image")
        broken.append(path.name)
    return set(broken)


def _log(run):
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_vqa_with_validation_and_unreadable_images_on_every_rank(shapes_root, tiny_overrides, tmp_path):
    world = tmp_path / "world"
    shutil.copytree(shapes_root, world)
    # 4 readable training images of 32 (16 of 128 questions): with 4 questions per rank and
    # micro-step, most batches are all unreadable, on both ranks, and often on one rank only
    broken_train = _break_images(world, "train2014", keep=4)
    broken_val = _break_images(world, "val2014", keep=2)
    common = [*tiny_overrides, f"data.root={world}", "train.max_steps=24", "train.eval_every=12"]
    two, one = tmp_path / "two", tmp_path / "one"
    printed = _torchrun(
        ["train", "vqa", "--config", CONFIG, *common, "train.batch_size=4", f"train.output_dir={two}"], 29571
    ).stdout
    _one_process(["train", "vqa", "--config", CONFIG, *common, "train.batch_size=8", f"train.output_dir={one}"])

    # 24 steps of 8 questions cover the 128 training questions (ones without an in-vocabulary
    # answer are dropped) more than once: every unreadable item is listed once, from both ranks
    skipped_two = json.loads((two / "skipped.json").read_text())
    skipped_one = json.loads((one / "skipped.json").read_text())
    assert len({json.dumps(s) for s in skipped_two}) == len(skipped_two)  # each item once
    assert sorted(map(json.dumps, skipped_two)) == sorted(map(json.dumps, skipped_one))
    assert {Path(s[1]).name for s in skipped_two} == broken_train
    assert f"{len(skipped_two)} items ({len(broken_train)} unreadable images) were skipped" in printed

    # validation: every readable question predicted once, the rest counted, as with one process
    val_two = [r for r in _log(two) if "val/accuracy" in r]
    val_one = [r for r in _log(one) if "val/accuracy" in r]
    assert [r["step"] for r in val_two] == [12, 24]
    questions = json.loads((world / "v2_OpenEnded_mscoco_val2014_questions.json").read_text())["questions"]
    unreadable = sum(f"COCO_val2014_{q['image_id']:012d}.jpg" in broken_val for q in questions)
    assert 0 < unreadable < len(questions)
    for two_record, one_record in zip(val_two, val_one):
        assert two_record["val/skipped"] == one_record["val/skipped"] == unreadable
        assert two_record["val/scored"] == one_record["val/scored"] == len(questions) - unreadable


def test_a_skipped_micro_step_changes_nothing_and_an_empty_process_keeps_its_buffers(tmp_path):
    # no process has items: neither runs a forward or an optimizer step, so the weights, the BatchNorm statistics
    # and AdamW's moments and step count stay. Only rank 0 has items: the step runs on both alike from rank 0's
    # gradient, and rank 1's stand-in forward leaves its BatchNorm statistics as they were
    _torchrun([str(tmp_path)], 29579, timeout=180, program=(str(Path(__file__).with_name("skip_step_worker.py")),))
    for rank in (0, 1):
        report = json.loads((tmp_path / f"{rank}.json").read_text())
        assert report["ran"] == [True, True, True] and report["skipped_returned_none"]
        assert report["changed_by_skip"] == []
        assert report["params_changed_by_partial"] and report["params_changed_by_third"]
        running = [name for name in report["buffers_changed_by_partial"] if "running_mean" in name]
        assert bool(running) == (rank == 0), report["buffers_changed_by_partial"]
        assert report["ranks_agree"]
        assert report["adamw_steps"] == [3.0]  # three steps taken, the skipped one not counted


def test_vqa_with_prior_loss_weight_zero(tiny_overrides, tmp_path):
    # the contrastive head gets no gradient: frozen for the run, so DDP's reduction completes
    run = tmp_path / "run"
    printed = _torchrun(
        [
            "train",
            "vqa",
            "--config",
            CONFIG,
            *tiny_overrides,
            "model.prior_loss_weight=0",
            "model.gate_sparsity_weight=0",
            "train.max_steps=3",
            "data.val_split=null",
            "train.batch_size=4",
            f"train.output_dir={run}",
        ],
        29573,
    ).stdout
    assert "get no gradient in this run and are frozen: contrastive.logit_scale" in printed
    assert (run / "final" / "model.safetensors").is_file()


def test_vqa_with_a_backbone_that_ignores_the_prior(tiny_overrides, tmp_path):
    run = tmp_path / "run"
    _torchrun(
        [
            "train",
            "vqa",
            "--config",
            CONFIG,
            *tiny_overrides,
            "model.backbone=vit_test_patch8",
            "model.prior_loss_weight=0",
            "model.gate_sparsity_weight=0",
            "train.max_steps=3",
            "data.val_split=null",
            "train.batch_size=4",
            f"train.output_dir={run}",
        ],
        29575,
    )
    assert (run / "final" / "model.safetensors").is_file()


def test_retrieval_with_unreadable_images_on_every_rank(shapes_root, tiny_model_overrides, tmp_path):
    world = tmp_path / "world"
    shutil.copytree(shapes_root, world)
    broken = _break_images(world, "train2014", keep=4)
    overrides = [
        *retrieval_overrides(world, tiny_model_overrides, tmp_path / "run", 10),
        "train.batch_size=4",
        "data.max_val_images=8",
    ]
    printed = _torchrun(["train", "retrieval", "--config", RETRIEVAL_CONFIG, *overrides], 29577).stdout
    skipped = json.loads((tmp_path / "run" / "skipped.json").read_text())
    assert len({json.dumps(s) for s in skipped}) == len(skipped)
    assert {Path(s[1]).name for s in skipped} == broken  # 10 steps of 8 cover the 32 training images
    assert f"{len(skipped)} items ({len(broken)} unreadable images) were skipped" in printed
