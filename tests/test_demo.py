import json

from PIL import Image

from absvl import demo
from absvl.models.vl import AbsVLModel


def test_demo_runs_end_to_end_on_a_tiny_world(tiny_overrides, shapes_root, tmp_path, capsys):
    retrieval = [
        f"data.captions={shapes_root / 'dataset_shapes.json'}", f"data.images={shapes_root / 'images'}",
        "data.shapes=null", "data.num_workers=0", f"train.output_dir={tmp_path / 'retrieval'}",
        "train.max_steps=3", "train.batch_size=8", "train.trackers=[]", "train.rerank_k=2",
    ]
    report = demo.run(demo.DEFAULT_CONFIG, [*tiny_overrides, "train.max_steps=4"], tmp_path / "out", retrieval)
    printed = capsys.readouterr().out
    assert "majority-answer baseline" in printed and "target attention" in printed
    assert "| re-ranked top-2 (ITM, top-down) |" in printed and "search 'a red circle left of a blue square.'" in printed
    assert len(report["retrieval"]["hits"]) == 4  # the 4 test images of the tiny world, all re-ranked
    assert AbsVLModel.from_pretrained(report["retrieval"]["export"]).answers == AbsVLModel.from_pretrained(report["export"]).answers
    assert 0 <= report["accuracy"] <= 100 and 0 <= report["majority_baseline"] <= 100
    assert set(report["attention"]) == {"bottom_up", "top_down"}
    png = Image.open(report["png"])
    assert png.size[0] == 4 * 224  # image | bottom-up | two top-down maps
    assert json.loads((tmp_path / "out" / "demo.json").read_text())["export"] == report["export"]
