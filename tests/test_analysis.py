"""``tastelab analyze``: path matching, agreement numbers on files with a known relationship, splits, filters,
unmatched reporting, the per-image error CSV, votes as the truth, and the command itself."""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from tastelab.cli.main import main
from tastelab.evaluation.analysis import analyze, analyze_votes, detect_kind, load_score_table, match_paths
from tastelab.io.splits import save_split
from tastelab.io.writers import open_writer


@pytest.fixture(autouse=True)
def _wide_terminal(monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "250")


SPLITS = ("train", "val", "test")


def _labels() -> list[tuple[str, float, str]]:
    """24 images in two folders with distinct scores and a split each."""
    rng = np.random.default_rng(0)
    scores = rng.permutation(np.linspace(0.05, 0.95, 24))
    out = []
    for i, score in enumerate(scores):
        folder = "cats" if i % 2 else "dogs"
        out.append((f"{folder}/img{i:02d}.jpg", float(score), SPLITS[i % 3]))
    return out


def _write_personal_csv(path: Path, rows, with_split: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["relative_path", "score", *(["split"] if with_split else [])])
        for rel, score, split in rows:
            writer.writerow([rel, f"{score:.6f}", *([split] if with_split else [])])
    return path


def _write_scores(path: Path, rows: list[dict]) -> Path:
    with open_writer(path, resume=False) as writer:
        for row in rows:
            writer.write({"distribution": None, "uncertainty": None, "error": None, "band": "Good", **row})
    return path


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    """Truth (personal CSV, relative paths) and predictions (score output, absolute paths on another root).

    ``raw_score = exp(3 * truth)``: monotonic but not linear, so SRCC and A/B agreement are exactly 1 and
    PLCC is below 1. ``score`` is reversed on purpose: analysis must use ``raw_score``.
    """
    labels = _labels()
    truth = _write_personal_csv(tmp_path / "labels" / "scores.csv", [*labels, ("dogs/only_truth.jpg", 0.5, "test")])
    rows = [{"path": f"/elsewhere/photos/{rel}", "raw_score": math.exp(3 * s), "score": 10 - 9 * s}
            for rel, s, _ in labels]
    rows.append({"path": "/elsewhere/photos/cats/only_pred.jpg", "raw_score": 1.0, "score": 5.0})
    rows.append({"path": "/elsewhere/photos/cats/broken.jpg", "raw_score": None, "score": None, "error": "bad"})
    pred = _write_scores(tmp_path / "pred.jsonl", rows)
    return {"truth": truth, "pred": pred, "root": tmp_path}


# ------------------------------------------------------------------------------------------------ matching


def test_match_paths_on_the_longest_unambiguous_tail() -> None:
    left = ["/data/shoot/cats/a.jpg", "/data/shoot/dogs/a.jpg", "/data/shoot/dogs/b.JPG", "/data/x/only.jpg"]
    right = ["photos\\cats\\a.jpg", "dogs/a.jpg", "C:\\pics\\dogs\\b.jpg", "other/a.jpg", "nothing.jpg"]
    m = match_paths(left, right)
    assert m.pairs == [(0, 0), (1, 1), (2, 2)]
    assert m.keys == ["cats/a.jpg", "dogs/a.jpg", "dogs/b.JPG"]
    assert m.unmatched_left == [3] and m.unmatched_right == [3, 4]  # other/a.jpg is not guessed into a folder
    # File names alone match when they are unique on both sides; duplicated names stay unmatched.
    assert match_paths(["/x/one.jpg", "/x/two.jpg"], ["one.jpg", "y/two.jpg"]).pairs == [(0, 0), (1, 1)]
    ambiguous = match_paths(["/x/a.jpg", "/y/a.jpg"], ["a.jpg"])
    assert ambiguous.pairs == [] and ambiguous.unmatched_left == [0, 1]


# ------------------------------------------------------------------------------------------------ numbers


def test_known_relationship(files) -> None:
    result = analyze(files["truth"], files["pred"])
    overall = result.group("all")
    assert result.matched == overall.n == 24
    assert overall.srcc == pytest.approx(1.0) and overall.pair_acc == 1.0 and overall.thr_acc == 1.0
    assert 0.8 < overall.plcc < 0.999
    truth = np.array([s for _, s, _ in _labels()])
    pred = np.exp(3 * truth)
    assert overall.truth_mean == pytest.approx(truth.mean()) and overall.truth_std == pytest.approx(truth.std(ddof=1))
    assert overall.pred_mean == pytest.approx(pred.mean(), rel=1e-6)
    assert overall.plcc_p == pytest.approx(stats.pearsonr(pred, truth).pvalue, rel=1e-3)
    assert overall.srcc_p < 1e-10
    assert (result.unmatched_truth, result.unmatched_pred) == (1, 1)
    assert result.unmatched_truth_examples[0].endswith("only_truth.jpg")
    assert result.unmatched_pred_examples == ["/elsewhere/photos/cats/only_pred.jpg"]
    assert result.pred["errors"] == 1 and result.pred["kind"] == "score-output"
    assert {r.key for r in result.rows} == {rel for rel, _, _ in _labels()}  # shared folders stripped


def test_comparison_is_symmetric_and_score_files_work_as_predictions(files, tmp_path: Path) -> None:
    labels = _labels()
    noisy = [(rel, s + 0.2 * np.sin(7 * s), split) for rel, s, split in labels]
    other = _write_personal_csv(tmp_path / "other" / "labeller2.csv", noisy, with_split=False)
    ab, ba = analyze(files["truth"], other), analyze(other, files["truth"])
    for name in ("srcc", "plcc", "pair_acc", "thr_acc"):
        assert getattr(ab.group("all"), name) == pytest.approx(getattr(ba.group("all"), name))
    assert ab.group("all").srcc == pytest.approx(stats.spearmanr([s for _, s, _ in noisy],
                                                                 [s for _, s, _ in labels]).statistic)
    assert [g.name for g in ba.groups] == ["all", "train", "val", "test"]  # splits come from either side


def test_per_split_and_split_selection(files, tmp_path: Path) -> None:
    result = analyze(files["truth"], files["pred"])
    assert [(g.name, g.n) for g in result.groups] == [("all", 24), ("train", 8), ("val", 8), ("test", 8)]
    test_only = analyze(files["truth"], files["pred"], split="test")
    assert [(g.name, g.n) for g in test_only.groups] == [("all", 8), ("test", 8)]
    assert test_only.excluded_by_split == 16 and {r.split for r in test_only.rows} == {"test"}
    assert analyze(files["truth"], files["pred"], split="validation,TEST").matched == 16  # aliases
    # A run's split.json (portable keys) overrides the files' own column.
    keys = [rel for rel, _, _ in _labels()]
    save_split(tmp_path / "split.json", {"train": keys[:20], "test": keys[20:]})
    by_file = analyze(files["truth"], files["pred"], split_file=tmp_path / "split.json")
    assert [(g.name, g.n) for g in by_file.groups] == [("all", 24), ("train", 20), ("test", 4)]


def test_filter_applies_to_matched_and_unmatched(files) -> None:
    cats = analyze(files["truth"], files["pred"], filter=r"cats/")
    assert cats.matched == 12 and all("/cats/" in r.truth_path for r in cats.rows)
    assert (cats.unmatched_truth, cats.unmatched_pred) == (0, 1)  # only_truth.jpg is a dog
    assert cats.filtered_out == 12 + 1
    assert analyze(files["truth"], files["pred"], filter=r"img0[0-4]\.jpg$").matched == 5


def test_errors_are_ordered_by_rank_disagreement(tmp_path: Path) -> None:
    names = [f"p/{i}.jpg" for i in range(10)]
    truth = _write_personal_csv(tmp_path / "t.csv", [(n, float(i), "") for i, n in enumerate(names)], False)
    pred_values = list(range(10))
    pred_values[0], pred_values[9] = 9, 0  # the worst and the best swap: rank gap 9
    pred_values[3], pred_values[5] = 5, 3  # a smaller swap: rank gap 2
    pred = _write_scores(tmp_path / "pred.csv", [{"path": str(tmp_path / n), "raw_score": float(v), "score": 1.0}
                                                 for n, v in zip(names, pred_values)])
    assert detect_kind(pred) == "score-output" and detect_kind(truth) == "labels"
    out = tmp_path / "errors.csv"
    assert main(["analyze", "--truth", str(truth), "--pred", str(pred), "--errors-out", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 10
    gaps = [float(r["abs_rank_diff"]) for r in rows]
    assert gaps == sorted(gaps, reverse=True) and gaps[:4] == [9, 9, 2, 2]
    assert {rows[0]["key"], rows[1]["key"]} == {"0.jpg", "9.jpg"}
    worst = next(r for r in rows if r["key"] == "0.jpg")  # truth rank 10 (lowest), predicted best
    assert (float(worst["truth_rank"]), float(worst["pred_rank"]), float(worst["rank_diff"])) == (10, 1, -9)


def test_degenerate_input_gives_nan_not_an_error(tmp_path: Path) -> None:
    truth = _write_personal_csv(tmp_path / "t.csv", [("a.jpg", 1.0, ""), ("b.jpg", 2.0, ""), ("c.jpg", 3.0, "")], False)
    pred = _write_scores(tmp_path / "p.jsonl", [{"path": p, "raw_score": 5.0, "score": 5.0}
                                                for p in ("a.jpg", "b.jpg", "c.jpg")])
    result = analyze(truth, pred)
    overall = result.group("all")
    assert math.isnan(overall.srcc) and math.isnan(overall.srcc_p) and overall.pair_acc == 0.5
    assert json.loads(json.dumps(result.to_dict(), allow_nan=False))["groups"][0]["srcc"] is None
    empty = analyze(truth, _write_scores(tmp_path / "none.jsonl", [{"path": "zzz.jpg", "raw_score": 1.0}]))
    assert empty.matched == 0 and empty.group("all").n == 0


def test_mos_table_and_parquet_outputs(tmp_path: Path) -> None:
    labels = _labels()
    mos = tmp_path / "mos.csv"
    mos.write_text("image,MOS\n" + "".join(f"{Path(rel).name},{s * 4 + 1:.4f}\n" for rel, s, _ in labels))
    pred = _write_scores(tmp_path / "p.parquet", [{"path": f"/x/{rel}", "raw_score": s, "score": 1.0}
                                                  for rel, s, _ in labels])
    table = load_score_table(mos)
    assert table.kind == "mos" and len(table) == 24
    result = analyze(mos, pred)
    assert result.matched == 24 and result.group("all").plcc == pytest.approx(1.0)
    assert [g.name for g in result.groups] == ["all"]  # no split column anywhere


# ------------------------------------------------------------------------------------------------ votes and CLI


def test_votes_as_truth(tmp_path: Path, capsys) -> None:
    votes = tmp_path / "votes.csv"
    votes.write_text("image_a,image_b,votes_a,votes_b\n"
                     "a.jpg,b.jpg,1,0\nb.jpg,c.jpg,3,1\nc.jpg,a.jpg,1,0\na.jpg,c.jpg,1,1\nz.jpg,a.jpg,1,0\n")
    pred = _write_scores(tmp_path / "p.jsonl", [{"path": f"/x/{n}", "raw_score": v}
                                                for n, v in (("a.jpg", 3.0), ("b.jpg", 2.0), ("c.jpg", 1.0))])
    assert detect_kind(votes) == "votes"
    result = analyze_votes(votes, pred)
    # Agreeing votes: a>b (1), b>c (3 of 4), c>a (0 of 1); the 1:1 tie is skipped -> 4 of 6 votes.
    assert result.pair_acc == pytest.approx(4 / 6) and result.pair_acc_unweighted == pytest.approx(2 / 3)
    assert (result.used_rows, result.unmatched_images, result.ties) == (4, 1, 1)
    out = tmp_path / "r.json"
    assert main(["analyze", "--truth", str(votes), "--pred", str(pred), "--json", str(out)]) == 0
    assert json.loads(out.read_text())["pair_acc"] == pytest.approx(4 / 6)
    assert "agreement 0.667 of votes" in capsys.readouterr().out
    with pytest.raises(ValueError, match="vote table"):
        load_score_table(votes)


def test_cli_analyze_table_json_and_exit_codes(files, tmp_path: Path, capsys) -> None:
    report = tmp_path / "report.json"
    argv = ["analyze", "--truth", str(files["truth"]), "--pred", str(files["pred"]), "--json", str(report)]
    assert main([*argv, "--split", "test,val", "--filter", "dogs"]) == 0
    text = capsys.readouterr().out
    assert "SRCC" in text and "test" in text and "1 without a truth" not in text  # only_pred is a cat
    data = json.loads(report.read_text())
    assert [g["name"] for g in data["groups"]] == ["all", "val", "test"]
    assert data["settings"]["filter"] == "dogs" and data["settings"]["split"] == ["test", "val"]
    assert data["groups"][0]["srcc"] == pytest.approx(1.0)
    nothing = _write_scores(tmp_path / "n.jsonl", [{"path": "zzz.jpg", "raw_score": 1.0}])
    assert main(["analyze", "--truth", str(files["truth"]), "--pred", str(nothing)]) == 1
    assert main(["analyze", "--truth", str(tmp_path / "missing.csv"), "--pred", str(nothing)]) == 2


# ----------------------------------------------------------------------------------------- issue 11: clear errors


def _error_line(caplog) -> str:
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "\n" not in errors[0], errors
    return errors[0]


def test_split_without_split_information_is_an_error(tmp_path: Path, caplog) -> None:
    labels = _labels()
    truth = _write_personal_csv(tmp_path / "t.csv", labels, with_split=False)
    pred = _write_scores(tmp_path / "p.jsonl", [{"path": f"/x/{rel}", "raw_score": s} for rel, s, _ in labels])
    with caplog.at_level(logging.ERROR):
        assert main(["analyze", "--truth", str(truth), "--pred", str(pred), "--split", "test"]) == 2
    assert "no split column" in _error_line(caplog) and "--split-file" in _error_line(caplog)
    with pytest.raises(ValueError, match="no split column"):
        analyze(truth, pred, split="test")


def test_split_that_no_image_is_in_names_the_splits_present(files) -> None:
    with pytest.raises(ValueError, match=r"none of the 24 matched images.*splits present: train, val, test"):
        analyze(files["truth"], files["pred"], split="holdout")


def _pairs_split(tmp_path: Path, pairs: list[tuple[str, str, str]]) -> Path:
    """A split.json as a `data.format: pairs` run writes it: portable 'a<TAB>b' keys, kind pairs."""
    split: dict[str, list[str]] = {}
    for a, b, name in pairs:
        split.setdefault(name, []).append("\t".join(sorted((a, b))))
    path = tmp_path / "run" / "split.json"
    save_split(path, split, {"kind": "pairs", "seed": 0})
    return path


def test_pairs_split_file_with_score_files_is_an_error(files, tmp_path: Path) -> None:
    split = _pairs_split(tmp_path, [("cats/img01.jpg", "dogs/img00.jpg", "test")])
    with pytest.raises(ValueError, match="pairs split"):
        analyze(files["truth"], files["pred"], split_file=split, split="test")


def test_votes_as_truth_honour_a_pairs_split(tmp_path: Path, caplog) -> None:
    votes = tmp_path / "votes.csv"
    votes.write_text("image_a,image_b,votes_a,votes_b\n"
                     "a.jpg,b.jpg,1,0\nb.jpg,c.jpg,0,1\nc.jpg,a.jpg,1,0\n")
    pred = _write_scores(tmp_path / "p.jsonl", [{"path": f"/x/{n}", "raw_score": v}
                                                for n, v in (("a.jpg", 3.0), ("b.jpg", 2.0), ("c.jpg", 1.0))])
    split = _pairs_split(tmp_path, [("a.jpg", "b.jpg", "train"), ("b.jpg", "c.jpg", "test"),
                                    ("a.jpg", "c.jpg", "test")])
    every = analyze_votes(votes, pred)
    assert every.rows == 3 and every.pair_acc == pytest.approx(1 / 3)
    held_out = analyze_votes(votes, pred, split="test", split_file=split)
    assert held_out.rows == 2 and held_out.pair_acc == 0.0  # the model gets both held-out pairs wrong
    assert analyze_votes(votes, pred, split="train", split_file=split).pair_acc == 1.0
    with caplog.at_level(logging.ERROR):
        assert main(["analyze", "--truth", str(votes), "--pred", str(pred), "--split", "test"]) == 2
    assert "vote table has no split column" in _error_line(caplog)
    image_split = tmp_path / "images_split.json"
    save_split(image_split, {"test": ["a.jpg", "b.jpg"]})
    with pytest.raises(ValueError, match="image split file"):
        analyze_votes(votes, pred, split="test", split_file=image_split)


def test_one_column_per_prediction_file(tmp_path: Path, caplog) -> None:
    """raw_score only when every scored row has it; else `score` everywhere (never two scales mixed)."""
    pred = _write_scores(tmp_path / "p.jsonl", [
        {"path": "a.jpg", "raw_score": 100.0, "score": 1.0},
        {"path": "b.jpg", "raw_score": None, "score": 2.0},
        {"path": "c.jpg", "raw_score": 300.0, "score": 3.0},
        {"path": "d.jpg", "raw_score": None, "score": None, "error": "broken"},
    ])
    with caplog.at_level(logging.WARNING):
        table = load_score_table(pred)
    assert table.column == "score" and table.values.tolist() == [1.0, 2.0, 3.0]
    assert "1 of 3 rows have no raw_score; using `score`" in caplog.text
    full = _write_scores(tmp_path / "full.jsonl", [{"path": "a.jpg", "raw_score": 5.0, "score": 1.0},
                                                   {"path": "b.jpg", "raw_score": 7.0, "score": 2.0}])
    assert load_score_table(full).column == "raw_score" and load_score_table(full).values.tolist() == [5.0, 7.0]


def test_bad_filter_and_bad_json_lines_are_one_line_errors(files, tmp_path: Path, caplog) -> None:
    argv = ["analyze", "--truth", str(files["truth"]), "--pred", str(files["pred"])]
    with caplog.at_level(logging.ERROR):
        assert main([*argv, "--filter", "(["]) == 2
    assert "--filter '(['" in _error_line(caplog)
    good = files["pred"].read_text().splitlines()
    for bad, expected in (('[1, 2]', "expected a JSON object per line, got list"), ("garbage", "not a JSON line"),
                          ('"text"', "got str"), ("null", "got NoneType")):
        broken = tmp_path / "broken.jsonl"
        broken.write_text("\n".join([good[0], bad, *good[1:]]) + "\n")
        caplog.clear()
        with caplog.at_level(logging.ERROR):
            assert main(["analyze", "--truth", str(files["truth"]), "--pred", str(broken)]) == 2
        message = _error_line(caplog)
        assert f"{broken}:2:" in message and expected in message
