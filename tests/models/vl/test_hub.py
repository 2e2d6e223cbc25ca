"""save_pretrained / from_pretrained / push_to_hub: self-contained folders, exact outputs, no token leaks."""
import json
import logging
import shutil

import pytest
import torch
from huggingface_hub import HfApi

from absvl import AbsVLModel
from absvl.models.vl import build_tiny_text_encoder

BASE_FILES = {"model.safetensors", "config.json", "answers.json", "README.md"}


def _tokenizer_files(model, tmp_path):
    folder = tmp_path / "tokenizer_only"
    model.tokenizer.save_pretrained(folder)
    return {p.name for p in folder.iterdir()}


def _outputs(model, batch):
    with torch.no_grad():
        out = model(batch["images"], batch["input_ids"], batch["attention_mask"])
    return out.vqa_logits, out.itm_logits, out.text_embeds, out.image_embeds, out.vision.tokens


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
    assert json.loads((saved / "answers.json").read_text()) == model.answers
    card = (saved / "README.md").read_text()
    for text in ("absvit_test_patch8", kind, "Shapes world (test)", "| VQA acc | 12.5 |", "absvl.pipeline",
                 "library_name: absvl"):
        assert text in card

    shutil.rmtree(text_dir)  # loading must not need the original text encoder
    loaded = AbsVLModel.from_pretrained(saved)
    assert not loaded.training
    for a, b in zip(expected, _outputs(loaded, batch)):
        assert torch.equal(a, b)
    assert loaded.answers == model.answers
    assert loaded.processor(text=["what color is the circle?"])["input_ids"].tolist() == \
        model.processor(text=["what color is the circle?"])["input_ids"].tolist()

    saved_again = tmp_path / "saved_again"
    loaded.save_pretrained(saved_again)
    assert json.loads((saved_again / "config.json").read_text()) == config


def test_from_pretrained_names_bad_folders_and_keys(make_model, tmp_path):
    saved = tmp_path / "saved"
    make_model("vit_test_patch8").save_pretrained(saved)
    config = json.loads((saved / "config.json").read_text())
    config["fusion_layer"] = 3
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="'fusion_layer'"):
        AbsVLModel.from_pretrained(saved)
    (saved / "answers.json").unlink()
    with pytest.raises(FileNotFoundError, match="answers.json"):
        AbsVLModel.from_pretrained(saved)


def test_push_to_hub_uploads_the_saved_folder_and_never_the_token(make_model, tmp_path, monkeypatch, caplog, capsys):
    token = "hf_NOT_A_REAL_TOKEN_1234567890"
    model = make_model("absvit_test_patch8")
    calls = {}

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"] = (repo_id, self.token)
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        calls["upload"] = {p.name: p.read_bytes() for p in folder_path.iterdir()}
        calls["upload_kwargs"] = dict(kwargs, repo_id=repo_id)
        return f"https://huggingface.co/{repo_id}/commit/0000"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    caplog.set_level(logging.DEBUG)
    url = model.push_to_hub("someone/absvl-tiny", token=token, model_card_kwargs={"training_data": ["Shapes"]})

    assert url == "https://huggingface.co/someone/absvl-tiny/commit/0000"
    assert calls["create_repo"] == ("someone/absvl-tiny", token)  # the token only goes to the API client
    assert set(calls["upload"]) == BASE_FILES | _tokenizer_files(model, tmp_path)
    card = calls["upload"]["README.md"].decode()
    assert 'absvl.pipeline("vqa", model="someone/absvl-tiny")' in card and "- Shapes" in card
    captured = capsys.readouterr()
    for name, content in calls["upload"].items():
        assert token.encode() not in content, name
    assert token not in caplog.text and token not in captured.out and token not in captured.err
    assert token not in repr(calls["upload_kwargs"])
