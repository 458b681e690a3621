"""Hyper-parameter search for training recipes (Optuna): ``tastelab tune`` and :func:`tune`.

- :mod:`~tastelab.tuning.space`: search spaces as YAML data, validated against TrainConfig up front
- :mod:`~tastelab.tuning.objective`: objectives (``val/...``, ``cost/...``) and the per-trial run
- :mod:`~tastelab.tuning.storage`: RDB storage with heartbeat/retry, samplers and pruners by name
- :mod:`~tastelab.tuning.study`: workers, resume, best-run, ``tune_summary.json``
- :mod:`~tastelab.tuning.report`: summaries, Pareto CSV, rich tables

Needs the ``tune`` extra (``pip install -e ".[tune]"``).
"""

from __future__ import annotations

from tastelab.tuning.objective import COST_METRICS, ObjectiveSpec, parse_objective
from tastelab.tuning.space import Param, SearchSpace, SpaceError, load_space
from tastelab.tuning.study import TuneResult, show, tune

__all__ = [
    "COST_METRICS",
    "ObjectiveSpec",
    "Param",
    "SearchSpace",
    "SpaceError",
    "TuneResult",
    "load_space",
    "parse_objective",
    "show",
    "tune",
]
