"""The ``absvl`` command line."""
from __future__ import annotations

import argparse
import sys

from . import __version__


def _cmd_backbones(args: argparse.Namespace) -> int:
    from .models.vision import backbone_family, count_params, create_backbone, estimate_macs, list_backbones

    names = list_backbones(args.family)
    if not names:
        print(f"no backbone in family {args.family!r}", file=sys.stderr)
        return 2
    header = f"{'name':36s} {'family':8s} {'params (M)':>10s}"
    header += f" {'GMACs@' + str(args.img_size):>11s}" if not args.no_macs else ""
    print(header)
    for name in names:
        if args.no_macs:
            row = f"{name:36s} {backbone_family(name):8s} {count_params(create_backbone(name)) / 1e6:10.2f}"
        else:
            params, macs = estimate_macs(name, img_size=args.img_size)
            row = f"{name:36s} {backbone_family(name):8s} {params / 1e6:10.2f} {macs / 1e9:11.2f}"
        print(row)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run

    run(args.out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="absvl", description="Top-down vision-language models (AbSViT, VARS, TDAM).")
    parser.add_argument("--version", action="version", version=f"absvl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("backbones", help="list registered vision backbones with parameters and MACs")
    p.add_argument("--family", help="only this family (vit, absvit, vars, tdam, resnet)")
    p.add_argument("--img-size", type=int, default=224, help="input size for the MACs estimate (default 224)")
    p.add_argument("--no-macs", action="store_true", help="skip the MACs estimate")
    p.set_defaults(func=_cmd_backbones)

    p = sub.add_parser("demo", help="run the offline CPU demo on generated data")
    p.add_argument("--out", default="outputs/demo", help="folder for the demo's files (default outputs/demo)")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
