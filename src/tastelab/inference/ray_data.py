"""Ray Data: score a dataset of image paths on a pool of actors, each holding one loaded Scorer.

Ray schedules the actors over the cluster's CPUs/GPUs and streams path batches to them; each actor
loads the model once (constructor) and scores batch after batch with the same pipeline as
``tastelab score`` (PyTorch or ONNX Runtime, same decoding, same result columns). Output is a folder
of Parquet files with the score-output schema of :mod:`tastelab.io.writers`, so ``read_results`` /
``tastelab merge`` read it like any other score output once the files are merged.

The ``path`` column of the output holds each input value verbatim (the key to join back to the input
table); relative paths are *read* relative to ``base_dir``. The model folder and the images must be
reachable from every node (shared file system or object store mount).
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tastelab.inference.onnx import require
from tastelab.inference.scoring import Scorer, ScoreResult
from tastelab.io.records import expand_inputs
from tastelab.io.urls import is_url
from tastelab.io.writers import FIELDS, ParquetWriter

logger = logging.getLogger(__name__)


def _object_column(values: Sequence[Any]) -> np.ndarray:
    """A 1-D object array (lists stay list cells instead of becoming a 2-D array; None becomes null)."""
    col = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        col[i] = v
    return col


class RayScorer:
    """Callable class for ``Dataset.map_batches``: ``{"path": [...]}`` batch -> score columns.

    Returns ``path, score, raw_score, band, distribution (list or null), uncertainty, error`` as numpy
    object columns (nulls for failed images); ``score_with_ray`` casts them to the writers' Parquet
    schema so that a block holding only errors keeps the column types.
    """

    def __init__(self, model: str | os.PathLike = "default", *, path_column: str = "path",
                 base_dir: str | os.PathLike | None = None, **scorer_kwargs: Any) -> None:
        # Ray provides the parallelism (one actor per CPU/GPU slot): no decode processes inside actors.
        scorer_kwargs.setdefault("workers", 0)
        self.scorer = Scorer(model, **scorer_kwargs)
        self.path_column = path_column
        self.base_dir = None if base_dir is None else os.fspath(base_dir)

    def _resolve(self, path: str) -> str:
        if self.base_dir is None or is_url(path) or os.path.isabs(path):
            return path
        return os.path.join(self.base_dir, path)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        given = [None if p is None else str(p) for p in batch[self.path_column]]
        todo = sorted({self._resolve(p) for p in given if p})
        by_path = {r.path: r for r in self.scorer.score_files(todo)}
        rows = []
        for p in given:
            if not p:
                rows.append(ScoreResult(path=p, error="empty path"))
                continue
            res = by_path[self._resolve(p)]
            rows.append(ScoreResult(**{**res.to_dict(), "path": p}))
        return {name: _object_column([getattr(r, name) for r in rows]) for name in FIELDS}


def _dataset(inputs: str | os.PathLike | Sequence[str | os.PathLike], path_column: str, recursive: bool,
             blocks: int):
    """(Ray dataset with the paths, the column holding them, the folder relative paths are read from).

    A driver-side list is cut into ``blocks`` blocks (at least one per actor): Ray hands work to actors
    block by block, and a single block would keep every actor but one idle.
    """
    import ray.data

    if isinstance(inputs, (str, os.PathLike)) and Path(inputs).suffix.lower() == ".parquet":
        # Distributed read: the path list never has to fit in the driver.
        source = Path(inputs).resolve()
        ds = ray.data.read_parquet(str(source), override_num_blocks=blocks).select_columns([path_column])
        return ds, path_column, str(source.parent)
    items = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    paths = expand_inputs([os.fspath(i) for i in items], recursive, path_column=path_column)
    if not paths:
        raise FileNotFoundError(f"no images found in {' '.join(os.fspath(i) for i in items)}")
    n_blocks = max(1, min(len(paths), blocks))
    return ray.data.from_items([{"path": p} for p in paths], override_num_blocks=n_blocks), "path", os.getcwd()


def score_with_ray(inputs: str | os.PathLike | Sequence[str | os.PathLike], out_dir: str | os.PathLike,
                   model: str | os.PathLike = "default", *, num_actors: int = 2, batch_size: int = 64,
                   path_column: str = "path", recursive: bool = False, num_cpus_per_actor: float = 1.0,
                   num_gpus_per_actor: float = 0.0, overwrite: bool = False, **scorer_kwargs: Any) -> Path:
    """Score ``inputs`` with ``num_actors`` Ray actors and write Parquet files into ``out_dir``.

    ``inputs``: a ``.parquet`` path list (read by Ray, column ``path_column``; relative entries are
    relative to its folder) or anything ``tastelab score`` accepts (files, folders, globs, ``.txt``
    lists; expanded on the driver). Uses the running Ray cluster (``ray.init`` / ``RAY_ADDRESS``) or
    starts a local one. ``scorer_kwargs`` go to :class:`~tastelab.inference.scoring.Scorer` (backend, device,
    allow_urls...). Leave CPUs beside the actors (``num_actors * num_cpus_per_actor`` below the
    cluster's CPUs): Ray's Parquet read and write tasks need CPU slots too, and an actor pool holding
    every CPU starves them. Returns ``out_dir``.
    """
    require("ray", extra="ray")
    import ray.data

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ValueError(f"{out} is not empty; choose a new folder or pass overwrite=True (--overwrite)")
        shutil.rmtree(out)
    if Path(os.fspath(model)).is_dir():  # actors may run in another working directory
        model = str(Path(os.fspath(model)).resolve())
    if not ray.is_initialized():
        ray.init()  # RAY_ADDRESS / a running cluster, else a local one
    cpus = ray.cluster_resources().get("CPU", 0.0)
    if num_actors * num_cpus_per_actor >= cpus:
        logger.warning("%d actors x %g CPU take all %g CPUs of the cluster: Ray's read/write tasks may wait "
                       "for them (use fewer actors or num_cpus_per_actor < 1)", num_actors, num_cpus_per_actor, cpus)
    ds, column, base_dir = _dataset(inputs, path_column, recursive, blocks=4 * num_actors)
    scorer_kwargs.setdefault("batch_size", batch_size)
    ds = ds.map_batches(
        RayScorer,
        fn_constructor_kwargs={"model": os.fspath(model), "path_column": column, "base_dir": base_dir,
                               **scorer_kwargs},
        compute=ray.data.ActorPoolStrategy(size=num_actors),
        batch_size=batch_size,
        batch_format="numpy",
        num_cpus=num_cpus_per_actor,
        num_gpus=num_gpus_per_actor or None,
    )
    # The writers' schema: a block of only failed images would otherwise write null-typed columns.
    ds.write_parquet(str(out), schema=ParquetWriter._schema())
    logger.info("Ray scoring wrote %s", out)
    return out
