"""Run configuration: a YAML file of sections (``model``, ``data``, ``train``) plus ``key=value`` overrides.

A run config is a dataclass whose fields are its sections (``RunConfig`` for VQA, ``RetrievalConfig``,
``ClassifyConfig``); ``load_config(path, overrides, run_class)`` reads any of them. Override values are
parsed as YAML; an unknown key is an error naming the key, the file and the closest known key.
"""

from __future__ import annotations

import difflib
import math
import re
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from ..models.vision import backbone_defaults
from ..models.vl.configuration import AbsVLConfig

MIXED_PRECISIONS = ("no", "bf16", "fp16")


class ConfigError(ValueError):
    """A bad configuration file, key or value; the message names it."""


@dataclass
class DataConfig:
    """Where the VQA data is and how it is read.

    Attributes:
        root: dataset folder (official VQAv2 layout, see ``data/README.md``) or, with
            ``format: hf``, a Hugging Face dataset: a Hub id (``org/name``, read through
            ``datasets.load_dataset`` and cached; ``HF_HUB_OFFLINE=1`` reads the cache only), a
            dataset repository folder (data files + README.md), a ``save_to_disk`` folder or
            parquet/arrow files.
        images: image folder holding ``train2014/``, ``val2014/``, ``test2015/`` (e.g. COCO images
            kept elsewhere); ``null``: ``root/images/<folder>`` or ``root/<folder>``. With
            ``format: hf``, relative image paths in the dataset are looked up here first.
        format: ``vqav2`` (official JSON + COCO images) or ``hf``.
        hf_columns: with ``format: hf``, field → the dataset's column for datasets that name
            them otherwise, e.g. ``{question_id: qid, image: img}``; fields: ``question_id``,
            ``image_id``, ``question``, ``answers``, ``image``, ``answer_type``,
            ``question_type``, ``multiple_choice_answer``.
        shapes: when set (e.g. ``{images: 2000, seed: 0}``), generate the Shapes world into
            ``root`` first (cached): the offline default.
        train_splits: splits trained on (``train``, ``val``: the paper trains on train+val).
        val_split: split validated on (needs annotations); ``null`` for none.
        holdout_images: images of ``val`` kept aside for model selection when ``val`` is also
            trained on (ViLT keeps 1,000); the held-out part then serves as validation.
        answers_min_count: answer vocabulary = normalised answers seen at least this often (9 → 3,129).
        max_val_questions: validate on at most this many questions (``null``: all).
        image_size: input size; ``null`` takes the backbone's.
        randaugment: RandAugment on training images (no flips: questions say left/right).
        image_group_size: up to this many questions of one image sit together in a training batch and share the
            image's first (bottom-up) pass, which does not read the question: the backbone's first pass then
            costs 1/k per question (VQAv2 has ~5.4 questions per image). 1: questions shuffled one by one.
        num_workers: data-loading processes per training process.
    """

    root: str = "data/vqav2"
    images: str | None = None
    format: str = "vqav2"
    hf_columns: dict[str, str] = field(default_factory=dict)
    shapes: dict[str, Any] | None = None
    train_splits: list[str] = field(default_factory=lambda: ["train"])
    val_split: str | None = "val"
    holdout_images: int = 0
    answers_min_count: int = 9
    max_val_questions: int | None = None
    image_size: int | None = None
    randaugment: bool = False
    image_group_size: int = 1
    num_workers: int = 2


@dataclass
class TrainConfig:
    """Optimisation, schedule, checkpoints and logging.

    Attributes:
        output_dir: run folder (checkpoints, logs, the final ``save_pretrained`` export).
        seed: seeds model init, data order, dropout and augmentation.
        epochs, max_steps: length; ``max_steps`` (optimizer steps) wins when set.
        batch_size: per process and micro-step; global batch = batch_size × processes × grad_accum.
        grad_accum: gradient accumulation micro-steps per optimizer step.
        lr: encoders' learning rate; fusion ×5, heads ×50, AbSViT decoders ×3 (``lr_multipliers``).
        weight_decay, betas, eps: AdamW (SPEC §5: 0.01, (0.9, 0.98), 1e-8).
        warmup_ratio: linear warmup share of all steps, then linear decay to 0.
        max_grad_norm: gradient clipping (``0`` disables).
        mixed_precision: ``no``, ``bf16`` or ``fp16``.
        log_every, eval_every, save_every: in optimizer steps (``0``: eval/save only at each epoch end).
        keep_last: checkpoints kept besides the best one.
        resume: ``null``, ``latest`` or a checkpoint folder.
        force_resume: resume even though the batch size, gradient accumulation, number of
            processes, step budget or data differ from the checkpoint's (refused without it).
        trackers: Accelerate trackers (``tensorboard``, ``wandb``, ...); ``[]`` for none.
        init_from: a ``save_pretrained`` folder to start from instead of fresh heads. VL runs take the
            model's architecture from it and the loss weights (``LOSS_WEIGHTS``) from this config's ``model``.
        vision_from_scratch: VL runs (``vqa``, ``retrieval``) only: let a paper-size vision backbone
            start from random weights. Without it such a config is refused: the paper finetunes an
            ImageNet-pretrained AbSViT, and a top-down gate on an untrained encoder stays shut.
    """

    output_dir: str = "runs/vqa"
    seed: int = 0
    epochs: int = 10
    max_steps: int | None = None
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 1e-5
    lr_multipliers: dict[str, float] = field(default_factory=dict)
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-8
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"
    log_every: int = 10
    eval_every: int = 0
    save_every: int = 0
    keep_last: int = 2
    resume: str | None = None
    force_resume: bool = False
    trackers: list[str] = field(default_factory=lambda: ["tensorboard"])
    init_from: str | None = None
    vision_from_scratch: bool = False


class _RunConfigBase:
    """What every run config (a dataclass whose fields are its sections) shares."""

    def to_dict(self) -> dict[str, Any]:
        return {f.name: asdict(getattr(self, f.name)) for f in fields(self)}  # type: ignore[arg-type]

    def checks(self) -> list[tuple[bool, str, str]]:
        """(ok, key, what was expected) for every value check of this config."""
        t = self.train  # type: ignore[attr-defined]
        return [
            (t.mixed_precision in MIXED_PRECISIONS, "train.mixed_precision", f"one of {', '.join(MIXED_PRECISIONS)}"),
            (t.batch_size > 0, "train.batch_size", "> 0"),
            (t.grad_accum > 0, "train.grad_accum", "> 0"),
            (t.epochs > 0 or (t.max_steps or 0) > 0, "train.epochs", "> 0 (or set train.max_steps)"),
            (t.lr > 0, "train.lr", "> 0"),
            (t.log_every > 0, "train.log_every", "> 0"),
            (t.eval_every >= 0, "train.eval_every", ">= 0 (0: at the end of each epoch)"),
            (t.save_every >= 0, "train.save_every", ">= 0 (0: at the end of each epoch)"),
            (t.keep_last >= 0, "train.keep_last", ">= 0"),
            (0 <= t.warmup_ratio < 1, "train.warmup_ratio", "in [0, 1)"),
            (len(t.betas) == 2, "train.betas", "two numbers"),
        ]

    def validate(self) -> None:
        for ok, key, expected in self.checks():
            if not ok:
                value = _get(self.to_dict(), key.split("."))
                raise ConfigError(f"config value {key}={value!r} is invalid: expected {expected}")


@dataclass
class RunConfig(_RunConfigBase):
    """The VQA run config (``absvl train vqa``)."""

    model: AbsVLConfig = field(default_factory=AbsVLConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def checks(self) -> list[tuple[bool, str, str]]:
        d = self.data
        return super().checks() + [
            (d.format in ("vqav2", "hf"), "data.format", "vqav2 or hf"),
            (d.format == "hf" or not d.hf_columns, "data.hf_columns", "empty unless data.format=hf"),
            (bool(d.train_splits), "data.train_splits", "a non-empty list"),
            (d.answers_min_count >= 1, "data.answers_min_count", ">= 1"),
            (d.image_group_size >= 1, "data.image_group_size", ">= 1 (1: no grouping)"),
        ]


@dataclass
class ClassifyModelConfig:
    """The classifier: a registered backbone with a ``num_classes`` head.

    Attributes:
        backbone: registered backbone name (``absvl backbones``).
        backbone_kwargs: constructor overrides passed to ``create_backbone`` (``img_size``,
            ``drop_path_rate``, ``pretrained``/``pretrained_path`` where supported, ...);
            ``num_classes`` comes from the data.
        var_loss_weight: weight of the AbSViT variational loss L_var (0.1 in the paper); ignored by
            backbones without one.
    """

    backbone: str = "absvit_small_patch16_224"
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    var_loss_weight: float = 0.1


@dataclass
class ImageFolderConfig:
    """An ImageFolder (``root/train/<class>/*.jpg``, ``root/val/<class>/*.jpg``) and its augmentation.

    Attributes:
        root: dataset folder.
        format: ``imagefolder`` (one class per image) or ``patches``: a patch-labelled dataset
            (``root/classes.json``, ``root/<split>/images``, ``root/<split>/labels`` class-index maps,
            see ``absvl.data.patch_labels``) whose every patch token is classified (ViT backbones).
        train_split, val_split: sub-folders trained / validated on (``val_split: null``: none).
        image_size: input size; ``null`` takes the backbone's.
        num_workers: data-loading processes per training process.
        mixup, cutmix: timm ``Mixup`` alphas (``0`` disables; DeiT: 0.8 and 1.0).
        label_smoothing: applied to the (mixed) targets.
        randaugment: timm ``auto_augment`` policy string (DeiT: ``rand-m9-mstd0.5-inc1``); ``null``: none.
        crop_scale: scale range of the training random-resized crop.
        hflip: horizontal flip probability in training.
        color_jitter: timm's colour jitter in training (off when ``randaugment`` is set, as in timm).
        crop_pct: evaluation centre-crop ratio (``null``: timm's default 0.875).
        background_weight: ``patches`` only: the loss weight of background patches (the class named
            ``background``) relative to object patches. Background fills most patches of a scene; at
            weight 1 the loss is mostly about it and the object patches learn their class slowly (the
            Shapes demo: 0.1, object-patch shape 44 % → 88 % at the same step count).
        cache_images: ``patches`` only: keep each training image, decoded and normalised, and its patch labels in
            memory once read (4·3·S² bytes an image), so that later epochs skip decoding; the same batches.
    """

    root: str = "data/imagefolder"
    format: str = "imagefolder"
    train_split: str = "train"
    val_split: str | None = "val"
    image_size: int | None = None
    num_workers: int = 2
    mixup: float = 0.8
    cutmix: float = 1.0
    label_smoothing: float = 0.1
    randaugment: str | None = "rand-m9-mstd0.5-inc1"
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    hflip: float = 0.5
    color_jitter: float = 0.4
    crop_pct: float | None = None
    background_weight: float = 1.0
    cache_images: bool = False


@dataclass
class ClassifyTrainConfig(TrainConfig):
    """``TrainConfig`` with DeiT-style defaults; ``lr_multipliers`` knows ``head``."""

    output_dir: str = "runs/classify"
    batch_size: int = 64
    epochs: int = 100
    lr: float = 5e-4
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_ratio: float = 0.05
    max_grad_norm: float = 0.0


@dataclass
class ClassifyConfig(_RunConfigBase):
    """The image-classification run config (``absvl train classify``)."""

    model: ClassifyModelConfig = field(default_factory=ClassifyModelConfig)
    data: ImageFolderConfig = field(default_factory=ImageFolderConfig)
    train: ClassifyTrainConfig = field(default_factory=ClassifyTrainConfig)

    def checks(self) -> list[tuple[bool, str, str]]:
        m, d = self.model, self.data
        return super().checks() + [
            (bool(m.backbone), "model.backbone", "a backbone name"),
            (m.var_loss_weight >= 0, "model.var_loss_weight", ">= 0"),
            (d.format in ("imagefolder", "patches"), "data.format", "imagefolder or patches"),
            (
                d.format == "imagefolder" or (d.mixup == 0 and d.cutmix == 0 and not d.randaugment),
                "data.format",
                "imagefolder for mixup, cutmix and randaugment (they would move pixels away from their patch labels): "
                "set data.mixup=0 data.cutmix=0 data.randaugment=null with patches",
            ),
            (d.background_weight > 0, "data.background_weight", "> 0"),
            (
                d.format == "patches" or d.background_weight == 1.0,
                "data.format",
                "patches for data.background_weight (image labels have no background class)",
            ),
            (
                d.format == "patches" or not d.cache_images,
                "data.format",
                "patches for data.cache_images (an image-label dataset's random crops differ every epoch)",
            ),
            (d.mixup >= 0, "data.mixup", ">= 0"),
            (d.cutmix >= 0, "data.cutmix", ">= 0"),
            (0 <= d.label_smoothing < 1, "data.label_smoothing", "in [0, 1)"),
            (
                len(d.crop_scale) == 2 and 0 < d.crop_scale[0] <= d.crop_scale[1] <= 1,
                "data.crop_scale",
                "[min, max] with 0 < min <= max <= 1",
            ),
            (set(self.train.lr_multipliers) <= {"head"}, "train.lr_multipliers", "only the key 'head'"),
        ]


@dataclass
class CaptionDataConfig:
    """Captions (Flickr30K, COCO, Shapes) for image-text retrieval: a Karpathy-format file or a
    Hugging Face dataset.

    Attributes:
        captions: the caption file (``dataset_flickr30k.json``, ``dataset_coco.json``, ...) or, with
            ``format: hf``, a Hugging Face dataset: a Hub id (``org/name``, read through
            ``datasets.load_dataset`` and cached; ``HF_HUB_OFFLINE=1`` reads the cache only), a
            dataset repository folder, a ``save_to_disk`` folder or parquet/arrow files. Images
            stored in the dataset are written once to ``$HF_DATASETS_CACHE/absvl_images/<fingerprint>``.
        images: image root (``filepath/filename`` below it); ``null``: the caption file's folder.
            With ``format: hf``, relative image paths in the dataset are looked up here first.
        format: ``karpathy`` or ``hf``.
        hf_columns: with ``format: hf``, field → the dataset's column for the fields ``image``
            (an ``Image`` feature, bytes or a path), ``captions`` (a caption per row, a list, or
            Karpathy ``sentences``), ``split`` (optional; else the dataset's own splits) and
            ``image_id`` (optional; rows of one id are one image). Unnamed fields are looked for
            under common names (``absvl.data.captions.HF_CAPTION_COLUMNS``: ``image``/``img``,
            ``captions``/``caption``/``sentences``, ``split``, ``image_id``/``imgid``/``img_id``/``cocoid``),
            which covers Flickr30K-style ``{image, caption: [5 captions], split, img_id}`` and COCO-style
            one caption per row ``{image, caption, image_id}``; e.g. ``{image: picture, split: subset}``.
        shapes: when set (e.g. ``{num_images: 2000, seed: 0}``), generate the Shapes world into
            the caption file's folder first (cached): the offline default.
        foils: with a Shapes world's captions, each training caption also gives an ITM negative of its own
            image: the caption changed in one colour, shape or size, or its relation, so that it no longer
            holds for the scene (``ShapesWorld.caption_foils``).
        train_splits: splits trained on (COCO: ``[train, restval]``); Karpathy names for both formats
            (a dataset's ``validation`` is ``val``).
        val_split: split validated on; ``null`` for none.
        max_val_images: validate on at most this many images (and their captions).
        image_size: input size; ``null`` takes the backbone's.
        randaugment: RandAugment on training images.
        num_workers: data-loading processes per training process.
    """

    captions: str = "data/flickr30k/dataset_flickr30k.json"
    images: str | None = None
    format: str = "karpathy"
    hf_columns: dict[str, str] = field(default_factory=dict)
    shapes: dict[str, Any] | None = None
    foils: bool = False
    train_splits: list[str] = field(default_factory=lambda: ["train"])
    val_split: str | None = "val"
    max_val_images: int | None = None
    image_size: int | None = None
    randaugment: bool = False
    num_workers: int = 2


@dataclass
class RetrievalTrainConfig(TrainConfig):
    """``TrainConfig`` for retrieval.

    Attributes:
        hard_negatives: ITM negatives drawn from the in-batch contrastive similarities (ALBEF/BLIP);
            ``false`` draws them uniformly.
        rerank_k: contrastive candidates re-ranked by ITM when validating (SPEC §5: 128 Flickr, 256 COCO).
    """

    output_dir: str = "runs/retrieval"
    hard_negatives: bool = True
    rerank_k: int = 128


@dataclass
class RetrievalConfig(_RunConfigBase):
    """The retrieval run config (``absvl train retrieval``)."""

    model: AbsVLConfig = field(default_factory=AbsVLConfig)
    data: CaptionDataConfig = field(default_factory=CaptionDataConfig)
    train: RetrievalTrainConfig = field(default_factory=RetrievalTrainConfig)

    def checks(self) -> list[tuple[bool, str, str]]:
        d, m = self.data, self.model
        return super().checks() + [
            (bool(d.train_splits), "data.train_splits", "a non-empty list"),
            (d.format in ("karpathy", "hf"), "data.format", "karpathy or hf"),
            (d.format == "hf" or not d.hf_columns, "data.hf_columns", "empty unless data.format=hf"),
            (d.format == "karpathy" or not d.shapes, "data.shapes", "null with data.format=hf"),
            (d.format == "karpathy" or not d.foils, "data.foils", "false with data.format=hf (a Shapes world's)"),
            (self.train.rerank_k >= 1, "train.rerank_k", ">= 1"),
            (
                m.prior_visual in ("bottom_up", "both"),
                "model.prior_visual",
                "bottom_up or both (images are embedded once, before any query, for the index)",
            ),
            (
                m.prior_loss_weight > 0 or m.itm_loss_weight > 0,
                "model.prior_loss_weight",
                "> 0 (or model.itm_loss_weight > 0): retrieval trains the prior and/or ITM loss",
            ),
        ]


def _vision_starts_trained(config: Any) -> bool:
    """The run's vision backbone gets weights: pretrained ones (``pretrained``/``pretrained_path``) or the
    model of ``train.init_from``."""
    kwargs = config.model.backbone_kwargs
    return bool(kwargs.get("pretrained") or kwargs.get("pretrained_path") or config.train.init_from)


def check_vision_start(config: Any) -> None:
    """A VL training run's vision backbone starts from pretrained weights, unless it is a test-size one
    (registered with ``test_size=True``, e.g. the Shapes demo's), the run starts from ``train.init_from``, or the user asked
    for random weights (``train.vision_from_scratch``). Raises ``ConfigError`` naming the keys."""
    model, train = config.model, config.train
    kwargs = model.backbone_kwargs
    if backbone_defaults(model.backbone).test_size or _vision_starts_trained(config) or train.vision_from_scratch:
        return
    raise ConfigError(
        f"model.backbone_kwargs={kwargs!r} gives no pretrained weights for the paper-size vision backbone "
        f"{model.backbone!r}, which would train from random weights: set `pretrained: true` (timm's ImageNet DeiT "
        "weights) or `pretrained_path: DIR` (a folder from absvl convert or absvl train classify) in "
        "model.backbone_kwargs (the paper finetunes an ImageNet-pretrained AbSViT), or train.vision_from_scratch=true "
        "to train it from random weights on purpose"
    )


def from_scratch_note(config: Any) -> str | None:
    """What to change when a VL run's test-size vision backbone (``test_size``, which ``check_vision_start``
    lets start from random weights) has no pretrained weights and no ``train.init_from``; ``None`` otherwise."""
    model = config.model
    if not backbone_defaults(model.backbone).test_size or _vision_starts_trained(config):
        return None
    return (
        f"model.backbone={model.backbone} starts from random weights (no backbone_kwargs.pretrained_path, no "
        "train.init_from). From answers alone a small ViT learns colour but not shape: on a Shapes VQA set at "
        "64 px, 3 epochs with the patch or the conv stem leave 'what shape' questions near chance while colour "
        "questions reach ~100 %. Pretrain the backbone on patch labels first (`absvl train classify --config "
        "configs/shapes_pretrain.yaml`: background_weight 0.1, 95 % object-patch shape in ~3 min on 2 CPU cores), "
        "set model.backbone_kwargs.pretrained_path to its export, and align the prior before VQA (`absvl train "
        "prior --config configs/shapes_prior.yaml`, then train.init_from=its export)"
    )


def _sections(run_class: type) -> dict[str, type]:
    """section name → section class of a run config class."""
    return {f.name: f.default_factory for f in fields(run_class)}  # type: ignore[misc]


def _get(tree: dict[str, Any], path: list[str]) -> Any:
    for part in path:
        tree = tree[part]
    return tree


def _unknown_key(key: str, known: list[str], source: str) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(known)})"
    return ConfigError(f"unknown config key {key!r} in {source}{hint}")


def _build_section(
    name: str, cls: type, values: Any, source: str, from_command_line: frozenset[str] = frozenset()
) -> Any:
    """The section dataclass from its values; ``from_command_line``: the ``section.key`` names set
    by overrides, whose errors name the command line instead of ``source``."""
    if not isinstance(values, dict):
        raise ConfigError(f"config section {name!r} in {source} must be a mapping, got {type(values).__name__}")
    known = [f.name for f in fields(cls)]
    for key in values:
        if key not in known:
            raise _unknown_key(f"{name}.{key}", [f"{name}.{k}" for k in known], source)
    hints = typing.get_type_hints(cls)
    values = {
        k: _typed(f"{name}.{k}", v, hints[k], "the command line" if f"{name}.{k}" in from_command_line else source)
        for k, v in values.items()
    }
    try:
        return cls(**values)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"bad {name} config in {source}: {err}") from err


def _typed(key: str, value: Any, hint: Any, source: str) -> Any:
    """``value`` checked against its field's type ``hint``, or a ``ConfigError`` naming the key.

    Numbers written as strings (YAML reads ``2e-5`` as a string) become numbers, a whole float
    becomes an int where one is expected, a number becomes a string where one is expected, and a
    single item where a list is expected becomes a list of one (``train.trackers=wandb``).
    """

    def wrong(expected: str) -> ConfigError:
        return ConfigError(f"config value {key}={value!r} in {source} is invalid: expected {expected}")

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _typed(key, value, inner, source)
    if origin is list:
        items = value if isinstance(value, list) else [value]
        if value is None:
            raise wrong("a list")
        return [_typed(f"{key}[{i}]", item, args[0], source) for i, item in enumerate(items)]
    if origin is dict:
        if not isinstance(value, dict):
            raise wrong("a mapping")
        return {k: _typed(f"{key}.{k}", v, args[1], source) for k, v in value.items()}
    if hint is bool:
        if not isinstance(value, bool):
            raise wrong("true or false")
        return value
    if hint in (int, float):
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"config value {key}={value!r} in {source} is not a number") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise wrong("a number" if hint is float else "a whole number")
        if hint is int:
            if value != int(value):
                raise wrong("a whole number")
            return int(value)
        return float(value)
    if hint is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            raise wrong("a string")
    return value


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A mapping that gives a key twice (YAML says keys are unique; PyYAML would keep the last silently)."""


class _Loader(yaml.SafeLoader):
    """YAML with YAML 1.2's booleans: only ``true``/``false``; ``no``, ``yes``, ``on``, ``off`` stay
    words (``train.mixed_precision=no`` is the string Accelerate expects, not False). A key given twice
    in one mapping is refused (``DuplicateKeyError``, naming the key and both lines): PyYAML would keep
    the second silently, a second ``train:`` section replacing the first whole."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, yaml.Node] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # ``<<: *base``: merged keys may be overridden
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node)
                except TypeError:  # an unhashable key: the base class says so
                    continue
                if first is not key_node:
                    a, b = first.start_mark, key_node.start_mark
                    where = (
                        f"on line {a.line + 1} (columns {a.column + 1} and {b.column + 1})"
                        if a.line == b.line
                        else f"on line {a.line + 1} and on line {b.line + 1}"
                    )
                    raise DuplicateKeyError(
                        None, None, f"key {key!r} appears twice in one mapping, {where}: keep one", b
                    )
        return super().construct_mapping(node, deep=deep)


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader)


def apply_override(tree: dict[str, Any], override: str, run_class: type = RunConfig) -> None:
    """Apply one ``section.key=value`` (value parsed as YAML) to a config dict in place."""
    sections = _sections(run_class)
    if "=" not in override:
        raise ConfigError(f"override {override!r} is not of the form section.key=value")
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) < 2 or parts[0] not in sections:
        raise ConfigError(f"override key {key!r} must start with one of {', '.join(sections)} (e.g. train.lr=1e-4)")
    known = [f.name for f in fields(sections[parts[0]])]
    if parts[1] not in known:
        raise _unknown_key(key, [f"{parts[0]}.{k}" for k in known], "the command line")
    node = tree.setdefault(parts[0], {})
    for part in parts[1:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key!r}: {part!r} is not a mapping")
    try:
        node[parts[-1]] = _load_yaml(raw)
    except yaml.YAMLError as err:
        raise ConfigError(f"override {override!r}: value is not valid YAML ({err})") from err


def load_config(
    path: str | Path | None, overrides: list[str] | tuple[str, ...] = (), run_class: type = RunConfig
) -> Any:
    """Read a YAML run config, apply ``key=value`` overrides, validate every key and value.

    ``run_class`` is the run config dataclass (its fields are the sections): ``RunConfig`` (VQA,
    the default), ``RetrievalConfig`` or ``ClassifyConfig``.
    """
    sections = _sections(run_class)
    tree: dict[str, Any] = {}
    source = "the defaults"
    if path is not None:
        path, source = Path(path), str(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            tree = _load_yaml(path.read_text()) or {}
        except DuplicateKeyError as err:
            raise ConfigError(f"config file {path}: {err.problem}") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {path} must hold a mapping with sections {', '.join(sections)}")
        for key in tree:
            if key not in sections:
                raise _unknown_key(key, list(sections), source)
    for override in overrides:
        apply_override(tree, override, run_class)
    overridden = frozenset(".".join(o.split("=", 1)[0].strip().split(".")[:2]) for o in overrides)
    config = run_class(
        **{name: _build_section(name, cls, tree.get(name, {}), source, overridden) for name, cls in sections.items()}
    )
    config.validate()
    return config


def dump_config(config: Any) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
