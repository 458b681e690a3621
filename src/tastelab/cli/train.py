"""``tastelab train CONFIG.yaml``: train a predictor into a run folder (resumable)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console

from tastelab.cli.options import add_trust_flag

if TYPE_CHECKING:
    from tastelab.training.config import TrainConfig


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a predictor from a YAML recipe (see configs/)")
    p.add_argument("config", help="recipe YAML")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value, e.g. --set train.epochs=5 --set optim.lr=1e-3")
    p.add_argument("--out", help="run folder (default: runs/<recipe name>)")
    p.add_argument("--resume", default="auto",
                   help="auto (continue the run folder's latest checkpoint if any), none, or a checkpoint path")
    add_trust_flag(p, recipe=True)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.markup import escape

    from tastelab.evaluation.heldout import heldout_lines
    from tastelab.training.tasks.config import is_task_recipe

    out = Path(args.out) if args.out else Path("runs") / Path(args.config).stem
    if is_task_recipe(args.config):
        return _run_task(args, out)
    from tastelab.training.config import load_train_config
    from tastelab.training.trainer import Trainer

    cfg = load_train_config(args.config, args.overrides)
    if cfg.train.mode == "select":
        return _run_select(args, cfg, out)
    summary = Trainer(cfg, out, resume=args.resume, recipe_path=args.config,
                      trust_remote_code=args.trust_remote_code).fit()
    console = Console()
    best = summary.get("best", {})
    console.print(f"[bold]run folder[/bold] {out}")
    console.print(f"best epoch {best.get('epoch')}: {best.get('metric')} = {_fmt(best.get('value'))}")
    evaluation = summary.get("evaluation", {})
    if evaluation:  # held-out numbers named by what they measure (unseen images / new pairs among seen images)
        console.print(f"held out: {escape(evaluation['protocol'])}")
    for line in heldout_lines(evaluation):
        console.print(f"test {escape(line)}")
    # Point only at a model that exists: no epoch may have had a defined validation metric.
    for name in ("best", "final"):
        if (out / name / "config.json").is_file():
            if name == "final":
                console.print(f"no best model: {best.get('metric')} was never defined on the validation split")
            console.print(f"score with: tastelab score IMAGES --model {out / name}")
            break
    else:
        console.print("no model folder was written")
        return 2
    return 0


def _run_select(args: argparse.Namespace, cfg: TrainConfig, out: Path) -> int:
    """``train.mode: select``: the personal search on the recipe's train+val images, scored once on its test
    images (tastelab.personal.recipe; the personal package sits above training, so the CLI dispatches)."""
    from rich.markup import escape

    from tastelab.evaluation.heldout import heldout_lines
    from tastelab.personal.recipe import BEST, run_select_recipe

    console = Console()
    summary = run_select_recipe(cfg, out, resume=args.resume, recipe_path=args.config,
                                log=lambda m: console.print(escape(m)))
    best = summary["best"]
    console.print(f"[bold]run folder[/bold] {out}  (mode select)")
    console.print(f"chosen by CV over the train+val images: [bold]{escape(str(best['chosen']))}[/bold]; "
                  f"CV {best['metric']} {_fmt(best['value'])} (best of {summary['selection']['n_candidates']} "
                  "candidates: optimistic)")
    if best.get("nested_cv") is not None:
        console.print(f"nested CV {best['metric']} (leak-free): {_fmt(best['nested_cv'])}")
    console.print(f"held out: {escape(summary['evaluation']['protocol'])}")
    for line in heldout_lines(summary["evaluation"]):
        console.print(f"test {escape(line)}")
    console.print(f"score with: tastelab score IMAGES --model {out / BEST}")
    return 0


def _run_task(args: argparse.Namespace, out: Path) -> int:
    """A ``task:`` recipe (classification, detection, pose): the task loop, then where the model is."""
    from tastelab.training.tasks.config import load_task_config
    from tastelab.training.tasks.loop import TaskTrainer

    cfg = load_task_config(args.config, args.overrides)
    summary = TaskTrainer(cfg, out, resume=args.resume, recipe_path=args.config).fit()
    console = Console()
    best = summary.get("best", {})
    console.print(f"[bold]run folder[/bold] {out}  (task {cfg.task}, mode {cfg.train.mode})")
    console.print(f"best epoch {best.get('epoch')}: {best.get('metric')} = {_fmt(best.get('value'))}")
    for name, metrics in summary.get("test", {}).items():
        console.print(f"test ({name}): " + ", ".join(f"{k} {_fmt(v)}" for k, v in metrics.items()))
    for name in ("best", "final"):
        if (out / name / "task.json").is_file():
            console.print(f"predict with: tastelab predict {out / name} IMAGES --out preds.jsonl")
            return 0
    console.print("no model folder was written")
    return 2


def _fmt(value: object) -> str:
    """Metrics for reading: 4 decimals (0.8000, not 0.7999999999999999); undefined ones as n/a."""
    if isinstance(value, (int, float)) and math.isfinite(value):
        return f"{value:.4f}"
    return "n/a"
