"""torch.compile sees the whole training loss as one graph: no graph breaks (each one is a
return to Python and a split of the compiled step) for any backbone family or loss."""

import pytest
import torch


def _graph_breaks(fn, *args):
    torch._dynamo.reset()
    explained = torch._dynamo.explain(fn)(*args)
    return explained.graph_break_count, [str(b.reason).splitlines()[0] for b in explained.break_reasons]


@pytest.mark.parametrize(
    "backbone", ["absvit_test_patch8", "vit_test_patch8", "vars_d_absvit_test_patch8", "tdam_resnet_test"]
)
def test_the_vqa_and_retrieval_losses_compile_without_graph_breaks(make_model, make_batch, backbone):
    model = make_model(backbone, prior_visual="both", gate_sparsity_weight=1.0)
    batch = make_batch(model)

    def vqa_loss(images, input_ids, attention_mask, vqa_targets):
        return model(images, input_ids, attention_mask, vqa_targets=vqa_targets).loss

    def retrieval_loss(images, input_ids, attention_mask, itm_labels):  # ITM + the prior loss on matching pairs only
        return model(images, input_ids, attention_mask, itm_labels=itm_labels).loss

    inputs = (batch["images"], batch["input_ids"], batch["attention_mask"])
    assert _graph_breaks(vqa_loss, *inputs, batch["vqa_targets"]) == (0, [])
    assert _graph_breaks(retrieval_loss, *inputs, batch["itm_labels"]) == (0, [])
