"""Priors for personal taste (a generic model + a personal part): cross-validation decides how far to trust a
prior against the votes, the saved folder (personal member(s) + the prior's members) computes the CV'd function
up to an increasing affine map, and a bad prior folder is a one-line CLI error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr

import tiny
from tastelab.personal.select import Task, make_folds, search
from test_personal import FAST_SETS, SMALL_GRID, _bt_votes, _cli, _features, _photos, _write_votes

one_thread = pytest.fixture(scope="module", autouse=True)(tiny.one_torch_thread)


def test_cv_trusts_a_true_prior_and_ignores_a_noise_prior() -> None:
    rng = np.random.default_rng(5)
    feats, hidden = _features(60, rng)
    feats = {"noise": feats["noise"]}  # the votes' own features carry little: the prior must do the work
    task = Task("votes", 60, pairs=_bt_votes(hidden, 120, rng, noise=0.1))
    folds = make_folds(task, 4, 0)
    truth = search(task, feats, folds, priors={"truth": hidden.copy()}, **SMALL_GRID)
    cand = truth.chosen.candidate
    assert cand.priors and cand.priors[0][0] == "truth"
    assert not cand.members or cand.priors[0][1] >= 2.0  # the prior alone, or the prior weighted high
    assert truth.chosen.mean > 0.8
    assert any(s.candidate.stage == "prior" and not s.candidate.members for s in truth.scored)
    # With informative features and a prior that is noise, the prior gets a small weight or none.
    feats2, hidden2 = _features(60, np.random.default_rng(6))
    task2 = Task("votes", 60, pairs=_bt_votes(hidden2, 400, np.random.default_rng(7), noise=0.1))
    noise = search(task2, feats2, make_folds(task2, 4, 0), priors={"noise": np.random.default_rng(8).normal(size=60)},
                   **SMALL_GRID)
    c = noise.chosen.candidate
    assert c.members and (not c.priors or c.priors[0][1] <= 0.5)
    alone = [s for s in noise.scored if s.candidate.stage == "prior" and not s.candidate.members]
    assert alone and alone[0].mean < 0.65


@pytest.fixture(scope="module")
def prior_setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path], np.ndarray, Path]:
    """Photos, and a prior: an ensemble (weights 1 and 3) of two models trained on scores of the taste."""
    from tastelab.models.ensemble import build_ensemble
    from tastelab.personal.api import fit_personal

    root = tmp_path_factory.mktemp("prior")
    paths, taste = _photos(root / "images", 24, np.random.default_rng(17))
    folders = []
    for i, feat in enumerate(FAST_SETS):
        labels = root / f"scores{i}.csv"
        noisy = taste + np.random.default_rng(i).normal(scale=20, size=len(taste))
        labels.write_text("image,mean_rating\n" + "".join(f"{p.name},{y:.3f}\n" for p, y in zip(paths, noisy)))
        fit_personal(labels, root / "images", out=root / f"p{i}", feature_sets=[feat], size=64,
                     cache_dir=root / "cache", nested=False, folds=3, workers=0, mlp_widths=(), linear_lams=(1.0,),
                     max_ensemble=1)
        folders.append(root / f"p{i}")
    prior = build_ensemble(folders, root / "prior", weights=[1.0, 3.0])
    return root, paths, taste, prior


def test_saved_folder_with_a_prior_reproduces_the_combined_prediction(prior_setup, tmp_path: Path) -> None:
    from tastelab.inference.scoring import Scorer
    from tastelab.models import load_model
    from tastelab.models.folder import unit_scale
    from tastelab.personal.api import SELECTION_FILE, fit_personal, save_personal
    from tastelab.personal.select import Candidate, fit_candidate, fit_priors, predict_combined

    root, paths, taste, prior = prior_setup
    votes = root / "votes.csv"
    _write_votes(votes, paths, _bt_votes(taste, 80, np.random.default_rng(9), noise=0.15))
    res = fit_personal(votes, root / "images", out=tmp_path / "model", feature_sets=FAST_SETS[:1], size=320,
                       cache_dir=root / "cache", nested=False, folds=3, workers=0, priors=[prior], **SMALL_GRID)
    assert any(c["stage"] == "prior" for c in res.candidates)
    assert '"priors"' in (tmp_path / "model" / SELECTION_FILE).read_text()

    def check(folder: Path) -> None:
        model = load_model(folder)
        assert model.preprocess.size == 64  # the prior's preprocessing, not size=320
        got = Scorer(folder, backend="torch", device="cpu").predict_batch([str(p) for p in res.images])
        unit = unit_scale(np.array([r.raw_score for r in got]), model.config.score_range)
        want = res.unit_scores()
        assert spearmanr(unit, want).statistic == pytest.approx(1.0)
        assert pearsonr(unit, want).statistic > 1 - 1e-6
        np.testing.assert_allclose(unit, want, atol=1e-4)  # the saved average is exactly the in-memory one

    check(tmp_path / "model")
    # Force the combination personal member + 2 x prior (an ensemble prior: its members are flattened in).
    task = res  # the fit's own data: re-fit the chosen personal member and add the prior with c = 2
    from tastelab.personal.data import load_labels

    data = load_labels(votes, root / "images")
    base = next(s for s in res.candidates if s["stage"] == "linear")
    from tastelab.personal.fit import HeadSpec
    from tastelab.personal.select import Member

    cand = Candidate((Member(base["members"][0]["features"], HeadSpec((), base["members"][0]["l2"])),),
                     (("prior", 2.0),))
    images = np.arange(data.task.n_images)
    task.fitted = fit_candidate(data.task, res.features, cand, images=images, vote_rows=np.arange(data.task.size))
    task.prior_fit = fit_priors(data.task, task.fitted, cand, res.features, res.prior_scores, images)
    combined = predict_combined(task.fitted, task.prior_fit, res.features, res.prior_scores)
    assert pearsonr(res.unit_scores(), combined).statistic > 1 - 1e-9  # unit scores: an increasing affine map
    save_personal(res, tmp_path / "forced", {s.name: s for s in FAST_SETS}, load_model(prior).preprocess)
    assert len(list((tmp_path / "forced" / "members").iterdir())) == 3  # personal + the prior's two members
    check(tmp_path / "forced")


def test_cli_prior_errors_are_one_line_exit_2(prior_setup, tmp_path: Path, capsys, caplog) -> None:
    root, paths, taste, _prior = prior_setup
    votes = root / "cli_votes.csv"
    _write_votes(votes, paths, _bt_votes(taste, 40, np.random.default_rng(3)))
    args = [str(votes), "--images", str(root / "images"), "--out", str(tmp_path / "m")]
    code, msg = _cli([*args, "--prior", str(tmp_path / "missing")], capsys, caplog)
    assert code == 2 and "missing" in msg and "prior" in msg and "\n" not in msg
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text('{"kind": "ensemble", "members": [{"path": "../../etc"}]}')
    code, msg = _cli([*args, "--prior", str(bad)], capsys, caplog)
    assert code == 2 and str(bad) in msg and "\n" not in msg
    assert not (tmp_path / "m").exists()


def test_saved_offset_fit_reproduces_the_fitted_function(prior_setup, tmp_path: Path) -> None:
    """A prior as an offset (residual fit) saves as the residual head + the prior's members, the same folder
    shape as late fusion, and computes the fitted function from pixels."""
    from tastelab.inference.scoring import Scorer
    from tastelab.models import load_model
    from tastelab.models.folder import unit_scale
    from tastelab.personal.api import SELECTION_FILE, fit_personal, save_personal
    from tastelab.personal.data import load_labels
    from tastelab.personal.fit import HeadSpec
    from tastelab.personal.select import Candidate, Member, fit_candidate, fit_priors, predict_combined
    from test_personal_prior_offset import LEAN

    root, paths, taste, prior = prior_setup
    votes = root / "offset_votes.csv"
    _write_votes(votes, paths, _bt_votes(taste, 80, np.random.default_rng(9), noise=0.15))
    res = fit_personal(votes, root / "images", out=tmp_path / "model", feature_sets=FAST_SETS[:1], size=320,
                       cache_dir=root / "cache", nested=False, folds=3, workers=0, priors=[prior],
                       prior_mode="offset", **LEAN)
    assert any(c["prior_as_offset"] for c in res.candidates)
    assert '"prior_as_offset": true' in (tmp_path / "model" / SELECTION_FILE).read_text()
    # Force an offset fit with a personal part that matters (weak L2), so the folder must carry both.
    data = load_labels(votes, root / "images")
    cand = Candidate((Member(FAST_SETS[0].name, HeadSpec((), 1e-2)),), (("prior", 2.0),), offset=True)
    images = np.arange(data.task.n_images)
    res.fitted = fit_candidate(data.task, res.features, cand, images=images, vote_rows=np.arange(data.task.size),
                               priors=res.prior_scores)
    res.prior_fit = fit_priors(data.task, res.fitted, cand, res.features, res.prior_scores, images)
    function = predict_combined(res.fitted, res.prior_fit, res.features, res.prior_scores)
    head_only = predict_combined(res.fitted, None, res.features)
    assert abs(spearmanr(function, res.prior_scores["prior"]).statistic) < 0.999  # not the prior alone
    assert abs(pearsonr(function, head_only).statistic) < 0.999  # nor the head alone
    assert pearsonr(res.unit_scores(), function).statistic > 1 - 1e-9  # unit scores: an increasing affine map
    save_personal(res, tmp_path / "forced", {s.name: s for s in FAST_SETS}, load_model(prior).preprocess)
    assert len(list((tmp_path / "forced" / "members").iterdir())) == 3  # the residual head + the prior's two
    got = Scorer(tmp_path / "forced", backend="torch", device="cpu").predict_batch([str(p) for p in res.images])
    unit = unit_scale(np.array([r.raw_score for r in got]), load_model(tmp_path / "forced").config.score_range)
    np.testing.assert_allclose(unit, res.unit_scores(), atol=1e-4)
    assert pearsonr(unit, function).statistic > 1 - 1e-6
