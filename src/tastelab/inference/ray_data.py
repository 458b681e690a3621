"""Ray Data: score a dataset of image paths on a pool of actors, each holding one loaded Scorer.

Ray schedules the actors over the cluster's CPUs/GPUs and streams path batches to them; each actor
loads the model once (constructor) and scores batch after batch with the same pipeline as
``tastelab score`` (PyTorch or ONNX Runtime, same decoding, same bands, uncertainty and non-finite
checks). Rows go through the same :func:`~tastelab.io.rows.safe_row` as every ``tastelab score`` writer,
so the output is a folder of Parquet files with the full score-output schema (``path_bytes`` for
non-UTF-8 names, and the ``model`` / ``model_hash`` provenance columns on every row, error rows
included): ``read_results`` / ``tastelab merge`` read it like any other score output.

Re-running into a non-empty folder is refused unless ``overwrite`` (start again) or ``resume``: a resume
skips the inputs already recorded in the folder's *complete* Parquet files (a file without a readable
footer, left by a killed run, is moved aside and its inputs are scored again), matched like
``tastelab score`` matches them (the file a path names, however spelled), and refuses a folder another
model wrote unless ``allow_mixed_models``.

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
from tastelab.io.rows import COLUMNS, resume_key, safe_row
from tastelab.io.urls import is_url
from tastelab.io.writers import ModelMismatchError, OutputError, ParquetWriter, _describe

logger = logging.getLogger(__name__)


def _object_column(values: Sequence[Any]) -> np.ndarray:
    """A 1-D object array (lists stay list cells instead of becoming a 2-D array; None becomes null)."""
    col = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        col[i] = v
    return col


class RayScorer:
    """Callable class for ``Dataset.map_batches``: ``{"path": [...]}`` batch -> score columns.

    Returns the :data:`~tastelab.io.rows.COLUMNS` of a ``tastelab score`` row (``path, score, raw_score,
    band, distribution, uncertainty, error, path_bytes, model, model_hash``) as numpy object columns
    (nulls for failed images); ``score_with_ray`` casts them to the writers' Parquet schema so that a
    block holding only errors keeps the column types. Inputs whose resume key is in ``skip`` (already
    in the output being resumed) are left out of the batch's rows.
    """

    def __init__(self, model: str | os.PathLike = "default", *, path_column: str = "path",
                 base_dir: str | os.PathLike | None = None, skip: frozenset[str] | set[str] = frozenset(),
                 **scorer_kwargs: Any) -> None:
        # Ray provides the parallelism (one actor per CPU/GPU slot): no decode processes inside actors.
        scorer_kwargs.setdefault("workers", 0)
        self.scorer = Scorer(model, **scorer_kwargs)
        self.identity = self.scorer.identity  # stamped on every row, like tastelab score's writers do
        self.path_column = path_column
        self.base_dir = None if base_dir is None else os.fspath(base_dir)
        self.skip = frozenset(skip)

    def _resolve(self, path: str) -> str:
        if self.base_dir is None or is_url(path) or os.path.isabs(path):
            return path
        return os.path.join(self.base_dir, path)

    def _done(self, path: str | None) -> bool:
        return bool(path) and resume_key(self._resolve(path)) in self.skip  # type: ignore[arg-type]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        given = [None if p is None else str(p) for p in batch[self.path_column]]
        if self.skip:
            given = [p for p in given if not self._done(p)]
        todo = sorted({self._resolve(p) for p in given if p})
        by_path = {r.path: r for r in self.scorer.score_files(todo)}
        results = []
        for p in given:
            if not p:
                results.append(ScoreResult(path=p, error="empty path"))
                continue
            res = by_path[self._resolve(p)]
            results.append(ScoreResult(**{**res.to_dict(), "path": p}))
        ident = self.identity
        rows = [safe_row(r.to_dict(), ident.name, ident.hash) for r in results]
        return {name: _object_column([r[name] for r in rows]) for name in COLUMNS}


def _dataset(inputs: str | os.PathLike | Sequence[str | os.PathLike], path_column: str, recursive: bool,
             blocks: int):
    """(Ray dataset with the paths, the column holding them, the folder relative paths are read from).

    A driver-side list is cut into ``blocks`` blocks (at least one per actor): Ray hands work to actors
    block by block, and a single block would keep every actor but one idle.
    """
    import ray.data

    source = parquet_path_list(inputs)
    if source is not None:
        # Distributed read: the path list never has to fit in the driver.
        ds = ray.data.read_parquet(str(source), override_num_blocks=blocks).select_columns([path_column])
        return ds, path_column, str(source.parent)
    items = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    paths = expand_inputs([os.fspath(i) for i in items], recursive, path_column=path_column)
    if not paths:
        raise FileNotFoundError(f"no images found in {' '.join(os.fspath(i) for i in items)}")
    n_blocks = max(1, min(len(paths), blocks))
    return ray.data.from_items([{"path": p} for p in paths], override_num_blocks=n_blocks), "path", os.getcwd()


def parquet_path_list(inputs: str | os.PathLike | Sequence[str | os.PathLike]) -> Path | None:
    """The ``.parquet`` path list (absolute) that Ray reads itself when ``inputs`` is one, else None.

    Why one home: whether the inputs are such a list decides both how they are read (Ray's distributed
    read, relative entries against the list's folder) and how a resume matches recorded paths to them;
    deciding it twice could read one way and resume the other. Only a single path counts (``score-ray``
    passes its one INPUT as itself): a sequence, even of one ``.parquet`` file, is expanded on the driver
    like ``tastelab score``'s inputs.
    """
    if isinstance(inputs, (str, os.PathLike)) and Path(inputs).suffix.lower() == ".parquet":
        return Path(inputs).resolve()
    return None


def output_files(out: Path) -> list[Path]:
    """The Parquet files of a Ray output folder (hidden files and the set-aside ``.partial`` ones excluded)."""
    return sorted(f for f in out.glob("*.parquet") if f.is_file() and not f.name.startswith("."))


def recorded_inputs(out: str | os.PathLike) -> tuple[set[str], set[tuple[str | None, str | None]]]:
    """``(resume keys of the paths, (model, model_hash) pairs)`` recorded in ``out``'s complete files.

    A file whose footer cannot be read (a write a killed run left half done) does not count: it is
    renamed to ``.<name>.partial`` (kept for inspection, ignored by merges and later resumes) and its
    inputs are scored again. Relative paths are keys relative to the working directory, as
    ``score_with_ray`` reads them for a driver-side list; a ``.parquet`` list's entries are resolved
    against its folder by the caller (see :func:`score_with_ray`).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tastelab.io.rows import decode_path

    paths: set[str] = set()
    models: set[tuple[str | None, str | None]] = set()
    for f in output_files(Path(out)):
        try:
            names = pq.read_schema(f).names
            table = pq.read_table(f, columns=[c for c in ("path", "path_bytes", "model", "model_hash")
                                              if c in names])
        except (pa.ArrowException, OSError) as exc:
            aside = f.with_name(f".{f.name}.partial")
            logger.warning("%s: not a complete Parquet file (%s); set aside as %s, its inputs are scored again",
                           f, exc, aside.name)
            os.replace(f, aside)
            continue
        if "path" not in names:
            raise OutputError(f"{f}: not a tastelab score file (no 'path' column)")
        cols = {c: table.column(c).to_pylist() if c in names else [None] * table.num_rows
                for c in ("path", "path_bytes", "model", "model_hash")}
        for path, raw, model, digest in zip(cols["path"], cols["path_bytes"], cols["model"], cols["model_hash"]):
            if path is not None:
                paths.add(decode_path(path, raw))
            models.add((model or None, digest or None))
    return paths, models


def score_with_ray(inputs: str | os.PathLike | Sequence[str | os.PathLike], out_dir: str | os.PathLike,
                   model: str | os.PathLike = "default", *, num_actors: int = 2, batch_size: int = 64,
                   path_column: str = "path", recursive: bool = False, num_cpus_per_actor: float = 1.0,
                   num_gpus_per_actor: float = 0.0, overwrite: bool = False, resume: bool = False,
                   allow_mixed_models: bool = False, **scorer_kwargs: Any) -> Path:
    """Score ``inputs`` with ``num_actors`` Ray actors and write Parquet files into ``out_dir``.

    ``inputs``: a ``.parquet`` path list (read by Ray, column ``path_column``; relative entries are
    relative to its folder) or anything ``tastelab score`` accepts (files, folders, globs, ``.txt``
    lists; expanded on the driver). Uses the running Ray cluster (``ray.init`` / ``RAY_ADDRESS``) or
    starts a local one. ``scorer_kwargs`` go to :class:`~tastelab.inference.scoring.Scorer` (backend, device,
    allow_urls, trust_remote_code, allow_external_weights...). Leave CPUs beside the actors
    (``num_actors * num_cpus_per_actor`` below the cluster's CPUs): Ray's Parquet read and write tasks
    need CPU slots too, and an actor pool holding every CPU starves them.

    A non-empty ``out_dir`` is refused unless ``overwrite`` (emptied first) or ``resume`` (inputs already
    in its complete files are skipped; rows of another model there raise
    :class:`~tastelab.io.writers.ModelMismatchError` unless ``allow_mixed_models``). Returns ``out_dir``.
    """
    require("ray", extra="ray")
    if overwrite and resume:
        raise ValueError("overwrite and resume exclude each other: overwrite starts again, resume continues")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out}: not a folder (score-ray writes a folder of Parquet files)")
    if Path(os.fspath(model)).is_dir():  # actors may run in another working directory
        model = str(Path(os.fspath(model)).resolve())
    skip: set[str] = set()
    if out.exists() and any(out.iterdir()):
        if overwrite:
            shutil.rmtree(out)
        elif not resume:
            raise ValueError(f"{out} is not empty; choose a new folder, pass overwrite=True (--overwrite) to "
                             "replace it or resume=True (--resume) to continue it")
        else:
            skip = _resume_keys(out, model, inputs, allow_mixed_models)
    import ray.data
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
                               "skip": frozenset(skip), **scorer_kwargs},
        compute=ray.data.ActorPoolStrategy(size=num_actors),
        batch_size=batch_size,
        batch_format="numpy",
        num_cpus=num_cpus_per_actor,
        num_gpus=num_gpus_per_actor or None,
    )
    # The writers' schema: a block of only failed images would otherwise write null-typed columns.
    ds.write_parquet(str(out), schema=ParquetWriter._schema(COLUMNS))
    logger.info("Ray scoring wrote %s%s", out, f" ({len(skip)} inputs already there, skipped)" if skip else "")
    return out


def _resume_keys(out: Path, model: str | os.PathLike, inputs: str | os.PathLike | Sequence[str | os.PathLike],
                 allow_mixed_models: bool) -> set[str]:
    """The resume keys to skip when continuing ``out``, after checking that this model wrote it."""
    from tastelab.models.identity import folder_hash

    recorded, models = recorded_inputs(out)
    if not allow_mixed_models and models:
        # The hash the actors will stamp: a folder's content hash (a preset resolves to its folder).
        from tastelab.inference.scoring import _model_folder

        folder = _model_folder(model)
        if folder is None:
            raise FileNotFoundError(f"model {model!s}: not a model folder and not a preset name")
        digest = folder_hash(folder)
        others = sorted((m for m in models if m[1] != digest), key=str)
        if others:
            raise ModelMismatchError(
                f"{out}: made by {_describe(*others[0])}, not by the model in {folder} (hash {digest}); use "
                "another --out, --overwrite to replace it, or --allow-mixed-models to add to it anyway")
    # Keys resolved the way the actors read the paths: a .parquet list's entries against its folder.
    listing = parquet_path_list(inputs)
    keys = set()
    for p in recorded:
        if listing is not None and not is_url(p) and not os.path.isabs(p):
            p = os.path.join(listing.parent, p)
        keys.add(resume_key(p))
    return keys
