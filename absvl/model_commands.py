"""CLI: ``absvl convert``, ``export``, ``push`` and ``attend``: model folders in and out."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _cmd_attend(args: argparse.Namespace) -> int:
    from .models.vl import load_model
    from .visualize import attention_figure

    model = load_model(args.model)
    _, maps = attention_figure(model, args.image, args.text, args.out, size=args.size)
    answers = f"; answers: {', '.join(maps['answers'])}" if maps["answers"] else ""
    print(
        f"wrote {args.out}: {args.image}, its bottom-up map and the top-down map for {len(args.text)} text(s){answers}"
    )
    return 0


def _network_errors() -> tuple[type[BaseException], ...]:
    """What a request that never reached the Hub raises: the HTTP client's transport error (connect, DNS, proxy,
    TLS, timeout; ``httpx`` under huggingface_hub 1.x, ``httpx2`` under 2.x), a ``ConnectionError`` (offline
    mode) or a socket's."""
    import importlib
    import socket

    found: list[type[BaseException]] = [ConnectionError, TimeoutError, socket.gaierror]
    for client in ("httpx", "httpx2"):
        try:
            found.append(importlib.import_module(client).TransportError)
        except (ImportError, AttributeError):
            pass
    return tuple(found)


def _push_folder(folder: Path) -> Path:
    """The model folder ``absvl push`` uploads: ``folder`` itself, or a training run's ``final/``."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder (give a run folder or a save_pretrained folder)")
    if (folder / "config.json").is_file():
        return folder
    if (folder / "final" / "config.json").is_file():
        print(f"{folder} is a training run: pushing its final export, {folder / 'final'}")
        return folder / "final"
    if (folder / "config.yaml").is_file() or any(folder.glob("checkpoint-*")):  # a run that has not finished
        hint = ""
        if not (folder / "best" / "config.json").is_file():
            from .training.checkpoint import list_checkpoints

            checkpoints = list_checkpoints(folder)
            latest = checkpoints[-1] if checkpoints else folder / "checkpoint-<step>"
            hint = f" (it has no best/ either: `absvl export {latest} --out DIR`, then push DIR)"
        raise FileNotFoundError(f"no final/ in {folder}: pass {folder / 'final'} or {folder / 'best'}{hint}")
    return folder  # from_pretrained says what is missing


def _cmd_push(args: argparse.Namespace) -> int:
    from huggingface_hub import constants, get_token
    from huggingface_hub.errors import HfHubHTTPError

    from .models.vl import load_model

    folder = _push_folder(Path(args.folder))
    model = load_model(folder)  # first: a folder that would not load (or answer wrongly) is refused
    if get_token() is None:
        raise ValueError("no Hugging Face token: set HF_TOKEN or run `hf auth login`")
    try:
        commit = model.push_to_hub(args.repo_id, private=args.private, branch=args.revision)
    except HfHubHTTPError as err:
        print(f"absvl: error: pushing to {args.repo_id} failed: {err}", file=sys.stderr)
        return 1
    except _network_errors() as err:  # no network, DNS, proxy, timeout: one line, not the client's traceback
        if os.environ.get("ABSVL_DEBUG"):
            raise
        print(
            f"absvl: error: cannot reach the Hugging Face Hub at {constants.ENDPOINT} to push to {args.repo_id} "
            f"({type(err).__name__}: {err}): check the network connection (or HF_ENDPOINT, a proxy) and push again",
            file=sys.stderr,
        )
        return 1
    print(
        f"pushed {folder} to {args.repo_id}{f' (branch {args.revision})' if args.revision else ''}: {commit.commit_url}"
    )
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from .convert import convert_checkpoint, load_backbone

    out = convert_checkpoint(args.checkpoint, args.arch, args.out, overwrite=args.overwrite)
    model = load_backbone(out)  # proves the folder loads back
    extra = {k: v for k, v in model.backbone_config.items() if k != "name"}
    print(
        f"converted {args.checkpoint} -> {out} ({args.arch}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
        f"parameters, options {extra}); load it with create_backbone({args.arch!r}, pretrained_path={str(out)!r})"
    )
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from .training.export import export_run_checkpoint

    task = export_run_checkpoint(args.checkpoint, args.out, overwrite=args.overwrite)
    load = (
        f"absvl eval classify --model {args.out}" if task == "classify" else f"AbsVLModel.from_pretrained({args.out!r})"
    )
    print(f"exported {args.checkpoint} ({task}) to {args.out}; load it with {load}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """``absvl convert``, ``export``, ``push``, ``attend``: model folders in and out."""
    p = sub.add_parser("convert", help="convert the authors' AbSViT / TDAM checkpoints to absvl backbone folders")
    p.add_argument(
        "checkpoint", help="the authors' checkpoint (.pth/.pt/.bin/.safetensors; read with weights_only=True)"
    )
    p.add_argument("--arch", required=True, help="backbone it holds, e.g. absvit_base_patch16_224 or tdam_resnet50")
    p.add_argument("--out", required=True, help="folder to write (model.safetensors + config.json)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("export", help="turn a training checkpoint into a from_pretrained folder")
    p.add_argument("checkpoint", help="a checkpoint folder of a run, e.g. RUN/checkpoint-00000500")
    p.add_argument(
        "--out", required=True, help="folder to write (VQA/retrieval: save_pretrained; classify: backbone folder)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("push", help="upload a model folder (or a run's final export) to the Hugging Face Hub")
    p.add_argument("folder", metavar="RUN_OR_MODEL_DIR", help="a save_pretrained folder, or a run folder (its final/)")
    p.add_argument("--repo-id", required=True, help="ORG/NAME on the Hub (created when missing)")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument("--revision", help="branch to commit to (created from main when missing; default main)")
    p.set_defaults(func=_cmd_push)

    p = sub.add_parser("attend", help="PNG of an image, its bottom-up and its text-steered top-down attention map")
    p.add_argument("image", help="image file")
    p.add_argument(
        "--text", required=True, action="append", help="question or query steering the top-down pass (repeatable)"
    )
    p.add_argument("--model", required=True, help="a save_pretrained folder or Hub id")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--size", type=int, default=224, help="panel side in pixels (default 224)")
    p.set_defaults(func=_cmd_attend, overrides=[])
