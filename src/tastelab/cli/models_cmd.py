"""``tastelab models``: list the named presets."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list named model presets")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tastelab.models.presets import DEFAULT_PRESET, list_models

    table = Table(title="tastelab model presets")
    table.add_column("name")
    table.add_column("description")
    for name, desc in list_models().items():
        table.add_row(name + (" (default)" if name == DEFAULT_PRESET else ""), desc)
    Console().print(table)
    return 0
