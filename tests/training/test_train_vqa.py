"""The VQA trainer end to end on a tiny Shapes world: learning, exact resume, multi-process, bad input."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from absvl.cli import main
from absvl.models.vl import AbsVLModel
from absvl.training.config import load_config
from absvl.training.vqa import train_vqa

CONFIG = "configs/shapes_absvit_tiny.yaml"


def _weights(folder):
    return load_file(str(Path(folder) / "model.safetensors"))


def _assert_same_weights(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for key in a:
        if atol == 0.0:
            assert torch.equal(a[key], b[key]), key
        else:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=atol, msg=key)


def test_demo_config_trains_evaluates_and_exports(tiny_overrides, tmp_path):
    config = load_config(CONFIG, [*tiny_overrides, "train.max_steps=12", "train.save_every=4", "train.eval_every=6"])
    summary = train_vqa(config)
    run = Path(config.train.output_dir)
    assert summary["step"] == 12 and summary["val"]["overall"] >= 0
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3])  # it learns
    assert [r["step"] for r in log if "val/accuracy" in r] == [6, 12]
    # the gate's health with every loss, the attention scores with every validation (a Shapes world)
    assert all(
        {"gate/mean", "gate/open", "prior/xi_pairwise_cos", "topdown/change"} <= set(r) for r in log if "loss" in r
    )
    val = [r for r in log if "val/accuracy" in r][-1]
    assert {"val/attention_bottom_up", "val/attention_top_down", "val/attention_top_down_others"} <= set(val)
    # keep_last=1 plus the best
    names = sorted(p.name for p in run.glob("checkpoint-*"))
    assert "checkpoint-00000012" in names and len(names) <= 2
    model = AbsVLModel.from_pretrained(run / "final")
    assert model.answers == json.loads((run / "answers.json").read_text())
    assert model.config.trained_tasks == ["vqa"]
    assert (run / "final" / "README.md").read_text().count("VQA accuracy") >= 1


def test_a_gate_that_stays_shut_is_reported(tiny_overrides, tmp_path, capsys):
    messages = []
    train_vqa(
        load_config(
            CONFIG,
            [
                *tiny_overrides,
                "train.max_steps=6",
                "data.val_split=null",
                "model.alpha=1",
                "model.gate_sparsity_weight=1000",
                "train.lr=1e-2",
            ],
        ),
        notify=messages.append,
    )
    assert messages[0].startswith("training on ")
    assert any(m.startswith("warning: the prior gate clamp(cos(xi, z), 0, 1) stayed shut") for m in messages)
    assert capsys.readouterr().out == ""  # the library prints nothing: the caller decides (the CLI prints)


def _train_cmd(overrides, resume=False):
    cmd = [sys.executable, "-m", "absvl.cli", "train", "vqa", "--config", CONFIG, *overrides]
    return cmd + (["--resume"] if resume else [])


@pytest.mark.slow
def test_sigkill_and_resume_ends_with_identical_weights(tiny_overrides, tmp_path):
    straight = [*tiny_overrides, "train.max_steps=24", "train.save_every=3", f"train.output_dir={tmp_path / 'a'}"]
    subprocess.run(_train_cmd(straight), check=True, capture_output=True)

    killed_run = tmp_path / "b"
    interrupted = [*straight[:-1], f"train.output_dir={killed_run}"]
    proc = subprocess.Popen(_train_cmd(interrupted), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed_run / "checkpoint-00000006").exists() and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (killed_run / "final").exists(), "the run finished before it could be killed"
    subprocess.run(_train_cmd(interrupted, resume=True), check=True, capture_output=True)
    _assert_same_weights(_weights(tmp_path / "a" / "final"), _weights(killed_run / "final"))


@pytest.mark.slow
def test_two_process_torchrun_matches_one_process_with_the_same_global_batch(shapes_root, tiny_overrides, tmp_path):
    # eps=1 makes AdamW's step ~linear in the gradient: with the default 1e-8 a weight whose
    # gradient is ~0 moves by ±lr on the sign of float noise, which no reduction order controls.
    # and no dropout anywhere: the two runs draw their random numbers differently
    encoder = tmp_path / "text_encoder"
    shutil.copytree(shapes_root / "text_encoder", encoder)
    text_config = json.loads((encoder / "config.json").read_text())
    text_config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (encoder / "config.json").write_text(json.dumps(text_config))
    common = [
        *tiny_overrides,
        f"model.text_encoder={encoder}",
        "train.max_steps=3",
        "train.lr=0.05",
        "train.eps=1.0",
        "train.warmup_ratio=0",
    ]
    one = [*common, "train.batch_size=8", f"train.output_dir={tmp_path / 'one'}"]
    two = [*common, "train.batch_size=4", f"train.output_dir={tmp_path / 'two'}"]
    subprocess.run(_train_cmd(one), check=True, capture_output=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533"]
    result = subprocess.run(
        [*torchrun, "-m", "absvl.cli", "train", "vqa", "--config", CONFIG, *two],
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "3 steps of 8 samples" in result.stdout
    one_w, two_w = _weights(tmp_path / "one" / "final"), _weights(tmp_path / "two" / "final")
    _assert_same_weights(one_w, two_w, atol=1e-5)
    moved = max((one_w[k] - w).abs().max().item() for k, w in _initial_weights(common, tmp_path).items())
    assert moved > 1e-3  # the three steps did train


def _initial_weights(overrides, tmp_path):
    config = load_config(CONFIG, [*overrides, f"train.output_dir={tmp_path / 'init'}"])
    torch.manual_seed(config.train.seed)
    from absvl.training.vqa import build_model, prepare_data

    model = build_model(config, prepare_data(config).answers)
    return {k: v.detach() for k, v in model.state_dict().items()}


def test_unreadable_images_are_skipped_counted_and_listed(shapes_root, tiny_overrides, tmp_path):
    broken_root = tmp_path / "world"
    subprocess.run(["cp", "-r", str(shapes_root), str(broken_root)], check=True)
    victim = sorted((broken_root / "images" / "train2014").iterdir())[0]
    victim.write_bytes(b"not a jpeg")
    overrides = [*tiny_overrides, f"data.root={broken_root}", "train.max_steps=8"]
    summary = train_vqa(load_config(CONFIG, overrides))
    assert summary["step"] == 8 and summary["skipped"] >= 1
    listed = json.loads((Path(load_config(CONFIG, overrides).train.output_dir) / "skipped.json").read_text())
    assert any(victim.name in str(item) for item in listed)


def test_eval_and_predict_commands(tiny_overrides, shapes_root, tmp_path, capsys):
    config = load_config(CONFIG, tiny_overrides)
    export = train_vqa(config)["export"]
    out = tmp_path / "val.json"
    assert (
        main(
            [
                "eval",
                "vqa",
                "--model",
                export,
                "--data",
                str(shapes_root),
                "--split",
                "val",
                "--out",
                str(out),
                "--batch-size",
                "16",
            ]
        )
        == 0
    )
    scores = json.loads(out.read_text())
    assert set(scores) == {"overall", "perAnswerType", "perQuestionType", "skipped"} and scores["skipped"] == 0
    assert "overall" in capsys.readouterr().out.lower()

    submission = tmp_path / "test-dev.json"
    assert (
        main(
            [
                "predict",
                "vqa",
                "--model",
                export,
                "--data",
                str(shapes_root),
                "--split",
                "test-dev",
                "--out",
                str(submission),
            ]
        )
        == 0
    )
    answers = json.loads(submission.read_text())
    questions = json.loads((shapes_root / "v2_OpenEnded_mscoco_test-dev2015_questions.json").read_text())["questions"]
    assert [a["question_id"] for a in answers] == [q["question_id"] for q in questions]
    assert all(set(a) == {"question_id", "answer"} and isinstance(a["answer"], str) for a in answers)

    # the submission file scores through the official-format path too
    private = shapes_root / "shapes_test-dev2015_annotations.json"
    questions_file = shapes_root / "v2_OpenEnded_mscoco_test-dev2015_questions.json"
    assert (
        main(
            [
                "eval",
                "vqa",
                "--predictions",
                str(submission),
                "--questions",
                str(questions_file),
                "--annotations",
                str(private),
            ]
        )
        == 0
    )


def test_bad_config_is_one_clear_line(capsys):
    assert main(["train", "vqa", "--config", CONFIG, "train.lrr=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("absvl: error: unknown config key 'train.lrr'") and "Traceback" not in err


def test_eval_counts_the_questions_whose_image_is_unreadable(shapes_root, tiny_overrides, tmp_path, capsys):
    export = train_vqa(load_config(CONFIG, [*tiny_overrides, "train.max_steps=2", "data.val_split=null"]))["export"]
    world = tmp_path / "world"
    shutil.copytree(shapes_root, world)
    victim = sorted((world / "images" / "val2014").iterdir())[0]
    victim.write_bytes(b"not a jpeg")
    questions = json.loads((world / "v2_OpenEnded_mscoco_val2014_questions.json").read_text())["questions"]
    unreadable = sum(victim.name == f"COCO_val2014_{q['image_id']:012d}.jpg" for q in questions)
    out = tmp_path / "val.json"
    assert main(["eval", "vqa", "--model", export, "--data", str(world), "--split", "val", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["skipped"] == unreadable > 0
    assert f"{unreadable} questions skipped (unreadable images): they score 0" in capsys.readouterr().out
    submission = tmp_path / "val-answers.json"
    assert (
        main(["predict", "vqa", "--model", export, "--data", str(world), "--split", "val", "--out", str(submission)])
        == 0
    )
    answers = AbsVLModel.from_pretrained(export).answers
    assert f"{unreadable} questions had unreadable images: answered {answers[0]!r}" in capsys.readouterr().out
    assert len(json.loads(submission.read_text())) == len(questions)


def test_images_kept_elsewhere_are_found_through_data_images(shapes_root, tiny_overrides, tmp_path, capsys):
    world, coco = tmp_path / "world", tmp_path / "coco"  # coco/ holds train2014/ val2014/ test2015/
    shutil.copytree(shapes_root, world, ignore=shutil.ignore_patterns("images"))
    shutil.copytree(shapes_root / "images", coco)
    overrides = [*tiny_overrides, f"data.root={world}", "train.max_steps=2"]
    with pytest.raises(FileNotFoundError, match="none of the first 20 images exists .*point data.images at the folder"):
        train_vqa(load_config(CONFIG, overrides))
    summary = train_vqa(load_config(CONFIG, [*overrides, f"data.images={coco}"]))
    assert summary["step"] == 2 and summary["skipped"] == 0

    assert main(["data", "check", str(world), "--images", str(coco)]) == 0
    assert main(["data", "check", str(world)]) == 1
    capsys.readouterr()
    out = tmp_path / "val.json"
    assert (
        main(
            [
                "eval",
                "vqa",
                "--model",
                summary["export"],
                "--data",
                str(world),
                "--images",
                str(coco),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert json.loads(out.read_text())["skipped"] == 0
    submission = tmp_path / "test-dev.json"
    assert (
        main(
            [
                "predict",
                "vqa",
                "--model",
                summary["export"],
                "--data",
                str(world),
                "--images",
                str(coco),
                "--out",
                str(submission),
            ]
        )
        == 0
    )
    assert len(json.loads(submission.read_text())) > 0
    assert (
        main(["eval", "vqa", "--model", summary["export"], "--data", str(world), "--images", str(tmp_path / "nowhere")])
        == 2
    )
    assert f"data.images={tmp_path / 'nowhere'} should hold val2014/" in capsys.readouterr().err


def test_a_hub_style_dataset_repository_trains_with_a_column_mapping(
    shapes_root, tiny_overrides, tmp_path, monkeypatch
):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")
    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    for split, tag in (("train", "train2014"), ("validation", "val2014")):
        questions = json.loads((shapes_root / f"v2_OpenEnded_mscoco_{tag}_questions.json").read_text())["questions"]
        answers = {
            a["question_id"]: a
            for a in json.loads((shapes_root / f"v2_mscoco_{tag}_annotations.json").read_text())["annotations"]
        }
        rows = [
            {
                "id": q["question_id"],
                "image_id": q["image_id"],
                "question": q["question"],
                "answers": [a["answer"] for a in answers[q["question_id"]]["answers"]],
                "file": f"{tag}/COCO_{tag}_{q['image_id']:012d}.jpg",
            }
            for q in questions
        ]
        (repo / "data" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (repo / "README.md").write_text("# Shapes questions, Hub layout (data/<split>.jsonl)\n")
    overrides = [
        *tiny_overrides,
        "data.format=hf",
        f"data.root={repo}",
        f"data.images={shapes_root / 'images'}",
        "data.hf_columns={question_id: id, image: file}",
        "train.max_steps=2",
    ]
    summary = train_vqa(load_config(CONFIG, overrides))
    assert summary["step"] == 2 and summary["skipped"] == 0 and summary["val"]["overall"] >= 0


def test_a_question_without_a_prediction_scores_zero_in_validation_as_in_eval(shapes_root):
    from absvl.data.vqa import load_vqa_split
    from absvl.training.vqa import score_predictions

    examples = load_vqa_split(shapes_root, "val")
    perfect = {ex.question_id: ex.answers[0] for ex in examples}
    everything = score_predictions(perfect, examples)["overall"]
    one_unreadable = dict(list(perfect.items())[1:])  # the first question's image could not be read
    assert score_predictions(one_unreadable, examples)["overall"] < everything
    assert score_predictions(one_unreadable, examples) == score_predictions(
        {**one_unreadable, examples[0].question_id: ""}, examples
    )
