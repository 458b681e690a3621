"""Study summaries (the content of ``tune_summary.json``), the Pareto-front CSV and rich tables."""

from __future__ import annotations

import csv
import datetime as _dt
import io
import json
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from optuna.exceptions import ExperimentalWarning
from optuna.study import StudyDirection
from optuna.trial import TrialState

from tastelab.core.atomic import write_text_atomic

if TYPE_CHECKING:
    import optuna
    from rich.console import Console

    from tastelab.tuning.objective import ObjectiveSpec
    from tastelab.tuning.space import SearchSpace

VALUE_DEFINITION = ("each objective is read at the trial's best epoch as chosen by the trainer's train.metric "
                    "(the epoch saved as best/), so the study ranks the model best-run/best actually holds")


def _clean(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


def _trial_row(t: optuna.trial.FrozenTrial, names: Sequence[str], space: SearchSpace | None,
               encoded: frozenset[str] = frozenset()) -> dict[str, Any]:
    if space is not None:
        params = space.decode_params(t.params)
    else:  # only the study: JSON-encoded choices (lists, mappings) are decoded from their text
        params = {k: json.loads(v) if k in encoded and isinstance(v, str) else v for k, v in t.params.items()}
    row: dict[str, Any] = {"trial": t.number, "state": t.state.name,
                           "values": dict(zip(names, map(_clean, t.values))) if t.values else None,
                           "params": params,
                           "duration_s": round(t.duration.total_seconds(), 2) if t.duration else None}
    if "best_epoch" in t.user_attrs:
        row["best_epoch"] = t.user_attrs["best_epoch"]
    if t.state == TrialState.PRUNED and t.intermediate_values:
        row["pruned_at_epoch"] = max(t.intermediate_values)
    if t.user_attrs.get("surplus"):
        row["surplus"] = True
    retried = t.system_attrs.get("failed_trial")
    if retried is not None:
        row["retry_of"] = retried
    return row


def best_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The best trial (single objective) or the Pareto front (several); empty before any COMPLETE."""
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return []
    if len(study.directions) == 1:
        return [study.best_trial]
    return list(study.best_trials)


def pick_best(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The trial to materialise: the best one, or the Pareto-front trial best on the first objective."""
    front = best_trials(study)
    if not front:
        return None
    sign = 1.0 if study.directions[0] == StudyDirection.MAXIMIZE else -1.0
    return max(front, key=lambda t: (sign * t.values[0], -t.number))


#: Where ``tune`` and ``tune --external`` record their objectives as ``NAME:DIRECTION`` (study user
#: attributes; also Optuna's metric names since this version) and their search spaces.
OBJECTIVES_ATTRS = ("tastelab.objectives", "tastelab.external.objectives")
SPACE_ATTRS = ("tastelab.space", "tastelab.external.space")


def record_objective_names(study: optuna.Study, names: Sequence[str]) -> None:
    """Name the study's values in Optuna itself (``study.metric_names``), so ``tune --show``, optuna-dashboard
    and plain Optuna code show the objectives' names instead of ``objective0``, ``objective1``."""
    if study.metric_names is None:
        with warnings.catch_warnings():  # experimental in Optuna (since 3.2), stable in use
            warnings.simplefilter("ignore", ExperimentalWarning)
            study.set_metric_names(list(names))


def stored_objectives(study: optuna.Study) -> list[ObjectiveSpec]:
    """The objectives a stored study optimises, by name: Optuna's metric names, else the ``NAME:DIRECTION``
    list either tune flow recorded (studies made before the metric names were set), else ``objectiveN``."""
    from tastelab.tuning.objective import ObjectiveSpec

    directions: list[Literal["maximize", "minimize"]] = [
        "maximize" if d == StudyDirection.MAXIMIZE else "minimize" for d in study.directions]
    names = study.metric_names
    if names is None or len(names) != len(directions):
        recorded = next((study.user_attrs[k] for k in OBJECTIVES_ATTRS if k in study.user_attrs), None)
        names = [_strip_direction(str(n)) for n in recorded] if isinstance(recorded, list) else None
    if names is None or len(names) != len(directions):
        names = [f"objective{i}" for i in range(len(directions))]
    return [ObjectiveSpec(n, d) for n, d in zip(names, directions, strict=True)]


def _strip_direction(text: str) -> str:
    """``metric:clip_score:maximize`` -> ``metric:clip_score`` (names may hold colons; the direction is last)."""
    name, _, direction = text.rpartition(":")
    return name if name and direction in ("maximize", "minimize") else text


def study_summary(study: optuna.Study, objectives: Sequence[ObjectiveSpec], *, space: SearchSpace | None = None,
                  trials_requested: int | None = None) -> dict[str, Any]:
    """JSON-able summary: counts per state, best trial, Pareto front (several objectives), every trial."""
    names = [o.name for o in objectives]
    stored_space = next((study.user_attrs[k] for k in SPACE_ATTRS if k in study.user_attrs), None) or {}
    encoded = frozenset(k for k, d in stored_space.items() if isinstance(d, dict) and d.get("encoded"))
    trials = study.get_trials(deepcopy=False)
    counts = {s.name: 0 for s in TrialState}
    for t in trials:
        counts[t.state.name] += 1
    best = pick_best(study)
    summary: dict[str, Any] = {
        "study": study.study_name,
        "objectives": [{"name": o.name, "direction": o.direction} for o in objectives],
        "value_definition": VALUE_DEFINITION,
        "trials_requested": trials_requested,
        "counts": counts,
        "best": None,
        "written_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if best is not None:
        summary["best"] = {**_trial_row(best, names, space, encoded), "val": best.user_attrs.get("val", {}),
                           "cost": best.user_attrs.get("cost", {})}
    if len(names) > 1:
        front = sorted(best_trials(study), key=lambda t: t.values[0],
                       reverse=study.directions[0] == StudyDirection.MAXIMIZE)
        summary["pareto_front"] = [_trial_row(t, names, space, encoded) for t in front]
    summary["surplus_trials"] = [t.number for t in trials if t.user_attrs.get("surplus")]
    summary["trials"] = [_trial_row(t, names, space, encoded) for t in trials]
    return summary


def write_pareto_csv(path: Path, summary: dict[str, Any]) -> None:
    """The Pareto front as a table: trial, one column per objective, one per parameter (JSON values)."""
    front = summary.get("pareto_front") or []
    names = [o["name"] for o in summary["objectives"]]
    keys = sorted({k for row in front for k in row["params"]})
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["trial", *names, *keys])
    for row in front:
        w.writerow([row["trial"], *(row["values"][n] for n in names),
                    *(json.dumps(row["params"].get(k)) if not isinstance(row["params"].get(k), str)
                      else row["params"][k] for k in keys)])
    write_text_atomic(path, buf.getvalue())


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
    if isinstance(v, str):
        return v
    return json.dumps(v)


def trials_table(summary: dict[str, Any], limit: int = 15, title: str | None = None) -> Any:
    """Finished trials, best first on the first objective (then pruned / failed / running)."""
    from rich.table import Table

    names = [o["name"] for o in summary["objectives"]]
    maximize = summary["objectives"][0]["direction"] == "maximize"
    rows = summary.get("trials", [])

    def key(r: dict[str, Any]) -> tuple:
        v = (r["values"] or {}).get(names[0])
        if r["state"] != "COMPLETE" or v is None:  # unfinished trials last, in trial order
            return (True, 0.0, r["trial"])
        return (False, -v if maximize else v, r["trial"])

    shown = sorted(rows, key=key)[:limit]
    param_keys = sorted({k for r in shown for k in r["params"]})
    table = Table(title=title or f"study {summary['study']}: {len(rows)} trials (top {len(shown)})")
    for col in ("trial", "state", *names, "epoch", *param_keys):
        table.add_column(col, justify="right" if col not in param_keys and col != "state" else "left")
    for r in shown:
        vals = r["values"] or {}
        epoch = r.get("best_epoch") or r.get("pruned_at_epoch")
        table.add_row(str(r["trial"]), r["state"], *(_fmt(vals.get(n)) for n in names), _fmt(epoch),
                      *(_fmt(r["params"].get(k)) for k in param_keys))
    return table


def print_summary(console: Console, summary: dict[str, Any], limit: int = 15) -> None:
    """Trials table, Pareto front (several objectives), best trial and where its run folder is."""
    console.print(trials_table(summary, limit))
    counts = {k: v for k, v in summary["counts"].items() if v}
    console.print("states: " + ", ".join(f"{k} {v}" for k, v in counts.items())
                  + (f"  (requested {summary['trials_requested']} finished)" if summary.get("trials_requested")
                     else ""))
    if summary.get("pareto_front"):
        front = {**summary, "trials": summary["pareto_front"]}
        console.print(trials_table(front, limit=len(summary["pareto_front"]),
                                   title=f"Pareto front ({len(summary['pareto_front'])} trials)"))
    best = summary.get("best")
    if not best:
        console.print("[yellow]no completed trial yet[/yellow]")
        return
    vals = ", ".join(f"{k} = {_fmt(v)}" for k, v in (best["values"] or {}).items())
    console.print(f"[bold]best trial {best['trial']}[/bold]: {vals}")
    console.print("params: " + json.dumps(best["params"], default=str))
    if best.get("run_dir"):
        console.print(f"best run ({best.get('source')}): {best['run_dir']}")
        console.print(f"score with: tastelab score IMAGES --model {Path(best['run_dir']) / 'best'}")
