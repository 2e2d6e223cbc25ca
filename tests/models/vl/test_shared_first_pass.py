"""``image_index``: the texts of one image share its first pass (it does not read ξ). The forward, its losses and its
gradients equal those of the batch with each image repeated per text; the first pass runs once per image."""

import pytest
import torch


@pytest.mark.parametrize(
    "task, options",
    [("vqa", {}), ("vqa", {"prior_visual": "both", "prior_loss_weight": 1.0}), ("retrieval", {})],
)
def test_a_shared_first_pass_gives_the_per_pair_forward_and_gradients(make_model, make_batch, task, options):
    model = make_model(task=task, **options).eval()  # no dropout: both forwards draw nothing
    batch = make_batch(model)
    image_index = torch.tensor([0, 0, 1, 0])  # questions 0, 1 and 3 ask about image 0
    distinct = batch["images"][:2]

    def run(**kwargs):
        model.zero_grad()
        out = model(**kwargs, return_loss=True)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return out, grads

    per_pair, per_pair_grads = run(**{**batch, "images": distinct[image_index]})
    seen = []
    first_pass = model.first_pass
    model.first_pass = lambda images, *a: seen.append(len(images)) or first_pass(images, *a)
    shared, shared_grads = run(**{**batch, "images": distinct}, image_index=image_index)
    assert seen == [2]  # one first pass over the two distinct images
    logits = "vqa_logits" if task == "vqa" else "itm_logits"
    torch.testing.assert_close(getattr(shared, logits), getattr(per_pair, logits))
    assert shared.losses.keys() == per_pair.losses.keys()
    for name in shared.losses:
        torch.testing.assert_close(shared.losses[name], per_pair.losses[name])
    assert shared_grads.keys() == per_pair_grads.keys()
    for name, grad in shared_grads.items():
        torch.testing.assert_close(grad, per_pair_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_the_prior_only_forward_shares_the_first_pass_too(make_model, make_batch):
    model = make_model(task=None).eval()
    batch = {k: v for k, v in make_batch(model).items() if k != "labels"}
    image_index = torch.tensor([1, 0, 1, 1])
    distinct = batch["images"][:2]
    per_pair = model(**{**batch, "images": distinct[image_index]}, prior_only=True)
    shared = model(**{**batch, "images": distinct}, image_index=image_index, prior_only=True)
    torch.testing.assert_close(shared.loss, per_pair.loss)


def test_fewer_images_than_texts_without_image_index_is_refused(make_model, make_batch):
    model = make_model().eval()
    batch = make_batch(model)
    with pytest.raises(ValueError, match="2 images for 4 texts.*image_index"):
        model(**{**batch, "images": batch["images"][:2]})
