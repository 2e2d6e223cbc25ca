"""The prior loss (symmetric InfoNCE) by hand, across two processes, and the VQA loss."""

import math
import subprocess
import sys
import textwrap

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
