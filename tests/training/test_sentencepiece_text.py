"""SentencePiece text encoders (XLM-R, DeBERTa-v3, T5 encoder) as the text tower: a tiny SentencePiece
model trained here on the Shapes questions, a tiny encoder config, a couple of VQA steps, a reload."""

import json
import shutil

import pytest
import sentencepiece as spm
import transformers

from absvl.models.vl import AbsVLForQuestionAnswering
from absvl.training.config import load_config
from absvl.training.vqa import train_vqa

CONFIG = "configs/shapes_absvit_tiny.yaml"
TINY = {"num_hidden_layers": 1, "num_attention_heads": 2, "hidden_size": 32, "intermediate_size": 64}

# tokenizer class, the file name its folder expects for the SentencePiece model, the encoder
ENCODERS = {
    "xlm-roberta": (
        transformers.XLMRobertaTokenizer,
        "sentencepiece.bpe.model",
        lambda tok: transformers.XLMRobertaModel(
            transformers.XLMRobertaConfig(
                vocab_size=len(tok), max_position_embeddings=64, pad_token_id=tok.pad_token_id, **TINY
            )
        ),
    ),
    "deberta-v3": (
        transformers.DebertaV2Tokenizer,
        "spm.model",
        lambda tok: transformers.DebertaV2Model(
            transformers.DebertaV2Config(
                vocab_size=len(tok),
                max_position_embeddings=64,
                pad_token_id=tok.pad_token_id,
                relative_attention=True,
                position_buckets=16,
                pos_att_type=["p2c", "c2p"],
                **TINY,
            )
        ),
    ),
    "t5-encoder": (
        transformers.T5Tokenizer,
        "spiece.model",
        lambda tok: transformers.T5EncoderModel(
            transformers.T5Config(
                vocab_size=len(tok),
                d_model=32,
                d_kv=16,
                d_ff=64,
                num_layers=1,
                num_heads=2,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
            )
        ),
    ),
}


@pytest.fixture(scope="module")
def sentencepiece_model(shapes_root, tmp_path_factory):
    questions = json.loads((shapes_root / "v2_OpenEnded_mscoco_train2014_questions.json").read_text())["questions"]
    prefix = tmp_path_factory.mktemp("spm") / "shapes"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([q["question"] for q in questions]),
        model_prefix=str(prefix),
        vocab_size=200,
        model_type="unigram",
        character_coverage=1.0,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    return prefix.with_suffix(".model")


@pytest.mark.parametrize(
    "kind",
    [
        "xlm-roberta",
        "deberta-v3",
        "t5-encoder",  # an encoder-decoder: its encoder alone is the text tower
    ],
)
def test_a_sentencepiece_text_encoder_trains_and_reloads(kind, sentencepiece_model, tiny_overrides, tmp_path):
    tokenizer_class, file_name, build = ENCODERS[kind]
    raw, folder = tmp_path / "spm", tmp_path / kind
    raw.mkdir()
    shutil.copy(sentencepiece_model, raw / file_name)
    tokenizer = tokenizer_class.from_pretrained(raw, **({"extra_ids": 0} if kind == "t5-encoder" else {}))
    build(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)

    config = load_config(CONFIG, [*tiny_overrides, f"model.text_encoder={folder}", "train.max_steps=2"])
    summary = train_vqa(config)
    assert summary["step"] == 2 and summary["val"]["overall"] >= 0
    model = AbsVLForQuestionAnswering.from_pretrained(summary["export"])
    assert type(model.tokenizer) is tokenizer_class
    question = "what color is the circle left of the square?"
    assert model.tokenizer(question)["input_ids"] == tokenizer(question)["input_ids"]
    assert model.text_encoder.config.model_type == build(tokenizer).config.model_type
