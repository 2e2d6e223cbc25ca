"""The tiny text encoder: masked-language-model pretraining makes its first token depend on the text."""

import torch
import torch.nn.functional as F
import transformers

from absvl.models.vl import build_tiny_text_encoder

TEXTS = [
    "what color is the circle?",
    "what shape is the red object?",
    "how many blue objects are there?",
    "is there a green square?",
    "a red circle left of a blue square.",
]


def _first_token_cosines(folder):
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModel.from_pretrained(folder).eval()
    batch = tokenizer(TEXTS[:4], padding=True, return_tensors="pt")
    with torch.no_grad():
        first = F.normalize(model(**batch).last_hidden_state[:, 0], dim=-1)
    cos = first @ first.t()
    return cos[~torch.eye(len(first), dtype=torch.bool)]


def test_mlm_pretraining_makes_the_first_token_tell_texts_apart(tmp_path):
    random_dir = build_tiny_text_encoder(tmp_path / "random", corpus=TEXTS)
    trained_dir = build_tiny_text_encoder(
        tmp_path / "trained", corpus=TEXTS, pretrain_texts=TEXTS * 20, pretrain_steps=300
    )
    assert _first_token_cosines(random_dir).min() > 0.999  # at init every text gets the same first state
    assert _first_token_cosines(trained_dir).min() < 0.99
    # deterministic, and the global RNG is left alone
    torch.manual_seed(1)
    before = torch.rand(1)
    torch.manual_seed(1)
    again = build_tiny_text_encoder(tmp_path / "again", corpus=TEXTS, pretrain_texts=TEXTS * 20, pretrain_steps=300)
    assert torch.rand(1) == before
    a = transformers.AutoModel.from_pretrained(trained_dir).state_dict()
    b = transformers.AutoModel.from_pretrained(again).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
