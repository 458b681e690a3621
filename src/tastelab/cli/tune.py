"""``tastelab tune CONFIG.yaml --space SPACE.yaml``: hyper-parameter search (Optuna), resumable, multi-worker.

``tastelab tune --show OUT`` (or ``--show --storage URL --study NAME``) lists a study's trials.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tune", help="hyper-parameter search over a recipe (Optuna; resumable, several workers)",
                       description="Search hyper-parameters of a training recipe. Re-running the same command "
                       "continues the study; --trials is the total number of finished trials.")
    p.add_argument("config", nargs="?", help="recipe YAML (as for `tastelab train`)")
    p.add_argument("--space", help="search space YAML (see configs/tune/)")
    p.add_argument("--trials", type=int, default=20, help="finished (complete + pruned) trials wanted in total, "
                   "across all workers and re-runs (default 20)")
    p.add_argument("--timeout", type=float, help="seconds after which no new trial starts")
    p.add_argument("--storage", help="Optuna RDB URL, e.g. postgresql://user@host/db (default sqlite:///OUT/study.db)")
    p.add_argument("--study", help="study name (default: the recipe's file name)")
    p.add_argument("--objective", action="append", metavar="METRIC[:max|min]",
                   help="val/srcc, val/plcc, val/mae, val/pair_acc, ..., cost/params, cost/trainable_params, "
                   "cost/model_bytes, cost/train_seconds; repeat for a multi-objective study "
                   "(default: the space's objectives, else val/<train.metric>)")
    p.add_argument("--sampler", default="tpe", choices=["tpe", "cmaes", "random", "qmc", "nsga2"],
                   help="tpe (default; multivariate, handles conditional params), cmaes (needs `pip install "
                   "cmaes`), random, qmc (Sobol), nsga2 (multi-objective)")
    p.add_argument("--pruner", default="median", choices=["median", "hyperband", "none"],
                   help="prunes on the objective after each epoch (single objective only)")
    p.add_argument("--jobs", type=int, default=1, help="worker processes on this machine (default 1)")
    p.add_argument("--out", help="output folder (default runs/tune-<recipe name>)")
    p.add_argument("--seed", type=int, help="sampler seed (default: the recipe's seed; trials train with the "
                   "recipe's seed, so all share one split)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value for every trial, e.g. --set train.cache_dir=/fast/cache")
    p.add_argument("--keep-trial-models", action="store_true",
                   help="keep every trial's model folders (default: only the current best's)")
    p.add_argument("--heartbeat-interval", type=int, default=30,
                   help="seconds between a running trial's heartbeats (a dead worker's trial fails after "
                   "--grace-period, default 2x this)")
    p.add_argument("--grace-period", type=int, help="seconds without a heartbeat before a trial counts as dead")
    p.add_argument("--max-retry", type=int, default=2, help="re-queue a dead worker's trial up to N times")
    p.add_argument("--show", nargs="?", const="", metavar="OUT",
                   help="list the trials of OUT's study (or of --storage/--study) and exit")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from tastelab.tuning.report import print_summary

    console = Console()
    if args.show is not None:
        return _show(args, console)
    if not args.config or not args.space:
        raise ValueError("tastelab tune needs CONFIG.yaml and --space SPACE.yaml (or --show OUT)")
    from tastelab.tuning import tune

    out = Path(args.out) if args.out else Path("runs") / f"tune-{Path(args.config).stem}"
    result = tune(args.config, args.space, out, trials=args.trials, timeout=args.timeout, storage=args.storage,
                  study_name=args.study, objectives=args.objective, sampler=args.sampler, pruner=args.pruner,
                  jobs=args.jobs, seed=args.seed, keep_trial_models=args.keep_trial_models,
                  overrides=args.overrides, heartbeat_interval=args.heartbeat_interval,
                  grace_period=args.grace_period, max_retry=args.max_retry)
    print_summary(console, result.summary)
    console.print(f"summary: {result.summary_path}")
    if result.storage.startswith("sqlite"):
        console.print(f"watch: optuna-dashboard {result.storage}")
    return 0 if result.best_trial is not None else 1


def _show(args: argparse.Namespace, console: object) -> int:
    from tastelab.tuning import show
    from tastelab.tuning.report import print_summary

    storage = args.storage
    if args.show:
        target = Path(args.show)
        db = target / "study.db" if target.is_dir() else target
        if not db.exists():
            raise FileNotFoundError(f"--show {args.show}: no study.db there (pass --storage URL for a server)")
        storage = f"sqlite:///{db.resolve()}"
    if not storage:
        raise ValueError("--show needs an output folder or --storage URL")
    _, summary = show(storage, args.study)
    print_summary(console, summary, limit=10_000)  # type: ignore[arg-type]
    return 0
