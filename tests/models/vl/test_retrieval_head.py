"""Retrieval's own embedding head (``retrieval_head_dim``): what it embeds, its contrastive loss, the gate's training
signal left as it is, re-ranking in its space, and its weights' round trip (fresh on another task's encoder)."""

import pytest
import torch
import torch.nn.functional as F

from absvl import AbsVLForRetrieval
from absvl.models.vl import AbsVLConfig, load_model
from absvl.models.vl.heads import RetrievalEmbedding
from absvl.models.vl.losses import contrastive_loss, text_groups

DIM = 24


def test_the_head_pools_text_and_image_by_learned_attention_the_padding_left_out():
    torch.manual_seed(0)
    head = RetrievalEmbedding(text_width=8, vision_width=6, dim=5, queries=3)
    hidden = torch.randn(2, 4, 8)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    x = head.text_norm(hidden[0, :2])
    weights = head.text_pool(x).softmax(dim=0)  # [2, 3]: per query a distribution over the two real tokens
    expected = F.normalize(head.text_proj((weights.t() @ x).flatten()), dim=-1)
    torch.testing.assert_close(head.text(hidden, mask)[0], expected)
    padded = hidden.clone()
    padded[0, 2:] = 100.0  # what the padding holds does not count
    torch.testing.assert_close(head.text(padded, mask)[0], expected)
    tokens = torch.randn(2, 9, 6)
    x = head.image_norm(tokens[0])
    weights = head.image_pool(x).softmax(dim=0)  # [9, 3]
    expected = F.normalize(head.image_proj((weights.t() @ x).flatten()), dim=-1)
    torch.testing.assert_close(head.image(tokens)[0], expected)
    torch.testing.assert_close(head.image(tokens).norm(dim=-1), torch.ones(2))


def test_a_head_model_ranks_and_indexes_in_the_head_space(make_model, make_batch):
    model = make_model(task="retrieval", retrieval_head_dim=DIM).eval()
    batch = make_batch(model)
    text = model.encode_text(batch["input_ids"], batch["attention_mask"])
    image = model.encode_image_bottom_up(batch["images"])
    assert text.shape == image.shape == (4, DIM) and model.embedding_dim == DIM
    torch.testing.assert_close(image.norm(dim=-1), torch.ones(4))
    out = model(batch["images"], batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(out.text_embeds, text)
    torch.testing.assert_close(out.image_embeds, image)  # query-independent: the first pass's tokens
    expected = out.itm_logits[:, 1] - out.itm_logits[:, 0] + model.itc_head.scale() * (text * image).sum(-1)
    torch.testing.assert_close(
        model.rerank_score(batch["images"], batch["input_ids"], batch["attention_mask"]), expected
    )
    assert "retrieval embedding head of 24" in model.head_description()
    gate = make_model(task="retrieval").eval()
    assert gate.itc_head is None and gate.embedding_dim == gate.backbone.num_features
    assert gate.encode_text(batch["input_ids"], batch["attention_mask"]).shape[1] == gate.backbone.num_features


def test_the_head_trains_by_its_own_loss_and_the_prior_loss_is_unchanged(make_model, make_batch):
    head_model = make_model(task="retrieval", retrieval_head_dim=DIM, itc_loss_weight=0.5)
    gate_model = make_model(task="retrieval")
    gate_model.load_state_dict(head_model.state_dict(), strict=False)  # the same encoder and ITM head
    batch = make_batch(head_model)
    torch.manual_seed(1)
    out = head_model(**batch)
    torch.manual_seed(1)
    gate_out = gate_model(**batch)
    # the gate's training signal: the same prior loss (and L_var) with or without the head
    for term in ("prior", "var", "itm"):
        torch.testing.assert_close(out.losses[term], gate_out.losses[term])
    positive = batch["labels"] == 1
    groups = text_groups(batch["input_ids"], batch["attention_mask"])
    itc = contrastive_loss(out.text_embeds, out.image_embeds, head_model.itc_head.scale(), positive, groups)
    torch.testing.assert_close(out.losses["itc"], itc)
    torch.testing.assert_close(out.loss, gate_out.loss + 0.5 * itc)
    assert "itc" not in gate_out.losses
    head_model.zero_grad()
    out.losses["itc"].backward()
    assert head_model.itc_head.image_proj.weight.grad.abs().sum() > 0
    assert head_model.prior.proj.weight.grad is None or head_model.prior.proj.weight.grad.abs().sum() == 0
    groups = {g["name"]: g for g in head_model.parameter_groups(1e-3, 0.01)}
    grouped = {id(p) for g in groups.values() for p in g["params"]}
    assert all(id(p) in grouped for p in head_model.itc_head.parameters())


def test_the_head_round_trips_and_starts_fresh_on_another_tasks_encoder(make_model, make_batch, tmp_path):
    model = make_model(task="retrieval", retrieval_head_dim=DIM).eval()
    model.save_pretrained(tmp_path / "retrieval")
    loaded = load_model(tmp_path / "retrieval")
    assert type(loaded) is AbsVLForRetrieval and loaded.config.retrieval_head_dim == DIM
    batch = make_batch(model)
    torch.testing.assert_close(
        loaded.encode_image_bottom_up(batch["images"]), model.encode_image_bottom_up(batch["images"])
    )
    vqa = make_model(task="vqa")
    vqa.save_pretrained(tmp_path / "vqa")
    fresh = AbsVLForRetrieval.from_pretrained(tmp_path / "vqa", new_head=True, retrieval_head_dim=DIM)
    assert fresh.config.retrieval_head_dim == DIM and fresh.embedding_dim == DIM
    plain = AbsVLForRetrieval.from_pretrained(tmp_path / "vqa", new_head=True)
    assert plain.itc_head is None
    # a retrieval folder's trained heads keep their space
    kept = AbsVLForRetrieval.from_pretrained(tmp_path / "retrieval", new_head=True, retrieval_head_dim=0)
    assert kept.config.retrieval_head_dim == DIM
    with pytest.raises(ValueError, match="retrieval_head_dim=-1 must be >= 0"):
        AbsVLConfig(retrieval_head_dim=-1)
