"""Supervised image (or patch) classification of any registered backbone: ``ClassifyTask`` on the shared
loop of ``absvl.training.loop``, with DeiT's recipe by default (timm's transforms, RandAugment, Mixup/CutMix,
label smoothing 0.1, AdamW 0.05). Backbones with a feedback path (AbSViT) average the cross-entropy of
both passes and add ``var_loss_weight``·L_var. The export is a backbone folder (``absvl.io``), which
``create_backbone(name, pretrained_path=DIR)`` and ``absvl eval classify --model DIR`` load.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import gather_object
from safetensors.torch import load_model
from timm.loss import SoftTargetCrossEntropy
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..data.imagefolder import ClassifyCollator, ImageFolderDataset, find_classes, list_samples
from ..data.loaders import eval_loader, to_device
from ..data.patch_labels import (
    IGNORE_INDEX,
    PatchLabelDataset,
    list_labelled,
    patch_accuracy,
    read_attributes,
    read_classes,
)
from ..io import CONFIG_NAME, WEIGHTS_NAME, read_backbone_folder, read_json, save_backbone_files, write_json
from ..models.param_groups import param_groups
from ..models.vision import create_backbone
from ..models.vision.output import BackboneOutput
from ..models.vision.topdown import shut_gate_warning, topdown_health
from ..runtime import cpu_only
from .config import ClassifyConfig, ConfigError
from .loop import Validation, run_training

# keys of backbone_kwargs that say where weights come from, not how the model is built
_WEIGHT_SOURCES = ("pretrained", "pretrained_path")


# --- model, transforms, loss ---------------------------------------------------------------
def build_classifier(config: ClassifyConfig, classes: list[str]) -> nn.Module:
    """``create_backbone(backbone, num_classes=len(classes), **backbone_kwargs)``, or the classifier
    of ``train.init_from`` (a folder exported by this trainer, with the same classes)."""
    init = config.train.init_from
    if init:
        model, info = load_classifier(init)
        if info["classes"] != list(classes):
            raise ConfigError(f"train.init_from={init!r} was trained on other classes: {info['classes']}")
        return model.train()
    kwargs = dict(config.model.backbone_kwargs)
    if "num_classes" in kwargs:
        raise ConfigError("model.backbone_kwargs.num_classes is set by the data (the number of class folders)")
    return create_backbone(config.model.backbone, num_classes=len(classes), **kwargs)


def resolve_image_config(
    model: nn.Module, image_size: int | None = None, crop_pct: float | None = None
) -> dict[str, Any]:
    """timm's data config (input size, interpolation, mean, std, crop_pct) for ``model``."""
    from timm.data import resolve_data_config

    from ..models.vl.processing import backbone_image_size

    size = image_size or backbone_image_size(model)
    args: dict[str, Any] = {"input_size": (3, size, size)}
    if crop_pct:
        args["crop_pct"] = crop_pct
    cfg = resolve_data_config(args, model=model)
    return {
        "input_size": list(cfg["input_size"]),
        "interpolation": cfg["interpolation"],
        "mean": list(cfg["mean"]),
        "std": list(cfg["std"]),
        "crop_pct": cfg["crop_pct"],
    }


def eval_transform(image_config: dict[str, Any]):
    """Resize to ``size / crop_pct`` + centre crop + normalise (timm's evaluation transform)."""
    from timm.data import create_transform

    c = image_config
    return create_transform(
        tuple(c["input_size"]),
        is_training=False,
        interpolation=c["interpolation"],
        mean=tuple(c["mean"]),
        std=tuple(c["std"]),
        crop_pct=c["crop_pct"],
    )


def patch_tensor_transform(image_config: dict[str, Any]):
    """To tensor + normalise, nothing geometric (patch labels must stay on their pixels)."""
    from torchvision import transforms

    return transforms.Compose([transforms.ToTensor(), transforms.Normalize(image_config["mean"], image_config["std"])])


def train_transform(image_config: dict[str, Any], config: ClassifyConfig):
    """timm's training transform: random-resized crop, flip, RandAugment or colour jitter, normalise."""
    from timm.data import create_transform

    c, d = image_config, config.data
    return create_transform(
        tuple(c["input_size"]),
        is_training=True,
        scale=tuple(d.crop_scale),
        hflip=d.hflip,
        color_jitter=d.color_jitter or None,
        auto_augment=d.randaugment or None,
        interpolation=c["interpolation"],
        mean=tuple(c["mean"]),
        std=tuple(c["std"]),
    )


def classification_loss(
    output: BackboneOutput, targets: torch.Tensor, criterion: nn.Module, var_loss_weight: float = 0.1
) -> torch.Tensor:
    """Mean of ``criterion`` over the passes' logits (the second pass and, when the backbone has a
    distinct first pass, the first) plus ``var_loss_weight``·L_var when the backbone returns one."""
    passes = [output.logits]
    if output.bottom_up_logits is not None and output.bottom_up_logits is not output.logits:
        passes.append(output.bottom_up_logits)
    loss = sum(criterion(logits.float(), targets) for logits in passes) / len(passes)
    var = output.aux_losses.get("var")
    if var is not None and var_loss_weight:
        loss = loss + var_loss_weight * var
    return loss


def patch_logits(model: nn.Module, tokens: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    """``[B, h·w, classes]``: the classifier applied to every spatial token (normalised: ``norm_tokens``)."""
    model = getattr(model, "module", model)  # DDP
    return model.head(model.norm_tokens(tokens[:, num_prefix_tokens:]))


def patch_classification_loss(
    model: nn.Module,
    output: BackboneOutput,
    targets: torch.Tensor,
    label_smoothing: float = 0.0,
    var_loss_weight: float = 0.1,
    class_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """``classification_loss`` for patch labels: cross-entropy of every labelled patch token (``[B, h·w]``
    targets, ``IGNORE_INDEX`` left out; ``class_weights`` ``[C]`` weigh each patch by its true class, the
    mean is over the weights), averaged over the passes, plus ``var_loss_weight``·L_var."""
    passes = [output.tokens]
    if output.bottom_up_tokens is not output.tokens:
        passes.append(output.bottom_up_tokens)
    loss = sum(
        F.cross_entropy(
            patch_logits(model, tokens, output.num_prefix_tokens).flatten(0, 1).float(),
            targets.flatten(),
            weight=None if class_weights is None else class_weights.to(tokens.device),
            ignore_index=IGNORE_INDEX,
            label_smoothing=label_smoothing,
        )
        for tokens in passes
    ) / len(passes)
    var = output.aux_losses.get("var")
    if var is not None and var_loss_weight:
        loss = loss + var_loss_weight * var
    return loss


def classifier_param_groups(
    model: nn.Module, lr: float, weight_decay: float, lr_multipliers: dict[str, float] | None = None
) -> list[dict[str, Any]]:
    """AdamW groups (``absvl.models.param_groups``): backbone / head (``lr_multipliers["head"]``), each with
    and without weight decay (none on biases, norms and other ≤1-D parameters and ``model.no_weight_decay()``
    names)."""
    multipliers = {"backbone": 1.0, "head": 1.0, **(lr_multipliers or {})}
    head_names = {
        f"{attr}.{n}"
        for attr in ("head", "fc")
        if isinstance(getattr(model, attr, None), nn.Module)
        for n, _ in getattr(model, attr).named_parameters()
    }
    no_decay = set(getattr(model, "no_weight_decay", lambda: set())())

    def group_of(name: str) -> str:
        return "head" if name in head_names else "backbone"

    return param_groups(model, lr, weight_decay, group_of, multipliers, no_decay)


# --- evaluation -----------------------------------------------------------------------------
@torch.no_grad()
def predict_topk(
    model: nn.Module, loader: DataLoader, accelerator: Accelerator, num_classes: int, desc: str = "evaluate"
) -> dict[str, Any]:
    """Top-1 / top-5 hits of the second-pass logits on every item of ``loader`` (gathered over
    processes at the end; ``loader`` holds this process's share, see ``eval_loader``):
    ``{"confusion": [C, C] (rows: true class, columns: top-1), "correct5", "images", "skipped": [(path,
    reason)]}``. With patch labels (``[B, h·w]``) every labelled patch token counts as one item
    ("images" then counts patches)."""
    was_training = model.training
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    correct5 = 0
    skipped: list[tuple] = []
    for batch in tqdm(loader, desc=desc, disable=not accelerator.is_local_main_process, leave=False):
        skipped.extend(batch.get("skipped", []))
        if len(batch["labels"]) == 0:
            continue
        batch = to_device(batch, accelerator.device)
        labels = batch["labels"]
        with accelerator.autocast():
            output = model(batch["images"])
        if labels.dim() == 1:  # one label per image, as one labelled "patch"
            logits, labels = output.logits[:, None], labels[:, None]
        else:  # patch labels: score every labelled patch token
            logits = patch_logits(model, output.tokens, output.num_prefix_tokens)
        labelled = labels != IGNORE_INDEX
        top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices[labelled]
        labels = labels[labelled]
        correct5 += int((top == labels[:, None]).any(-1).sum())
        confusion += torch.bincount((labels * num_classes + top[:, 0]).cpu(), minlength=num_classes * num_classes).view(
            num_classes, num_classes
        )
    model.train(was_training)
    shares = [(confusion, correct5, skipped)]
    if accelerator.num_processes > 1:
        shares = gather_object(shares)
    confusion = sum(s[0] for s in shares)
    return {
        "confusion": confusion,
        "correct5": sum(s[1] for s in shares),
        "images": int(confusion.sum()),
        "skipped": [item for s in shares for item in s[2]],
    }


def _accuracy(
    counts: dict[str, Any],
    total: int,
    background: int | None = None,
    attributes: dict[str, list[str | None]] | None = None,
) -> dict[str, Any]:
    """top1 / top5 (%) over ``total`` items; with a ``background`` class (patch labels) also the
    background and object patches' accuracies and each attribute's (``patch_accuracy``)."""
    confusion = counts["confusion"]
    result = {
        "top1": 100.0 * float(confusion.trace()) / max(total, 1),
        "top5": 100.0 * counts["correct5"] / max(total, 1),
        "images": total,
        "skipped": len(counts["skipped"]),
    }
    if background is not None:
        result.update({k: v for k, v in patch_accuracy(confusion, background, attributes or {}).items() if k != "top1"})
    return result


def load_classifier(folder: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """The classifier exported by ``absvl train classify`` (eval mode) and its ``config.json``."""
    folder = Path(folder)
    info = read_backbone_folder(folder)
    if "classes" not in info:
        raise ValueError(f"{folder / CONFIG_NAME} has no class list: not a classifier exported by absvl train classify")
    model = create_backbone(info["name"], **info.get("overrides", {}))
    load_model(model, str(folder / WEIGHTS_NAME), strict=True)
    return model.eval(), info


def patch_dataset(
    model: nn.Module,
    root: str | Path,
    split: str,
    classes: list[str],
    image_config: dict[str, Any],
    hflip: float = 0.0,
    cache: bool = False,
) -> PatchLabelDataset:
    """``root/split`` of a patch-labelled dataset, labelled on ``model``'s patch grid ("background",
    when a class is named so, is what a patch falls back to when no object owns it); ``cache``: keep the read
    items in memory (``PatchLabelDataset``)."""
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if patch is None or not hasattr(model, "fc_norm"):
        raise ConfigError(f"patch labels need a ViT-family backbone (patch tokens), not {type(model).__name__}")
    return PatchLabelDataset(
        list_labelled(root, split),
        patch_tensor_transform(image_config),
        image_size=image_config["input_size"][-1],
        patch=patch[0],
        num_classes=len(classes),
        background=classes.index("background") if "background" in classes else None,
        hflip=hflip,
        cache=cache,
    )


def evaluate_classifier(
    model_dir: str | Path, data_root: str | Path, split: str = "val", batch_size: int = 64, num_workers: int = 2
) -> dict[str, Any]:
    """Top-1 / top-5 accuracy (%) of an exported classifier on ``data_root/split`` (of every labelled
    patch for a classifier trained on patch labels, then also of the background and the object patches,
    and per attribute where the data has ``attributes.json``: see ``patch_accuracy``).

    Unreadable images are counted (``skipped``; ``unreadable``: their ``(path, reason)``) and scored
    wrong (patch labels: left out)."""
    model, info = load_classifier(model_dir)
    image_config = info.get("data_config") or resolve_image_config(model)
    classes = info["classes"]
    background, attributes = None, {}
    if info.get("labels") == "patch":
        dataset = patch_dataset(model, data_root, split, classes, image_config)
        background, attributes = dataset.background, read_attributes(data_root, classes)
    else:
        dataset = ImageFolderDataset(list_samples(data_root, split, info["classes"]), eval_transform(image_config))
    collator = ClassifyCollator(image_config["input_size"][-1])
    accelerator = Accelerator(cpu=cpu_only())
    loader = eval_loader(dataset, collator, batch_size, num_workers, accelerator)
    model.to(accelerator.device)
    counts = predict_topk(model, loader, accelerator, len(classes), desc=split)
    scored = counts["images"] + (0 if info.get("labels") == "patch" else len(counts["skipped"]))
    return {
        **_accuracy(counts, scored, background, attributes),
        "split": split,
        "classes": len(info["classes"]),
        "unreadable": counts["skipped"],
    }


# --- the task --------------------------------------------------------------------------------
class ClassifyTask:
    """Image classification as a ``run_training`` task (see the module docstring)."""

    diagnose = False  # set by the loop on the forward of a logged step
    health_warning = staticmethod(shut_gate_warning)

    def __init__(self, config: ClassifyConfig) -> None:
        self.config = config
        self.mixup = None
        self.measured: dict[str, torch.Tensor] = {}

    def _build(self, classes: list[str]) -> None:
        d = self.config.data
        self.patches = d.format == "patches"
        self.classes = classes
        self.model = build_classifier(self.config, classes)
        self.image_config = resolve_image_config(self.model, d.image_size, d.crop_pct)
        # patch labels: the background class (if any) and the classes' attributes, for the per-kind scores
        self.background = classes.index("background") if self.patches and "background" in classes else None
        self.attributes = read_attributes(d.root, classes) if self.patches else {}

    def restore(self, output_dir: Path) -> None:
        self._build(
            read_json(
                output_dir / "classes.json",
                what="a classifier's class list",
                fix="the run folder of a classifier holds it",
            )
        )

    def setup(self, accelerator: Accelerator, output_dir: Path, checkpoint: Path | None) -> None:
        config, d = self.config, self.config.data
        classes = read_classes(d.root) if d.format == "patches" else find_classes(d.root, d.train_split)
        classes_file = output_dir / "classes.json"
        if checkpoint is not None and classes_file.is_file():
            before = read_json(classes_file, what="a classifier's class list")
            if before != classes:
                raise ConfigError(f"the classes of {d.root}/{d.train_split} changed since {checkpoint} was written")
        if accelerator.is_main_process:
            write_json(classes_file, classes, indent=None)
        self._build(classes)
        size = self.image_config["input_size"][-1]
        if self.patches:
            train_set = patch_dataset(
                self.model, d.root, d.train_split, self.classes, self.image_config, d.hflip, d.cache_images
            )
            val_set = (
                patch_dataset(self.model, d.root, d.val_split, self.classes, self.image_config) if d.val_split else None
            )
        else:
            train_set = ImageFolderDataset(
                list_samples(d.root, d.train_split, self.classes), train_transform(self.image_config, config)
            )
            val_set = (
                ImageFolderDataset(list_samples(d.root, d.val_split, self.classes), eval_transform(self.image_config))
                if d.val_split
                else None
            )
        self.train_set = train_set
        # patch labels: the loss weighs the background class by data.background_weight
        self.class_weights = None
        if self.background is not None and d.background_weight != 1.0:
            self.class_weights = torch.ones(len(self.classes))
            self.class_weights[self.background] = d.background_weight
        self.collator = ClassifyCollator(size)
        self.val_loader = None
        if val_set is not None:
            self.val_loader = eval_loader(val_set, self.collator, config.train.batch_size, d.num_workers, accelerator)
        self.num_val = len(val_set) if val_set is not None else 0
        num_classes = len(self.classes)
        if d.mixup > 0 or d.cutmix > 0:
            from timm.data import Mixup

            self.mixup = Mixup(
                mixup_alpha=d.mixup, cutmix_alpha=d.cutmix, label_smoothing=d.label_smoothing, num_classes=num_classes
            )
            self.criterion: nn.Module = SoftTargetCrossEntropy()
        else:
            self.criterion = nn.CrossEntropyLoss(label_smoothing=d.label_smoothing)

    def param_groups(self) -> list[dict[str, Any]]:
        t = self.config.train
        return classifier_param_groups(self.model, t.lr, t.weight_decay, t.lr_multipliers)

    def describe(self) -> str:
        labels = "patch-labelled " if self.patches else ""
        return (
            f"training on {len(self.train_set)} {labels}images of {len(self.classes)} classes, "
            f"{self.num_val} validation images"
        )

    def batch_size(self, batch: dict[str, Any]) -> int:
        return len(batch["labels"])

    def mix(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """timm's Mixup/CutMix on the largest even prefix of the batch (it needs pairs); an odd
        last sample keeps its image and gets the smoothed one-hot target."""
        from timm.data.mixup import mixup_target

        even = len(labels) - len(labels) % 2
        num_classes, smoothing = len(self.classes), self.config.data.label_smoothing
        parts_x, parts_y = [], []
        if even:
            x, y = self.mixup(images[:even].clone(), labels[:even])
            parts_x.append(x)
            parts_y.append(y)
        if even < len(labels):
            parts_x.append(images[even:])
            parts_y.append(mixup_target(labels[even:], num_classes, lam=1.0, smoothing=smoothing))
        return torch.cat(parts_x), torch.cat(parts_y)

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        images, targets = batch["images"], batch["labels"]
        if self.mixup is not None:
            images, targets = self.mix(images, targets)
        output = model(images)
        if self.diagnose:
            self.measured = topdown_health(output)
        if self.patches:
            return patch_classification_loss(
                model,
                output,
                targets,
                self.config.data.label_smoothing,
                self.config.model.var_loss_weight,
                self.class_weights,
            )
        return classification_loss(output, targets, self.criterion, self.config.model.var_loss_weight)

    def diagnostics(self) -> dict[str, torch.Tensor]:
        return self.measured

    def validate(self, model: nn.Module, accelerator: Accelerator) -> Validation | None:
        if self.val_loader is None:
            return None
        counts = predict_topk(model, self.val_loader, accelerator, len(self.classes), desc="validate")
        result = _accuracy(counts, counts["images"], self.background, self.attributes)
        metrics = {f"val/{k}": result[k] for k in self._metric_names()}
        metrics["val/skipped"] = result["skipped"]
        # with a background class the object patches decide: background is most patches and easy
        score = result["top1"] if self.background is None else result["objects"]
        return Validation(score=score, metrics=metrics, result=result)

    def _metric_names(self) -> list[str]:
        extra = [] if self.background is None else ["background", "objects", *self.attributes]
        return ["top1", "top5", *extra]

    def export(self, model: nn.Module, out_dir: Path, last: Validation | None) -> None:
        """A backbone folder (``absvl.io``) in the staging folder that ``run_training`` publishes."""
        built = getattr(model, "backbone_config", {"name": self.config.model.backbone})
        save_backbone_files(
            out_dir,
            model.state_dict(),
            built["name"],
            {k: v for k, v in built.items() if k != "name" and k not in _WEIGHT_SOURCES},
            classes=self.classes,
            labels="patch" if self.patches else "image",
            data_config=self.image_config,
            metrics={k: last.metrics[f"val/{k}"] for k in self._metric_names()} if last else {},
        )


def train_classifier(config: ClassifyConfig, notify: Callable[[str], Any] | None = None) -> dict[str, Any]:
    """Run a classification job; returns the loop's summary (``val`` holds top1/top5 in %).
    ``notify`` receives the run's messages (see ``run_training``)."""
    return run_training(config, ClassifyTask(config), notify)


__all__ = [
    "ClassifyTask",
    "build_classifier",
    "classification_loss",
    "classifier_param_groups",
    "evaluate_classifier",
    "load_classifier",
    "train_classifier",
]
