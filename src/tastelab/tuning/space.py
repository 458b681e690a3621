"""Search spaces as data: a YAML file of ``dotted.config.key -> distribution``.

A space is validated completely before any trial runs: its own shape (types, bounds, choices) and,
because every parameter is a training-config override, the configs it can produce (each parameter's
bounds / every categorical choice is applied to the recipe and validated by :class:`TrainConfig`).
A typo such as ``optim.lrr`` therefore fails in milliseconds, naming the space file and the key,
instead of failing in every trial of an overnight study.

Format (``params`` keeps its order; conditions may only refer to earlier parameters)::

    objectives: [val/srcc]                    # optional; the CLI's --objective wins
    params:
      optim.name: {type: categorical, choices: [adamw, lion, prodigy]}
      optim.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true,
                 when: {optim.name: [adamw, lion]}, else: 1.0}   # prodigy: lr is a multiplier
      optim.weight_decay: {type: float, low: 0.0, high: 0.1, step: 0.01}
      train.epochs: {type: int, low: 10, high: 40, step: 10}
      model.head.hidden: {type: categorical, choices: [[512, 128], [256], []]}
      train.batch_size: 64                    # a bare scalar is a fixed value
      train.resolution_schedule: {type: fixed, value: {0: 256, 3: 384}}

A searched parameter may name its ``default:`` value (within its range / among its choices): the value the
trained program uses when nobody tunes it. ``tastelab tune --external`` runs that configuration first as
its baseline; internal tuning ignores it.

Categorical choices that Optuna cannot store (lists, mappings) are stored as their JSON text (what the
dashboard shows) and decoded back to the original YAML value.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import yaml

from tastelab.io.textfiles import TextFileError, load_yaml, read_text_file
from tastelab.training.config import ConfigError, load_train_config

if TYPE_CHECKING:
    import optuna

__all__ = ["Param", "SearchSpace", "SpaceError", "apply_overrides", "load_space"]

PARAM_TYPES = ("float", "int", "categorical", "fixed")
_FIELDS = {
    "float": {"low", "high", "step", "log"},
    "int": {"low", "high", "step", "log"},
    "categorical": {"choices"},
    "fixed": {"value"},
}
_COMMON = {"type", "when", "else", "default"}
# Keys the tuner owns: one feature cache must serve every trial (the cached-feature fast path).
RESERVED_KEYS = {"train.cache_dir": "the tuner points every trial at one shared feature cache; "
                                    "set train.cache_dir in the recipe (or --set) instead"}
_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*$")
_PRIMITIVE = (type(None), bool, int, float, str)
_NOTHING = object()


class SpaceError(ValueError):
    """A search space that cannot be used; the message names the file and the parameter key."""


@dataclass(frozen=True)
class Param:
    """One searched (or fixed) training-config key."""

    key: str
    kind: str
    low: float | int | None = None
    high: float | int | None = None
    step: float | int | None = None
    log: bool = False
    choices: tuple[Any, ...] = ()
    value: Any = None
    when: tuple[tuple[str, tuple[Any, ...]], ...] = ()
    has_else: bool = False
    otherwise: Any = None
    has_default: bool = False
    default: Any = None

    # ---------------------------------------------------------------- categorical encoding
    @property
    def encoded(self) -> bool:
        """Whether choices are stored as JSON text (Optuna only stores None/bool/int/float/str)."""
        return any(not isinstance(c, _PRIMITIVE) for c in self.choices)

    @property
    def labels(self) -> tuple[Any, ...]:
        if not self.encoded:
            return self.choices
        return tuple(_label(c) for c in self.choices)

    def decode(self, stored: Any) -> Any:
        """The YAML value for what Optuna stored for this parameter."""
        if self.kind != "categorical" or not self.encoded:
            return stored
        for label, choice in zip(self.labels, self.choices):
            if label == stored:
                return copy.deepcopy(choice)
        raise KeyError(f"{self.key}: stored value {stored!r} is not one of the space's choices")

    def stored(self, value: Any) -> Any:
        """What Optuna stores for ``value`` (the inverse of :meth:`decode`): for ``enqueue_trial``."""
        return _label(value) if self.kind == "categorical" and self.encoded else value

    # ---------------------------------------------------------------- values
    def suggest(self, trial: optuna.trial.Trial) -> Any:
        if self.kind == "fixed":
            return copy.deepcopy(self.value)
        if self.kind == "categorical":
            return self.decode(trial.suggest_categorical(self.key, list(self.labels)))
        assert self.low is not None and self.high is not None  # numeric kinds: bounds checked when parsed
        if self.kind == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.key, float(self.low), float(self.high), step=self.step, log=self.log)

    def first(self) -> Any:
        """The value used for the up-front config check: low bound, first choice or the fixed value."""
        if self.kind == "fixed":
            return copy.deepcopy(self.value)
        if self.kind == "categorical":
            return copy.deepcopy(self.choices[0])
        return self.low

    def corner_values(self) -> list[Any]:
        """Every value checked up front: both bounds, every choice, or the fixed value."""
        if self.kind == "fixed":
            return [copy.deepcopy(self.value)]
        if self.kind == "categorical":
            return [copy.deepcopy(c) for c in self.choices]
        assert self.low is not None and self.high is not None  # numeric kinds: bounds checked when parsed
        values = [self.low, self.high]
        if self.step:  # the highest value the grid actually reaches
            n = math.floor((self.high - self.low) / self.step + 1e-9)
            values[1] = self.low + n * self.step
            if self.kind == "float":
                values[1] = round(values[1], 12)
        return values

    def active(self, chosen: Mapping[str, Any]) -> bool:
        return all(chosen.get(k, _NOTHING) in allowed for k, allowed in self.when)


def _label(choice: Any) -> Any:
    if isinstance(choice, _PRIMITIVE):
        return json.dumps(choice)
    return json.dumps(choice, sort_keys=True, default=str)


@dataclass(frozen=True)
class SearchSpace:
    """Ordered parameters (+ optional default objectives) with the file they came from."""

    params: tuple[Param, ...]
    objectives: tuple[str, ...] = ()
    source: str = "<space>"

    def resolve(self, get: Callable[[Param], Any]) -> dict[str, Any]:
        """Overrides for one configuration: ``get(param)`` gives each active searched value."""
        chosen: dict[str, Any] = {}
        for p in self.params:
            if p.active(chosen):
                chosen[p.key] = get(p)
            elif p.has_else:
                chosen[p.key] = copy.deepcopy(p.otherwise)
        return chosen

    def suggest(self, trial: optuna.trial.Trial) -> dict[str, Any]:
        """Define-by-run sampling: conditional parameters are only suggested when active."""
        return self.resolve(lambda p: p.suggest(trial))

    def from_params(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """Overrides for a stored trial's ``params`` (fixed values and ``else`` values re-derived)."""

        def get(p: Param) -> Any:
            if p.kind == "fixed":
                return copy.deepcopy(p.value)
            if p.key not in params:
                raise KeyError(f"trial has no value for {p.key!r} (was the space changed mid-study?)")
            return p.decode(params[p.key])

        return self.resolve(get)

    def decode_params(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """A trial's stored params with JSON-encoded categorical choices turned back into values."""
        by_key = {p.key: p for p in self.params}
        return {k: (by_key[k].decode(v) if k in by_key else v) for k, v in params.items()}

    def samples(self) -> list[tuple[str, dict[str, Any]]]:
        """Override sets checked before any trial: all-first values, then each corner value in turn.

        A forced conditional parameter also forces its condition's first allowed value, so values that
        are only reachable under a condition are checked too.
        """
        out = [("the first value of every parameter", self.resolve(lambda p: p.first()))]
        for p in self.params:
            if p.kind == "fixed":
                continue
            for v in p.corner_values():
                forced = {p.key: v, **{k: allowed[0] for k, allowed in p.when}}

                def pick(q: Param, forced: dict[str, Any] = forced) -> Any:
                    return copy.deepcopy(forced[q.key]) if q.key in forced else q.first()

                out.append((f"params.{p.key} = {v!r}", self.resolve(pick)))
        return out

    def check(self, raw_config: Mapping[str, Any], base_dir: str | os.PathLike | None = None) -> None:
        """Validate that the space's values produce valid training configs; raises :class:`SpaceError`."""
        def validate(overrides: Mapping[str, Any]) -> None:
            load_train_config(raw=apply_overrides(raw_config, overrides, self.source), base_dir=base_dir)

        for what, overrides in self.samples():
            try:
                validate(overrides)
            except ConfigError as exc:
                keys = _culprits(exc, overrides, validate)
                named = "; ".join(f"params.{k} = {overrides[k]!r}" for k in keys) if keys else what
                detail = str(exc).split("\n", 1)[-1]
                raise SpaceError(f"{self.source}: {named} makes an invalid training config:\n{detail}") from exc

    def to_dict(self) -> dict[str, Any]:
        """JSON-able description (stored in the study so workers can detect a changed space)."""
        out = {}
        for p in self.params:
            d: dict[str, Any] = {"type": p.kind}
            if p.kind in ("float", "int"):
                d.update(low=p.low, high=p.high, step=p.step, log=p.log)
            elif p.kind == "categorical":
                d["choices"] = list(p.labels)
                if p.encoded:
                    d["encoded"] = True  # stored as JSON text: `tune --show` decodes it
            else:
                d["value"] = _label(p.value)
            if p.when:
                d["when"] = {k: list(map(_label, v)) for k, v in p.when}
            if p.has_else:
                d["else"] = _label(p.otherwise)
            out[p.key] = d
        return out


def _culprits(exc: Exception, overrides: Mapping[str, Any], validate: Callable[[Mapping[str, Any]], None]
              ) -> list[str]:
    """The space keys to blame: those the validation errors point at, else those invalid on their own."""
    from pydantic import ValidationError

    cause = exc.__cause__
    locs = [".".join(map(str, e["loc"])) for e in cause.errors()] if isinstance(cause, ValidationError) else []
    keys = [k for k in overrides for loc in locs
            if loc and (loc == k or loc.startswith(k + ".") or k.startswith(loc + "."))]
    if keys:
        return list(dict.fromkeys(keys))
    alone = []
    for k, v in overrides.items():
        try:
            validate({k: v})
        except ConfigError:
            alone.append(k)
    return alone


def apply_overrides(raw: Mapping[str, Any], overrides: Mapping[str, Any], label: str = "<space>") -> dict[str, Any]:
    """A deep copy of ``raw`` with ``dotted.key -> value`` set (sections created where missing)."""
    out = copy.deepcopy(dict(raw))
    for key, value in overrides.items():
        node = out
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise SpaceError(f"{label}: params.{key}: {'.'.join(parts[:i + 1])!r} is not a config section")
            node = child
        node[parts[-1]] = copy.deepcopy(value)
    return out


# -------------------------------------------------------------------------------------------- parsing
def _number(label: str, key: str, name: str, v: Any, kind: str) -> float | int:
    # YAML 1.1 reads "1e-5" (no dot) as a string: accept it rather than fail on a formatting detail.
    if isinstance(v, str):
        try:
            v = float(v)
        except ValueError:
            raise SpaceError(f"{label}: params.{key}.{name}: expected a number, got {v!r}") from None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise SpaceError(f"{label}: params.{key}.{name}: expected a number, got {v!r}")
    if kind == "int":
        if float(v) != int(v):
            raise SpaceError(f"{label}: params.{key}.{name}: an int parameter needs an integer, got {v!r}")
        return int(v)
    return float(v)


def _parse_param(label: str, key: str, spec: Any, earlier: dict[str, Param]) -> Param:
    where = f"{label}: params.{key}"
    if not isinstance(key, str) or not _KEY_RE.match(key):
        raise SpaceError(f"{label}: params: {key!r} is not a dotted config key (e.g. optim.lr)")
    if key in RESERVED_KEYS:
        raise SpaceError(f"{where}: cannot be searched: {RESERVED_KEYS[key]}")
    if not isinstance(spec, dict):
        if isinstance(spec, list):
            raise SpaceError(f"{where}: a bare list is ambiguous; write {{type: categorical, choices: [...]}} "
                             "to search it or {type: fixed, value: [...]} to fix it")
        return Param(key=key, kind="fixed", value=spec)
    kind = spec.get("type")
    if kind not in PARAM_TYPES:
        raise SpaceError(f"{where}: 'type' must be one of {', '.join(PARAM_TYPES)} (got {kind!r}); a mapping "
                         "value to fix goes in {type: fixed, value: {...}}")
    unknown = set(spec) - _FIELDS[kind] - _COMMON
    if unknown:
        raise SpaceError(f"{where}: unknown field(s) {sorted(unknown)} for type {kind}; "
                         f"allowed: {sorted(_FIELDS[kind] | _COMMON)}")
    when = _parse_when(where, spec.get("when"), earlier)
    has_else = "else" in spec
    if has_else and not when:
        raise SpaceError(f"{where}: 'else' needs a 'when' condition")
    has_default = "default" in spec
    if has_default and kind == "fixed":
        raise SpaceError(f"{where}: a fixed parameter has no 'default' (its value is the default)")
    common: dict[str, Any] = {"key": key, "kind": kind, "when": when, "has_else": has_else,
                              "otherwise": spec.get("else"), "has_default": has_default,
                              "default": spec.get("default")}
    if kind == "fixed":
        if "value" not in spec:
            raise SpaceError(f"{where}: type fixed needs 'value'")
        return Param(value=spec["value"], **common)
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise SpaceError(f"{where}: type categorical needs a non-empty 'choices' list")
        p = Param(choices=tuple(choices), **common)
        labels = p.labels
        if len(set(labels)) != len(labels):
            raise SpaceError(f"{where}: duplicate choices in {choices!r}")
        if has_default and p.stored(spec["default"]) not in labels:
            raise SpaceError(f"{where}.default: {spec['default']!r} is not one of the choices {choices!r}")
        return p
    for name in ("low", "high"):
        if name not in spec:
            raise SpaceError(f"{where}: type {kind} needs 'low' and 'high'")
    low = _number(label, key, "low", spec["low"], kind)
    high = _number(label, key, "high", spec["high"], kind)
    step = _number(label, key, "step", spec["step"], kind) if spec.get("step") is not None else None
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise SpaceError(f"{where}.log: expected true or false, got {log!r}")
    if low > high:
        raise SpaceError(f"{where}: low ({low}) is greater than high ({high})")
    if log and step is not None:
        raise SpaceError(f"{where}: 'log' and 'step' cannot be combined (Optuna samples either on a log scale "
                         "or on a grid)")
    if log and low <= 0:
        raise SpaceError(f"{where}: a log-scale range needs low > 0 (got {low})")
    if step is not None and step <= 0:
        raise SpaceError(f"{where}.step: must be > 0 (got {step})")
    if has_default:
        default = _number(label, key, "default", spec["default"], kind)
        if not low <= default <= high:
            raise SpaceError(f"{where}.default: {default} is outside [{low}, {high}]")
        common["default"] = default
    return Param(low=low, high=high, step=step, log=log, **common)


def _parse_when(where: str, when: Any, earlier: dict[str, Param]) -> tuple[tuple[str, tuple[Any, ...]], ...]:
    if when is None:
        return ()
    if not isinstance(when, dict) or not when:
        raise SpaceError(f"{where}.when: expected a mapping {{earlier.key: value or [values]}}")
    out = []
    for k, allowed in when.items():
        if k not in earlier:
            raise SpaceError(f"{where}.when: {k!r} is not a parameter declared before this one")
        values = tuple(allowed) if isinstance(allowed, list) else (allowed,)
        parent = earlier[k]
        if parent.kind == "categorical":
            bad = [v for v in values if _label(v) not in {_label(c) for c in parent.choices}]
            if bad:
                raise SpaceError(f"{where}.when: {bad!r} not among the choices of {k}")
        out.append((k, values))
    return tuple(out)


def load_space(source: str | os.PathLike | Mapping[str, Any], *, label: str | None = None) -> SearchSpace:
    """Parse and shape-check a space (YAML file or mapping). Config-level checks: :meth:`SearchSpace.check`."""
    if isinstance(source, Mapping):
        data: Any = dict(source)
        label = label or "<space>"
    else:
        label = label or str(source)
        try:
            data = load_yaml(read_text_file(source, encoding="utf-8"))  # regular files only, no alias bomb
        except FileNotFoundError as exc:
            raise SpaceError(f"{label}: no such space file") from exc
        except TextFileError as exc:  # a FIFO, a folder, bytes that are not UTF-8
            raise SpaceError(str(exc)) from None
        except yaml.YAMLError as exc:
            raise SpaceError(f"{label}: invalid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise SpaceError(f"{label}: expected a mapping with a 'params' section")
    unknown = set(data) - {"params", "objectives"}
    if unknown:
        raise SpaceError(f"{label}: unknown top-level key(s) {sorted(unknown)}; expected 'params' and optionally "
                         "'objectives'")
    raw_params = data.get("params")
    if not isinstance(raw_params, dict) or not raw_params:
        raise SpaceError(f"{label}: 'params' must be a non-empty mapping of config keys to distributions")
    params: dict[str, Param] = {}
    for key, spec in raw_params.items():
        params[key] = _parse_param(label, key, spec, params)
    if all(p.kind == "fixed" for p in params.values()):
        raise SpaceError(f"{label}: every parameter is fixed; nothing to search")
    objectives = data.get("objectives") or []
    if isinstance(objectives, str):
        objectives = [objectives]
    if not isinstance(objectives, list) or not all(isinstance(o, str) for o in objectives):
        raise SpaceError(f"{label}: 'objectives' must be a list of metric names (e.g. [val/srcc, cost/params])")
    return SearchSpace(params=tuple(params.values()), objectives=tuple(objectives), source=label)
