"""What the question alone and the image alone answer: the two baselines a VQA model is read against.

- **question only** (``question_only_answers``): for each question, the answer most often given to the
  same question text in training (a question never seen gets the training set's most common answer).
  On data where questions repeat, as in the Shapes world, this is the best any text-only model can do
  on those questions: it is the text-only model's ceiling, not a weak straw man.
- **image only** (``image_only_answers``): a blind-question model. A linear classifier (``fit_ridge``)
  maps an image's bottom-up tokens, as the fusion reads them, pooled (mean and max over the spatial
  tokens), to the answer of each training question about the image; every question about a test image
  gets its one prediction.

Both return predictions in the official results format (``[{"question_id", "answer"}]``), scored like the
model with ``absvl.metrics.vqa.evaluate_vqa``.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..images import BadImageError, open_image
from .probes import fit_ridge


def _text(question: str) -> str:
    return " ".join(question.lower().split())


def question_only_answers(
    train_questions: Mapping[str, Any], train_annotations: Mapping[str, Any], questions: Mapping[str, Any]
) -> list[dict[str, Any]]:
    """The most common training answer (``multiple_choice_answer``) of each question's exact text, the
    overall most common one for texts not seen in training (VQAv2-format question and annotation files)."""
    text_of = {q["question_id"]: _text(q["question"]) for q in train_questions["questions"]}
    by_text: dict[str, Counter] = defaultdict(Counter)
    overall: Counter = Counter()
    for a in train_annotations["annotations"]:
        answer = a["multiple_choice_answer"]
        overall[answer] += 1
        if a["question_id"] in text_of:
            by_text[text_of[a["question_id"]]][answer] += 1
    if not overall:
        raise ValueError("the training annotations have no answers")
    fallback = overall.most_common(1)[0][0]
    return [
        {
            "question_id": q["question_id"],
            "answer": by_text[t].most_common(1)[0][0] if (t := _text(q["question"])) in by_text else fallback,
        }
        for q in questions["questions"]
    ]


@torch.no_grad()
def pooled_image_features(model: Any, paths: Sequence[Path], batch_size: int = 64) -> dict[Path, torch.Tensor]:
    """``[2C]`` per readable image: the mean and the max over the spatial bottom-up tokens the fusion
    reads (``model.fusion_image_tokens(first_pass, "bottom_up")``). Unreadable images are left out."""
    was_training = model.training
    model.eval()
    features: dict[Path, torch.Tensor] = {}
    try:
        for start in range(0, len(paths), batch_size):
            readable = []
            for path in paths[start : start + batch_size]:
                try:
                    readable.append((path, open_image(path)))
                except BadImageError:
                    continue
            if not readable:
                continue
            images = model.prepare_inputs(images=[image for _, image in readable])["images"]
            first = model.first_pass(images)
            tokens = model.fusion_image_tokens(first, "bottom_up")[:, first.num_prefix_tokens :].float()
            pooled = torch.cat([tokens.mean(1), tokens.amax(1)], dim=-1).cpu()
            features.update({path: row for (path, _), row in zip(readable, pooled)})
    finally:
        model.train(was_training)
    return features


def image_only_answers(
    model: Any,
    image_path: Callable[[str, int], Path],
    train: tuple[str, Mapping[str, Any], Mapping[str, Any]],
    evaluated: tuple[str, Mapping[str, Any]],
) -> list[dict[str, Any]]:
    """Blind-question predictions for ``evaluated`` = (split, questions file), from a linear classifier
    fitted on ``train`` = (split, questions file, annotations file); ``image_path(split, image_id)`` finds
    the images. Questions about an unreadable image get the most common training answer."""
    train_split, train_questions, train_annotations = train
    split, questions = evaluated
    image_of = {q["question_id"]: q["image_id"] for q in train_questions["questions"]}
    answers = sorted({a["multiple_choice_answer"] for a in train_annotations["annotations"]})
    index = {a: i for i, a in enumerate(answers)}
    train_ids = sorted({image_of[a["question_id"]] for a in train_annotations["annotations"]})
    train_features = pooled_image_features(model, [image_path(train_split, i) for i in train_ids])
    rows, labels = [], []
    for a in train_annotations["annotations"]:
        feature = train_features.get(image_path(train_split, image_of[a["question_id"]]))
        if feature is not None:
            rows.append(feature)
            labels.append(index[a["multiple_choice_answer"]])
    if not rows:
        raise ValueError(f"no readable {train_split} image to fit the image-only baseline on")
    predict = fit_ridge(torch.stack(rows), torch.tensor(labels))
    fallback = Counter(answers[i] for i in labels).most_common(1)[0][0]
    eval_ids = sorted({q["image_id"] for q in questions["questions"]})
    eval_features = pooled_image_features(model, [image_path(split, i) for i in eval_ids])
    readable = [i for i in eval_ids if image_path(split, i) in eval_features]
    predicted = {}
    if readable:
        labels_out = predict(torch.stack([eval_features[image_path(split, i)] for i in readable]))
        predicted = {i: answers[int(k)] for i, k in zip(readable, labels_out)}
    return [
        {"question_id": q["question_id"], "answer": predicted.get(q["image_id"], fallback)}
        for q in questions["questions"]
    ]


__all__ = ["image_only_answers", "pooled_image_features", "question_only_answers"]
