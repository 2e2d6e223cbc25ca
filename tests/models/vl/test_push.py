"""``absvl push`` and loading by Hub id from the command line, against the local Hub stand-in."""

from pathlib import Path

import numpy as np
from huggingface_hub import ModelCard, constants
from PIL import Image

from absvl import AbsVLForQuestionAnswering
from absvl.cli import main

TOKEN = "hf_FAKE_TOKEN_FOR_TESTS_0123456789"


def _run_folder(make_model, tmp_path) -> Path:
    """A training run's folder whose final/ export has a card with metrics."""
    run = tmp_path / "run"
    make_model("absvit_test_patch8").save_pretrained(
        run / "final", model_card_kwargs={"training_data": "the Shapes world", "metrics": {"VQA accuracy (val)": 80.5}}
    )
    (run / "config.yaml").write_text("train: {}\n")
    return run


def test_push_a_run_with_the_token_from_the_environment(make_model, tmp_path, hub, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    run = _run_folder(make_model, tmp_path)
    assert main(["push", str(run), "--repo-id", "me/shapes-vqa", "--private"]) == 0

    out, err = capsys.readouterr()
    repo = hub.repos["me/shapes-vqa"]
    assert f"pushing its final export, {run / 'final'}" in out
    assert f"{hub.url}/me/shapes-vqa/commit/{repo.branches['main']}" in out
    assert TOKEN not in out + err
    assert repo.private and {auth for _, _, auth in hub.requests if auth} == {f"Bearer {TOKEN}"}
    files = repo.files("main")
    assert not any(TOKEN.encode() in content for content in files.values())
    card = ModelCard(files["README.md"].decode())
    assert "| VQA accuracy (val) | 80.5 |" in card.text and "the Shapes world" in card.text
    assert 'model="me/shapes-vqa"' in card.text and card.data.eval_results[0].metric_value == 80.5


def test_push_a_model_folder_to_a_branch_with_the_login_token(make_model, tmp_path, hub, capsys):
    token_file = Path(constants.HF_TOKEN_PATH)  # where `hf auth login` keeps it (the fixture's temp folder)
    token_file.parent.mkdir(parents=True)
    token_file.write_text(TOKEN)
    folder = _run_folder(make_model, tmp_path) / "final"
    assert main(["push", str(folder), "--repo-id", "me/shapes-vqa", "--revision", "dev"]) == 0

    out, err = capsys.readouterr()
    repo = hub.repos["me/shapes-vqa"]
    assert "final export" not in out and f"/commit/{repo.branches['dev']}" in out and TOKEN not in out + err
    assert "README.md" in repo.files("dev") and "README.md" not in repo.files("main")
    assert {auth for _, _, auth in hub.requests if auth} == {f"Bearer {TOKEN}"}


def test_push_refuses_without_a_token_or_a_model(make_model, tmp_path, hub, capsys):
    folder = _run_folder(make_model, tmp_path) / "final"
    assert main(["push", str(folder), "--repo-id", "me/x"]) == 2
    assert "no Hugging Face token" in capsys.readouterr().err and not hub.repos
    assert main(["push", str(tmp_path / "missing"), "--repo-id", "me/x"]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_attend_loads_a_model_by_hub_id(make_model, tmp_path, hub, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    make_model("absvit_test_patch8").push_to_hub("org/absvl-tiny")
    monkeypatch.delenv("HF_TOKEN")  # a public repository: reading needs no token
    image = tmp_path / "image.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(image)
    out = tmp_path / "maps.png"
    assert (
        main(
            [
                "attend",
                str(image),
                "--text",
                "what color is the circle?",
                "--model",
                "org/absvl-tiny",
                "--out",
                str(out),
                "--size",
                "32",
            ]
        )
        == 0
    )
    assert out.is_file() and Image.open(out).width > 32
    assert AbsVLForQuestionAnswering.from_pretrained("org/absvl-tiny", local_files_only=True).answers  # now cached


def test_push_a_run_without_final_names_what_to_pass(make_model, tmp_path, hub, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    run = _run_folder(make_model, tmp_path)
    (run / "final").rename(run / "checkpoint-00000004")  # a run stopped before its export
    capsys.readouterr()
    assert main(["push", str(run), "--repo-id", "me/x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"absvl: error: no final/ in {run}: pass {run / 'final'} or {run / 'best'}")
    assert f"absvl export {run / 'checkpoint-<step>'} --out DIR" in err and not hub.repos  # no complete checkpoint
    from absvl.training.checkpoint import STATE_NAME

    (run / "checkpoint-00000004" / STATE_NAME).write_text("{}")  # now a complete checkpoint: the hint names it
    assert main(["push", str(run), "--repo-id", "me/x"]) == 2
    assert f"absvl export {run / 'checkpoint-00000004'} --out DIR" in capsys.readouterr().err
    make_model("absvit_test_patch8").save_pretrained(run / "best")
    capsys.readouterr()
    assert main(["push", str(run), "--repo-id", "me/x"]) == 2
    assert capsys.readouterr().err == f"absvl: error: no final/ in {run}: pass {run / 'final'} or {run / 'best'}\n"
    assert main(["push", str(run / "best"), "--repo-id", "me/x"]) == 0


def test_push_without_network_is_one_clear_line(make_model, tmp_path, hub, monkeypatch, capsys):
    import socket

    with socket.socket() as probe:  # a port nobody listens on: the connection is refused, as with no network
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    folder = _run_folder(make_model, tmp_path) / "final"
    capsys.readouterr()
    assert main(["push", str(folder), "--repo-id", "me/x"]) == 1
    out, err = capsys.readouterr()
    (line,) = [line for line in err.splitlines() if "Loading weights" not in line]  # one line besides the load's bar
    assert line.startswith(
        f"absvl: error: cannot reach the Hugging Face Hub at http://127.0.0.1:{port} to push to me/x"
    )
    assert "ConnectError" in line and "check the network connection" in line
    assert "Traceback" not in err and TOKEN not in out + err


def test_push_and_attend_refuse_a_model_without_its_tokenizer(make_model, tmp_path, hub, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    folder = _run_folder(make_model, tmp_path) / "final"
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()
    assert main(["push", str(folder), "--repo-id", "me/x"]) == 2
    assert "its tokenizer does not match its text encoder" in capsys.readouterr().err and not hub.repos
    image = tmp_path / "image.png"
    Image.fromarray(np.zeros((24, 32, 3), dtype=np.uint8)).save(image)
    args = ["attend", str(image), "--text", "what color is the circle?", "--out", str(tmp_path / "maps.png")]
    assert main([*args, "--model", str(folder)]) == 2
    assert "its tokenizer does not match its text encoder" in capsys.readouterr().err
    # a --model path that is not there: no such folder, not a Hub repo-id error
    assert main([*args, "--model", str(tmp_path / "runs" / "vqa" / "final")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'runs' / 'vqa' / 'final'}: no such folder" in err and "repo" not in err.split(":")[2]
    assert not (tmp_path / "maps.png").exists()
