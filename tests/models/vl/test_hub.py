"""save_pretrained / from_pretrained / push_to_hub: self-contained folders, exact outputs, no token leaks;
the Hub side is the local stand-in of tests/hub_stand_in.py (no network)."""

import json
import logging
import shutil
from dataclasses import replace

import pytest
import torch
from huggingface_hub import ModelCard
from huggingface_hub.errors import RepositoryNotFoundError

import absvl
from absvl import AbsVLForQuestionAnswering, AbsVLModel
from absvl.models.vl import build_tiny_text_encoder
from absvl.models.vl.model_card import render_model_card

BASE_FILES = {"model.safetensors", "config.json", "answers.json", "model_card.json", "README.md"}


def _tokenizer_files(model, tmp_path):
    folder = tmp_path / "tokenizer_only"
    model.tokenizer.save_pretrained(folder)
    return {p.name for p in folder.iterdir()}


def _outputs(model, batch):
    with torch.no_grad():
        out = model(batch["images"], batch["input_ids"], batch["attention_mask"])
    return out.vqa_logits, out.pooled, out.text_embeds, out.image_embeds, out.vision.tokens


@pytest.mark.parametrize("kind", ["roberta", "bert"])
def test_save_pretrained_roundtrip_is_exact_and_self_contained(make_model, make_batch, tmp_path, kind):
    text_dir = build_tiny_text_encoder(tmp_path / "text_src", kind=kind)
    model = make_model("absvit_test_patch8", text_dir=text_dir)
    with torch.no_grad():  # move away from the init so that every tensor matters
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.eval()
    batch = make_batch(model)
    expected = _outputs(model, batch)

    saved = tmp_path / "saved"
    card_kwargs = {"training_data": "Shapes world (test)", "metrics": {"VQA acc": 12.5}}
    model.save_pretrained(saved, model_card_kwargs=card_kwargs)
    assert {p.name for p in saved.iterdir()} == BASE_FILES | _tokenizer_files(model, tmp_path)
    assert not [p for p in saved.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt")]
    config = json.loads((saved / "config.json").read_text())
    assert config["backbone"] == "absvit_test_patch8" and config["alpha"] == 10.0
    assert config["text_config"]["model_type"] == kind and config["num_answers"] == len(model.answers)
    assert config["architecture"] == "AbsVLForQuestionAnswering" and "trained_tasks" not in config
    assert json.loads((saved / "answers.json").read_text()) == model.answers
    card = (saved / "README.md").read_text()
    for text in (
        "absvit_test_patch8",
        kind,
        "Shapes world (test)",
        "| VQA acc | 12.5 |",
        "absvl.pipeline",
        "library_name: absvl",
    ):
        assert text in card

    shutil.rmtree(text_dir)  # loading must not need the original text encoder
    loaded = AbsVLForQuestionAnswering.from_pretrained(saved)
    assert not loaded.training
    for a, b in zip(expected, _outputs(loaded, batch)):
        assert torch.equal(a, b)
    assert loaded.answers == model.answers
    assert (
        loaded.processor(text=["what color is the circle?"])["input_ids"].tolist()
        == model.processor(text=["what color is the circle?"])["input_ids"].tolist()
    )

    saved_again = tmp_path / "saved_again"
    loaded.save_pretrained(saved_again)
    assert json.loads((saved_again / "config.json").read_text()) == config
    assert (saved_again / "README.md").read_text() == card  # the card's training data and metrics are kept


def test_from_pretrained_names_bad_folders_and_keys(make_model, tmp_path):
    saved = tmp_path / "saved"
    make_model("vit_test_patch8").save_pretrained(saved)
    config = json.loads((saved / "config.json").read_text())
    config["fusion_layer"] = 3
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="'fusion_layer'"):
        AbsVLModel.from_pretrained(saved)
    del config["fusion_layer"]
    (saved / "config.json").write_text(json.dumps(config))
    (saved / "answers.json").unlink()
    with pytest.raises(FileNotFoundError, match="answers.json"):
        AbsVLForQuestionAnswering.from_pretrained(saved)
    assert AbsVLModel.from_pretrained(saved).config.num_answers == 0  # the encoder needs no answers


def test_a_tokenizer_that_does_not_fit_the_text_encoder_is_refused(make_model, bert_dir, tmp_path):
    # without its tokenizer files transformers builds a 5-entry RobertaTokenizer that encodes every question to
    # [2, 3]: the model answered "1" where the intact one says "cyan", without a word
    saved = tmp_path / "saved"
    make_model("absvit_test_patch8").save_pretrained(saved)
    assert AbsVLModel.from_pretrained(saved).tokenizer("what color?")["input_ids"] != [2, 3]
    kept = tmp_path / "kept"
    kept.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.move(saved / name, kept / name)
    with pytest.raises(ValueError) as refused:
        AbsVLModel.from_pretrained(saved)
    message = str(refused.value)
    assert message.startswith(f"{saved}: its tokenizer does not match its text encoder: the tokenizer has 5 entries")
    assert "its pad_token_id is 0 where the text encoder's is 1" in message
    assert "tokenizer files (none here) are missing or another model's" in message
    # another model's tokenizer (a BERT vocabulary of another size, other special tokens)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(bert_dir / name, saved / name)
    with pytest.raises(ValueError, match=r"the tokenizer has \d+ entries where the text encoder has \d+"):
        AbsVLModel.from_pretrained(saved)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(kept / name, saved / name)
    assert AbsVLForQuestionAnswering.from_pretrained(saved).answers  # its own files back: it loads


def test_a_missing_local_path_is_no_such_folder_not_a_hub_error(make_model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    (tmp_path / "model.safetensors").write_bytes(b"")
    for name in ("runs/vqa/final", "./final", str(tmp_path / "final"), "~/no/such/model", "runs/final"):
        with pytest.raises(FileNotFoundError, match=r": no such folder \(a model folder written by save_pretrained"):
            AbsVLModel.from_pretrained(name)
    with pytest.raises(FileNotFoundError, match="model.safetensors is a file, not a model folder"):
        AbsVLModel.from_pretrained("model.safetensors")


def test_push_to_hub_uploads_the_saved_folder_and_never_the_token(make_model, tmp_path, hub, caplog, capsys):
    token = "hf_NOT_A_REAL_TOKEN_1234567890"
    model = make_model("absvit_test_patch8")
    caplog.set_level(logging.DEBUG)
    commit = model.push_to_hub(
        "someone/absvl-tiny", token=token, private=True, model_card_kwargs={"training_data": ["Shapes"]}
    )

    repo = hub.repos["someone/absvl-tiny"]
    assert repo.private and commit.commit_url == f"{hub.url}/someone/absvl-tiny/commit/{commit.oid}"
    assert repo.branches["main"] == commit.oid
    files = repo.files("main")
    assert set(files) == BASE_FILES | _tokenizer_files(model, tmp_path) | {".gitattributes"}
    card = files["README.md"].decode()
    assert 'absvl.pipeline("vqa", model="someone/absvl-tiny")' in card and "- Shapes" in card
    assert {auth for _, _, auth in hub.requests if auth} == {f"Bearer {token}"}  # the token only goes to the API
    captured = capsys.readouterr()
    for name, content in files.items():
        assert token.encode() not in content, name
    assert token not in caplog.text and token not in captured.out and token not in captured.err

    model.save_pretrained(tmp_path / "absvl-copy", push_to_hub=True, token=token)  # the mixin's route, too
    assert b'model="user/absvl-copy"' in hub.repos["user/absvl-copy"].files("main")["README.md"]


def test_push_to_hub_keeps_the_exported_card_and_its_metadata(make_model, tmp_path, hub, monkeypatch):
    """The card written at export (training data, metrics) survives from_pretrained + push_to_hub, with
    model-index results and datasets in its metadata."""
    monkeypatch.setenv("HF_TOKEN", "hf_fake")
    exported = tmp_path / "final"
    card_kwargs = {
        "training_data": "VQAv2 train2014",
        "metrics": {"VQA accuracy (val)": 61.25},
        "datasets": ["HuggingFaceM4/VQAv2"],
    }
    make_model("absvit_test_patch8").save_pretrained(exported, model_card_kwargs=card_kwargs)

    AbsVLForQuestionAnswering.from_pretrained(exported).push_to_hub("me/vqa", branch="v1")
    repo = hub.repos["me/vqa"]
    assert set(repo.files("main")) == {".gitattributes"}  # the branch was made from main, main untouched
    card = ModelCard(repo.files("v1")["README.md"].decode())
    assert "| VQA accuracy (val) | 61.25 |" in card.text and "VQAv2 train2014" in card.text
    assert card.data.datasets == ["HuggingFaceM4/VQAv2"] and card.data.library_name == "absvl"
    (result,) = card.data.eval_results
    assert (result.metric_name, result.metric_value, result.dataset_type, result.task_type) == (
        "VQA accuracy (val)",
        61.25,
        "HuggingFaceM4/VQAv2",
        "visual-question-answering",
    )
    assert card.data.model_name == "vqa"


def test_model_card_base_model_names_hub_sources_only(make_model, roberta_dir):
    model = make_model("absvit_test_patch8")
    assert model.generate_model_card().data.base_model is None  # a local text encoder, no backbone weights
    model.config = replace(
        model.config, text_encoder="FacebookAI/roberta-base", backbone_weights="timm:deit_tiny_patch16_224.fb_in1k"
    )
    assert model.generate_model_card().data.base_model == [
        "FacebookAI/roberta-base",
        "timm/deit_tiny_patch16_224.fb_in1k",
    ]
    model.config = replace(model.config, text_encoder=str(roberta_dir), backbone_weights="/weights/absvit.pth")
    assert model.generate_model_card().data.base_model is None


def test_model_card_renders_from_the_config_alone(make_model):
    model = make_model("absvit_test_patch8")
    card = render_model_card(
        model.config, metrics={"VQA accuracy (val)": 50.0}, vision_width=48, image_size=64, num_parameters=1_234_567
    )
    assert "(absvit, width 48," in card.text and "| Image size | 64 px |" in card.text
    assert "| Parameters | 1.2 M |" in card.text and "| VQA accuracy (val) | 50.0 |" in card.text
    assert model.generate_model_card().text.count(f"{model.image_size} px") == 1


def test_backbone_weights_source_is_recorded(make_model, tmp_path):
    backbone = absvl.create_backbone("absvit_test_patch8")
    path = tmp_path / "absvit.pth"
    torch.save(backbone.state_dict(), path)
    model = make_model("absvit_test_patch8", backbone_kwargs={"pretrained_path": str(path)})
    assert model.config.backbone_weights == str(path) and model.config.backbone_kwargs.get("pretrained_path") is None


def test_from_pretrained_by_hub_id(make_model, make_batch, tmp_path, hub, monkeypatch):
    model = make_model("absvit_test_patch8").eval()
    monkeypatch.setenv("HF_TOKEN", "hf_fake")
    model.push_to_hub("org/absvl-tiny", private=True)
    model.push_to_hub("org/absvl-tiny", branch="dev", model_card_kwargs={"metrics": {"acc": 1.0}})
    batch = make_batch(model)

    loaded = AbsVLForQuestionAnswering.from_pretrained("org/absvl-tiny")
    for a, b in zip(_outputs(model, batch), _outputs(loaded, batch)):
        assert torch.equal(a, b)
    assert AbsVLModel.from_pretrained("org/absvl-tiny", revision="dev").card_data["metrics"] == {"acc": 1.0}
    image = torch.rand(20, 24, 3).numpy()
    assert absvl.pipeline("vqa", model="org/absvl-tiny")(image, "is it red?") == absvl.pipeline("vqa", model=model)(
        image, "is it red?"
    )

    monkeypatch.delenv("HF_TOKEN")  # private: without a token the repository is not there
    with pytest.raises(RepositoryNotFoundError):
        AbsVLModel.from_pretrained("org/absvl-tiny", cache_dir=tmp_path / "empty_cache")
