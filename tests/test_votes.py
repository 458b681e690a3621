"""A/B votes (io/votes.py): the one reader (every line on its own), the one writer, and their round trip."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from PIL import Image

from tastelab.io.records import RecordError
from tastelab.io.votes import Vote, load_votes, read_vote_table, write_votes


def _image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (120, 60, 30)).save(path, "JPEG")
    return path


def _write_table(path: Path, header: list[str], rows: list[list[object]], delimiter: str = ",") -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle, delimiter=delimiter, lineterminator="\r\n")
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_comparisons_with_bad_rows(tmp_path: Path) -> None:
    for i in range(4):
        _image(tmp_path / "images" / f"{i}.jpg")
    rows = [
        ["0.jpg", "1.jpg", 1, 0],
        ["2.jpg", "2.jpg", 1, 0],  # self-pair
        ["1.jpg", "3.jpg", -1, 2],  # negative votes
        ["3.jpg", "0.jpg", 0.5, 0.5],
        ["3.jpg", "9.jpg", 0, 1],  # missing image
    ]
    votes = _write_table(tmp_path / "votes.csv", ["image_a", "image_b", "votes_a", "votes_b"], rows)
    comps, problems = load_votes(votes)
    assert [(Path(c.image_a).name, Path(c.image_b).name, c.votes_a, c.votes_b) for c in comps] == [
        ("0.jpg", "1.jpg", 1, 0),
        ("3.jpg", "0.jpg", 0.5, 0.5),
    ]
    assert [p.line for p in problems] == [3, 4, 6]
    assert "itself" in problems[0].message and "negative" in problems[1].message
    assert comps[0].source == f"{votes}:2"


def test_comparisons_non_numeric_strict(tmp_path: Path) -> None:
    votes = _write_table(
        tmp_path / "votes.csv", ["image_a", "image_b", "votes_a", "votes_b"], [["a", "b", "x", 1]]
    )
    with pytest.raises(RecordError, match=r"votes\.csv:2: votes must be numbers"):
        load_votes(votes, check_files=False)
    comps, problems = load_votes(votes, check_files=False, strict=False)
    assert comps == [] and problems[0].line == 2


def test_a_damaged_line_is_one_problem_and_never_swallows_the_next_votes(tmp_path: Path) -> None:
    """An unterminated quote (a hand edit) is one bad row at its own file:line; the votes after it are read."""
    for name in ("a", "b", "c"):
        _image(tmp_path / f"{name}.jpg")
    table = tmp_path / "votes.csv"
    table.write_text("image_a,image_b,votes_a,votes_b\n"
                     "a.jpg,b.jpg,1,0\n"
                     '"a.jpg,c.jpg,1,0\n'  # the quote is never closed
                     "b.jpg,c.jpg,0,1\n"
                     "c.jpg,a.jpg,0.5,0.5\n")
    with pytest.raises(RecordError, match=r"votes\.csv:3: not a valid CSV line"):
        load_votes(table)
    votes, problems = load_votes(table, strict=False)
    assert [(Path(v.image_a).name, Path(v.image_b).name, v.votes_a) for v in votes] == [
        ("a.jpg", "b.jpg", 1.0), ("b.jpg", "c.jpg", 0.0), ("c.jpg", "a.jpg", 0.5)]
    assert [p.line for p in problems] == [3]


def test_the_reader_keeps_cells_and_tells_malformed_from_unusable(tmp_path: Path) -> None:
    table = tmp_path / "votes.tsv"
    table.write_text("Image_A\tIMAGE_B\tvotes_a\tvotes_b\tseconds\tnote\n"
                     "x.jpg\ty.jpg\t1\t0\t1.5\thi\n"
                     "x.jpg\tx.jpg\t1\t0\t\t\n"
                     "x.jpg\ty.jpg\tnan\t0\t\t\n"
                     "\n"
                     "y.jpg\tx.jpg\t0\t1\t-2\t\n")
    read = read_vote_table(table)
    assert read.delimiter == "\t" and read.seconds == 4
    assert [line.line for line in read.lines] == [2, 3, 4, 6]
    first, self_pair, not_a_number, last = read.lines
    assert first.vote == Vote("x.jpg", "y.jpg", 1.0, 0.0, 1.5, f"{table}:2") and first.cells[5] == "hi"
    assert self_pair.vote is None and not self_pair.malformed and "itself" in (self_pair.problem or "")
    assert not_a_number.vote is None and not_a_number.malformed
    assert last.vote is not None and last.vote.seconds is None  # a negative time is "unknown"


def test_write_votes_refuses_a_name_with_a_line_break(tmp_path: Path) -> None:
    """One vote per line: a name with a line break would split a vote across two lines; nothing is written."""
    out = tmp_path / "votes.csv"
    with pytest.raises(ValueError, match="one vote per line"):
        write_votes(out, [Vote("a.jpg", "b.jpg"), Vote("c\nd.jpg", "b.jpg")])
    assert not out.exists()


def test_a_table_without_the_vote_columns_names_the_file(tmp_path: Path) -> None:
    table = tmp_path / "scores.csv"
    table.write_text("relative_path,score\na.jpg,1\n")
    with pytest.raises(RecordError, match=r"scores\.csv:1: .*lacks \['image_a', 'image_b', 'votes_a', 'votes_b'\]"):
        load_votes(table)
