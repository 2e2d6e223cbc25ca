"""The count density (``ObjectCounter``), its loss (``count_loss``) and the VQA head that reads it."""

import math

import torch
import torch.nn.functional as F

from absvl.models.vl.counting import ObjectCounter
from absvl.models.vl.losses import count_loss


def test_the_count_is_the_sum_of_membership_times_share_and_its_features_peak_at_the_nearest_number():
    h = 8
    counter = ObjectCounter(h, max_count=4)
    hand_set = {  # the query is the pooled text, the key a sharp copy of the token, every cell half an object
        counter.role: (torch.zeros(1, h), 0.0),
        counter.query: (torch.eye(h), 0.0),
        counter.key: (80 * torch.eye(h), 0.0),
        counter.share: (torch.zeros(1, h), math.log(math.e**0.5 - 1)),  # softplus → 1/2
    }
    with torch.no_grad():
        for layer, (weight, bias) in hand_set.items():
            layer.weight.copy_(weight), layer.bias.fill_(bias)
    image = torch.zeros(1, 6, h)
    image[0, [0, 1, 4, 5], 0] = 1.0  # two objects of two cells each that the question describes...
    image[0, [2, 3], 0] = -1.0  # ...and one it does not
    text = torch.zeros(1, 2, h)
    text[0, 0, 0] = 1.0
    text[0, 1] = -100.0  # a padded token would shut every cell: it must not count
    with torch.no_grad():
        counts = counter(text, torch.tensor([[1, 0]]), image)
    assert counts.membership.shape == counts.share.shape == (1, 6)
    torch.testing.assert_close(counts.share, torch.full((1, 6), 0.5))
    torch.testing.assert_close(counts.count, (counts.membership.sigmoid() * 0.5).sum(-1))
    assert abs(float(counts.count) - 2.0) < 1e-3
    features = counts.features[0]
    assert features.shape == (counter.num_features,) == (6,)
    torch.testing.assert_close(features[0], counts.count[0])
    radial = torch.exp(-((counts.count[0] - torch.arange(5.0)) ** 2) / (2 * counter.bandwidth**2))
    torch.testing.assert_close(features[1:], radial)
    assert int(features[1:].argmax()) == 2 and float(features[3]) > 0.999


def test_count_loss_is_the_balanced_membership_loss_plus_each_object_s_share_error():
    patch_objects = torch.tensor([[0, 1, 1, 2], [0, 0, 3, 3]])
    targets = torch.zeros(2, 4, dtype=torch.bool)
    targets[0, 1] = True  # row 0 asks about object 1; row 1 about nothing
    membership = torch.zeros(2, 4)
    share = torch.tensor([[9.0, 0.5, 0.5, 1.0], [9.0, 9.0, 0.25, 0.25]])
    # membership at σ(0): log 2 on the positives and log 2 on the negatives, averaged (row 1 has negatives only);
    # the shares: objects 1 and 2 sum to 1 (no error), object 3 to 0.5 ((0.5 − 1)² = 0.25 in row 1); the
    # background's shares are no object's: they do not count
    expected = math.log(2) + 0.25 / 2
    torch.testing.assert_close(count_loss(membership, share, patch_objects, targets), torch.tensor(expected))
    # a sharp, right membership costs nothing; a wrong one a lot
    sharp = torch.tensor([[-30.0, 30.0, 30.0, -30.0], [-30.0, -30.0, -30.0, -30.0]])
    torch.testing.assert_close(count_loss(sharp, share, patch_objects, targets), torch.tensor(0.25 / 2))
    assert count_loss(-sharp, share, patch_objects, targets) > 20
    # shards of a batch average like the batch
    halves = sum(
        count_loss(membership[i : i + 1], share[i : i + 1], patch_objects[i : i + 1], targets[i : i + 1])
        for i in (0, 1)
    )
    torch.testing.assert_close(halves / 2, count_loss(membership, share, patch_objects, targets))


def test_the_vqa_model_reads_the_count_and_trains_it_on_the_question_s_objects(
    make_model, reading_head, check_loss_term, check_head_part
):
    model, plain, batch, patch_objects = reading_head("counter", "a count", vqa_counter=True, count_loss_weight=0.5)
    target_objects = F.one_hot(torch.tensor([1, 2, 0, 1]), 3).bool()  # the question's objects by label...
    target_objects[:, 0] = False  # ...the background is none
    out = model(**batch, patch_objects=patch_objects, target_objects=target_objects)
    assert out.count_density.shape == patch_objects.shape and (out.count_density >= 0).all()
    spatial = out.image_tokens[:, out.vision.num_prefix_tokens :]
    counts = model.vqa_head.counter(out.text_tokens, batch["attention_mask"], spatial)
    torch.testing.assert_close(out.count_density, counts.density)
    expected = count_loss(counts.membership, counts.share, patch_objects, target_objects)
    check_loss_term(model, out, "count", expected, 0.5)
    # no objects given, or weight 0: no count term; the default head has no density to report
    assert "count" not in model(**batch).losses
    unweighted = make_model(vqa_counter=True)
    assert "count" not in unweighted(**batch, patch_objects=patch_objects, target_objects=target_objects).losses
    assert plain(**batch).count_density is None
    # the counter is part of the VQA head: the heads' learning rate, saved and loaded with it
    loaded = check_head_part(model, model.vqa_head.counter, batch, out.vqa_logits)
    assert loaded.vqa_head.counter is not None
