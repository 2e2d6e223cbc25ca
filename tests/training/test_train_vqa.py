"""The VQA trainer end to end on a tiny Shapes world: learning, exact resume, multi-process, bad input."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from absvl.cli import main
from absvl.data.shapes_text import question_templates
from absvl.models.vl import AbsVLForQuestionAnswering, AbsVLModel, load_model
from absvl.training.config import ConfigError, load_config
from absvl.training.vqa import build_vqa_model, object_regions, train_vqa

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
    steering = {
        f"val/steer/{score}_{m}" for score in ("pointing", "paired") for m in ("bottom_up", "top_down", "fusion")
    }
    probes = {f"val/probe/{p}_{x}" for p in ("bottom_up", "top_down") for x in ("color", "shape", "position")}
    assert steering | probes <= set(val)
    assert all(0 <= val[k] <= 100 for k in probes | {k for k in steering if "pointing" in k})
    # keep_last=1 plus the best
    names = sorted(p.name for p in run.glob("checkpoint-*"))
    assert "checkpoint-00000012" in names and len(names) <= 2
    model = load_model(run / "final")
    assert type(model) is AbsVLForQuestionAnswering and not hasattr(model, "itm_head")  # one task, one head
    assert model.answers == json.loads((run / "answers.json").read_text())
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
                "model.prior_object_weight=0",  # the object-level prior term would hold the gate open on the objects
                "train.lr=3e-2",
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
    from absvl.training.vqa import build_vqa_model, prepare_data

    model = build_vqa_model(config, prepare_data(config).answers)
    return {k: v.detach() for k, v in model.state_dict().items()}


def test_unreadable_images_are_skipped_counted_and_listed(shapes_root, tiny_overrides, tmp_path):
    from absvl.training.data import grouped_permutation
    from absvl.training.vqa import prepare_data

    broken_root = tmp_path / "world"
    subprocess.run(["cp", "-r", str(shapes_root), str(broken_root)], check=True)
    overrides = [*tiny_overrides, f"data.root={broken_root}", "train.max_steps=8"]
    config = load_config(CONFIG, overrides)
    train = prepare_data(config).train  # the image of the run's first question (questions grouped by image)
    first = grouped_permutation([ex.image_path for ex in train], config.data.image_group_size, config.train.seed, 0)[0]
    victim = Path(train[first].image_path)
    victim.write_bytes(b"not a jpeg")
    summary = train_vqa(config)
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
    # a Shapes world's questions also per family of their templates (checked value by value below)
    assert set(scores) == {"overall", "perAnswerType", "perQuestionType", "perFamily", "skipped"}
    assert scores["skipped"] == 0
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
    scored = json.loads(out.read_text())
    assert scored["skipped"] == unreadable > 0
    printed = capsys.readouterr().out
    assert f"{unreadable} questions skipped (unreadable images): they score 0" in printed
    # a Shapes world's questions are also scored by the family of their template, each the mean of its questions
    families = question_templates((q["question_id"], q["question"]) for q in questions)
    assert set(scored["perFamily"]) == set(families.values()) and "question family" in printed
    sizes = Counter(families.values())
    assert len(families) == len(questions)  # every question has a family: their weighted mean is the overall
    weighted = sum(scored["perFamily"][f] * n for f, n in sizes.items()) / len(questions)
    assert weighted == pytest.approx(scored["overall"], abs=0.05)
    submission = tmp_path / "val-answers.json"
    assert (
        main(["predict", "vqa", "--model", export, "--data", str(world), "--split", "val", "--out", str(submission)])
        == 0
    )
    answers = AbsVLForQuestionAnswering.from_pretrained(export).answers
    assert f"{unreadable} questions had unreadable images: answered {answers[0]!r}" in capsys.readouterr().out
    assert len(json.loads(submission.read_text())) == len(questions)


def test_images_kept_elsewhere_are_found_through_data_images(shapes_root, tiny_overrides, tmp_path, capsys):
    world, coco = tmp_path / "world", tmp_path / "coco"  # coco/ holds train2014/ val2014/ test2015/
    shutil.copytree(shapes_root, world, ignore=shutil.ignore_patterns("images"))
    shutil.copytree(shapes_root / "images", coco)
    # the object-level terms (the prior's, the pointers', the count's, the top-down pass's) read the masks of a
    # Shapes world that keeps its images: off here
    no_objects = [
        "model.prior_object_weight=0",
        "model.pointer_loss_weight=0",
        "model.count_loss_weight=0",
        "model.topdown_object_weight=0",
    ]
    overrides = [*tiny_overrides, f"data.root={world}", "train.max_steps=2", *no_objects]
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
        "model.prior_object_weight=0",  # a Hub dataset does not know its objects
        "model.pointer_loss_weight=0",
        "model.count_loss_weight=0",
        "model.topdown_object_weight=0",
    ]
    summary = train_vqa(load_config(CONFIG, overrides))
    assert summary["step"] == 2 and summary["skipped"] == 0 and summary["val"]["overall"] >= 0


def test_a_question_without_a_prediction_scores_zero_in_validation_as_in_eval(shapes_root):
    from absvl.data.vqa import load_vqa_split
    from absvl.evaluation.vqa import score_predictions

    examples = load_vqa_split(shapes_root, "val")
    perfect = {ex.question_id: ex.answers[0] for ex in examples}
    everything = score_predictions(perfect, examples)["overall"]
    one_unreadable = dict(list(perfect.items())[1:])  # the first question's image could not be read
    assert score_predictions(one_unreadable, examples)["overall"] < everything
    assert score_predictions(one_unreadable, examples) == score_predictions(
        {**one_unreadable, examples[0].question_id: ""}, examples
    )


# --------------------------------------------------------------------------- loss diagnostics, object regions
# each loss term's weight (VQA's is 1) and the override that sets it
WEIGHTS = {
    "vqa": 1.0,
    "var": 0.3,
    "prior": 0.5,
    "prior_objects": 1.0,
    "gate": 0.1,
    "pointers": 0.7,
    "count": 0.4,
    "topdown_objects": 0.2,
}
WEIGHT_KEYS = {
    "var": "var_loss_weight",
    "prior": "prior_loss_weight",
    "prior_objects": "prior_object_weight",
    "gate": "gate_sparsity_weight",
    "pointers": "pointer_loss_weight",
    "count": "count_loss_weight",
    "topdown_objects": "topdown_object_weight",
}


def test_logged_steps_measure_each_loss_term_and_its_gradient_on_the_encoders(tiny_overrides, monkeypatch):
    measured = []
    measure = AbsVLModel.loss_gradient_norms

    def counting(self, losses):
        measured.append(sorted(losses))
        return measure(self, losses)

    monkeypatch.setattr(AbsVLModel, "loss_gradient_norms", counting)
    weights = [f"model.{key}={WEIGHTS[term]}" for term, key in WEIGHT_KEYS.items()]
    config = load_config(
        CONFIG, [*tiny_overrides, *weights, "train.max_steps=5", "train.log_every=2", "data.val_split=null"]
    )
    train_vqa(config)
    terms = ["count", "gate", "pointers", "prior", "prior_objects", "topdown_objects", "var", "vqa"]
    assert measured == [terms] * 3  # the logged steps 2, 4 and the last one, not the others
    records = [r for r in map(json.loads, (Path(config.train.output_dir) / "log.jsonl").open()) if "loss" in r]
    assert [r["step"] for r in records] == [2, 4, 5]
    for r in records:
        assert all(f"loss/{t}" in r for t in terms)
        # the logged loss is the step's loss: the weighted sum of its terms
        assert r["loss"] == pytest.approx(sum(WEIGHTS[t] * r[f"loss/{t}"] for t in terms), rel=1e-5)
        grads = {k: v for k, v in r.items() if k.startswith("grad/")}
        reaching = ("vqa", "prior", "prior_objects", "pointers", "count", "topdown_objects")
        assert {f"grad/{t}/{part}" for t in reaching for part in ("backbone", "text_encoder")} <= set(grads)
        assert set(grads) <= {f"grad/{t}/{part}" for t in terms for part in ("backbone", "text_encoder")}
        assert all(v >= 0 and np.isfinite(v) for v in grads.values())
        for t in reaching:  # the answer, the prior and the object-level supervision all reach both encoders
            assert grads[f"grad/{t}/backbone"] > 0 and grads[f"grad/{t}/text_encoder"] > 0, t


def test_measuring_the_gradients_does_not_change_training(tiny_overrides, tmp_path):
    finals = []
    for name, every in (("each", 1), ("never", 100)):
        overrides = [*tiny_overrides, "train.max_steps=3", f"train.log_every={every}", "data.val_split=null"]
        config = load_config(CONFIG, [*overrides, f"train.output_dir={tmp_path / name}"])
        finals.append(train_vqa(config)["export"])
    log = [json.loads(line) for line in (tmp_path / "each" / "log.jsonl").read_text().splitlines()]
    assert len([r for r in log if "grad/vqa/backbone" in r]) == 3
    _assert_same_weights(_weights(finals[0]), _weights(finals[1]))


def test_object_regions_come_from_a_shapes_world_and_nothing_else(shapes_root, tiny_overrides, tmp_path):
    from absvl.data.shapes_world import ShapesWorld
    from absvl.training.config import ConfigError
    from absvl.training.vqa import build_vqa_model, object_regions

    config = load_config(CONFIG, [*tiny_overrides, "model.prior_object_weight=1"])
    model = build_vqa_model(config, ["yes", "no"])
    regions = object_regions(config, model)
    assert set(regions) == {"object_masks", "grid"} and regions["grid"] == (4, 4)  # 32 px, 8-px patches
    world = ShapesWorld.load(shapes_root)
    scene = next(iter(world.load_scenes().values()))
    image = world.image_path(scene["split"], scene["image_id"])
    assert regions["object_masks"](str(image), scene["image_id"]) == world.mask_path(scene["split"], scene["image_id"])
    no_objects = [
        "model.prior_object_weight=0",
        "model.pointer_loss_weight=0",
        "model.count_loss_weight=0",
        "model.topdown_object_weight=0",
    ]
    off = load_config(CONFIG, [*tiny_overrides, *no_objects])
    assert object_regions(off, build_vqa_model(off, ["yes", "no"])) == {}
    # the pointers', the count's and the top-down pass's supervision read the same objects
    for weight in ("model.pointer_loss_weight=1", "model.count_loss_weight=1", "model.topdown_object_weight=1"):
        one = load_config(CONFIG, [*tiny_overrides, *no_objects, weight])
        assert object_regions(one, build_vqa_model(one, ["yes", "no"]))["grid"] == (4, 4)

    # an official-format VQAv2 folder that is no Shapes world: refused with the key to change, before training
    plain = tmp_path / "vqav2"
    shutil.copytree(shapes_root, plain, ignore=shutil.ignore_patterns("shapes_meta.json", "masks"))
    refused = load_config(CONFIG, [*tiny_overrides, f"data.root={plain}", f"train.output_dir={tmp_path / 'run'}"])
    with pytest.raises(
        ConfigError,
        match=r"model.prior_object_weight=1.0, model.pointer_loss_weight=1.0, model.count_loss_weight=1.0 and "
        r"model.topdown_object_weight=0.3 needs data",
    ):
        object_regions(refused, model)
    with pytest.raises(
        ConfigError,
        match=r"set model.prior_object_weight=0, model.pointer_loss_weight=0, model.count_loss_weight=0 and "
        r"model.topdown_object_weight=0",
    ):
        train_vqa(refused)
    assert not list((tmp_path / "run").glob("checkpoint-*"))
    # a backbone without patch tokens has no patch grid
    cnn = load_config(CONFIG, [*tiny_overrides, "model.backbone=tdam_resnet_test", "model.backbone_kwargs={}"])
    with pytest.raises(
        ConfigError,
        match=r"model.prior_object_weight=1.0, model.pointer_loss_weight=1.0, model.count_loss_weight=1.0 and "
        r"model.topdown_object_weight=0.3 needs a ViT",
    ):
        object_regions(cnn, build_vqa_model(cnn, ["yes", "no"]))


def test_object_prior_refuses_randaugment_that_moves_images_but_not_masks(tiny_overrides):
    config = load_config(
        "configs/shapes_absvit_tiny.yaml", [*tiny_overrides, "data.randaugment=true", "model.prior_object_weight=1"]
    )
    model = build_vqa_model(config, ["yes", "no"])
    with pytest.raises(ConfigError, match="data.randaugment"):
        object_regions(config, model)
