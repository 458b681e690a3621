"""The judge's SQLite metric cache: per-image and per-set values, missing vs absent, non-finite refused."""

from __future__ import annotations

import math
import sqlite3
from pathlib import Path

import pytest

from tastelab.judge.cache import MetricCache, set_id

KEY = '{"metric": "clip_t", "options": {}}'


def test_values_survive_reopening_and_keys_are_separate(tmp_path: Path) -> None:
    path = tmp_path / "out" / ".judge_cache.sqlite"
    with MetricCache(path) as cache:
        cache.put_images(KEY, {"aa": 0.25, "bb": None, "cc": 3})
        cache.put_sets(KEY, {set_id(["bb", "aa"]): 1.5})
    with MetricCache(path) as cache:
        got = cache.get_images(KEY, ["aa", "bb", "cc", "dd", "aa"])
        assert got == {"aa": 0.25, "bb": None, "cc": 3.0}  # bb: computed, missing; dd: never computed
        assert "dd" not in got
        assert cache.get_images(KEY.replace("clip_t", "dino"), ["aa"]) == {}  # another metric config
        assert cache.get_sets(KEY, [set_id(["aa", "bb"])]) == {set_id(["aa", "bb"]): 1.5}  # member order-free
        assert cache.get_sets(KEY, [set_id(["aa"])]) == {}
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, "0.5", True])
def test_non_finite_or_non_numbers_are_refused_and_nothing_of_the_chunk_is_stored(tmp_path: Path, bad) -> None:
    with MetricCache(tmp_path / "c.sqlite") as cache:
        with pytest.raises(ValueError, match=r"clip_t.*value for bb"):
            cache.put_images(KEY, {"aa": 0.5, "bb": bad})
        assert cache.get_images(KEY, ["aa", "bb"]) == {}  # the chunk is one transaction
        with pytest.raises(ValueError, match="value for"):
            cache.put_sets(KEY, {set_id(["aa"]): bad})


def test_large_lookups_and_memory_cache() -> None:
    with MetricCache(None) as cache:
        values = {f"{i:032x}": float(i) for i in range(2500)}
        cache.put_images(KEY, values)
        assert cache.get_images(KEY, list(values)) == values


def test_a_failed_write_keeps_the_previous_chunks(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    with MetricCache(path) as cache:
        cache.put_images(KEY, {"aa": 0.1})
        with pytest.raises(ValueError):
            cache.put_images(KEY, {"bb": math.nan})
        cache.put_images(KEY, {"aa": 0.2})  # a value recomputed under the same key replaces the old one
    with MetricCache(path) as cache:
        assert cache.get_images(KEY, ["aa", "bb"]) == {"aa": 0.2}


def test_a_file_that_is_not_a_cache_is_a_user_error(tmp_path: Path) -> None:
    from tastelab.core.errors import UserError

    junk = tmp_path / "notes.sqlite"
    junk.write_bytes(b"these are my notes, not a database" * 100)
    with pytest.raises(UserError, match=r"notes\.sqlite: not a judge metric cache"):
        MetricCache(junk)
    assert junk.read_bytes().startswith(b"these are my notes")  # left untouched
    other = tmp_path / "other.sqlite"
    db = sqlite3.connect(other)
    db.execute("PRAGMA user_version = 7")
    db.close()
    with pytest.raises(UserError, match="another format"):
        MetricCache(other)
