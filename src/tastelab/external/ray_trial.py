"""One ``--backend ray`` trial without Ray: what the Ray trainable runs, and the space's one home.

:class:`TrialThread` runs :func:`~tastelab.external.runner.run_trial` in a thread of the trial's actor: each
judged checkpoint becomes one result (the first objective and ``epoch``; none with several objectives, as
Optuna keeps no intermediate values for them), the end a final result (``done``, every objective), and
:meth:`TrialThread.stop` -- Ray's clean-up when a scheduler stops the trial -- cancels it, which terminates the
trainer's whole process group. :func:`define_by_run` is OptunaSearch's space (the project's own
``SearchSpace.suggest``), and :func:`trial_values` turns a trial's config back into the trainer's values with
the same code on an ``optuna.trial.FixedTrial``. Nothing here imports Ray (tested without a cluster).
"""

from __future__ import annotations

import json
import os
import queue
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna

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

__all__ = ["EPOCH", "SEED", "RayJob", "TrialThread", "define_by_run", "trial_number", "trial_values"]

EPOCH = "epoch"  # ASHA's time attribute: the judged checkpoint's epoch (else step), as Optuna's pruner sees it
SEED = "tastelab_seed"  # a config key that is no parameter: the seed re-runs' {seed} (else RayJob.seed)


@dataclass(frozen=True)
class _Suggest:
    """A picklable define-by-run function (Ray pickles its searcher's state with plain pickle)."""

    space: SearchSpace

    def __call__(self, trial: optuna.Trial) -> None:
        self.space.suggest(trial)


def define_by_run(space: SearchSpace) -> Callable[[optuna.Trial], None]:
    """OptunaSearch's ``space``: the project's own define-by-run sampling (conditional parameters included)."""
    return _Suggest(space)


def trial_values(space: SearchSpace, config: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any],
                                                                          dict[str, Any]]:
    """A Ray trial's config (Optuna's stored values) -> (the trainer's values, Optuna params, distributions),
    by running the same :meth:`SearchSpace.suggest` on a :class:`optuna.trial.FixedTrial` (``SEED`` is no
    parameter: left out)."""
    fixed = optuna.trial.FixedTrial({k: v for k, v in config.items() if k != SEED})
    chosen = space.suggest(fixed)  # type: ignore[arg-type]  # FixedTrial: the suggest_* API of a Trial
    return chosen, dict(fixed.params), dict(fixed.distributions)


@dataclass
class RayJob:
    """What every Ray trial of one phase needs (pickled once into Ray's object store): the shared trial
    settings, the phase's space (the refine phase's is the narrowed one), the objectives, the study folder and
    the tuner's working folder."""

    settings: TrialSettings
    space: SearchSpace
    objectives: tuple[Objective, ...]
    out: Path
    cwd: Path
    seed: int = 0
    env: dict[str, str] = field(default_factory=dict)
    generator: Generator | None = None
    judge_fn: JudgeFn | None = None

    @property
    def multi(self) -> bool:
        """Several objectives: no intermediate results, no early stopping (as the default back-end)."""
        return len(self.objectives) > 1

    @property
    def metric(self) -> str:
        """The first objective: the one each checkpoint reports and ASHA stops on."""
        return self.objectives[0].name

    @property
    def mode(self) -> str:
        return self.modes[0]

    @property
    def metrics(self) -> list[str]:
        return [o.name for o in self.objectives]

    @property
    def modes(self) -> list[str]:
        return ["max" if o.direction == "maximize" else "min" for o in self.objectives]

    def seed_of(self, config: Mapping[str, Any]) -> int:
        """The trial's ``{seed}``: the seed re-run's own (``SEED`` in its config), else the study's."""
        return int(config.get(SEED, self.seed))


def trial_number(trial_id: str) -> int:
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
        self.seed = job.seed_of(config)
        self.number = trial_number(trial_id)
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
        """run_trial's ``report``: one Ray result per judged checkpoint; True once Ray stopped the trial. With
        several objectives nothing is sent (a result must carry every objective, and there is nothing to decide
        on: Optuna keeps no intermediate values for several objectives, and no scheduler stops such trials)."""
        if not self.job.multi:
            self._events.put(("result", {self.job.metric: float(value), EPOCH: int(step)}))
        return self._cancel.is_set()

    def _run(self) -> None:
        job = self.job
        values: dict[str, Any] = {p.key: "" for p in job.space.params}  # inactive (conditional): empty text
        values.update(self.values)
        env = {**os.environ, **job.env, "TASTELAB_TRIAL_NUMBER": str(self.number),
               "TASTELAB_TRIAL_DIR": str(self.trial_dir)}  # Ray's CUDA_VISIBLE_DEVICES is in os.environ
        try:
            outcome = run_trial(job.settings, values, self.trial_dir, self.report, number=self.number,
                                seed=self.seed, env=env, generator=job.generator, judge_fn=job.judge_fn,
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
        attrs = outcome.attrs()
        last = max((c["report_step"] for c in outcome.checkpoints), default=0)
        record = {"values": outcome.values, "trial_dir": str(self.trial_dir), **attrs}
        final = {name: float(outcome.values[name]) for name in job.metrics}
        self._events.put(("done", {**final, EPOCH: last, "outcome": json.dumps(record, default=str)}))

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
