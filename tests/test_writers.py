"""Result writers: round trips, resume, crash recovery (torn lines, left-over parquet parts)."""

from __future__ import annotations

import base64
import json
import os
import sys
from pathlib import Path

import pytest

import tastelab.io.writers as writers_mod
import tiny
from tastelab.inference.scoring import Scorer, score_paths_to_file
from tastelab.io.writers import (
    COLUMNS,
    FIELDS,
    ModelMismatchError,
    OutputError,
    ParquetWriter,
    check_output,
    open_writer,
    read_results,
)

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


# --------------------------------------------------------------------------------------------------
# File names that are not UTF-8, records that cannot be stored, strict JSON


def _strict_json_lines(path: Path) -> list[dict]:
    """Parse like a strict parser: valid UTF-8, no NaN/Infinity."""

    def refuse(name: str):
        raise AssertionError(f"non-standard JSON constant {name}")

    text = path.read_bytes().decode("utf-8")  # strict: every byte valid UTF-8
    return [json.loads(line, parse_constant=refuse) for line in text.splitlines() if line.strip()]


def _non_utf8_image(folder: Path) -> str:
    """A real image whose file name is Latin-1 bytes (invalid UTF-8), created through a bytes path."""
    folder.mkdir(parents=True, exist_ok=True)
    src = tiny.make_images(folder / "src", n=1)[0]
    raw = os.fsencode(folder) + b"/caf\xe9 \xff.jpg"
    fd = os.open(raw, os.O_WRONLY | os.O_CREAT, 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(src.read_bytes())
    path = os.fsdecode(raw)
    assert os.fsencode(path) == raw and "\udce9" in path
    return path


@pytest.mark.skipif(sys.platform != "linux", reason="byte file names: Linux")
@pytest.mark.parametrize("suffix", FORMATS)
def test_non_utf8_file_name_is_recorded_losslessly(tmp_path: Path, scorer: Scorer, suffix: str) -> None:
    odd = _non_utf8_image(tmp_path / "imgs")
    good = [str(p) for p in tiny.make_images(tmp_path / "imgs" / "more", n=2)]
    out = tmp_path / f"scores{suffix}"
    assert score_paths_to_file(scorer, [good[0], odd, good[1]], out) == {
        "total": 3, "skipped": 0, "scored": 3, "errors": 0}
    rows = {r["path"]: r for r in read_results(out)}
    assert set(rows) == {odd, *good}  # the original string comes back: os.fsencode gives the real bytes
    assert rows[odd]["error"] is None and rows[odd]["score"] is not None
    assert os.path.isfile(odd)
    if suffix == ".jsonl":
        stored = {r["path"]: r for r in _strict_json_lines(out)}
        readable = "caf\\xe9 \\xff.jpg"
        (entry,) = [r for k, r in stored.items() if k.endswith(readable)]
        assert base64.b64decode(entry["path_bytes"]) == os.fsencode(odd)
        assert all(r["path_bytes"] is None for k, r in stored.items() if k in good)
    again = score_paths_to_file(scorer, [odd, *good], out)  # resume recognises the odd name
    assert again == {"total": 3, "skipped": 3, "scored": 0, "errors": 0}
    assert len(read_results(out)) == 3


@pytest.mark.parametrize("suffix", FORMATS)
def test_one_bad_record_never_takes_the_writer_down(tmp_path: Path, suffix: str) -> None:
    out = tmp_path / f"scores{suffix}"
    rows = [RECORDS[0],
            {"path": "/data/nan.jpg", "score": float("nan"), "raw_score": 0.5, "band": "Poor"},
            {"path": "/data/inf.jpg", "score": 5.0, "raw_score": float("inf"), "band": "Good"},
            {"path": "/data/dist.jpg", "score": 5.0, "raw_score": 0.5, "distribution": [0.5, float("nan")]},
            {"path": "/data/lone\ud800.jpg", "score": 5.0},  # a str no file name decodes to
            {"path": "/data/text.jpg", "score": "high"},
            RECORDS[3]]
    _write(out, rows)
    back = {r["path"]: r for r in read_results(out)}
    assert back[RECORDS[0]["path"]] == RECORDS[0] and back[RECORDS[3]["path"]] == RECORDS[3]
    for p in ("/data/nan.jpg", "/data/inf.jpg", "/data/dist.jpg", "/data/text.jpg"):
        assert back[p]["score"] is None and back[p]["band"] is None and "cannot record" in back[p]["error"]
    assert "non-finite" in back["/data/nan.jpg"]["error"]
    assert "non-finite" in back["/data/inf.jpg"]["error"]
    (lone,) = [r for p, r in back.items() if p.startswith("/data/lone")]
    assert lone["score"] is None and "not a file name" in lone["error"]
    if suffix == ".jsonl":
        assert len(_strict_json_lines(out)) == len(rows)


# --------------------------------------------------------------------------------------------------
# Resume: by model, by file (not spelling), clear errors for files that are not score outputs


@pytest.mark.parametrize("suffix", FORMATS)
def test_resume_refuses_another_models_output(tmp_path: Path, suffix: str) -> None:
    out = tmp_path / f"scores{suffix}"
    _write(out, RECORDS[:2], model="quality", model_hash="aaaa")
    assert {(r["model"], r["model_hash"]) for r in read_results(out, provenance=True)} == {("quality", "aaaa")}
    with pytest.raises(ModelMismatchError) as info:
        open_writer(out, model="taste", model_hash="bbbb")
    message = str(info.value)
    assert str(out) in message and "quality (hash aaaa)" in message and "taste (hash bbbb)" in message
    assert "\n" not in message
    with open_writer(out, model="quality", model_hash="aaaa") as w:  # the same model resumes
        w.write(RECORDS[2])
    with open_writer(out, model="taste", model_hash="bbbb", allow_mixed_models=True) as w:
        w.write(RECORDS[3])
    got = {r["path"]: r["model_hash"] for r in read_results(out, provenance=True)}
    assert got == {RECORDS[0]["path"]: "aaaa", RECORDS[1]["path"]: "aaaa", RECORDS[2]["path"]: "aaaa",
                   RECORDS[3]["path"]: "bbbb"}
    legacy = tmp_path / f"legacy{suffix}"
    _write(legacy, RECORDS[:1])  # no model recorded: cannot tell which model made it
    with pytest.raises(ModelMismatchError, match="unrecorded model"):
        open_writer(legacy, model="quality", model_hash="aaaa")


def test_score_paths_to_file_refuses_another_model(tmp_path: Path, scorer: Scorer) -> None:
    other = Scorer(tiny.save_tiny_model(tmp_path / "other", "distribution", "siglip", seed=7), device="cpu",
                   workers=0, batch_size=4)
    assert other.identity.hash != scorer.identity.hash
    images = [str(p) for p in tiny.make_images(tmp_path / "imgs", n=2)]
    out = tmp_path / "scores.jsonl"
    score_paths_to_file(scorer, images[:1], out)
    with pytest.raises(ModelMismatchError, match=scorer.identity.hash):
        score_paths_to_file(other, images, out)
    assert score_paths_to_file(other, images, out, allow_mixed_models=True)["scored"] == 1
    rows = read_results(out, provenance=True)
    assert [r["model_hash"] for r in rows] == [scorer.identity.hash, other.identity.hash]


@pytest.mark.parametrize("suffix", FORMATS)
def test_resume_matches_the_file_not_the_spelling(tmp_path: Path, scorer: Scorer, suffix: str,
                                                  monkeypatch) -> None:
    images = tiny.make_images(tmp_path / "imgs", n=2)
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "imgs")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / f"scores{suffix}"
    relative = os.path.join("imgs", images[0].name)
    assert score_paths_to_file(scorer, [relative], out)["scored"] == 1
    again = score_paths_to_file(scorer, [str(images[0]), str(link / images[0].name), str(images[1])], out)
    assert again == {"total": 3, "skipped": 2, "scored": 1, "errors": 0}
    assert sorted(r["path"] for r in read_results(out)) == sorted([relative, str(images[1])])


@pytest.mark.parametrize(
    ("content", "line", "why"),
    [
        ('{"path": "a"}\n[1, 2]\n', 2, "a JSON list, not an object"),
        ('{"path": "a"}\n"text"\n', 2, "a JSON str, not an object"),
        ('null\n', 1, "not an object"),
        ('{"path": "a"}\n{"path": 5}\n', 2, "'path' is a int"),
        ('{"path": "a"}\nnot json\n{"path": "b"}\n', 2, "not JSON"),
    ],
)
def test_resumed_jsonl_with_a_bad_line_names_file_and_line(tmp_path: Path, content: str, line: int,
                                                           why: str) -> None:
    out = tmp_path / "x.jsonl"
    out.write_text(content, encoding="utf-8")
    with pytest.raises(OutputError) as info:
        open_writer(out)
    assert str(info.value).startswith(f"{out}:{line}: ") and why in str(info.value)
    with pytest.raises(OutputError, match=f"x.jsonl:{line}"):
        read_results(out)


def test_bad_bytes_in_resumed_outputs_are_clear_errors(tmp_path: Path) -> None:
    jsonl = tmp_path / "x.jsonl"
    jsonl.write_bytes(b'{"path": "a"}\n{"path": "\xff"}\n')
    with pytest.raises(OutputError, match=r"x\.jsonl:2: not UTF-8"):
        open_writer(jsonl)
    csv_file = tmp_path / "x.csv"
    csv_file.write_text("path,score\na.jpg,0.5\nb.jpg,high\n", encoding="utf-8")
    with pytest.raises(OutputError, match=r"x\.csv:3: not a score record"):
        open_writer(csv_file)
    csv_file.write_bytes(b"path,score\na.jpg,0.5\nb\x00.jpg,1\n")  # a NUL names no file, but is no crash
    with open_writer(csv_file, allow_mixed_models=True) as w:
        assert w.done == {"a.jpg", "b\x00.jpg"}
    parquet = tmp_path / "x.parquet"
    parquet.write_text("not parquet", encoding="utf-8")
    with pytest.raises(OutputError, match=r"x\.parquet: not a readable score Parquet"):
        open_writer(parquet)


def test_csv_written_by_an_older_version_is_upgraded_on_resume(tmp_path: Path) -> None:
    out = tmp_path / "scores.csv"
    out.write_text("path,score,raw_score,band,distribution,uncertainty,error\n/data/a.jpg,5.0,0.5,Good,,,\n",
                   encoding="utf-8")
    with open_writer(out, model="m", model_hash="h", allow_mixed_models=True) as w:
        w.write(RECORDS[3])
    assert out.read_text(encoding="utf-8").splitlines()[0] == ",".join(COLUMNS)
    assert [r["path"] for r in read_results(out)] == ["/data/a.jpg", RECORDS[3]["path"]]


# --------------------------------------------------------------------------------------------------
# An unusable --out is a one-line error before any work


def test_unwritable_outputs_are_refused_up_front(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("x", encoding="utf-8")
    with pytest.raises(OutputError, match="cannot create its folder"):
        check_output(tmp_path / "a-file" / "scores.jsonl")
    (tmp_path / "dir.jsonl").mkdir()
    with pytest.raises(OutputError, match="is a directory"):
        open_writer(tmp_path / "dir.jsonl")
    if hasattr(os, "mkfifo"):
        os.mkfifo(tmp_path / "fifo.csv")
        with pytest.raises(OutputError, match="not a regular file"):
            check_output(tmp_path / "fifo.csv")
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        try:
            with pytest.raises(OutputError, match="not writable"):
                check_output(locked / "scores.parquet")
        finally:
            locked.chmod(0o700)


@pytest.mark.parametrize("suffix", FORMATS)
def test_a_stored_non_finite_number_is_read_back_as_an_error_row(tmp_path: Path, suffix: str) -> None:
    """Score files come from strangers too (merge parts, --predictions, analyze): NaN / inf in a stored score,
    raw score, uncertainty or distribution is read back as an error row, never as a score."""
    nan, inf = float("nan"), float("inf")
    rows = [{"path": p, "score": s, "raw_score": r, "band": "Good", "distribution": d, "uncertainty": u}
            for p, s, r, d, u in [("a.jpg", nan, 0.5, None, None), ("b.jpg", 5.0, inf, None, None),
                                  ("c.jpg", 5.0, 0.5, None, -inf), ("d.jpg", 5.0, 0.5, [0.5, nan], None),
                                  ("e.jpg", 6.0, 0.6, [0.5, 0.5], 0.1)]]
    out = tmp_path / f"scores{suffix}"
    if suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), out)
    elif suffix == ".jsonl":
        out.write_text("".join(json.dumps(r) + "\n" for r in rows))  # json.dumps writes NaN / Infinity
    else:
        import csv

        with out.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows({**r, "distribution": json.dumps(r["distribution"]) if r["distribution"] else "",
                         "uncertainty": "" if r["uncertainty"] is None else r["uncertainty"]} for r in rows)
    got = {r["path"]: r for r in read_results(out)}
    for name in "abcd":
        assert got[f"{name}.jpg"]["score"] is None and "non-finite" in got[f"{name}.jpg"]["error"], got[f"{name}.jpg"]
    assert got["e.jpg"]["score"] == 6.0 and got["e.jpg"]["error"] is None
