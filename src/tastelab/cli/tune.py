"""``tastelab tune CONFIG.yaml --space SPACE.yaml``: hyper-parameter search (Optuna), resumable, multi-worker.

``tastelab tune --show OUT`` (or ``--show --storage URL --study NAME``) lists a study's trials.

``tastelab tune --external "CMD {param} ..." --space SPACE.yaml --judge judge.yaml --study sqlite:///lora.db``:
Optuna drives the user's own LoRA trainer by the judge's composite (:mod:`tastelab.external`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tastelab.cli.options import add_trust_flag


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
    add_trust_flag(p, recipe=True, judge=True)  # --external judges from --judge's config
    _add_external(p)
    p.set_defaults(func=run)


def _add_external(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("external trainer (--external)", "Optuna drives your own LoRA trainer (kohya sd-scripts, "
                             "OneTrainer, ai-toolkit, ...); each checkpoint is judged as it appears. With --external, "
                             "--study may be a storage URL (sqlite:///lora.db, postgresql://...)")
    g.add_argument("--external", metavar="CMD", help="the trainer command with {placeholders}: the space's keys, "
                   "{trial_dir} (a fresh folder per trial), {trial_number}, {seed}; split like a shell would, "
                   "each value one argument (no shell runs unless --shell)")
    g.add_argument("--shell", action="store_true", help="run the filled command with /bin/sh -c (pipes, &&, cd); "
                   "values are shell-quoted")
    g.add_argument("--judge", help="judge config YAML (default: the judge's defaults)")
    g.add_argument("--references", help="reference images (folder) for the judge's consistency metrics")
    g.add_argument("--prompts", help="the sample prompt file (sd-scripts .txt, .toml, .json, .jsonl)")
    g.add_argument("--train-images", help="training images (folder) for the judge's copy check")
    g.add_argument("--study-name", help="study name inside the storage (default: external)")
    g.add_argument("--phases", default="search", help="baseline,search,refine or all (default search)")
    g.add_argument("--refine-trials", type=int, help="trials in the narrowed space (default: half of --trials)")
    g.add_argument("--refine-top-k", type=int, default=3, help="narrow the space around the best K trials (default 3)")
    g.add_argument("--refine-seeds", default="1,2,3", help="seeds the best configuration is re-run with: a list "
                   "(1,2,3) or a count (3); 0 or none: no re-runs")
    g.add_argument("--baseline-params", action="append", default=[], metavar="KEY=VALUE",
                   help="the trainer's default for a parameter without `default:` in the space (repeatable)")
    g.add_argument("--objectives", help="comma list: composite, composite_low, train_time, consistency, diversity, "
                   "quality, alignment, aesthetics, metric:NAME; each with :max/:min (default composite)")
    g.add_argument("--gpus", help="GPU ids for --jobs (default: torch.cuda.device_count()); each trial gets one "
                   "through CUDA_VISIBLE_DEVICES")
    g.add_argument("--trial-timeout", type=float, help="seconds one trainer run may take; then it is stopped")
    g.add_argument("--kill-grace", type=float, default=10.0,
                   help="seconds between SIGTERM and SIGKILL when a trainer is stopped (default 10)")
    g.add_argument("--poll-interval", type=float, default=2.0, help="seconds between looks for new checkpoints")
    g.add_argument("--settle", type=float, default=60.0,
                   help="a sample set with no new image for this long is complete (default 60)")
    g.add_argument("--stable-for", type=float, default=5.0, help="a checkpoint or image file unchanged for this "
                   "many seconds is complete (default 5)")
    g.add_argument("--no-trial-reports", dest="trial_reports", action="store_false",
                   help="write only each trial's leaderboard.json, not its judge report.html")
    g.add_argument("--watch", default="auto", choices=["auto", "checkpoints", "samples"],
                   help="judge the trainer's checkpoints (generated with --base) or its own sample images "
                   "(default: checkpoints when --base is given)")
    g.add_argument("--checkpoint-glob", help="which files/folders under {trial_dir} are checkpoints (default: "
                   "*.safetensors and diffusers folders)")
    g.add_argument("--layout", default="auto", help="the sample layout (judge --layout; default auto)")
    g.add_argument("--expected-images", type=int, help="a sample set is complete with this many images")
    g.add_argument("--base", help="base model to generate checkpoint samples with (tastelab generate)")
    g.add_argument("--gen-seeds", default="0,1,2,3", help="seeds of the generated samples (default 0,1,2,3)")
    g.add_argument("--device", default="auto", help="the judge's device (default auto)")
    g.add_argument("--cwd", help="the trainer's working folder (default: the current one)")
    g.add_argument("--backend", default="optuna", choices=["optuna", "ray"],
                   help="who runs the trials: optuna (threads here; --jobs, --gpus, PostgreSQL for machines) or "
                   "ray (Ray Tune on a cluster: OptunaSearch + ASHA; the ray extra)")
    g.add_argument("--gpus-per-trial", type=float, default=0.0, help="--backend ray: GPUs of one trial (default 0)")
    g.add_argument("--cpus-per-trial", type=float, default=1.0, help="--backend ray: CPUs of one trial (default 1)")
    g.add_argument("--ray-address", help="--backend ray: the cluster to join (default: RAY_ADDRESS, else a local Ray)")
    g.add_argument("--asha-grace-period", type=int, default=1,
                   help="--backend ray: epochs every trial runs before ASHA may stop it (default 1)")
    g.add_argument("--asha-reduction-factor", type=float, default=2.0,
                   help="--backend ray: ASHA keeps the best 1/F of trials at each rung (default 2)")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from tastelab.tuning.report import print_summary

    console = Console()
    if args.show is not None:
        return _show(args, console)
    if args.external is not None:
        return _external(args, console)
    if not args.config or not args.space:
        raise ValueError("tastelab tune needs CONFIG.yaml and --space SPACE.yaml (or --show OUT)")
    from tastelab.tuning import tune

    out = Path(args.out) if args.out else Path("runs") / f"tune-{Path(args.config).stem}"
    result = tune(args.config, args.space, out, trials=args.trials, timeout=args.timeout, storage=args.storage,
                  study_name=args.study, objectives=args.objective, sampler=args.sampler, pruner=args.pruner,
                  jobs=args.jobs, seed=args.seed, keep_trial_models=args.keep_trial_models,
                  overrides=args.overrides, heartbeat_interval=args.heartbeat_interval,
                  grace_period=args.grace_period, max_retry=args.max_retry,
                  trust_remote_code=args.trust_remote_code)
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


def _ints(text: str, flag: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{flag} {text!r}: expected comma-separated integers") from None


def _pairs(items: list[str]) -> dict[str, object]:
    """``KEY=VALUE`` strings; values parse as YAML (numbers, booleans, text)."""
    import yaml

    out: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--baseline-params {item!r}: expected KEY=VALUE")
        out[key.strip()] = yaml.safe_load(value)
    return out


def _external(args: argparse.Namespace, console: object) -> int:
    from tastelab.core.errors import UserError
    from tastelab.external import ExternalTuneConfig, tune_external
    from tastelab.external.report import print_external_summary

    if args.config:
        raise UserError(f"tastelab tune --external takes no recipe (got {args.config!r}); the trainer is the command")
    if not args.space:
        raise UserError("tastelab tune --external needs --space SPACE.yaml")
    storage, name = args.storage, args.study_name
    if args.study and "://" in args.study:
        if storage:
            raise UserError("--study is a storage URL here and --storage is given too; pass one")
        storage = args.study
    elif args.study:
        name = name or args.study
    seeds = args.refine_seeds.strip().lower()
    if seeds in ("", "0", "none"):
        refine_seeds: list[int] = []
    elif "," in seeds:
        refine_seeds = _ints(seeds, "--refine-seeds")
    else:
        refine_seeds = list(range(1, _ints(seeds, "--refine-seeds")[0] + 1))
    out = args.out or (f"runs/tune-{name}" if name else
                       f"runs/tune-{storage.rsplit('/', 1)[-1].rsplit('.', 1)[0]}" if storage else "runs/tune-external")
    cfg = ExternalTuneConfig(
        command=args.external, space=args.space, out=out, judge=args.judge, references=args.references,
        prompts=args.prompts, train_images=args.train_images, storage=storage, study_name=name, trials=args.trials,
        phases=args.phases, refine_trials=args.refine_trials, refine_top_k=args.refine_top_k,
        refine_seeds=refine_seeds, baseline_params=_pairs(args.baseline_params),
        objectives=(args.objectives.split(",") if args.objectives else ["composite"]), sampler=args.sampler,
        pruner=args.pruner, seed=args.seed or 0, jobs=args.jobs,
        gpus=[g.strip() for g in args.gpus.split(",") if g.strip()] if args.gpus else None,
        trial_timeout=args.trial_timeout, kill_grace=args.kill_grace, poll_interval=args.poll_interval,
        settle=args.settle, quiet=args.stable_for, trial_reports=args.trial_reports, watch=args.watch,
        checkpoint_glob=args.checkpoint_glob, layout=args.layout,
        expected_images=args.expected_images, base=args.base, gen_seeds=_ints(args.gen_seeds, "--gen-seeds"),
        shell=args.shell, device=args.device, cwd=args.cwd, heartbeat_interval=args.heartbeat_interval,
        grace_period=args.grace_period, max_retry=args.max_retry, backend=args.backend,
        gpus_per_trial=args.gpus_per_trial, cpus_per_trial=args.cpus_per_trial, ray_address=args.ray_address,
        asha_grace_period=args.asha_grace_period, asha_reduction_factor=args.asha_reduction_factor,
        trust_remote_code=args.trust_remote_code)
    result = tune_external(cfg)
    print_external_summary(console, result.summary)
    console.print(f"summary: {result.summary_path}\nreport: {result.report_path}")  # type: ignore[attr-defined]
    if result.storage.startswith("sqlite"):
        console.print(f"watch: optuna-dashboard {storage or 'sqlite:///' + str(result.out_dir / 'study.db')}")  # type: ignore[attr-defined]
    return 0 if result.best_trial is not None else 1
