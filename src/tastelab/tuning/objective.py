"""What a trial optimises and how one trial runs: a normal training run in ``OUT/trials/trial-NNNN``.

The value of a trial is the objective metric **at the trial's best epoch as chosen by the trainer's own
``train.metric``** (the epoch whose weights are saved as ``best/``), not the best value the objective
reached in any epoch. That is the model a user would actually keep and score with, so the study ranks
exactly what ``best-run/best`` delivers; picking each metric's own best epoch would report a model that
does not exist when the objective differs from ``train.metric``.

Cost objectives come from the finished run: ``cost/params`` (all parameters, backbone included),
``cost/trainable_params``, ``cost/model_bytes`` (size of the saved ``best/`` folder: head, adapter, and
the backbone only where it travels with the model) and ``cost/train_seconds``.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from tastelab.core.atomic import write_text_atomic
from tastelab.evaluation.metrics import metric_direction
from tastelab.training.config import load_train_config
from tastelab.tuning.space import apply_overrides

if TYPE_CHECKING:
    import optuna

    from tastelab.training.config import TrainConfig
    from tastelab.tuning.space import SearchSpace

logger = logging.getLogger(__name__)

COST_METRICS: dict[str, str] = {
    "cost/params": "total parameters (backbone + head)",
    "cost/trainable_params": "trainable parameters",
    "cost/model_bytes": "bytes of the saved best/ model folder",
    "cost/train_seconds": "training wall time of the trial",
}


@dataclass(frozen=True)
class ObjectiveSpec:
    """One optimised quantity: a validation metric (``val/...``) or a cost metric (``cost/...``)."""

    name: str
    direction: Literal["maximize", "minimize"]

    @property
    def per_epoch(self) -> bool:
        """Validation metrics exist after every epoch (pruning reports them); costs only at the end."""
        return self.name.startswith("val/")

    def value(self, summary: Mapping[str, Any]) -> float:
        """This objective's value from a trainer summary (see the module docstring for the choice)."""
        if self.name == "cost/params":
            return float(summary["parameters"]["total"])
        if self.name == "cost/trainable_params":
            return float(summary["parameters"]["trainable"])
        if self.name == "cost/model_bytes":
            return float(summary["model_size_bytes"])
        if self.name == "cost/train_seconds":
            return float(summary["train_seconds"])
        row = summary.get("best", {}).get("val") or {}
        if self.name not in row:
            have = sorted(k for k in row if k.startswith("val/"))
            raise KeyError(f"objective {self.name!r} is not among the metrics at the best epoch: {have or 'none'}"
                           " (is there a validation split?)")
        return float(row[self.name])


def parse_objective(text: str) -> ObjectiveSpec:
    """``val/srcc``, ``val/mae``, ``cost/params`` or any of them with ``:max`` / ``:min``.

    The default direction comes from :func:`tastelab.evaluation.metrics.metric_direction` (costs are
    minimised); a metric it does not know needs an explicit direction.
    """
    name, _, direction = text.strip().partition(":")
    name = name.strip()
    if not name.startswith(("val/", "cost/")):
        raise ValueError(f"objective {text!r}: use a validation metric (val/srcc, val/plcc, val/mae, val/pair_acc, "
                         f"...) or a cost metric ({', '.join(COST_METRICS)}); test metrics are never tuned on")
    if name.startswith("cost/") and name not in COST_METRICS:
        raise ValueError(f"objective {text!r}: unknown cost metric; known: {', '.join(COST_METRICS)}")
    direction = direction.strip().lower()
    if direction in ("max", "maximize", "maximise"):
        return ObjectiveSpec(name, "maximize")
    if direction in ("min", "minimize", "minimise"):
        return ObjectiveSpec(name, "minimize")
    if direction:
        raise ValueError(f"objective {text!r}: direction must be max or min")
    if name.startswith("cost/"):
        return ObjectiveSpec(name, "minimize")
    try:
        return ObjectiveSpec(name, "maximize" if metric_direction(name) == "max" else "minimize")
    except KeyError:
        raise ValueError(f"objective {text!r}: unknown metric direction; write {name}:max or {name}:min") from None


def trial_dir(out_dir: str | Path, number: int) -> Path:
    return Path(out_dir) / "trials" / f"trial-{number:04d}"


def build_trial_config(raw: Mapping[str, Any], overrides: Mapping[str, Any], base_dir: str | None,
                       cache_dir: str | None, label: str = "<space>") -> TrainConfig:
    """The validated TrainConfig of one trial: recipe + searched overrides + the shared feature cache."""
    merged = apply_overrides(raw, overrides, label)
    if cache_dir is not None:
        merged = apply_overrides(merged, {"train.cache_dir": cache_dir}, label)
    return load_train_config(raw=merged, base_dir=base_dir)


def drop_models(run_dir: Path, *, keep_models: bool = False, keep_checkpoints: bool = False) -> None:
    """Free a trial's disk: model folders and resumable checkpoints (metrics and summary stay)."""
    names = ([] if keep_models else ["best", "final"]) + ([] if keep_checkpoints else ["checkpoints"])
    for name in names:
        shutil.rmtree(run_dir / name, ignore_errors=True)


def _system_attrs(trial: optuna.trial.Trial) -> dict[str, Any]:
    """A running trial's system attrs (Optuna 5 dropped ``Trial.system_attrs``; the frozen trial has them)."""
    from optuna.trial import TrialState

    attrs = getattr(trial, "system_attrs", None)
    if attrs is not None:
        return dict(attrs)
    for t in trial.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if t.number == trial.number:
            return dict(t.system_attrs)
    return {}


class SurplusTrial(RuntimeError):
    """Raised at the start of a trial another worker's trial already makes unnecessary (recorded as FAIL)."""


def _is_surplus(trial: optuna.trial.Trial, total: int) -> bool:
    """Whether finished trials + trials started before this one already reach ``total``.

    Two workers can pass Optuna's MaxTrialsCallback at the same instant; trial numbers are allotted
    atomically by the storage, so the later-numbered trial is the one that yields.
    """
    from optuna.trial import TrialState

    done = before = 0
    for t in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED,
                                                              TrialState.RUNNING)):
        if t.state != TrialState.RUNNING:
            done += 1
        elif t.number < trial.number:
            before += 1
    return done + before >= total


@dataclass
class TrialObjective:
    """The Optuna objective: sample overrides, train one run, report epochs, return the objective(s)."""

    raw_config: dict[str, Any]
    base_dir: str | None
    space: SearchSpace
    objectives: tuple[ObjectiveSpec, ...]
    out_dir: str
    cache_dir: str | None
    prune: bool
    total: int | None = None
    trust_remote_code: bool = False  # the user's permission (tune's trust_remote_code), checked by the Trainer

    def __call__(self, trial: optuna.trial.Trial) -> float | list[float]:
        import optuna

        from tastelab.training.trainer import Trainer  # heavy (torch, accelerate): loaded in the trial, not by --show

        if self.total is not None and _is_surplus(trial, self.total):
            trial.set_user_attr("surplus", True)
            trial.study.stop()
            raise SurplusTrial(f"trial {trial.number} not run: the study already has {self.total} finished or "
                               "running trials (another worker got there first)")
        overrides = self.space.suggest(trial)
        run_dir = trial_dir(self.out_dir, trial.number)
        cfg = build_trial_config(self.raw_config, overrides, self.base_dir, self.cache_dir, self.space.source)
        trial.set_user_attr("run_dir", str(run_dir.resolve()))
        trial.set_user_attr("seed", cfg.seed)
        resume = self._resume_from_retry(trial, run_dir)
        info = {"number": trial.number, "study": trial.study.study_name, "overrides": overrides,
                "seed": cfg.seed, "objectives": [o.name for o in self.objectives]}
        write_text_atomic(run_dir / "trial.json", json.dumps(info, indent=2, default=str))
        first = self.objectives[0]
        report = len(self.objectives) == 1 and first.per_epoch

        def on_epoch(row: dict[str, Any]) -> None:
            value = row.get(first.name)
            if not report or value is None or not math.isfinite(value):
                return
            trial.report(float(value), step=int(row["epoch"]))
            if self.prune and trial.should_prune():
                info.update(state="PRUNED", pruned_at_epoch=row["epoch"])
                write_text_atomic(run_dir / "trial.json", json.dumps(info, indent=2, default=str))
                raise optuna.TrialPruned(f"trial {trial.number}: {first.name}={value:.4f} at epoch {row['epoch']}")

        logger.info("trial %d: %s", trial.number, json.dumps(overrides, default=str))
        try:
            summary = Trainer(cfg, run_dir, resume=resume, on_epoch=on_epoch,
                              trust_remote_code=self.trust_remote_code).fit()
        except optuna.TrialPruned:
            raise  # the janitor drops its models: a pruned trial is never the best
        except Exception:
            drop_models(run_dir)  # an error is not retried (only a dead worker's trial is): keep the logs
            raise
        values = [o.value(summary) for o in self.objectives]
        best = summary.get("best", {})
        trial.set_user_attr("best_epoch", best.get("epoch"))
        trial.set_user_attr("val", {k: v for k, v in (best.get("val") or {}).items()
                                    if k.startswith("val/") and isinstance(v, (int, float)) and math.isfinite(v)})
        trial.set_user_attr("cost", {name: ObjectiveSpec(name, "minimize").value(summary) for name in COST_METRICS})
        drop_models(run_dir, keep_models=True)  # checkpoints are only needed while the trial runs
        return values[0] if len(values) == 1 else values

    def _resume_from_retry(self, trial: optuna.trial.Trial, run_dir: Path) -> str:
        """A retried trial (its worker died) continues from the dead attempt's last checkpoint.

        Optuna's retry callback re-queues the same params as a new trial number; the dead attempt's
        folder is copied into the new one so the trainer resumes exactly where it stopped.
        """
        attrs = _system_attrs(trial)
        history = attrs.get("retry_history") or ([attrs["failed_trial"]] if "failed_trial" in attrs else [])
        if run_dir.exists():
            shutil.rmtree(run_dir)  # a leftover folder of another study in the same OUT
        for number in reversed(history):
            prev = trial_dir(self.out_dir, number)
            if (prev / "checkpoints" / "latest" / "state.json").exists():
                shutil.copytree(prev, run_dir)
                (run_dir / "summary.json").unlink(missing_ok=True)
                drop_models(prev)  # the copy carries on; the dead attempt keeps only its logs
                logger.info("trial %d retries trial %d from its last checkpoint", trial.number, number)
                return "auto"
        return "none"
