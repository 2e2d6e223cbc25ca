"""The training loop's guards: resume checks, the run's config kept, the atomic export, skipped items."""

import json
from pathlib import Path

import pytest
from accelerate import Accelerator

from absvl.training.config import ConfigError, load_config
from absvl.training.loop import describe_skipped, export_atomically, merge_skipped, write_run_config
from absvl.training.vqa import train_vqa

CONFIG = "configs/shapes_absvit_tiny.yaml"


def test_a_resume_that_changes_the_run_shape_is_refused_unless_forced(tiny_overrides):
    first = [*tiny_overrides, "train.max_steps=4", "train.save_every=2", "data.val_split=null"]
    train_vqa(load_config(CONFIG, first))
    run = Path(load_config(CONFIG, first).train.output_dir)
    resumed = [*first[:-2], "train.max_steps=6", "train.batch_size=4", "data.val_split=null", "train.resume=latest"]
    with pytest.raises(ConfigError) as refused:
        train_vqa(load_config(CONFIG, resumed))
    message = str(refused.value)
    assert "cannot resume from" in message and "checkpoint-00000004" in message
    assert "train.batch_size was 8, now 4" in message and "steps was 4, now 6" in message
    assert "train.force_resume=true" in message
    assert (run / "config.yaml").read_text() == (run / "config.yaml").read_text()  # untouched by the refusal
    assert not list(run.glob("config-before-step-*"))

    summary = train_vqa(load_config(CONFIG, [*resumed, "train.force_resume=true"]))
    assert summary["step"] == 6
    # the changed settings did not silently replace the run's config: the old one is kept
    kept = run / "config-before-step-00000004.yaml"
    assert "batch_size: 8" in kept.read_text() and "batch_size: 4" in (run / "config.yaml").read_text()


def test_write_run_config_keeps_a_different_one(tmp_path):
    assert write_run_config(tmp_path, "a: 1\n", 0) is None
    assert write_run_config(tmp_path, "a: 1\n", 3) is None  # same settings: nothing to keep
    assert write_run_config(tmp_path, "a: 2\n", 7) == "config-before-step-00000007.yaml"
    assert (tmp_path / "config-before-step-00000007.yaml").read_text() == "a: 1\n"
    assert (tmp_path / "config.yaml").read_text() == "a: 2\n"


class _Exporter:
    def __init__(self, fail=False):
        self.fail = fail

    def export(self, model, out_dir, last):
        assert out_dir.is_dir() and not any(out_dir.iterdir())  # an empty staging folder
        (out_dir / "model.safetensors").write_text("new")
        if self.fail:
            raise OSError("disk full")
        (out_dir / "config.json").write_text("{}")


def test_final_export_is_atomic(tmp_path):
    final = tmp_path / "final"
    export_atomically(_Exporter(), None, final, None)
    assert sorted(p.name for p in final.iterdir()) == ["config.json", "model.safetensors"]
    (final / "model.safetensors").write_text("old")
    with pytest.raises(OSError, match="disk full"):
        export_atomically(_Exporter(fail=True), None, final, None)
    # the failed export left the previous final/ as it was, and no half-written folder in its place
    assert (final / "model.safetensors").read_text() == "old" and (final / "config.json").is_file()
    export_atomically(_Exporter(), None, final, None)  # the next export clears the leftovers
    assert (final / "model.safetensors").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_skipped_items_count_once_per_run():
    accelerator = Accelerator(cpu=True)
    epochs = [[1, "a.jpg", "truncated"], [2, "a.jpg", "truncated"], [3, "b.jpg", "missing"]] * 3  # three epochs
    merged = merge_skipped(accelerator, epochs)
    assert merged == [[1, "a.jpg", "truncated"], [2, "a.jpg", "truncated"], [3, "b.jpg", "missing"]]
    assert describe_skipped(merged) == "3 items (2 unreadable images)"
    assert json.loads(json.dumps(merged)) == merged


def test_train_resume_skips_a_truncated_checkpoint_and_says_so(tiny_overrides, capsys):
    # truncate -s 1000 RUN/checkpoint-00000006/model.safetensors; absvl train vqa --resume RUN
    from absvl.cli import main

    overrides = [*tiny_overrides, "train.max_steps=6", "train.save_every=2", "train.keep_last=5", "data.val_split=null"]
    train_vqa(load_config(CONFIG, overrides))
    run = Path(load_config(CONFIG, overrides).train.output_dir)
    with open(run / "checkpoint-00000006" / "model.safetensors", "r+b") as f:
        f.truncate(1000)
    optimizer = run / "checkpoint-00000004" / "optimizer.pt"
    with open(optimizer, "r+b") as f:
        f.truncate(optimizer.stat().st_size - 10)
    capsys.readouterr()

    assert main(["train", "vqa", "--resume", str(run)]) == 0
    out = capsys.readouterr().out
    assert f"skipped {run / 'checkpoint-00000006'}: model.safetensors is truncated" in out
    assert f"skipped {run / 'checkpoint-00000004'}: optimizer.pt is truncated" in out
    assert f"resumed from {run / 'checkpoint-00000002'} at step 2" in out
    assert (run / "checkpoint-00000006.broken").is_dir() and (run / "checkpoint-00000004.broken").is_dir()
    # the run continued to its end, writing whole checkpoints again where the damaged ones were
    assert (run / "final" / "model.safetensors").is_file()
    assert sorted(p.name for p in run.glob("checkpoint-*")) == [
        "checkpoint-00000002",
        "checkpoint-00000004",
        "checkpoint-00000004.broken",
        "checkpoint-00000006",
        "checkpoint-00000006.broken",
    ]
