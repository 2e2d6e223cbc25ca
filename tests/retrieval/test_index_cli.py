"""The index CLI from other working directories: the recorded model path, --k, rebuild, recall."""

import json
import shutil

import pytest

from absvl.cli import main
from absvl.retrieval import ImageIndex


def test_a_relative_model_path_is_recorded_absolute_and_found_from_elsewhere(
    model_dir, collection, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(model_dir.parent)
    out = tmp_path / "idx"
    assert (
        main(
            [
                "index",
                "build",
                "--model",
                model_dir.name,
                "--images",
                str(collection),
                "--out",
                str(out),
                "--batch-size",
                "4",
            ]
        )
        == 0
    )
    assert (
        "recall@10 against exact search (up to 1,000 of the index's own vectors as queries): 1.0000"
        in capsys.readouterr().out
    )
    assert ImageIndex.load(out).meta["model_source"] == str(model_dir)

    monkeypatch.chdir(tmp_path)  # model_dir.name means nothing here
    for k in (["--k", "3"], ["-k", "3"]):
        assert main(["search", "a red circle", "--index", str(out), *k, "--json"]) == 0
        result = json.loads(capsys.readouterr().out)
        assert result["k"] == 3 and len(result["hits"]) == 3


def test_a_deleted_model_is_named_with_a_hint(model_dir, collection, tmp_path, capsys):
    moved = tmp_path / "model-copy"
    shutil.copytree(model_dir, moved)
    out = tmp_path / "idx"
    assert main(["index", "build", "--model", str(moved), "--images", str(collection), "--out", str(out)]) == 0
    shutil.rmtree(moved)
    capsys.readouterr()
    for argv in (
        ["search", "a red circle", "--index", str(out)],
        ["index", "add", "--index", str(out), "--images", str(collection)],
    ):
        assert main(argv) == 2
        assert f"the index's model {moved} no longer exists; pass --model" in capsys.readouterr().err
    assert main(["search", "a red circle", "--index", str(out), "--model", str(model_dir), "--k", "2"]) == 0


def test_cli_rebuild_prints_recall(model, model_dir, collection, tmp_path, capsys):
    out = tmp_path / "idx"
    assert main(["index", "build", "--model", str(model_dir), "--images", str(collection), "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["index", "rebuild", "--index", str(out), "--factory", "HNSW4"]) == 0
    printed = capsys.readouterr().out
    assert f"rebuilt {out} as HNSW4 from its stored embeddings (12 vectors" in printed and "recall@10" in printed
    meta = ImageIndex.load(out).meta
    assert meta["factory"] == "HNSW4" and f"{meta['recall_at_10']:.4f}" in printed
    assert main(["index", "rebuild", "--index", str(out), "--factory", "IVF,Bogus"]) == 2
    assert "bad FAISS factory string 'IVF,Bogus'" in capsys.readouterr().err
    assert ImageIndex.load(out).factory == "HNSW4" and not (tmp_path / ".new-idx").exists()  # unchanged, no leftovers
    with pytest.raises(SystemExit):
        main(["index", "rebuild"])  # --index is required
