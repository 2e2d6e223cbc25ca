from PIL import Image

from absvl import demo


def test_two_object_scene_masks_match_colours():
    image, left, right = demo.two_object_scene(64)
    assert (image[left] == (220, 30, 30)).all() and (image[right] == (30, 30, 220)).all()
    assert not (left & right).any()


def test_demo_prior_concentrates_on_the_chosen_object(tmp_path):
    results = demo.run(tmp_path)
    for colour in ("red", "blue"):
        assert results[f"mask_{colour}_on_target"] > 0.9
        assert results[f"mask_{colour}_on_other"] < 0.1
    png = Image.open(tmp_path / "prior_masks.png")
    assert png.size == (3 * 224, 224)
