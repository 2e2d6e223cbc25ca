"""Where the VQA head's object pointers land and what its count density counts (``absvl.metrics.pointers``)."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from absvl.data.patch_labels import patch_targets
from absvl.data.shapes_text import FAMILY_TEMPLATES, question_family
from absvl.data.vqa import load_vqa_split
from absvl.metrics.pointers import count_hits, format_count_table, format_pointer_table, hop_hits, pointer_hits


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


def test_count_hits_compare_the_density_s_sum_with_the_number_of_objects_the_world_names(tiny_vl, world, shapes_root):
    model = tiny_vl(config={"vqa_counter": True})
    examples = load_vqa_split(shapes_root, "val")
    counting = [ex for ex in examples if question_family(ex.question) == "count"][:24]
    assert counting and len({len(ex.target_objects) for ex in counting}) > 1
    # a density that counts 2 whatever it sees: every one of the 16 cells a member at σ(0) = 1/2, with 1/4 of an object
    counter = model.vqa_head.counter
    with torch.no_grad():
        for p in (*counter.key.parameters(), counter.share.weight):
            p.zero_()
        counter.share.bias.fill_(math.log(math.exp(0.25) - 1))
    hits = count_hits(model, world, examples[:200], batch_size=16)
    numbers = [len(ex.target_objects) for ex in examples[:200] if question_family(ex.question) == "count"]
    assert hits["all"]["questions"] == len(numbers)
    assert {n for n in hits if n != "all"} == {str(n) for n in numbers} and list(hits)[-1] == "all"
    for n in set(numbers):
        assert hits[str(n)]["questions"] == numbers.count(n)
        assert hits[str(n)]["exact"] == (100.0 if n == 2 else 0.0)
        assert hits[str(n)]["mean error"] == pytest.approx(abs(n - 2), abs=1e-3)
    assert hits["all"]["exact"] == pytest.approx(100 * numbers.count(2) / len(numbers), abs=0.01)
    table = format_count_table(hits)
    assert table.splitlines()[-1].startswith("all") and len(table.splitlines()) == len(hits) + 1
    assert count_hits(tiny_vl(), world, examples[:4]) == {}
