"""``tune_external()``: Optuna drives the user's own trainer, phase by phase, by the judge's composite.

Phases (each one resumable; counts are per phase and include what earlier invocations finished):

- ``baseline``: the trainer's default configuration (the space's ``default:`` values, ``baseline_params`` over
  them), enqueued first, so every later trial can be read against it;
- ``search``: ``trials`` trials from the sampler (TPE by default), pruned on the per-checkpoint composite;
- ``refine``: ``refine_trials`` trials in the space narrowed around the ``refine_top_k`` best trials (stored in
  the study the first time, so a resumed refine phase searches the same space), then the best configuration
  re-run with each of ``refine_seeds`` (the ``{seed}`` placeholder) to measure its spread.

``jobs`` trials run at once in threads of this process (the work is in the trainer subprocesses; judging
stays in-process), each pinned to its own GPU through ``CUDA_VISIBLE_DEVICES`` when GPUs are known
(``gpus``, else ``torch.cuda.device_count()``). Several machines share one study through a PostgreSQL URL
(:func:`tastelab.tuning.storage.make_storage`, with Optuna's heartbeat: a dead worker's trial is marked
failed and re-queued).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import queue
import signal
import statistics
import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.study import StudyDirection
from optuna.trial import TrialState
from pydantic import BaseModel, ConfigDict, Field, field_validator

from tastelab.core.atomic import write_text_atomic
from tastelab.core.errors import UserError
from tastelab.core.jsonutil import json_default
from tastelab.external.command import BUILTIN_PLACEHOLDERS, CommandTemplate
from tastelab.external.phases import (
    _ATTR_REFINE,
    SeedPlan,
    baseline_params,
    refine_space,
    refine_target,
    seed_plan,
)
from tastelab.external.process import kill_all
from tastelab.external.runner import (
    STOP,
    Generator,
    JudgeFn,
    Objective,
    TrainerFailed,
    TrialSettings,
    TrialStopped,
    parse_objectives,
    run_trial,
)
from tastelab.tuning.report import (
    OBJECTIVES_ATTRS,
    SPACE_ATTRS,
    record_objective_names,
    study_summary,
    write_pareto_csv,
)
from tastelab.tuning.space import SearchSpace, SpaceError, load_space
from tastelab.tuning.storage import make_pruner, make_sampler, make_storage, redact

__all__ = ["PHASES", "ExternalTuneConfig", "ExternalTuneResult", "GpuPool", "SeedPlan", "default_generator",
           "detect_gpus", "finalize", "refine_space", "refine_target", "seed_plan", "seed_spread", "trial_folder",
           "tune_external"]

logger = logging.getLogger(__name__)

PHASES = ("baseline", "search", "refine")
COUNTED = (TrialState.COMPLETE, TrialState.PRUNED)
_ATTR_OBJECTIVES = OBJECTIVES_ATTRS[1]
_ATTR_COMMAND = "tastelab.external.command"
_ATTR_SPACE = SPACE_ATTRS[1]
VALUE_DEFINITION = ("each objective is read at the trial's best checkpoint (the one with the highest judge "
                    "composite); intermediate values are each checkpoint's value, at its epoch (else step)")


class ExternalTuneConfig(BaseModel):
    """Everything ``tastelab tune --external`` takes (the CLI builds one; the API takes one or its fields)."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    command: str = Field(description="the trainer command with {placeholders}")
    space: Any = Field(description="search-space YAML path, mapping or SearchSpace (tastelab.tuning.space format)")
    out: str = Field(description="output folder: trials/trial-NNNN, tune_summary.json, study_report.html")
    judge: Any = None  # JudgeConfig, YAML path or mapping (None: the judge's defaults)
    trust_remote_code: bool = False  # the user's permission for the judge config's remote-code requests
    references: Any = None
    prompts: Any = None
    train_images: Any = None
    storage: str | None = None  # Optuna RDB URL (default sqlite:///OUT/study.db)
    study_name: str | None = None
    trials: int = Field(20, ge=0)
    phases: list[str] = Field(default_factory=lambda: ["search"])
    refine_trials: int | None = Field(None, ge=0)  # default: half of --trials (at least 1)
    refine_top_k: int = Field(3, ge=1)
    refine_seeds: list[int] = Field(default_factory=lambda: [1, 2, 3])
    baseline_params: dict[str, Any] = Field(default_factory=dict)
    objectives: list[str] = Field(default_factory=lambda: ["composite"])
    sampler: Any = "tpe"
    pruner: Any = "median"
    seed: int = 0
    jobs: int = Field(1, ge=1)
    gpus: list[str] | None = None
    trial_timeout: float | None = Field(None, gt=0)
    kill_grace: float = Field(10.0, ge=0)
    poll_interval: float = Field(2.0, gt=0)
    settle: float = Field(60.0, ge=0)
    quiet: float = Field(5.0, ge=0)  # a file unchanged this long is complete
    trial_reports: bool = True  # each trial's judge report.html; False: its leaderboard.json only
    watch: str = "auto"
    checkpoint_glob: str | None = None
    layout: str = "auto"
    expected_images: int | None = Field(None, ge=1)
    base: str | None = None  # the base model the generator loads LoRA checkpoints into
    gen_seeds: list[int] = Field(default_factory=lambda: [0, 1, 2, 3])
    shell: bool = False
    device: str = "auto"
    cwd: str | None = None  # the trainer's working folder (default: the current one)
    env: dict[str, str] = Field(default_factory=dict)
    heartbeat_interval: int = Field(30, ge=1)
    grace_period: int | None = None
    max_retry: int | None = 2
    max_consecutive_failures: int = Field(5, ge=1)
    backend: str = "optuna"  # "ray": Ray Tune runs the trials (OptunaSearch + ASHA), see external/ray_backend.py
    gpus_per_trial: float = Field(0.0, ge=0)  # --backend ray: Ray resources of one trial
    cpus_per_trial: float = Field(1.0, gt=0)
    ray_address: str | None = None  # --backend ray: an existing cluster (None: RAY_ADDRESS, else a local Ray)
    asha_grace_period: int = Field(1, ge=1)  # --backend ray: epochs every trial runs before ASHA may stop it
    asha_reduction_factor: float = Field(2.0, gt=1)

    @field_validator("backend")
    @classmethod
    def _backend(cls, v: str) -> str:
        if v not in ("optuna", "ray"):
            raise ValueError("backend must be optuna or ray")
        return v

    @field_validator("phases", mode="before")
    @classmethod
    def _phases(cls, v: Any) -> list[str]:
        items = [p.strip() for p in (v.split(",") if isinstance(v, str) else v) if p and p.strip()]
        if items == ["all"]:
            return list(PHASES)
        bad = [p for p in items if p not in PHASES]
        if bad or not items:
            raise ValueError(f"unknown phase(s) {bad or items}; use {', '.join(PHASES)} or all")
        return [p for p in PHASES if p in items]  # always in this order

    @field_validator("gpus", mode="before")
    @classmethod
    def _gpus(cls, v: Any) -> list[str] | None:
        if v is None:
            return None
        items = v.split(",") if isinstance(v, str) else list(v)
        return [str(g).strip() for g in items if str(g).strip()]

    @field_validator("watch")
    @classmethod
    def _watch(cls, v: str) -> str:
        if v not in ("auto", "checkpoints", "samples"):
            raise ValueError("watch must be auto, checkpoints or samples")
        return v


@dataclass
class ExternalTuneResult:
    """What :func:`tune_external` returns (the content of ``tune_summary.json`` plus paths)."""

    study_name: str
    storage: str
    out_dir: Path
    best_trial: int | None
    best_values: dict[str, float]
    best_params: dict[str, Any]
    best_checkpoint: str | None
    best_epoch: int | None
    seed_spread: dict[str, Any] | None
    pareto_front: list[dict[str, Any]]
    summary_path: Path
    report_path: Path
    summary: dict[str, Any] = field(repr=False)


# ------------------------------------------------------------------------------------------ generator
def default_generator(base: str | None, prompts: Any, seeds: Sequence[int], *, device: str = "auto") -> Generator:
    """The generator used for LoRA checkpoints: a :class:`tastelab.generate.SampleGenerator` with the study's
    base model, prompts and seeds. The base pipeline is loaded on the first checkpoint and kept for every
    later one in this process (each LoRA is unloaded after its checkpoint); diffusers is the optional
    ``generate`` extra, checked here, before any trial starts."""
    if not base or prompts is None:
        raise UserError("--watch checkpoints needs --base MODEL and --prompts FILE to generate each checkpoint's "
                        "samples (or --watch samples when the trainer writes sample images itself)")
    gen = _import_generate()
    holder: list[Any] = []  # the SampleGenerator, made on first use (a Ray worker makes its own)

    def generate(checkpoint: Path, out: Path) -> None:
        config = gen.GenerateConfig(base=base, loras=[str(checkpoint)], prompts=prompts, seeds=list(seeds),
                                    out=str(out), device=device)
        if not holder:
            holder.append(gen.SampleGenerator(config))
        holder[0].generate(config)

    return generate


def _import_generate() -> Any:
    """``tastelab.generate`` once diffusers is known to be installed (the package itself imports lazily, so
    importing it proves nothing: the check looks for diffusers)."""
    missing = [name for name in ("diffusers", "torch") if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError("generating samples from LoRA checkpoints needs the generate extra: pip install "
                        f"'tastelab[generate]' ({' and '.join(missing)} not installed)")
    import tastelab.generate as gen

    return gen


# ------------------------------------------------------------------------------------------ GPUs
class GpuPool:
    """One GPU per running trial: ``acquire`` blocks until one is free; None when there are no GPUs."""

    def __init__(self, gpus: Sequence[str]) -> None:
        self.gpus = list(gpus)
        self._free: queue.Queue[str] = queue.Queue()
        for g in self.gpus:
            self._free.put(g)

    def acquire(self) -> str | None:
        return self._free.get() if self.gpus else None

    def release(self, gpu: str | None) -> None:
        if gpu is not None:
            self._free.put(gpu)


def detect_gpus() -> list[str]:
    """``torch.cuda.device_count()`` GPUs as ids ("0", "1", ...); none without torch or CUDA."""
    try:  # optional here: a CPU-only machine without torch runs trials unpinned
        import torch
    except ImportError:
        return []
    return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


# ------------------------------------------------------------------------------------------ the objective
def _jsonable(values: Mapping[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(dict(values), default=str))


@dataclass
class _Run:
    """The live objects of one invocation (not picklable: threads only)."""

    cfg: ExternalTuneConfig
    space: SearchSpace
    objectives: tuple[Objective, ...]
    settings: TrialSettings
    out: Path
    pool: GpuPool
    generator: Generator | None
    judge_fn: JudgeFn | None


def trial_folder(out: Path, number: int) -> Path:
    """``OUT/trials/trial-NNNN``, fresh: a leftover folder of that number (another storage's study in the
    same OUT) is moved aside, never deleted."""
    path = out / "trials" / f"trial-{number:04d}"
    if path.exists():
        aside = path.with_name(f"{path.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
        logger.warning("%s exists (from an earlier study?); moved to %s", path, aside.name)
        path.rename(aside)
    path.mkdir(parents=True)
    return path


class _Objective:
    def __init__(self, run: _Run, phase: str, space: SearchSpace) -> None:
        self.run, self.phase, self.space = run, phase, space

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, ...]:
        run = self.run
        phase = trial.user_attrs.get("phase") or self.phase
        seed = int(trial.user_attrs.get("seed", run.cfg.seed))
        trial.set_user_attr("phase", phase)
        trial.set_user_attr("seed", seed)
        chosen = self.space.suggest(trial)
        trial.set_user_attr("params", _jsonable(chosen))
        values: dict[str, Any] = {p.key: "" for p in run.space.params}  # inactive (conditional): empty text
        values.update(chosen)
        tdir = trial_folder(run.out, trial.number)
        trial.set_user_attr("trial_dir", str(tdir))
        gpu = run.pool.acquire()
        env = {**os.environ, **run.cfg.env, "TASTELAB_TRIAL_NUMBER": str(trial.number),
               "TASTELAB_TRIAL_DIR": str(tdir)}
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu
            trial.set_user_attr("gpu", gpu)
        prune = len(run.objectives) == 1 and phase in ("search", "refine")
        multi = len(run.objectives) > 1

        def report(step: int, value: float) -> bool:
            if multi:  # Optuna keeps no intermediate values for several objectives
                return False
            trial.report(value, step)
            return prune and trial.should_prune()

        try:
            outcome = run_trial(run.settings, values, tdir, report, number=trial.number, seed=seed, env=env,
                                generator=run.generator, judge_fn=run.judge_fn)
        except TrialStopped as exc:
            trial.set_user_attr("pruned_at", exc.step)
            raise optuna.TrialPruned(str(exc)) from None
        except TrainerFailed as exc:
            trial.set_user_attr("error", str(exc))
            trial.set_user_attr("log_tail", exc.log_tail[-4000:])
            trial.set_user_attr("returncode", exc.returncode)
            logger.error("trial %d failed: %s\n%s", trial.number, exc, exc.log_tail[-2000:])
            raise
        finally:
            run.pool.release(gpu)
        for key, value in outcome.attrs().items():
            trial.set_user_attr(key, value)
        vals = tuple(outcome.values[o.name] for o in run.objectives)
        return vals[0] if len(vals) == 1 else vals


# ------------------------------------------------------------------------------------------ phases
def _phase_trials(study: optuna.Study, phase: str, states: Sequence[TrialState],
                  where: Callable[[optuna.trial.FrozenTrial], bool] | None = None) -> list[optuna.trial.FrozenTrial]:
    return [t for t in study.get_trials(deepcopy=False, states=tuple(states))
            if t.user_attrs.get("phase") == phase and (where is None or where(t))]


class _PhaseDone:
    """Stop optimize() once the phase has its trials (finished or running, across every worker)."""

    def __init__(self, phase: str, target: int, where: Callable[..., bool] | None, failures: int) -> None:
        self.phase, self.target, self.where, self.limit, self.failed = phase, target, where, failures, 0

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        self.failed = self.failed + 1 if trial.state == TrialState.FAIL else 0
        if self.failed >= self.limit:
            logger.error("%d trials in a row failed; stopping (see the trainer logs in the trial folders)",
                         self.failed)
            study.stop()
        elif len(_phase_trials(study, self.phase, (*COUNTED, TrialState.RUNNING), self.where)) >= self.target:
            study.stop()


def _run_phase(run: _Run, study: optuna.Study, phase: str, space: SearchSpace, target: int,
               where: Callable[[optuna.trial.FrozenTrial], bool] | None = None) -> None:
    """Run trials of ``phase`` until ``target`` of them are finished (COMPLETE or PRUNED)."""
    objective = _Objective(run, phase, space)
    for _ in range(max(3, 2 * target)):  # bounded: each round either finishes trials or stops on failures
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)  # a dead worker's RUNNING trial: FAIL + re-queued
        finished = len(_phase_trials(study, phase, COUNTED, where))
        running = len(_phase_trials(study, phase, (TrialState.RUNNING,), where))
        todo = target - finished - running
        if todo <= 0:
            return
        logger.info("phase %s: %d of %d trials finished; running %d", phase, finished, target, todo)
        done = _PhaseDone(phase, target, where, run.cfg.max_consecutive_failures)
        study.optimize(objective, n_trials=todo, n_jobs=min(run.cfg.jobs, todo), catch=(Exception,),
                       callbacks=[done], gc_after_trial=False)
        if done.failed >= done.limit or STOP.is_set():
            return
        if len(_phase_trials(study, phase, COUNTED, where)) == finished:
            logger.warning("phase %s: no trial finished in this round; stopping it", phase)
            return


def _refine(run: _Run, study: optuna.Study) -> None:
    narrowed = refine_space(study, run.space, run.cfg.refine_top_k)
    if narrowed is None:
        return
    target = refine_target(run.cfg)
    if target:
        _run_phase(run, study, "refine", narrowed, target)
    if STOP.is_set():
        return
    plan = seed_plan(study, run.space, run.cfg.refine_seeds, run.settings.command)
    if plan is None:
        return
    for s in plan.todo:
        study.enqueue_trial(plan.params, user_attrs={"phase": "seeds", "seed": s, "seed_of": plan.best})
    _run_phase(run, study, "seeds", run.space, len(run.cfg.refine_seeds),
               where=lambda t: t.user_attrs.get("seed_of") == plan.best)


def seed_spread(study: optuna.Study) -> dict[str, Any] | None:
    """The best configuration's values over its seed re-runs (plus its own run): mean and std."""
    seeded = _phase_trials(study, "seeds", (TrialState.COMPLETE,))
    if not seeded:
        return None
    of = seeded[-1].user_attrs.get("seed_of")
    runs = [t for t in seeded if t.user_attrs.get("seed_of") == of]
    original = study.trials[of] if of is not None and of < len(study.trials) else None
    if original is not None and original.state == TrialState.COMPLETE \
            and original.user_attrs.get("seed") not in {t.user_attrs.get("seed") for t in runs}:
        runs = [original, *runs]
    values = [float(t.values[0]) for t in runs]
    return {"trial": of, "params": runs[0].user_attrs.get("params"),
            "runs": [{"trial": t.number, "seed": t.user_attrs.get("seed"), "value": v,
                      "best_checkpoint": t.user_attrs.get("best_checkpoint")} for t, v in zip(runs, values)],
            "mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


# ------------------------------------------------------------------------------------------ set-up
def _trial_settings(cfg: ExternalTuneConfig, command: CommandTemplate, objectives: tuple[Objective, ...],
                    watch: str) -> TrialSettings:
    from tastelab.judge.config import JudgeConfig, config_remote_code, load_judge_config

    judge_cfg = cfg.judge
    if judge_cfg is None:
        judge_cfg = JudgeConfig()
    elif isinstance(judge_cfg, Mapping):
        judge_cfg = load_judge_config(raw=dict(judge_cfg))
    elif not isinstance(judge_cfg, JudgeConfig):
        judge_cfg = load_judge_config(judge_cfg)
    config_remote_code(judge_cfg, trust_remote_code=cfg.trust_remote_code,  # refused before any trial
                       source=cfg.judge)
    return TrialSettings(command=command, objectives=objectives, watch=watch, checkpoint_glob=cfg.checkpoint_glob,
                         layout=cfg.layout, poll_s=cfg.poll_interval, settle_s=cfg.settle, quiet_s=cfg.quiet,
                         trial_report=cfg.trial_reports,
                         expected_images=cfg.expected_images, timeout_s=cfg.trial_timeout, grace_s=cfg.kill_grace,
                         references=cfg.references, prompts=cfg.prompts, train_images=cfg.train_images,
                         judge_config=judge_cfg, trust_remote_code=cfg.trust_remote_code, device=cfg.device,
                         cwd=Path(cfg.cwd) if cfg.cwd else None, env=dict(cfg.env))


def _check_study(study: optuna.Study, objectives: Sequence[Objective], command: str, space: SearchSpace) -> None:
    names = [f"{o.name}:{o.direction}" for o in objectives]
    attrs = study.user_attrs
    if _ATTR_OBJECTIVES not in attrs:
        record_objective_names(study, [o.name for o in objectives])
        study.set_user_attr(_ATTR_OBJECTIVES, names)
        study.set_user_attr(_ATTR_COMMAND, command)
        study.set_user_attr(_ATTR_SPACE, space.to_dict())
        return
    if attrs[_ATTR_OBJECTIVES] != names:
        raise UserError(f"study {study.study_name!r} optimises {attrs[_ATTR_OBJECTIVES]}, not {names}; use "
                        "another --study-name")
    record_objective_names(study, [o.name for o in objectives])  # a study made before they were set
    if attrs.get(_ATTR_COMMAND) != command:
        logger.warning("study %r was started with another trainer command; trials may not be comparable",
                       study.study_name)
    if attrs.get(_ATTR_SPACE) != space.to_dict():
        logger.warning("study %r was started with another search space; values are compared anyway",
                       study.study_name)


class _Once(logging.Filter):
    """Pass each distinct judge warning once: every checkpoint's judge run would repeat it."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()
        self.lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        with self.lock:
            if text in self.seen:
                return False
            self.seen.add(text)
        return True


_JUDGE_LOGGERS = ("tastelab.judge.run", "tastelab.judge.composite", "tastelab.judge.samples")


@dataclass
class _SigInt:
    """On Ctrl-C: tell every running trial to stop its trainer, then raise KeyboardInterrupt as usual."""

    previous: Any = None

    def __enter__(self) -> _SigInt:
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        STOP.set()
        raise KeyboardInterrupt

    def __exit__(self, *exc: object) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def tune_external(config: ExternalTuneConfig | None = None, /, *, generator: Generator | None = None,
                  judge_fn: JudgeFn | None = None, **fields: Any) -> ExternalTuneResult:
    """Tune an external trainer: ``tune_external(ExternalTuneConfig(...))`` or ``tune_external(command=...,
    space=..., out=..., ...)`` (the fields of :class:`ExternalTuneConfig`).

    ``generator(checkpoint, out_folder)`` writes a LoRA checkpoint's samples (default: tastelab.generate with
    ``base``, ``prompts`` and ``gen_seeds``); ``judge_fn`` replaces :func:`tastelab.judge.judge` (tests).
    Everything is validated before the first trial: the space, every placeholder, the judge configuration,
    the objectives, the generator's availability, the GPUs.
    """
    cfg = config if config is not None else ExternalTuneConfig(**fields)
    if config is not None and fields:
        cfg = cfg.model_copy(update=fields)
    try:
        space = cfg.space if isinstance(cfg.space, SearchSpace) else load_space(cfg.space)
    except SpaceError as exc:
        raise UserError(str(exc).splitlines()[0]) from None
    command = CommandTemplate.parse(cfg.command, shell=cfg.shell)
    command.check(p.key for p in space.params)
    clash = sorted({p.key for p in space.params} & set(BUILTIN_PLACEHOLDERS))
    if clash:
        raise UserError(f"{space.source}: {', '.join(clash)} is filled by the tuner; rename the parameter")
    objectives = parse_objectives(cfg.objectives)
    watch = cfg.watch if cfg.watch != "auto" else ("checkpoints" if cfg.base or generator else "samples")
    if watch == "checkpoints" and generator is None:
        generator = default_generator(cfg.base, cfg.prompts, cfg.gen_seeds, device=cfg.device)
    baseline = baseline_params(space, cfg.baseline_params) if "baseline" in cfg.phases else None
    settings = _trial_settings(cfg, command, objectives, watch)
    if cfg.backend == "ray":
        from tastelab.external.ray_backend import check_ray_config

        check_ray_config(space)  # and Ray installed: before any study is touched
        gpus: list[str] = []
    else:
        gpus = list(cfg.gpus) if cfg.gpus is not None else detect_gpus()
    if gpus and cfg.jobs > len(gpus):
        raise UserError(f"--jobs {cfg.jobs} needs {cfg.jobs} GPUs to pin each trial to its own; "
                        f"{len(gpus)} known ({','.join(gpus)}): lower --jobs or list more with --gpus")
    pruner = cfg.pruner if len(objectives) == 1 else "none"
    out = Path(cfg.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    url = cfg.storage or f"sqlite:///{out / 'study.db'}"
    name = cfg.study_name or "external"
    storage = make_storage(url, heartbeat_interval=cfg.heartbeat_interval, grace_period=cfg.grace_period,
                           max_retry=cfg.max_retry)
    # A storage other machines may share: mix the process and clock into the sampler's seed, or workers started
    # together would propose the same configurations (a local SQLite study stays reproducible from --seed).
    seed = cfg.seed if cfg.storage is None else int(
        np.random.SeedSequence([cfg.seed, os.getpid(), time.time_ns() % (1 << 32)]).generate_state(1)[0])
    sampler = make_sampler(cfg.sampler, seed, n_objectives=len(objectives), trials=max(1, cfg.trials))
    study = optuna.create_study(storage=storage, study_name=name, load_if_exists=True, sampler=sampler,
                                pruner=make_pruner(pruner),
                                directions=[StudyDirection.MAXIMIZE if o.direction == "maximize"
                                            else StudyDirection.MINIMIZE for o in objectives])
    _check_study(study, objectives, cfg.command, space)
    run = _Run(cfg=cfg, space=space, objectives=objectives, settings=settings, out=out, pool=GpuPool(gpus),
               generator=generator, judge_fn=judge_fn)
    if cfg.backend == "ray":
        from tastelab.external.ray_backend import run_with_ray

        run_with_ray(study, run, baseline=baseline)
        return finalize(study, run, url)
    logger.info("study %r in %s: phases %s; objectives %s; trials in %s", name, redact(url), ",".join(cfg.phases),
                ", ".join(f"{o.name} ({o.direction})" for o in objectives), out / "trials")
    STOP.clear()
    once = _Once()
    for name in _JUDGE_LOGGERS:
        logging.getLogger(name).addFilter(once)
    try:
        with _SigInt():
            if baseline is not None:
                if not [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get("phase") == "baseline"
                        and t.state != TrialState.FAIL]:
                    study.enqueue_trial(baseline, user_attrs={"phase": "baseline"})
                _run_phase(run, study, "baseline", space, 1)
            if "search" in cfg.phases and cfg.trials and not STOP.is_set():
                _run_phase(run, study, "search", space, cfg.trials)
            if "refine" in cfg.phases and not STOP.is_set():
                _refine(run, study)
    except KeyboardInterrupt:
        STOP.set()
        kill_all()
        raise
    finally:
        STOP.clear()
        for name in _JUDGE_LOGGERS:
            logging.getLogger(name).removeFilter(once)
    return finalize(study, run, url)


# ------------------------------------------------------------------------------------------ results
def _row_extras(t: optuna.trial.FrozenTrial) -> dict[str, Any]:
    a = t.user_attrs
    keys = ("phase", "seed", "best_checkpoint", "best_checkpoint_path", "best_step", "composite", "composite_low",
            "composite_high", "leaderboard", "judge_report", "train_seconds", "gpu", "trial_dir", "error",
            "log_tail", "warnings", "timed_out", "pruned_at")
    extra = {k: a[k] for k in keys if k in a and a[k] not in (None, [], "")}
    if t.intermediate_values:
        extra["intermediate"] = {str(k): v for k, v in sorted(t.intermediate_values.items())}
    return extra


def finalize(study: optuna.Study, run: _Run, url: str) -> ExternalTuneResult:
    """``tune_summary.json``, ``pareto_front.csv`` (several objectives) and ``study_report.html``."""
    from tastelab.external.report import write_study_report

    out = run.out
    summary = study_summary(study, run.objectives, space=run.space)  # type: ignore[arg-type]
    summary["value_definition"] = VALUE_DEFINITION
    summary["storage"] = redact(url)
    summary["out_dir"] = str(out)
    summary["command"] = run.cfg.command
    summary["phases"] = run.cfg.phases
    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}

    def extend(row: dict[str, Any] | None) -> None:
        if row is None:
            return
        t = by_number[row["trial"]]
        if t.user_attrs.get("params") is not None:
            row["params"] = t.user_attrs["params"]  # includes values the refine phase fixed
        row.update(_row_extras(t))

    for row in summary["trials"]:
        extend(row)
    for row in summary.get("pareto_front", []):
        extend(row)
    best_row = summary.get("best")
    if best_row is not None:
        best_row.pop("val", None)
        best_row.pop("cost", None)
        extend(best_row)
    summary["seed_spread"] = seed_spread(study)
    refine = study.user_attrs.get(_ATTR_REFINE)
    if refine is not None:
        summary["refine_space"] = refine
    if len(run.objectives) > 1:
        write_pareto_csv(out / "pareto_front.csv", summary)
    path = out / "tune_summary.json"
    write_text_atomic(path, json.dumps(summary, indent=2, default=json_default))
    report = write_study_report(study, summary, out / "study_report.html")
    best = best_row or {}
    return ExternalTuneResult(study_name=study.study_name, storage=summary["storage"], out_dir=out,
                              best_trial=best.get("trial"), best_values=best.get("values") or {},
                              best_params=best.get("params") or {}, best_checkpoint=best.get("best_checkpoint_path")
                              or best.get("best_checkpoint"), best_epoch=best.get("best_epoch"),
                              seed_spread=summary["seed_spread"], pareto_front=summary.get("pareto_front", []),
                              summary_path=path, report_path=report, summary=summary)

