"""The prior loss (symmetric InfoNCE) by hand, across two processes, and the VQA loss."""

import math
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from absvl.models.vl.losses import contrastive_loss, vqa_loss

# unit rows: text t_i, image i_j; cosines C = T Iᵀ =
#   [[0.8,  0.0, 1.0],
#    [0.6,  1.0, 0.0],
#    [0.96, 0.8, 0.6]]
TEXT = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
IMAGE = torch.tensor([[0.8, 0.6], [0.0, 1.0], [1.0, 0.0]])
SCALE = 2.0  # logits = 2·C


def test_infonce_matches_a_hand_computation():
    e = math.exp
    text_to_image = [
        -math.log(e(1.6) / (e(1.6) + e(0.0) + e(2.0))),
        -math.log(e(2.0) / (e(1.2) + e(2.0) + e(0.0))),
        -math.log(e(1.2) / (e(1.92) + e(1.6) + e(1.2))),
    ]
    image_to_text = [
        -math.log(e(1.6) / (e(1.6) + e(1.2) + e(1.92))),
        -math.log(e(2.0) / (e(0.0) + e(2.0) + e(1.6))),
        -math.log(e(1.2) / (e(2.0) + e(0.0) + e(1.2))),
    ]
    expected = (sum(text_to_image) / 3 + sum(image_to_text) / 3) / 2
    loss = contrastive_loss(TEXT, IMAGE, torch.tensor(SCALE))
    assert abs(loss.item() - expected) < 1e-6
    # rows are normalised inside: scaling the inputs changes nothing
    torch.testing.assert_close(contrastive_loss(3 * TEXT, 0.5 * IMAGE, torch.tensor(SCALE)), loss)


def test_infonce_drops_rows_that_are_not_pairs():
    valid = torch.tensor([True, False, True])
    expected = contrastive_loss(TEXT[valid], IMAGE[valid], torch.tensor(SCALE))
    torch.testing.assert_close(contrastive_loss(TEXT, IMAGE, torch.tensor(SCALE), valid), expected)


def test_vqa_loss_is_bce_times_the_number_of_answers():
    logits = torch.tensor([[0.5, -1.0, 2.0], [0.0, 1.0, -0.5]])
    targets = torch.tensor([[1.0, 0.0, 0.3], [0.0, 0.6, 0.0]])
    bce = -(targets * F.logsigmoid(logits) + (1 - targets) * F.logsigmoid(-logits))
    torch.testing.assert_close(vqa_loss(logits, targets), bce.mean() * 3)


_WORKER = textwrap.dedent(
    """
    import os, sys
    import torch
    import torch.distributed as dist
    import torch.multiprocessing as mp
    from absvl.models.vl.losses import contrastive_loss

    def data():
        g = torch.Generator().manual_seed(0)
        return torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)

    def worker(rank, init_file, world):
        text, image = data()
        full_t, full_i = text.clone().requires_grad_(), image.clone().requires_grad_()
        full = contrastive_loss(full_t, full_i, torch.tensor(3.0))  # one process, the whole batch
        full.backward()
        dist.init_process_group("gloo", init_method="file://" + init_file, rank=rank, world_size=world)
        rows = slice(0, 2) if rank == 0 else slice(2, 5)  # unequal shards: 2 and 3 rows
        t, i = text[rows].clone().requires_grad_(), image[rows].clone().requires_grad_()
        loss = contrastive_loss(t, i, torch.tensor(3.0))
        loss.backward()
        torch.testing.assert_close(loss, full)
        # x world: DDP averages the processes' gradients, the global loss needs their sum
        torch.testing.assert_close(t.grad, world * full_t.grad[rows])
        torch.testing.assert_close(i.grad, world * full_i.grad[rows])
        dist.destroy_process_group()

    if __name__ == "__main__":
        mp.spawn(worker, args=(sys.argv[1], 2), nprocs=2)
        print("ok")
    """
)


def test_infonce_gathers_negatives_across_processes(tmp_path):
    script = tmp_path / "gather.py"
    script.write_text(_WORKER)
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "init")], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


def test_losses_under_bf16_autocast_equal_the_fp32_ones():
    """Logits at scale 100 and soft targets such as 0.3 lose digits in bf16: both losses run in fp32."""
    g = torch.Generator().manual_seed(0)
    text, image = torch.randn(16, 64, generator=g), torch.randn(16, 64, generator=g)
    scale = torch.tensor(100.0)
    logits = torch.randn(4, 10, generator=g).bfloat16()  # what a head returns under autocast
    targets = torch.zeros(4, 10)
    targets[:, :3] = torch.tensor([0.3, 0.6, 0.9])
    prior, vqa = contrastive_loss(text, image, scale), vqa_loss(logits.float(), targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        prior_bf16, vqa_bf16 = contrastive_loss(text, image, scale), vqa_loss(logits, targets)
    assert prior_bf16.dtype == vqa_bf16.dtype == torch.float32
    torch.testing.assert_close(prior_bf16, prior, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(vqa_bf16, vqa, rtol=1e-6, atol=1e-6)


# --- multi-positive InfoNCE: rows of one text are one positive class -------------------------
def test_text_groups_hash_the_unpadded_tokens():
    from absvl.models.vl.losses import text_groups

    ids = torch.tensor([[5, 6, 7, 1], [5, 6, 7, 1], [5, 6, 9, 1], [6, 5, 7, 1], [5, 6, 0, 0], [5, 6, 3, 3]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 0, 0]])
    groups = text_groups(ids, mask)
    assert groups.shape == (6,) and groups.dtype == torch.int64
    assert groups[0] == groups[1]  # the same text
    assert len({int(g) for g in groups[1:5]}) == 4  # another token, the same tokens in another order, a prefix
    assert groups[4] == groups[5]  # what the padding holds does not count
    # the same text padded to another length is the same group (gathered batches of other widths compare)
    torch.testing.assert_close(text_groups(ids[:, :2], mask[:, :2])[4:], groups[4:])
    # by hand: one token id 3 at position 0 -> (3 + 1) * ((0 * 2654435761 + 40503) % (2**31 - 1) + 1)
    assert text_groups(torch.tensor([[3]]), torch.tensor([[1]])).item() == 4 * 40504


def test_multi_positive_infonce_matches_a_hand_computation():
    """Rows 0 and 1 share a text: each one's image is a positive of the other's text (logits = 2·C)."""
    e, log = math.exp, math.log
    text_to_image = [
        -log((e(1.6) + e(0.0)) / (e(1.6) + e(0.0) + e(2.0))),
        -log((e(1.2) + e(2.0)) / (e(1.2) + e(2.0) + e(0.0))),
        -log(e(1.2) / (e(1.92) + e(1.6) + e(1.2))),
    ]
    image_to_text = [
        -log((e(1.6) + e(1.2)) / (e(1.6) + e(1.2) + e(1.92))),
        -log((e(0.0) + e(2.0)) / (e(0.0) + e(2.0) + e(1.6))),
        -log(e(1.2) / (e(2.0) + e(0.0) + e(1.2))),
    ]
    expected = (sum(text_to_image) + sum(image_to_text)) / 6
    loss = contrastive_loss(TEXT, IMAGE, torch.tensor(SCALE), groups=torch.tensor([7, 7, 3]))
    assert abs(loss.item() - expected) < 1e-6
    # groups of one row each are CLIP's diagonal
    clip = contrastive_loss(TEXT, IMAGE, torch.tensor(SCALE))
    torch.testing.assert_close(contrastive_loss(TEXT, IMAGE, torch.tensor(SCALE), groups=torch.tensor([4, 2, 9])), clip)
    assert loss.item() < clip.item()  # a shared text's other image is no longer a negative


def test_an_invalid_row_is_no_positive_no_negative_and_no_anchor():
    """valid=[T, F, T] with rows 0 and 1 one group: row 1 leaves the loss entirely (by hand, logits 2·C)."""
    e, log = math.exp, math.log
    terms = [
        -log(e(1.6) / (e(1.6) + e(2.0))),  # text 0 against images 0, 2
        -log(e(1.2) / (e(1.92) + e(1.2))),  # text 2
        -log(e(1.6) / (e(1.6) + e(1.92))),  # image 0 against texts 0, 2
        -log(e(1.2) / (e(2.0) + e(1.2))),  # image 2
    ]
    text, image = TEXT.clone().requires_grad_(), IMAGE.clone().requires_grad_()
    valid, groups = torch.tensor([True, False, True]), torch.tensor([7, 7, 3])
    loss = contrastive_loss(text, image, torch.tensor(SCALE), valid, groups)
    assert abs(loss.item() - sum(terms) / 4) < 1e-6
    loss.backward()
    assert torch.all(text.grad[1] == 0) and torch.all(image.grad[1] == 0)
    assert text.grad[0].abs().sum() > 0 and image.grad[2].abs().sum() > 0
    # no valid row at all: zero, not NaN
    none = contrastive_loss(TEXT, IMAGE, torch.tensor(SCALE), torch.zeros(3, dtype=torch.bool), groups)
    assert none.item() == 0.0


def _multi_positive_reference(text, image, scale, valid, groups):
    """The loss by its definition: over the valid rows only, -log Σ_positives softmax, both directions."""
    keep = [i for i in range(len(text)) if valid[i]]
    t, v = F.normalize(text[keep], dim=-1), F.normalize(image[keep], dim=-1)
    logits = scale * t @ v.t()
    g = groups[keep]
    total = 0.0
    for i in range(len(keep)):
        same = g == g[i]
        total += -(logits[i].softmax(0)[same].sum().log()) - logits[:, i].softmax(0)[same].sum().log()
    return total / (2 * len(keep))


def test_multi_positive_infonce_equals_its_definition_on_random_rows():
    g = torch.Generator().manual_seed(1)
    text, image = torch.randn(7, 5, generator=g), torch.randn(7, 5, generator=g)
    groups = torch.tensor([1, 2, 1, 3, 2, 1, 4])
    valid = torch.tensor([True, True, False, True, True, True, False])
    loss = contrastive_loss(text, image, torch.tensor(3.0), valid, groups)
    torch.testing.assert_close(loss, _multi_positive_reference(text, image, 3.0, valid, groups))


# --- the object-level prior term ------------------------------------------------------------
def _softplus(x):
    return math.log1p(math.exp(x))


def test_object_prior_loss_matches_a_hand_computation():
    from absvl.models.vl.losses import object_prior_loss

    # row 0: ξ = x; cosines of its 4 tokens [1, 0, -1, 0.6]; patches owned by object 1 (the target), object 2,
    # background, nobody (-1: ignored) -> one positive (cos 1), two negatives (cos 0, -1)
    # row 1: ξ = y; cosines [0.8, -0.6, 1, 0]; background, background, nobody, nobody -> two negatives only
    text = torch.tensor([[2.0, 0.0], [0.0, 0.5]])
    tokens = torch.tensor(
        [
            [[1.0, 0.0], [0.0, 3.0], [-2.0, 0.0], [0.6, 0.8]],
            [[0.6, 0.8], [0.8, -0.6], [0.0, 1.0], [1.0, 0.0]],
        ]
    )
    patch_objects = torch.tensor([[1, 2, 0, -1], [0, 0, -1, -1]])
    target_objects = torch.tensor([[False, True, False], [False, True, False]])
    s = 5.0
    row0 = (_softplus(-s * 1.0) + (_softplus(s * 0.0) + _softplus(s * -1.0)) / 2) / 2
    row1 = (_softplus(s * 0.8) + _softplus(s * -0.6)) / 2
    loss = object_prior_loss(text, tokens, patch_objects, target_objects)
    assert abs(loss.item() - (row0 + row1) / 2) < 1e-6
    # the scale is the logits' factor
    row0 = (_softplus(-2.0) + (_softplus(0.0) + _softplus(-2.0)) / 2) / 2
    row1 = (_softplus(1.6) + _softplus(-1.2)) / 2
    assert (
        abs(object_prior_loss(text, tokens, patch_objects, target_objects, scale=2.0).item() - (row0 + row1) / 2) < 1e-6
    )


def test_object_prior_loss_ignores_unowned_patches_and_trains_text_and_tokens():
    from absvl.models.vl.losses import object_prior_loss

    g = torch.Generator().manual_seed(0)
    text = torch.randn(3, 6, generator=g, requires_grad=True)
    tokens = torch.randn(3, 5, 6, generator=g, requires_grad=True)
    patch_objects = torch.tensor([[1, 1, 2, 0, -1], [2, 0, 0, -1, 1], [-1, -1, -1, -1, -1]])
    target_objects = torch.tensor([[False, True, False], [False, False, True], [False, True, True]])
    loss = object_prior_loss(text, tokens, patch_objects, target_objects)
    loss.backward()
    assert text.grad[:2].abs().sum(-1).min() > 0 and tokens.grad[0, :4].abs().sum(-1).min() > 0
    # the patches nobody owns and the row without a labelled patch take no part
    assert torch.all(tokens.grad[0, 4] == 0) and torch.all(tokens.grad[1, 3] == 0)
    assert torch.all(tokens.grad[2] == 0) and torch.all(text.grad[2] == 0)
    # what an unowned token holds does not change the loss
    moved = tokens.detach().clone()
    moved[0, 4], moved[2] = 100.0, -3.0
    torch.testing.assert_close(object_prior_loss(text, moved, patch_objects, target_objects), loss)
    # a token aligned with ξ lowers the loss on a positive and raises it on a negative
    aligned = tokens.detach().clone()
    aligned[0, 0] = text.detach()[0]  # patch 0 of row 0 is object 1, a target
    assert object_prior_loss(text, aligned, patch_objects, target_objects) < loss
    aligned = tokens.detach().clone()
    aligned[0, 2] = text.detach()[0]  # object 2: not asked about
    assert object_prior_loss(text, aligned, patch_objects, target_objects) > loss


def test_object_prior_loss_is_fp32_under_autocast():
    from absvl.models.vl.losses import object_prior_loss

    g = torch.Generator().manual_seed(0)
    text, tokens = torch.randn(2, 8, generator=g), torch.randn(2, 4, 8, generator=g)
    patch_objects, target_objects = (
        torch.tensor([[1, 0, 2, 1], [0, 2, 2, 1]]),
        torch.tensor([[0, 1, 0], [0, 0, 1]]).bool(),
    )
    plain = object_prior_loss(text, tokens, patch_objects, target_objects)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = object_prior_loss(text.bfloat16(), tokens, patch_objects, target_objects)
    assert cast.dtype == torch.float32
    torch.testing.assert_close(cast, plain, rtol=2e-2, atol=2e-2)


# --- where the top-down pass acts -----------------------------------------------------------------
def test_topdown_object_loss_is_minus_the_log_share_of_the_change_on_the_question_s_objects():
    from absvl.models.vl.losses import topdown_object_loss

    # row 0: cells of object 1 (the target), object 2, background, nobody (ignored): share 3 / (3 + 1 + 0)
    # row 1: its target (object 2) is not in the image: counts 0 (its answer says the object is absent)
    # row 2: all the change off its target: the share's floor, 1e-6
    change = torch.tensor([[3.0, 1.0, 0.0, 50.0], [1.0, 2.0, 3.0, 4.0], [0.0, 2.0, 0.0, 0.0]])
    patch_objects = torch.tensor([[1, 2, 0, -1], [1, 1, 0, 0], [1, 2, 0, 0]])
    target_objects = torch.tensor([[False, True, False], [False, False, True], [False, True, False]])
    loss = topdown_object_loss(change, patch_objects, target_objects)
    assert loss.item() == pytest.approx((-math.log(0.75) + 0.0 - math.log(1e-6)) / 3, rel=1e-5)
    # scale-free: a pass that changes everything less is no better
    torch.testing.assert_close(topdown_object_loss(change * 0.01, patch_objects, target_objects), loss)
    # all of a row's change on its target: 0
    on_target = torch.tensor([[3.0, 0.0, 0.0, 9.0]])
    assert topdown_object_loss(on_target, patch_objects[:1], target_objects[:1]).item() == pytest.approx(0.0, abs=1e-6)
    # the gradient moves change from the other cells to the target's
    change.requires_grad_(True)
    topdown_object_loss(change, patch_objects, target_objects).backward()
    assert change.grad[0, 0] < 0 < change.grad[0, 1] and change.grad[0, 3] == 0 and torch.all(change.grad[1] == 0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert topdown_object_loss(change.bfloat16(), patch_objects, target_objects).dtype == torch.float32
