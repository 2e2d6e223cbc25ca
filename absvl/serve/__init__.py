"""The HTTP service (``absvl serve``): VQA with attention maps, text-to-image search, a web page.

``create_app(model, index=None, limits=Limits())`` builds the FastAPI application; it is imported
lazily so that ``import absvl.serve`` (and the CLI) stays light.
"""

from __future__ import annotations

from typing import Any

from .limits import Limits

__all__ = ["Limits", "create_app"]


def create_app(*args: Any, **kwargs: Any):
    """See :func:`absvl.serve.app.create_app`."""
    from .app import create_app as _create_app

    return _create_app(*args, **kwargs)
