"""VQAv2 finetuning, evaluation and prediction with Hugging Face Accelerate.

One process (``absvl train vqa``) or many (``accelerate launch -m absvl.cli train vqa`` /
``torchrun --nproc_per_node N -m absvl.cli train vqa``), bf16/fp16, gradient accumulation,
clipping, AdamW with warmup + linear decay over the model's parameter groups, periodic
validation with the official VQA accuracy, atomic checkpoints and exact resume.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

from ..data.answers import build_answer_vocab, load_answers
from ..data.images import image_transform
from ..data.vqa import VQACollator, VQADataset, VQAExample, holdout_split, load_vqa_hf, load_vqa_split
from ..metrics.vqa import evaluate_vqa, format_accuracy_table
from ..models.vl import AbsVLModel
from ..runtime import cpu_only, keep_freed_memory
from .checkpoint import list_checkpoints, load_checkpoint, resolve_resume, rotate_checkpoints, save_checkpoint
from .config import ConfigError, RunConfig, dump_config
from .data import EpochOrder


@dataclass
class VQAData:
    answers: list[str]
    train: list[VQAExample]
    val: list[VQAExample]


def _load_split(config: RunConfig, split: str, require_annotations: bool) -> list[VQAExample]:
    d = config.data
    if d.format == "hf":
        return load_vqa_hf(d.root, split)
    return load_vqa_split(d.root, split, require_annotations=require_annotations)


def annotation_entry(example: VQAExample) -> dict[str, Any]:
    """The official annotation record of an annotated example (for the metric and the vocabulary)."""
    return {
        "question_id": example.question_id,
        "image_id": example.image_id,
        "question_type": example.question_type,
        "answer_type": example.answer_type,
        "multiple_choice_answer": example.multiple_choice_answer,
        "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(example.answers)],
    }


def question_entry(example: VQAExample) -> dict[str, Any]:
    return {"question_id": example.question_id, "image_id": example.image_id, "question": example.question}


def prepare_data(config: RunConfig, answers: list[str] | None = None) -> VQAData:
    """Training and validation examples and the answer vocabulary (built from the training
    splits with the official normalisation unless given)."""
    d = config.data
    if d.shapes:
        from ..data.shapes import ensure_shapes

        ensure_shapes(d.root, **d.shapes)
    by_split = {split: _load_split(config, split, require_annotations=True) for split in d.train_splits}
    val: list[VQAExample] = []
    if d.holdout_images:
        if d.val_split not in by_split:
            raise ConfigError("data.holdout_images needs data.val_split to be one of data.train_splits")
        by_split[d.val_split], val = holdout_split(by_split[d.val_split], d.holdout_images, config.train.seed)
    elif d.val_split:
        val = _load_split(config, d.val_split, require_annotations=True)
    train = [ex for examples in by_split.values() for ex in examples]
    if d.max_val_questions is not None:
        val = val[: d.max_val_questions]
    if answers is None:
        answers = build_answer_vocab([annotation_entry(ex) for ex in train], d.answers_min_count)
    if not answers:
        raise ConfigError(f"no answer occurs {d.answers_min_count}+ times in {d.train_splits}: lower data.answers_min_count")
    return VQAData(answers=answers, train=train, val=val)


def build_model(config: RunConfig, answers: list[str]) -> AbsVLModel:
    init = config.train.init_from
    if init:
        model = AbsVLModel.from_pretrained(init)
        if model.answers != answers:
            raise ConfigError(f"train.init_from={init!r} was trained with another answer vocabulary")
        return model.train()
    model_config = config.model
    if config.data.image_size is not None:
        model_config = replace(model_config, image_size=config.data.image_size)
    return AbsVLModel(model_config, answers=answers)


def _loader(dataset: Any, collator: VQACollator, batch_size: int, num_workers: int) -> DataLoader:
    """A loader that never draws from the process's RNG (its own generator seeds the workers),
    so creating one, e.g. for validation or on resume, leaves dropout's random stream alone."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,  # the order is EpochOrder's
        num_workers=num_workers,
        collate_fn=collator,
        generator=torch.Generator().manual_seed(0),
    )


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@torch.no_grad()
def predict_answers(
    model: AbsVLModel, loader: DataLoader, accelerator: Accelerator, answers: list[str], desc: str = "predict"
) -> tuple[dict[int, str], list[tuple]]:
    """question_id → best answer for every item of ``loader`` (gathered over processes), and skipped items."""
    was_training = model.training
    model.eval()
    predictions: dict[int, str] = {}
    skipped: list[tuple] = []
    for batch in tqdm(loader, desc=desc, disable=not accelerator.is_local_main_process, leave=False):
        skipped.extend(batch.get("skipped", []))
        batch = _to_device(batch, accelerator.device)
        if len(batch["question_ids"]) == 0:
            continue
        with accelerator.autocast():
            logits = model(batch["images"], batch["input_ids"], batch["attention_mask"]).vqa_logits
        ids, best = accelerator.gather_for_metrics((batch["question_ids"], logits.argmax(-1)))
        predictions.update((int(q), answers[int(a)]) for q, a in zip(ids.tolist(), best.tolist()))
    model.train(was_training)
    return predictions, skipped


def score_predictions(predictions: dict[int, str], examples: list[VQAExample]) -> dict[str, Any]:
    """The official VQA accuracy of ``predictions`` on annotated ``examples``."""
    questions = [question_entry(ex) for ex in examples]
    annotations = [annotation_entry(ex) for ex in examples]
    return evaluate_vqa(predictions, questions, annotations)


def _eval_loader(model: AbsVLModel, examples: list[VQAExample], config: RunConfig, batch_size: int) -> DataLoader:
    index = {a: i for i, a in enumerate(model.answers)}
    dataset = VQADataset(examples, index, image_transform(model.image_size, train=False), drop_unanswerable=False)
    collator = VQACollator(model.tokenizer, len(model.answers), model.config.max_text_len)
    return _loader(dataset, collator, batch_size, config.data.num_workers)


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


class _JsonLog:
    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def train_vqa(config: RunConfig) -> dict[str, Any]:
    """Run a finetuning job; returns a summary (final step, best/last validation, export folder)."""
    t = config.train
    keep_freed_memory()
    out = Path(t.output_dir)
    accelerator = Accelerator(
        cpu=cpu_only(),
        gradient_accumulation_steps=t.grad_accum,
        mixed_precision=t.mixed_precision,
        log_with=list(t.trackers) or None,
        project_dir=str(out),
    )
    main = accelerator.is_main_process
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(dump_config(config))
    set_seed(t.seed)
    checkpoint = resolve_resume(t.resume, out)
    answers = load_answers(out / "answers.json") if checkpoint and (out / "answers.json").is_file() else None
    data = prepare_data(config, answers)
    if main:
        (out / "answers.json").write_text(json.dumps(data.answers) + "\n")
    model = build_model(config, data.answers)
    model.itm_head.requires_grad_(False)  # VQA finetuning has no ITM term; DDP needs every trainable weight used
    answer_index = {a: i for i, a in enumerate(data.answers)}
    train_set = VQADataset(
        data.train, answer_index, image_transform(model.image_size, train=True, randaugment=config.data.randaugment)
    )
    collator = VQACollator(model.tokenizer, len(data.answers), model.config.max_text_len)
    optimizer = torch.optim.AdamW(
        model.parameter_groups(t.lr, t.weight_decay, t.lr_multipliers), lr=t.lr, betas=tuple(t.betas), eps=t.eps
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped: AbsVLModel = accelerator.unwrap_model(model)

    micro_batches = math.ceil(len(train_set) / (t.batch_size * accelerator.num_processes))
    steps_per_epoch = math.ceil(micro_batches / t.grad_accum)
    total_steps = t.max_steps or t.epochs * steps_per_epoch
    scheduler = get_scheduler(
        "linear", optimizer, num_warmup_steps=int(t.warmup_ratio * total_steps), num_training_steps=total_steps
    )
    state: dict[str, Any] = {
        "step": 0, "epoch": 0, "batches_in_epoch": 0, "best_checkpoint": None, "best_accuracy": None,
        "skipped": [], "samples": 0,
    }
    if checkpoint is not None:
        state = load_checkpoint(accelerator, checkpoint, model, optimizer, scheduler)
        accelerator.print(f"resumed from {checkpoint} at step {state['step']}")
    val_loader = _eval_loader(unwrapped, data.val, config, t.batch_size) if data.val else None
    if val_loader is not None:
        val_loader = accelerator.prepare_data_loader(val_loader)
    if t.trackers:
        accelerator.init_trackers("absvl", config=_flatten(config.to_dict()))
    log = _JsonLog(out / "log.jsonl", main)
    accelerator.print(
        f"training on {len(train_set)} questions ({train_set.num_dropped} without an in-vocabulary answer dropped), "
        f"{len(data.answers)} answers, {len(data.val)} validation questions; "
        f"{total_steps} steps of {t.batch_size * accelerator.num_processes * t.grad_accum} samples"
    )

    def validate() -> dict[str, Any] | None:
        if val_loader is None:
            return None
        predictions, skipped = predict_answers(unwrapped, val_loader, accelerator, data.answers, desc="validate")
        result = score_predictions(predictions, [ex for ex in data.val if ex.question_id in predictions])
        record = {"step": state["step"], "val/accuracy": result["overall"], "val/skipped": len(skipped)}
        record.update({f"val/{k}": v for k, v in result["perAnswerType"].items()})
        accelerator.log(record, step=state["step"])
        log.write(record)
        return result

    def checkpoint_now(accuracy: float | None) -> None:
        if accuracy is not None and (state["best_accuracy"] is None or accuracy > state["best_accuracy"]):
            state["best_accuracy"] = accuracy
            state["best_checkpoint"] = str(out / f"checkpoint-{state['step']:08d}")
        save_checkpoint(accelerator, out, state["step"], model, optimizer, scheduler, state)
        if main:
            rotate_checkpoints(out, t.keep_last, state["best_checkpoint"])

    bar = tqdm(total=total_steps, initial=state["step"], desc="train", unit="step", disable=not main, dynamic_ncols=True)
    window_start, window_samples, last_result = time.perf_counter(), 0, None
    model.train()
    while state["step"] < total_steps:
        epoch_set = EpochOrder(train_set, t.seed, state["epoch"])
        loader = accelerator.prepare_data_loader(_loader(epoch_set, collator, t.batch_size, config.data.num_workers))
        if state["batches_in_epoch"]:
            loader = accelerator.skip_first_batches(loader, state["batches_in_epoch"])
        for batch in loader:
            state["skipped"].extend(list(s) for s in batch.get("skipped", []))
            batch = _to_device(batch, accelerator.device)
            with accelerator.accumulate(model):
                if len(batch["question_ids"]):
                    loss = model(
                        batch["images"], batch["input_ids"], batch["attention_mask"], vqa_targets=batch["vqa_targets"]
                    ).loss
                else:  # every image of this batch was unreadable: a zero step keeps processes in step
                    loss = sum(p.sum() for p in model.parameters()) * 0.0
                accelerator.backward(loss)
                if accelerator.sync_gradients and t.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            state["batches_in_epoch"] += 1
            window_samples += len(batch["question_ids"]) * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue
            scheduler.step()
            state["step"] += 1
            state["samples"] += window_samples
            bar.update(1)
            if state["step"] % t.log_every == 0 or state["step"] == total_steps:
                elapsed = time.perf_counter() - window_start
                record = {
                    "step": state["step"], "epoch": state["epoch"], "loss": loss.item(),
                    "lr": scheduler.get_last_lr()[0], "samples_per_s": window_samples / max(elapsed, 1e-9),
                }
                bar.set_postfix(loss=f"{record['loss']:.4f}", samples_s=f"{record['samples_per_s']:.1f}")
                accelerator.log(record, step=state["step"])
                log.write(record)
                window_start, window_samples = time.perf_counter(), 0
            at_end = state["step"] >= total_steps
            if (t.eval_every and state["step"] % t.eval_every == 0) or at_end:
                last_result = validate()
            if (t.save_every and state["step"] % t.save_every == 0) or at_end:
                checkpoint_now(last_result["overall"] if last_result else None)
            if at_end:
                break
        else:  # the epoch ran out
            state["epoch"] += 1
            state["batches_in_epoch"] = 0
            if not t.eval_every:
                last_result = validate()
            if not t.save_every and state["step"] < total_steps:
                checkpoint_now(last_result["overall"] if last_result else None)
    bar.close()
    export = out / "final"
    if main:
        if state["skipped"]:
            accelerator.print(f"{len(state['skipped'])} items were skipped (unreadable images), listed in {out / 'skipped.json'}")
            (out / "skipped.json").write_text(json.dumps(state["skipped"], indent=1) + "\n")
        metrics = {"VQA accuracy (val)": last_result["overall"]} if last_result else {}
        unwrapped.save_pretrained(
            export, model_card_kwargs={"training_data": _describe_data(config), "metrics": metrics}
        )
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return {
        "step": state["step"], "export": str(export), "val": last_result, "best_checkpoint": state["best_checkpoint"],
        "skipped": len(state["skipped"]), "checkpoints": [str(p) for p in list_checkpoints(out)],
    }


def _describe_data(config: RunConfig) -> str:
    d = config.data
    source = "the generated Shapes world" if d.shapes else f"{d.format} data at {d.root}"
    return f"{source}, splits {', '.join(d.train_splits)}"


def _predict_split(
    model: AbsVLModel | str, config: RunConfig, split: str, batch_size: int, require_annotations: bool
) -> tuple[AbsVLModel, list[VQAExample], dict[int, str], list[tuple]]:
    accelerator = Accelerator(cpu=cpu_only())
    model = AbsVLModel.from_pretrained(model) if not isinstance(model, AbsVLModel) else model
    examples = _load_split(config, split, require_annotations=require_annotations)
    loader = accelerator.prepare_data_loader(_eval_loader(model, examples, config, batch_size))
    model.to(accelerator.device)
    predictions, skipped = predict_answers(model, loader, accelerator, model.answers, desc=split)
    return model, examples, predictions, skipped


def evaluate_model(
    model: AbsVLModel | str, config: RunConfig, split: str, batch_size: int = 64
) -> tuple[dict[str, Any], dict[int, str]]:
    """Official VQA accuracy of a saved model on an annotated split, and its predictions.
    Questions whose image is unreadable are counted, reported and score 0."""
    _, examples, predictions, skipped = _predict_split(model, config, split, batch_size, require_annotations=True)
    if skipped:
        print(f"{len(skipped)} questions skipped (unreadable images): they score 0")
    predictions.update((ex.question_id, "") for ex in examples if ex.question_id not in predictions)
    return score_predictions(predictions, examples), predictions


def predict_split(model: AbsVLModel | str, config: RunConfig, split: str, batch_size: int = 64) -> list[dict[str, Any]]:
    """Submission-format answers ``[{"question_id", "answer"}]`` for every question of ``split``;
    a question whose image is unreadable gets the first (most frequent) answer."""
    model, examples, predictions, skipped = _predict_split(model, config, split, batch_size, require_annotations=False)
    if skipped:
        print(f"{len(skipped)} questions had unreadable images: answered {model.answers[0]!r}")
    return [{"question_id": ex.question_id, "answer": predictions.get(ex.question_id, model.answers[0])} for ex in examples]


__all__ = ["evaluate_model", "format_accuracy_table", "predict_split", "prepare_data", "train_vqa"]
