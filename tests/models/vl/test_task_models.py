"""One class per folder: the encoder and the task models load each other's folders (a task model starts its head
fresh only when asked), ``load_model`` returns the class a folder holds, and absvl 0.2 folders (one class with
both heads, ``trained_tasks``) load with their trained head only."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from absvl import AbsVLForQuestionAnswering, AbsVLForRetrieval, AbsVLModel
from absvl.models.vl import load_model

from .conftest import ANSWERS


def _perturbed(model):
    with torch.no_grad():  # away from the init: a weight that was not loaded shows
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model.eval()


def _encoder_state(model):
    return {k: v for k, v in model.state_dict().items() if not k.startswith(("vqa_head.", "itm_head."))}


def _same(a, b):
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_each_folder_holds_one_class_and_load_model_returns_it(make_model, tmp_path):
    for task, cls in ((None, AbsVLModel), ("vqa", AbsVLForQuestionAnswering), ("retrieval", AbsVLForRetrieval)):
        folder = tmp_path / str(task)
        model = _perturbed(make_model(task=task))
        model.save_pretrained(folder)
        config = json.loads((folder / "config.json").read_text())
        assert config["architecture"] == cls.__name__
        assert (folder / "answers.json").is_file() == (task == "vqa")
        loaded = load_model(folder)
        assert type(loaded) is cls
        _same(loaded.state_dict(), model.state_dict())
        card = (folder / "README.md").read_text()
        assert f"| Class | `{cls.__name__}` |" in card


def test_a_task_model_starts_its_head_fresh_only_when_asked(make_model, tmp_path):
    encoder = _perturbed(make_model(task=None))
    encoder.save_pretrained(tmp_path / "encoder")
    with pytest.raises(ValueError, match=r"holds no trained VQA head \(AbsVLModel\).*answers=\[\.\.\.\]"):
        AbsVLForQuestionAnswering.from_pretrained(tmp_path / "encoder")
    with pytest.raises(ValueError, match=r"holds no trained ITM head \(AbsVLModel\).*new_head=True"):
        AbsVLForRetrieval.from_pretrained(tmp_path / "encoder")
    vqa = AbsVLForQuestionAnswering.from_pretrained(tmp_path / "encoder", answers=ANSWERS[:3])
    assert vqa.answers == ANSWERS[:3] and vqa.config.num_answers == 3 and vqa.vqa_head.fc2.out_features == 3
    _same(_encoder_state(vqa), encoder.state_dict())  # the encoder is the folder's, the head is new

    vqa = _perturbed(vqa)
    vqa.save_pretrained(tmp_path / "vqa")
    retrieval = AbsVLForRetrieval.from_pretrained(tmp_path / "vqa", new_head=True)
    _same(_encoder_state(retrieval), _encoder_state(vqa))
    assert retrieval.config.num_answers == 0 and not hasattr(retrieval, "vqa_head")
    # a VQA folder's own head is kept, and must fit the answers given
    again = AbsVLForQuestionAnswering.from_pretrained(tmp_path / "vqa", answers=ANSWERS[:3])
    _same(again.state_dict(), vqa.state_dict())
    with pytest.raises(ValueError, match="another answer vocabulary"):
        AbsVLForQuestionAnswering.from_pretrained(tmp_path / "vqa", answers=ANSWERS)
    with pytest.raises(TypeError, match="unexpected options"):
        AbsVLModel.from_pretrained(tmp_path / "vqa", answers=ANSWERS)


def test_weights_that_are_neither_the_class_nor_another_head_are_refused(make_model, tmp_path):
    folder = tmp_path / "vqa"
    make_model().save_pretrained(folder)
    weights = load_file(folder / "model.safetensors")
    save_file({**weights, "surprise.weight": torch.zeros(2)}, folder / "model.safetensors")
    with pytest.raises(ValueError, match=r"it has 1 weights \(surprise.weight\).*AbsVLForQuestionAnswering"):
        AbsVLForQuestionAnswering.from_pretrained(folder)
    del weights["fusion.image_proj.weight"]
    save_file(weights, folder / "model.safetensors")
    with pytest.raises(ValueError, match=r"it lacks 1 weights \(fusion.image_proj.weight\)"):
        AbsVLModel.from_pretrained(folder)


def _as_absvl_0_2(folder, itm_head, trained_tasks):
    """Rewrite a VQA model's folder as absvl 0.2 wrote it: one class with both heads, no architecture, the
    trained tasks listed (``None``: not recorded)."""
    weights = load_file(folder / "model.safetensors")
    save_file(
        {**weights, **{f"itm_head.{k}": v for k, v in itm_head.state_dict().items()}}, folder / "model.safetensors"
    )
    config = json.loads((folder / "config.json").read_text())
    del config["architecture"]
    config["absvl_version"] = "0.2.0"
    if trained_tasks is not None:
        config["trained_tasks"] = trained_tasks
    (folder / "config.json").write_text(json.dumps(config))


def test_absvl_0_2_folders_load_with_their_trained_heads(make_model, make_batch, tmp_path):
    vqa = _perturbed(make_model())
    itm = _perturbed(make_model(task="retrieval")).itm_head
    batch = make_batch(vqa)
    with torch.no_grad():
        expected = vqa(batch["images"], batch["input_ids"], batch["attention_mask"]).vqa_logits
    for trained, model_class in ((["vqa"], AbsVLForQuestionAnswering), (["retrieval"], AbsVLForRetrieval)):
        folder = tmp_path / "_".join(trained)
        vqa.save_pretrained(folder)
        _as_absvl_0_2(folder, itm, trained)
        assert type(load_model(folder)) is model_class
    # a VQA export: its answers are the same; its ITM head was frozen while the encoder changed: stale
    loaded = AbsVLForQuestionAnswering.from_pretrained(tmp_path / "vqa")
    with torch.no_grad():
        assert torch.equal(loaded(batch["images"], batch["input_ids"], batch["attention_mask"]).vqa_logits, expected)
    with pytest.raises(ValueError, match=r"no trained ITM head \(an absvl 0.2 model with trained heads: vqa\)"):
        AbsVLForRetrieval.from_pretrained(tmp_path / "vqa")
    fresh = AbsVLForRetrieval.from_pretrained(tmp_path / "vqa", new_head=True)
    assert not torch.equal(fresh.itm_head.fc.weight, itm.fc.weight)
    # a retrieval export keeps its ITM head; its VQA head is stale
    retrieval = AbsVLForRetrieval.from_pretrained(tmp_path / "retrieval")
    assert torch.equal(retrieval.itm_head.fc.weight, itm.fc.weight)
    with pytest.raises(ValueError, match="no trained VQA head"):
        AbsVLForQuestionAnswering.from_pretrained(tmp_path / "retrieval")
    # not recorded (built in code): both heads count as trained
    folder = tmp_path / "unrecorded"
    vqa.save_pretrained(folder)
    _as_absvl_0_2(folder, itm, None)
    assert type(load_model(folder)) is AbsVLForQuestionAnswering
    assert torch.equal(AbsVLForRetrieval.from_pretrained(folder).itm_head.fc.weight, itm.fc.weight)
