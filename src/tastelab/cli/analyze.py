"""``tastelab analyze --truth FILE --pred FILE``: how well two sets of per-image scores agree.

Labels vs a model's ``tastelab score --out`` file, two labellers, two models (it is symmetric), or a
model against A/B votes (``--truth votes.csv``). The logic lives in :mod:`tastelab.evaluation.analysis`.
"""

from __future__ import annotations

import argparse
import logging
import math

from rich.console import Console
from rich.markup import escape
from rich.table import Table

logger = logging.getLogger("tastelab")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("analyze", help="compare scores with labels (or two score files): SRCC, PLCC, A/B agreement")
    p.add_argument("--truth", required=True, metavar="FILE",
                   help="label or score file: personal JSON/CSV, MOS table, AVA.txt, a `score --out` file, "
                   "or an A/B vote table")
    p.add_argument("--pred", required=True, metavar="FILE",
                   help="a `tastelab score --out` file (.jsonl/.csv/.parquet; raw_score when every row has it, "
                   "else score, one column for the whole file) or any "
                   "score file --truth accepts")
    p.add_argument("--split", help="only these splits (comma-separated: test, val,test); needs a split column "
                   "or --split-file (with votes as --truth: a pairs run's split.json)")
    p.add_argument("--split-file", metavar="SPLIT.json",
                   help="take splits from a run's split.json instead of the files' own split column (votes as "
                   "--truth: a pairs run's split.json, whose held-out pairs --split selects)")
    p.add_argument("--filter", metavar="REGEX", help="only images whose path contains a match of REGEX")
    p.add_argument("--threshold", type=float,
                   help="threshold agreement at this value on both sides (same scale only); "
                   "default: each side at its own median")
    p.add_argument("--errors-out", metavar="FILE.csv",
                   help="per-image CSV sorted by absolute rank disagreement, largest first")
    p.add_argument("--json", metavar="FILE", help="write the report as JSON")
    p.add_argument("--show", type=int, default=5, help="largest disagreements to print (default %(default)s)")
    p.set_defaults(func=run)


def _f(value: float | None, digits: int = 3) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _p(value: float) -> str:
    return "-" if not math.isfinite(value) else f"{value:.1e}" if value < 1e-3 else f"{value:.3f}"


def run(args: argparse.Namespace) -> int:
    from tastelab.evaluation.analysis import detect_kind

    if detect_kind(args.truth) == "votes":
        return _run_votes(args)
    return _run_scores(args)


def _run_scores(args: argparse.Namespace) -> int:
    from tastelab.evaluation.analysis import analyze, write_errors, write_json

    result = analyze(args.truth, args.pred, split=args.split, split_file=args.split_file, filter=args.filter,
                     threshold=args.threshold)
    console = Console()
    table = Table(title=f"tastelab analyze: {escape(args.pred)} vs {escape(args.truth)}")
    for name, justify in (("split", "left"), ("n", "right"), ("truth mean ± std", "right"),
                          ("pred mean ± std", "right"), ("SRCC", "right"), ("p(SRCC)", "right"), ("PLCC", "right"),
                          ("p(PLCC)", "right"), ("A/B agree", "right"), ("thr agree", "right")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for g in result.groups:
        table.add_row(escape(g.name), str(g.n), f"{_f(g.truth_mean)} ± {_f(g.truth_std)}",
                      f"{_f(g.pred_mean)} ± {_f(g.pred_std)}", _f(g.srcc), _p(g.srcc_p), _f(g.plcc), _p(g.plcc_p),
                      _f(g.pair_acc), _f(g.thr_acc))
    console.print(table)
    t, p = result.truth, result.pred
    def kind(d: dict) -> str:
        return f"{d['kind']}, column {d['column']}" if d.get("column") else d["kind"]

    line = (f"matched {result.matched} images; truth {t['images']} ({kind(t)}), {result.unmatched_truth} without "
            f"a prediction; pred {p['images']} ({kind(p)}), {result.unmatched_pred} without a truth")
    if result.filtered_out:
        line += f"; {result.filtered_out} left out by --filter"
    if result.excluded_by_split:
        line += f"; {result.excluded_by_split} in other splits"
    console.print(line)
    for side, examples in (("truth", result.unmatched_truth_examples), ("pred", result.unmatched_pred_examples)):
        if examples:
            console.print(f"  unmatched {side}, e.g.: {escape(', '.join(examples))}")
    dropped = [f"{d['file']}: {d['errors']} rows without a score" for d in (t, p) if d["errors"]]
    dropped += [f"{d['file']}: {d['duplicates']} duplicate paths" for d in (t, p) if d["duplicates"]]
    for note in dropped:
        console.print(f"  {escape(note)}")
    if args.show > 0 and result.rows:
        worst = Table(title="largest rank disagreements (rank 1 = best)")
        for name in ("image", "split", "truth", "pred", "truth rank", "pred rank"):
            worst.add_column(name, justify="left" if name in ("image", "split") else "right", overflow="fold")
        for r in result.rows[: args.show]:
            worst.add_row(escape(r.key), escape(r.split or "-"), f"{r.truth:.4g}", f"{r.pred:.4g}",
                          f"{r.truth_rank:g}", f"{r.pred_rank:g}")
        console.print(worst)
    if args.errors_out:
        write_errors(args.errors_out, result)
        console.print(f"wrote {escape(args.errors_out)} ({len(result.rows)} rows)")
    if args.json:
        write_json(args.json, result.to_dict())
        console.print(f"wrote {escape(args.json)}")
    if result.matched == 0:
        logger.error("no image matched between %s and %s", args.truth, args.pred)
        return 1
    return 0


def _run_votes(args: argparse.Namespace) -> int:
    from tastelab.evaluation.analysis import analyze_votes, write_json

    if args.errors_out or args.threshold is not None:
        logger.warning("--threshold and --errors-out apply to score files, not to votes; ignored")
    result = analyze_votes(args.truth, args.pred, filter=args.filter, split=args.split, split_file=args.split_file)
    console = Console()
    split = f" (split {escape(args.split)}{_vote_split_kind(args.split, result.truth.get('pair_split'))})" \
        if args.split else ""
    console.print(
        f"A/B votes {escape(args.truth)}{split} vs "
        f"{escape(args.pred)}: {result.used_rows} of {result.rows} vote rows "
        f"usable ({result.ties} ties, skipped by the metric); agreement {_f(result.pair_acc)} of votes, "
        f"{_f(result.pair_acc_unweighted)} of pairs; {result.unmatched_images} of {result.images} voted images "
        f"without a prediction")
    if result.unmatched_examples:
        console.print(f"  unmatched, e.g.: {escape(', '.join(result.unmatched_examples))}")
    if args.json:
        write_json(args.json, result.to_dict())
        console.print(f"wrote {escape(args.json)}")
    if result.used_rows == 0:
        logger.error("no vote row has predictions for both images")
        return 1
    return 0


def _vote_split_kind(split: str, pair_split: str | None) -> str:
    """What the held-out votes of a pairs run's split measure, so an accuracy is never read as the other kind."""
    from tastelab.io.records import SPLIT_ALIASES

    names = {SPLIT_ALIASES.get(s.strip().lower(), s.strip().lower()) for s in split.split(",") if s.strip()}
    if pair_split == "pair":
        return "; per-pair split: held-out pairs, mostly among images seen in training"
    if pair_split == "image" and names <= {"test_seen"}:
        return "; image split: new pairs among seen (training) images"
    if pair_split == "image" and "train" not in names and "test_seen" not in names:
        return "; image split: votes touching unseen images"
    return "; image split" if pair_split == "image" else ""

