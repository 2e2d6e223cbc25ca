"""Prior alignment (``absvl train prior``): ξ learns to point at what a question names, before VQA finetuning.

The prior loss (AbSViT Eq. 15 and, on data that knows its objects, its object-level term; SPEC §2) trains the
text encoder and ξ's projection alone, on the VQA data, the vision encoder frozen: a step runs the text encoder
and the backbone's first pass (without gradients) and nothing else, a small share of a VQA step. VQA finetuning
then starts from the export (``train.init_from``) with a prior gate that already opens on the asked-about
objects. Within a CPU budget this ordering is what makes the top-down pass useful to the answer: trained
together from the start, the VQA loss's gradients on the shared text encoder are 5-20x the prior terms' and the
gate is still pointing at random when the fusion learns what the second pass means (docs/results/answering.md).

Validation: the prior loss on the validation questions and, with the objects known, the gate's pointing (the
share of questions whose gate peaks on one of their objects) and its mean on and off them; the pointing selects
the best checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from ..data.loaders import eval_loader, to_device
from ..data.vqa_dataset import VQACollator, VQADataset
from ..images import image_transform
from ..io import write_json
from ..metrics.steering import gate_hits
from ..models.vision.topdown import prior_mask
from ..models.vl import AbsVLModel
from .config import ConfigError, RunConfig
from .loop import Validation, run_training
from .vqa import VQATask, object_regions

TASK_FILE = "task.json"  # marks a run folder as a prior alignment (it holds answers.json as a VQA run does)
TRAINED = ("text_encoder.", "prior.", "contrastive.")  # what the prior loss trains; the rest is frozen


class PriorTask(VQATask):
    """The prior loss alone on the VQA data (see the module docstring): the text encoder, ξ's projection and the
    contrastive temperature train, everything else is frozen."""

    def setup(self, accelerator: Accelerator, output_dir: Path, checkpoint: Path | None) -> None:
        super().setup(accelerator, output_dir, checkpoint)
        if accelerator.is_main_process:
            write_json(output_dir / TASK_FILE, {"task": "prior"})
        for name, param in self.model.named_parameters():
            param.requires_grad_(name.startswith(TRAINED))

    def build_model(self, answers: list[str]) -> AbsVLModel:
        """The shared encoder (no task head): ``train.init_from``'s, or fresh from ``config.model``."""
        config = self.config
        if config.train.init_from:
            return AbsVLModel.from_pretrained(config.train.init_from).with_loss_weights(config.model).train()
        model_config = config.model
        if config.data.image_size is not None:
            model_config = replace(model_config, image_size=config.data.image_size)
        return AbsVLModel(model_config)

    def validation_loader(self, accelerator: Accelerator) -> Any:
        """The validation questions with their objects (the gate's pointing is scored on them)."""
        model, config, answers = self.model, self.config, self.data.answers
        dataset = VQADataset(
            self.data.val,
            {a: i for i, a in enumerate(answers)},
            image_transform(model.image_size, train=False),
            drop_unanswerable=False,
            **object_regions(config, model),
        )
        collator = VQACollator(model.tokenizer, len(answers), model.config.max_text_len)
        return eval_loader(dataset, collator, config.train.batch_size, config.data.num_workers, accelerator)

    def describe(self) -> str:
        return super().describe() + "; prior alignment: the text encoder and ξ train, the rest is frozen"

    def loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        out = prior_forward(model, batch)
        if self.diagnose:
            self.measured = {f"loss/{k}": v.detach() for k, v in out.losses.items()}
        return out.loss

    def validate(self, model: AbsVLModel, accelerator: Accelerator) -> Validation | None:
        if self.val_loader is None:
            return None
        totals = evaluate_prior(model, self.val_loader, accelerator)
        metrics = {f"val/{k}": v for k, v in totals.items()}
        score = totals.get("gate_pointing", -totals.get("prior_loss", 0.0))
        return Validation(score=score, metrics=metrics, result=totals)

    def export(self, model: AbsVLModel, out_dir: Path, last: Validation | None) -> None:
        metrics = {}
        if last and "val/gate_pointing" in last.metrics:
            metrics["prior gate pointing (val)"] = last.metrics["val/gate_pointing"]
        model.save_pretrained(
            out_dir,
            model_card_kwargs={"training_data": f"prior alignment on {self.config.data.root}", "metrics": metrics},
        )


def prior_forward(model: torch.nn.Module, batch: dict[str, Any]) -> Any:
    """``model``'s prior-only forward on a VQA batch (the model may be wrapped, e.g. by DDP)."""
    return model(
        batch["images"],
        batch["input_ids"],
        batch["attention_mask"],
        prior_positive=batch["prior_positive"],
        patch_objects=batch.get("patch_objects"),
        target_objects=batch.get("target_objects"),
        prior_only=True,
        image_index=batch["image_index"],
    )


@torch.no_grad()
def evaluate_prior(model: AbsVLModel, loader: Any, accelerator: Accelerator) -> dict[str, float]:
    """Mean prior loss (weighted terms) over ``loader`` and, when its batches carry the objects, the gate's
    pointing (%) and its mean on and off the questions' objects (see ``gate_hits``); gathered over processes."""
    was_training = model.training
    model.eval()
    sums: dict[str, float] = {}
    batches = 0
    for batch in tqdm(loader, desc="validate", disable=not accelerator.is_local_main_process, leave=False):
        if len(batch["question_ids"]) == 0:
            continue
        batch = to_device(batch, accelerator.device)
        out = prior_forward(model, batch)  # its first pass and ξ also give the gate
        sums["prior_loss"] = sums.get("prior_loss", 0.0) + float(out.loss)
        batches += 1
        if "patch_objects" in batch:
            first = out.vision
            tokens = model.backbone.gate_tokens(first.bottom_up_tokens)[:, first.num_prefix_tokens :]
            gate = prior_mask(tokens, out.xi)[..., 0]
            for key, value in gate_hits(gate, batch["patch_objects"], batch["target_objects"]).items():
                sums[key] = sums.get(key, 0.0) + value
    model.train(was_training)
    shares = gather_object([(sums, batches)]) if accelerator.num_processes > 1 else [(sums, batches)]
    total: dict[str, float] = {}
    for part, _ in shares:
        for key, value in part.items():
            total[key] = total.get(key, 0.0) + value
    result = {"prior_loss": total.get("prior_loss", 0.0) / max(sum(n for _, n in shares), 1)}
    if total.get("questions"):
        result["gate_pointing"] = 100.0 * total["pointing"] / total["questions"]
        result["gate_on_targets"] = total["on_targets"] / total["questions"]
        result["gate_off_targets"] = total["off_targets"] / total["questions"]
    return result


def train_prior(config: RunConfig, notify: Callable[[str], Any] | None = None) -> dict[str, Any]:
    """Run a prior alignment; returns the loop's summary (``val``: prior loss, gate pointing)."""
    m = config.model
    if m.prior_loss_weight <= 0 and m.prior_object_weight <= 0:
        raise ConfigError(
            "a prior alignment trains the prior loss alone: set model.prior_object_weight > 0 (data that knows its "
            "objects, e.g. a Shapes world) or model.prior_loss_weight > 0"
        )
    if m.prior_visual == "top_down" and m.prior_loss_weight > 0:
        raise ConfigError(
            "a prior alignment runs the backbone's first pass alone: model.prior_visual=top_down needs the second; "
            "set model.prior_visual=bottom_up (or both)"
        )
    return run_training(config, PriorTask(config), notify)


__all__ = ["PriorTask", "evaluate_prior", "train_prior"]
