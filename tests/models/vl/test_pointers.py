"""The object pointers (``ObjectPointers``), their loss (``pointer_loss``) and the VQA head that reads them."""

import math

import torch

from absvl.models.vl.losses import pointer_loss
from absvl.models.vl.pointers import ObjectPointers, cell_centres


def test_cell_centres_run_row_by_row_over_minus_one_to_one():
    centres = cell_centres((2, 3))
    assert centres.tolist() == [[-1, -1], [0, -1], [1, -1], [-1, 1], [0, 1], [1, 1]]


def _pointers(hidden=8):
    torch.manual_seed(0)
    return ObjectPointers(hidden, relation_features=3)


def test_hop_one_lands_where_its_query_matches_and_hop_two_looks_in_the_question_s_direction():
    pointers = _pointers()
    h = pointers.hidden_size
    with torch.no_grad():
        for layer in (pointers.role, pointers.query, pointers.key, pointers.direction):
            layer.weight.zero_(), layer.bias.zero_()
        pointers.query.weight.copy_(torch.eye(h))
        pointers.key.weight.copy_(40 * torch.eye(h))
        pointers.direction.bias.copy_(torch.tensor([-2.0, 0.0]))  # "left of": towards smaller x
    grid = (3, 3)
    image = torch.zeros(1, 9, h)
    image[0, 5, 0] = 1.0  # the object hop 1's query names, at the middle row's right cell (x = 1, y = 0)
    text = torch.zeros(1, 2, h)
    text[0, :, 0] = 1.0  # both queries name that object by content...
    text[0, 1] = 100.0  # ...but a padded token would name everything: it must not count
    hops = pointers(text, torch.tensor([[1, 0]]), image, grid, torch.zeros(1, h))
    assert hops.logits.shape == (1, 2, 9) and hops.features.shape == (1, pointers.num_features)
    first, second = hops.logits.softmax(-1)[0]
    assert first.argmax() == 5 and first[5] > 0.9
    # hop 2 adds g·d·tanh(κ(p − c_1)) to the same content: the cells left of the object gain, its own right loses
    centres = cell_centres(grid)
    left = centres[:, 0] < centres[5, 0]
    expected = (
        pointers.direction_gain
        * torch.tanh(pointers.sharpness * (centres - first @ centres))
        @ torch.tensor([-2.0, 0.0])
    )
    torch.testing.assert_close(hops.logits[0, 1] - hops.logits[0, 0], expected)
    assert second[left].sum() > first[left].sum()


def test_the_features_are_what_each_hop_read_and_the_relation_of_where_they_landed():
    pointers = _pointers()
    h, grid = pointers.hidden_size, (2, 2)
    g = torch.Generator().manual_seed(1)
    text, image, question = (
        torch.randn(2, 3, h, generator=g),
        torch.randn(2, 4, h, generator=g),
        torch.randn(2, h, generator=g),
    )
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    hops = pointers(text, mask, image, grid, question)
    maps = hops.logits.softmax(-1)  # [B, 2, N]
    # the relation's words: the third pooling of the text tokens, padding left out
    weights = pointers.role(text)[..., 2].masked_fill(mask == 0, float("-inf")).softmax(1)
    words = (weights[..., None] * text).sum(1)
    centres = cell_centres(grid)
    c1, c2 = maps[:, 0] @ centres, maps[:, 1] @ centres
    read = torch.cat([(maps[:, k, :, None] * pointers.value(image)).sum(1) for k in (0, 1)], 1)
    offset = torch.tanh(pointers.sharpness * (c2 - c1))
    relation = torch.einsum("brp,bp->br", pointers.relation(words).view(2, 3, 6), torch.cat([c1, c2, offset], 1))
    aligned = pointers.relation_direction(words) * offset
    expected = torch.cat([read, relation, offset, aligned, aligned.sum(1, keepdim=True)], 1)
    torch.testing.assert_close(hops.features, expected)
    assert pointers.num_features == 2 * h + 3 + 5


def test_pointer_loss_is_the_cross_entropy_to_each_hop_s_object_averaged_per_row():
    patch_objects = torch.tensor([[0, 1, 1, 2], [0, 0, 3, 3]])
    logits = torch.zeros(2, 2, 4)  # uniform: −log(1/4) on every hop that has an object
    pointers = torch.tensor([[2, 1], [0, 0]])  # the second row names no object: its hops count 0
    torch.testing.assert_close(pointer_loss(logits, patch_objects, pointers), torch.tensor(2 * math.log(4) / 4))
    # a hop spread evenly over its object's cells costs the target's entropy (0 for one cell, log 2 for two: the
    # minimum); one that misses them costs a lot
    sharp = torch.full((1, 2, 4), -30.0)
    sharp[0, 0, 3] = sharp[0, 1, 1] = sharp[0, 1, 2] = 30.0
    torch.testing.assert_close(pointer_loss(sharp, patch_objects[:1], pointers[:1]), torch.tensor(math.log(2) / 2))
    assert pointer_loss(sharp, patch_objects[:1], pointers[:1].flip(-1)) > 10
    # an object without a visible cell counts as none, and a shard of a batch averages like the batch
    assert pointer_loss(logits[:1], patch_objects[:1], torch.tensor([[7, 7]])) == 0
    halves = (
        pointer_loss(logits[:1], patch_objects[:1], pointers[:1])
        + pointer_loss(logits[1:], patch_objects[1:], pointers[1:])
    ) / 2
    torch.testing.assert_close(halves, pointer_loss(logits, patch_objects, pointers))


def test_the_vqa_model_reads_the_pointers_and_trains_them_on_the_question_s_objects(
    make_model, reading_head, check_loss_term, check_head_part
):
    model, plain, batch, patch_objects = reading_head(
        "pointers", "object pointers", vqa_pointers=True, pointer_loss_weight=0.5
    )
    pointer_objects = torch.tensor([[2, 1], [1, 1], [0, 0], [2, 2]])
    out = model(**batch, patch_objects=patch_objects, pointer_objects=pointer_objects)
    assert out.pointer_logits.shape == (4, 2, patch_objects.shape[1])
    expected = pointer_loss(out.pointer_logits, patch_objects, pointer_objects)
    check_loss_term(model, out, "pointers", expected, 0.5)
    # no objects given, or weight 0: no pointer term; the default head has no pointers to report
    assert "pointers" not in model(**batch).losses
    unweighted = make_model(vqa_pointers=True)
    assert "pointers" not in unweighted(**batch, patch_objects=patch_objects, pointer_objects=pointer_objects).losses
    assert plain(**batch).pointer_logits is None
    # the pointers are part of the VQA head: the heads' learning rate, saved and loaded with it
    check_head_part(model, model.vqa_head.pointers, batch, out.vqa_logits)
