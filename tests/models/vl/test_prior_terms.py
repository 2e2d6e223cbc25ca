"""The prior loss's terms in the model: one positive class per text, pairs that are no positive, the object-level
term (``prior_object_weight``), the weights (``weighted_losses``), the prior-only forward and the per-term gradient
norms on the two encoders (``loss_gradient_norms``)."""

import pytest
import torch
import torch.nn.functional as F

from absvl.models.vl.losses import contrastive_loss, object_prior_loss, text_groups, topdown_object_loss

from .conftest import paper_loss

# two rows with the same question: one positive class of the prior loss
DUPLICATED = [
    "what color is the circle?",
    "is there a blue square?",
    "what color is the circle?",
    "how many triangles?",
]


def _objects(model, batch_size=4):
    """Each patch's object label (0 background, 1-3 objects, -1 nobody) and each question's objects."""
    g = torch.Generator().manual_seed(3)
    h, w = model.image_size // 8, model.image_size // 8
    patch_objects = torch.randint(0, 4, (batch_size, h * w), generator=g)
    patch_objects[:, 0] = 1  # every row holds object 1
    patch_objects[1, -2:] = -1
    target_objects = torch.zeros(batch_size, 4, dtype=torch.bool)
    target_objects[torch.arange(batch_size), torch.tensor([1, 2, 1, 3])] = True
    return patch_objects, target_objects


def test_rows_of_one_text_are_one_positive_class(make_model, make_batch):
    model = make_model("absvit_test_patch8", task="retrieval").train()
    batch = make_batch(model, questions=DUPLICATED)
    groups = text_groups(batch["input_ids"], batch["attention_mask"])
    assert groups[0] == groups[2] and len(set(groups.tolist())) == 3
    positive = torch.tensor([True, True, True, False])  # e.g. "how many ...?" answered 0
    out = model(**batch, prior_positive=positive)  # ITM labels [1, 1, 0, 1]: row 2 is a negative pair
    scale = model.contrastive.scale()
    valid = positive & (batch["labels"] == 1)
    expected = contrastive_loss(out.text_embeds, out.image_embeds, scale, valid, groups)
    torch.testing.assert_close(out.losses["prior"], expected)
    # only rows 0 and 1 are left: the duplicate (row 2) and the non-positive (row 3) are out of it
    torch.testing.assert_close(out.losses["prior"], contrastive_loss(out.text_embeds[:2], out.image_embeds[:2], scale))
    # without ITM labels the duplicated rows share their positives instead of being each other's negatives
    out = model(batch["images"], batch["input_ids"], batch["attention_mask"], return_loss=True)
    grouped = contrastive_loss(out.text_embeds, out.image_embeds, scale, groups=groups)
    torch.testing.assert_close(out.losses["prior"], grouped)
    assert not torch.allclose(out.losses["prior"], contrastive_loss(out.text_embeds, out.image_embeds, scale))


def _prior_objects(model, out, patch_objects, target_objects):
    """ξ against its own image's first pass, in the gate's space."""
    tokens = model.fusion_image_tokens(out.vision, "bottom_up")[:, out.vision.num_prefix_tokens :]
    return object_prior_loss(out.xi, tokens, patch_objects, target_objects)


def _topdown_objects(model, out, patch_objects, target_objects):
    """What the second pass changed in each token the fusion reads, squared, against the question's objects."""
    change = model.fusion_image_tokens(out.vision) - model.fusion_image_tokens(out.vision, "bottom_up")
    change = change[:, out.vision.num_prefix_tokens :].pow(2).sum(-1)
    return topdown_object_loss(change, patch_objects, target_objects)


@pytest.mark.parametrize(
    ("name", "weight", "expected", "trained"),
    [
        # ξ's projection and the backbone
        (
            "prior_objects",
            "prior_object_weight",
            _prior_objects,
            ("prior.proj.weight", "backbone.blocks.0.attn.qkv.weight"),
        ),
        # the feedback path (the decoders) and ξ's projection, which sets where the gate opens
        (
            "topdown_objects",
            "topdown_object_weight",
            _topdown_objects,
            ("prior.proj.weight", "backbone.decoders.0.linear.weight"),
        ),
    ],
)
def test_object_level_terms(make_model, make_batch, name, weight, expected, trained):
    model = make_model("absvit_test_patch8", **{weight: 0.5}).train()
    batch = make_batch(model)
    patch_objects, target_objects = _objects(model)
    out = model(**batch, patch_objects=patch_objects, target_objects=target_objects)
    assert set(out.losses) == {"vqa", "var", "prior", name}
    torch.testing.assert_close(out.losses[name], expected(model, out, patch_objects, target_objects))
    assert out.losses[name].item() > 0
    torch.testing.assert_close(out.loss, paper_loss(out, model.config, **{name: 0.5}))
    model.zero_grad()
    out.losses[name].backward()
    parameters = dict(model.named_parameters())
    assert all(parameters[p].grad.abs().sum() > 0 for p in trained)
    # no term without the objects, nor with the weight 0
    assert name not in model(**batch).losses
    off = make_model("absvit_test_patch8").train()
    assert name not in off(**batch, patch_objects=patch_objects, target_objects=target_objects).losses


def test_no_topdown_object_term_without_a_second_pass(make_model, make_batch):
    vit = make_model("vit_test_patch8", topdown_object_weight=0.5).train()
    patch_objects, target_objects = _objects(vit)
    out = vit(**make_batch(vit), patch_objects=patch_objects, target_objects=target_objects)
    assert "topdown_objects" not in out.losses and "vqa" in out.losses


def test_weighted_losses_are_the_terms_of_the_loss(make_model, make_batch):
    weights = dict(itm_loss_weight=0.7, var_loss_weight=0.2, prior_loss_weight=1.5, prior_object_weight=0.4)
    factors = {"vqa": 1.0, "itm": 0.7, "var": 0.2, "prior": 1.5, "prior_objects": 0.4, "gate": 0.3}
    for task, head_loss in (("vqa", "vqa"), ("retrieval", "itm")):
        model = make_model("absvit_test_patch8", task=task, gate_sparsity_weight=0.3, **weights).train()
        batch = make_batch(model)
        objects = dict(zip(("patch_objects", "target_objects"), _objects(model))) if task == "vqa" else {}
        out = model(**batch, **objects)
        weighted = model.weighted_losses(out.losses)
        expected = {head_loss, "var", "prior", "gate"} | ({"prior_objects"} if task == "vqa" else set())
        assert set(weighted) == set(out.losses) == expected
        for name, value in weighted.items():
            torch.testing.assert_close(value, factors[name] * out.losses[name])
        torch.testing.assert_close(out.loss, sum(weighted.values()))


def test_prior_losses_leave_out_terms_of_weight_zero(make_model, make_batch):
    model = make_model("absvit_test_patch8", prior_loss_weight=0.0, prior_object_weight=1.0).eval()
    batch = make_batch(model)
    patch_objects, target_objects = _objects(model)
    with torch.no_grad():
        _, xi = model.encode_prior(batch["input_ids"], batch["attention_mask"])
        first = model.first_pass(batch["images"])
        losses = model.prior_losses(xi, first, batch["input_ids"], batch["attention_mask"])
        assert losses == {}
        losses = model.prior_losses(
            xi, first, batch["input_ids"], batch["attention_mask"], None, patch_objects, target_objects
        )
    assert set(losses) == {"prior_objects"}


def test_prior_only_forward(make_model, make_batch):
    model = make_model("absvit_test_patch8", task=None, prior_object_weight=0.5).train()
    model.text_encoder.eval()  # no dropout: the two forwards below compare
    batch = make_batch(model, questions=DUPLICATED)
    patch_objects, target_objects = _objects(model)
    positive = torch.tensor([True, False, True, True])
    kwargs = dict(prior_positive=positive, patch_objects=patch_objects, target_objects=target_objects)
    inputs = (batch["images"], batch["input_ids"], batch["attention_mask"])
    out = model(*inputs, **kwargs, prior_only=True)
    assert set(out.losses) == {"prior", "prior_objects"}
    assert out.pooled is None  # no second pass, no fusion
    assert "top_down" not in out.vision.maps
    # the same terms as the full forward's (the prior reads the first pass either way)
    full = model(*inputs, **kwargs, return_loss=True)
    torch.testing.assert_close(out.losses["prior"], full.losses["prior"])
    torch.testing.assert_close(out.losses["prior_objects"], full.losses["prior_objects"])
    torch.testing.assert_close(out.loss, full.losses["prior"] + 0.5 * full.losses["prior_objects"])
    # a first pass computed once can be given instead of the images
    with torch.no_grad():
        first = model.first_pass(batch["images"])
    again = model(first, batch["input_ids"], batch["attention_mask"], **kwargs, prior_only=True)
    torch.testing.assert_close(again.loss, out.loss)
    # the backbone gets gradient when it trains, none (and no graph) when it is frozen
    out.loss.backward()
    assert model.backbone.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    model.zero_grad()
    model.backbone.requires_grad_(False)
    frozen = model(*inputs, **kwargs, prior_only=True)
    assert not frozen.vision.bottom_up_tokens.requires_grad
    frozen.loss.backward()
    assert model.prior.proj.weight.grad.abs().sum() > 0
    torch.testing.assert_close(frozen.loss, out.loss)
    # nothing to compute: an error, not a zero loss
    none = make_model("absvit_test_patch8", task=None, prior_loss_weight=0.0, prior_object_weight=1.0)
    with pytest.raises(ValueError, match="prior_only"):
        none(*inputs, prior_only=True)
    # the paper's z_L form needs the second pass, which prior_only skips
    second = make_model("absvit_test_patch8", task=None, prior_visual="top_down")
    with pytest.raises(ValueError, match="prior_visual=top_down"):
        second(*inputs, prior_only=True)


def _manual_norm(term, params):
    grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
    present = [g.flatten() for g in grads if g is not None]
    return torch.cat(present).norm() if present else torch.zeros(())


def test_loss_gradient_norms_are_each_weighted_terms_gradient_on_each_encoder(make_model, make_batch):
    model = make_model("absvit_test_patch8", prior_loss_weight=2.0, prior_object_weight=0.5).train()
    batch = make_batch(model)
    patch_objects, target_objects = _objects(model)
    out = model(**batch, patch_objects=patch_objects, target_objects=target_objects)
    norms = model.loss_gradient_norms(out.losses)
    terms = {"vqa", "var", "prior", "prior_objects"}
    assert set(norms) == {f"grad/{t}/{part}" for t in terms for part in ("backbone", "text_encoder")}
    assert all(v.ndim == 0 for v in norms.values())
    # L_var reads stop-gradients of the tokens: it trains the decoders (in the backbone), never the text encoder
    assert norms.pop("grad/var/text_encoder").item() == 0.0
    assert all(v.item() > 0 for v in norms.values()), {k: v.item() for k, v in norms.items()}
    norms = model.loss_gradient_norms(out.losses)
    assert all(p.grad is None for p in model.parameters())  # measured, not accumulated
    backbone = [p for p in model.backbone.parameters() if p.requires_grad]
    text = [p for p in model.text_encoder.parameters() if p.requires_grad]
    weighted = model.weighted_losses(out.losses)
    for name, term in weighted.items():
        torch.testing.assert_close(norms[f"grad/{name}/backbone"], _manual_norm(term, backbone), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(norms[f"grad/{name}/text_encoder"], _manual_norm(term, text), rtol=1e-4, atol=1e-6)
    # of the weighted term: twice the unweighted prior's
    unweighted = _manual_norm(out.losses["prior"], backbone)
    torch.testing.assert_close(norms["grad/prior/backbone"], 2 * unweighted, rtol=1e-4, atol=1e-6)
    # the graph is kept: the step's backward still runs
    out.loss.backward()
    assert model.backbone.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_loss_gradient_norms_skip_terms_without_gradient_and_count_unreached_parts_as_zero(make_model, make_batch):
    model = make_model("vit_test_patch8").train()
    batch = make_batch(model)
    out = model(**batch)
    losses = {**out.losses, "gate": torch.tensor(0.5)}  # a constant term: no gradient to measure
    norms = model.loss_gradient_norms(losses)
    assert not any(key.startswith("grad/gate/") for key in norms)
    assert norms["grad/vqa/backbone"] > 0 and norms["grad/vqa/text_encoder"] > 0
    # a term of the text alone: its backbone part is reached by no gradient, a zero
    text_only = {"prior": F.normalize(out.xi, dim=-1).sum()}
    norms = model.loss_gradient_norms(text_only)
    assert norms["grad/prior/backbone"].item() == 0.0 and norms["grad/prior/text_encoder"].item() > 0


def test_loss_gradient_norms_leave_out_a_frozen_part(make_model, make_batch):
    model = make_model("absvit_test_patch8").train()
    model.backbone.requires_grad_(False)
    out = model(**make_batch(model))
    norms = model.loss_gradient_norms(out.losses)
    assert not any(key.endswith("/backbone") for key in norms) and norms["grad/vqa/text_encoder"].item() > 0


def test_with_loss_weights_takes_the_objective_and_keeps_the_architecture(make_model, make_batch):
    from absvl import AbsVLConfig
    from absvl.models.vl.configuration import LOSS_WEIGHTS

    model = make_model("absvit_test_patch8", fusion_reads="both")
    other = AbsVLConfig(
        backbone="vit_test_patch8",
        fusion_hidden_size=48,
        var_loss_weight=0.1,
        prior_loss_weight=0.0,
        prior_object_weight=0.6,
        itm_loss_weight=0.2,
        gate_sparsity_weight=0.05,
    )
    before = model.config
    assert model.with_loss_weights(other) is model
    assert {k: getattr(model.config, k) for k in LOSS_WEIGHTS} == {k: getattr(other, k) for k in LOSS_WEIGHTS}
    for kept in ("backbone", "fusion_hidden_size", "fusion_reads", "text_config", "alpha"):
        assert getattr(model.config, kept) == getattr(before, kept)
    # the forward follows the new weights: no prior term, the object term and the gate's weighted
    model.train()
    patch_objects, target_objects = _objects(model)
    out = model(**make_batch(model), patch_objects=patch_objects, target_objects=target_objects)
    assert set(out.losses) == {"vqa", "var", "prior_objects", "gate"}
    torch.testing.assert_close(out.loss, sum(model.weighted_losses(out.losses).values()))
    torch.testing.assert_close(model.weighted_losses(out.losses)["prior_objects"], 0.6 * out.losses["prior_objects"])
