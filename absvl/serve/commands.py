"""CLI: ``absvl serve`` — the HTTP service and its web page (FastAPI + uvicorn)."""
from __future__ import annotations

import argparse
from pathlib import Path

from .limits import Limits


def _cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from ..models.vl import AbsVLModel
    from .app import create_app

    if args.max_upload_mb <= 0:
        raise ValueError(f"--max-upload-mb must be positive, got {args.max_upload_mb}")
    limits = Limits(max_upload_bytes=int(args.max_upload_mb * 1024 * 1024), max_pixels=args.max_pixels)
    index = None
    if args.index:  # first: a wrong path fails before the (slower) model load
        from ..retrieval import ImageIndex

        index = ImageIndex.load(args.index)
    model = AbsVLModel.from_pretrained(args.model).to(args.device)
    app = create_app(model, index, limits, model_name=Path(args.model).name)
    search = f"{len(index)} indexed images" if index is not None else "no index: /search answers 503"
    print(f"absvl serve: model {Path(args.model).name} ({search}) on http://{args.host}:{args.port}/", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``serve`` on the top-level sub-parsers."""
    defaults = Limits()
    p = sub.add_parser("serve", help="HTTP service and web page: VQA with attention maps, text-to-image search")
    p.add_argument("--model", required=True, help="a save_pretrained folder")
    p.add_argument("--index", help="an image index folder (`absvl index build`); without it /search answers 503")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--max-upload-mb", type=float, default=defaults.max_upload_bytes / (1024 * 1024),
                   help="largest image upload in MB (default %(default)g)")
    p.add_argument("--max-pixels", type=int, default=defaults.max_pixels,
                   help="largest uploaded image in pixels, width x height (default %(default)d)")
    p.add_argument("--device", default="cpu", help="torch device for the model (default cpu)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    p.set_defaults(func=_cmd_serve)
