"""Pairwise ratings: Elo pinned on hand-computed values, Bradley–Terry recovery, score files, pair proposals,
the labelling session state, the ``tastelab ratings`` command, and one real-data held-out check."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from conftest import shared_path
from tastelab.cli.main import main
from tastelab.evaluation.metrics import pairwise_accuracy
from tastelab.io.records import load_personal_scores
from tastelab.io.splits import split_comparisons
from tastelab.pairwise import (
    RatingState,
    Vote,
    fit_bradley_terry,
    fit_elo,
    fit_ratings,
    load_votes,
    propose_pair,
    speed_weight,
    win_probability,
    write_score_file,
    write_votes,
)


@pytest.fixture(autouse=True)
def _wide_terminal(monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")


def _simulated_votes(n_images: int, n_votes: int, seed: int, tie_rate: float = 0.0):
    """Votes drawn from known strengths (Elo units) on random pairs."""
    rng = np.random.default_rng(seed)
    truth = rng.normal(0.0, 0.5, n_images)
    names = [f"img{i:03d}.jpg" for i in range(n_images)]
    votes = []
    for _ in range(n_votes):
        a, b = rng.choice(n_images, size=2, replace=False)
        if rng.random() < tie_rate:
            votes.append(Vote(names[a], names[b], 0.5, 0.5))
        elif rng.random() < win_probability(truth[a], truth[b]):
            votes.append(Vote(names[a], names[b], 1, 0))
        else:
            votes.append(Vote(names[a], names[b], 0, 1))
    return names, truth, votes


# ------------------------------------------------------------------------------------------------ Elo


def test_elo_update_pinned_on_hand_computed_values() -> None:
    # Equal scores: p = 0.5, so the winner gains k/2 and the loser loses k/2.
    r = fit_elo([Vote("a", "b", 1, 0)], k=0.1)
    assert r.scores == pytest.approx({"a": 0.05, "b": -0.05}, abs=1e-12)
    # Second win of a at a 0.1 lead: p = 1 / (1 + 10**-0.1) = 0.5573116, step 0.1 * (1 - p) = 0.0442688.
    r = fit_elo([Vote("a", "b", 1, 0), Vote("a", "b", 1, 0)], k=0.1)
    assert r.scores["a"] == pytest.approx(0.05 + 0.0442688, abs=1e-7)
    assert r.scores["b"] == pytest.approx(-(0.05 + 0.0442688), abs=1e-7)
    assert r.counts == {"a": 2, "b": 2} and r.wins == {"a": 2, "b": 0}
    # b wins the image_comparison way: s_w += k (1 - p) with p the winner's probability.
    r = fit_elo([Vote("a", "b", 0, 1)], k=0.7, initial={"a": 0.3, "b": 0.0})
    p = 1 / (1 + 10 ** -(0.0 - 0.3))
    assert r.scores["b"] == pytest.approx(0.7 * (1 - p)) and r.scores["a"] == pytest.approx(0.3 - 0.7 * (1 - p))
    assert win_probability(1.0, 0.0) == pytest.approx(10 / 11)  # a difference of 1 means 10:1 odds


def test_elo_ties_move_both_together_with_half_weight() -> None:
    assert fit_elo([Vote("a", "b", 0.5, 0.5)]).scores == {"a": 0.0, "b": 0.0}
    start = {"a": 0.2, "b": 0.0}
    p = win_probability(0.2, 0.0)
    tie = fit_elo([Vote("a", "b", 0.5, 0.5)], k=0.1, initial=start).scores
    assert tie["a"] == pytest.approx(0.2 - 0.1 * (p - 0.5)) and tie["b"] == pytest.approx(0.1 * (p - 0.5))
    # Half a win for each side at the same scores.
    half_win_a = 0.5 * 0.1 * (1 - p)
    half_win_b = 0.5 * 0.1 * p
    assert tie["a"] - 0.2 == pytest.approx(half_win_a - half_win_b)
    split = fit_elo([Vote("a", "b", 1, 1)], k=0.1, initial=start).scores  # two votes that split
    assert split["a"] - 0.2 == pytest.approx(2 * (tie["a"] - 0.2))
    r = fit_elo([Vote("a", "b", 0.5, 0.5)])
    assert r.n_ties == 1 and r.counts == {"a": 1, "b": 1} and r.wins == {"a": 0.5, "b": 0.5}


def test_speed_weight_formula_and_its_effect() -> None:
    assert speed_weight(0.6, 1.2) == 1.0  # faster than the reference: full weight
    assert speed_weight(2.4, 1.2) == pytest.approx(0.5)
    assert speed_weight(100.0, 1.2) == pytest.approx(0.25)  # floor
    assert speed_weight(None, 1.2) == speed_weight(0.0, 1.2) == speed_weight(float("nan"), 1.2) == 1.0
    with pytest.raises(ValueError):
        speed_weight(1.0, 0.0)
    slow = fit_elo([Vote("a", "b", 1, 0, seconds=2.4)], k=0.1, speed_reference=1.2)
    fast = fit_elo([Vote("a", "b", 1, 0, seconds=0.5)], k=0.1, speed_reference=1.2)
    ignored = fit_elo([Vote("a", "b", 1, 0, seconds=2.4)], k=0.1)
    assert slow.scores["a"] == pytest.approx(0.025) and fast.scores["a"] == ignored.scores["a"] == pytest.approx(0.05)


def test_elo_order_and_passes() -> None:
    votes = [Vote("a", "b", 1, 0), Vote("b", "a", 1, 0), Vote("c", "a", 1, 0)]
    once = fit_elo(votes)
    assert fit_elo(votes[::-1]).scores != once.scores  # Elo is order dependent
    twice = fit_elo(votes, passes=2)
    assert twice.scores == pytest.approx(fit_elo(votes, initial=once.scores).scores)
    assert twice.counts == once.counts  # counts are per vote, not per pass
    with pytest.raises(ValueError):
        fit_elo(votes, k=0)
    with pytest.raises(ValueError):
        fit_elo([Vote("a", "a", 1, 0)])


# ------------------------------------------------------------------------------------------------ Bradley–Terry


def test_bradley_terry_recovers_a_known_ranking() -> None:
    names, truth, votes = _simulated_votes(50, 2000, seed=0, tie_rate=0.05)
    r = fit_bradley_terry(votes)
    fitted = [r.scores[n] for n in names]
    rho = stats.spearmanr(fitted, truth).statistic
    assert rho > 0.9, rho
    assert abs(sum(fitted)) < 1e-9  # centred at 0
    assert all(0 < r.stderr[n] < 1 for n in names)
    # Elo units: the fitted spread is on the scale of the true strengths, not shrunk to nothing.
    assert 0.5 < np.std(fitted) / np.std(truth) < 1.5
    elo = fit_elo(votes)
    assert stats.spearmanr([elo.scores[n] for n in names], truth).statistic > 0.8
    assert fit_ratings(votes, "bt").scores == r.scores
    with pytest.raises(ValueError):
        fit_ratings(votes, "glicko")  # type: ignore[arg-type]


def test_bradley_terry_disconnected_and_undefeated_stay_finite(caplog) -> None:
    votes = [Vote("a", "b", 3, 0), Vote("a", "c", 2, 0), Vote("b", "c", 2, 1), Vote("x", "y", 0, 5)]
    with caplog.at_level(logging.WARNING):
        r = fit_bradley_terry(votes, images=["lonely"])
    assert r.components == 3 and "disconnected" in caplog.text
    assert all(math.isfinite(v) for v in r.scores.values())
    assert all(math.isfinite(v) and v > 0 for v in r.stderr.values())
    assert r.scores["a"] > r.scores["b"] > r.scores["c"] and r.scores["y"] > r.scores["x"]
    assert r.scores["a"] + r.scores["b"] + r.scores["c"] == pytest.approx(0, abs=1e-9)  # each group centred
    assert r.scores["x"] + r.scores["y"] == pytest.approx(0, abs=1e-9)
    assert r.scores["lonely"] == 0 and r.counts["lonely"] == 0
    assert fit_bradley_terry([Vote("a", "b", 1, 1)]).scores == pytest.approx({"a": 0.0, "b": 0.0}, abs=1e-9)
    with pytest.raises(ValueError):
        fit_bradley_terry(votes, alpha=0)


# ------------------------------------------------------------------------------------------------ files


@pytest.fixture
def image_tree(tmp_path: Path) -> list[str]:
    paths = []
    for rel in ("imgs/a.jpg", "imgs/b.jpg", "imgs/sub/c d.png", "imgs/e.jpg"):
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"not decoded by these tests")
        paths.append(str(path))
    return paths


@pytest.mark.parametrize("suffix", [".json", ".csv"])
@pytest.mark.parametrize("method", ["elo", "bt"])
def test_score_file_round_trip(tmp_path: Path, image_tree: list[str], suffix: str, method: str) -> None:
    a, b, c, e = image_tree
    votes = [Vote(a, b, 1, 0), Vote(b, c, 2, 1), Vote(c, a, 0.5, 0.5), Vote(e, a, 1, 0)]
    ratings = fit_ratings(votes, method)
    out = tmp_path / "out" / f"scores{suffix}"
    write_score_file(ratings, out)
    loaded = load_personal_scores(out)  # no image_root: paths are relative to the file's folder
    assert loaded.problems == []
    got = {r.path: (r.score, r.extra["comparisons"]) for r in loaded}
    assert set(got) == {os.path.abspath(p) for p in image_tree}
    for path, (score, comparisons) in got.items():
        assert score == pytest.approx(ratings.scores[path], abs=1e-6)
        assert comparisons == round(ratings.counts[path])
    assert [r.score for r in loaded] == sorted((r.score for r in loaded), reverse=True)  # best first
    if suffix == ".json":
        data = json.loads(out.read_text())
        entry = data["ImageRecords"]["../imgs/a.jpg"]
        assert entry["relative_path"] == "../imgs/a.jpg"
        assert isinstance(entry["score"], str) and isinstance(entry["comparisons"], str)
        assert data["Metadata"]["method"] == method
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp file left behind
    relative = write_score_file(ratings, tmp_path / "imgs" / f"scores{suffix}", relative_to=tmp_path / "imgs")
    assert {r.path for r in load_personal_scores(relative)} == set(got)


def test_write_score_file_rejects_other_formats(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"\.json or \.csv"):
        write_score_file(fit_elo([Vote("a", "b")]), tmp_path / "scores.txt")


def test_load_votes_reads_seconds_and_write_votes_round_trips(tmp_path: Path, image_tree: list[str]) -> None:
    table = tmp_path / "imgs" / "votes.csv"
    table.write_text("image_a,image_b,votes_a,votes_b,seconds\n"
                     "a.jpg,b.jpg,1,0,0.8\n"
                     "b.jpg,a.jpg,1,0,\n"
                     "a.jpg,missing.jpg,1,0,2\n"
                     "e.jpg,sub/c d.png,0.5,0.5,3.5\n")
    votes, problems = load_votes(table)
    assert len(problems) == 1 and "missing.jpg" in str(problems[0])
    assert [(Path(v.image_a).name, v.seconds) for v in votes] == [("a.jpg", 0.8), ("b.jpg", None), ("e.jpg", 3.5)]
    copy = tmp_path / "elsewhere" / "votes.csv"
    write_votes(copy, votes)
    again, _ = load_votes(copy, image_root=copy.parent)
    assert [(v.image_a, v.image_b, v.votes_a, v.votes_b, v.seconds) for v in again] == [
        (v.image_a, v.image_b, v.votes_a, v.votes_b, v.seconds) for v in votes]


# ------------------------------------------------------------------------------------------------ proposals


@pytest.mark.parametrize("strategy", ["uncertainty", "close", "random"])
def test_propose_pair_never_self_and_deterministic(strategy: str) -> None:
    scores = {f"i{n}": float(n % 7) / 3 for n in range(12)}
    counts = {name: n for n, name in enumerate(scores)}
    draws = [propose_pair(scores, counts, np.random.default_rng(s), strategy) for s in range(300)]
    assert all(a != b and a in scores and b in scores for a, b in draws)
    rng1, rng2 = np.random.default_rng(7), np.random.default_rng(7)
    seq1 = [propose_pair(scores, counts, rng1, strategy) for _ in range(20)]
    seq2 = [propose_pair(scores, counts, rng2, strategy) for _ in range(20)]
    assert seq1 == seq2
    pair = propose_pair({"x": 0.0, "y": 100.0}, None, 0, strategy)  # two images, far apart
    assert sorted(pair) == ["x", "y"]
    # Excluded pairs (just answered / skipped) are avoided, in either order.
    trio = {"x": 0.0, "y": 0.01, "z": 0.02}
    seen = {frozenset(propose_pair(trio, None, s, strategy, exclude=[("y", "x")])) for s in range(60)}
    assert seen == {frozenset("xz"), frozenset("yz")}
    # ... unless the first image has no other partner.
    assert sorted(propose_pair({"x": 0.0, "y": 1.0}, None, 0, strategy, exclude=[("x", "y")])) == ["x", "y"]


@pytest.mark.parametrize("strategy", ["uncertainty", "close"])
def test_propose_pair_favours_little_compared_images(strategy: str) -> None:
    rng = np.random.default_rng(0)
    scores = {f"i{n}": float(rng.normal(0, 0.3)) for n in range(20)}
    counts = {name: (0 if n < 10 else 50) for n, name in enumerate(scores)}
    seen = Counter(x for _ in range(2000) for x in propose_pair(scores, counts, rng, strategy))
    low = sum(v for name, v in seen.items() if counts[name] == 0)
    assert low / sum(seen.values()) > 0.75, (strategy, low)


def test_propose_pair_prefers_close_and_uncertain() -> None:
    rng = np.random.default_rng(1)
    scores = {"a": 0.0, "near": 0.05, "far": 3.0, "far2": -3.0}
    counts = dict.fromkeys(scores, 10)
    partners = Counter()
    for _ in range(1000):
        pair = propose_pair(scores, counts, rng, "uncertainty")
        if "a" in pair:
            partners[(set(pair) - {"a"}).pop()] += 1
    # Seen from "a", the close image is the informative partner (far ones only come when they are drawn first).
    assert partners["near"] > 2 * max(partners["far"], partners["far2"])
    assert partners["near"] > partners["far"] + partners["far2"]
    close = Counter(propose_pair(scores, counts, rng, "close", neighbours=1) for _ in range(300))
    assert all({"far", "far2"} != set(p) for p in close)  # far images only pair with their own nearest
    unsure = Counter(x for _ in range(1000) for x in propose_pair(
        {n: 0.0 for n in "abcd"}, None, rng, "uncertainty", uncertainty={"a": 2.0, "b": 0.1, "c": 0.1, "d": 0.1}))
    assert unsure["a"] > 700
    with pytest.raises(ValueError):
        propose_pair({"a": 0.0}, None, rng)
    with pytest.raises(ValueError):
        propose_pair(scores, counts, rng, "best")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------ session state


def test_rating_state_votes_match_elo_and_undo_restores_exactly(tmp_path: Path) -> None:
    state = RatingState(["a", "b", "c"], k=0.1)
    state.vote("a", "b", "a", seconds=1.0)
    state.vote("b", "c", "tie")
    before = (dict(state.scores), dict(state.counts), dict(state.wins), list(state.votes))
    state.vote("c", "a", "b")
    state.vote("a", "new", votes_a=2, votes_b=1)
    assert "new" in state.scores
    assert state.undo().image_b == "new" and "new" not in state.scores and "new" not in state.counts
    assert state.undo() == Vote("c", "a", 0.0, 1.0)
    assert (state.scores, state.counts, state.wins, state.votes) == before  # exact, not approximately
    assert state.scores == fit_elo(state.votes, k=0.1).scores
    assert state.undo() and state.undo() and state.undo() is None
    assert state.scores == {"a": 0.0, "b": 0.0, "c": 0.0}
    with pytest.raises(ValueError):
        state.vote("a", "a", "a")
    with pytest.raises(ValueError):
        state.vote("a", "b", "left")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        state.vote("a", "b")


def test_rating_state_propose_save_and_resume(tmp_path: Path, image_tree: list[str]) -> None:
    state = RatingState(image_tree)
    rng = np.random.default_rng(0)
    for _ in range(30):
        a, b = state.propose(rng)
        assert a != b
        state.vote(a, b, "a" if a < b else "b")
    assert sum(state.counts.values()) == 60
    out = state.save(tmp_path / "scores.json")
    records = load_personal_scores(out, check_files=False)
    resumed = RatingState(scores={r.path: r.score for r in records},
                          counts={r.path: r.extra["comparisons"] for r in records})
    assert resumed.scores == pytest.approx(state.scores, abs=1e-6)
    assert resumed.counts == state.counts
    write_votes(tmp_path / "votes.csv", state.votes)
    votes, _ = load_votes(tmp_path / "votes.csv")
    replayed = fit_elo(votes, k=state.k, images=state.scores)  # the same update, in the same order
    assert replayed.scores == pytest.approx(state.scores)
    assert state.to_ratings().components == 1 and state.to_ratings().n_rows == 30


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_ratings_writes_a_score_file(tmp_path: Path, image_tree: list[str], capsys) -> None:
    votes = tmp_path / "imgs" / "votes.csv"
    with votes.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image_a", "image_b", "votes_a", "votes_b"])
        writer.writerows([["a.jpg", "b.jpg", 1, 0], ["b.jpg", "e.jpg", 1, 0], ["a.jpg", "e.jpg", 2, 0],
                          ["sub/c d.png", "a.jpg", 1, 1]])
    for method, out in (("bt", tmp_path / "s.json"), ("elo", tmp_path / "s.csv")):
        assert main(["ratings", str(votes), "--method", method, "--out", str(out), "--passes", "2"]) == 0
        text = capsys.readouterr().out
        assert "4 vote rows (6 votes, 1 ties) on 4 images" in text and "a.jpg" in text
        loaded = load_personal_scores(out)
        assert Path(loaded.records[0].path).name == "a.jpg"
    assert main(["ratings", str(tmp_path / "nope.csv")]) == 2


# ------------------------------------------------------------------------------------------------ real data


def test_real_votes_held_out_pairwise_accuracy() -> None:
    table = shared_path("data", "web-aesthetics", "comparisons", "votes.csv")
    votes, _ = load_votes(table)
    split = split_comparisons(votes, {"train": 0.7, "test": 0.3}, seed=0)
    train, test = split["train"], split["test"]
    results = {}
    for name, ratings in (("bt", fit_bradley_terry(train)), ("elo", fit_elo(train))):
        pa = [ratings.scores.get(v.image_a, 0.0) for v in test]
        pb = [ratings.scores.get(v.image_b, 0.0) for v in test]
        results[name] = pairwise_accuracy(pa, pb, [v.votes_a for v in test], [v.votes_b for v in test])
    print(f"\nweb-aesthetics votes: {len(train)} train / {len(test)} held-out pairs; vote-weighted held-out "
          f"pairwise accuracy: BT {results['bt']:.4f}, Elo {results['elo']:.4f} (chance 0.5)")
    assert results["bt"] > 0.6 and results["elo"] > 0.6


def _label_votes(image_dir: Path) -> Path:
    """A votes file as `tastelab label` writes it: inside the image folder, names relative to it."""
    votes = image_dir / "tastelab_votes.csv"
    votes.write_text("image_a,image_b,votes_a,votes_b,seconds\na.jpg,b.jpg,1,0,1.5\nb.jpg,e.jpg,1,0,\n"
                     "sub/c d.png,a.jpg,0.5,0.5,\n")
    return votes


@pytest.mark.parametrize("where", ["deep/down/scores.json", "imgs/scores.json", "scores.csv"])
def test_cli_ratings_output_works_with_the_documented_image_root(tmp_path: Path, image_tree: list[str],
                                                                 where: str, capsys) -> None:
    """README flow: label -> ratings --out -> train --set data.path=OUT --set data.image_root=IMAGE_DIR."""
    from tastelab.io.records import load_records

    image_dir = tmp_path / "imgs"
    votes = _label_votes(image_dir)
    out = tmp_path / where
    out.parent.mkdir(parents=True, exist_ok=True)
    assert main(["ratings", str(votes), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "wrote" in printed and "data.path=" in printed
    wanted = {os.path.realpath(p) for p in image_tree}
    for root in (image_dir, None):  # the documented --set data.image_root=IMAGE_DIR, and none at all
        kwargs = {} if root is None else {"image_root": str(image_dir)}
        loaded = load_records(out, format="personal", **kwargs)
        assert {os.path.realpath(r.path) for r in loaded.records} == wanted and loaded.problems == [], root
    if out.suffix == ".json":
        paths = json.loads(out.read_text())["Metadata"]["paths"]
        assert paths == ("absolute" if out.parent != image_dir else f"relative to {image_dir}")


def test_dropped_rows_are_counted_as_rows_and_named(tmp_path: Path, image_tree: list[str], caplog,
                                                    capsys) -> None:
    votes = tmp_path / "imgs" / "votes.csv"
    votes.write_text("image_a,image_b,votes_a,votes_b\ngone1.jpg,gone2.jpg,1,0\ngone3.jpg,gone4.jpg,0,1\n")
    with caplog.at_level(logging.WARNING):
        assert main(["ratings", str(votes)]) == 2
    told = caplog.text + capsys.readouterr().err
    assert "no usable votes (2 rows dropped, e.g." in told and "4 rows" not in told
    assert "image not found: gone1.jpg" in told
    assert "dropped 2 rows (4 missing images, e.g. gone1.jpg, gone2.jpg, gone3.jpg" in told
    caplog.clear()
    scores = tmp_path / "imgs" / "scores.csv"
    scores.write_text("relative_path,score\na.jpg,1\nmissing/x.jpg,2\n")
    with caplog.at_level(logging.WARNING):
        load_personal_scores(scores)
    assert "RecordSet.problems" not in caplog.text and "e.g. missing/x.jpg" in caplog.text
