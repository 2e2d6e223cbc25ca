"""CLI: ``absvl serve`` — the HTTP service and its web page (FastAPI + uvicorn)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .limits import Limits


def _cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from ..models.vl import load_model
    from .app import create_app
    from .connections import uvicorn_options
    from .hardening import LOCAL_HOSTS

    if args.max_upload_mb <= 0:
        raise ValueError(f"--max-upload-mb must be positive, got {args.max_upload_mb}")
    if args.retrieval_model and not args.index:
        raise ValueError("--retrieval-model serves /search over the index it built: give that index with --index")
    limits = Limits(
        max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
        max_pixels=args.max_pixels,
        max_pending=args.max_pending,
        request_timeout_s=args.request_timeout,
        header_timeout_s=args.header_timeout,
        body_timeout_s=args.body_timeout,
        max_connections=args.max_connections,
    )
    index = source = None
    if args.index:  # first: a wrong path or an impossible --index-device fails before the (slower) model load
        from ..retrieval import ImageIndex
        from ..retrieval.identity import resolve_model_source

        index = ImageIndex.load(args.index)
        try:
            index.to(args.index_device)
        except RuntimeError as err:
            raise ValueError(f"--index-device {args.index_device}: {err}; use --index-device auto or cpu") from None
        source = resolve_model_source(args.retrieval_model) if args.retrieval_model else _index_model(index)
        if source in (None, resolve_model_source(args.model)):
            source = None  # --model searches too
    model = load_model(args.model).to(args.device)
    retrieval_model = load_model(source).to(args.device) if source else None
    name = _model_name(args.model)
    app = create_app(
        model,
        index,
        limits,
        model_name=name,
        allowed_hosts=(*LOCAL_HOSTS, args.host, *args.allowed_host),
        retrieval_model=retrieval_model,
        retrieval_model_name=_model_name(source) if source else None,
    )
    service = app.state.service
    print(f"absvl serve on http://{args.host}:{args.port}/", flush=True)
    print(f"  /vqa: model {name}" if service.vqa else f"  {service.unavailable['vqa']}")
    print(
        f"  /search: model {_model_name(source or args.model)}, {len(index)} indexed images (FAISS on {index.device})"
        if index is not None
        else f"  {service.unavailable['search']}",
        flush=True,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, **uvicorn_options(limits))
    return 0


def _model_name(source: str) -> str:
    """A model's name shown by /health: its folder's last two parts (``shapes_retrieval/final``) or its Hub id,
    never the server's full path."""
    path = Path(source).absolute() if Path(source).exists() else Path(source)
    return "/".join(path.parts[-2:]).lstrip("/")


def _index_model(index) -> str | None:
    """The model the index records, when it still exists (else --model must be the one that built it)."""
    try:
        return index.model_source()
    except (ValueError, FileNotFoundError):
        return None


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``serve`` on the top-level sub-parsers."""
    defaults = Limits()
    p = sub.add_parser("serve", help="HTTP service and web page: VQA with attention maps, text-to-image search")
    p.add_argument(
        "--model",
        required=True,
        help="a save_pretrained folder or Hub id answering /vqa (and searching --index if it built it)",
    )
    p.add_argument("--index", help="an image index folder (`absvl index build`); without it /search answers 503")
    p.add_argument(
        "--retrieval-model",
        metavar="MODEL",
        help="the model that built --index, searching it beside --model (default: the model the index "
        "records, else --model)",
    )
    p.add_argument(
        "--index-device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="where FAISS holds and searches the index: cuda needs a FAISS GPU build (absvl[gpu]) and a "
        "CUDA device; auto (default) takes the GPU when there is one",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="also serve requests whose Host header is NAME, e.g. the server's public name; repeatable; "
        "'*': any (localhost, 127.0.0.1, ::1 and --host are always served; others get 400, "
        "against DNS rebinding)",
    )
    p.add_argument(
        "--max-upload-mb",
        type=float,
        default=defaults.max_upload_bytes / (1024 * 1024),
        help="largest image upload in MB (default %(default)g)",
    )
    p.add_argument(
        "--max-pixels",
        type=int,
        default=defaults.max_pixels,
        help="largest uploaded image in pixels, width x height (default %(default)d)",
    )
    p.add_argument(
        "--max-pending",
        type=int,
        default=defaults.max_pending,
        help="requests queued for the model before /vqa and /search answer 503 (default %(default)d)",
    )
    p.add_argument(
        "--request-timeout",
        type=int,
        default=defaults.request_timeout_s,
        metavar="SECONDS",
        help="a request waiting for and using the model longer gets 504; counted once its body is in "
        "(default %(default)d)",
    )
    p.add_argument(
        "--header-timeout",
        type=int,
        default=defaults.header_timeout_s,
        metavar="SECONDS",
        help="a client sends a request's headers within this many seconds of connecting (or of the previous "
        "response), else 408 and the connection is closed (default %(default)d)",
    )
    p.add_argument(
        "--body-timeout",
        type=int,
        default=defaults.body_timeout_s,
        metavar="SECONDS",
        help="a client sends a request's whole body within this many seconds of its headers, else 408 and the "
        "connection is closed (default %(default)d)",
    )
    p.add_argument(
        "--max-connections",
        type=int,
        default=defaults.max_connections,
        metavar="N",
        help="open connections; one more is answered 503 and closed at once (default %(default)d)",
    )
    p.add_argument("--device", default="cpu", help="torch device for the model (default cpu)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    p.set_defaults(func=_cmd_serve)
