"""The generated ``README.md`` model card of a saved AbSViT-VL model, rendered from its config and class."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id

from ..vision import backbone_family
from .configuration import AbsVLConfig

_CITATIONS = """```bibtex
@inproceedings{shi2023absvit,
  title={Top-Down Visual Attention from Analysis by Synthesis},
  author={Shi, Baifeng and Darrell, Trevor and Wang, Xin},
  booktitle={CVPR}, year={2023}
}
@inproceedings{dou2022meter,
  title={An Empirical Study of Training End-to-End Vision-and-Language Transformers},
  author={Dou, Zi-Yi and others},
  booktitle={CVPR}, year={2022}
}
```"""


# the card's inputs a saved folder keeps (model_card.json), so that a loaded model renders the same card
CARD_DATA_NAME = "model_card.json"
CARD_DATA_KEYS = ("training_data", "metrics", "datasets", "task")
# each class's Hub pipeline tag
PIPELINE_TAGS = {
    "AbsVLModel": "feature-extraction",
    "AbsVLForQuestionAnswering": "visual-question-answering",
    "AbsVLForRetrieval": "image-feature-extraction",
}


def hub_model_id(source: str | None) -> str | None:
    """``source`` as a Hub model id (``timm:<name>`` → ``timm/<name>``), None for local paths."""
    if not source:
        return None
    if source.startswith("timm:"):
        return f"timm/{source[len('timm:') :]}"
    if Path(source).exists():
        return None
    try:
        validate_repo_id(source)
    except HFValidationError:
        return None
    return source


def render_model_card(
    config: AbsVLConfig,
    repo_id: str | None = None,
    training_data: str | Sequence[str] | None = None,
    metrics: dict[str, float] | None = None,
    datasets: Sequence[str] | None = None,
    task: str | None = None,
    *,
    vision_width: int,
    image_size: int,
    num_parameters: int,
    architecture: str = "AbsVLForQuestionAnswering",
    heads: str = "",
) -> ModelCard:
    """Card with architecture, training data, metrics (when known) and a usage snippet; its YAML
    metadata holds ``base_model`` (the text encoder and the backbone weights that are Hub ids),
    ``datasets`` and the metrics as ``model-index`` results.

    Args:
        config: the model's config; ``vision_width``, ``image_size``, ``num_parameters`` and ``heads`` are what
            the built model adds to it (the backbone's width, its input size, its parameter count, its heads).
        architecture: the model's class: its pipeline tag and usage snippet.
        repo_id: where the model is published; the usage snippet loads from it.
        training_data: a description or a list of data sets the model was trained on.
        metrics: ``{name: value}``, e.g. ``{"VQA accuracy (val)": 68.72}``.
        datasets: Hub ids of the training data sets.
        task: Hub task id of the metrics (``model-index``); default the class's pipeline tag.
    """
    pipeline_tag = PIPELINE_TAGS[architecture]
    task = task or pipeline_tag
    cfg, text_cfg = config, config.text_config or {}
    family = backbone_family(cfg.backbone)
    if training_data is None:
        trained_on = "Not recorded."
    elif isinstance(training_data, str):
        trained_on = training_data
    else:
        trained_on = "\n".join(f"- {d}" for d in training_data)
    described = training_data if isinstance(training_data, str) else ", ".join(training_data or datasets or [])
    eval_results = [
        EvalResult(
            task_type=task,
            dataset_type=datasets[0] if datasets else "custom",
            dataset_name=described or "not recorded",
            metric_type=re.sub(r"[^a-z0-9@]+", "_", name.lower()).strip("_"),
            metric_name=name,
            metric_value=value,
        )
        for name, value in (metrics or {}).items()
    ]
    base_models = [m for m in map(hub_model_id, (cfg.text_encoder, cfg.backbone_weights)) if m]
    data = ModelCardData(
        library_name="absvl",
        license="apache-2.0",
        pipeline_tag=pipeline_tag,
        tags=sorted({"absvl", "vision-language", "top-down-attention", pipeline_tag, family}),
        base_model=base_models or None,
        datasets=list(datasets) if datasets else None,
        model_name=repo_id.split("/")[-1] if repo_id else f"absvl-{cfg.backbone}",
        eval_results=eval_results or None,
    )
    overrides = ", ".join(f"`{k}={v!r}`" for k, v in cfg.backbone_kwargs.items()) or "none"
    prior = f"Linear of the text {'[cls] state' if cfg.prior_pooling == 'cls' else 'masked token mean'} → ξ"
    if cfg.prior_channel_projection:
        prior += ", with the authors' rank-1 channel projection 5·h·(ξξᵀ)"
    rows = [
        (
            "Vision backbone",
            f"`{cfg.backbone}` ({family}, width {vision_width}, overrides: {overrides})"
            + (f", initialised from `{cfg.backbone_weights}`" if cfg.backbone_weights else ""),
        ),
        ("Image size", f"{image_size} px"),
        (
            "Text encoder",
            f"{text_cfg.get('model_type', '?')} (hidden {text_cfg.get('hidden_size', '?')}, "
            f"{text_cfg.get('num_hidden_layers', '?')} layers), initialised from `{cfg.text_encoder}`",
        ),
        ("Prior", f"{prior}; α = {cfg.alpha}"),
        (
            "Fusion",
            f"METER co-attention, {cfg.fusion_layers} layers, H = {cfg.fusion_hidden_size}, {cfg.fusion_heads} heads",
        ),
        ("Class", f"`{architecture}`"),
        ("Heads", heads),
        ("Parameters", f"{num_parameters / 1e6:.1f} M"),
    ]
    table = "| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
    if metrics:
        results = "| Metric | Value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in metrics.items())
    else:
        results = "No metrics recorded."
    source = repo_id or "path/to/this/folder"
    body = f"""
# AbSViT-VL: `{cfg.backbone}` + {text_cfg.get("model_type", "text encoder")}

A vision-language model whose image encoder attends top-down (AbSViT): the question's prior ξ
steers which objects the vision transformer attends to; a METER-style co-attention encoder fuses
both streams for visual question answering and image-text matching. Built with the `absvl` package.

## Architecture

{table}

Training loss: task + {cfg.var_loss_weight}·L_var + {cfg.prior_loss_weight}·L_prior.

## Training data

{trained_on}

## Metrics

{results}

## Usage

```python
{_usage(architecture, source)}
```

## Citation

{_CITATIONS}
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


def _usage(architecture: str, source: str) -> str:
    """The card's usage snippet for the class."""
    attention = f"""maps = absvl.pipeline("attention", model="{source}")("image.jpg", "the car")
maps["bottom_up"], maps["top_down"]  # numpy arrays on the patch grid"""
    if architecture == "AbsVLForQuestionAnswering":
        return f"""import absvl

vqa = absvl.pipeline("vqa", model="{source}")
vqa("image.jpg", "What color is the car?", top_k=5)  # [{{"answer": ..., "score": ...}}, ...]

{attention}"""
    if architecture == "AbsVLForRetrieval":
        return f"""# absvl index build --model {source} --images photos/ --out index/
# absvl search --index index/ "a red car left of a tree" --rerank 50
import absvl

model = absvl.AbsVLForRetrieval.from_pretrained("{source}")
{attention}"""
    return f"""import absvl

model = absvl.AbsVLModel.from_pretrained("{source}")  # the shared encoder: finetune it with a task head
{attention}"""
