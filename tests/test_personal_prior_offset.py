"""A prior as an OFFSET (residual learning): the personal head is fitted with c x the prior's z-score as a fixed
score, so its L2 pulls the model towards the prior. The solvers minimise the right objective (checked against a
brute-force SciPy minimisation), strong L2 gives the prior's ordering, a true prior is chosen, and the saved
folder computes the fitted function from pixels (tests/test_personal_prior.py, sharing its prior)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import minimize
from scipy.special import log_expit
from scipy.stats import spearmanr

import tiny
from tastelab.personal.fit import HeadSpec, Pairs, fit_head
from tastelab.personal.select import (
    Candidate,
    Member,
    Task,
    fit_candidate,
    fit_priors,
    make_folds,
    predict_combined,
    search,
)
from test_personal import _bt_votes, _features

#: A small search (linear heads only): these tests are about stage 5.
LEAN = {"linear_lams": (1e-2, 1.0), "mlp_widths": (), "max_ensemble": 1, "max_grid_extend": 1}
one_thread = pytest.fixture(scope="module", autouse=True)(tiny.one_torch_thread)


def _standardised(head, x: torch.Tensor) -> np.ndarray:
    return ((x.double() - head.feature_mean.double()) / head.feature_std.double()).numpy()


@pytest.mark.parametrize("solver", ["dual", "primal"])
def test_offset_bradley_terry_solves_the_offset_objective(solver: str) -> None:
    rng = np.random.default_rng(0)
    x = torch.tensor(rng.normal(size=(9, 4)), dtype=torch.float32)
    pairs = Pairs(rng.integers(0, 9, 30), rng.integers(0, 9, 30), rng.integers(0, 3, 30).astype(float),
                  rng.integers(0, 3, 30).astype(float))
    keep = pairs.a != pairs.b
    pairs = Pairs(pairs.a[keep], pairs.b[keep], pairs.wa[keep] + 0.5, pairs.wb[keep])
    offset, lam = rng.normal(scale=2.0, size=9), 0.05
    head = fit_head(x, HeadSpec((), lam), fit_images=np.arange(9), pairs=pairs, solver=solver, offset=offset)
    z, total = _standardised(head, x), float((pairs.wa + pairs.wb).sum())

    def objective(w: np.ndarray) -> tuple[float, np.ndarray]:
        s = z @ w + offset
        d = s[pairs.a] - s[pairs.b]
        loss = -(pairs.wa * log_expit(d) + pairs.wb * log_expit(-d)).sum() / total + lam * w @ w
        p = 1 / (1 + np.exp(-d))
        coef = (-(pairs.wa * (1 - p)) + pairs.wb * p) / total
        g = np.bincount(pairs.a, coef, 9) - np.bincount(pairs.b, coef, 9)
        return float(loss), z.T @ g + 2 * lam * w

    brute = minimize(objective, np.zeros(4), jac=True, method="BFGS", options={"gtol": 1e-12}).x
    got = head.mlp[-1].weight.detach().double().numpy()[0]
    np.testing.assert_allclose(got, brute, atol=2e-5)
    assert np.abs(objective(got)[1]).max() < 1e-5  # the gradient of the offset objective vanishes there
    without = fit_head(x, HeadSpec((), lam), fit_images=np.arange(9), pairs=pairs, solver=solver)
    assert np.abs(without.mlp[-1].weight.detach().numpy() - got).max() > 1e-2  # the offset changed the fit


def test_offset_ridge_fits_the_residual() -> None:
    rng = np.random.default_rng(1)
    x = torch.tensor(rng.normal(size=(12, 3)), dtype=torch.float32)
    y, offset, lam = rng.normal(size=12), rng.normal(size=12), 0.1
    fit_images = np.arange(2, 12)
    head = fit_head(x, HeadSpec((), lam), fit_images=fit_images, targets=y[fit_images], offset=offset)
    z = _standardised(head, x)[fit_images]
    r = y[fit_images] - offset[fit_images]

    def objective(wb: np.ndarray) -> float:
        return float(np.mean((z @ wb[:3] + wb[3] - r) ** 2) / r.var(ddof=1) + lam * wb[:3] @ wb[:3])

    brute = minimize(objective, np.zeros(4), method="BFGS", options={"gtol": 1e-12}).x
    lin = head.mlp[-1]
    np.testing.assert_allclose(lin.weight.detach().double().numpy()[0], brute[:3], atol=1e-5)
    assert float(lin.bias.detach()) == pytest.approx(brute[3], abs=1e-5)
    with pytest.raises(ValueError, match="linear"):
        fit_head(x, HeadSpec((4,), lam), fit_images=fit_images, targets=y[fit_images], offset=offset)
    with pytest.raises(ValueError, match="finite"):
        fit_head(x, HeadSpec((), lam), fit_images=fit_images, targets=y[fit_images], offset=offset * np.nan)


@pytest.mark.parametrize("kind", ["votes", "scores"])
def test_strong_l2_leaves_the_prior_alone_and_weak_l2_learns_the_votes(kind: str) -> None:
    rng = np.random.default_rng(2)
    feats, hidden = _features(50, rng)
    prior = rng.normal(size=50)  # a prior that knows nothing of this taste
    task = (Task("votes", 50, pairs=_bt_votes(hidden, 600, rng)) if kind == "votes"
            else Task("scores", 50, targets=3.0 + hidden))
    images, rows = np.arange(50), (np.arange(600) if kind == "votes" else None)

    def fitted_function(lam: float, c: float) -> np.ndarray:
        cand = Candidate((Member("good", HeadSpec((), lam)),), (("p", c),), offset=True)
        fitted = fit_candidate(task, feats, cand, images=images, vote_rows=rows, priors={"p": prior})
        return predict_combined(fitted, fit_priors(task, fitted, cand, feats, {"p": prior}, images), feats,
                                {"p": prior})

    assert spearmanr(fitted_function(1e9, 2.0), prior).statistic == pytest.approx(1.0)
    # Weak L2: the head learns the labels on top of a small offset (the part of the prior outside the
    # features' span stays: an offset is not fitted away).
    assert spearmanr(fitted_function(1e-3, 0.25), hidden).statistic > 0.9
    with pytest.raises(ValueError, match="priors"):
        fit_candidate(task, feats, Candidate((Member("good", HeadSpec((), 1.0)),), (("p", 1.0),), offset=True),
                      images=images, vote_rows=rows)


def test_cv_chooses_a_prior_that_is_the_truth_and_fits_the_rest() -> None:
    rng = np.random.default_rng(5)
    feats, hidden = _features(60, rng)
    task = Task("votes", 60, pairs=_bt_votes(hidden, 120, rng, noise=0.1))
    truth = search(task, {"noise": feats["noise"]}, make_folds(task, 4, 0), priors={"truth": hidden.copy()},
                   prior_mode="offset", **LEAN)
    cand = truth.chosen.candidate
    assert cand.priors and cand.priors[0][0] == "truth" and truth.chosen.mean > 0.8
    assert any(s.candidate.stage == "prior_offset" for s in truth.scored)
    assert not any(s.candidate.stage == "prior" and s.candidate.members for s in truth.scored)  # no fusion
    # The prior knows half the taste, the features the other half: the residual fit beats both alone.
    good = feats["good"].double().numpy()
    part_a, part_b = good[:, :6] @ rng.normal(size=6), good[:, 6:] @ rng.normal(size=6)
    taste = part_a / part_a.std() + part_b / part_b.std()
    task2 = Task("votes", 60, pairs=_bt_votes(taste, 500, rng, noise=0.05))
    half = {"good": torch.tensor(good[:, 6:], dtype=torch.float32)}
    res = search(task2, half, make_folds(task2, 4, 0), priors={"half": part_a}, prior_mode="offset", **LEAN)
    by_stage = {}
    for s in res.scored:
        by_stage[s.candidate.stage] = max(by_stage.get(s.candidate.stage, 0.0), s.mean)
    assert res.chosen.candidate.offset
    assert by_stage["prior_offset"] > max(by_stage["linear"], by_stage["prior"]) + 0.05
