"""``tastelab judge SAMPLES --references REFS --out OUT``: rank a LoRA run's checkpoints by their samples.

Writes ``OUT/scores.parquet``, ``leaderboard.csv`` / ``.json`` and ``report.html`` and prints the
leaderboard; re-running after a new checkpoint was saved computes only the new images (the metric cache is
``OUT/.judge_cache.sqlite`` or ``--cache``). ``tastelab judge --list-metrics`` lists the registered metrics.
Heavy imports (torch, the judge package) happen inside the command, so ``tastelab --help`` stays fast.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tastelab.cli.generate import add_generation_flags, generation_config
from tastelab.cli.options import add_trust_flag
from tastelab.core.errors import UserError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("judge", help="judge a LoRA's checkpoints from their sample images; pick the best epoch")
    p.add_argument("samples", nargs="?", metavar="SAMPLES",
                   help="samples folder (one sub-folder per checkpoint, kohya-ss / OneTrainer / ai-toolkit sample "
                   "folders) or a manifest .csv/.jsonl")
    p.add_argument("--references", metavar="REFS", help="folder of reference images of the subject or style")
    p.add_argument("--prompts", metavar="PROMPTS", help="the run's prompt file (.txt sd-scripts lines, .toml, .json, "
                   ".jsonl)")
    p.add_argument("--config", metavar="YAML", help="judge config (metrics, weights, thresholds); see "
                   "configs/judge/default.yaml")
    p.add_argument("--train-images", metavar="DIR", help="the LoRA's training images (copy detection; warns when "
                   "references overlap them)")
    p.add_argument("--layout", default="auto", help="samples layout: auto, subfolders, kohya, onetrainer, "
                   "ai-toolkit or manifest (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=16, help="images per encoder batch (default: %(default)s)")
    p.add_argument("--cache", metavar="PATH", help="metric cache file shared across outputs (default: "
                   "OUT/.judge_cache.sqlite)")
    p.add_argument("--out", metavar="OUT", help="output folder")
    p.add_argument("--list-metrics", action="store_true", help="list the registered metrics and exit")
    add_trust_flag(p, judge=True)
    g = p.add_argument_group("generate first", "with --generate: sample --base with every --lora checkpoint "
                             "(tastelab generate's flags) into --samples-out (default OUT/samples), then judge it")
    g.add_argument("--generate", action="store_true", help="generate the samples first (needs --base, --prompts)")
    g.add_argument("--samples-out", metavar="DIR", help="where --generate writes the samples (default: OUT/samples)")
    add_generation_flags(g, base_required=False, batch_flag="--gen-batch-size")
    p.set_defaults(func=run)


def metrics_table() -> Table:
    """The metric registry as a table: what each metric is, whether it runs by default, its licence."""
    from tastelab.judge.metrics import METRICS, metric_info

    table = Table(title="judge metrics (enable/disable and set models in --config)")
    for col in ("name", "family", "per", "better", "default", "model", "licence", "extra"):
        table.add_column(col, no_wrap=col in ("name", "family", "default"))
    order = ["alignment", "consistency", "aesthetics", "quality", "diversity", "copying"]
    names = sorted(METRICS.names(), key=lambda n: (order.index(metric_info(n).family), n))
    for name in names:
        info = metric_info(name)
        table.add_row(escape(name), info.family, info.per, info.direction, "on" if info.enabled else "off",
                      escape(info.default_model or "-"), escape(info.licence or "-"), escape(info.extra or "-"))
    return table


def _fmt(x: Any) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.3f}" if isinstance(x, float) else str(x)


def leaderboard_table(result: Any) -> Table:
    """The leaderboard as a rich table (best first; tied checkpoints marked)."""
    from tastelab.judge.config import FAMILIES

    board = result.leaderboard
    table = Table(title="leaderboard (95% bootstrap intervals; '=' tied with the best)")
    for col in ("rank", "checkpoint", "composite", "interval", "", *FAMILIES, "flags", "pick"):
        table.add_column(col, justify="left" if col in ("checkpoint", "flags", "pick") else "right")
    for r in board.rows:
        table.add_row(str(r.rank), escape(r.checkpoint), _fmt(r.composite),
                      f"{_fmt(r.composite_low)}-{_fmt(r.composite_high)}", "=" if r.tied_with_best else "",
                      *(_fmt(r.family_scores.get(f)) for f in FAMILIES), escape(", ".join(r.flags)),
                      "\u2190 pick" if r.recommended else "", style="bold green" if r.recommended else None)
    return table


def recommendation_line(result: Any) -> str:
    """One line (rich markup): the recommended checkpoint, and the flags of the ranks above it it passed over."""
    board = result.leaderboard
    rule = result.config.recommend
    above = "; ".join(f"{r.checkpoint} (rank {r.rank}): {', '.join(rule.disqualifies(r.flags))}"
                      for r in board.passed_over())
    pick = board.recommended
    if pick is None:
        if not above:
            return "[yellow]recommended: none (no checkpoint has a composite)[/]"
        return f"[yellow]recommended: none; every checkpoint is flagged: {escape(above)}[/]"
    tail = f"; ranks above it are flagged: {escape(above)}" if above else ""
    return f"[bold green]recommended: {escape(pick.checkpoint)}[/] (rank {pick.rank}{tail})"


def run(args: argparse.Namespace) -> int:
    console = Console()
    if not console.is_terminal:  # piped or captured: do not squeeze the tables into 80 columns
        console = Console(width=160)
    if args.list_metrics:
        console.print(metrics_table())
        return 0
    from tastelab.judge.config import config_remote_code, load_judge_config

    config = load_judge_config(args.config)  # a bad config, or one asking for code unallowed: before any work
    config_remote_code(config, trust_remote_code=args.trust_remote_code, source=args.config)
    if args.generate:
        if args.samples:
            raise UserError(f"tastelab judge --generate writes its own samples; drop SAMPLES ({args.samples}) or use "
                            "--samples-out")
        if not args.base or not args.out:
            raise UserError("tastelab judge --generate: --base and --out required")
        from pathlib import Path

        from tastelab.generate.run import generate_samples

        args.samples = str(args.samples_out or Path(args.out) / "samples")
        made = generate_samples(generation_config(args, prompts=args.prompts, out=args.samples, device=args.device))
        console.print(f"generated {made.generated} image(s) ({made.skipped} already there) in {escape(args.samples)}")
    elif args.base or args.lora:
        raise UserError("--base / --lora generate samples only with --generate")
    missing = [flag for flag, value in (("SAMPLES", args.samples), ("--references", args.references),
                                        ("--out", args.out)) if not value]
    if missing:
        raise UserError(f"tastelab judge: {', '.join(missing)} required (or --list-metrics)")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")

    from tastelab.judge.run import judge

    result = judge(args.samples, references=args.references, prompts=args.prompts, config=config,
                   train_images=args.train_images, layout=args.layout, out=args.out, cache=args.cache,
                   device=args.device, batch_size=args.batch_size, progress=True,
                   trust_remote_code=args.trust_remote_code)
    console.print(leaderboard_table(result))
    console.print(recommendation_line(result))
    if result.missing_families:
        console.print(f"[yellow]not measured (re-weighted): {escape(', '.join(result.missing_families))}[/]")
    computed = sum(m.computed for m in result.metrics)
    cached = sum(m.cached for m in result.metrics)
    console.print(f"{len(result.images)} images, {computed} values computed, {cached} from the cache; "
                  f"wrote {escape(str(args.out))}/report.html, leaderboard.csv, leaderboard.json, scores.parquet")
    return 0
