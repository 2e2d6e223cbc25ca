"""Where the VQA head's object pointers land (``absvl.metrics.pointers``)."""

import numpy as np
import pytest
import torch
from PIL import Image

from absvl.data.patch_labels import patch_targets
from absvl.data.shapes_text import FAMILY_TEMPLATES, question_family
from absvl.data.vqa import load_vqa_split
from absvl.metrics.pointers import format_pointer_table, hop_hits, pointer_hits


def test_hop_hits_on_hand_made_rows():
    patch_objects = torch.tensor([[0, 1, 1, 2], [0, 0, 3, 3]])
    pointer_objects = torch.tensor([[2, 1], [0, 5]])  # row 2: hop 1 names nobody, hop 2 an object with no cell
    logits = torch.zeros(2, 2, 4)
    logits[0, 0, 3] = logits[0, 1, 0] = 1.0  # hop 1 peaks on object 2, hop 2 on the background
    visible, hit, share = hop_hits(logits, patch_objects, pointer_objects)
    assert visible.tolist() == [[True, True], [False, False]]
    assert hit.tolist() == [[True, False], [False, False]]
    assert share[0].tolist() == [0.25, 0.5]


@pytest.fixture(scope="module")
def pointer_model(tiny_vl):
    return tiny_vl(config={"vqa_pointers": True})


def test_pointer_hits_count_the_questions_that_name_a_visible_object_per_family(pointer_model, world, shapes_root):
    examples = load_vqa_split(shapes_root, "val")[:40]
    hits = pointer_hits(pointer_model, world, examples, batch_size=16)
    # the chance of each hop, recomputed from the masks: the share of the grid its object owns
    expected: dict[str, list] = {}
    for ex in examples:
        with Image.open(world.mask_of(ex.image_path, ex.image_id)) as mask:
            owners = patch_targets(np.asarray(mask), 8, int(np.asarray(mask).max()) + 1).reshape(-1)
        named = [k + 1 for k in ex.target_objects or ()]
        if not named or not all((owners == o).any() for o in (named[-1], named[0])):
            continue
        family = FAMILY_TEMPLATES[question_family(ex.question)]
        for key in (family, "all"):
            expected.setdefault(key, []).append([(owners == named[-1]).mean(), (owners == named[0]).mean()])
    assert set(hits) == set(expected) and hits["all"]["questions"] == len(expected["all"]) > 10
    for family, shares in expected.items():
        assert hits[family]["questions"] == len(shares)
        np.testing.assert_allclose(
            [hits[family]["chance 1"], hits[family]["chance 2"]], 100 * np.mean(shares, 0), atol=0.01
        )
        assert all(0 <= hits[family][hop] <= 100 for hop in ("hop 1", "hop 2"))
    table = format_pointer_table(hits)
    assert table.splitlines()[-1].startswith("all") and len(table.splitlines()) == len(hits) + 1
    assert not pointer_model.training  # left as it was


def test_a_model_without_pointers_has_no_hits(tiny_vl, world, shapes_root):
    assert pointer_hits(tiny_vl(), world, load_vqa_split(shapes_root, "val")[:4]) == {}
