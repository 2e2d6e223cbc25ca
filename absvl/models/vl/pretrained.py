"""``AbsVLPreTrainedModel``: what every AbSViT-VL model class shares, the Hugging Face folder and Hub round trip
(``save_pretrained`` / ``from_pretrained`` / ``push_to_hub``) and the model card.

A folder holds one class (``config.json``'s ``architecture``): the shared encoder (``AbsVLModel``) or a task model
(``AbsVLForQuestionAnswering``, ``AbsVLForRetrieval``) with its head. Any class loads the encoder of any folder;
a task class loads its head from a folder that holds it trained, or starts a fresh one when asked
(``answers=`` / ``new_head=True``: finetuning from another task's model). Folders written by absvl 0.2 (one
class with both heads and ``trained_tasks``, the heads it trained) load the same way.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import transformers
from huggingface_hub import CommitInfo, HfApi, ModelCard, ModelHubMixin, snapshot_download
from safetensors import safe_open
from safetensors.torch import load_file, save_model
from torch import nn

from ...io import CONFIG_NAME, WEIGHTS_NAME, read_json, write_json
from .configuration import AbsVLConfig
from .model_card import CARD_DATA_KEYS, CARD_DATA_NAME, render_model_card
from .text import tokenizer_mismatches

ANSWERS_NAME = "answers.json"
# the config.json key naming the class a folder holds (absent in absvl 0.2 folders)
ARCHITECTURE_KEY = "architecture"
# the weights of each task's head, by parameter-name prefix
HEAD_PREFIXES = {"vqa": ("vqa_head.",), "retrieval": ("itm_head.", "itc_head.")}
# the weights' prefix of the pre-0.2 image projection of the prior loss (see _refuse_projected_prior)
LEGACY_PRIOR_PROJECTION = "contrastive.proj."


class AbsVLPreTrainedModel(
    nn.Module,
    ModelHubMixin,
    library_name="absvl",
    license="apache-2.0",
    tags=["absvl", "vision-language", "top-down-attention"],
):
    """Base of the AbSViT-VL classes: folder and Hub I/O. A subclass sets :attr:`task` (the head it owns, None
    for the shared encoder) and builds itself in :meth:`_from_folder`."""

    task: str | None = None
    config: AbsVLConfig
    tokenizer: Any
    card_data: dict[str, Any]
    # prefixes of the weights a loaded model starts fresh (a new head): ``from_pretrained`` does not look for them
    _fresh_prefixes: tuple[str, ...] = ()

    def head_description(self) -> str:
        """The heads row of the model card."""
        return f"none (the shared encoder); prior loss on {self.config.prior_visual} tokens in the gate's space"

    def save_pretrained(
        self,
        save_directory: str | Path,
        *,
        model_card_kwargs: dict[str, Any] | None = None,
        push_to_hub: bool = False,
        repo_id: str | None = None,
        **push_kwargs: Any,
    ) -> CommitInfo | None:
        """The mixin's. The card's ``training_data``, ``metrics``, ``datasets`` and ``task`` (see
        :func:`render_model_card`) are kept in :attr:`card_data` and ``model_card.json``: a model
        loaded from the folder renders the same card, e.g. when pushed. ``push_to_hub=True`` then
        pushes to ``repo_id`` (default: the folder's name) with :meth:`push_to_hub`'s ``push_kwargs``."""
        card_kwargs = dict(model_card_kwargs or {})
        self.card_data.update({k: card_kwargs.pop(k) for k in CARD_DATA_KEYS if k in card_kwargs})
        super().save_pretrained(save_directory, model_card_kwargs=card_kwargs)
        if push_to_hub:
            return self.push_to_hub(repo_id or Path(save_directory).name, model_card_kwargs=card_kwargs, **push_kwargs)
        return None

    def _save_pretrained(self, save_directory: Path) -> None:
        """Weights (safetensors), config (with the class), tokenizer, a VQA model's answers, card data; the mixin
        then writes the card."""
        save_model(self, str(save_directory / WEIGHTS_NAME))
        config = {**self.config.to_dict(), ARCHITECTURE_KEY: type(self).__name__}
        write_json(save_directory / CONFIG_NAME, _sorted_keys(config))
        if self.task == "vqa":
            write_json(save_directory / ANSWERS_NAME, self.answers, indent=0)
        write_json(save_directory / CARD_DATA_NAME, self.card_data)
        self.tokenizer.save_pretrained(save_directory)
        (save_directory / "README.md").unlink(missing_ok=True)  # the mixin keeps an existing card: regenerate

    def generate_model_card(self, *args: Any, **kwargs: Any) -> ModelCard:
        """``README.md`` from :attr:`card_data` and the keyword arguments of :func:`render_model_card`."""
        built = {
            "vision_width": self.backbone.num_features,
            "image_size": self.image_size,
            "num_parameters": sum(p.numel() for p in self.parameters()),
            "architecture": type(self).__name__,
            "heads": self.head_description(),
        }
        return render_model_card(self.config, *args, **built, **{**self.card_data, **kwargs})

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        branch: str | None = None,
        commit_message: str | None = None,
        create_pr: bool | None = None,
        token: str | None = None,
        model_card_kwargs: dict[str, Any] | None = None,
    ) -> CommitInfo:
        """Upload the :meth:`save_pretrained` folder in one commit, creating the repository and
        ``branch`` when missing; the card's usage snippet loads from ``repo_id``.

        ``token`` defaults to huggingface_hub's: ``HF_TOKEN``, else ``hf auth login``'s. Returns the
        commit (``.commit_url``, ``.oid``).
        """
        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        if branch:
            api.create_branch(repo_id, branch=branch, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp, model_card_kwargs={"repo_id": repo_id, **(model_card_kwargs or {})})
            return api.upload_folder(
                repo_id=repo_id,
                folder_path=tmp,
                commit_message=commit_message or f"Upload {type(self).__name__}",
                revision=branch,
                create_pr=create_pr,
            )

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | Path,
        *,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        force_download: bool = False,
        local_files_only: bool = False,
        token: str | bool | None = None,
        **head_options: Any,
    ) -> AbsVLPreTrainedModel:
        """Load a folder written by :meth:`save_pretrained`, or download a Hub repository of one, as this class.

        The text encoder is rebuilt from the saved config (its weights are in ``model.safetensors``), the tokenizer
        and answers come from the folder: nothing else is fetched. Weights are loaded from safetensors only; every
        weight of this class must be in the folder, except a head the class starts fresh (``head_options``: see the
        task classes), and the folder may hold no weight but another task's head. Returned in eval mode.
        """
        folder = resolve_folder(
            pretrained_model_name_or_path,
            revision=revision,
            cache_dir=cache_dir,
            force_download=force_download,
            local_files_only=local_files_only,
            token=token,
        )
        weights = folder / WEIGHTS_NAME
        saved = read_saved(folder)
        config = saved.config
        # the text encoder's config tells AutoTokenizer the class (our config.json is not a transformers one)
        text_config = transformers.AutoConfig.for_model(**config.text_config)
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, config=text_config)
        _refuse_foreign_tokenizer(folder, tokenizer, config)
        model = cls._from_folder(folder, saved, tokenizer, **head_options)
        _load_weights(model, weights, saved.keys)
        if (folder / CARD_DATA_NAME).is_file():  # absent in folders saved by older versions
            model.card_data = read_json(folder / CARD_DATA_NAME, what="an absvl model's model card data")
        return model.eval()

    @classmethod
    def _from_folder(cls, folder: Path, saved: SavedModel, tokenizer: Any, **head_options: Any) -> AbsVLPreTrainedModel:
        """This class built for the folder's :class:`SavedModel` (its weights are loaded afterwards)."""
        if head_options:
            raise TypeError(f"{cls.__name__}.from_pretrained got unexpected options {sorted(head_options)}")
        return cls(saved.config, tokenizer=tokenizer)


@dataclass
class SavedModel:
    """What a model folder holds: its config, the class that saved it (None: absvl 0.2), the tasks whose trained
    heads it has, and its weights' names."""

    config: AbsVLConfig
    architecture: str | None
    heads: set[str]
    keys: set[str]

    def describe(self) -> str:
        """What the folder holds, for messages."""
        return self.architecture or f"an absvl 0.2 model with trained heads: {', '.join(sorted(self.heads)) or 'none'}"


def resolve_folder(name: str | Path, **hub_options: Any) -> Path:
    """A local model folder, or the snapshot of a Hub repository (``hub_options``: ``snapshot_download``'s
    revision, cache_dir, force_download, local_files_only, token)."""
    folder = Path(name)
    if folder.is_dir():
        return folder
    _refuse_missing_path(name)
    return Path(snapshot_download(repo_id=str(name), **hub_options))


def read_saved(folder: Path) -> SavedModel:
    """A folder's :class:`SavedModel`, checked: config and weights present, not a pre-0.2 model, a text config."""
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder} has no {name}: not a folder written by an absvl model's save_pretrained")
    with safe_open(str(folder / WEIGHTS_NAME), framework="pt") as f:
        keys = set(f.keys())
    _refuse_projected_prior(folder / WEIGHTS_NAME, keys)
    data = read_json(folder / CONFIG_NAME, what="an absvl model config")
    architecture = data.pop(ARCHITECTURE_KEY, None)
    legacy_tasks = data.pop("trained_tasks", None)  # absvl 0.2: both heads, the ones trained listed
    config = AbsVLConfig.from_dict(data)
    if config.text_config is None:
        raise ValueError(f"{folder / CONFIG_NAME} has no text_config: cannot rebuild the text encoder")
    heads = {task for task, prefixes in HEAD_PREFIXES.items() if any(k.startswith(prefixes) for k in keys)}
    if architecture is None and legacy_tasks is not None:
        heads &= set(legacy_tasks)  # a 0.2 folder's other head was frozen while the encoder changed: stale
    return SavedModel(config, architecture, heads, keys)


def _load_weights(model: AbsVLPreTrainedModel, weights: Path, keys: set[str]) -> None:
    """The folder's weights into ``model``: all of the model's but those it starts fresh; the folder may hold
    other tasks' heads besides. Anything else missing or extra is refused, naming the folder. Tied weights (one
    tensor under several names, e.g. a T5 encoder's embeddings) are saved once and count as present."""
    fresh = model._fresh_prefixes
    aliases: dict[int, set[str]] = {}
    for name, tensor in model.state_dict().items():
        aliases.setdefault(tensor.data_ptr(), set()).add(name)
    own = {name for names in aliases.values() for name in names}
    present = {name for names in aliases.values() if names & keys for name in names}
    missing = sorted(k for k in own - present if not k.startswith(fresh))
    extra = sorted(k for k in keys - own if not k.startswith(sum(HEAD_PREFIXES.values(), ())))
    if missing or extra:
        what = "; ".join(
            f"{label} {len(names)} weights ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
            for label, names in (("it lacks", missing), ("it has", extra))
            if names
        )
        raise ValueError(f"{weights.parent}: {what}: not a folder of this version's {type(model).__name__}")
    state = {k: v for k, v in load_file(str(weights)).items() if k in own and not k.startswith(fresh)}
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as err:
        raise ValueError(f"{weights.parent}: its weights do not fit its config: {err}") from None


def _refuse_missing_path(name: str | Path) -> None:
    """A name that is no local folder and can only be meant as a path (not a Hub repo id ``ORG/NAME``, or its first
    part a folder here) is refused as a missing folder, not sent to the Hub as a malformed repo id."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    path = Path(name).expanduser()
    if path.exists():
        raise FileNotFoundError(
            f"{name} is a file, not a model folder: give the folder that save_pretrained wrote (config.json, "
            "model.safetensors, answers.json, the tokenizer's files)"
        )
    try:
        validate_repo_id(str(name))
        local = len(path.parts) > 1 and Path(path.parts[0]).is_dir()
    except HFValidationError:
        local = True
    if local:
        raise FileNotFoundError(
            f"{name}: no such folder (a model folder written by save_pretrained, e.g. RUN/final or RUN/best; a Hub "
            "model is named ORG/NAME)"
        )


def _refuse_foreign_tokenizer(folder: Path, tokenizer: Any, config: AbsVLConfig) -> None:
    """A folder whose tokenizer files are missing (transformers then builds a near-empty tokenizer that encodes
    every question to its special tokens alone) or another model's answers wrongly without a word: refused."""
    problems = tokenizer_mismatches(tokenizer, config.text_config)
    if problems:
        present = sorted(p.name for p in folder.glob("*") if p.name.startswith(("tokenizer", "vocab", "merges", "spm")))
        raise ValueError(
            f"{folder}: its tokenizer does not match its text encoder: {'; '.join(problems)}. Its tokenizer files "
            f"({', '.join(present) or 'none here'}) are missing or another model's: copy those of the text encoder "
            f"it was trained with ({config.text_encoder}) into the folder (tokenizer.save_pretrained)"
        )


def _refuse_projected_prior(weights: Path, keys: set[str]) -> None:
    """Models saved before absvl 0.2 contrasted ξ with a learned projection of the image
    (``contrastive.proj``), a space the prior gate never reads; their ξ does not fit the gate, and
    their retrieval embeddings are another vector. They are refused rather than half-loaded."""
    if any(key.startswith(LEGACY_PRIOR_PROJECTION) for key in keys):
        raise ValueError(
            f"{weights.parent} was saved by absvl < 0.2, whose prior loss aligned ξ with a separate projection "
            f"({LEGACY_PRIOR_PROJECTION}*) instead of the tokens the prior gate reads (SPEC §2, prior loss): its "
            "top-down prior does not fit this version. Retrain it (absvl train vqa / retrieval), or load it with "
            "absvl 0.1.x"
        )


def _sorted_keys(tree: Any) -> Any:
    """``tree`` with every dict's keys in sorted order (config.json is written sorted)."""
    if isinstance(tree, dict):
        return {key: _sorted_keys(tree[key]) for key in sorted(tree)}
    return [_sorted_keys(item) for item in tree] if isinstance(tree, list) else tree
