"""Prior alignment (``absvl train prior``): ξ trains alone, the vision encoder frozen, on a tiny Shapes world;
its validation, its export and the VQA run that starts from it."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from safetensors.torch import load_file

from absvl.cli import main
from absvl.models.vl import AbsVLForQuestionAnswering, AbsVLModel, load_model
from absvl.training.config import ConfigError, load_config
from absvl.training.prior import PriorTask, evaluate_prior, train_prior

PRIOR = "configs/shapes_prior.yaml"
TRAINED = ("text_encoder.", "prior.", "contrastive.")


def _config(tiny_overrides, *extra):
    return load_config(
        PRIOR,
        [
            *tiny_overrides,
            "train.max_steps=4",
            "train.eval_every=2",
            "train.save_every=1",
            "train.keep_last=10",
            "train.lr=1e-2",
            *extra,
        ],
    )


def _log(run):
    return [json.loads(line) for line in (Path(run) / "log.jsonl").read_text().splitlines()]


@pytest.fixture
def prior_run(tiny_overrides):
    """A finished 4-step prior alignment with the object-level term: (config, summary)."""
    config = _config(tiny_overrides)
    return config, train_prior(config)


def test_prior_alignment_trains_the_text_side_alone_and_exports_a_model(prior_run):
    config, summary = prior_run
    run = Path(config.train.output_dir)
    assert summary["step"] == 4
    assert json.loads((run / "task.json").read_text()) == {"task": "prior"}
    log = _log(run)
    losses = [r for r in log if "loss" in r]
    assert [r["step"] for r in losses] == [1, 2, 3, 4]
    for r in losses:  # the object-level term alone (the image-level InfoNCE is off in this config), weight 1
        assert "loss/vqa" not in r and "loss/prior" not in r
        assert r["loss"] == pytest.approx(r["loss/prior_objects"], rel=1e-6) and r["loss"] > 0
    # validation: the prior loss and where the gate points, every eval_every steps
    vals = [r for r in log if "val/prior_loss" in r]
    assert [r["step"] for r in vals] == [2, 4]
    for r in vals:
        assert r["val/prior_loss"] > 0 and 0 <= r["val/gate_pointing"] <= 100
        assert 0 <= r["val/gate_off_targets"] <= 1 and 0 <= r["val/gate_on_targets"] <= 1
    assert summary["val"]["gate_pointing"] == vals[-1]["val/gate_pointing"]
    pointing = {r["step"]: r["val/gate_pointing"] for r in vals}  # it picks the best checkpoint
    assert Path(summary["best_checkpoint"]).name == f"checkpoint-{max(pointing, key=lambda s: (pointing[s], -s)):08d}"

    # the vision encoder, the fusion and the heads are frozen; the text encoder and ξ's projection train
    first, last = (load_file(str(run / f"checkpoint-{s:08d}" / "model.safetensors")) for s in (1, 4))
    frozen = [k for k in first if not k.startswith(TRAINED)]
    assert any(k.startswith("backbone.") for k in frozen) and any(k.startswith("fusion.") for k in frozen)
    assert all(torch.equal(first[k], last[k]) for k in frozen)
    moved = {k.split(".")[0] for k in first if k.startswith(TRAINED) and not torch.equal(first[k], last[k])}
    assert {"text_encoder", "prior"} <= moved

    # the export: the shared encoder, no task head yet, the gate's pointing on its card
    final = load_model(run / "final")
    assert type(final) is AbsVLModel and final.config.prior_object_weight == 1.0
    assert not (run / "final" / "answers.json").exists() and (run / "answers.json").is_file()
    assert final.state_dict().keys() == last.keys()
    assert all(torch.equal(v, last[k]) for k, v in final.state_dict().items())
    assert "prior gate pointing (val)" in (run / "final" / "README.md").read_text()


def test_evaluate_prior_counts_the_loss_and_the_gate_by_hand(prior_run):
    config, summary = prior_run
    model = AbsVLModel.from_pretrained(Path(config.train.output_dir) / "final")
    accelerator = Accelerator(cpu=True)
    task = PriorTask(config)
    again = Path(config.train.output_dir) / "again"
    again.mkdir()
    task.setup(accelerator, again, None)
    result = evaluate_prior(model.train(), task.val_loader, accelerator)
    assert model.training  # the mode is given back
    assert set(result) == {"prior_loss", "gate_pointing", "gate_on_targets", "gate_off_targets"}
    # the final export scores as the run's last validation did
    assert result == pytest.approx(summary["val"], rel=1e-5)

    model.eval()
    losses, questions, pointing, on = [], 0, 0, 0.0
    with torch.no_grad():
        for batch in task.val_loader:
            out = model(
                batch["images"],
                batch["input_ids"],
                batch["attention_mask"],
                prior_positive=batch["prior_positive"],
                patch_objects=batch["patch_objects"],
                target_objects=batch["target_objects"],
                prior_only=True,
                image_index=batch["image_index"],
            )
            losses.append(float(out.loss))
            xi = model.encode_prior(batch["input_ids"], batch["attention_mask"])[1]
            first = model.first_pass(batch["images"]).select(batch["image_index"])
            tokens = model.fusion_image_tokens(first, "bottom_up")[:, first.num_prefix_tokens :]
            gate = F.cosine_similarity(tokens, xi[:, None], dim=-1).clamp(0, 1)  # the prior gate, Eq. 8
            for row in range(len(gate)):
                targets = torch.tensor(
                    [bool(batch["target_objects"][row, int(o)]) for o in batch["patch_objects"][row]]
                )
                if not targets.any():  # a question without objects in the image is not scored
                    continue
                questions += 1
                pointing += bool(targets[gate[row].argmax()])
                on += float(gate[row][targets].mean())
    assert questions > 0
    assert result["prior_loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-5)
    assert result["gate_pointing"] == pytest.approx(100 * pointing / questions)
    assert result["gate_on_targets"] == pytest.approx(on / questions, rel=1e-4)


def test_without_the_objects_validation_reports_the_prior_loss_alone(tiny_overrides):
    config = _config(tiny_overrides, "model.prior_object_weight=0", "model.prior_loss_weight=1", "train.max_steps=2")
    summary = train_prior(config)
    assert set(summary["val"]) == {"prior_loss"} and summary["val"]["prior_loss"] > 0
    records = [r for r in _log(config.train.output_dir) if "loss" in r]
    assert all(r["loss"] == pytest.approx(r["loss/prior"], rel=1e-6) and "loss/prior_objects" not in r for r in records)


def test_a_prior_checkpoint_exports_as_a_prior_run_and_vqa_starts_from_it(prior_run, tiny_overrides, tmp_path, capsys):
    from absvl.training.vqa import train_vqa

    config, _ = prior_run
    run = Path(config.train.output_dir)
    checkpoint, out = run / "checkpoint-00000003", tmp_path / "exported"
    assert main(["export", str(checkpoint), "--out", str(out)]) == 0
    assert f"exported {checkpoint} (prior) to {out}" in capsys.readouterr().out
    exported = load_model(out)
    saved = load_file(str(checkpoint / "model.safetensors"))
    assert type(exported) is AbsVLModel and all(torch.equal(v, saved[k]) for k, v in exported.state_dict().items())

    # stage 2b: VQA finetuning from the alignment, its own loss weights on the export's architecture
    vqa = load_config(
        "configs/shapes_absvit_tiny.yaml",
        [
            *tiny_overrides,
            f"train.init_from={run / 'final'}",
            "model.prior_object_weight=0.5",
            "model.gate_sparsity_weight=0",
            "train.max_steps=1",
            "data.val_split=null",
            f"train.output_dir={tmp_path / 'vqa'}",
        ],
    )
    summary = train_vqa(vqa)
    finetuned = load_model(summary["export"])
    assert type(finetuned) is AbsVLForQuestionAnswering and finetuned.config.prior_object_weight == 0.5
    record = [r for r in _log(tmp_path / "vqa") if "loss" in r][-1]
    # the export's VQA head reads the object pointers and the count (configs/shapes_prior.yaml): their losses at the
    # run's weight 1; the second pass's change held to the question's objects at the run's 0.3
    assert finetuned.vqa_head.pointers is not None and finetuned.config.pointer_loss_weight == 1.0
    assert finetuned.vqa_head.counter is not None and finetuned.config.count_loss_weight == 1.0
    assert finetuned.config.topdown_object_weight == 0.3
    objects = record["loss/pointers"] + record["loss/count"] + 0.3 * record["loss/topdown_objects"]
    assert record["loss"] == pytest.approx(
        record["loss/vqa"] + 0.3 * record["loss/var"] + 0.5 * record["loss/prior_objects"] + objects, rel=1e-5
    )


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["model.prior_loss_weight=0", "model.prior_object_weight=0"], "model.prior_object_weight"),
        (["model.prior_loss_weight=1", "model.prior_visual=top_down"], "model.prior_visual"),
    ],
)
def test_a_prior_alignment_with_nothing_it_can_train_is_refused_before_it_starts(
    tiny_overrides, tmp_path, overrides, named
):
    config = load_config("configs/shapes_prior.yaml", [*tiny_overrides, *overrides])
    with pytest.raises(ConfigError, match=named):
        train_prior(config)
    assert not (tmp_path / "run").exists()
