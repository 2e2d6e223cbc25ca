"""The best validated checkpoint exported as best/ beside final/, and `absvl export CHECKPOINT --out DIR`."""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from absvl.cli import main
from absvl.models.vl import load_model
from absvl.training.classify import load_classifier, train_classifier
from absvl.training.config import ClassifyConfig, RetrievalConfig, load_config
from absvl.training.retrieval import train_retrieval
from absvl.training.vqa import train_vqa

from .test_classify import _make_imagefolder, _overrides
from .test_train_retrieval import retrieval_overrides

CONFIG = "configs/shapes_absvit_tiny.yaml"


def _same(state, checkpoint):
    saved = load_file(str(Path(checkpoint) / "model.safetensors"))
    assert state.keys() == saved.keys()
    assert all(torch.equal(state[k], saved[k]) for k in saved)


def test_vqa_run_exports_best_and_any_checkpoint_exports(tiny_overrides, tmp_path, capsys):
    config = load_config(CONFIG, [*tiny_overrides, "train.eval_every=2", "train.save_every=2", "train.keep_last=1"])
    summary = train_vqa(config)
    run = Path(config.train.output_dir)
    best = Path(summary["best_checkpoint"])
    scores = {
        r["step"]: r["val/accuracy"]
        for r in map(json.loads, (run / "log.jsonl").read_text().splitlines())
        if "val/accuracy" in r
    }
    assert best.name == f"checkpoint-{max(scores, key=lambda s: (scores[s], -s)):08d}"
    assert summary["best_export"] == str(run / "best")
    _same(load_model(run / "best").state_dict(), best)
    assert f"{scores[int(best.name.split('-')[1])]}" in (run / "best" / "README.md").read_text()

    last = run / "checkpoint-00000006"
    out = tmp_path / "exported"
    assert main(["export", str(last), "--out", str(out)]) == 0
    assert f"exported {last} (vqa) to {out}" in capsys.readouterr().out
    exported = load_model(out)
    _same(exported.state_dict(), last)
    assert exported.answers == json.loads((run / "answers.json").read_text())
    _same(load_model(run / "final").state_dict(), last)  # final/ is the last step

    assert main(["export", str(last), "--out", str(out)]) == 2
    assert "not empty: choose another --out or pass --overwrite" in capsys.readouterr().err
    assert main(["export", str(run), "--out", str(tmp_path / "x")]) == 2
    assert f"it is a run folder, give one of its checkpoints ({best.name}" in capsys.readouterr().err


def test_classifier_checkpoint_exports_to_a_backbone_folder(tmp_path, capsys):
    data = _make_imagefolder(tmp_path / "data", {"train": 4, "val": 2})
    run = tmp_path / "run"
    summary = train_classifier(load_config(None, _overrides(data, run, "train.epochs=2"), ClassifyConfig))
    info = json.loads((run / "best" / "config.json").read_text())
    assert info["format"] == "absvl-backbone" and set(info["metrics"]) == {"top1", "top5"}
    _same(load_classifier(run / "best")[0].state_dict(), summary["best_checkpoint"])

    first = run / "checkpoint-00000001"
    out = tmp_path / "exported"
    assert main(["export", str(first), "--out", str(out)]) == 0
    model, exported = load_classifier(out)
    _same(model.state_dict(), first)
    assert exported["classes"] == ["blue", "green", "red"] and exported["overrides"] == info["overrides"]
    assert "absvl eval classify --model" in capsys.readouterr().out


def test_retrieval_checkpoint_exports_and_its_card_keeps_the_recalls(
    shapes_root, tiny_model_overrides, tmp_path, capsys
):
    run = tmp_path / "run"
    overrides = retrieval_overrides(shapes_root, tiny_model_overrides, run, 2)
    summary = train_retrieval(load_config(None, [*overrides, "train.save_every=2"], RetrievalConfig))
    out = tmp_path / "exported"
    assert main(["export", str(run / "checkpoint-00000002"), "--out", str(out)]) == 0
    assert "(retrieval)" in capsys.readouterr().out
    _same(load_model(out).state_dict(), run / "checkpoint-00000002")
    card = (out / "README.md").read_text()
    assert (
        "R_MEAN (val)" in card
        and card == (run / "best" / "README.md").read_text() == (run / "final" / "README.md").read_text()
    )
    assert summary["best_export"] == str(run / "best")


def test_patch_classifier_checkpoint_exports_with_its_scores_per_kind_of_patch(tmp_path, capsys):
    from .test_classify import _make_patch_dataset, _with_attributes

    data = _with_attributes(_make_patch_dataset(tmp_path / "patches", {"train": 8, "val": 4}))
    run = tmp_path / "run"
    overrides = _overrides(
        data, run, "data.format=patches", "train.max_steps=2", "train.eval_every=1", "train.save_every=1"
    )
    train_classifier(load_config(None, [*overrides, "train.keep_last=2"], ClassifyConfig))
    first = run / "checkpoint-00000001"
    out = tmp_path / "exported"
    assert main(["export", str(first), "--out", str(out)]) == 0
    assert "(classify)" in capsys.readouterr().out
    info = json.loads((out / "config.json").read_text())
    assert info["labels"] == "patch" and info["classes"] == ["background", "red", "blue"]
    val = next(
        r
        for r in map(json.loads, (run / "log.jsonl").read_text().splitlines())
        if r.get("step") == 1 and "val/top1" in r
    )
    assert info["metrics"] == {k: val[f"val/{k}"] for k in ("top1", "top5", "background", "objects", "color", "form")}
    _same(load_classifier(out)[0].state_dict(), first)
