"""Result writers: round trips, resume, crash recovery (torn lines, left-over parquet parts)."""

from __future__ import annotations

from pathlib import Path

import pytest

import tastelab.io.writers as writers_mod
import tiny
from tastelab.io.writers import FIELDS, ParquetWriter, open_writer, read_results
from tastelab.scoring import Scorer, score_paths_to_file

FORMATS = (".jsonl", ".csv", ".parquet")

RECORDS = [
    {"path": "/data/a photo.jpg", "score": 7.25, "raw_score": 0.694444, "band": "Very Good",
     "distribution": [0.0, 0.01, 0.02, 0.07, 0.1, 0.2, 0.3, 0.2, 0.08, 0.02], "uncertainty": 1.5,
     "error": None},
    {"path": "/data/broken.jpg", "score": None, "raw_score": None, "band": None, "distribution": None,
     "uncertainty": None, "error": "cannot identify image file (not an image or an unsupported format)"},
    {"path": 'dir/ph,ö "quoted";x.png', "score": 1.0, "raw_score": -0.123456, "band": "Poor",
     "distribution": None, "uncertainty": None, "error": None},
    {"path": "/data/g.png", "score": 3.1415, "raw_score": 3.1415, "band": "Below Average", "distribution": None,
     "uncertainty": 0.25, "error": None},
]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from tiny.one_torch_thread()


def _paths(path: Path) -> list[str]:
    return [r["path"] for r in read_results(path)]


def _write(path: Path, rows, **kwargs) -> None:
    with open_writer(path, **kwargs) as w:
        w.write_many(rows)


@pytest.mark.parametrize("suffix", FORMATS)
def test_round_trip_preserves_types(tmp_path: Path, suffix: str) -> None:
    out = tmp_path / "sub" / f"scores{suffix}"  # parent folders are created
    _write(out, RECORDS)
    back = read_results(out)
    assert back == RECORDS
    for got in back:
        assert list(got) == FIELDS
        for key in ("score", "raw_score", "uncertainty"):
            assert got[key] is None or type(got[key]) is float
        assert got["distribution"] is None or all(type(v) is float for v in got["distribution"])
    if suffix == ".parquet":
        assert not (tmp_path / "sub" / "scores.parquet.parts").exists()


@pytest.mark.parametrize("suffix", FORMATS)
def test_extra_and_missing_keys(tmp_path: Path, suffix: str) -> None:
    out = tmp_path / f"s{suffix}"
    _write(out, [{"path": "p", "score": 5.0, "unrelated": 1}])
    assert read_results(out) == [{k: ("p" if k == "path" else 5.0 if k == "score" else None) for k in FIELDS}]


@pytest.mark.parametrize("suffix", FORMATS)
def test_resume_reads_done_and_appends(tmp_path: Path, suffix: str) -> None:
    out = tmp_path / f"scores{suffix}"
    _write(out, RECORDS[:2])
    with open_writer(out) as w:
        assert w.done == {r["path"] for r in RECORDS[:2]}
        w.write_many(RECORDS[2:])
        assert w.done >= {r["path"] for r in RECORDS[:2]}
    assert read_results(out) == RECORDS
    with open_writer(out) as w:
        assert w.done == {r["path"] for r in RECORDS}
    assert read_results(out) == RECORDS  # opening and closing without writing changes nothing


@pytest.mark.parametrize("suffix", FORMATS)
def test_no_resume_overwrites(tmp_path: Path, suffix: str) -> None:
    out = tmp_path / f"scores{suffix}"
    _write(out, RECORDS)
    with open_writer(out, resume=False) as w:
        assert w.done == set()
        w.write(RECORDS[3])
    assert read_results(out) == [RECORDS[3]]


@pytest.mark.parametrize("suffix", FORMATS)
def test_empty_run_leaves_a_readable_file(tmp_path: Path, suffix: str) -> None:
    out = tmp_path / f"scores{suffix}"
    with open_writer(out) as w:
        assert w.done == set()
    if out.exists():
        assert read_results(out) == []
    with open_writer(out) as w:
        assert w.done == set()


def test_buffering_flushes_in_batches(tmp_path: Path) -> None:
    out = tmp_path / "s.jsonl"
    w = open_writer(out, flush_every=2, flush_seconds=3600)
    w.write(RECORDS[0])
    assert not out.exists() or out.stat().st_size == 0
    w.write(RECORDS[1])
    assert _paths(out) == [RECORDS[0]["path"], RECORDS[1]["path"]]
    w.write(RECORDS[2])
    assert len(_paths(out)) == 2 and w.written == 2
    w.close()
    assert len(_paths(out)) == 3 and w.written == 3


@pytest.mark.parametrize("suffix", [".txt", ".json", ".xlsx", ""])
def test_unsupported_suffix(tmp_path: Path, suffix: str) -> None:
    with pytest.raises(ValueError, match=r"unsupported format.*\.jsonl"):
        open_writer(tmp_path / f"scores{suffix}")
    with pytest.raises(ValueError, match="unsupported format"):
        read_results(tmp_path / f"scores{suffix}")


def test_suffix_is_case_insensitive(tmp_path: Path) -> None:
    out = tmp_path / "S.JSONL"
    _write(out, RECORDS[:1])
    assert read_results(out) == RECORDS[:1]


# --------------------------------------------------------------------------------------------------
# Crash recovery


@pytest.mark.parametrize(
    ("suffix", "torn"),
    [
        (".jsonl", '{"path": "/data/torn.jpg", "score": 5.1, "ra'),
        (".jsonl", "{"),
        (".csv", "/data/torn.jpg,5.1,0.45,Go"),
        (".csv", '"/data/torn, with comma.jpg",5.'),
    ],
)
def test_torn_last_line_is_cut_on_resume(tmp_path: Path, suffix: str, torn: str) -> None:
    out = tmp_path / f"scores{suffix}"
    _write(out, RECORDS[:3])
    with out.open("a", encoding="utf-8", newline="") as f:
        f.write(torn)  # a crash mid-write: no newline at the end
    with open_writer(out) as w:
        assert w.done == {r["path"] for r in RECORDS[:3]}
        assert out.read_bytes().endswith(b"\n")
        w.write(RECORDS[3])
    assert read_results(out) == RECORDS  # valid file, torn row gone, nothing duplicated
    assert b"torn" not in out.read_bytes()


def test_csv_with_only_a_torn_header_resumes(tmp_path: Path) -> None:
    out = tmp_path / "scores.csv"
    out.write_text("path,score,raw_sc", encoding="utf-8")
    with open_writer(out) as w:
        assert w.done == set()
        w.write(RECORDS[0])
    assert read_results(out) == RECORDS[:1]


def test_foreign_files_are_refused(tmp_path: Path) -> None:
    jsonl = tmp_path / "x.jsonl"
    jsonl.write_text('{"path": "a"}\nnot json\n{"path": "b"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"x\.jsonl:2"):
        open_writer(jsonl)
    csv_file = tmp_path / "x.csv"
    csv_file.write_text("image,mos\na.jpg,0.5\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no 'path' column"):
        open_writer(csv_file)


def test_parquet_parts_survive_a_crash(tmp_path: Path) -> None:
    out = tmp_path / "scores.parquet"
    crashed = open_writer(out)
    assert isinstance(crashed, ParquetWriter)
    crashed.write_many(RECORDS[:2])
    crashed.flush()  # rows on disk as a part file...
    crashed.write(RECORDS[2])  # ...this one only in memory when the process dies (never closed)
    parts = crashed.parts_dir
    assert parts.is_dir() and len(list(parts.glob("part-*.parquet"))) == 1
    assert not out.exists()

    with open_writer(out) as w:
        assert w.done == {RECORDS[0]["path"], RECORDS[1]["path"]}
        w.write_many(RECORDS[2:])
        w.flush()
        assert len(list(parts.glob("part-*.parquet"))) == 2  # no part was overwritten
    assert read_results(out) == RECORDS
    assert not parts.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores.parquet"]


def test_parquet_crash_between_merge_and_cleanup(tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "scores.parquet"
    w = open_writer(out)
    w.write_many(RECORDS[:2])
    with monkeypatch.context() as m:  # the process dies right after the merged file is in place
        m.setattr(writers_mod.shutil, "rmtree", lambda *a, **k: None)
        w.close()
    assert out.exists() and w.parts_dir.is_dir()
    with open_writer(out) as again:
        assert again.done == {RECORDS[0]["path"], RECORDS[1]["path"]}
        again.write_many(RECORDS[2:])
    assert read_results(out) == RECORDS  # each row once
    assert not w.parts_dir.exists()


def test_parquet_resume_after_clean_close(tmp_path: Path) -> None:
    out = tmp_path / "scores.parquet"
    _write(out, RECORDS[:1])
    _write(out, RECORDS[1:3])
    _write(out, RECORDS[3:])
    assert read_results(out) == RECORDS
    with open_writer(out, resume=False) as w:
        w.write(RECORDS[0])
        w.flush()
    assert read_results(out) == RECORDS[:1]


# --------------------------------------------------------------------------------------------------
# Scoring into a file twice


@pytest.fixture(scope="module")
def scorer(tmp_path_factory) -> Scorer:
    folder = tiny.save_tiny_model(tmp_path_factory.mktemp("m") / "model", "distribution", "siglip")
    return Scorer(folder, device="cpu", workers=0, batch_size=4)


@pytest.mark.parametrize("suffix", FORMATS)
def test_score_paths_to_file_twice_scores_nothing_new(tmp_path: Path, scorer: Scorer, suffix: str) -> None:
    good = [str(p) for p in tiny.make_images(tmp_path / "imgs", n=5)]
    bad = [str(p) for p in tiny.make_bad_files(tmp_path / "imgs").values()]
    paths = good + bad
    out = tmp_path / f"scores{suffix}"
    first = score_paths_to_file(scorer, paths, out)
    assert first == {"total": 8, "skipped": 0, "scored": 5, "errors": 3}
    second = score_paths_to_file(scorer, paths, out)
    assert second == {"total": 8, "skipped": 8, "scored": 0, "errors": 0}
    rows = read_results(out)
    assert sorted(r["path"] for r in rows) == sorted(paths)  # each path exactly once
    by_path = {r["path"]: r for r in rows}
    for p in good:
        assert by_path[p]["error"] is None and len(by_path[p]["distribution"]) == 10
    for p in bad:
        assert by_path[p]["error"] and by_path[p]["score"] is None
    more = paths + [str(p) for p in tiny.make_images(tmp_path / "more", n=2)]
    third = score_paths_to_file(scorer, more, out)
    assert third == {"total": 10, "skipped": 8, "scored": 2, "errors": 0}
    assert sorted(_paths(out)) == sorted(more)
    fresh = score_paths_to_file(scorer, good[:1], out, resume=False)
    assert fresh["scored"] == 1 and _paths(out) == good[:1]
