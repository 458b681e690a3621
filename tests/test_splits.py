"""Splits: reproducible, persisted, honoured on resume, and loud when they disagree."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from tastelab.io.records import Record, RecordError, RecordSet
from tastelab.io.splits import (
    load_split,
    make_split,
    portable_keys,
    save_split,
    split_comparisons,
    split_records,
)
from tastelab.io.votes import Vote

KEYS = [f"ss0{i % 3 + 1} ({i}).jpg" for i in range(200)]


def _records(root: Path, n: int = 50, split: str | None = None) -> list[Record]:
    return [
        Record(str(root / "images" / f"sub{i % 2}" / f"{i:04d}.jpg"), score=i / n, split=split)
        for i in range(n)
    ]


def test_make_split_reproducible_and_order_independent() -> None:
    first = make_split(KEYS, seed=3)
    assert make_split(list(reversed(KEYS)), seed=3) == first
    assert make_split(KEYS, seed=4) != first
    assert {name: len(keys) for name, keys in first.items()} == {"train": 160, "val": 20, "test": 20}
    assigned = [k for keys in first.values() for k in keys]
    assert sorted(assigned) == sorted(KEYS)  # every key exactly once


def test_make_split_sizes_sum_and_small_sets() -> None:
    split = make_split([str(i) for i in range(7)], {"train": 0.7, "val": 0.15, "test": 0.15})
    assert sum(len(v) for v in split.values()) == 7 and all(split.values())
    assert make_split([], seed=0) == {"train": [], "val": [], "test": []}
    assert make_split(["a", "a", "b"], {"train": 1.0}) == {"train": ["a", "b"]}


@pytest.mark.parametrize(
    "fractions",
    [{"train": 0.8, "val": 0.1}, {"train": 1.1, "val": -0.1}, {}, {"train": float("nan"), "val": 1.0}],
)
def test_make_split_rejects_bad_fractions(fractions: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        make_split(KEYS, fractions)


def test_portable_keys_are_relative_to_common_folder(tmp_path: Path) -> None:
    paths = [str(tmp_path / "data" / "a" / "x.jpg"), str(tmp_path / "data" / "b" / "y z.jpg")]
    assert portable_keys(paths) == ["a/x.jpg", "b/y z.jpg"]
    assert portable_keys([str(tmp_path / "one.jpg")]) == ["one.jpg"]


def test_split_records_creates_and_persists(tmp_path: Path) -> None:
    split_file = tmp_path / "run" / "split.json"
    records = _records(tmp_path)
    first = split_records(RecordSet(records, (0, 1), "mos", []), split_file, seed=7)
    assert {k: len(v) for k, v in first.items()} == {"train": 40, "val": 5, "test": 5}
    payload = json.loads(split_file.read_text())
    assert payload["seed"] == 7 and payload["fractions"] == {"train": 0.8, "val": 0.1, "test": 0.1}
    assert all(key.startswith("sub") for keys in payload["splits"].values() for key in keys)
    assert not [p for p in split_file.parent.iterdir() if p.name.endswith(".tmp")]
    # A second run, in another order and with another seed, reuses the saved split.
    again = split_records(list(reversed(records)), split_file, seed=99)
    assert {k: sorted(r.path for r in v) for k, v in again.items()} == {
        k: sorted(r.path for r in v) for k, v in first.items()
    }


def test_split_records_honours_edited_file(tmp_path: Path) -> None:
    records = _records(tmp_path, n=4)
    split_file = tmp_path / "split.json"
    save_split(
        split_file, {"train": ["sub0/0000.jpg", "sub1/0001.jpg"], "test": ["sub0/0002.jpg", "sub1/0003.jpg"]}
    )
    result = split_records(records, split_file)
    assert [r.path for r in result["test"]] == [records[2].path, records[3].path]
    assert result["val"] == []


def test_split_records_mismatch_is_an_error(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    split_file = tmp_path / "split.json"
    split_records(_records(tmp_path, n=20), split_file)
    with pytest.raises(RecordError, match=r"1 records are not in the split file .*0020\.jpg"):
        split_records(_records(tmp_path, n=21), split_file)
    caplog.set_level(logging.WARNING)
    fewer = split_records(_records(tmp_path, n=19), split_file)
    assert sum(len(v) for v in fewer.values()) == 19
    assert "1 keys in the split file have no record" in caplog.text


def test_split_records_uses_label_splits_and_carves_val(tmp_path: Path) -> None:
    records = [
        *_records(tmp_path, n=40, split="train"),
        Record(str(tmp_path / "t.jpg"), 0.5, split="test"),
        Record(str(tmp_path / "u.jpg"), 0.5),
    ]
    split_file = tmp_path / "split.json"
    result = split_records(records, split_file, seed=1)
    assert len(result["test"]) == 1 and len(result["val"]) == 4 and len(result["train"]) == 37
    assert not split_file.exists()  # label-file splits are the source of truth
    no_val = split_records(records, None, {"train": 0.9, "test": 0.1})
    assert "val" not in no_val and len(no_val["train"]) == 41


def test_split_records_carving_is_reproducible(tmp_path: Path) -> None:
    records = _records(tmp_path, n=60, split="train")
    first = {r.path for r in split_records(records, None, seed=5)["val"]}
    second = {r.path for r in split_records(list(reversed(records)), None, seed=5)["val"]}
    assert first == second and len(first) == 6


def test_load_split_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="split file not found"):
        load_split(tmp_path / "none.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(RecordError, match=r"bad\.json:1: invalid JSON"):
        load_split(bad)
    bad.write_text(json.dumps({"seed": 0}))
    with pytest.raises(RecordError, match='"splits"'):
        load_split(bad)
    bad.write_text(json.dumps({"splits": {"train": ["a"], "test": ["a"]}}))
    with pytest.raises(RecordError, match="'a' appears in both split 'train' and 'test'"):
        load_split(bad)


def test_save_and_load_split_roundtrip(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    save_split(path, {"train": ["b", "a"], "val": []}, {"seed": 3, "note": "ünïcode"})
    splits, meta = load_split(path)
    assert splits == {"train": ["a", "b"], "val": []}
    assert meta == {"version": 1, "seed": 3, "note": "ünïcode"}


def test_split_comparisons_keeps_pairs_together() -> None:
    comps = [Vote(f"{i % 10}.jpg", f"{(i * 7 + 1) % 10}.jpg", 1, 0) for i in range(100)]
    comps = [c for c in comps if c.image_a != c.image_b]
    comps += [Vote(c.image_b, c.image_a, 0, 1) for c in comps[:10]]  # same pairs, flipped
    result = split_comparisons(comps, seed=2)
    assert sum(len(v) for v in result.values()) == len(comps)
    owner: dict[frozenset[str], str] = {}
    for name, items in result.items():
        for c in items:
            assert owner.setdefault(frozenset((c.image_a, c.image_b)), name) == name
    flipped = split_comparisons(list(reversed(comps)), seed=2)
    assert {k: set(v) for k, v in flipped.items()} == {k: set(v) for k, v in result.items()}
