"""``tastelab self-train CONFIG.yaml --unlabelled DIR --out RUN``: ELTA self-training rounds (resumable)."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.table import Table

from tastelab.cli.options import add_trust_flag


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("self-train", help="ELTA self-training: train, pseudo-label unlabelled images with "
                       "adaptive sharpening, retrain (see training/elta.py)")
    p.add_argument("config", help="recipe YAML (train.elta.* sets beta, threshold, pseudo weight, rounds)")
    p.add_argument("--unlabelled", action="append", required=True, metavar="DIR_OR_LIST",
                   help="unlabelled images: a folder, a .txt/.parquet path list or a glob (repeatable)")
    p.add_argument("--rounds", type=int, default=None, help="self-training rounds after round 0 "
                   "(default: train.elta.rounds)")
    p.add_argument("--out", required=True, help="folder for round-0, round-1, ... and self_train.json")
    p.add_argument("--base-run", default=None, help="a finished run of this recipe to use as round 0")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value, e.g. --set train.elta.pseudo_threshold=0.8")
    p.add_argument("--no-recursive", dest="recursive", action="store_false",
                   help="do not descend into sub-folders of unlabelled folders")
    add_trust_flag(p, recipe=True)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tastelab.selftrain import SUMMARY_FILE, self_train
    from tastelab.training.config import load_train_config

    cfg = load_train_config(args.config, args.overrides)
    result = self_train(cfg, args.unlabelled, args.out, rounds=args.rounds, base_run=args.base_run,
                        recursive=args.recursive, trust_remote_code=args.trust_remote_code,
                        recipe_path=args.config)
    table = Table(title=f"self-training ({result['pool']} unlabelled images)")
    for col in ("round", "pseudo-labels", "val best", "test srcc", "test plcc", "test mae", "mae low 20%",
                "mae high 20%"):
        table.add_column(col, justify="right")
    for r in result["rounds"]:
        t = r.get("test") or {}
        used = (r.get("elta") or {}).get("pseudo_labels", 0)

        def f(x: float | None) -> str:
            return "-" if x is None else f"{x:.4f}"

        table.add_row(str(r["round"]), str(used), f(r.get("val_best")), f(t.get("srcc")), f(t.get("plcc")),
                      f(t.get("mae")), f(t.get("mae_p0_20")), f(t.get("mae_p80_100")))
    console = Console()
    console.print(table)
    console.print(f"summary: {Path(args.out) / SUMMARY_FILE}")
    last = result["rounds"][-1]
    console.print(f"score with: tastelab score IMAGES --model {Path(last['run_dir']) / 'best'}")
    return 0
