"""The generated ``README.md`` model card of a saved :class:`AbsVLModel`."""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from huggingface_hub import ModelCard, ModelCardData

from ..vision import backbone_family

if TYPE_CHECKING:
    from .modeling import AbsVLModel

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


def render_model_card(
    model: AbsVLModel,
    repo_id: str | None = None,
    training_data: str | Sequence[str] | None = None,
    metrics: dict[str, float] | None = None,
) -> ModelCard:
    """Card with architecture, training data, metrics (when known) and a usage snippet.

    Args:
        repo_id: where the model is published; the usage snippet loads from it.
        training_data: a description or a list of data sets the model was trained on.
        metrics: ``{name: value}``, e.g. ``{"VQAv2 test-dev accuracy": 68.72}``.
    """
    cfg, text_cfg = model.config, model.config.text_config or {}
    family = backbone_family(cfg.backbone)
    data = ModelCardData(
        library_name="absvl",
        license="apache-2.0",
        pipeline_tag="visual-question-answering",
        tags=sorted({"absvl", "vision-language", "top-down-attention", "visual-question-answering", family}),
    )
    overrides = ", ".join(f"`{k}={v!r}`" for k, v in cfg.backbone_kwargs.items()) or "none"
    prior = f"Linear of the text {'[cls] state' if cfg.prior_pooling == 'cls' else 'masked token mean'} → ξ"
    if cfg.prior_channel_projection:
        prior += ", with the authors' rank-1 channel projection 5·h·(ξξᵀ)"
    width = model.backbone.num_features
    rows = [
        ("Vision backbone", f"`{cfg.backbone}` ({family}, width {width}, overrides: {overrides})"),
        ("Image size", f"{model.image_size} px"),
        ("Text encoder", f"{text_cfg.get('model_type', '?')} (hidden {text_cfg.get('hidden_size', '?')}, "
         f"{text_cfg.get('num_hidden_layers', '?')} layers), initialised from `{cfg.text_encoder}`"),
        ("Prior", f"{prior}; α = {cfg.alpha}"),
        ("Fusion", f"METER co-attention, {cfg.fusion_layers} layers, H = {cfg.fusion_hidden_size}, "
         f"{cfg.fusion_heads} heads"),
        ("Heads", f"VQA ({cfg.num_answers} answers), ITM, prior loss on {cfg.prior_visual} tokens in the gate's space"),
        ("Parameters", f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f} M"),
    ]
    table = "| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
    if training_data is None:
        trained_on = "Not recorded."
    elif isinstance(training_data, str):
        trained_on = training_data
    else:
        trained_on = "\n".join(f"- {d}" for d in training_data)
    if metrics:
        results = "| Metric | Value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in metrics.items())
    else:
        results = "No metrics recorded."
    source = repo_id or "path/to/this/folder"
    body = f"""
# AbSViT-VL: `{cfg.backbone}` + {text_cfg.get('model_type', 'text encoder')}

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
import absvl

vqa = absvl.pipeline("vqa", model="{source}")
vqa("image.jpg", "What color is the car?", top_k=5)  # [{{"answer": ..., "score": ...}}, ...]

maps = absvl.pipeline("attention", model="{source}")("image.jpg", "the car")
maps["bottom_up"], maps["top_down"]  # numpy arrays on the patch grid
```

## Citation

{_CITATIONS}
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")
