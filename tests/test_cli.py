import subprocess
import sys

from absvl import __version__
from absvl.cli import main


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


def test_data_commands(tmp_path, capsys):
    assert main(["data", "shapes", "--out", str(tmp_path / "w"), "--images", "10", "--seed", "1"]) == 0
    assert "train2014: 8 images" in capsys.readouterr().out
    assert main(["data", "check", str(tmp_path / "w")]) == 0
    assert "result: OK" in capsys.readouterr().out
    (tmp_path / "w" / "v2_mscoco_val2014_annotations.json").write_text("{not json")
    assert main(["data", "check", str(tmp_path / "w")]) == 1
    assert "v2_mscoco_val2014_annotations.json" in capsys.readouterr().out
