"""Tiny text encoders and tokenizers built locally, with no download (SPEC §7, §8).

Tests and the offline demo need a ``transformers`` encoder + tokenizer in a folder that
``AutoModel``/``AutoTokenizer`` load like a hub checkpoint. ``build_tiny_text_encoder`` trains a
tokenizer on a small corpus (byte-level BPE for RoBERTa, WordPiece for BERT) and saves a freshly
initialised encoder of the matching vocabulary next to it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
import transformers
from tokenizers import BertWordPieceTokenizer, ByteLevelBPETokenizer

TEXT_KINDS = ("roberta", "bert")

DEFAULT_CORPUS = (
    "what color is the circle?",
    "what shape is left of the red square?",
    "is there a blue triangle above the green circle?",
    "how many yellow objects are there?",
    "a small purple square right of a large orange triangle.",
    "two circles and one square below a triangle.",
    "yes no zero one two three four five",
)


def build_tiny_text_encoder(
    out_dir: str | Path,
    kind: str = "roberta",
    corpus: Iterable[str] = DEFAULT_CORPUS,
    vocab_size: int = 512,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 2,
    intermediate_size: int = 64,
    max_position_embeddings: int = 66,
    seed: int = 0,
    pretrain_texts: Sequence[str] = (),
    pretrain_steps: int = 600,
) -> Path:
    """Train a tokenizer on ``corpus``, build a ``kind`` encoder for it, save both to ``out_dir``.

    Args:
        kind: ``roberta`` (byte-level BPE, ``<s>``/``</s>``, pad id 1) or ``bert`` (lower-cased
            WordPiece, ``[CLS]``/``[SEP]``, pad id 0).
        vocab_size: upper bound; the trained vocabulary may be smaller on a small corpus.
        max_position_embeddings: RoBERTa offsets positions by ``pad_token_id + 1``, so it
            handles texts of up to ``max_position_embeddings - 2`` tokens.
        seed: the encoder's initialisation and pretraining (the global RNG is left untouched).
        pretrain_texts: when given, the encoder is pretrained on them with masked language modelling
            for ``pretrain_steps`` steps (see ``pretrain_masked_lm``); otherwise it stays random.

    Returns:
        ``out_dir``, loadable with ``AutoModel``/``AutoTokenizer.from_pretrained``.
    """
    if kind not in TEXT_KINDS:
        raise ValueError(f"kind={kind!r} must be one of {', '.join(TEXT_KINDS)}")
    corpus = list(corpus)
    train = dict(vocab_size=vocab_size, min_frequency=1, show_progress=False)
    if kind == "roberta":
        specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
        trainer = ByteLevelBPETokenizer()
        trainer.train_from_iterator(corpus, special_tokens=specials, **train)
        tokenizer = transformers.RobertaTokenizer(tokenizer_object=trainer._tokenizer)
        config_cls, model_cls = transformers.RobertaConfig, transformers.RobertaModel
    else:
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        trainer = BertWordPieceTokenizer(lowercase=True)
        trainer.train_from_iterator(corpus, special_tokens=specials, **train)
        tokenizer = transformers.BertTokenizer(tokenizer_object=trainer._tokenizer)
        config_cls, model_cls = transformers.BertConfig, transformers.BertModel
    config = config_cls(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
        if pretrain_texts and pretrain_steps:
            pretrain_masked_lm(model, tokenizer, list(pretrain_texts), steps=pretrain_steps)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def pretrain_masked_lm(
    model: transformers.PreTrainedModel,
    tokenizer,
    texts: list[str],
    steps: int = 600,
    batch_size: int = 128,
    lr: float = 2e-3,
    mask_probability: float = 0.15,
) -> float:
    """Masked language modelling (RoBERTa's objective) of ``model`` in place on ``texts``; returns the last loss.

    A randomly initialised encoder gives every text the same first-token state (its attention is
    uniform and tiny, so the token's own embedding dominates): a VQA or ITM head reading that token
    cannot tell questions apart. A few hundred MLM steps make the layers mix the tokens, as a
    pretrained RoBERTa does. Draws from the global RNG (callers fork it).
    """
    head = transformers.AutoModelForMaskedLM.from_config(model.config)
    head.base_model.load_state_dict(model.state_dict(), strict=False)  # the MLM model has no pooler
    collate = transformers.DataCollatorForLanguageModeling(tokenizer, mlm_probability=mask_probability)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(steps // 20, 1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) * (1 - s / steps))
    batch = tokenizer(texts)  # one call: the fast tokenizer encodes the corpus in parallel
    encoded = [{key: batch[key][i] for key in batch} for i in range(len(texts))]
    head.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        picks = torch.randint(len(encoded), (min(batch_size, len(encoded)),)).tolist()
        loss = head(**collate([encoded[i] for i in picks])).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    model.load_state_dict(head.base_model.state_dict(), strict=False)
    return float(loss.detach())
