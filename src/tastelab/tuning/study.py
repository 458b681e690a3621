"""Run a study: validate everything up front, run worker processes against one storage, then write the
best run, the Pareto front and ``tune_summary.json``.

Counting: ``trials`` is the number of *finished* (COMPLETE + PRUNED) trials the study should have in
total, across every worker, machine and re-run. Workers stop through Optuna's ``MaxTrialsCallback``
counting COMPLETE, PRUNED and RUNNING trials, so a worker does not start a trial another worker's
running one will already fill. Two workers passing that check in the same instant would overshoot, so
a trial also checks at its start whether earlier-numbered trials already fill the total; if so it
ends at once as FAIL with user attr ``surplus`` (listed in the summary), never as a counted trial.
A worker that died leaves a RUNNING trial that the heartbeat turns into FAIL (and re-queues) before it
is counted against the total.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import shutil
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.trial import TrialState

from tastelab.core.atomic import atomic_folder, write_text_atomic
from tastelab.core.jsonutil import json_default
from tastelab.features.cache import default_cache_dir
from tastelab.training.config import (
    TrainConfig,
    command_line_overrides,
    load_train_config,
    read_recipe,
    recipe_remote_code,
)
from tastelab.tuning.objective import (
    ObjectiveSpec,
    TrialObjective,
    build_trial_config,
    drop_models,
    parse_objective,
    trial_dir,
)
from tastelab.tuning.report import (
    OBJECTIVES_ATTRS,
    SPACE_ATTRS,
    best_trials,
    pick_best,
    record_objective_names,
    stored_objectives,
    study_summary,
    write_pareto_csv,
)
from tastelab.tuning.space import SearchSpace, SpaceError, apply_overrides, load_space
from tastelab.tuning.storage import make_pruner, make_sampler, make_storage, redact

logger = logging.getLogger(__name__)

COUNTED = (TrialState.COMPLETE, TrialState.PRUNED)
_ATTR_OBJECTIVES = OBJECTIVES_ATTRS[0]
_ATTR_SPACE = SPACE_ATTRS[0]
_ATTR_CONFIG = "tastelab.config"


@dataclass
class TuneSettings:
    """Everything a worker process needs (picklable: names, not live Optuna objects)."""

    raw_config: dict[str, Any]
    base_dir: str | None
    space: SearchSpace
    objectives: tuple[ObjectiveSpec, ...]
    out_dir: str
    storage_url: str
    study_name: str
    trials: int
    cache_dir: str | None
    sampler: Any = "tpe"
    pruner: Any = "median"
    seed: int = 0
    timeout: float | None = None
    jobs: int = 1
    keep_trial_models: bool = False
    heartbeat_interval: int = 30
    grace_period: int | None = None
    max_retry: int | None = 2
    max_consecutive_failures: int = 5
    deadline: float | None = None  # time.time() after which no new trial starts
    shared_storage: bool = False  # an explicit --storage: other machines may run workers too
    trust_remote_code: bool = False  # the user's permission for the recipe's / space's remote-code request

    def storage(self) -> optuna.storages.RDBStorage:
        return make_storage(self.storage_url, heartbeat_interval=self.heartbeat_interval,
                            grace_period=self.grace_period, max_retry=self.max_retry)


@dataclass
class TuneResult:
    """What :func:`tune` returns (the same content as ``tune_summary.json``)."""

    study_name: str
    storage: str
    out_dir: Path
    objectives: list[dict[str, str]]
    counts: dict[str, int]
    best_trial: int | None
    best_values: dict[str, float]
    best_params: dict[str, Any]
    best_run: Path | None
    pareto_front: list[dict[str, Any]]
    summary_path: Path
    summary: dict[str, Any] = field(repr=False)


# ------------------------------------------------------------------------------------------ callbacks
class _StopAfterFailures:
    """Stop this worker after N consecutive FAIL trials: a broken set-up must not loop forever."""

    def __init__(self, limit: int) -> None:
        self.limit, self.run = limit, 0

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if trial.user_attrs.get("surplus"):
            return
        self.run = self.run + 1 if trial.state == TrialState.FAIL else 0
        if self.limit and self.run >= self.limit:
            logger.error("%d trials in a row failed; this worker stops (see the errors above)", self.run)
            study.stop()


class _ModelJanitor:
    """Keep model folders only for the current best trial(s) (Pareto front when multi-objective).

    Metrics, summary.json and trial.json of every trial stay. Runs after each trial in each worker; a
    folder removed by a racing worker is re-created for the final best by retraining from its params.
    """

    def __init__(self, out_dir: str, keep_all: bool) -> None:
        self.out_dir, self.keep_all = out_dir, keep_all

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if self.keep_all:
            return
        keep = {t.number for t in best_trials(study)}
        for t in study.get_trials(deepcopy=False, states=COUNTED):
            if t.number not in keep:
                folder = trial_dir(self.out_dir, t.number)
                if (folder / "best").exists() or (folder / "checkpoints").exists():
                    drop_models(folder)


def _fail_stale(study: optuna.Study, trial: optuna.trial.FrozenTrial | None = None) -> None:
    """Turn heartbeat-stale RUNNING trials into FAIL (+ retry) before counting RUNNING trials."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # a no-op without heartbeat


# ------------------------------------------------------------------------------------------ workers
def _worker_seed(seed: int, worker: int, n_existing: int, shared: bool) -> int:
    """Distinct sampler seeds per worker and per re-run (the same seed twice = the same proposals).

    A single local worker is reproducible from ``--seed`` (and the number of trials already in the study).
    Workers that may run concurrently on other machines (an explicit ``--storage``) or ``--jobs``
    processes cannot coordinate seeds, so they also mix in their process id and the clock.
    """
    parts = [seed, worker, n_existing]
    if shared:
        parts += [os.getpid(), time.time_ns() % (1 << 32)]
    return int(np.random.SeedSequence(parts).generate_state(1)[0])


def run_worker(settings: TuneSettings, worker: int = 0, max_trials: int | None = None) -> None:
    """One worker: pull trials from the shared study until the total is reached (or time runs out)."""
    storage = settings.storage()
    probe = optuna.load_study(study_name=settings.study_name, storage=storage)
    _fail_stale(probe)
    n_existing = len(probe.get_trials(deepcopy=False))
    shared = settings.jobs > 1 or settings.shared_storage
    sampler_seed = (settings.seed if settings.sampler == "qmc"  # QMC: one sequence, indexed study-wide
                    else _worker_seed(settings.seed, worker, n_existing, shared))
    study = optuna.load_study(
        study_name=settings.study_name, storage=storage,
        sampler=make_sampler(settings.sampler, sampler_seed, n_objectives=len(settings.objectives),
                             trials=settings.trials),
        pruner=make_pruner(settings.pruner))
    states = (*COUNTED, TrialState.RUNNING)
    if len(study.get_trials(deepcopy=False, states=states)) >= settings.trials:
        logger.info("study %r already has %d finished or running trials; nothing to do",
                    settings.study_name, settings.trials)
        return
    objective = TrialObjective(raw_config=settings.raw_config, base_dir=settings.base_dir, space=settings.space,
                               objectives=settings.objectives, out_dir=settings.out_dir,
                               cache_dir=settings.cache_dir, prune=len(settings.objectives) == 1,
                               total=settings.trials, trust_remote_code=settings.trust_remote_code)
    callbacks: list[Callable[[optuna.Study, optuna.trial.FrozenTrial], None]] = [
        _fail_stale,
        optuna.study.MaxTrialsCallback(settings.trials, states=states),
        _StopAfterFailures(settings.max_consecutive_failures),
        _ModelJanitor(settings.out_dir, settings.keep_trial_models)]
    # --timeout is for the whole command: each worker gets what is left of it (no new trial after it).
    timeout = None if settings.deadline is None else max(1.0, settings.deadline - time.time())
    study.optimize(objective, n_trials=max_trials, timeout=timeout, catch=(Exception,), callbacks=callbacks,
                   gc_after_trial=True)


def _worker_process(settings: TuneSettings, worker: int, log_level: int) -> None:
    """Entry point of a spawned worker: logging and a fair share of the CPU threads."""
    import torch

    logging.basicConfig(level=log_level, format=f"[worker {worker}] %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, settings.jobs)))
    run_worker(settings, worker)


def _run_processes(settings: TuneSettings) -> None:
    ctx = multiprocessing.get_context("spawn")  # no forked torch/SQLAlchemy state in children
    level = logging.getLogger("tastelab").getEffectiveLevel()
    procs = [ctx.Process(target=_worker_process, args=(settings, i, level), name=f"tastelab-tune-{i}")
             for i in range(settings.jobs)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join()
    except KeyboardInterrupt:
        for p in procs:
            p.join(timeout=30)  # they got the same SIGINT; give them time to mark their trials
        raise
    bad = [p.exitcode for p in procs if p.exitcode]
    if bad:
        logger.warning("%d worker(s) exited with an error (exit codes %s); the study is still usable", len(bad), bad)


# ------------------------------------------------------------------------------------------ set-up
def _load_raw(config: Any, overrides: Sequence[str]) -> tuple[dict[str, Any], str | None, str]:
    """(raw recipe mapping with --set overrides, folder relative paths resolve against, a name)."""
    if isinstance(config, TrainConfig):
        raw, base, name = config.model_dump(mode="json"), None, config.model.name
    elif isinstance(config, Mapping):
        raw, base, name = dict(config), None, str(config.get("model", {}).get("name", "tune"))
    else:
        path = Path(config)
        raw = read_recipe(path)
        base, name = str(path.resolve().parent), path.stem
    if overrides:
        raw = apply_overrides(raw, dict(command_line_overrides(list(overrides))), "--set")
    return raw, base, name


def _check_remote_code(raw: Mapping[str, Any], base_dir: str | None, label: str, base_cfg: TrainConfig,
                       space: SearchSpace, trust_remote_code: bool) -> None:
    """:func:`recipe_remote_code` before the study starts, for the recipe and for every configuration the
    space's check samples (a space may request remote code too): a trial's own refusal would only fail it."""
    recipe_remote_code(base_cfg, trust_remote_code=trust_remote_code, recipe=label)
    if trust_remote_code:
        return
    for what, overrides in space.samples():
        cfg = load_train_config(raw=apply_overrides(raw, overrides, space.source), base_dir=base_dir)
        recipe_remote_code(cfg, trust_remote_code=False, recipe=f"{space.source} ({what})")


def _default_objective(cfg: Any) -> str:
    metric = cfg.train.metric
    if metric == "auto":
        metric = "pair_acc" if cfg.data.format == "pairs" else "srcc"
    return f"val/{metric}"


def _check_study(study: optuna.Study, objectives: Sequence[ObjectiveSpec], space: SearchSpace,
                 raw: Mapping[str, Any]) -> None:
    """A resumed study must optimise the same objectives; a changed space or recipe is only a warning."""
    attrs = study.user_attrs
    names = [f"{o.name}:{o.direction}" for o in objectives]
    if _ATTR_OBJECTIVES not in attrs:
        record_objective_names(study, [o.name for o in objectives])
        study.set_user_attr(_ATTR_OBJECTIVES, names)
        study.set_user_attr(_ATTR_SPACE, space.to_dict())
        study.set_user_attr(_ATTR_CONFIG, json.loads(json.dumps(raw, default=str)))
        return
    if attrs[_ATTR_OBJECTIVES] != names:
        raise ValueError(f"study {study.study_name!r} optimises {attrs[_ATTR_OBJECTIVES]}, not {names}; "
                         "use another --study name")
    record_objective_names(study, [o.name for o in objectives])  # a study made before they were set
    if attrs.get(_ATTR_SPACE) != space.to_dict():
        logger.warning("study %r was started with a different search space; values are compared anyway",
                       study.study_name)
    if attrs.get(_ATTR_CONFIG) != json.loads(json.dumps(raw, default=str)):
        logger.warning("study %r was started with a different training recipe; trials may not be comparable",
                       study.study_name)


def _frozen_cache_is_cold(study: optuna.Study, cfg: Any) -> bool:
    return cfg.train.mode == "frozen" and not study.get_trials(deepcopy=False, states=COUNTED)


# ------------------------------------------------------------------------------------------ results
def materialise_best(study: optuna.Study, settings: TuneSettings) -> tuple[Path | None, str]:
    """``OUT/best-run``: the best trial's run folder (copied), else retrained from its params + seed."""
    from tastelab.training.trainer import Trainer  # heavy (torch, accelerate): only when a best run is re-made

    trial = pick_best(study)
    if trial is None:
        return None, "none"
    out = Path(settings.out_dir)
    dest = out / "best-run"
    marker = dest / "trial.json"
    if marker.exists() and (dest / "best" / "config.json").exists():
        info = json.loads(marker.read_text(encoding="utf-8"))
        if info.get("number") == trial.number and info.get("study") == study.study_name:
            return dest, "unchanged"
    src = trial_dir(out, trial.number)
    if (src / "best" / "config.json").exists():
        with atomic_folder(dest) as tmp:
            shutil.copytree(src, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns("checkpoints"))
        return dest, "copied"
    logger.info("best trial %d has no model folder here (another worker/machine, or dropped): retraining it",
                trial.number)
    overrides = settings.space.from_params(trial.params)
    cfg = build_trial_config(settings.raw_config, overrides, settings.base_dir, settings.cache_dir)
    shutil.rmtree(dest, ignore_errors=True)
    summary = Trainer(cfg, dest, resume="none", trust_remote_code=settings.trust_remote_code).fit()
    drop_models(dest, keep_models=True)
    info = {"number": trial.number, "study": study.study_name, "overrides": overrides, "seed": cfg.seed,
            "objectives": [o.name for o in settings.objectives], "retrained": True,
            "retrained_values": [o.value(summary) for o in settings.objectives]}
    write_text_atomic(marker, json.dumps(info, indent=2, default=str))
    return dest, "retrained"


def finalize(settings: TuneSettings) -> TuneResult:
    """Best run, Pareto front (CSV) and ``tune_summary.json`` from the study's current state."""
    study = optuna.load_study(study_name=settings.study_name, storage=settings.storage())
    out = Path(settings.out_dir)
    best_run, source = materialise_best(study, settings)
    summary = study_summary(study, settings.objectives, space=settings.space, trials_requested=settings.trials)
    summary["storage"] = redact(settings.storage_url)
    summary["out_dir"] = str(out.resolve())
    if summary["best"] is not None:
        summary["best"].update(run_dir=str(best_run.resolve()) if best_run else None, source=source,
                               overrides=settings.space.from_params(study.trials[summary["best"]["trial"]].params))
    if len(settings.objectives) > 1:
        write_pareto_csv(out / "pareto_front.csv", summary)
    path = out / "tune_summary.json"
    write_text_atomic(path, json.dumps(summary, indent=2, default=json_default))
    best = summary["best"] or {}
    return TuneResult(study_name=settings.study_name, storage=summary["storage"], out_dir=out,
                      objectives=summary["objectives"], counts=summary["counts"], best_trial=best.get("trial"),
                      best_values=best.get("values", {}), best_params=best.get("params", {}),
                      best_run=best_run, pareto_front=summary.get("pareto_front", []), summary_path=path,
                      summary=summary)


# ------------------------------------------------------------------------------------------ API
def tune(config: Any, space: str | os.PathLike | Mapping[str, Any] | SearchSpace, out_dir: str | os.PathLike, *,
         trials: int = 20, timeout: float | None = None, storage: str | None = None, study_name: str | None = None,
         objectives: Sequence[str] | None = None, sampler: Any = "tpe", pruner: Any = "median", jobs: int = 1,
         seed: int | None = None, keep_trial_models: bool = False, overrides: Sequence[str] = (),
         heartbeat_interval: int = 30, grace_period: int | None = None, max_retry: int | None = 2,
         max_consecutive_failures: int = 5, trust_remote_code: bool = False) -> TuneResult:
    """Hyper-parameter search over ``space`` for the recipe ``config``; resumable and multi-worker.

    ``config``: a recipe path, a raw recipe mapping or a :class:`TrainConfig`; ``overrides`` are
    ``--set``-style ``key=value`` strings applied to it. ``space``: a YAML path, a mapping or a
    :class:`SearchSpace`. ``objectives``: ``val/...`` or ``cost/...`` names, optionally ``:max``/``:min``
    (default: the space file's ``objectives``, else ``val/<train.metric>``). ``storage``: any Optuna
    RDB URL (default ``sqlite:///OUT/study.db``). ``sampler``/``pruner``: names or Optuna instances.
    ``jobs``: worker processes on this machine. ``trials``: finished trials wanted in total.
    ``trust_remote_code``: the user's permission for a recipe or space that sets
    ``model.backbone.trust_remote_code: true`` (:func:`~tastelab.training.config.recipe_remote_code`).
    Raises ``ConfigError``/``SpaceError``/``ValueError`` before any trial runs when something is invalid.
    """
    if trials < 1:
        raise ValueError("trials must be >= 1")
    if jobs < 1:
        raise ValueError("jobs must be >= 1")
    raw, base_dir, name = _load_raw(config, overrides)
    label = str(config) if isinstance(config, (str, os.PathLike)) else "<config>"
    base_cfg = load_train_config(raw=raw, base_dir=base_dir)
    space_obj = space if isinstance(space, SearchSpace) else load_space(space)
    names = list(objectives or space_obj.objectives or [_default_objective(base_cfg)])
    objs = tuple(parse_objective(n) for n in names)
    if len({o.name for o in objs}) != len(objs):
        raise SpaceError(f"objectives listed twice: {names}")
    space_obj.check(raw, base_dir)  # a bad key fails here, before any trial
    _check_remote_code(raw, base_dir, label, base_cfg, space_obj, trust_remote_code)
    pruner_used = pruner
    if len(objs) > 1 and not (isinstance(pruner, str) and pruner == "none"):
        logger.info("several objectives: Optuna cannot prune multi-objective trials; pruning is off")
        pruner_used = "none"
    make_pruner(pruner_used)  # name check now, not in the workers
    cache_dir = base_cfg.train.cache_dir or str(default_cache_dir())
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    url = storage or f"sqlite:///{(out / 'study.db').resolve()}"
    settings = TuneSettings(
        raw_config=raw, base_dir=base_dir, space=space_obj, objectives=objs, out_dir=str(out.resolve()),
        storage_url=url, study_name=study_name or name, trials=trials, cache_dir=cache_dir, sampler=sampler,
        pruner=pruner_used, seed=base_cfg.seed if seed is None else seed, jobs=jobs,
        keep_trial_models=keep_trial_models, heartbeat_interval=heartbeat_interval, grace_period=grace_period,
        max_retry=max_retry, max_consecutive_failures=max_consecutive_failures,
        deadline=None if timeout is None else time.time() + timeout, shared_storage=storage is not None,
        trust_remote_code=trust_remote_code)
    make_sampler(sampler, settings.seed, n_objectives=len(objs), trials=trials)  # name / extra check now
    study = optuna.create_study(storage=settings.storage(), study_name=settings.study_name, load_if_exists=True,
                                directions=[o.direction for o in objs])
    _check_study(study, objs, space_obj, raw)
    done = len(study.get_trials(deepcopy=False, states=COUNTED))
    logger.info("study %r in %s: %d/%d trials finished; objectives %s; trials in %s", settings.study_name,
                redact(url), done, trials, ", ".join(f"{o.name} ({o.direction})" for o in objs), out / "trials")
    if jobs == 1:
        run_worker(settings)
    else:
        if _frozen_cache_is_cold(study, base_cfg):
            # One trial first, alone: it fills the shared feature cache that every later trial reads,
            # instead of N workers extracting the same features at once.
            logger.info("first trial runs alone to fill the feature cache %s", cache_dir)
            run_worker(settings, worker=0, max_trials=1)
        _run_processes(settings)
    _wait_for_other_workers(settings)
    return finalize(settings)


def _wait_for_other_workers(settings: TuneSettings, poll: float = 1.0) -> None:
    """Wait until no trial of the study is RUNNING, so the summary and best run this worker writes describe
    the finished study: a worker stops starting trials once finished + running trials reach the total, and
    the last of them may be running in another worker (another machine sharing --storage). A dead worker's
    trial turns FAIL through the heartbeat, so this ends; --timeout bounds it too."""
    study = optuna.load_study(study_name=settings.study_name, storage=settings.storage())
    announced = False
    while True:
        _fail_stale(study)
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if not running:
            return
        if settings.deadline is not None and time.time() > settings.deadline:
            logger.warning("--timeout reached with %d trial(s) still running in other workers; the summary "
                           "covers the trials finished so far", len(running))
            return
        if not announced:
            logger.info("waiting for %d trial(s) running in other workers before writing the summary",
                        len(running))
            announced = True
        time.sleep(poll)


def show(storage: str, study_name: str | None = None) -> tuple[optuna.Study, dict[str, Any]]:
    """Load a study (the only one in the storage when no name is given) and summarise its trials."""
    names = optuna.study.get_all_study_names(storage=storage)
    if study_name is None:
        if len(names) != 1:
            raise ValueError(f"{redact(storage)} holds {len(names)} studies ({', '.join(names) or 'none'}); "
                             "pick one with --study")
        study_name = names[0]
    elif study_name not in names:
        raise KeyError(f"no study {study_name!r} in {redact(storage)} (have: {', '.join(names) or 'none'})")
    study = optuna.load_study(study_name=study_name, storage=storage)
    summary = study_summary(study, stored_objectives(study))
    summary["storage"] = redact(storage)
    return study, summary
