"""VQAv2 finetuning: ``VQATask`` on the shared loop of ``absvl.training.loop``; its validation is
``absvl.evaluation.vqa``'s (the official VQA accuracy, and on a Shapes world the steering and probes).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from ..data.answers import build_answer_vocab, load_answers, save_answers
from ..data.image_files import check_image_root
from ..data.shapes_world import ShapesWorld
from ..data.vqa import SPLITS, VQAv2Layout, canonical_split, holdout_split, load_vqa_hf, load_vqa_split
from ..data.vqa_dataset import VQACollator, VQADataset
from ..data.vqa_examples import VQAExample
from ..evaluation.vqa import annotation_entry, predict_answers, score_predictions, shapes_diagnostics, vqa_loader
from ..images import image_transform
from ..models.vision.topdown import shut_gate_warning
from ..models.vl import AbsVLForQuestionAnswering, AbsVLModel
from .config import ConfigError, RunConfig, check_vision_start, from_scratch_note
from .loop import Validation, run_training


@dataclass
class VQAData:
    answers: list[str]
    train: list[VQAExample]
    val: list[VQAExample]


def load_split(config: RunConfig, split: str, require_annotations: bool = True) -> list[VQAExample]:
    """The examples of one split of the run's data (``config.data``: VQAv2 files or a Hugging Face dataset),
    its images checked to be where the config says."""
    d = config.data
    if d.format == "hf":
        examples = load_vqa_hf(d.root, split, columns=d.hf_columns, images_root=d.images)
    else:
        layout = VQAv2Layout(d.root, images_dir=d.images)
        examples = load_vqa_split(layout, split, require_annotations=require_annotations)
    where = (
        f"data.images={d.images} should hold {SPLITS[canonical_split(split)].image_folder}/"
        if d.images
        else "put the images in data.root's images/<folder>/ or point data.images at the folder holding "
        "train2014/ val2014/ test2015/"
    )
    check_image_root([ex.image_path for ex in examples if ex.image_data is None], where)
    return examples


def prepare_data(config: RunConfig, answers: list[str] | None = None) -> VQAData:
    """Training and validation examples and the answer vocabulary (built from the training
    splits with the official normalisation unless given)."""
    d = config.data
    if d.shapes:
        from ..data.shapes import ensure_shapes

        ensure_shapes(d.root, **d.shapes)
    by_split = {split: load_split(config, split, require_annotations=True) for split in d.train_splits}
    val: list[VQAExample] = []
    if d.holdout_images:
        if d.val_split not in by_split:
            raise ConfigError("data.holdout_images needs data.val_split to be one of data.train_splits")
        by_split[d.val_split], val = holdout_split(by_split[d.val_split], d.holdout_images, config.train.seed)
    elif d.val_split:
        val = load_split(config, d.val_split, require_annotations=True)
    train = [ex for examples in by_split.values() for ex in examples]
    if d.max_val_questions is not None:
        val = val[: d.max_val_questions]
    if answers is None:
        answers = build_answer_vocab([annotation_entry(ex) for ex in train], d.answers_min_count)
    if not answers:
        raise ConfigError(
            f"no answer occurs {d.answers_min_count}+ times in {d.train_splits}: lower data.answers_min_count"
        )
    return VQAData(answers=answers, train=train, val=val)


def build_vqa_model(config: RunConfig, answers: list[str]) -> AbsVLForQuestionAnswering:
    """A fresh VQA model from ``config.model``, or ``train.init_from``'s: a VQA model trained with these answers,
    or any other absvl model (e.g. the prior alignment's encoder), whose encoder gets a fresh VQA head."""
    if config.train.init_from:
        model = AbsVLForQuestionAnswering.from_pretrained(config.train.init_from, answers=answers)
        return model.with_loss_weights(config.model).train()
    model_config = config.model
    if config.data.image_size is not None:
        model_config = replace(model_config, image_size=config.data.image_size)
    return AbsVLForQuestionAnswering(model_config, answers=answers)


class VQATask:
    """VQAv2 finetuning as a ``run_training`` task: soft-target BCE on the VQA head, the official
    VQA accuracy on the validation split selects the best checkpoint, ``save_pretrained`` export."""

    diagnose = False  # set by the loop on the forward of a logged step
    health_warning = staticmethod(shut_gate_warning)

    def __init__(self, config: RunConfig) -> None:
        self.config = config
        self.measured: dict[str, torch.Tensor] = {}

    def setup(self, accelerator: Accelerator, output_dir: Path, checkpoint: Path | None) -> None:
        config = self.config
        answers_file = output_dir / "answers.json"
        answers = load_answers(answers_file) if checkpoint and answers_file.is_file() else None
        self.data = data = prepare_data(config, answers)
        if accelerator.is_main_process:
            save_answers(answers_file, data.answers)
        self.model = model = self.build_model(data.answers)
        answer_index = {a: i for i, a in enumerate(data.answers)}
        self.train_set = VQADataset(
            data.train,
            answer_index,
            image_transform(model.image_size, train=True, randaugment=config.data.randaugment),
            group_size=config.data.image_group_size,
            **object_regions(config, model),
        )
        self.collator = VQACollator(model.tokenizer, len(data.answers), model.config.max_text_len)
        self.val_loader = self.validation_loader(accelerator) if data.val else None

    def build_model(self, answers: list[str]) -> AbsVLModel:
        """The model this task trains."""
        return build_vqa_model(self.config, answers)

    def validation_loader(self, accelerator: Accelerator) -> Any:
        """This process's share of the validation questions."""
        t, d = self.config.train, self.config.data
        return vqa_loader(self.model, self.data.val, t.batch_size, d.num_workers, accelerator)

    def param_groups(self) -> list[dict[str, Any]]:
        t = self.config.train
        return self.model.parameter_groups(t.lr, t.weight_decay, t.lr_multipliers)

    def describe(self) -> str:
        group = self.train_set.group_size
        grouped = f"; up to {group} questions of an image per batch share its first pass" if group > 1 else ""
        return (
            f"training on {len(self.train_set)} questions ({self.train_set.num_dropped} without an in-vocabulary "
            f"answer dropped), {len(self.data.answers)} answers, {len(self.data.val)} validation questions{grouped}"
        )

    def batch_size(self, batch: dict[str, Any]) -> int:
        return len(batch["question_ids"])

    def loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        out = model(
            batch["images"],
            batch["input_ids"],
            batch["attention_mask"],
            labels=batch["vqa_targets"],
            prior_positive=batch["prior_positive"],
            patch_objects=batch.get("patch_objects"),
            target_objects=batch.get("target_objects"),
            pointer_objects=batch.get("pointer_objects"),
            image_index=batch["image_index"],
        )
        if self.diagnose:
            self.measured = self.model.training_diagnostics(out)
        return out.loss

    def diagnostics(self) -> dict[str, torch.Tensor]:
        return self.measured

    def validate(self, model: AbsVLModel, accelerator: Accelerator) -> Validation | None:
        if self.val_loader is None:
            return None
        predictions, skipped = predict_answers(model, self.val_loader, accelerator, self.data.answers, desc="validate")
        result = score_predictions(predictions, self.data.val)
        metrics = {"val/accuracy": result["overall"], "val/scored": len(predictions), "val/skipped": len(skipped)}
        metrics.update({f"val/{k}": v for k, v in result["perAnswerType"].items()})
        d = self.config.data
        if d.format == "vqav2" and not d.images and ShapesWorld.exists(d.root) and accelerator.is_main_process:
            # the Shapes world knows each question's objects: does the question steer the maps, what do the tokens know?
            metrics.update({f"val/{k}": v for k, v in shapes_diagnostics(model, d.root, d.val_split).items()})
        return Validation(score=result["overall"], metrics=metrics, result=result)

    def restore(self, output_dir: Path) -> None:
        self.model = self.build_model(load_answers(output_dir / "answers.json"))

    def export(self, model: AbsVLModel, out_dir: Path, last: Validation | None) -> None:
        metrics = {"VQA accuracy (val)": last.metrics["val/accuracy"]} if last else {}
        model.save_pretrained(
            out_dir, model_card_kwargs={"training_data": _describe_data(self.config), "metrics": metrics}
        )


def object_regions(config: RunConfig, model: AbsVLModel) -> dict[str, Any]:
    """``VQADataset``'s ``object_masks`` and ``grid`` when a loss reads the question's objects (the prior loss's
    object-level term, ``model.prior_object_weight > 0``; the pointers', ``model.pointer_loss_weight > 0``; the
    count density's, ``model.count_loss_weight > 0``; the top-down pass's, ``model.topdown_object_weight > 0``): the
    objects come from a Shapes world's masks; other data has none."""
    m = model.config
    names = ("prior_object_weight", "pointer_loss_weight", "count_loss_weight", "topdown_object_weight")
    weights = [name for name in names if getattr(m, name) > 0]
    if not weights:
        return {}
    named = _in_words([f"model.{name}={getattr(m, name)}" for name in weights])
    off = _in_words([f"model.{name}=0" for name in weights])
    d = config.data
    if d.format != "vqav2" or not ShapesWorld.exists(d.root):
        raise ConfigError(
            f"{named} needs data that knows its objects (a Shapes world's masks and each question's "
            f"target_objects); data.root={d.root} is not a Shapes world: set {off}"
        )
    patch_embed = getattr(model.backbone, "patch_embed", None)
    if patch_embed is None:
        raise ConfigError(f"{named} needs a ViT-family backbone (patch tokens), not {m.backbone}")
    if d.randaugment:
        raise ConfigError(
            f"data.randaugment moves the image (shear, translate, rotate) but not the object masks that {named} "
            f"reads: set data.randaugment=false or {off}"
        )
    world = ShapesWorld.load(d.root)
    grid = (model.image_size // patch_embed.patch_size[0], model.image_size // patch_embed.patch_size[1])
    return {"object_masks": world.mask_of, "grid": grid}


def _in_words(items: list[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    return " and ".join([", ".join(items[:-1]), items[-1]] if len(items) > 1 else items)


def train_vqa(config: RunConfig, notify: Callable[[str], Any] | None = None) -> dict[str, Any]:
    """Run a finetuning job; returns a summary (final step, best/last validation, export folder).
    ``notify`` receives the run's messages (see ``run_training``)."""
    check_vision_start(config)
    if note := from_scratch_note(config):
        warnings.warn(note, UserWarning, stacklevel=2)
    return run_training(config, VQATask(config), notify)


def _describe_data(config: RunConfig) -> str:
    d = config.data
    source = "the generated Shapes world" if d.shapes else f"{d.format} data at {d.root}"
    return f"{source}, splits {', '.join(d.train_splits)}"


__all__ = [
    "VQATask",
    "build_vqa_model",
    "load_split",
    "prepare_data",
    "train_vqa",
]
