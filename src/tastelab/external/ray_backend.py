"""``tune --external --backend ray``: Ray Tune runs the trials, for clusters.

Why it is built this way:

- **One home for the space**: Ray's :class:`~ray.tune.search.optuna.OptunaSearch` takes a define-by-run
  function, and that function is :meth:`SearchSpace.suggest` itself; a trial's config (Optuna's stored values)
  is turned back into the trainer's values by running the same ``suggest`` on an ``optuna.trial.FixedTrial``,
  which also yields the distributions the trials are recorded with. No second translation of the YAML.
- **One trial function**: every Ray trial is :func:`~tastelab.external.runner.run_trial` in a thread of the
  trial's actor (:class:`TrialThread`): each judged checkpoint becomes one Ray result (the objective and
  ``epoch``), ASHA (``time_attr="epoch"``) decides on it, and when Ray stops the trial its ``cleanup`` cancels
  the thread, which terminates the trainer's whole process group before the actor goes away.
- **One report**: when Ray is done, its trials are recorded into the same Optuna study (``--study`` or
  ``OUT/study.db``) with their values, per-epoch intermediate values and attributes, and
  :func:`~tastelab.external.study.finalize` writes the same ``tune_summary.json`` and ``study_report.html``.

Ray stays optional (the ``ray`` extra): it is imported only here, only for ``--backend ray``. Each trial
actor loads its own base pipeline (checkpoints of one trial share it). A second invocation runs new trials
and adds them to the study; it does not resume a killed Ray run.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import queue
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from optuna.study import StudyDirection
from optuna.trial import TrialState

from tastelab.core.errors import UserError
from tastelab.external.runner import (
    Generator,
    JudgeFn,
    Objective,
    TrainerFailed,
    TrialSettings,
    TrialStopped,
    run_trial,
)
from tastelab.tuning.space import SearchSpace

if TYPE_CHECKING:
    from tastelab.external.study import ExternalTuneConfig, ExternalTuneResult

__all__ = ["EPOCH", "RayJob", "TrialThread", "define_by_run", "import_ray", "trial_values", "tune_with_ray"]

logger = logging.getLogger(__name__)

EPOCH = "epoch"  # ASHA's time attribute: the judged checkpoint's epoch (else step), as Optuna's pruner sees it


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


def define_by_run(space: SearchSpace) -> Callable[[optuna.Trial], None]:
    """OptunaSearch's ``space``: the project's own define-by-run sampling (conditional parameters included)."""

    def suggest(trial: optuna.Trial) -> None:
        space.suggest(trial)

    return suggest


def trial_values(space: SearchSpace, config: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any],
                                                                          dict[str, Any]]:
    """A Ray trial's config (Optuna's stored values) -> (the trainer's values, Optuna params, distributions),
    by running the same :meth:`SearchSpace.suggest` on a :class:`optuna.trial.FixedTrial`."""
    fixed = optuna.trial.FixedTrial(dict(config))
    chosen = space.suggest(fixed)  # type: ignore[arg-type]  # FixedTrial: the suggest_* API of a Trial
    return chosen, dict(fixed.params), dict(fixed.distributions)


@dataclass
class RayJob:
    """What every Ray trial needs (pickled once into Ray's object store): the shared trial settings, the
    space, the first objective, the study folder and the tuner's working folder."""

    settings: TrialSettings
    space: SearchSpace
    objective: Objective
    out: Path
    cwd: Path
    seed: int = 0
    env: dict[str, str] = field(default_factory=dict)
    generator: Generator | None = None
    judge_fn: JudgeFn | None = None

    @property
    def metric(self) -> str:
        return self.objective.name

    @property
    def mode(self) -> str:
        return "max" if self.objective.direction == "maximize" else "min"


def _trial_number(trial_id: str) -> int:
    """Ray's trial ids end in a running count (``3f2a1_00004``): the number the trainer sees."""
    tail = trial_id.rsplit("_", 1)[-1]
    return int(tail) if tail.isdigit() else 0


class TrialThread:
    """:func:`run_trial` in a background thread: each reported checkpoint becomes a result for Ray, the
    trial's end a final result (``done``), and :meth:`stop` cancels it (the trainer's group is terminated)
    and waits until it is. Independent of Ray, so it is tested without a cluster."""

    def __init__(self, job: RayJob, config: Mapping[str, Any], trial_id: str) -> None:
        self.job, self.trial_id = job, trial_id
        self.values, self.params, _ = trial_values(job.space, config)
        self.number = _trial_number(trial_id)
        self.trial_dir = job.out / "trials" / f"trial-{trial_id}"
        self._events: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._cancel = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"tastelab-trial-{trial_id}", daemon=True)

    def start(self) -> None:
        if self.job.cwd.is_dir():  # Ray starts actors in its own folders; the command's paths are the tuner's
            os.chdir(self.job.cwd)
        self.trial_dir.mkdir(parents=True, exist_ok=True)
        self._thread.start()

    def report(self, step: int, value: float) -> bool:
        """run_trial's ``report``: one Ray result per judged checkpoint; True once Ray stopped the trial."""
        self._events.put(("result", {self.job.metric: float(value), EPOCH: int(step)}))
        return self._cancel.is_set()

    def _run(self) -> None:
        from tastelab.external.study import outcome_attrs

        job = self.job
        values: dict[str, Any] = {p.key: "" for p in job.space.params}  # inactive (conditional): empty text
        values.update(self.values)
        env = {**os.environ, **job.env, "TASTELAB_TRIAL_NUMBER": str(self.number),
               "TASTELAB_TRIAL_DIR": str(self.trial_dir)}  # Ray's CUDA_VISIBLE_DEVICES is in os.environ
        try:
            outcome = run_trial(job.settings, values, self.trial_dir, self.report, number=self.number,
                                seed=job.seed, env=env, generator=job.generator, judge_fn=job.judge_fn,
                                cancel=self._cancel.is_set)
        except TrialStopped:
            self._events.put(("stopped", None))
            return
        except TrainerFailed as exc:
            self._events.put(("error", RuntimeError(f"{exc}\n--- trainer log (tail) ---\n{exc.log_tail[-4000:]}")))
            return
        except BaseException as exc:  # a judge or generator error: Ray marks the trial as errored
            self._events.put(("error", exc))
            return
        attrs = outcome_attrs(outcome)
        last = max((c["report_step"] for c in outcome.checkpoints), default=0)
        record = {"values": outcome.values, "trial_dir": str(self.trial_dir), **attrs}
        self._events.put(("done", {job.metric: float(outcome.values[job.metric]), EPOCH: last,
                                   "outcome": json.dumps(record, default=str)}))

    def next_result(self) -> dict[str, Any]:
        """Block until the next checkpoint's result (or the final one, with ``done``); errors are raised."""
        kind, payload = self._events.get()
        if kind == "result":
            return dict(payload)
        if kind == "done":
            return {**payload, "done": True}
        if kind == "error":
            raise payload
        return {"done": True}  # stopped: Ray asked for it, nothing more to say

    def stop(self, timeout: float | None = None) -> None:
        """Cancel the trial (the trainer's process group is terminated at its next poll) and wait for it."""
        self._cancel.set()
        if self._thread.is_alive():
            grace = self.job.settings.grace_s + 5 * self.job.settings.poll_s + 30
            self._thread.join(timeout if timeout is not None else grace)


# ------------------------------------------------------------------------------------------ the study
def _record(study: optuna.Study, job: RayJob, result: Any, baseline: Mapping[str, Any] | None) -> None:
    """One Ray result (its config, every reported row, its error) as a finished trial of ``study``."""
    from tastelab.external.study import jsonable

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
                             "seed": job.seed, "params": jsonable(values), "backend": "ray",
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


def tune_with_ray(cfg: ExternalTuneConfig, *, space: SearchSpace, objectives: tuple[Objective, ...],
                  settings: TrialSettings, baseline: Mapping[str, Any] | None, generator: Generator | None,
                  judge_fn: JudgeFn | None) -> ExternalTuneResult:
    """Run ``cfg.trials`` trials (plus the baseline) with Ray Tune: OptunaSearch with the study's sampler,
    ASHA on the first objective per epoch, ``cpus_per_trial`` / ``gpus_per_trial`` per trial, ``jobs`` at once;
    then record them in the Optuna study and write the same summary and report as the Optuna back-end."""
    from tastelab.external.study import GpuPool, RunContext, check_study, finalize
    from tastelab.tuning.storage import make_sampler, make_storage, redact

    if len(objectives) > 1:
        raise UserError("--backend ray: one objective only (ASHA stops trials on one number); use the default "
                        "back-end for several objectives")
    extra = [p for p in cfg.phases if p not in ("baseline", "search")]
    if extra:
        raise UserError(f"--backend ray runs the baseline and search phases; {', '.join(extra)} needs the default "
                        "back-end (the same --study URL continues there)")
    slashed = [p.key for p in space.params if "/" in p.key]
    if slashed:
        raise UserError(f"--backend ray: parameter names may not contain '/' ({', '.join(slashed)}): Ray nests them")
    ray = import_ray()
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    from tastelab.external.ray_trainable import ExternalTrainable

    out = Path(cfg.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    url = cfg.storage or f"sqlite:///{out / 'study.db'}"
    name = cfg.study_name or "external"
    first = objectives[0]
    cwd = Path(cfg.cwd).resolve() if cfg.cwd else Path.cwd()
    job = RayJob(settings=replace(settings, cwd=cwd), space=space, objective=first, out=out, cwd=Path.cwd(),
                 seed=cfg.seed, env=dict(cfg.env), generator=generator, judge_fn=judge_fn)
    storage = make_storage(url, heartbeat_interval=cfg.heartbeat_interval, grace_period=cfg.grace_period,
                           max_retry=cfg.max_retry)
    study = optuna.create_study(storage=storage, study_name=name, load_if_exists=True,
                                direction=StudyDirection.MAXIMIZE if first.direction == "maximize"
                                else StudyDirection.MINIMIZE)
    check_study(study, objectives, cfg.command, space)

    started = False
    if not ray.is_initialized():
        ray.init(address=cfg.ray_address, include_dashboard=False, log_to_driver=True)
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
            run_config=tune.RunConfig(name=name, storage_path=str(out / "ray"), verbose=0))
        logger.info("Ray Tune: %d trial(s), %s per trial, at most %d at once; results in %s", n, resources,
                    cfg.jobs, out / "ray")
        grid = tuner.fit()
        results: list[Any] = [grid[i] for i in range(len(grid))]
        for result in sorted(results, key=lambda r: _trial_number(str((r.metrics or {}).get("trial_id") or ""))):
            _record(study, job, result, baseline)
    finally:
        if started:
            ray.shutdown()
    run = RunContext(cfg=cfg, space=space, objectives=objectives, settings=settings, out=out,
                     pool=GpuPool([]), generator=generator, judge_fn=judge_fn)
    logger.info("study %r in %s: %d Ray trial(s) recorded", name, redact(url), len(grid))
    return finalize(study, run, url)

