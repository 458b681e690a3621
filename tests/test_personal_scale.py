"""Personal models at scale (issue 14: 100 votes and 10,000): the dual and primal linear solvers agree, the
solver and search size rules pick by shape, and the Gram memo stays bounded. Synthetic arrays only (fast)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tastelab.personal import fit as fitmod
from tastelab.personal.api import select_and_fit
from tastelab.personal.data import Labels
from tastelab.personal.fit import HeadSpec, Pairs, fit_head, predict, use_primal
from tastelab.personal.select import (
    DEFAULT_FOLDS,
    LARGE_FOLDS,
    LARGE_IMAGES,
    LINEAR_LAMS,
    Candidate,
    Member,
    Scored,
    Task,
    grid_search,
    search_plan,
)


def _problem(n: int, d: int, m: int, seed: int = 0) -> tuple[torch.Tensor, Pairs, np.ndarray]:
    """``n`` images of ``d`` features, ``m`` noisy votes by a hidden linear rule, and per-image scores."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) * rng.uniform(0.5, 3.0, size=d) + rng.normal(size=d)
    truth = x @ rng.normal(size=d)
    a = rng.integers(0, n, m)
    b = (a + 1 + rng.integers(0, n - 1, m)) % n
    win = (truth[a] > truth[b]) ^ (rng.random(m) < 0.15)
    pairs = Pairs(a, b, win.astype(np.float64) * rng.integers(1, 3, m), (~win).astype(np.float64))
    return torch.as_tensor(x, dtype=torch.float32), pairs, truth + rng.normal(size=n)


@pytest.mark.parametrize("n,d", [(90, 12), (40, 70)])
@pytest.mark.parametrize("lam", [1e-3, 1e-1, 10.0])
def test_bradley_terry_dual_and_primal_reach_the_same_weights(n: int, d: int, lam: float) -> None:
    x, pairs, _ = _problem(n, d, 400)
    z = ((x.double() - x.double().mean(0)) / x.double().std(0)).numpy()
    total = float((pairs.wa + pairs.wb).sum())
    w_dual = z.T @ fitmod._bt_dual(z @ z.T, pairs.a, pairs.b, pairs.wa, pairs.wb, lam)
    w_primal = fitmod._bt_primal(z, pairs.a, pairs.b, pairs.wa, pairs.wb, lam)
    assert np.abs(w_dual - w_primal).max() <= 1e-6 * max(1.0, np.abs(w_dual).max())
    f = [fitmod._bt_loss(z @ w, pairs.a, pairs.b, pairs.wa, pairs.wb, total) + lam * w @ w for w in (w_dual, w_primal)]
    assert f[0] == pytest.approx(f[1], rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("kind", ["votes", "scores"])
@pytest.mark.parametrize("n,d", [(90, 12), (40, 70)])
def test_fit_head_solvers_agree_to_float32(kind: str, n: int, d: int) -> None:
    x, pairs, y = _problem(n, d, 400, seed=1)
    fit_images = np.arange(n)
    kw = {"pairs": pairs} if kind == "votes" else {"targets": y}
    heads = [fit_head(x, HeadSpec((), 0.05), fit_images=fit_images, solver=s, **kw) for s in ("dual", "primal")]
    s_dual, s_primal = (predict(h, x) for h in heads)
    assert np.abs(s_dual - s_primal).max() <= 1e-5 * max(1.0, np.abs(s_dual).max())
    assert np.corrcoef(s_dual, y if kind == "scores" else s_dual)[0, 1] > 0.5


def test_the_solver_follows_the_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    assert use_primal(250, 100) and not use_primal(200, 100) and not use_primal(50, 100)
    calls: list[str] = []
    monkeypatch.setattr(fitmod, "_bt_primal", lambda *a, **k: calls.append("primal") or np.zeros(a[0].shape[1]))
    real_dual = fitmod._bt_dual
    monkeypatch.setattr(fitmod, "_bt_dual", lambda *a, **k: calls.append("dual") or real_dual(*a, **k))
    tall, pairs, _ = _problem(120, 10, 300)
    fit_head(tall, HeadSpec((), 0.1), fit_images=np.arange(120), pairs=pairs)
    wide, pairs, _ = _problem(30, 40, 100)
    fit_head(wide, HeadSpec((), 0.1), fit_images=np.arange(30), pairs=pairs)
    assert calls == ["primal", "dual"]
    with pytest.raises(ValueError, match="solver"):
        fit_head(wide, HeadSpec((), 0.1), fit_images=np.arange(30), pairs=pairs, solver="qr")


def test_gram_memo_is_bounded_by_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    """An entry count alone let 12 memoised n x n Gram matrices (2 GB each at 16,000 rows) pile up."""
    monkeypatch.setattr(fitmod, "GRAM_CACHE_BYTES", 200_000)
    monkeypatch.setattr(fitmod, "_GRAMS", type(fitmod._GRAMS)())
    for seed in range(4):
        x, pairs, _ = _problem(100, 60, 200, seed=seed)  # dual: Z 48 kB + K 80 kB per entry
        fit_head(x, HeadSpec((), 1.0), fit_images=np.arange(100), pairs=pairs)
    assert 1 <= len(fitmod._GRAMS) <= 2
    assert sum(e[1].nbytes + e[2].nbytes for e in fitmod._GRAMS.values()) <= 200_000


def test_search_plan_is_unchanged_up_to_large_and_adapts_above() -> None:
    assert search_plan(100) == {"folds": DEFAULT_FOLDS}
    assert search_plan(LARGE_IMAGES, folds=4) == {"folds": 4}
    big = search_plan(LARGE_IMAGES + 1)
    assert big["folds"] == LARGE_FOLDS and big["walk"] is True
    assert big["view_feature_sets"] == 1 and big["mlp_feature_sets"] == 1
    assert search_plan(LARGE_IMAGES + 1, folds=5)["folds"] == 5


def _curve(peak: float) -> tuple[list[float], object]:
    calls: list[float] = []

    def score(lam: float) -> Scored:
        calls.append(lam)
        return Scored(Candidate((Member("f", HeadSpec((), lam)),)), [-abs(np.log10(lam) - np.log10(peak))])

    return calls, score


@pytest.mark.parametrize("peak", [1e-4, 1e-2, 1.0, 100.0, 1e5, 1e-6])
def test_walk_finds_the_peak_of_a_smooth_curve_in_fewer_fits(peak: float) -> None:
    full_calls, full_score = _curve(peak)
    full = grid_search(full_score, LINEAR_LAMS)  # type: ignore[arg-type]
    walk_calls, walk_score = _curve(peak)
    walked = grid_search(walk_score, LINEAR_LAMS, walk=True)  # type: ignore[arg-type]
    best = max(walked, key=lambda s: s.mean).candidate.members[0].head.lam
    assert best == pytest.approx(max(full, key=lambda s: s.mean).candidate.members[0].head.lam)
    assert best == pytest.approx(peak)
    assert len(walk_calls) == len(set(walk_calls)) and len(walk_calls) < len(full_calls)


def _task(n_images: int, m: int) -> tuple[Labels, dict[str, torch.Tensor]]:
    x, pairs, _ = _problem(n_images, 6, m, seed=3)
    noise = torch.as_tensor(np.random.default_rng(4).normal(size=(n_images, 6)), dtype=torch.float32)
    data = Labels(Path("votes.csv"), "votes", [f"{i}.jpg" for i in range(n_images)],
                  Task("votes", n_images, pairs=pairs), None)
    return data, {"rule": x, "noise": noise}


def test_large_image_counts_search_by_the_plan_and_still_find_the_rule() -> None:
    data, feats = _task(LARGE_IMAGES + 200, 4000)
    res = select_and_fit(data, feats, nested=False, mlp_widths=())
    assert res.plan == {"folds": LARGE_FOLDS, "walk": True, "view_feature_sets": 1, "mlp_feature_sets": 1}
    assert all(len(c["folds"]) == LARGE_FOLDS for c in res.candidates)
    assert len({c["members"][0]["l2"] for c in res.candidates if c["members"][0]["features"] == "rule"}) \
        < len(LINEAR_LAMS)
    assert res.chosen.startswith("rule") and res.cv > 0.75
    small, small_feats = _task(300, 1200)
    res_small = select_and_fit(small, small_feats, nested=False, mlp_widths=())
    assert res_small.plan == {"folds": DEFAULT_FOLDS}
    assert all(len(c["folds"]) == DEFAULT_FOLDS for c in res_small.candidates)


def test_mlp_with_more_rows_than_features_fits_on_the_inputs_themselves(monkeypatch: pytest.MonkeyPatch) -> None:
    """n >= D: no span basis (its SVD would cost n D^2 and save nothing); the head still learns the rule."""
    def no_svd(*a: object, **k: object) -> None:
        raise AssertionError("SVD basis computed with n >= D")

    monkeypatch.setattr(torch.linalg, "svd", no_svd)
    x, pairs, _ = _problem(150, 8, 1500, seed=5)
    head = fit_head(x, HeadSpec((16,), 1e-3), fit_images=np.arange(150), pairs=pairs)
    s = predict(head, x)
    right = ((s[pairs.a] > s[pairs.b]) * pairs.wa + (s[pairs.a] < s[pairs.b]) * pairs.wb).sum()
    assert right / (pairs.wa + pairs.wb).sum() > 0.75
