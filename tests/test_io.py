"""absvl.io: atomic files and folders, JSON with errors that name the file, the backbone folder format."""

import json
import os

import pytest
import torch

import absvl
from absvl import io


def test_write_json_is_atomic_and_round_trips(tmp_path):
    path = tmp_path / "a.json"
    io.write_json(path, {"é": [1, 2]})
    assert path.read_text(encoding="utf-8") == '{\n  "é": [\n    1,\n    2\n  ]\n}\n'
    assert io.read_json(path) == {"é": [1, 2]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_a_failed_write_leaves_the_old_file(tmp_path):
    path = tmp_path / "a.txt"
    io.write_text(path, "old")
    with pytest.raises(RuntimeError), io.atomic_file(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_read_json_names_the_file_and_the_fix(tmp_path):
    bad = tmp_path / "q.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=r"q\.json \(a questions file\) is not valid JSON .*: download it again"):
        io.read_json(bad, what="a questions file", fix="download it again")
    with pytest.raises(FileNotFoundError, match=r"missing\.json does not exist"):
        io.read_json(tmp_path / "missing.json")
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 200_000)
    with pytest.raises(ValueError, match=r"deep\.json \(a questions file\) nests its JSON too deeply"):
        io.read_json(deep, what="a questions file")


def test_atomic_folder_replaces_only_when_complete(tmp_path):
    out = tmp_path / "out"
    with io.atomic_folder(out) as staging:
        (staging / "f").write_text("1")
    assert (out / "f").read_text() == "1"
    with pytest.raises(RuntimeError), io.atomic_folder(out) as staging:
        (staging / "f").write_text("2")
        raise RuntimeError("killed")
    assert (out / "f").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with pytest.raises(FileExistsError, match="overwrite"), io.atomic_folder(out, overwrite=False):
        pass


def test_a_swap_cut_between_the_renames_is_undone(tmp_path, monkeypatch):
    out, staging = tmp_path / "out", tmp_path / "staging"
    out.mkdir()
    (out / "f").write_text("old")
    staging.mkdir()
    (staging / "f").write_text("new")
    real_replace = os.replace

    def crash_on_commit(src, dst):
        if str(src) == str(staging):
            raise OSError("power cut")
        real_replace(src, dst)

    monkeypatch.setattr(io.os, "replace", crash_on_commit)
    with pytest.raises(OSError, match="power cut"):
        io.publish_folder(staging, out)
    monkeypatch.setattr(io.os, "replace", real_replace)
    assert not out.exists() and (io.backup_of(out) / "f").read_text() == "old"
    io.recover_folder(out)
    assert (out / "f").read_text() == "old" and not io.backup_of(out).exists()


def test_backbone_folder_round_trip(tmp_path):
    tensors = {"w": torch.arange(6.0).view(2, 3)}
    folder = io.write_backbone_folder(tmp_path / "bb", tensors, "vit_test_patch8", {"td_bias": True}, source="x.pth")
    config = io.read_backbone_folder(folder)
    assert config == {
        "format": io.BACKBONE_FORMAT,
        "name": "vit_test_patch8",
        "overrides": {"td_bias": True},
        "source": "x.pth",
        "absvl_version": absvl.__version__,
    }
    from safetensors.torch import load_file

    assert torch.equal(load_file(str(folder / io.WEIGHTS_NAME))["w"], tensors["w"])


def test_read_backbone_folder_rejects_other_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a backbone folder"):
        io.read_backbone_folder(tmp_path)
    (tmp_path / io.WEIGHTS_NAME).write_bytes(b"")
    (tmp_path / io.CONFIG_NAME).write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="is not an absvl-backbone config"):
        io.read_backbone_folder(tmp_path)


def test_preview():
    assert io.preview(["a", "b"]) == "a, b"
    assert io.preview(range(1, 2001), limit=2) == "1, 2, ... (2,000 in all)"
