"""CLI: ``absvl serve`` (being written)."""
import argparse


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``serve`` on the top-level sub-parsers."""
