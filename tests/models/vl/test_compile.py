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
    for task in ("vqa", "retrieval"):  # the retrieval loss: ITM + the prior loss on matching pairs only
        model = make_model(backbone, task=task, prior_visual="both", gate_sparsity_weight=1.0)
        batch = make_batch(model)

        def loss(images, input_ids, attention_mask, labels):
            return model(images, input_ids, attention_mask, labels=labels).loss  # noqa: B023 (explained at once)

        inputs = (batch["images"], batch["input_ids"], batch["attention_mask"], batch["labels"])
        assert _graph_breaks(loss, *inputs) == (0, []), task
