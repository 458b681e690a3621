"""``tastelab ratings VOTES.csv --method elo|bt --out scores.json|.csv``: per-image scores from A/B votes."""

from __future__ import annotations

import argparse
import logging
import os

from rich.console import Console
from rich.markup import escape
from rich.table import Table

logger = logging.getLogger("tastelab")


def add_parser(sub: argparse._SubParsersAction) -> None:
    from tastelab.pairwise.defaults import DEFAULT_ALPHA, DEFAULT_K, DEFAULT_MIN_WEIGHT

    p = sub.add_parser("ratings", help="per-image scores (Elo or Bradley–Terry) from pairwise A/B votes")
    p.add_argument("votes", metavar="VOTES.csv", help="table image_a,image_b,votes_a,votes_b[,seconds]")
    p.add_argument("--method", choices=["elo", "bt"], default="bt",
                   help="bt: order-free maximum likelihood (default); elo: online, in file order")
    p.add_argument("--out", help="score file to write: .json (image_comparison layout) or .csv")
    p.add_argument("--image-root", help="folder the vote table's image names are relative to "
                   "(default: beside the table, or its images/ folder)")
    p.add_argument("--relative-to", help="write paths relative to this folder (default: relative to the image "
                   "folder when --out is in it, else absolute; either way `--set data.image_root=IMAGE_FOLDER` "
                   "and no image_root both find the images)")
    p.add_argument("--no-check-files", action="store_true", help="do not require the images to exist")
    p.add_argument("--k", type=float, default=DEFAULT_K, help="Elo step: the most one vote moves a score "
                   "(Elo units; default %(default)s)")
    p.add_argument("--passes", type=int, default=1, help="Elo: replay the votes this many times (default 1)")
    p.add_argument("--alpha", type=float, default=DEFAULT_ALPHA,
                   help="Bradley–Terry L2 penalty, keeps the fit finite (default %(default)s)")
    p.add_argument("--speed-weight", type=float, metavar="SECONDS", default=None,
                   help="weight votes by the table's seconds column: answers faster than SECONDS count fully, "
                   "slower ones SECONDS/t (at least --min-weight)")
    p.add_argument("--min-weight", type=float, default=DEFAULT_MIN_WEIGHT,
                   help="smallest speed weight (default %(default)s)")
    p.add_argument("--show", type=int, default=10, help="rows of the top and of the bottom to print")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tastelab.io.votes import load_votes
    from tastelab.pairwise.ratings import fit_ratings, write_score_file

    votes, problems = load_votes(args.votes, args.image_root, check_files=not args.no_check_files)
    dropped_rows = len({p.line if p.line is not None else -i for i, p in enumerate(problems)})
    if not votes:
        examples = "; ".join(str(p) for p in problems[:3])
        raise ValueError(f"{args.votes}: no usable votes ({dropped_rows} rows dropped"
                         f"{', e.g. ' + examples if examples else ''})")
    own = {"k": args.k, "passes": args.passes} if args.method == "elo" else {"alpha": args.alpha}
    ratings = fit_ratings(votes, args.method, speed_reference=args.speed_weight, min_weight=args.min_weight, **own)
    console = Console()
    ranked = ratings.ranked()
    try:
        root = os.path.commonpath([os.path.dirname(p) for p in ranked])
    except ValueError:
        root = ""

    def name(path: str) -> str:
        return escape(os.path.relpath(path, root) if root else path)

    table = Table(title=f"tastelab ratings ({ratings.method})")
    table.add_column("rank", justify="right")
    table.add_column("image", overflow="fold")
    table.add_column("score", justify="right")
    table.add_column("±", justify="right")
    table.add_column("votes", justify="right")
    table.add_column("won", justify="right")
    n_show = max(0, args.show)
    shown = list(range(len(ranked))) if len(ranked) <= 2 * n_show else [
        *range(n_show), -1, *range(len(ranked) - n_show, len(ranked))]
    for i in shown:
        if i < 0:
            table.add_row("…", "…", "", "", "", "")
            continue
        path = ranked[i]
        se = "-" if ratings.stderr is None else f"{ratings.stderr[path]:.2f}"
        table.add_row(str(i + 1), name(path), f"{ratings.scores[path]:+.3f}", se,
                      f"{ratings.counts[path]:g}", f"{ratings.wins[path]:g}")
    if n_show:
        console.print(table)
    console.print(
        f"{ratings.n_rows} vote rows ({ratings.n_votes:g} votes, {ratings.n_ties} ties) on {len(ranked)} images; "
        f"{dropped_rows} rows dropped; {ratings.components} connected group(s); the scores agree with "
        f"{ratings.agreement(votes):.1%} of the votes they were fitted on")
    if problems:
        console.print("  e.g. " + escape("; ".join(str(p) for p in problems[:3])))
    if args.out:
        relative_to, absolute = _path_layout(args)
        write_score_file(ratings, args.out, relative_to=relative_to, absolute=absolute,
                         metadata={"votes_file": os.path.abspath(args.votes)})
        layout = "absolute paths" if absolute else f"paths relative to {relative_to}"
        console.print(f"wrote {escape(args.out)} ({escape(layout)}); train on it with: tastelab train CONFIG "
                      f"--set data.path={escape(args.out)}"
                      + ("" if absolute else f" --set data.image_root={escape(str(relative_to))}"))
    return 0


def _path_layout(args: argparse.Namespace) -> tuple[str | None, bool]:
    """Where the score file's paths start: ``(folder, False)`` for relative paths, ``(None, True)`` for absolute.

    The trainer reads a score file's paths against ``data.image_root`` (the image folder, as the README says)
    or, without one, against the score file's folder. Relative paths satisfy both only when the file lies in
    the image folder itself; anywhere else absolute paths do. ``--relative-to`` overrides the choice.
    """
    from tastelab.io.votes import votes_image_root

    if args.relative_to:
        return args.relative_to, False
    image_root = os.path.realpath(votes_image_root(args.votes, args.image_root))
    out_dir = os.path.realpath(os.path.dirname(os.path.abspath(args.out)))
    return (out_dir, False) if out_dir == image_root else (None, True)
