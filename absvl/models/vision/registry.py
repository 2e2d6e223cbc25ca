"""The backbone registry: every model name with its constructor and default config (timm's ``_registry``).

Building one (``create_backbone``) is :mod:`.builder`'s job.
"""

from __future__ import annotations

import difflib
import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

Constructor = Callable[..., nn.Module]


@dataclass(frozen=True)
class BackboneDefaults:
    """A registered backbone's default config.

    ``family`` groups the architectures (``vit``, ``absvit``, ``vars``, ``resnet``, ``tdam``);
    ``pretrained`` is the timm model ``arch.tag`` whose ImageNet weights ``pretrained=True`` loads
    (the matching plain architecture, see docs/backbones.md), None where there is none. ``test_size``:
    a tiny model for tests and the offline demo, meant to train from random weights.
    """

    family: str
    pretrained: str | None = None
    test_size: bool = False


_CONSTRUCTORS: dict[str, Constructor] = {}
_DEFAULTS: dict[str, BackboneDefaults] = {}


def register_backbone(
    family: str, pretrained: str | None = None, test_size: bool = False
) -> Callable[[Constructor], Constructor]:
    """Register a backbone constructor under its function name with its default config. The constructor's
    return annotation names the model class, whose ``__init__`` declares the options (:func:`backbone_options`)."""

    def wrap(fn: Constructor) -> Constructor:
        if fn.__name__ in _CONSTRUCTORS:
            raise ValueError(f"backbone {fn.__name__!r} is registered twice")
        _CONSTRUCTORS[fn.__name__] = fn
        _DEFAULTS[fn.__name__] = BackboneDefaults(family, pretrained, test_size)
        return fn

    return wrap


def list_backbones(family: str | None = None) -> list[str]:
    """Names of the registered backbones, sorted; optionally only those of one family."""
    return sorted(n for n in _CONSTRUCTORS if family is None or _DEFAULTS[n].family == family)


def check_name(name: str) -> None:
    """Raise ``ValueError`` (with close matches) for a name that is not registered."""
    if name not in _CONSTRUCTORS:
        close = difflib.get_close_matches(name, _CONSTRUCTORS, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else " Run `absvl backbones` to list them."
        raise ValueError(f"unknown backbone {name!r}.{hint}")


def backbone_defaults(name: str) -> BackboneDefaults:
    check_name(name)
    return _DEFAULTS[name]


def backbone_family(name: str) -> str:
    return backbone_defaults(name).family


def backbone_options(name: str) -> set[str]:
    """The keyword options the backbone's model class declares in its ``__init__`` (e.g. ``alpha``, the
    top-down modulation scale of the ViT family)."""
    model_class = typing.get_type_hints(backbone_constructor(name))["return"]
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {p.name for p in inspect.signature(model_class).parameters.values() if p.kind in named}


def backbone_constructor(name: str) -> Constructor:
    check_name(name)
    return _CONSTRUCTORS[name]
