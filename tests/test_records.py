"""Label loaders on real-shaped fixtures (and on the shared datasets when they are present)."""

from __future__ import annotations

import csv
import json
import logging
import os
from pathlib import Path

import pytest
from PIL import Image

from conftest import shared_path
from tastelab.io.records import (
    RecordError,
    expand_inputs,
    infer_score_range,
    list_images,
    load_ava,
    load_mos_table,
    load_personal_scores,
    load_records,
    resolve_image_path,
)
from tastelab.io.votes import load_votes


def _image(path: Path) -> Path:
    """A tiny but real image file, so fixtures look like the datasets they stand for."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = {".png": "PNG", ".webp": "WEBP", ".bmp": "BMP", ".gif": "GIF", ".tiff": "TIFF"}.get(
        path.suffix.lower(), "JPEG"
    )
    Image.new("RGB", (4, 3), (200, 80, 30)).save(path, format=fmt)
    return path


# ------------------------------------------------------------------------------------------------ AVA

AVA_ROWS = [
    "1 953619 0 1 5 17 38 36 15 6 5 1 1 22 1396",
    "2 953958 10 7 15 26 26 21 10 8 1 2 1 21 1396",
    "3 954184 0 0 0 0 0 0 0 0 0 0 0 0 1396",  # zero votes
    "4 954113 0 1 4 8 41 56 10 5 0 1 1 0 1396",
    "5 953980 0 4 8 41 56 10 5 1 0 0 16 0 1396",  # in neither split list
    "6 954175 1 2 3 4 5 6 7 8 9 10 0 0 1396",  # image missing on disk
]


@pytest.fixture
def ava_dir(tmp_path: Path) -> Path:
    for image_id in ("953619", "953958", "954184", "954113", "953980"):
        _image(tmp_path / "images" / f"{image_id}.jpg")
    (tmp_path / "AVA.txt").write_text("\n".join(AVA_ROWS) + "\n")
    (tmp_path / "generic_ls_train.jpgl").write_text("953619\n953958\n954184\n954175\n")
    (tmp_path / "generic_test.jpgl").write_text("954113\n")
    return tmp_path


def test_ava_distribution_score_and_problems(ava_dir: Path) -> None:
    rs = load_ava(ava_dir / "AVA.txt")
    assert rs.kind == "ava" and rs.score_range == (1.0, 10.0)
    by_id = {r.extra["image_id"]: r for r in rs}
    assert set(by_id) == {"953619", "953958", "954113", "953980"}
    first = by_id["953619"]
    counts = [0, 1, 5, 17, 38, 36, 15, 6, 5, 1]
    assert first.distribution == pytest.approx([c / 124 for c in counts])
    assert first.score == pytest.approx(sum((i + 1) * c for i, c in enumerate(counts)) / 124)
    assert first.extra["votes"] == 124 and first.extra["tags"] == (1, 22) and first.extra["challenge"] == 1396
    assert first.path == os.path.abspath(ava_dir / "images" / "953619.jpg")
    assert first.source == f"{ava_dir / 'AVA.txt'}:1"
    assert first.split is None
    messages = {(p.line, p.message.split(":")[0]) for p in rs.problems}
    assert (3, "image 954184 has zero votes") in messages
    assert (6, "image not found") in messages


def test_ava_official_split_lists(ava_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    rs = load_ava(
        ava_dir / "AVA.txt",
        ava_dir / "images",
        train_list=ava_dir / "generic_ls_train.jpgl",
        test_list=ava_dir / "generic_test.jpgl",
    )
    assert {r.extra["image_id"]: r.split for r in rs} == {
        "953619": "train",
        "953958": "train",
        "954113": "test",
    }
    assert "1 images are in neither split list" in caplog.text


def test_ava_single_list_means_complement(ava_dir: Path) -> None:
    rs = load_ava(ava_dir / "AVA.txt", test_list=ava_dir / "generic_test.jpgl")
    splits = {r.extra["image_id"]: r.split for r in rs}
    assert splits["954113"] == "test" and splits["953980"] == "train"


def test_ava_malformed_row_strict_names_file_and_line(ava_dir: Path) -> None:
    rows = [*AVA_ROWS[:3], "7 954200 1 2 3 4 5 6 7 8 9 0 0 1396", *AVA_ROWS[3:]]  # 14 columns at line 4
    (ava_dir / "AVA.txt").write_text("\n".join(rows) + "\n")
    with pytest.raises(RecordError) as info:
        load_ava(ava_dir / "AVA.txt")
    assert info.value.line == 4
    assert f"{ava_dir / 'AVA.txt'}:4:" in str(info.value)
    assert "expected 15" in str(info.value)


def test_ava_non_numeric_non_strict_is_a_problem(ava_dir: Path) -> None:
    rows = [*AVA_ROWS, "7 954201 1 2 x 4 5 6 7 8 9 0 0 0 1396"]
    (ava_dir / "AVA.txt").write_text("\n".join(rows) + "\n")
    rs = load_ava(ava_dir / "AVA.txt", strict=False)
    assert any(p.line == 7 and "integer" in p.message for p in rs.problems)
    assert len(rs) == 4


def test_ava_without_file_checks_keeps_missing_images(ava_dir: Path) -> None:
    rs = load_ava(ava_dir / "AVA.txt", ava_dir / "images", check_files=False)
    assert len(rs) == 5 and [p.line for p in rs.problems] == [3]


# ------------------------------------------------------------------------------------------------ MOS

MOS_NAMES = ["ss03 (3753).jpg", "ss01 (10).jpg", "ss02 (1014).JPG", "odd, name.jpg"]


@pytest.fixture
def mos_dir(tmp_path: Path) -> Path:
    for name in ["ss03 (3753).jpg", "ss01 (10).jpg", "ss02 (1014).jpg", "odd, name.jpg"]:
        _image(tmp_path / "images" / name)  # note: disk has .jpg where the label says .JPG
    return tmp_path


def _write_table(path: Path, header: list[str], rows: list[list[object]], delimiter: str = ",") -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle, delimiter=delimiter, lineterminator="\r\n")
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_mos_csv_spaces_parentheses_and_case_fallback(
    mos_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    labels = _write_table(
        mos_dir / "labels.csv", ["image", "mos"], [[n, 0.1 * (i + 1)] for i, n in enumerate(MOS_NAMES)]
    )
    caplog.set_level(logging.INFO)
    rs = load_mos_table(labels)
    assert rs.kind == "mos" and rs.problems == [] and len(rs) == 4
    assert rs.score_range == (0.0, 1.0)
    paths = [Path(r.path) for r in rs]
    assert all(p.is_absolute() and p.is_file() for p in paths)
    assert paths[2].name == "ss02 (1014).jpg"  # resolved to the real file name
    assert "case-insensitive" in caplog.text
    assert rs.records[0].source == f"{labels}:2"


@pytest.mark.parametrize(
    ("delimiter", "suffix", "header"),
    [("\t", ".tsv", ["image_name", "rating", "std"]), (";", ".csv", ["filename", "mean_rating", "std"])],
)
def test_mos_sniffs_tab_and_semicolon(mos_dir: Path, delimiter: str, suffix: str, header: list[str]) -> None:
    rows = [[n, 2 + i, 0.5] for i, n in enumerate(MOS_NAMES)]
    labels = _write_table(mos_dir / f"labels{suffix}", header, rows, delimiter)
    rs = load_mos_table(labels, mos_dir / "images")
    assert [r.score for r in rs] == [2, 3, 4, 5]
    assert rs.score_range == (1.0, 5.0)
    assert rs.records[0].extra == {"std": "0.5"}


def test_mos_explicit_columns_split_weight(mos_dir: Path) -> None:
    rows = [
        [n, 10 * (i + 1), s, 1 + i]
        for i, (n, s) in enumerate(zip(MOS_NAMES, ["train", "Validation", "test", ""], strict=True))
    ]
    labels = _write_table(mos_dir / "t.csv", ["Picture", "Quality", "set", "w"], rows)
    rs = load_mos_table(
        labels, path_column="picture", score_column="Quality", split_column="set", weight_column="w"
    )
    assert [r.split for r in rs] == ["train", "val", "test", None]
    assert [r.weight for r in rs] == [1, 2, 3, 4]
    assert rs.score_range == (0.0, 100.0)


def test_mos_autodetect_failure_lists_header(mos_dir: Path) -> None:
    labels = _write_table(mos_dir / "t.csv", ["picture", "quality"], [["a.jpg", 1]])
    with pytest.raises(RecordError, match=r"header is \['picture', 'quality'\]") as info:
        load_mos_table(labels)
    assert info.value.line == 1


def test_mos_bad_score_strict_and_lenient(mos_dir: Path) -> None:
    rows = [[MOS_NAMES[0], 0.2], [MOS_NAMES[1], "n/a"], [MOS_NAMES[3], "nan"], ["gone.jpg", 0.4]]
    labels = _write_table(mos_dir / "labels.csv", ["image", "mos"], rows)
    with pytest.raises(RecordError, match=r"labels\.csv:3: column 'mos'"):
        load_mos_table(labels)
    rs = load_mos_table(labels, strict=False)
    assert len(rs) == 1
    assert [(p.line, p.message.split(":")[0]) for p in rs.problems] == [
        (3, "column 'mos'"),
        (4, "column 'mos'"),
        (5, "image not found"),
    ]


def test_mos_duplicates_reported(mos_dir: Path) -> None:
    labels = _write_table(
        mos_dir / "labels.csv", ["image", "mos"], [[MOS_NAMES[0], 0.2], [MOS_NAMES[0], 0.3]]
    )
    rs = load_mos_table(labels)
    assert len(rs) == 1 and rs.records[0].score == 0.2
    assert rs.problems[0].line == 3 and "duplicate" in rs.problems[0].message


def test_mos_explicit_score_range_and_no_header(mos_dir: Path) -> None:
    labels = _write_table(mos_dir / "labels.csv", ["image", "mos"], [[MOS_NAMES[0], 3]])
    assert load_mos_table(labels, score_range=(1, 10)).score_range == (1.0, 10.0)
    (mos_dir / "bare.csv").write_text("")
    with pytest.raises(RecordError, match="header"):
        load_mos_table(mos_dir / "bare.csv")


@pytest.mark.parametrize(
    ("scores", "expected"),
    [
        ([0.0, 0.93], (0, 1)),
        ([1.2, 4.9], (1, 5)),
        ([0.0, 4.0], (0, 5)),
        ([1.49, 7.03], (1, 9)),
        ([1.0, 10.0], (1, 10)),
        ([0.0, 9.5], (0, 10)),
        ([12.0, 95.0], (0, 100)),
        ([-3.0, 250.0], (-3, 250)),
    ],
)
def test_infer_score_range(scores: list[float], expected: tuple[float, float]) -> None:
    assert infer_score_range(scores) == expected


# ------------------------------------------------------------------------------------------------ personal


@pytest.fixture
def personal_dir(tmp_path: Path) -> Path:
    for rel in ("cats/a.jpg", "cats/b.png", "dogs/c d.jpg"):
        _image(tmp_path / rel)
    return tmp_path


def test_personal_json_string_numbers(personal_dir: Path) -> None:
    data = {
        "ImageRecords": {
            "cats/a.jpg": {"relative_path": "cats/a.jpg", "score": "1.30", "comparisons": "3"},
            "cats/b.png": {"relative_path": "cats/b.png", "score": "-0.75", "comparisons": "5"},
            "dogs/c d.jpg": {"relative_path": "dogs/c d.jpg", "score": "0.10", "comparisons": "0"},
        },
        "Metadata": {"version": "1", "comparisons": "8"},
    }
    (personal_dir / "scores.json").write_text(json.dumps(data))
    rs = load_personal_scores(personal_dir / "scores.json")
    assert rs.kind == "personal" and rs.problems == []
    assert [(Path(r.path).name, r.score, r.extra["comparisons"]) for r in rs] == [
        ("a.jpg", 1.3, 3),
        ("b.png", -0.75, 5),
        ("c d.jpg", 0.1, 0),
    ]
    assert rs.score_range == (-0.75, 1.3)
    assert rs.records[0].path == os.path.abspath(personal_dir / "cats" / "a.jpg")


def test_personal_json_garbage_names_key(personal_dir: Path) -> None:
    data = {
        "ImageRecords": {"cats/a.jpg": {"relative_path": "cats/a.jpg", "score": "abc", "comparisons": "3"}}
    }
    (personal_dir / "scores.json").write_text(json.dumps(data))
    with pytest.raises(
        RecordError, match=r"scores\.json: entry 'cats/a.jpg': score must be a number, got 'abc'"
    ):
        load_personal_scores(personal_dir / "scores.json")


def test_personal_json_windows_separators(personal_dir: Path) -> None:
    entry = {"relative_path": "dogs\\c d.jpg", "score": "0.5", "comparisons": "2"}
    (personal_dir / "scores.json").write_text(json.dumps({"ImageRecords": {"dogs\\c d.jpg": entry}}))
    rs = load_personal_scores(personal_dir / "scores.json")
    assert rs.problems == [] and rs.records[0].path == os.path.abspath(personal_dir / "dogs" / "c d.jpg")
    unchecked = load_personal_scores(personal_dir / "scores.json", check_files=False)
    assert unchecked.records[0].path == rs.records[0].path


@pytest.mark.parametrize(
    "payload",
    [
        {"cats/a.jpg": [1.5, 4], "cats/b.png": ["0.5", "2"], "missing.jpg": [0.1, 1]},
        {"cats/a.jpg": 1.5, "cats/b.png": "0.5", "missing.jpg": 0.1},
    ],
)
def test_personal_legacy_flat_json(personal_dir: Path, payload: dict[str, object]) -> None:
    (personal_dir / "old.json").write_text(json.dumps(payload))
    rs = load_personal_scores(personal_dir / "old.json", score_range=(0, 2))
    assert [r.score for r in rs] == [1.5, 0.5]
    assert rs.score_range == (0.0, 2.0)
    assert len(rs.problems) == 1 and "image not found: missing.jpg" in rs.problems[0].message
    if isinstance(payload["cats/a.jpg"], list):
        assert [r.extra["comparisons"] for r in rs] == [4, 2]


def test_personal_csv_with_split_and_weight(personal_dir: Path) -> None:
    rows = [["cats/a.jpg", "1.3", "train", "1"], ["dogs/c d.jpg", "0.2", "val", "0.5"]]
    _write_table(personal_dir / "scores.csv", ["relative_path", "score", "split", "weight"], rows)
    rs = load_records(personal_dir / "scores.csv")
    assert rs.kind == "personal"
    assert [(r.score, r.split, r.weight) for r in rs] == [(1.3, "train", 1.0), (0.2, "val", 0.5)]


# ------------------------------------------------------------------------------------------------ comparisons


# ------------------------------------------------------------------------------------------------ files


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    for rel in ("b.jpg", "A.PNG", "sub/c d (1).WebP", "sub/deep/ünï.tiff", ".hidden/x.jpg", "sub/.y.jpg"):
        _image(tmp_path / rel)
    (tmp_path / "notes.txt").write_text("not an image")
    return tmp_path


def test_list_images(tree: Path) -> None:
    found = [os.path.relpath(p, tree) for p in list_images(tree)]
    assert found == sorted(["A.PNG", "b.jpg", "sub/c d (1).WebP", "sub/deep/ünï.tiff"])
    assert [os.path.basename(p) for p in list_images(tree, recursive=False)] == ["A.PNG", "b.jpg"]
    assert list_images(tree, extensions=(".JPG",)) == [str(tree / "b.jpg")]
    with pytest.raises(FileNotFoundError):
        list_images(tree / "nope")


def test_expand_inputs(tree: Path, caplog: pytest.LogCaptureFixture) -> None:
    listing = tree / "list.txt"
    listing.write_text("# my picks\nb.jpg\n\nsub/c d (1).WebP\nghost.jpg\n")
    inputs = [
        str(tree / "b.jpg"),
        str(listing),
        str(tree / "sub"),
        str(tree / "**" / "*.PNG"),
        str(tree / "nope.jpg"),
    ]
    out = expand_inputs(inputs, recursive=True)
    rel = [os.path.relpath(p, tree) for p in out]
    assert rel == ["b.jpg", "sub/c d (1).WebP", "ghost.jpg", "sub/deep/ünï.tiff", "A.PNG", "nope.jpg"]
    assert "nope.jpg" in caplog.text and "ghost.jpg" in caplog.text
    shallow = expand_inputs([str(tree / "sub")], recursive=False)
    assert [os.path.basename(p) for p in shallow] == ["c d (1).WebP"]


def test_resolve_image_path(tree: Path) -> None:
    assert resolve_image_path(tree, "b.jpg") == tree / "b.jpg"
    assert resolve_image_path(tree, "a.png") == tree / "A.PNG"
    assert resolve_image_path(tree, "SUB/C D (1).webp") == tree / "sub" / "c d (1).WebP"
    assert resolve_image_path(tree, "missing.jpg") is None
    assert resolve_image_path(None, tree / "B.JPG") == tree / "b.jpg"


def test_load_records_dispatch(ava_dir: Path, tmp_path: Path) -> None:
    assert load_records(ava_dir / "AVA.txt").kind == "ava"
    folder = load_records(ava_dir / "images")
    assert folder.kind == "folder" and len(folder) == 5 and folder.records[0].score is None
    (tmp_path / "paths.txt").write_text("a.jpg\nb.jpg\n")
    with pytest.raises(RecordError, match="cannot detect"):
        load_records(tmp_path / "paths.txt")
    with pytest.raises(ValueError, match="unknown label format"):
        load_records(ava_dir / "AVA.txt", format="xml")


# ------------------------------------------------------------------------------------------------ real data


def _data_rows(path: Path) -> int:
    with path.open(newline="") as handle:
        return sum(1 for row in csv.reader(handle) if row) - 1


def test_real_biq2021() -> None:
    labels = shared_path("data", "biq2021", "labels.csv")
    rs = load_mos_table(labels, labels.parent / "images")
    assert len(rs) == 5000 and rs.problems == []
    assert rs.score_range == (0.0, 1.0)
    assert all(os.path.isfile(r.path) for r in rs.records[:50])
    assert load_records(labels).kind == "mos"  # default image root finds images/


def test_real_web_aesthetics() -> None:
    ratings = shared_path("data", "web-aesthetics", "ratings", "labels.csv")
    rs = load_mos_table(ratings)
    assert len(rs) == _data_rows(ratings) and rs.problems == []
    assert rs.score_range == (1.0, 9.0)
    votes = shared_path("data", "web-aesthetics", "comparisons", "votes.csv")
    comps, problems = load_votes(votes)
    assert problems == [] and len(comps) == _data_rows(votes)
    assert all(os.path.isfile(c.image_a) and os.path.isfile(c.image_b) for c in comps)
