"""CLI: ``absvl index build|add|rebuild|verify`` and ``absvl search``."""

from __future__ import annotations

import argparse
import json
import os
import sys

from ..runtime import is_main_process


def _load_model(source: str):
    from ..models.vl import load_model

    return load_model(source)


def _device(args: argparse.Namespace) -> str | None:
    """--device, else cuda when available, else None (the model stays on CPU).

    Under ``torchrun``/``accelerate launch`` (``WORLD_SIZE`` > 1) Accelerate forms the process group
    (gloo on CPU, NCCL on GPUs) and gives this process its device.
    """
    import torch

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import Accelerator

        from ..runtime import cpu_only

        return str(Accelerator(cpu=cpu_only()).device)
    return args.device or ("cuda" if torch.cuda.is_available() else None)


def _print_skipped(skipped: list[tuple[str, str]]) -> None:
    for path, reason in skipped:
        print(f"  skipped {path}: {reason}")


def _print_report(verb: str, report) -> None:
    print(
        f"{verb} {report.num_indexed} images into {report.out} ({len(report.skipped)} skipped, "
        f"factory {report.factory}, {report.index_size} in the index, {report.seconds:.1f} s, "
        f"{report.images_per_second:.1f} images/s)"
    )
    if report.num_embedded:
        print(
            f"  embedding: {report.num_embedded} images read and embedded in {report.embedding_seconds:.1f} s, "
            f"{report.embedding_images_per_second:.1f} images/s"
        )
    if report.recall_at_10 is not None:
        print(
            f"  recall@10 against exact search (up to 1,000 of the index's own vectors as queries): {report.recall_at_10:.4f}"
        )
    for note in report.notes:
        print(f"  note: {note}")
    _print_skipped(report.skipped)


def _cmd_index_build(args: argparse.Namespace) -> int:
    from .build import build_index

    report = build_index(
        _load_model(args.model),
        args.images,
        args.out,
        batch_size=args.batch_size,
        factory=args.factory,
        resume=not args.no_resume,
        num_workers=args.num_workers,
        device=_device(args),
        overwrite=args.overwrite,
        model_source=args.model,
        shard_size=args.shard_size,
    )
    if is_main_process():
        _print_report("indexed", report)
    return 0


def _cmd_index_add(args: argparse.Namespace) -> int:
    from .build import add_to_index
    from .index import ImageIndex

    model_source = args.model or ImageIndex.load(args.index).model_source()
    report = add_to_index(
        _load_model(model_source),
        args.images,
        args.index,
        batch_size=args.batch_size,
        resume=not args.no_resume,
        num_workers=args.num_workers,
        device=_device(args),
        shard_size=args.shard_size,
    )
    if is_main_process():
        _print_report("added", report)
    return 0


def _cmd_index_rebuild(args: argparse.Namespace) -> int:
    from .build import rebuild_index

    report = rebuild_index(args.index, args.factory)
    print(
        f"rebuilt {report.out} as {report.factory} from its stored embeddings ({report.index_size} vectors, "
        f"{report.seconds:.1f} s); recall@10 against exact search: {report.recall_at_10:.4f}"
    )
    for note in report.notes:
        print(f"  note: {note}")
    return 0


VERIFY_DAMAGED, VERIFY_UNRECORDED = 1, 3  # exit codes of `absvl index verify` (0: verified; 2: not an index)


def _cmd_index_verify(args: argparse.Namespace) -> int:
    from .integrity import verify_index

    report = verify_index(args.index)
    for check in report.files:
        print(f"  {check.status:<10s} {check.name:<15s} {check.detail}")
    if report.problem:
        print(f"absvl: index {report.folder} is damaged: {report.problem}\n  fix: {report.fix}", file=sys.stderr)
        return VERIFY_DAMAGED
    if not report.recorded:
        print(
            f"index {report.folder} reads, and its files' sizes and headers are consistent, but it was not "
            f"verified: {report.fix}"
        )
        return VERIFY_UNRECORDED
    print(f"index {report.folder} verified: {len(report.files)} files match the sizes and sha256 in meta.json")
    return 0


def format_hits(hits) -> str:
    """A ranked table: rank, score, rerank score, path."""
    lines = [f"{'rank':>4s}  {'score':>7s}  {'rerank':>7s}  path"]
    for hit in hits:
        rerank = f"{hit.rerank_score:7.4f}" if hit.rerank_score is not None else f"{'-':>7s}"
        lines.append(f"{hit.rank:4d}  {hit.score:7.4f}  {rerank}  {hit.path}")
    return "\n".join(lines)


def _cmd_search(args: argparse.Namespace) -> int:
    from .faiss_backend import gpu_available
    from .index import ImageIndex
    from .search import Retriever

    index = ImageIndex.load(args.index, gpu=gpu_available())
    overrides = {k: v for k, v in (("nprobe", args.nprobe), ("efSearch", args.ef_search)) if v is not None}
    if overrides:
        index.set_search_params(**overrides)
    model_source = args.model or index.model_source()
    retriever = Retriever(_load_model(model_source), index, device=_device(args))
    hits = retriever.search(args.query, k=args.k, rerank=args.rerank)
    if args.json:
        print(
            json.dumps(
                {
                    "query": args.query,
                    "k": args.k,
                    "rerank": args.rerank,
                    "dropped": retriever.num_dropped,
                    "hits": [h.to_dict() for h in hits],
                },
                indent=2,
            )
        )
        return 0
    print(format_hits(hits))
    if retriever.num_dropped:
        print(f"({retriever.num_dropped} unreadable candidate(s) dropped from re-ranking)")
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not >= 1")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is not >= 0")
    return value


def _add_embedding_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", required=True, help="folder of images (recursive) or a text file with one path per line")
    p.add_argument("--batch-size", type=_positive, default=64, help="images per forward pass (default 64)")
    p.add_argument("--num-workers", type=_non_negative, default=0, help="image-decoding processes (default 0)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument(
        "--no-resume", action="store_true", help="discard an interrupted build's shards instead of continuing"
    )
    p.add_argument(
        "--shard-size",
        type=_positive,
        default=4096,
        help="images per embedding shard: the unit of resumption and of multi-process work (default 4096)",
    )


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register the retrieval commands on the top-level sub-parsers."""
    index = sub.add_parser("index", help="FAISS image index for text → image search").add_subparsers(
        dest="task", metavar="TASK", required=True
    )
    p = index.add_parser("build", help="embed an image collection and write an index folder")
    p.add_argument("--model", required=True, help="a save_pretrained folder (or hub name)")
    p.add_argument("--out", required=True, help="index folder to write")
    p.add_argument("--factory", help="FAISS factory string, e.g. Flat, HNSW32, IVF4096,Flat (default: by size)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out index")
    _add_embedding_args(p)
    p.set_defaults(func=_cmd_index_build)
    p = index.add_parser("add", help="append new images to an index")
    p.add_argument("--index", required=True, help="index folder written by `absvl index build`")
    p.add_argument("--model", help="the model that built the index (default: the one recorded in it)")
    _add_embedding_args(p)
    p.set_defaults(func=_cmd_index_add)
    p = index.add_parser("rebuild", help="new FAISS factory from the index's stored embeddings (no re-embedding)")
    p.add_argument("--index", required=True, help="index folder written by `absvl index build`")
    p.add_argument("--factory", help="FAISS factory string, e.g. Flat, HNSW32, IVF4096,Flat (default: by size)")
    p.set_defaults(func=_cmd_index_rebuild)
    p = index.add_parser(
        "verify",
        help="check every file of an index against the sizes and sha256 checksums in its meta.json",
        description="Read every file of the index whole and compare it with the size and sha256 recorded in "
        "meta.json at its last build/add/rebuild, then load it as a search would. Exit status: 0 verified; "
        f"{VERIFY_DAMAGED} a file is damaged or missing (the message names it and the fix); {VERIFY_UNRECORDED} "
        "the index was written before absvl recorded checksums (it loads, but cannot be verified: "
        "`absvl index rebuild` records them); 2 not an index folder.",
    )
    p.add_argument("--index", required=True, help="index folder written by `absvl index build`")
    p.set_defaults(func=_cmd_index_verify)

    p = sub.add_parser("search", help="search an image index with a text query")
    p.add_argument("query", help="the text query")
    p.add_argument("--index", required=True, help="index folder written by `absvl index build`")
    p.add_argument("--model", help="the model that built the index (default: the one recorded in it)")
    p.add_argument(
        "-k", "--k", type=_positive, default=10, help="number of results (default 10; at most the index's size)"
    )
    p.add_argument(
        "--rerank",
        type=_non_negative,
        default=0,
        metavar="K",
        help="re-rank the top K candidates with the query steering the vision encoder (default 0: off)",
    )
    p.add_argument(
        "--nprobe",
        type=_positive,
        help="IVF lists visited per query (default: the index's; more = slower, higher recall)",
    )
    p.add_argument("--ef-search", type=_positive, help="HNSW search breadth (default: the index's)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--json", action="store_true", help="print the hits as JSON")
    p.set_defaults(func=_cmd_search)
