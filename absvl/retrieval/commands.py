"""CLI: ``absvl index build|add`` and ``absvl search`` (being written)."""
import argparse


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register the retrieval commands on the top-level sub-parsers."""
