"""Optuna storage, samplers and pruners, built from names so worker processes can rebuild them.

Storage is always an :class:`optuna.storages.RDBStorage` (SQLite file by default, PostgreSQL / MySQL
URLs for several machines) with Optuna's heartbeat: a worker killed mid-trial stops beating, the next
worker to ask for a trial marks it FAIL and Optuna's retry callback re-queues its parameters (the
retried trial resumes from the dead attempt's checkpoint, see :mod:`tastelab.tuning.objective`).
"""

from __future__ import annotations

import inspect
import logging
import random
import time
import warnings
from typing import Any

import optuna
import sqlalchemy.exc

logger = logging.getLogger(__name__)

SAMPLERS = ("tpe", "cmaes", "random", "qmc", "nsga2")
PRUNERS = ("median", "hyperband", "none")


def redact(url: str) -> str:
    """The URL without its password (for logs and tune_summary.json)."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not an SQLAlchemy URL: nothing we can safely print beyond the scheme
        return url.split("://", 1)[0] + "://..."


def make_storage(url: str, *, heartbeat_interval: int = 30, grace_period: int | None = None,
                 max_retry: int | None = 2) -> optuna.storages.RDBStorage:
    """RDBStorage with heartbeat + retry of heartbeat-stale trials (Optuna 4.x and 5.x names)."""
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        # Several local worker processes share one file: wait for the write lock instead of failing.
        engine_kwargs["connect_args"] = {"timeout": 120}
    else:
        engine_kwargs["pool_pre_ping"] = True  # long trials outlive idle server connections
    storages = optuna.storages
    retry_cls = getattr(storages, "RetryHeartbeatStaleTrialCallback", None) or storages.RetryFailedTrialCallback
    params = inspect.signature(storages.RDBStorage).parameters
    cb_arg = "heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback" in params else "failed_trial_callback"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        callback: dict[str, Any] = {cb_arg: retry_cls(max_retry=max_retry, inherit_intermediate_values=True)}
        for attempt in range(5):
            try:
                return storages.RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_interval,
                                           grace_period=grace_period, **callback)
            except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError) as exc:
                # Workers started together on an empty database race to create Optuna's schema
                # (PostgreSQL: "duplicate key ... pg_type"); the loser finds it created on retry.
                if attempt == 4:
                    raise
                logger.debug("storage schema creation raced (%s); retrying", type(exc).__name__)
                time.sleep(0.5 + random.random())
    raise AssertionError("unreachable")


def make_sampler(name: str | optuna.samplers.BaseSampler, seed: int, *, n_objectives: int = 1,
                 trials: int = 100) -> optuna.samplers.BaseSampler:
    """A sampler by name; instances (Python API) pass through."""
    if isinstance(name, optuna.samplers.BaseSampler):
        return name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if name == "tpe":
            # group=True: conditional ('when') parameters are modelled jointly where they co-occur;
            # constant_liar keeps parallel workers from proposing the same point.
            return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, constant_liar=True)
        if name == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        if name == "qmc":
            return optuna.samplers.QMCSampler(seed=seed, scramble=True, warn_independent_sampling=False)
        if name == "cmaes":
            if n_objectives > 1:
                raise ValueError("sampler 'cmaes' is single-objective; use tpe or nsga2 for several objectives")
            try:
                import cmaes  # noqa: F401
            except ImportError as exc:
                raise ImportError("sampler 'cmaes' needs `pip install cmaes`") from exc
            return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
        if name == "nsga2":
            # Optuna's default population (50) makes a short study pure random search.
            return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(8, min(50, trials // 4)))
    raise ValueError(f"unknown sampler {name!r}; choose from {', '.join(SAMPLERS)}")


def make_pruner(name: str | optuna.pruners.BasePruner) -> optuna.pruners.BasePruner:
    """A pruner by name; epochs are the steps (intermediate value = the objective after each epoch)."""
    if isinstance(name, optuna.pruners.BasePruner):
        return name
    if name == "median":
        # Wait for 5 finished trials and ignore epoch 1 (too noisy to judge a learning rate on).
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=1)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource="auto", reduction_factor=3)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise ValueError(f"unknown pruner {name!r}; choose from {', '.join(PRUNERS)}")
