"""The phases' parameter logic: the baseline configuration, the refine phase's narrowed space, its number of
trials and its seed re-runs -- one home that both back-ends (the threads of study.py and ray_backend.py) read.

Why narrowing keeps Optuna's distributions compatible: a study stores one distribution per parameter name and
refuses a categorical whose choices change, so the refine space narrows numeric ranges (same ``log`` flag,
same step grid) and, for a categorical, fixes the value when all the top trials agree and keeps every choice
otherwise.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.study import StudyDirection
from optuna.trial import TrialState

from tastelab.core.errors import UserError
from tastelab.external.command import CommandTemplate
from tastelab.tuning.space import Param, SearchSpace, load_space

__all__ = ["SeedPlan", "baseline_params", "narrow_space", "refine_space", "refine_target", "seed_plan", "space_to_yaml"]

logger = logging.getLogger(__name__)
#: Where the refine phase's narrowed space is stored in the study (both back-ends read it).
_ATTR_REFINE = "tastelab.external.refine_space"


def baseline_params(space: SearchSpace, given: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The trainer's default configuration: ``given`` (``--baseline-params``) over the space's ``default:``
    values. Every active searched parameter needs a value; the result is Optuna's stored form (for
    ``enqueue_trial``)."""
    given = dict(given or {})
    by_key = {p.key: p for p in space.params}
    unknown = sorted(set(given) - set(by_key))
    if unknown:
        raise UserError(f"--baseline-params: {', '.join(unknown)} not in the space {space.source}")
    missing: list[str] = []

    def get(p: Param) -> Any:
        if p.kind == "fixed":
            return p.value
        if p.key in given:
            return _coerce(p, given[p.key])
        if p.has_default:
            return p.default
        missing.append(p.key)
        return p.first()

    chosen = space.resolve(get)
    if missing:
        raise UserError(f"the baseline phase needs a value for {', '.join(missing)}: add `default:` to the space "
                        f"{space.source} or pass --baseline-params KEY=VALUE")
    return {k: by_key[k].stored(v) for k, v in chosen.items() if by_key[k].kind != "fixed"}


def _coerce(p: Param, value: Any) -> Any:
    """A ``--baseline-params`` value (text from the command line, or a Python value) for parameter ``p``."""
    if p.kind in ("int", "float") and isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise UserError(f"--baseline-params {p.key}={value!r}: expected a number") from None
    if p.kind == "int":
        if float(value) != int(value):
            raise UserError(f"--baseline-params {p.key}={value!r}: expected an integer")
        value = int(value)
    elif p.kind == "float":
        value = float(value)
        if not math.isfinite(value):
            raise UserError(f"--baseline-params {p.key}={value!r}: not a finite number")
    if p.kind in ("int", "float"):
        assert p.low is not None and p.high is not None
        if not p.low <= value <= p.high:
            raise UserError(f"--baseline-params {p.key}={value!r}: outside the space's [{p.low}, {p.high}]")
        return value
    if p.kind == "categorical":
        for choice in p.choices:
            if choice == value or (isinstance(value, str) and str(choice) == value):
                return choice
        raise UserError(f"--baseline-params {p.key}={value!r}: not one of {list(p.choices)}")
    return value


def _spec(p: Param) -> Any:
    """A parameter back in the space YAML format."""
    if p.kind == "fixed":
        spec: dict[str, Any] = {"type": "fixed", "value": p.value}
    elif p.kind == "categorical":
        spec = {"type": "categorical", "choices": list(p.choices)}
    else:
        spec = {"type": p.kind, "low": p.low, "high": p.high}
        if p.step is not None:
            spec["step"] = p.step
        if p.log:
            spec["log"] = True
    if p.when:
        spec["when"] = {k: list(v) for k, v in p.when}
    if p.has_else:
        spec["else"] = p.otherwise
    return spec


def space_to_yaml(space: SearchSpace) -> dict[str, Any]:
    """The space as the mapping :func:`load_space` reads (stored in the study for the refine phase)."""
    return {"params": {p.key: _spec(p) for p in space.params}}


def narrow_space(space: SearchSpace, top: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The space narrowed to the top trials' configurations (decoded values, best first): each numeric
    parameter to their min..max (widened by a grid step or 10 % of the range -- a factor 1.5 on a log scale --
    when they all agree, and clipped to the original bounds), each categorical fixed when they agree."""
    if not top:
        raise ValueError("narrow_space needs at least one trial")
    params: dict[str, Any] = {}
    for p in space.params:
        spec = _spec(p)
        seen = [t[p.key] for t in top if p.key in t]
        if p.kind in ("int", "float") and seen:
            assert p.low is not None and p.high is not None
            lo, hi = min(seen), max(seen)
            if lo == hi:
                if p.log:
                    lo, hi = lo / 1.5, hi * 1.5
                else:
                    pad = p.step or (p.high - p.low) * 0.1
                    lo, hi = lo - pad, hi + pad
            lo, hi = max(lo, p.low), min(hi, p.high)
            if p.step:  # stay on the original grid (Optuna's distribution is anchored at low)
                lo = p.low + math.ceil((lo - p.low) / p.step - 1e-9) * p.step
                hi = p.low + math.floor((hi - p.low) / p.step + 1e-9) * p.step
            if p.kind == "int":
                lo, hi = int(math.ceil(lo)), int(math.floor(hi))
            else:
                lo, hi = float(lo), float(hi)
            spec.update(low=lo, high=max(lo, hi))
        elif p.kind == "categorical" and seen:
            labels = {repr(v) for v in seen}
            if len(labels) == 1:
                spec = {"type": "fixed", "value": seen[0], **{k: v for k, v in spec.items()
                                                               if k in ("when", "else")}}
        params[p.key] = spec
    if all(s.get("type") == "fixed" for s in params.values()):
        return space_to_yaml(space)  # only categoricals, all agreed: nothing narrower left to search
    return {"params": params}


def load_narrowed(raw: Mapping[str, Any], source: str) -> SearchSpace:
    """The stored refine space (a mapping) as a :class:`SearchSpace`."""
    return load_space(raw, label=f"{source} (refine)")


def _completed(study: optuna.Study, exclude_phase: str = "seeds") -> list[optuna.trial.FrozenTrial]:
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.user_attrs.get("phase") != exclude_phase]


def _ranked(study: optuna.Study, trials: list[optuna.trial.FrozenTrial]) -> list[optuna.trial.FrozenTrial]:
    """Best first on the first objective (several objectives: the Pareto front first)."""
    sign = 1.0 if study.directions[0] == StudyDirection.MAXIMIZE else -1.0
    front: set[int] = set()
    if len(study.directions) > 1:
        front = {t.number for t in study.best_trials if t.user_attrs.get("phase") != "seeds"}
    return sorted(trials, key=lambda t: (t.number not in front if front else False, -sign * t.values[0], t.number))


def refine_space(study: optuna.Study, space: SearchSpace, top_k: int) -> SearchSpace | None:
    """The refine phase's space, for both back-ends: ``space`` narrowed around the ``top_k`` best completed
    trials (:func:`_ranked`), stored in the study the first time so a resumed refine phase (or the other
    back-end on the same study) searches the same one. None (with a warning) when no trial completed."""
    raw = study.user_attrs.get(_ATTR_REFINE)
    if raw is None:
        top = _ranked(study, _completed(study))[:top_k]
        if not top:
            logger.warning("refine: no completed trial to narrow the space around; skipped")
            return None
        raw = narrow_space(space, [t.user_attrs.get("params") or space.decode_params(t.params) for t in top])
        raw = json.loads(json.dumps(raw, default=str))
        study.set_user_attr(_ATTR_REFINE, raw)
        logger.info("refine: space narrowed around trials %s", [t.number for t in top])
    return load_narrowed(raw, space.source)


def refine_target(cfg: Any) -> int:
    """How many refine trials: ``cfg.refine_trials`` (an ExternalTuneConfig), by default half of ``cfg.trials``
    (at least 1)."""
    return cfg.refine_trials if cfg.refine_trials is not None else max(1, cfg.trials // 2)


@dataclass(frozen=True)
class SeedPlan:
    """The refine phase's seed re-runs: the best trial (``seed_of``), its configuration in Optuna's stored form
    (for ``enqueue_trial`` or a Ray config) and the seeds not yet run for it (FAILed ones are run again)."""

    best: int
    params: dict[str, Any]
    todo: list[int]


def seed_plan(study: optuna.Study, space: SearchSpace, seeds: Sequence[int],
              command: CommandTemplate) -> SeedPlan | None:
    """What the seed re-runs are, for both back-ends; None without seeds or a completed trial."""
    if not seeds:
        return None
    ranked = _ranked(study, _completed(study))
    if not ranked:
        return None
    best = ranked[0]
    params = best.user_attrs.get("params") or space.decode_params(best.params)
    by_key = {p.key: p for p in space.params}
    stored = {k: by_key[k].stored(v) for k, v in params.items() if k in by_key and by_key[k].kind != "fixed"}
    if "seed" not in command.names:
        logger.warning("the command has no {seed} placeholder: the seed re-runs measure only the trainer's own "
                       "run-to-run variation")
    existing = {t.user_attrs.get("seed") for t in study.get_trials(deepcopy=False)
                if t.user_attrs.get("phase") == "seeds" and t.user_attrs.get("seed_of") == best.number
                and t.state != TrialState.FAIL}
    return SeedPlan(best=best.number, params=stored, todo=[s for s in seeds if s not in existing])
