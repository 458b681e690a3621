"""``tastelab train CONFIG.yaml``: train a predictor into a run folder (resumable)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a predictor from a YAML recipe (see configs/)")
    p.add_argument("config", help="recipe YAML")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value, e.g. --set train.epochs=5 --set optim.lr=1e-3")
    p.add_argument("--out", help="run folder (default: runs/<recipe name>)")
    p.add_argument("--resume", default="auto",
                   help="auto (continue the run folder's latest checkpoint if any), none, or a checkpoint path")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tastelab.training.config import load_train_config
    from tastelab.training.trainer import Trainer

    cfg = load_train_config(args.config, args.overrides)
    out = Path(args.out) if args.out else Path("runs") / Path(args.config).stem
    summary = Trainer(cfg, out, resume=args.resume).fit()
    console = Console()
    best = summary.get("best", {})
    console.print(f"[bold]run folder[/bold] {out}")
    console.print(f"best epoch {best.get('epoch')}: {best.get('metric')} = {best.get('value')}")
    for name, metrics in summary.get("test", {}).items():
        keys = ("srcc", "plcc", "mae", "pair_acc", "emd")
        console.print(f"test ({name}): " + json.dumps({k: round(metrics[k], 4) for k in keys if k in metrics}))
    console.print(f"score with: tastelab score IMAGES --model {out / 'best'}")
    return 0
