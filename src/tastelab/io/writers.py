"""Resumable, crash-safe writers for per-image score records: ``.jsonl``, ``.csv``, ``.parquet``.

Resume contract: re-opening the same output reads which paths are already recorded (``done``), so a
re-run after a crash or Ctrl-C skips them: nothing is lost, nothing is duplicated. Rows are buffered
and flushed in batches (off the model's hot path); a torn last line left by a crash is cut off on
resume. Parquet files cannot be appended to, so rows go to atomically written part files beside the
output and are merged into the final file (also atomically) on close.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import shutil
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

FIELDS = ["path", "score", "raw_score", "band", "distribution", "uncertainty", "error"]
SUPPORTED_SUFFIXES = (".jsonl", ".csv", ".parquet")


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


class ResultWriter:
    """Base: buffering and flushing policy; subclasses implement ``_read_done`` and ``_write_rows``."""

    def __init__(self, path: str | os.PathLike, *, resume: bool = True, flush_every: int = 512,
                 flush_seconds: float = 5.0) -> None:
        self.path = Path(path)
        self.flush_every = flush_every
        self.flush_seconds = flush_seconds
        self._buffer: list[dict[str, Any]] = []
        self._last_flush = time.monotonic()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not resume:
            self._clear()
        self.done: set[str] = self._read_done()
        self.written = 0

    def _clear(self) -> None:
        self.path.unlink(missing_ok=True)

    def _read_done(self) -> set[str]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _write_rows(self, rows: list[dict[str, Any]]) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def write(self, row: Mapping[str, Any]) -> None:
        self._buffer.append({k: row.get(k) for k in FIELDS})
        if len(self._buffer) >= self.flush_every or time.monotonic() - self._last_flush > self.flush_seconds:
            self.flush()

    def write_many(self, rows: Iterable[Mapping[str, Any]]) -> None:
        for row in rows:
            self.write(row)

    def flush(self) -> None:
        if self._buffer:
            self._write_rows(self._buffer)
            self.written += len(self._buffer)
            self.done.update(r["path"] for r in self._buffer)
            self._buffer = []
        self._last_flush = time.monotonic()

    def close(self) -> None:
        self.flush()

    def __enter__(self) -> ResultWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class JsonlWriter(ResultWriter):
    def _read_done(self) -> set[str]:
        if not self.path.exists():
            return set()
        _truncate_torn_tail(self.path)
        done = set()
        with self.path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    done.add(json.loads(line)["path"])
                except (json.JSONDecodeError, KeyError) as exc:
                    raise ValueError(f"{self.path}:{lineno}: not a score record ({exc})") from exc
        return done

    def _write_rows(self, rows: list[dict[str, Any]]) -> None:
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


class CsvWriter(ResultWriter):
    def _read_done(self) -> set[str]:
        if not self.path.exists() or self.path.stat().st_size == 0:
            return set()
        _truncate_torn_tail(self.path)
        if self.path.stat().st_size == 0:  # only a torn header was there
            return set()
        with self.path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or "path" not in reader.fieldnames:
                raise ValueError(f"{self.path}:1: not a tastelab score CSV (no 'path' column)")
            return {row["path"] for row in reader}

    def _write_rows(self, rows: list[dict[str, Any]]) -> None:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=FIELDS)
        if not self.path.exists() or self.path.stat().st_size == 0:
            writer.writeheader()
        for r in rows:
            writer.writerow({**r, "distribution": None if r["distribution"] is None
                             else json.dumps(r["distribution"])})
        with self.path.open("a", newline="", encoding="utf-8") as f:
            f.write(buf.getvalue())
            f.flush()
            os.fsync(f.fileno())


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

    def _read_done(self) -> set[str]:
        import pyarrow.parquet as pq

        done: set[str] = set()
        for f in self._files():
            done.update(pq.read_table(f, columns=["path"]).column("path").to_pylist())
        # After the highest existing part (not their count): never overwrite a part that is still there.
        parts = [int(f.stem.removeprefix("part-")) for f in self._files() if f != self.path]
        self._next_part = max(parts) + 1 if parts else 0
        return done

    @staticmethod
    def _schema():  # -> pa.Schema
        import pyarrow as pa

        return pa.schema([
            ("path", pa.string()), ("score", pa.float64()), ("raw_score", pa.float64()),
            ("band", pa.string()), ("distribution", pa.list_(pa.float64())),
            ("uncertainty", pa.float64()), ("error", pa.string()),
        ])

    def _write_rows(self, rows: list[dict[str, Any]]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.parts_dir.mkdir(parents=True, exist_ok=True)
        table = pa.Table.from_pylist(rows, schema=self._schema())
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
                pq.write_table(pa.Table.from_pylist([], schema=self._schema()), self.path)
            return
        table = pa.concat_tables([pq.read_table(f).cast(self._schema()) for f in files])
        # A crash between replacing the output and removing the parts leaves rows in both: keep one.
        seen: set[str] = set()
        keep = []
        for i, p in enumerate(table.column("path").to_pylist()):
            if p is None or p not in seen:
                keep.append(i)
                if p is not None:
                    seen.add(p)
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
        raise ValueError(f"--out {path}: unsupported format {suffix!r}; use one of {SUPPORTED_SUFFIXES}")
    return cls(path, resume=resume, **kwargs)


def read_results(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a score output back as dicts (distribution decoded), whatever its format."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        out = []
        for r in rows:
            conv: dict[str, Any] = {k: (v if v != "" else None) for k, v in r.items()}
            for k in ("score", "raw_score", "uncertainty"):
                conv[k] = float(conv[k]) if conv[k] is not None else None
            conv["distribution"] = json.loads(conv["distribution"]) if conv["distribution"] else None
            out.append(conv)
        return out
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    raise ValueError(f"{path}: unsupported format {suffix!r}")
