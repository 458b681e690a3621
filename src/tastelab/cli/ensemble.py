"""``tastelab ensemble train|build|eval``: several models predicting as one, or their weight average.

* ``train CONFIG.yaml [CONFIG2.yaml ...] --seeds 0,1,2 --out DIR [--soup]``: every (recipe, seed) member on
  one shared split, then ``DIR/model`` (ensemble folder), ``DIR/soup`` (weight average), a metrics table
  and ``DIR/ensemble_summary.json``.
* ``build MODEL_DIR... --out DIR [--average outputs|weights]``: from existing model / run folders (or, for
  ``--average weights``, a run's ``checkpoints/epoch-N``).
* ``eval MODEL_DIR... --config RECIPE.yaml --split-file SPLIT.json``: the same table for any folders.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tastelab.cli.options import add_load_flags, add_trust_flag, load_flags

TABLE_METRICS = (("val", "srcc"), ("val", "plcc"), ("test", "srcc"), ("test", "plcc"), ("test", "mae"))


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ensemble", help="train / build / evaluate ensembles and weight averages (model soup)")
    esub = p.add_subparsers(dest="ensemble_command", required=True, metavar="ACTION")

    t = esub.add_parser("train", help="train N members (recipes x seeds) on one split; build, evaluate")
    t.add_argument("configs", nargs="+", metavar="CONFIG", help="recipe YAML(s)")
    t.add_argument("--seeds", default="0", help="comma-separated seeds, one member per recipe and seed "
                   "(default: %(default)s)")
    t.add_argument("--out", required=True, metavar="DIR", help="ensemble run folder (re-run to resume)")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a value in every recipe, e.g. --set train.epochs=5")
    t.add_argument("--soup", action="store_true", help="also build DIR/soup, the members' weight average "
                   "(only when they share architecture and frozen backbone)")
    t.add_argument("--device", default="auto", help="device for the evaluation (training: the recipe's)")
    add_trust_flag(t, recipe=True)
    t.set_defaults(func=run_train)

    b = esub.add_parser("build", help="an ensemble folder (or weight average) from existing model folders")
    b.add_argument("models", nargs="+", metavar="MODEL_DIR",
                   help="model folders, run folders (their best/), or checkpoints/epoch-N (--average weights)")
    b.add_argument("--out", required=True, metavar="DIR", help="folder to write (replaced atomically)")
    b.add_argument("--average", default="outputs", choices=["outputs", "weights"],
                   help="outputs: an ensemble folder (N models at inference); weights: one model whose "
                   "weights are the average (default: %(default)s)")
    b.add_argument("--weights", help="comma-separated member weights (default: equal)")
    b.add_argument("--name", help="ensemble name (default: <first member>-ensemble)")
    add_load_flags(b)
    b.set_defaults(func=run_build)

    e = esub.add_parser("eval", help="metrics of model / ensemble folders on a recipe's val and test split")
    e.add_argument("models", nargs="+", metavar="MODEL_DIR")
    e.add_argument("--config", required=True, metavar="RECIPE", help="recipe whose data the models are scored on")
    e.add_argument("--split-file", metavar="SPLIT",
                   help="the members' split.json (default: the recipe's data.split_file)")
    e.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    e.add_argument("--device", default="auto")
    add_load_flags(e)
    e.set_defaults(func=run_eval)


def _floats(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise ValueError(f"expected comma-separated numbers, got {text!r}") from exc


def _seeds(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise ValueError(f"--seeds: expected comma-separated integers, got {text!r}") from exc


def _fmt(metrics: dict[str, Any] | None, split: str, key: str) -> str:
    v = (metrics or {}).get(split, {}).get(key)
    return "-" if v is None else f"{v:.4f}"


def metrics_table(rows: list[tuple[str, dict[str, Any] | None]], title: str,
                  mean_std: tuple[dict[str, Any], dict[str, Any]] | None = None) -> Table:
    """One row per model: ``(label, {split: metrics})``; optionally the members' mean and std rows."""
    table = Table(title=title)
    table.add_column("model", no_wrap=True)  # numbers are 6 characters: an 80-column log still fits
    for split, key in TABLE_METRICS:
        table.add_column(f"{split} {key}", justify="right")
    for label, metrics in rows:
        table.add_row(escape(label), *(_fmt(metrics, s, k) for s, k in TABLE_METRICS))
    if mean_std is not None:
        for label, stat in zip(("members mean", "members std (n-1)"), mean_std):
            table.add_row(f"[italic]{label}[/italic]", *(_fmt(stat, s, k) for s, k in TABLE_METRICS))
    return table


def print_summary(summary: dict[str, Any], console: Console) -> None:
    """The ``ensemble train`` table (members, ensemble, soup, members' mean ± std) from its summary."""
    rows: list[tuple[str, dict[str, Any] | None]] = [(m["name"], m) for m in summary["members"]]
    rows.append(("ensemble (outputs avg)", summary["ensemble"]))
    soup = summary.get("soup")
    if soup is not None and "error" not in soup:
        rows.append(("soup (weights avg)", soup))
    n = summary.get("n")
    if n:
        mean_std = (summary["members_mean"], summary["members_std"]) if "members_mean" in summary else None
        title = "ensemble: " + ", ".join(f"{k} {v} images" for k, v in n.items())
        console.print(metrics_table(rows, title, mean_std))
    else:
        console.print(f"evaluation: {summary.get('evaluation')}")
    if soup is not None and "error" in soup:
        console.print(f"[yellow]no soup:[/yellow] {escape(soup['error'])}")


def run_train(args: argparse.Namespace) -> int:
    from tastelab.ensembles.train import SUMMARY_FILE, train_ensemble

    summary = train_ensemble(args.configs, _seeds(args.seeds), args.out, overrides=args.overrides,
                             soup=args.soup, device=args.device, trust_remote_code=args.trust_remote_code)
    console = Console()
    print_summary(summary, console)
    console.print(f"wrote {escape(str(Path(args.out) / SUMMARY_FILE))}")
    console.print(f"score with: tastelab score IMAGES --model {escape(summary['model'])}")
    return 0


def run_build(args: argparse.Namespace) -> int:
    from tastelab.models.ensemble import build_ensemble

    out = build_ensemble(args.models, args.out, weights=_floats(args.weights), average=args.average, name=args.name,
                         **load_flags(args))
    console = Console()
    what = "weight average" if args.average == "weights" else "ensemble"
    console.print(f"{what} of {len(args.models)} models -> {escape(str(out))}")
    console.print(f"score with: tastelab score IMAGES --model {escape(str(out))}")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from tastelab.ensembles.train import evaluate_folders

    result = evaluate_folders(args.models, args.config, split_file=args.split_file, overrides=args.overrides,
                              device=args.device, **load_flags(args))
    title = "evaluation: " + ", ".join(f"{k} {v} images" for k, v in result["n"].items())
    Console().print(metrics_table(list(result["models"].items()), title))
    return 0
