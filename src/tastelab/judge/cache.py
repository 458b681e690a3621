"""The judge's metric cache: what was computed once is never computed again.

Why: a LoRA run saves a checkpoint every epoch, and the user re-judges after each save. Per-image values
are keyed by (the item's id, the metric's :meth:`~tastelab.judge.metrics.base.Metric.cache_key`). The item
id is the image's content hash -- not the path, so a renamed file is found and a re-generated one is
recomputed -- and, for a metric that reads the prompt (``"prompt"`` in ``MetricInfo.inputs``), the digest of
the prompt text too (:func:`prompted_id`): an edited prompt recomputes the prompt metrics of its images only,
and two samples with the same bytes but other prompts get a value each, while image-only metrics stay keyed
by the hash alone (reusable across prompt edits). The cache key holds the metric's name, version, options
and what it resolved to (e.g. an offline stand-in encoder), so changing one metric's settings recomputes
that metric only. A set metric's value (diversity across one prompt's seeds) is keyed by the set id of its
members' item ids (:func:`set_id`) and the cache key.

Storage is one SQLite file (stdlib ``sqlite3``, WAL journal so readers never block the writer; one
transaction per chunk of images, so an interrupted run keeps every finished chunk and never a partial
one): ``OUT/.judge_cache.sqlite`` by default, or a shared file (``--cache``) that several output folders
use. A missing value ("no face found") is stored as SQL NULL and read back as ``None``, so it is not
recomputed either; a non-finite value is refused (never stored: it is not a score).
"""

from __future__ import annotations

import hashlib
import math
import os
import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType

from tastelab.core.errors import UserError

__all__ = ["CACHE_NAME", "MetricCache", "prompted_id", "set_id"]

CACHE_NAME = ".judge_cache.sqlite"
SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS metric_keys (key TEXT PRIMARY KEY, cache_key TEXT NOT NULL);
-- image_values.sha holds the item id: the content hash, or prompted_id(hash, prompt) for a metric that reads
-- the prompt (so a cache written before prompt ids existed stays valid for the image-only metrics)
CREATE TABLE IF NOT EXISTS image_values (sha TEXT NOT NULL, key TEXT NOT NULL, value REAL,
                                         PRIMARY KEY (sha, key)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS set_values (members TEXT NOT NULL, key TEXT NOT NULL, value REAL,
                                       PRIMARY KEY (members, key)) WITHOUT ROWID;
"""
_BATCH = 500  # SQLite's bound-parameter limit is 999 on old builds


def _digest(text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


def set_id(member_ids: Iterable[str]) -> str:
    """Identity of a set of images: the hash of its members' sorted item ids (content hashes, or
    :func:`prompted_id` for a metric that reads the prompt); order-free."""
    return _digest("\n".join(sorted(member_ids)))


def prompted_id(sha: str, prompt: str | None) -> str:
    """Identity of an image as a prompt-reading metric sees it: (content hash, prompt text digest).

    Why: such a metric's value depends on the text as much as on the pixels, so the same bytes under an
    edited (or another) prompt are another item. A sample with no known prompt gets its own marker (never
    the bare hash, nor the digest of any text), so prompts added later are not answered by a value that was
    missing for want of a prompt."""
    return f"{sha}:p-" if prompt is None else f"{sha}:p{_digest(prompt)}"


def _checked(values: Mapping[str, float | None], key: str) -> list[tuple[str, float | None]]:
    """(id, value) rows; ValueError naming the metric and the item for a non-finite or non-number value."""
    rows = []
    for item, value in values.items():
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"metric cache: {key}: value for {item} is {value!r}, not a number or None")
            value = float(value)
            if not math.isfinite(value):
                raise ValueError(f"metric cache: {key}: value for {item} is {value}; non-finite values are not "
                                 "scores and are never stored (a missing value is None)")
        rows.append((item, value))
    return rows


class MetricCache:
    """Per-image and per-set metric values in one SQLite file (see the module docstring).

    ``path=None`` keeps the cache in memory (a run without an output folder). Use as a context manager
    or call :meth:`close`.
    """

    def __init__(self, path: str | os.PathLike | None) -> None:
        self.path = None if path is None else Path(path)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(":memory:" if self.path is None else str(self.path), timeout=60.0,
                                   isolation_level=None)  # autocommit; explicit transactions below
        try:
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, SCHEMA_VERSION):
                raise UserError(f"{self.path}: a judge metric cache of another format (version {version}); "
                                "delete it or choose another --cache")
            if self.path is not None:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
            self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except sqlite3.DatabaseError as exc:
            self._db.close()
            raise UserError(f"{self.path}: not a judge metric cache ({exc}); delete it or choose another --cache") \
                from exc
        except BaseException:
            self._db.close()
            raise
        self._keys: dict[str, str] = {}

    # ---------------------------------------------------------------------------------------- keys
    def _key(self, cache_key: str) -> str:
        """A short id of a metric's cache key (the full text is kept in ``metric_keys`` for inspection)."""
        key = self._keys.get(cache_key)
        if key is None:
            key = _digest(cache_key)
            self._db.execute("INSERT OR IGNORE INTO metric_keys VALUES (?, ?)", (key, cache_key))
            self._keys[cache_key] = key
        return key

    def _get(self, table: str, column: str, cache_key: str, ids: Sequence[str]) -> dict[str, float | None]:
        key = self._key(cache_key)
        out: dict[str, float | None] = {}
        unique = list(dict.fromkeys(ids))
        for start in range(0, len(unique), _BATCH):
            part = unique[start:start + _BATCH]
            marks = ",".join("?" * len(part))
            rows = self._db.execute(f"SELECT {column}, value FROM {table} WHERE key = ? AND {column} IN ({marks})",
                                    (key, *part))
            out.update({item: value for item, value in rows})
        return out

    def _put(self, table: str, cache_key: str, values: Mapping[str, float | None]) -> None:
        rows = _checked(values, cache_key)  # every value checked before anything is written
        key = self._key(cache_key)
        with self._transaction():
            self._db.executemany(f"INSERT OR REPLACE INTO {table} VALUES (?, ?, ?)",
                                 [(item, key, value) for item, value in rows])

    def _transaction(self) -> _Commit:
        self._db.execute("BEGIN IMMEDIATE")
        return _Commit(self._db)

    # ---------------------------------------------------------------------------------------- images
    def get_images(self, cache_key: str, ids: Sequence[str]) -> dict[str, float | None]:
        """The cached values among the item ids ``ids`` (content hashes, or :func:`prompted_id` for a metric
        that reads the prompt; absent: not computed yet; ``None``: computed, missing)."""
        return self._get("image_values", "sha", cache_key, ids)

    def put_images(self, cache_key: str, values: Mapping[str, float | None]) -> None:
        """Store one chunk's values (item id -> value) in one transaction; ValueError on a non-finite value."""
        self._put("image_values", cache_key, values)

    # ---------------------------------------------------------------------------------------- sets
    def get_sets(self, cache_key: str, set_ids: Sequence[str]) -> dict[str, float | None]:
        """The cached values among ``set_ids`` (see :func:`set_id`)."""
        return self._get("set_values", "members", cache_key, set_ids)

    def put_sets(self, cache_key: str, values: Mapping[str, float | None]) -> None:
        """Store set values (set id -> value) in one transaction; ValueError on a non-finite value."""
        self._put("set_values", cache_key, values)

    # ---------------------------------------------------------------------------------------- lifetime
    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> MetricCache:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class _Commit:
    """Commits the open transaction on success, rolls it back on error (nothing partial is kept)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> sqlite3.Connection:
        return self._db

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._db.execute("ROLLBACK" if exc_type is not None else "COMMIT")
