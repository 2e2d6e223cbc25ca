"""``absvl eval retrieval`` on a Shapes world also checks the hits against the scenes."""

import json

from absvl.cli import main
from absvl.data.shapes_text import CAPTION_KINDS
from absvl.evaluation.retrieval import evaluate_retrieval_model


def test_a_shapes_caption_file_gets_scene_true_scores(model_dir, shapes_root, tmp_path, capsys):
    captions = shapes_root / "dataset_shapes.json"
    result = evaluate_retrieval_model(model_dir, captions, "test", rerank_k=2, num_workers=0)
    scene = result["scene"]
    assert set(scene["rankings"]) == {"contrastive", "reranked"} and scene["queries"] == result["captions"]
    for checks in (*scene["rankings"].values(), scene["oracle"]):
        for check in ("objects present", "relation right"):
            assert set(checks[check]) == {"p@1", "p@5"} and all(0 <= v <= 100 for v in checks[check].values())
    assert scene["oracle"]["objects present"]["p@1"] == 100.0  # the caption's own image always fits
    assert (
        set(scene["by kind"]) <= set(CAPTION_KINDS)
        and sum(k["queries"] for k in scene["by kind"].values()) == (scene["queries"])
    )
    assert 0 < scene["ir@1_ceiling"] <= 100.0
    assert "rankings" not in result and "image_paths" not in result  # the result stays JSON

    out = tmp_path / "recall.json"
    args = f"eval retrieval --model {model_dir} --data {captions} --k 2 --num-workers 0 --out {out}"
    assert main(args.split()) == 0
    printed = capsys.readouterr().out
    assert (
        "scene-true precision of the caption → image hits" in printed
        and "| oracle (best possible) | 100.00 |" in printed
        and "re-ranking's gain per caption form" in printed
    )
    assert json.loads(out.read_text())["scene"]["queries"] == result["captions"]
