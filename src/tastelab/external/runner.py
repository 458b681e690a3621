"""One trial of an external trainer, independent of Optuna: ``run_trial(params, trial_dir, report)``.

This is the seam every back-end drives (Optuna here; a Ray Tune trainable can wrap the same function): it
fills the command, runs the trainer (:mod:`~tastelab.external.process`), and while it runs turns every
complete checkpoint or sample set (:mod:`~tastelab.external.watcher`) into a judged composite --
generating the checkpoint's samples first when it is a LoRA file -- and hands it to ``report(step, value)``;
``report`` returning True stops the trainer (pruning). Judging uses one metric cache per trial, so each
checkpoint costs only its own new images, and the last judge run (all checkpoints, outputs written) reads
every value from that cache.

A trainer that exits non-zero (or runs past its time limit) still yields a result when some checkpoint was
judged (with a warning); with none it raises :class:`TrainerFailed` carrying the log's tail.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tastelab.core.atomic import write_text_atomic
from tastelab.core.errors import UserError
from tastelab.external.command import CommandTemplate
from tastelab.external.process import TrainerProcess, tail
from tastelab.external.watcher import INTERNAL_DIR, Unit, Watcher
from tastelab.judge.outputs import leaderboard_records
from tastelab.judge.samples import Sample, discover_samples

__all__ = ["FAMILY_OBJECTIVES", "Generator", "Objective", "TrainerFailed", "TrialOutcome", "TrialSettings",
           "TrialStopped", "parse_objectives", "run_trial"]

logger = logging.getLogger(__name__)

#: ``generator(checkpoint, out_folder)``: write sample images of one LoRA checkpoint into ``out_folder``
#: (any layout the judge reads, e.g. tastelab.generate's one folder per checkpoint plus a manifest).
Generator = Callable[[Path, Path], None]
JudgeFn = Callable[..., Any]

FAMILY_OBJECTIVES = ("consistency", "alignment", "quality", "aesthetics", "diversity")
_MINIMISED = {"train_time"}

STOP = threading.Event()  # set on Ctrl-C: every running trial stops its trainer and ends


class TrialStopped(Exception):
    """``report`` asked to stop (pruning); the trainer has been terminated."""

    def __init__(self, step: int, value: float) -> None:
        super().__init__(f"pruned at step {step} (value {value:.4g})")
        self.step, self.value = step, value


class TrainerFailed(Exception):
    """The trainer produced nothing that could be judged; ``log_tail`` says why."""

    def __init__(self, message: str, log_tail: str, returncode: int | None) -> None:
        super().__init__(message)
        self.log_tail, self.returncode = log_tail, returncode


class Interrupted(KeyboardInterrupt):
    """Ctrl-C in the tuner: the trial's trainer was terminated."""


@dataclass(frozen=True)
class Objective:
    """``composite`` (the judge's), ``composite_low`` (its CI's lower bound), ``train_time`` (seconds, minimised),
    a family (``consistency``, ``diversity``, ...: its 0..1 score) or ``metric:NAME`` (that metric's
    normalised score), read at the trial's best checkpoint (best by composite)."""

    name: str
    direction: str

    def value(self, row: Any, seconds: float) -> float:
        if self.name == "train_time":
            return float(seconds)
        if self.name == "composite":
            return float(row.composite)
        if self.name == "composite_low":
            return float(row.composite_low)
        if self.name in FAMILY_OBJECTIVES:
            return float(row.family_scores.get(self.name, math.nan))
        return float(row.metric_scores.get(self.name.split(":", 1)[1], math.nan))


def parse_objectives(names: Sequence[str]) -> tuple[Objective, ...]:
    """``["composite", "train_time:min"]`` -> objectives (default direction: minimise train_time, maximise
    the rest); unknown names and duplicates are one-line errors."""
    out: list[Objective] = []
    for raw in names:
        name, _, direction = raw.strip().partition(":")
        if name == "metric" and direction:  # metric:NAME[:dir]
            metric, _, direction = direction.partition(":")
            name = f"metric:{metric}"
        if not (name in ("composite", "composite_low", "train_time", *FAMILY_OBJECTIVES)
                or (name.startswith("metric:") and len(name) > 7)):
            raise UserError(f"--objectives: unknown objective {raw!r}; use composite, composite_low, train_time, "
                            f"{', '.join(FAMILY_OBJECTIVES)} or metric:NAME, optionally with :max or :min")
        if direction in ("max", "maximize"):
            direction = "maximize"
        elif direction in ("min", "minimize"):
            direction = "minimize"
        elif direction == "":
            direction = "minimize" if name in _MINIMISED else "maximize"
        else:
            raise UserError(f"--objectives: {raw!r}: direction must be max or min")
        out.append(Objective(name, direction))
    if not out:
        raise UserError("--objectives: name at least one objective (e.g. composite)")
    if len({o.name for o in out}) != len(out):
        raise UserError(f"--objectives: an objective is listed twice: {', '.join(names)}")
    return tuple(out)


@dataclass
class TrialSettings:
    """What one trial needs besides its parameters (shared by every trial of a study)."""

    command: CommandTemplate
    objectives: tuple[Objective, ...] = (Objective("composite", "maximize"),)
    watch: str = "samples"
    checkpoint_glob: str | None = None
    layout: str = "auto"
    poll_s: float = 2.0
    settle_s: float = 60.0
    quiet_s: float = 5.0
    trial_report: bool = True  # each trial's judge report.html (+ scores.parquet); False: leaderboard.json only
    expected_images: int | None = None
    timeout_s: float | None = None
    grace_s: float = 10.0
    references: Any = None
    prompts: Any = None
    train_images: Any = None
    judge_config: Any = None
    trust_remote_code: bool = False  # the user's permission for the judge config's remote-code requests
    device: str = "auto"
    cwd: Path | None = None  # the trainer's working folder (None: the tuner's, where relative paths were typed)
    env: Mapping[str, str] = field(default_factory=dict)  # extra environment for every trial


@dataclass
class TrialOutcome:
    """A finished trial: objective values at the best checkpoint and how it went."""

    values: dict[str, float]
    best: dict[str, Any]
    checkpoints: list[dict[str, Any]]
    train_seconds: float
    returncode: int | None
    timed_out: bool
    warnings: list[str]
    log_tail: str
    judge_dir: Path | None

    def attrs(self) -> dict[str, Any]:
        """The trial's record (the study's user attributes, whichever back-end ran it; summary and report read
        them)."""
        best = self.best
        return {"best_checkpoint": best["checkpoint"], "best_checkpoint_path": best["path"],
                "best_epoch": best["epoch"], "best_step": best["step"], "composite": best["composite"],
                "composite_low": best["composite_low"], "composite_high": best["composite_high"],
                "leaderboard": best["leaderboard"], "judge_report": best["report"], "checkpoints": self.checkpoints,
                "train_seconds": self.train_seconds, "returncode": self.returncode, "timed_out": self.timed_out,
                "warnings": self.warnings}


def _position(unit: Unit, judged: list[dict[str, Any]]) -> int:
    """The step Optuna sees: the epoch, else the step, else one past the last reported (the final save)."""
    pos = unit.epoch if unit.epoch is not None else unit.step
    if pos is not None:
        return pos
    return max((c["report_step"] for c in judged), default=0) + 1


def _unit_samples(unit: Unit, trial_dir: Path, generator: Generator | None) -> list[Sample]:
    """The samples of one unit, named after it (generated for a checkpoint file or folder)."""
    if unit.path is None:
        return list(unit.samples)
    if generator is None:
        raise UserError("checkpoints are watched but no sample generator is set (give --base and --prompts)")
    out = trial_dir / INTERNAL_DIR / "samples" / unit.name
    out.mkdir(parents=True, exist_ok=True)
    generator(unit.path, out)
    found = discover_samples(out)
    return [replace(s, checkpoint=unit.name, epoch=unit.epoch, step=unit.step) for s in found]


def run_trial(settings: TrialSettings, params: Mapping[str, Any], trial_dir: Path,
              report: Callable[[int, float], bool], *, number: int = 0, seed: int = 0,
              env: Mapping[str, str] | None = None, generator: Generator | None = None,
              judge_fn: JudgeFn | None = None, cancel: Callable[[], bool] | None = None) -> TrialOutcome:
    """Train with ``params`` in ``trial_dir`` (which must exist), judging checkpoints as they appear.

    ``params``: the placeholder values (space keys; every key the command names). ``report(step, value)``
    gets each checkpoint's value of the first objective and returns True to stop the trial (then
    :class:`TrialStopped` is raised). ``env``: the trainer's full environment (None: inherit). ``cancel()``
    returning True (checked every poll: a scheduler stopped the trial between reports) stops it the same way.
    """
    if judge_fn is None:
        from tastelab.judge.run import judge  # the judge's module graph is heavy: loaded on the first trial

        judge_fn = judge
    run_judge: JudgeFn = judge_fn
    values = {**params, "trial_dir": str(trial_dir), "trial_number": number, "seed": seed}
    argv = settings.command.fill(values)
    log_path = trial_dir / "trainer.log"
    cache = trial_dir / INTERNAL_DIR / "judge" / ".judge_cache.sqlite"
    watcher = Watcher(trial_dir, settings.watch, checkpoint_glob=settings.checkpoint_glob, layout=settings.layout,
                      settle_s=settings.settle_s, expected_images=settings.expected_images,
                      quiet_s=settings.quiet_s)
    first = settings.objectives[0]
    proc = TrainerProcess(argv, log_path, cwd=settings.cwd, env=env, grace_s=settings.grace_s)
    judged: list[dict[str, Any]] = []
    samples: list[Sample] = []
    warnings: list[str] = []

    def judge_units(units: list[Unit]) -> None:
        for unit in units:
            unit_samples = _unit_samples(unit, trial_dir, generator)
            if not unit_samples:
                warnings.append(f"checkpoint {unit.name}: no sample images; skipped")
                continue
            result = run_judge(unit_samples, references=settings.references, prompts=settings.prompts,
                              config=settings.judge_config, train_images=settings.train_images, cache=cache,
                              progress=False, device=settings.device,
                              trust_remote_code=settings.trust_remote_code)
            row = result.leaderboard.row(unit.name)
            value = first.value(row, proc.seconds)
            samples.extend(unit_samples)
            step = _position(unit, judged)
            entry: dict[str, Any] = {"checkpoint": unit.name, "epoch": unit.epoch, "step": unit.step,
                     "path": str(unit.path) if unit.path else None, "composite": _finite(row.composite),
                     "report_step": step, "seconds": round(proc.seconds, 2)}
            judged.append(entry)
            if not math.isfinite(value):
                warnings.append(f"checkpoint {unit.name}: {first.name} is not a number (nothing measured); "
                                "not reported")
                logger.warning("trial %d: %s", number, warnings[-1])
                continue
            logger.info("trial %d: %s %s = %.4f", number, unit.name, first.name, value)
            if report(step, value):
                raise TrialStopped(step, value)

    def check_cancel() -> None:
        if cancel is not None and cancel():
            last = judged[-1] if judged else None
            raise TrialStopped(last["report_step"] if last else 0,
                               math.nan if last is None or last["composite"] is None else last["composite"])

    def tick() -> None:
        if STOP.is_set():
            raise Interrupted()
        check_cancel()
        judge_units(watcher.poll())

    logger.info("trial %d: %s", number, CommandTemplate.display(argv))
    try:
        proc.start()
    except OSError as exc:
        raise TrainerFailed(f"cannot start the trainer: {exc}", tail(log_path), None) from None
    code, timed_out = proc.wait(tick, poll_s=settings.poll_s, timeout_s=settings.timeout_s)
    seconds = proc.seconds
    check_cancel()
    judge_units(watcher.poll(final=True))  # the trainer is gone: whatever it left is complete
    log_tail = tail(log_path)
    if code != 0 or timed_out:
        why = f"ran past --trial-timeout ({settings.timeout_s:g}s)" if timed_out else f"exited with code {code}"
        if not any(c["composite"] is not None for c in judged):
            raise TrainerFailed(f"the trainer {why} without a checkpoint that could be judged", log_tail, code)
        warnings.append(f"the trainer {why}; the {len(judged)} checkpoint(s) judged before count")
        logger.warning("trial %d: %s", number, warnings[-1])
    if not judged:
        raise TrainerFailed("the trainer finished without writing a checkpoint or sample images the watcher "
                            "recognises (check --watch / --checkpoint-glob / --layout)", log_tail, code)

    # final judge run: every checkpoint, outputs (leaderboard, report.html) written; all values cached
    out = trial_dir / INTERNAL_DIR / "judge"
    result = run_judge(samples, references=settings.references, prompts=settings.prompts,
                      config=settings.judge_config, train_images=settings.train_images, cache=cache,
                      out=out if settings.trial_report else None, progress=False, device=settings.device,
                      trust_remote_code=settings.trust_remote_code)
    if not settings.trial_report:
        write_text_atomic(out / "leaderboard.json", json.dumps(leaderboard_records(result), indent=2) + "\n")
    board = result.leaderboard
    rows = [r for r in board.rows if math.isfinite(r.composite)]
    if not rows:
        raise TrainerFailed("no checkpoint got a composite score (no judge metric measured anything)", log_tail, code)
    best = max(rows, key=lambda r: (r.composite, -r.rank))
    info = next(c for c in judged if c["checkpoint"] == best.checkpoint)
    for c in judged:
        c["composite"] = _finite(board.row(c["checkpoint"]).composite)
    outcome_values = {o.name: o.value(best, seconds) for o in settings.objectives}
    bad = [k for k, v in outcome_values.items() if not math.isfinite(v)]
    if bad:
        raise TrainerFailed(f"objective(s) {', '.join(bad)} not measured at the best checkpoint {best.checkpoint}",
                            log_tail, code)
    best_info = {"checkpoint": best.checkpoint, "epoch": info["epoch"], "step": info["step"], "path": info["path"],
                 "composite": float(best.composite), "composite_low": _finite(best.composite_low),
                 "composite_high": _finite(best.composite_high), "recommended": result.recommended,
                 "leaderboard": str(out / "leaderboard.json"),
                 "report": str(out / "report.html") if settings.trial_report else None}
    return TrialOutcome(values=outcome_values, best=best_info, checkpoints=judged, train_seconds=round(seconds, 2),
                        returncode=code, timed_out=timed_out, warnings=warnings, log_tail=log_tail, judge_dir=out)


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None
