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
