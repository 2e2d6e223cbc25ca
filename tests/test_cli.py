import subprocess
import sys

import pytest

from absvl import __version__
from absvl.cli import main
from absvl.models.vision import create_backbone


def test_version_flag():
    out = subprocess.run([sys.executable, "-m", "absvl.cli", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"absvl {__version__}"


def test_backbones_lists_params_and_macs(capsys):
    assert main(["backbones", "--family", "absvit"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["name", "family", "params", "(M)"]
    row = next(line for line in lines if line.startswith("absvit_base_patch16_224"))
    name, family, params, macs = row.split()
    assert family == "absvit" and abs(float(params) - 99.96) < 0.01 and 37.0 < float(macs) < 39.0


def test_backbones_unknown_family_is_an_error(capsys):
    assert main(["backbones", "--family", "nope"]) == 2
    assert "no backbone in family 'nope'" in capsys.readouterr().err


def test_bad_input_of_the_wrong_type_is_one_line_but_a_bug_keeps_its_traceback(monkeypatch, capsys):
    import absvl.cli as cli
    from absvl.errors import InputTypeError

    parser = cli.build_parser()
    args = parser.parse_args(["backbones"])
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    monkeypatch.setattr(parser, "parse_args", lambda argv: args)

    def raise_(error):
        raise error

    args.func = lambda a: raise_(InputTypeError("answers[0] must be a string"))
    assert main(["backbones"]) == 2
    assert capsys.readouterr().err.strip() == "absvl: error: answers[0] must be a string"
    args.func = lambda a: raise_(TypeError("unsupported operand type(s) for +: 'int' and 'str'"))
    with pytest.raises(TypeError, match="unsupported operand"):
        main(["backbones"])
    # a wrong option for a backbone in a config is bad input, said in one line
    args.func = lambda a: create_backbone("vit_test_patch8", no_such_option=1)
    assert main(["backbones"]) == 2
    assert "bad option for backbone 'vit_test_patch8'" in capsys.readouterr().err


def test_data_commands(tmp_path, capsys):
    assert main(["data", "shapes", "--out", str(tmp_path / "w"), "--images", "10", "--seed", "1"]) == 0
    assert "train2014: 8 images" in capsys.readouterr().out
    assert main(["data", "check", str(tmp_path / "w")]) == 0
    assert "result: OK" in capsys.readouterr().out
    (tmp_path / "w" / "v2_mscoco_val2014_annotations.json").write_text("{not json")
    assert main(["data", "check", str(tmp_path / "w")]) == 1
    assert "v2_mscoco_val2014_annotations.json" in capsys.readouterr().out


def test_an_override_after_resume_is_not_taken_for_a_checkpoint():
    from absvl.cli import _run_config, build_parser

    args = build_parser().parse_args(
        ["train", "vqa", "--config", "configs/shapes_absvit_tiny.yaml", "--resume", "data.root=/x", "train.lr=1e-4"]
    )
    config = _run_config(args)
    assert config.data.root == "/x" and config.train.lr == 1e-4 and config.train.resume == "latest"


def test_resuming_a_run_needs_only_its_folder(tmp_path, monkeypatch, capsys):
    from absvl.cli import _run_config, build_parser
    from absvl.training.config import dump_config, load_config

    run = tmp_path / "run"
    run.mkdir()
    # the run's config names its folder relative to where it was started
    (run / "config.yaml").write_text(
        dump_config(load_config("configs/shapes_absvit_tiny.yaml", ["train.output_dir=runs/x", "train.lr=3e-4"]))
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    parse = build_parser().parse_args
    config = _run_config(parse(["train", "vqa", "--resume", str(run), "train.max_steps=9"]))
    assert (config.train.output_dir, config.train.resume) == (str(run), "latest")
    assert config.train.lr == 3e-4 and config.train.max_steps == 9
    checkpoint = run / "checkpoint-00000002"
    checkpoint.mkdir()
    (checkpoint / "trainer_state.json").write_text("{}")
    config = _run_config(parse(["train", "vqa", "--resume", str(checkpoint)]))
    assert (config.train.output_dir, config.train.resume) == (str(run), str(checkpoint))

    assert main(["train", "vqa", "--resume", str(tmp_path / "nothing")]) == 2
    assert "neither a run folder (with config.yaml) nor a checkpoint" in capsys.readouterr().err
    assert main(["train", "vqa"]) == 2
    assert "give --config (a run config YAML), or --resume RUN" in capsys.readouterr().err


def test_commands_start_without_faiss_or_the_server_stack():
    # training and evaluation must run where faiss (or fastapi) is not importable
    code = (
        "import sys; sys.modules['faiss'] = None; sys.modules['fastapi'] = None; sys.modules['uvicorn'] = None\n"
        "from absvl.cli import build_parser; build_parser()\n"
        "import absvl.retrieval, absvl.training.vqa, absvl.training.retrieval, absvl.training.classify\n"
        "assert 'absvl.retrieval.index' not in sys.modules\n"
        "try:\n    absvl.retrieval.ImageIndex\nexcept ImportError as err:\n    print('lazy', err)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("lazy import of faiss halted")


def test_train_prior_command_aligns_the_prior_and_resumes_its_run(tiny_overrides, tmp_path, capsys):
    import json
    import re

    import torch
    from safetensors.torch import load_file

    from absvl.models.vl import AbsVLModel, load_model

    run = tmp_path / "prior"
    overrides = [
        *tiny_overrides,
        f"train.output_dir={run}",
        "train.max_steps=2",
        "train.save_every=1",
        "train.keep_last=2",
    ]
    assert main(["train", "prior", "--config", "configs/shapes_prior.yaml", *overrides]) == 0
    out = capsys.readouterr().out
    val = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if "val/prior_loss" in line][-1]
    match = re.search(r"validation prior loss (\d+\.\d{4}), gate pointing (\d+\.\d) % at step 2", out)
    assert match, out
    assert float(match[1]) == pytest.approx(val["val/prior_loss"], abs=1e-4)
    assert float(match[2]) == pytest.approx(val["val/gate_pointing"], abs=0.05)
    assert f"model exported to {run / 'final'}" in out
    assert json.loads((run / "task.json").read_text()) == {"task": "prior"}
    assert type(load_model(run / "final")) is AbsVLModel  # the encoder: no task head yet
    # --resume CHECKPOINT continues the run with its own config and ends where the straight run ended
    straight = load_file(str(run / "final" / "model.safetensors"))
    assert main(["train", "prior", "--resume", str(run / "checkpoint-00000001")]) == 0
    assert "at step 2" in capsys.readouterr().out
    resumed = load_file(str(run / "final" / "model.safetensors"))
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)
    # a bad key is one clear line
    assert main(["train", "prior", "--config", "configs/shapes_prior.yaml", "model.prior_objekt_weight=1"]) == 2
    assert "unknown config key 'model.prior_objekt_weight'" in capsys.readouterr().err
