"""``tune --external --backend ray``: Ray Tune runs the trials, for clusters.

Why it is built this way:

- **One home for the space**: Ray's :class:`~ray.tune.search.optuna.OptunaSearch` takes a define-by-run
  function, and that function is :meth:`SearchSpace.suggest` itself; a trial's config (Optuna's stored values)
  is turned back into the trainer's values by running the same ``suggest`` on an ``optuna.trial.FixedTrial``,
  which also yields the distributions the trials are recorded with. No second translation of the YAML.
- **One trial function**: every Ray trial is :func:`~tastelab.external.runner.run_trial` in a thread of the
  trial's actor (:class:`~tastelab.external.ray_trial.TrialThread`): each judged checkpoint becomes one Ray
  result (the objective and ``epoch``), ASHA (``time_attr="epoch"``) decides on it, and when Ray stops the
  trial its ``cleanup`` cancels the thread, which terminates the trainer's whole process group before the
  actor goes away. Several objectives: OptunaSearch gets every metric and a FIFO scheduler runs the trials to
  the end, because the default back-end does not prune several objectives either (Optuna cannot).
- **One phase logic**: each phase is one ``Tuner.fit``; between them the trials are in the study, and the
  refine phase's narrowed space and seed re-runs come from the default back-end's own functions
  (:func:`~tastelab.external.study.refine_space`, :func:`~tastelab.external.study.seed_plan`). OptunaSearch's
  in-memory study starts with a copy of the study's finished trials, so its sampler knows what came before.
- **One report**: when Ray is done, its trials are recorded into the same Optuna study (``--study`` or
  ``OUT/study.db``) with their values, per-epoch intermediate values and attributes, and
  :func:`~tastelab.external.study.finalize` writes the same ``tune_summary.json`` and ``study_report.html``.

Ray stays optional (the ``ray`` extra): it is imported only here and in ``ray_trainable``, only for
``--backend ray``; :func:`tune_external` sets up and finalises the study as for the default back-end. Each trial
actor loads its own base pipeline (checkpoints of one trial share it). A second invocation runs new baseline,
search and refine trials and adds them to the study (only the seed re-runs and the stored refine space carry
over); it does not resume a killed Ray run.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import TrialState

from tastelab.core.errors import UserError
from tastelab.external.phases import refine_space, refine_target, seed_plan
from tastelab.external.ray_trial import EPOCH, SEED, RayJob, define_by_run, trial_number, trial_values
from tastelab.tuning.space import SearchSpace

if TYPE_CHECKING:
    from tastelab.external.study import _Run

__all__ = ["check_ray_config", "import_ray", "make_searcher", "run_with_ray"]

logger = logging.getLogger(__name__)


def import_ray() -> Any:
    """``ray.tune`` with Optuna search, or one line saying how to install it."""
    if importlib.util.find_spec("ray") is None:
        raise UserError("--backend ray needs the ray extra: pip install 'tastelab[ray]' (ray not installed)")
    try:
        import ray.tune
        import ray.tune.search.optuna  # OptunaSearch needs its module (and optuna) importable
    except ImportError as exc:
        raise UserError(f"--backend ray needs the ray extra: pip install 'tastelab[ray]' ({exc})") from None
    return ray


def check_ray_config(space: SearchSpace) -> None:
    """What the Ray back-end cannot do, and Ray itself, checked before any study or trial."""
    # No '/' check: Ray nests config keys on '/', but tuning/space's key rule already refuses it.
    if any(p.key == SEED for p in space.params):
        raise UserError(f"--backend ray: {SEED} is the seed re-runs' config key; rename that parameter")
    import_ray()


# ------------------------------------------------------------------------------------------ the study
Extra = Callable[[Mapping[str, Any], Mapping[str, Any]], dict[str, Any]]


def _record(study: optuna.Study, job: RayJob, result: Any, extra: Extra) -> None:
    """One Ray result (its config, every reported row, its error) as a finished trial of ``study``;
    ``extra(params, config)``: the phase's attributes (``phase``, ``seed_of``)."""
    config = dict(result.config or {})
    try:
        values, params, dists = trial_values(job.space, config)
    except (KeyError, ValueError) as exc:
        logger.warning("Ray trial with config %s not recorded: %s", config, exc)
        return
    frame = result.metrics_dataframe
    rows = [] if frame is None else frame.to_dict("records")
    metric = job.metric
    intermediate: dict[int, float] = {}
    outcome: dict[str, Any] | None = None
    for row in rows:
        if isinstance(row.get("outcome"), str):
            outcome = json.loads(row["outcome"])
        elif not job.multi and EPOCH in row and _finite(row.get(metric)):
            intermediate[int(row[EPOCH])] = float(row[metric])
    trial_id = str((result.metrics or {}).get("trial_id") or "")
    attrs: dict[str, Any] = {"seed": job.seed_of(config), **extra(params, config),
                             "params": json.loads(json.dumps(values, default=str)), "backend": "ray",
                             "ray_trial_id": trial_id}
    objective_values = None
    if outcome is not None:
        state = TrialState.COMPLETE
        objective_values = [float(outcome["values"][name]) for name in job.metrics]
        attrs.update({k: v for k, v in outcome.items() if k != "values"})
    elif result.error is not None:
        state = TrialState.FAIL
        attrs["error"] = str(result.error).strip().splitlines()[0][:500] if str(result.error).strip() else "error"
        attrs["log_tail"] = str(result.error)[-4000:]
    else:
        state = TrialState.PRUNED  # stopped by the scheduler
        if intermediate:
            attrs["pruned_at"] = max(intermediate)
    if trial_id and "trial_dir" not in attrs:
        attrs["trial_dir"] = str(job.out / "trials" / f"trial-{trial_id}")
    study.add_trial(optuna.trial.create_trial(
        params=params, distributions=dists, values=objective_values, state=state, intermediate_values=intermediate,
        user_attrs={k: v for k, v in attrs.items() if v is not None}))


def _finite(x: Any) -> bool:
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def _history(study: optuna.Study) -> optuna.storages.InMemoryStorage:
    """A copy of the study's finished trials for OptunaSearch's own (in-memory) study, so Ray's sampler knows
    every earlier trial -- the search phase of a later invocation, the refine phase the search -- as the
    default back-end's sampler does (it samples from the one study)."""
    storage = optuna.storages.InMemoryStorage()
    copy = optuna.create_study(storage=storage, study_name=_SEARCHER_STUDY, directions=study.directions)
    copy.add_trials(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))
    return storage


_SEARCHER_STUDY = "tastelab-ray"


def make_searcher(study: optuna.Study, job: RayJob, *, sampler: Any, seed: int, n: int,
                  points: list[dict[str, Any]] | None = None) -> Any:
    """OptunaSearch over ``job.space`` (define-by-run) with every objective (a list with several), the
    study's sampler kind and the study's finished trials as its history; ``points`` are evaluated first."""
    from ray.tune.search.optuna import OptunaSearch

    from tastelab.tuning.storage import make_sampler

    return OptunaSearch(space=define_by_run(job.space), metric=job.metrics if job.multi else job.metric,
                        mode=job.modes if job.multi else job.mode, points_to_evaluate=points,
                        sampler=make_sampler(sampler, seed, n_objectives=len(job.objectives), trials=max(1, n)),
                        storage=_history(study), study_name=_SEARCHER_STUDY)


# ------------------------------------------------------------------------------------------ running
@dataclass
class _Ray:
    """One invocation's Ray Tune set-up: each phase is one ``Tuner.fit`` over the same trainable settings."""

    run: _Run
    study: optuna.Study

    def fit(self, phase: str, job: RayJob, n: int, *, points: list[dict[str, Any]] | None = None,
            seeds: Sequence[int] | None = None, params: Mapping[str, Any] | None = None) -> list[Any]:
        """``n`` trials of ``job.space``: OptunaSearch with the study's sampler and its history, ASHA on the
        first objective (FIFO with several objectives, as the default back-end does not prune them); or, with
        ``seeds``, ``params`` once per seed (no search, no stopping). Ray's results, in trial order."""
        from ray import tune
        from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

        from tastelab.external.ray_trainable import ExternalTrainable

        cfg = self.run.cfg
        scheduler: Any = FIFOScheduler()
        searcher: Any = None
        param_space: dict[str, Any] = {}
        if seeds is not None:
            param_space = {**dict(params or {}), SEED: tune.grid_search(list(seeds))}
            n = 1  # the grid: one trial per seed
        else:
            searcher = make_searcher(self.study, job, sampler=cfg.sampler, seed=cfg.seed, n=n, points=points)
            if not job.multi:
                scheduler = ASHAScheduler(time_attr=EPOCH, metric=job.metric, mode=job.mode, max_t=1_000_000,
                                          grace_period=cfg.asha_grace_period,
                                          reduction_factor=cfg.asha_reduction_factor)
        resources = {"cpu": cfg.cpus_per_trial, "gpu": cfg.gpus_per_trial}
        trainable = tune.with_resources(tune.with_parameters(ExternalTrainable, job=job), resources)
        name = self.study.study_name if phase == "search" else f"{self.study.study_name}-{phase}"
        tuner = tune.Tuner(
            trainable, param_space=param_space,
            tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=n,
                                        max_concurrent_trials=cfg.jobs, reuse_actors=False),
            run_config=tune.RunConfig(name=name, storage_path=str(self.run.out / "ray"), verbose=0))
        logger.info("Ray Tune, %s phase: %d trial(s), %s per trial, at most %d at once; Ray's results in %s",
                    phase, len(seeds) if seeds is not None else n, resources, cfg.jobs, self.run.out / "ray" / name)
        grid = tuner.fit()
        results = [grid[i] for i in range(len(grid))]
        return sorted(results, key=lambda r: trial_number(str((r.metrics or {}).get("trial_id") or "")))

    def record(self, job: RayJob, results: Sequence[Any], extra: Extra) -> None:
        for result in results:
            _record(self.study, job, result, extra)


def _cut_short(phase: str, results: Sequence[Any], n: int) -> bool:
    """Ray returns from an interrupted ``fit`` (Ctrl-C) with the trials it started: no later phase then."""
    if len(results) >= n:
        return False
    logger.warning("Ray Tune ran %d of the %s phase's %d trials (interrupted?); later phases skipped", len(results),
                   phase, n)
    return True


def run_with_ray(study: optuna.Study, run: _Run, *, baseline: Mapping[str, Any] | None) -> None:
    """The phases of ``run.cfg`` with Ray Tune -- the baseline as the searcher's first point, ``trials`` search
    trials, then the refine phase (the narrowed space and the seed re-runs, worked out by the same functions
    as the default back-end's) -- ``cpus_per_trial`` / ``gpus_per_trial`` per trial, ``jobs`` at once, every
    trial recorded in ``study`` as it is reached (the phases read the study)."""
    ray = import_ray()
    cfg = run.cfg
    cwd = Path(cfg.cwd).resolve() if cfg.cwd else Path.cwd()
    job = RayJob(settings=replace(run.settings, cwd=cwd), space=run.space, objectives=tuple(run.objectives),
                 out=run.out, cwd=Path.cwd(), seed=cfg.seed, env=dict(cfg.env), generator=run.generator,
                 judge_fn=run.judge_fn)
    ray_run = _Ray(run=run, study=study)
    started = False
    if not ray.is_initialized():
        ray.init(address=cfg.ray_address, include_dashboard=False)
        started = True
    try:
        n = (cfg.trials if "search" in cfg.phases else 0) + (1 if baseline is not None else 0)
        if n:
            results = ray_run.fit("search", job, n, points=[dict(baseline)] if baseline is not None else None)
            ray_run.record(job, results, lambda params, config: {
                "phase": "baseline" if baseline is not None and params == dict(baseline) else "search"})
            if _cut_short("search", results, n):
                return
        if "refine" not in cfg.phases:
            return
        narrowed = refine_space(study, run.space, cfg.refine_top_k)
        if narrowed is None:
            return
        target = refine_target(cfg)
        if target:
            refine_job = replace(job, space=narrowed)
            results = ray_run.fit("refine", refine_job, target)
            ray_run.record(refine_job, results, lambda params, config: {"phase": "refine"})
            if _cut_short("refine", results, target):
                return
        plan = seed_plan(study, run.space, cfg.refine_seeds, run.settings.command)
        if plan is not None and plan.todo:
            ray_run.record(job, ray_run.fit("seeds", job, len(plan.todo), seeds=plan.todo, params=plan.params),
                           lambda params, config: {"phase": "seeds", "seed_of": plan.best})
    finally:
        if started:
            ray.shutdown()
