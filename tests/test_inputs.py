"""Inputs at scale: Parquet path lists, missing files as error rows, URL inputs (off by default; file://)."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import tiny
from tastelab.cli.main import main
from tastelab.inference.scoring import Scorer
from tastelab.io.images import ImageDecodeError
from tastelab.io.records import RecordError, expand_inputs
from tastelab.io.urls import URLS_DISABLED_REASON, fetch_url, is_url
from tastelab.io.writers import read_results


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from tiny.one_torch_thread()


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("inputs")
    images = [str(p) for p in tiny.make_images(root / "imgs", n=3)]
    model = tiny.save_tiny_model(root / "model", "distribution", "mobilenet", layers=[3])
    return {"root": root, "images": images, "model": model}


def _scorer(setup: dict, **kwargs) -> Scorer:
    return Scorer(setup["model"], device="cpu", workers=0, batch_size=2, **kwargs)


# --------------------------------------------------------------------------------------------------
# Parquet path lists


def test_parquet_path_list(setup, tmp_path: Path) -> None:
    images = setup["images"]
    (tmp_path / "beside.jpg").write_bytes(Path(images[0]).read_bytes())
    table = pa.table({"id": [1, 2, 3, 4, 5, 6],
                      "file": [images[1], "beside.jpg", None, "  ", str(tmp_path / "missing.jpg"), images[1]]})
    listing = tmp_path / "paths.parquet"
    pq.write_table(table, listing)
    got = expand_inputs([str(listing)], recursive=False, path_column="file")
    # relative entries beside the list, null/blank entries skipped, duplicates once, missing ones kept
    assert got == [images[1], str(tmp_path / "beside.jpg"), str(tmp_path / "missing.jpg")]
    with pytest.raises(RecordError, match=r"no path column 'path'; columns are \['id', 'file'\]"):
        expand_inputs([str(listing)], recursive=False)
    with pytest.raises(RecordError, match="must hold strings"):
        expand_inputs([str(listing)], recursive=False, path_column="id")
    (tmp_path / "fake.parquet").write_text("not parquet")
    with pytest.raises(RecordError, match="not a readable Parquet file"):
        expand_inputs([str(tmp_path / "fake.parquet")], recursive=False)


def test_cli_scores_a_parquet_list_and_missing_files_become_errors(setup, tmp_path: Path, capsys) -> None:
    missing = str(tmp_path / "gone" / "x.jpg")
    listing = tmp_path / "todo.parquet"
    pq.write_table(pa.table({"image": [*setup["images"], missing]}), listing)
    out = tmp_path / "scores.jsonl"
    assert main(["score", str(listing), "--path-column", "image", "--model", str(setup["model"]), "--workers", "0",
                 "--out", str(out)]) == 0
    assert "3 scored, 1 errors" in capsys.readouterr().out
    rows = {r["path"]: r for r in read_results(out)}
    assert set(rows) == {*setup["images"], missing}
    assert rows[missing]["error"] == "file not found" and rows[missing]["score"] is None
    # A previous output is a path list too (its "path" column): re-score exactly the same inputs.
    out2 = tmp_path / "again.csv"
    pq.write_table(pa.Table.from_pylist(read_results(out)), tmp_path / "previous.parquet")
    assert main(["score", str(tmp_path / "previous.parquet"), "--model", str(setup["model"]), "--workers", "0",
                 "--out", str(out2)]) == 0
    assert {r["path"] for r in read_results(out2)} == set(rows)


# --------------------------------------------------------------------------------------------------
# URLs


def test_urls_are_kept_verbatim(tmp_path: Path) -> None:
    urls = ["https://example.com/a/../b.jpg?size=2&x=[1]", "HTTP://example.com//c.png", "file:///tmp/x.jpg"]
    assert all(is_url(u) for u in urls) and not is_url("s3://bucket/x.jpg") and not is_url(Path("http:/x"))
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(urls) + "\n", encoding="utf-8")
    assert expand_inputs([str(listing)], recursive=False) == urls  # not joined to the list's folder
    assert expand_inputs([*urls, urls[0]], recursive=False) == urls  # not normpath'ed, not globbed, once


def test_urls_are_errors_unless_allowed(setup) -> None:
    scorer = _scorer(setup)
    urls = ["https://example.invalid/photo.jpg", Path(setup["images"][0]).as_uri()]
    results = {r.path: r for r in scorer.score_files([*urls, setup["images"][1]])}
    for url in urls:  # nothing fetched: the reason says how to enable it
        assert results[url].error == URLS_DISABLED_REASON and results[url].score is None
    assert results[setup["images"][1]].error is None
    assert [r.error for r in scorer.predict_batch(urls)] == [URLS_DISABLED_REASON] * 2
    with pytest.raises(ImageDecodeError, match="allow-urls"):
        scorer.predict(urls[0])


def test_file_urls_are_fetched_when_allowed(setup, tmp_path: Path) -> None:
    scorer = _scorer(setup, allow_urls=True, url_timeout=5)
    plain = setup["images"][2]
    url = Path(plain).as_uri()  # percent-encodes the non-ASCII name and the spaces
    missing = (tmp_path / "nope.jpg").as_uri()
    results = {r.path: r for r in scorer.score_files([url, plain, missing])}
    assert results[url].error is None
    assert results[url].raw_score == pytest.approx(results[plain].raw_score, abs=1e-6)
    assert results[missing].error.startswith("cannot fetch URL")
    assert scorer.predict(url).raw_score == pytest.approx(results[plain].raw_score, abs=1e-6)
    with pytest.raises(ImageDecodeError, match="larger than 10 bytes"):
        fetch_url(url, max_bytes=10)


def test_cli_allow_urls(setup, tmp_path: Path, capsys) -> None:
    url = Path(setup["images"][0]).as_uri()
    out = tmp_path / "u.jsonl"
    base = ["score", url, "--model", str(setup["model"]), "--workers", "0"]
    assert main([*base, "--out", str(out)]) == 0
    assert read_results(out)[0]["error"] == URLS_DISABLED_REASON
    assert main([*base, "--allow-urls", "--out", str(tmp_path / "v.jsonl")]) == 0
    assert "1 scored, 0 errors" in capsys.readouterr().out
    assert read_results(tmp_path / "v.jsonl")[0]["path"] == url


# --------------------------------------------------------------------------------------------------
# Only regular files are images: a FIFO (in a folder or named explicitly) is an error row, never a hang

needs_fifo = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs POSIX FIFOs")


@needs_fifo
@pytest.mark.timeout(60)
def test_cli_fifo_in_a_folder_and_given_explicitly_is_an_error_row(setup, tmp_path: Path, caplog) -> None:
    folder = tmp_path / "photos"
    good = [str(p) for p in tiny.make_images(folder, n=2)]
    fifo = folder / "pipe.jpg"
    os.mkfifo(fifo)
    other = tmp_path / "elsewhere.png"
    os.mkfifo(other)
    out = tmp_path / "scores.jsonl"
    args = ["score", "--model", str(setup["model"]), "--workers", "0", "--out", str(out), str(folder), str(other)]
    assert main(args) == 0
    rows = {r["path"]: r for r in read_results(out)}
    assert set(rows) == {*good, str(fifo), str(other)}
    for p in (str(fifo), str(other)):
        assert rows[p]["score"] is None and "not a regular file" in rows[p]["error"] and "FIFO" in rows[p]["error"]
    assert all(rows[p]["error"] is None for p in good)
    assert "does not exist" not in caplog.text  # the explicit FIFO exists; it is just not a file
    assert "not a regular file" in caplog.text


@needs_fifo
@pytest.mark.timeout(90)
@pytest.mark.parametrize(("decode", "workers"), [("cpu", 1), ("device", 0)])
def test_scorer_fifo_in_workers_and_device_decode(setup, tmp_path: Path, decode: str, workers: int) -> None:
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    scorer = Scorer(setup["model"], device="cpu", workers=workers, batch_size=2, decode=decode)
    results = {r.path: r for r in scorer.score_files([setup["images"][0], str(fifo)])}
    assert results[setup["images"][0]].error is None
    assert "FIFO" in results[str(fifo)].error
