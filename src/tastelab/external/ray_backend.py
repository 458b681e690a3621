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
  actor goes away.
- **One report**: when Ray is done, its trials are recorded into the same Optuna study (``--study`` or
  ``OUT/study.db``) with their values, per-epoch intermediate values and attributes, and
  :func:`~tastelab.external.study.finalize` writes the same ``tune_summary.json`` and ``study_report.html``.

Ray stays optional (the ``ray`` extra): it is imported only here and in ``ray_trainable``, only for
``--backend ray``; :func:`tune_external` sets up and finalises the study as for the default back-end. Each trial
actor loads its own base pipeline (checkpoints of one trial share it). A second invocation runs new trials
and adds them to the study; it does not resume a killed Ray run.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from tastelab.core.errors import UserError
from tastelab.external.ray_trial import EPOCH, RayJob, define_by_run, trial_number, trial_values
from tastelab.external.runner import Generator, JudgeFn, Objective, TrialSettings
from tastelab.tuning.space import SearchSpace

__all__ = ["check_ray_config", "import_ray", "run_with_ray"]

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


def check_ray_config(space: SearchSpace, objectives: Sequence[Objective], phases: Sequence[str]) -> None:
    """What the Ray back-end cannot do, and Ray itself, checked before any study or trial."""
    if len(objectives) > 1:
        raise UserError("--backend ray: one objective only (ASHA stops trials on one number); use the default "
                        "back-end for several objectives")
    extra = [p for p in phases if p not in ("baseline", "search")]
    if extra:
        raise UserError(f"--backend ray runs the baseline and search phases; {', '.join(extra)} needs the default "
                        "back-end (the same --study URL continues there)")
    slashed = [p.key for p in space.params if "/" in p.key]
    if slashed:
        raise UserError(f"--backend ray: parameter names may not contain '/' ({', '.join(slashed)}): Ray nests them")
    import_ray()


# ------------------------------------------------------------------------------------------ the study
def _record(study: optuna.Study, job: RayJob, result: Any, baseline: Mapping[str, Any] | None) -> None:
    """One Ray result (its config, every reported row, its error) as a finished trial of ``study``."""
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
        elif EPOCH in row and _finite(row.get(metric)):
            intermediate[int(row[EPOCH])] = float(row[metric])
    trial_id = str((result.metrics or {}).get("trial_id") or "")
    attrs: dict[str, Any] = {"phase": "baseline" if baseline is not None and params == dict(baseline) else "search",
                             "seed": job.seed, "params": json.loads(json.dumps(values, default=str)), "backend": "ray",
                             "ray_trial_id": trial_id}
    value = None
    if outcome is not None:
        state = TrialState.COMPLETE
        value = float(outcome["values"][metric])
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
        params=params, distributions=dists, value=value, state=state, intermediate_values=intermediate,
        user_attrs={k: v for k, v in attrs.items() if v is not None}))


def _finite(x: Any) -> bool:
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def run_with_ray(study: optuna.Study, cfg: Any, *, space: SearchSpace, objective: Objective,
                 settings: TrialSettings, out: Path, baseline: Mapping[str, Any] | None, generator: Generator | None,
                 judge_fn: JudgeFn | None) -> None:
    """Run ``cfg.trials`` trials (plus the baseline) with Ray Tune -- OptunaSearch with the study's sampler,
    ASHA on ``objective`` per epoch, ``cfg.cpus_per_trial`` / ``cfg.gpus_per_trial`` per trial, ``cfg.jobs`` at
    once -- and record them in ``study`` (``cfg``: the ExternalTuneConfig)."""
    from tastelab.tuning.storage import make_sampler

    ray = import_ray()
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    from tastelab.external.ray_trainable import ExternalTrainable

    cwd = Path(cfg.cwd).resolve() if cfg.cwd else Path.cwd()
    job = RayJob(settings=replace(settings, cwd=cwd), space=space, objective=objective, out=out, cwd=Path.cwd(),
                 seed=cfg.seed, env=dict(cfg.env), generator=generator, judge_fn=judge_fn)
    started = False
    if not ray.is_initialized():
        ray.init(address=cfg.ray_address, include_dashboard=False)
        started = True
    try:
        searcher = OptunaSearch(space=define_by_run(space), metric=job.metric, mode=job.mode,
                                points_to_evaluate=[dict(baseline)] if baseline is not None else None,
                                sampler=make_sampler(cfg.sampler, cfg.seed, trials=max(1, cfg.trials)))
        scheduler = ASHAScheduler(time_attr=EPOCH, metric=job.metric, mode=job.mode, max_t=1_000_000,
                                  grace_period=cfg.asha_grace_period, reduction_factor=cfg.asha_reduction_factor)
        resources = {"cpu": cfg.cpus_per_trial, "gpu": cfg.gpus_per_trial}
        trainable = tune.with_resources(tune.with_parameters(ExternalTrainable, job=job), resources)
        n = cfg.trials + (1 if baseline is not None else 0)
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=n,
                                        max_concurrent_trials=cfg.jobs, reuse_actors=False),
            run_config=tune.RunConfig(name=study.study_name, storage_path=str(out / "ray"), verbose=0))
        logger.info("Ray Tune: %d trial(s), %s per trial, at most %d at once; Ray's results in %s", n, resources,
                    cfg.jobs, out / "ray")
        grid = tuner.fit()
        results: list[Any] = [grid[i] for i in range(len(grid))]
        for result in sorted(results, key=lambda r: trial_number(str((r.metrics or {}).get("trial_id") or ""))):
            _record(study, job, result, baseline)
    finally:
        if started:
            ray.shutdown()
