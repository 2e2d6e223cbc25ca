"""VQA evaluation: a model's answers to every question of a split (split over Accelerate processes), scored
with the official VQA accuracy, in the submission format, and what a Shapes world lets validation measure
beyond accuracy (steering, token probes). Training's validation, ``absvl eval vqa``, ``absvl predict vqa`` and
the demo use it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..data.loaders import eval_loader, to_device
from ..data.shapes_world import ShapesWorld
from ..data.vqa import SPLITS, canonical_split
from ..data.vqa_dataset import VQACollator, VQADataset
from ..data.vqa_examples import VQAExample
from ..images import image_transform
from ..metrics.vqa import evaluate_vqa
from ..models.vl import AbsVLForQuestionAnswering, AbsVLModel
from ..runtime import cpu_only


def annotation_entry(example: VQAExample) -> dict[str, Any]:
    """The official annotation record of an annotated example (for the metric and the vocabulary);
    types a dataset does not give (many Hugging Face ones) are ``unknown``."""
    return {
        "question_id": example.question_id,
        "image_id": example.image_id,
        "question_type": example.question_type or "unknown",
        "answer_type": example.answer_type or "unknown",
        "multiple_choice_answer": example.multiple_choice_answer,
        "answers": [
            {"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(example.answers)
        ],
    }


def question_entry(example: VQAExample) -> dict[str, Any]:
    return {"question_id": example.question_id, "image_id": example.image_id, "question": example.question}


@torch.no_grad()
def predict_answers(
    model: AbsVLModel, loader: DataLoader, accelerator: Accelerator, answers: list[str], desc: str = "predict"
) -> tuple[dict[int, str], list[tuple]]:
    """question_id → best answer for every item of ``loader`` (this process's share, see
    ``eval_loader``), and the skipped items; both gathered from every process at the end."""
    was_training = model.training
    model.eval()
    predictions: dict[int, str] = {}
    skipped: list[tuple] = []
    for batch in tqdm(loader, desc=desc, disable=not accelerator.is_local_main_process, leave=False):
        skipped.extend(batch.get("skipped", []))
        if len(batch["question_ids"]) == 0:
            continue
        batch = to_device(batch, accelerator.device)
        with accelerator.autocast():
            images, ids, mask = batch["images"], batch["input_ids"], batch["attention_mask"]
            logits = model(images, ids, mask, image_index=batch["image_index"]).vqa_logits
        predictions.update(
            (int(q), answers[int(a)]) for q, a in zip(batch["question_ids"].tolist(), logits.argmax(-1).tolist())
        )
    model.train(was_training)
    if accelerator.num_processes > 1:
        shares = gather_object([(predictions, skipped)])
        predictions = {q: a for share, _ in shares for q, a in share.items()}
        skipped = [item for _, items in shares for item in items]
    return predictions, skipped


def score_predictions(predictions: dict[int, str], examples: list[VQAExample]) -> dict[str, Any]:
    """The official VQA accuracy of ``predictions`` on annotated ``examples``; a question without a
    prediction (its image was unreadable) is answered "" and scores 0, in validation as in
    ``absvl eval vqa``: leaving it out would raise the score."""
    predictions = {**{ex.question_id: "" for ex in examples}, **predictions}
    questions = [question_entry(ex) for ex in examples]
    annotations = [annotation_entry(ex) for ex in examples]
    return evaluate_vqa(predictions, questions, annotations)


def vqa_loader(
    model: AbsVLModel, examples: list[VQAExample], batch_size: int, num_workers: int, accelerator: Accelerator
) -> DataLoader:
    """This process's share of ``examples`` as the model sees them in evaluation (no augmentation; questions
    without an in-vocabulary answer kept, unreadable images skipped and counted)."""
    index = {a: i for i, a in enumerate(model.answers)}
    dataset = VQADataset(examples, index, image_transform(model.image_size, train=False), drop_unanswerable=False)
    collator = VQACollator(model.tokenizer, len(model.answers), model.config.max_text_len)
    return eval_loader(dataset, collator, batch_size, num_workers, accelerator)


def _predict(
    model: AbsVLForQuestionAnswering | str | Path, examples: list[VQAExample], batch_size: int, num_workers: int
) -> tuple[AbsVLForQuestionAnswering, dict[int, str], list[tuple]]:
    accelerator = Accelerator(cpu=cpu_only())
    model = model if isinstance(model, AbsVLModel) else AbsVLForQuestionAnswering.from_pretrained(model)
    loader = vqa_loader(model, examples, batch_size, num_workers, accelerator)
    model.to(accelerator.device)
    predictions, skipped = predict_answers(model, loader, accelerator, model.answers, desc="predict")
    return model, predictions, skipped


def evaluate_vqa_model(
    model: AbsVLForQuestionAnswering | str | Path,
    examples: list[VQAExample],
    batch_size: int = 64,
    num_workers: int = 0,
) -> tuple[dict[str, Any], dict[int, str]]:
    """The official VQA accuracy of a model (or its folder) on annotated ``examples``, and its predictions.
    Questions whose image is unreadable are answered "" and score 0; the result's ``skipped`` counts them."""
    _, predictions, skipped = _predict(model, examples, batch_size, num_workers)
    predictions.update((ex.question_id, "") for ex in examples if ex.question_id not in predictions)  # returned too
    return {**score_predictions(predictions, examples), "skipped": len(skipped)}, predictions


def predict_vqa_submission(
    model: AbsVLForQuestionAnswering | str | Path,
    examples: list[VQAExample],
    batch_size: int = 64,
    num_workers: int = 0,
) -> tuple[list[dict[str, Any]], int, str]:
    """Submission-format answers ``[{"question_id", "answer"}]`` for every question of ``examples``, the
    number of questions whose image was unreadable, and the answer they got (the first, most frequent one)."""
    model, predictions, skipped = _predict(model, examples, batch_size, num_workers)
    fallback = model.answers[0]
    answers = [{"question_id": ex.question_id, "answer": predictions.get(ex.question_id, fallback)} for ex in examples]
    return answers, len(skipped), fallback


def shapes_diagnostics(model: AbsVLModel, root: str | Path, split: str, images: int = 60) -> dict[str, float]:
    """What a Shapes world lets validation measure beyond accuracy, on the first ``images`` images of
    ``split``: the steering scores over all families (``steer/pointing_<map>`` in %, ``steer/paired_<map>``
    medians; ``absvl.metrics.steering``) and linear probes of the tokens the fusion reads
    (``probe/<pass>_<property>`` in %, fitted on one half of the images, scored on the other;
    ``absvl.metrics.probes``)."""
    from ..metrics.probes import split_probes
    from ..metrics.steering import steering_pairs, steering_scores

    world = ShapesWorld.load(root)
    tag = SPLITS[canonical_split(split)].tag
    steering = steering_scores(model, world, tag, steering_pairs(world, tag, limit=images))["all"]
    metrics = {f"steer/pointing_{name}": value for name, value in steering["pointing"].items()}
    metrics.update({f"steer/paired_{name}": value["median"] for name, value in steering["paired"].items()})
    probes = split_probes(model, world, tag, limit=images)
    for kind in ("bottom_up", "top_down"):
        metrics.update({f"probe/{kind}_{name}": value for name, value in probes[kind].items()})
    return metrics
