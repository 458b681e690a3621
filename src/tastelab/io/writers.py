"""Resumable, crash-safe writers for per-image score records: ``.jsonl``, ``.csv``, ``.parquet``.

Resume contract: re-opening the same output reads which paths are already recorded (``done``), so a
re-run after a crash or Ctrl-C skips them: nothing is lost, nothing is duplicated. Paths are matched
by the file they name (:func:`~tastelab.io.rows.resume_key`), not by their spelling. Rows are buffered
and flushed in batches (off the model's hot path); a torn last line left by a crash is cut off on
resume. Parquet files cannot be appended to, so rows go to atomically written part files beside the
output and are merged into the final file (also atomically) on close.

Every row says which model made it (``model``, ``model_hash``); resuming a file another model wrote
is refused unless the caller allows mixed models. One record can never take the writer down: a record
that cannot be stored (a non-finite number, an odd path) is written as an error row instead
(:mod:`tastelab.io.rows`). Problems with an existing output (not JSON, not an object, not UTF-8) are
:class:`OutputError` naming the file and line.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from tastelab.io.rows import (
    COLUMNS,
    FIELDS,
    PROVENANCE,
    UnrecordableError,
    error_row,
    from_row,
    resume_key,
    safe_row,
)

__all__ = ["COLUMNS", "FIELDS", "PROVENANCE", "SUPPORTED_SUFFIXES", "CsvWriter", "JsonlWriter",
           "ModelMismatchError", "OutputError", "ParquetWriter", "ResultWriter", "check_output",
           "open_writer", "read_results"]

logger = logging.getLogger(__name__)

SUPPORTED_SUFFIXES = (".jsonl", ".csv", ".parquet")


class OutputError(ValueError):
    """An output file that cannot be written or resumed; the message names the file (and line)."""


class ModelMismatchError(OutputError):
    """Resuming would add rows of one model to a file another model wrote."""


def check_output(path: str | os.PathLike) -> Path:
    """Fail early, with one line naming ``path``, when scores could not be written there.

    Checked before any scoring starts (a long job must not die at its first flush): the format, the
    folder (created when missing, as the writers do), that the folder accepts new files (probe file),
    and that an existing output is a regular, writable file, never a folder or a FIFO.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise OutputError(f"--out {path}: unsupported format {suffix!r}; use one of {SUPPORTED_SUFFIXES}")
    if path.is_dir():
        raise OutputError(f"--out {path}: is a directory; give a file name ending in {suffix or '.jsonl'}")
    if path.exists() and not path.is_file():
        raise OutputError(f"--out {path}: not a regular file (a FIFO, socket or device cannot hold scores)")
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"--out {path}: cannot create its folder {parent} ({exc.strerror or exc})") from exc
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as exc:
        raise OutputError(f"--out {path}: its folder {parent} is not writable ({exc.strerror or exc})") from exc
    if path.exists():
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | getattr(os, "O_NONBLOCK", 0))
            os.close(fd)
        except OSError as exc:
            raise OutputError(f"--out {path}: not writable ({exc.strerror or exc})") from exc
    return path


def _truncate_torn_tail(path: Path) -> None:
    """Cut a partial last line (a crash mid-write) so appending continues on a clean boundary."""
    size = path.stat().st_size
    if size == 0:
        return
    with path.open("rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
        # Walk back to the last newline; files are append-only so the tail is short.
        block = 1 << 16
        pos = size
        while pos > 0:
            start = max(0, pos - block)
            f.seek(start)
            chunk = f.read(pos - start)
            idx = chunk.rfind(b"\n")
            if idx >= 0:
                f.truncate(start + idx + 1)
                logger.warning("%s: dropped a partial last line left by an interrupted run", path)
                return
            pos = start
        f.truncate(0)


def _describe(model: str | None, model_hash: str | None) -> str:
    if not model and not model_hash:
        return "an unrecorded model (rows written before tastelab recorded the model)"
    return f"model {model or '?'} (hash {model_hash or '?'})"


class ResultWriter:
    """Base: buffering, flushing, resume and model checks; subclasses read and write the format.

    ``model`` / ``model_hash`` are stamped on every row written (see :mod:`tastelab.models.identity`). When
    ``model_hash`` is given and the existing output holds rows of another model (or rows without a
    recorded model), opening it for resume raises :class:`ModelMismatchError` unless
    ``allow_mixed_models``.
    """

    def __init__(self, path: str | os.PathLike, *, resume: bool = True, flush_every: int = 512,
                 flush_seconds: float = 5.0, model: str | None = None, model_hash: str | None = None,
                 allow_mixed_models: bool = False) -> None:
        self.path = check_output(path)
        self.flush_every = flush_every
        self.flush_seconds = flush_seconds
        self.model = model
        self.model_hash = model_hash
        self._buffer: list[dict[str, Any]] = []
        self._last_flush = time.monotonic()
        if not resume:
            self._clear()
        #: Paths already recorded, as they were written (original strings, non-UTF-8 names included).
        self.done: set[str] = set()
        #: The same, as resume keys (resolved real paths): what :meth:`is_done` matches on.
        self.done_keys: set[str] = set()
        #: ``(model, model_hash)`` of the rows already in the output.
        self.models: set[tuple[str | None, str | None]] = set()
        for row in self._scan():
            self._remember(row)
        self._check_models(allow_mixed_models)
        self.written = 0

    def _remember(self, row: Mapping[str, Any]) -> None:
        path = row.get("path")
        if path is not None:
            self.done.add(path)
            self.done_keys.add(resume_key(path))
        self.models.add((row.get("model") or None, row.get("model_hash") or None))

    def _check_models(self, allow_mixed: bool) -> None:
        if self.model_hash is None or allow_mixed:
            return
        others = sorted((m for m in self.models if m[1] != self.model_hash), key=str)
        if others:
            raise ModelMismatchError(
                f"{self.path}: made by {_describe(*others[0])}, not by {_describe(self.model, self.model_hash)}; "
                "use another --out, --no-resume to overwrite it, or --allow-mixed-models to add to it anyway")

    def is_done(self, path: str) -> bool:
        """Whether the file ``path`` names is already recorded (however it was spelled then)."""
        return resume_key(path) in self.done_keys

    def _clear(self) -> None:
        self.path.unlink(missing_ok=True)

    def _scan(self) -> Iterator[dict[str, Any]]:  # pragma: no cover - abstract
        """The rows already in the output (``path`` decoded, provenance included), validated."""
        raise NotImplementedError

    def _write_rows(self, rows: list[dict[str, Any]]) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def write(self, row: Mapping[str, Any]) -> None:
        """Queue one record; a record that cannot be stored is queued as an error row saying why."""
        self._buffer.append(safe_row(row, self.model, self.model_hash))
        if len(self._buffer) >= self.flush_every or time.monotonic() - self._last_flush > self.flush_seconds:
            self.flush()

    def write_many(self, rows: Iterable[Mapping[str, Any]]) -> None:
        for row in rows:
            self.write(row)

    def flush(self) -> None:
        if self._buffer:
            self._write_rows(self._buffer)
            self.written += len(self._buffer)
            for r in self._buffer:
                self._remember(from_row(r, provenance=True))
            self._buffer = []
        self._last_flush = time.monotonic()

    def close(self) -> None:
        self.flush()

    def __enter__(self) -> ResultWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------------------------------
# JSONL


def _jsonl_rows(path: Path, *, provenance: bool) -> Iterator[dict[str, Any]]:
    """Validated rows of a score JSONL file; an :class:`OutputError` with file:line for a bad line."""
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as exc:
                raise OutputError(f"{where}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
            except json.JSONDecodeError as exc:
                hint = "" if raw.endswith(b"\n") else " (a torn last line: resume that output first)"
                raise OutputError(f"{where}: not a score record (not JSON: {exc.msg}){hint}") from exc
            if not isinstance(obj, dict):
                raise OutputError(f"{where}: not a score record (a JSON {type(obj).__name__}, not an object)")
            if "path" not in obj:
                raise OutputError(f"{where}: not a score record (no 'path')")
            if obj["path"] is not None and not isinstance(obj["path"], str):
                raise OutputError(f"{where}: not a score record ('path' is a {type(obj['path']).__name__})")
            try:
                yield from_row(obj, provenance=provenance)
            except UnrecordableError as exc:
                raise OutputError(f"{where}: {exc}") from exc


class JsonlWriter(ResultWriter):
    def _scan(self) -> Iterator[dict[str, Any]]:
        if not self.path.exists():
            return iter(())
        _truncate_torn_tail(self.path)
        return _jsonl_rows(self.path, provenance=True)

    def _write_rows(self, rows: list[dict[str, Any]]) -> None:
        lines = []
        for r in rows:
            try:  # strict JSON: NaN/Infinity never reach the file (rows are checked; this is the last guard)
                lines.append(json.dumps(r, ensure_ascii=False, allow_nan=False))
            except (ValueError, TypeError) as exc:
                lines.append(json.dumps(error_row(r, f"cannot record this result: {exc}"), ensure_ascii=False))
        data = "".join(line + "\n" for line in lines).encode("utf-8")
        with self.path.open("ab") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


# --------------------------------------------------------------------------------------------------
# CSV


def _csv_value(row: Mapping[str, Any], key: str) -> Any:
    value = row[key]
    if key == "distribution" and value is not None:
        return json.dumps(value, allow_nan=False)
    return value


def _csv_rows(path: Path, *, provenance: bool) -> Iterator[dict[str, Any]]:
    """Validated rows of a score CSV (numbers parsed, ``""`` -> None); OutputError with file:line."""
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        try:
            header = reader.fieldnames
            if header is None or "path" not in header:
                raise OutputError(f"{path}:1: not a tastelab score CSV (no 'path' column)")
            unknown = [h for h in header if h not in COLUMNS]
            if unknown:
                raise OutputError(f"{path}:1: not a tastelab score CSV (unexpected columns {unknown})")
            for row in reader:
                where = f"{path}:{reader.line_num}"
                conv: dict[str, Any] = {k: (v if v not in ("", None) else None) for k, v in row.items()
                                        if k is not None}
                try:
                    for k in ("score", "raw_score", "uncertainty"):
                        conv[k] = float(conv[k]) if conv.get(k) is not None else None
                    dist = conv.get("distribution")
                    conv["distribution"] = json.loads(dist) if dist else None
                    yield from_row(conv, provenance=provenance)
                except (ValueError, UnrecordableError) as exc:
                    raise OutputError(f"{where}: not a score record ({exc})") from exc
        except UnicodeDecodeError as exc:
            raise OutputError(f"{path}:{reader.line_num + 1}: not UTF-8 text ({exc.reason})") from exc
        except csv.Error as exc:
            raise OutputError(f"{path}:{reader.line_num}: not a score CSV ({exc})") from exc


class CsvWriter(ResultWriter):
    def _scan(self) -> Iterator[dict[str, Any]]:
        if not self.path.exists() or self.path.stat().st_size == 0:
            return iter(())
        _truncate_torn_tail(self.path)
        if self.path.stat().st_size == 0:  # only a torn header was there
            return iter(())
        rows = list(_csv_rows(self.path, provenance=True))
        with self.path.open(newline="", encoding="utf-8") as f:
            header = next(csv.reader(f), [])
        if header != COLUMNS:  # an older column set: rewrite once (atomically) so appends line up
            self._rewrite(rows)
        return iter(rows)

    def _rewrite(self, rows: list[dict[str, Any]]) -> None:
        tmp = self.path.with_name(f".{self.path.name}.upgrade.tmp")
        tmp.unlink(missing_ok=True)
        self._append(tmp, [safe_row(r) for r in rows])
        os.replace(tmp, self.path)
        logger.info("%s: rewritten with the current columns %s", self.path, COLUMNS)

    @staticmethod
    def _append(path: Path, rows: list[dict[str, Any]]) -> None:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=COLUMNS)
        if not path.exists() or path.stat().st_size == 0:
            writer.writeheader()
        for r in rows:
            try:
                writer.writerow({k: _csv_value(r, k) for k in COLUMNS})
            except (ValueError, TypeError) as exc:
                bad = error_row(r, f"cannot record this result: {exc}")
                writer.writerow({k: _csv_value(bad, k) for k in COLUMNS})
        with path.open("a", newline="", encoding="utf-8") as f:
            f.write(buf.getvalue())
            f.flush()
            os.fsync(f.fileno())

    def _write_rows(self, rows: list[dict[str, Any]]) -> None:
        self._append(self.path, rows)


# --------------------------------------------------------------------------------------------------
# Parquet


def _read_parquet(path: Path, columns: list[str] | None = None):  # -> pa.Table with every COLUMNS column
    """A score Parquet file (or part) as a table of the full schema; OutputError naming it otherwise."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path).names
        if "path" not in names:
            raise OutputError(f"{path}: not a tastelab score file (no 'path' column)")
        wanted = COLUMNS if columns is None else columns
        table = pq.read_table(path, columns=[c for c in wanted if c in names])
        schema = ParquetWriter._schema(wanted)
        for name in wanted:  # outputs of older versions lack path_bytes / model columns
            if name not in table.column_names:
                table = table.append_column(name, pa.nulls(table.num_rows, type=schema.field(name).type))
        return table.select(wanted).cast(schema)
    except OutputError:
        raise
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise OutputError(f"{path}: not a readable score Parquet file ({exc})") from exc


class ParquetWriter(ResultWriter):
    """Part files in ``<out>.parts/`` while running; one merged Parquet file on close."""

    @property
    def parts_dir(self) -> Path:
        return self.path.with_name(self.path.name + ".parts")

    def _clear(self) -> None:
        super()._clear()
        shutil.rmtree(self.parts_dir, ignore_errors=True)

    def _files(self) -> list[Path]:
        files = [self.path] if self.path.exists() else []
        if self.parts_dir.is_dir():
            files += sorted(self.parts_dir.glob("part-*.parquet"))
        return files

    def _scan(self) -> Iterator[dict[str, Any]]:
        # After the highest existing part (not their count): never overwrite a part that is still there.
        parts = [int(f.stem.removeprefix("part-")) for f in self._files() if f != self.path]
        self._next_part = max(parts) + 1 if parts else 0
        rows: list[dict[str, Any]] = []
        for f in self._files():
            table = _read_parquet(f, ["path", "path_bytes", *PROVENANCE])
            try:
                rows.extend(from_row(r, provenance=True) for r in table.to_pylist())
            except UnrecordableError as exc:
                raise OutputError(f"{f}: {exc}") from exc
        return iter(rows)

    @staticmethod
    def _schema(columns: list[str] | None = None):  # -> pa.Schema
        """The score columns' Arrow types; by default the result fields only (what Ray output holds)."""
        import pyarrow as pa

        types = {"path": pa.string(), "score": pa.float64(), "raw_score": pa.float64(), "band": pa.string(),
                 "distribution": pa.list_(pa.float64()), "uncertainty": pa.float64(), "error": pa.string(),
                 "path_bytes": pa.string(), "model": pa.string(), "model_hash": pa.string()}
        return pa.schema([(name, types[name]) for name in (FIELDS if columns is None else columns)])

    def _table(self, rows: list[dict[str, Any]]):  # -> pa.Table
        import pyarrow as pa

        schema = self._schema(COLUMNS)
        try:
            return pa.Table.from_pylist(rows, schema=schema)
        except (pa.ArrowException, TypeError, ValueError):  # find the culprit(s): one row, one error row
            fixed = []
            for r in rows:
                try:
                    pa.Table.from_pylist([r], schema=schema)
                    fixed.append(r)
                except (pa.ArrowException, TypeError, ValueError) as exc:
                    fixed.append(error_row(r, f"cannot record this result: {exc}"))
            return pa.Table.from_pylist(fixed, schema=schema)

    def _write_rows(self, rows: list[dict[str, Any]]) -> None:
        import pyarrow.parquet as pq

        self.parts_dir.mkdir(parents=True, exist_ok=True)
        table = self._table(rows)
        final = self.parts_dir / f"part-{self._next_part:06d}.parquet"
        tmp = final.with_suffix(".tmp")
        pq.write_table(table, tmp)
        os.replace(tmp, final)
        self._next_part += 1

    def close(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.flush()
        files = self._files()
        if not files or (files == [self.path]):
            if not files:  # nothing scored at all: still leave a valid, empty file
                pq.write_table(pa.Table.from_pylist([], schema=self._schema(COLUMNS)), self.path)
            return
        table = pa.concat_tables([_read_parquet(f) for f in files])
        # A crash between replacing the output and removing the parts leaves rows in both: keep one.
        seen: set[tuple[str, str | None]] = set()
        keep = []
        names = zip(table.column("path").to_pylist(), table.column("path_bytes").to_pylist())
        for i, key in enumerate(names):
            if key[0] is None or key not in seen:
                keep.append(i)
                if key[0] is not None:
                    seen.add(key)
        if len(keep) < table.num_rows:
            table = table.take(pa.array(keep, type=pa.int64()))
        tmp = self.path.with_name(self.path.name + ".tmp")
        pq.write_table(table, tmp)
        os.replace(tmp, self.path)
        shutil.rmtree(self.parts_dir, ignore_errors=True)


def open_writer(path: str | os.PathLike, *, resume: bool = True, **kwargs: Any) -> ResultWriter:
    """A writer for ``path`` chosen by its suffix (``.jsonl``, ``.csv``, ``.parquet``)."""
    suffix = Path(path).suffix.lower()
    cls = {".jsonl": JsonlWriter, ".csv": CsvWriter, ".parquet": ParquetWriter}.get(suffix)
    if cls is None:
        raise OutputError(f"--out {path}: unsupported format {suffix!r}; use one of {SUPPORTED_SUFFIXES}")
    return cls(path, resume=resume, **kwargs)


def read_results(path: str | os.PathLike, *, provenance: bool = False) -> list[dict[str, Any]]:
    """Read a score output back as dicts (distribution decoded), whatever its format.

    Each dict has the :data:`FIELDS` keys; ``path`` is the original path string (a non-UTF-8 file name
    comes back exactly as :func:`os.fsdecode` gives it). ``provenance`` adds ``model`` / ``model_hash``.
    A malformed file raises :class:`OutputError` naming the file and line.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return list(_jsonl_rows(path, provenance=provenance))
    if suffix == ".csv":
        if path.stat().st_size == 0:
            return []
        return list(_csv_rows(path, provenance=provenance))
    if suffix == ".parquet":
        table = _read_parquet(path)
        try:
            return [from_row(r, provenance=provenance) for r in table.to_pylist()]
        except UnrecordableError as exc:
            raise OutputError(f"{path}: {exc}") from exc
    raise ValueError(f"{path}: unsupported format {suffix!r}")
