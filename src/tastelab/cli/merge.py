"""``tastelab merge OUT PART...``: join shard / rank outputs into one, one record per path."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.markup import escape


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge", help="join score outputs (shards, ranks; .jsonl/.csv/.parquet) into one file")
    p.add_argument("out", metavar="OUT", help="merged output (.jsonl, .csv or .parquet), written atomically")
    p.add_argument("parts", nargs="+", metavar="PART", help="score outputs or glob patterns ('scores.rank*.jsonl')")
    p.add_argument("--allow-mixed-models", action="store_true",
                   help="merge parts made by different models (refused by default: rows record their model)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tastelab.inference.sharding import expand_parts, merge_results
    from tastelab.io.writers import check_output

    check_output(args.out)
    parts = expand_parts(args.parts)
    counts = merge_results(args.out, parts, allow_mixed_models=args.allow_mixed_models)
    console = Console()
    line = (f"merged {counts.parts} parts ({counts.rows} records) into {escape(args.out)}: {counts.paths} paths, "
            f"{counts.scored} scored, {counts.errors} errors; {counts.duplicates} duplicates dropped")
    if counts.recovered:
        line += f" ({counts.recovered} errors replaced by a successful record)"
    if counts.no_path:
        line += f"; {counts.no_path} records without a path dropped"
    console.print(line)
    return 0
