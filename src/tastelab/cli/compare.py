"""``tastelab compare RUN_A RUN_B ...``: LoRA vs full fine-tuning (size, trainable parameters, metric, time)."""

from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="compare training runs (LoRA vs full): size, trainable params, metric, time")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders (with summary.json)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    p.set_defaults(func=run)


def _mb(n: object) -> str:
    return f"{n / 1e6:.2f} MB" if isinstance(n, (int, float)) else "n/a"


def _num(v: object, fmt: str = "{:.4f}") -> str:
    return fmt.format(v) if isinstance(v, (int, float)) else "n/a"


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from tastelab.training.tasks.compare import compare_runs

    rows = compare_runs(args.runs)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    table = Table(show_header=True, header_style="bold")
    for col in ("run", "task", "mode", "size", "trainable", "share", "metric", "val", "test", "time"):
        table.add_column(col, justify="left" if col in ("run", "task", "mode", "metric") else "right")
    for r in rows:
        table.add_row(escape(r["run"]), str(r["task"]), str(r["mode"]), _mb(r["size_bytes"]),
                      _num(r["trainable_params"], "{:,}"), _num(r["trainable_share"], "{:.1%}"), str(r["metric"]),
                      _num(r["val"]), _num(r["test"]), _num(r["train_seconds"], "{:.0f} s"))
    console = Console()
    if not console.is_terminal:  # a pipe or a log: one row per run, never wrapped into a column of fragments
        console = Console(width=200)
    console.print(table)
    return 0
