import json

from PIL import Image

from absvl import demo


def test_demo_runs_end_to_end_on_a_tiny_world(tiny_overrides, tmp_path, capsys):
    report = demo.run(demo.DEFAULT_CONFIG, [*tiny_overrides, "train.max_steps=4"], tmp_path / "out")
    printed = capsys.readouterr().out
    assert "majority-answer baseline" in printed and "target attention" in printed
    assert 0 <= report["accuracy"] <= 100 and 0 <= report["majority_baseline"] <= 100
    assert set(report["attention"]) == {"bottom_up", "top_down"}
    png = Image.open(report["png"])
    assert png.size[0] == 4 * 224  # image | bottom-up | two top-down maps
    assert json.loads((tmp_path / "out" / "demo.json").read_text())["export"] == report["export"]
