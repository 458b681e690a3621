"""``tastelab score``: score files, folders, globs or path lists; print a table; write resumable output.

At scale: ``--shard K/N`` scores one deterministic part of the inputs (N independent processes or
machines cover everything once; ``tastelab merge`` joins their outputs), a multi-process launch
(``accelerate launch``, ``torchrun``) shards by rank on its own, and ``--backend onnx`` runs an
exported folder with ONNX Runtime. On a CPU the default (``auto``) scores a PyTorch folder through its
ONNX export, made once and cached (``--backend torch`` or ``TASTELAB_AUTO_ONNX=0`` turn that off).
"""

from __future__ import annotations

import argparse
import logging
import statistics

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from tastelab.cli.options import add_load_flags, load_flags

logger = logging.getLogger("tastelab")


def add_parser(sub: argparse._SubParsersAction) -> None:
    from tastelab.inference import BACKENDS
    from tastelab.io.records import DEFAULT_PATH_COLUMN
    from tastelab.io.urls import DEFAULT_URL_TIMEOUT

    p = sub.add_parser("score", help="score images (files, folders, globs, .txt / .parquet path lists, URLs)")
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.add_argument("--model", default="default", help="model folder or preset name (default: %(default)s)")
    p.add_argument("--backend", default="auto", choices=BACKENDS,
                   help="torch, onnx (a folder from `tastelab export`), or auto: ONNX Runtime for an exported "
                   "folder, and on a CPU also for a PyTorch folder via its cached ONNX export (made once, "
                   "checked against PyTorch; TASTELAB_AUTO_ONNX=0 turns that off), else PyTorch")
    p.add_argument("-r", "--recursive", action="store_true", help="descend into sub-folders")
    p.add_argument("--out", help="write one record per image to .jsonl, .csv or .parquet (resumable)")
    p.add_argument("--no-resume", action="store_true", help="overwrite --out instead of resuming it")
    p.add_argument("--allow-mixed-models", action="store_true",
                   help="resume an --out written by another model (refused by default: rows record their model)")
    p.add_argument("--show-distribution", action="store_true", help="show the 10-bin distribution")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per forward pass (default: about 0.4 MP per batch on CPU, 64 on GPUs)")
    p.add_argument("--workers", type=int, default=None, help="decode worker processes (default: cores-1)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--compile", action="store_true", help="torch.compile the model (long runs on GPUs)")
    p.add_argument("--decode", default="cpu", choices=["cpu", "device"],
                   help="where JPEGs are decoded and resized: cpu (Pillow in workers, draft mode) or device "
                        "(batched nvJPEG + resize on the GPU; other formats still use Pillow)")
    p.add_argument("--max-rows", type=int, default=50, help="rows shown in the terminal table")
    p.add_argument("--shard", metavar="K/N",
                   help="score only shard K of N (0-based; by a stable hash of each path); give each shard its "
                   "own --out and join them with `tastelab merge`")
    p.add_argument("--path-column", default=DEFAULT_PATH_COLUMN,
                   help="column holding the paths in .parquet path lists (default: %(default)s)")
    p.add_argument("--allow-urls", action="store_true",
                   help="fetch http(s):// and file:// inputs (off by default: they become error rows)")
    p.add_argument("--url-timeout", type=float, default=DEFAULT_URL_TIMEOUT,
                   help="seconds a URL fetch may stall (default: %(default)s)")
    add_load_flags(p)
    p.set_defaults(func=run)


def _fmt(v: float | None, nd: int = 2) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def run(args: argparse.Namespace) -> int:
    from tastelab.inference.scoring import Scorer, ScoreResult, score_paths_to_file
    from tastelab.inference.sharding import plan_shard
    from tastelab.io.records import expand_inputs
    from tastelab.io.rows import clean_text
    from tastelab.io.writers import check_output

    if args.out:  # before anything slow: an unusable --out must not surface after hours of scoring
        check_output(args.out)
    all_paths = expand_inputs(args.paths, recursive=args.recursive, path_column=args.path_column)
    if not all_paths:
        raise FileNotFoundError(f"no images found in {' '.join(args.paths)}")
    plan = plan_shard(args.shard, args.out, args.device)
    paths = plan.select(all_paths)  # may be empty: the (empty) output still marks the shard as done
    out = plan.out
    if out and out != args.out:
        check_output(out)
    scorer = Scorer(args.model, backend=args.backend, device=plan.device, dtype=args.dtype,
                    batch_size=args.batch_size, workers=args.workers, allow_urls=args.allow_urls,
                    url_timeout=args.url_timeout, compile=args.compile, decode=args.decode, **load_flags(args))
    console = Console()
    shown: list[ScoreResult] = []
    scores: list[float] = []
    n_err = 0

    def collect(res: ScoreResult) -> None:
        nonlocal n_err
        if res.error:
            n_err += 1
        else:
            scores.append(res.score)  # type: ignore[arg-type]
        if len(shown) < args.max_rows:
            shown.append(res)
        progress.advance(task)

    with Progress(TextColumn("scoring"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console, transient=True, disable=not console.is_terminal) as progress:
        task = progress.add_task("score", total=len(paths))
        if out:
            counts = score_paths_to_file(scorer, paths, out, resume=not args.no_resume, progress=collect,
                                         allow_mixed_models=args.allow_mixed_models)
            progress.advance(task, counts["skipped"])
        else:
            counts = {"total": len(paths), "skipped": 0}
            for res in scorer.score_files(paths):
                collect(res)

    # File names and messages are data, not rich markup: "holiday [edited].jpg" must print as is.
    table = Table(title=f"tastelab scores ({escape(scorer.config.name)})")
    table.add_column("image", overflow="fold")
    table.add_column("score", justify="right")
    table.add_column("band")
    table.add_column("±", justify="right")
    if args.show_distribution:
        table.add_column("distribution (1..10)")
    for r in shown:
        # clean_text: a non-UTF-8 file name prints with \xNN escapes instead of crashing the terminal write
        band = r.band or f"[red]error: {escape(clean_text(r.error) or '')}[/red]"
        row = [escape(clean_text(r.path) or ""), _fmt(r.score), band, _fmt(r.uncertainty)]
        if args.show_distribution:
            row.append(" ".join(f"{p:.2f}" for p in r.distribution) if r.distribution else "-")
        table.add_row(*row)
    if shown:
        console.print(table)
    summary = f"{len(scores)} scored, {n_err} errors"
    if counts.get("skipped"):
        summary += f", {counts['skipped']} already in {escape(out or '')} (skipped)"
    if scores:
        summary += f"; mean {statistics.fmean(scores):.2f}, min {min(scores):.2f}, max {max(scores):.2f}"
    if len(scores) + n_err > len(shown) and shown:
        summary += f" (table shows the first {len(shown)})"
    console.print(summary)
    by_rank = args.shard is None and plan.launch is not None
    if plan.index is not None:
        how = f"process {plan.index} of a {plan.count}-process launch" if by_rank else "--shard"
        console.print(f"shard {plan.index}/{plan.count} ({how}): {len(paths)} of {len(all_paths)} inputs")
    if out:
        console.print(f"wrote {escape(out)}")
        if by_rank and plan.index == 0:
            console.print(f"join the ranks with: tastelab merge {escape(args.out)} "
                          f"{escape(rank_pattern(args.out))}")
    return 0


def rank_pattern(out: str) -> str:
    """The glob matching every rank's output of ``out`` (``scores.rank*.jsonl``)."""
    from pathlib import Path

    path = Path(out)
    return str(path.with_name(f"{path.stem}.rank*{path.suffix}"))
