"""Stage 4b of the personal search: stacks of candidates with cross-fitted non-negative weights (issue 14)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tastelab.personal.fit import HeadSpec, Pairs
from tastelab.personal.select import (
    Candidate,
    Member,
    Scored,
    Task,
    fold_metric,
    make_folds,
    normalise,
    search,
)
from tastelab.personal.stack import MIN_SHARE, STACK_POOLS, FoldPreds, cross_fit, fit_weights, stack_stage
from test_personal import FAST_SETS, SMALL_GRID, _bt_votes, _write_votes, photos  # noqa: F401 (fixture)


def _vote_parts(columns: np.ndarray, latent: np.ndarray, rng: np.random.Generator, k: int = 5,
                n: int = 400) -> list[FoldPreds]:
    """``k`` folds of held-out votes on ``latent`` (5% flipped), all judged on the same prediction columns."""
    return [FoldPreds(columns, pairs=_bt_votes(latent, n, rng, noise=0.05)) for _ in range(k)]


def test_complementary_members_share_the_weight_and_weights_are_a_simplex() -> None:
    rng = np.random.default_rng(0)
    f1, f2 = rng.normal(size=300), rng.normal(size=300)
    latent = f1 + 0.6 * f2  # the second member is weaker but carries what the first lacks
    cols = np.stack([f1 + 0.1 * rng.normal(size=300), f2 + 0.1 * rng.normal(size=300)], axis=1)
    w = fit_weights("votes", _vote_parts(cols, latent, rng))
    assert (w >= 0).all() and w.sum() == pytest.approx(1.0)
    assert w[1] > 0.25 and w[0] > w[1], w  # about 0.62 : 0.38
    # scores: non-negative least squares over each fold's held-out images
    parts = [FoldPreds(cols, images=idx, targets=latent[idx] + 0.1 * rng.normal(size=len(idx)))
             for idx in np.array_split(rng.permutation(300), 5)]
    ws = fit_weights("scores", parts)
    assert (ws >= 0).all() and ws.sum() == pytest.approx(1.0) and abs(ws[1] - 0.375) < 0.05, ws


def test_a_noise_member_gets_no_weight() -> None:
    rng = np.random.default_rng(1)
    latent = rng.normal(size=300)
    cols = np.stack([latent + 0.5 * rng.normal(size=300), rng.normal(size=300)], axis=1)
    w = fit_weights("votes", _vote_parts(cols, latent, rng))
    assert w[1] < 0.03 and w[0] > 0.97, w
    anti = np.stack([latent, -latent], axis=1)  # a member that orders backwards is not flipped: weight 0
    wa = fit_weights("votes", _vote_parts(anti, latent, rng))
    assert wa[1] == 0.0 and wa[0] == 1.0
    assert all(x == 0 or x >= MIN_SHARE for x in fit_weights("votes", _vote_parts(
        np.stack([latent, 0.02 * rng.normal(size=300) + latent], axis=1), latent, rng)))


def test_the_stack_cv_value_is_cross_fitted_not_in_sample() -> None:
    """With random labels and many noise members, weights fitted on all folds fit the noise: scored on the same
    folds they look better than chance. The stack's reported folds must be the cross-fitted ones (weights from
    the other folds), which do not share that optimism."""
    rng = np.random.default_rng(2)
    n = 60
    task = Task("votes", n, pairs=_bt_votes(rng.normal(size=n), 500, rng, noise=0.5))
    folds = make_folds(task, 5, 0)
    members = [Member(f"set{i}", HeadSpec((), 1.0)) for i in range(8)]
    preds = {m: [rng.normal(size=n) for _ in folds] for m in members}
    scored = [Scored(Candidate((m,)), [0.51] * len(folds)) for m in members]  # above chance: all eligible

    def columns(m: Member) -> list[np.ndarray]:
        return [(p - normalise(task, p, f.train_images)[0]) / normalise(task, p, f.train_images)[1]
                for p, f in zip(preds[m], folds)]

    ((kept_members, kept_weights, stack_folds),) = stack_stage(task, folds, scored, columns,
                                                               lambda x, f: fold_metric(task, x, f), ("sets",))
    assert len(kept_members) >= 2
    cols, parts = [], []
    for i, f in enumerate(folds):
        x = np.stack([(preds[m][i] - normalise(task, preds[m][i], f.train_images)[0])
                      / normalise(task, preds[m][i], f.train_images)[1] for m in members], axis=1)
        cols.append(x)
        assert task.pairs is not None
        parts.append(FoldPreds(x, pairs=task.pairs.take(f.val_votes)))
    per, final = cross_fit("votes", parts)
    crossed = [fold_metric(task, x @ w, f) for x, w, f in zip(cols, per, folds)]
    in_sample = [fold_metric(task, x @ final, f) for x, f in zip(cols, folds)]
    np.testing.assert_allclose(stack_folds, crossed)
    assert np.mean(in_sample) > np.mean(crossed) + 0.01, (np.mean(in_sample), np.mean(crossed))
    kept = [m for m, w in zip(members, final) if w > 0]
    assert list(kept_members) == kept
    np.testing.assert_allclose(kept_weights, final[final > 0])


def test_search_stacks_two_complementary_sets_and_drops_the_noise_set() -> None:
    rng = np.random.default_rng(3)
    n = 90
    a, b, noise = (rng.normal(size=(n, 6)) for _ in range(3))
    latent = a @ rng.normal(size=6) + 0.6 * b @ rng.normal(size=6)
    feats = {k: torch.tensor(v, dtype=torch.float32) for k, v in (("a", a), ("b", b), ("noise", noise))}
    task = Task("votes", n, pairs=_bt_votes(latent, 900, rng, noise=0.05))
    res = search(task, feats, make_folds(task, 5, 0), **{**SMALL_GRID, "mlp_feature_sets": 0}, view_sets=(),
                 stack_pools=STACK_POOLS)
    stacks = [s for s in res.scored if s.candidate.stage == "stack"]
    assert stacks
    by_set = {m.feature: w for m, w in zip(stacks[0].candidate.members, stacks[0].candidate.weights)}
    assert by_set["a"] > by_set["b"] > 0.15 and by_set.get("noise", 0.0) < 0.05, by_set
    best_single = max(s.mean for s in res.scored if len(s.candidate.members) == 1)
    assert stacks[0].mean > best_single
    assert res.chosen.candidate.stage in ("stack", "ensemble")
    off = search(task, feats, make_folds(task, 5, 0), **{**SMALL_GRID, "mlp_feature_sets": 0}, view_sets=())
    assert not [s for s in off.scored if s.candidate.stage == "stack"]  # off by default (votes)


def test_a_stacked_choice_saves_and_scores_as_the_fitted_predictor(photos, tmp_path: Path) -> None:  # noqa: F811
    """The saved ensemble folder carries the stack's weights: it scores photos as the weighted in-memory
    predictor, which differs from the equal average (so unweighted saving would fail this)."""
    from tastelab.cli.main import main
    from tastelab.io.images import PreprocessConfig
    from tastelab.personal.api import fit_personal, save_personal
    from tastelab.personal.select import fit_candidate

    root, paths, taste = photos
    votes = root / "votes_stack.csv"
    _write_votes(votes, paths, _bt_votes(taste, 100, np.random.default_rng(8), noise=0.1))
    res = fit_personal(votes, root / "images", feature_sets=FAST_SETS, size=64, cache_dir=tmp_path / "cache",
                       nested=False, folds=3, workers=0, **{**SMALL_GRID, "mlp_feature_sets": 0}, view_sets=())
    pairs = Pairs(*(np.asarray(x) for x in _pairs_of(votes, res.images)))
    task = Task("votes", len(res.images), pairs=pairs)
    head = HeadSpec((), 1.0)
    cand = Candidate((Member(FAST_SETS[0].name, head), Member(FAST_SETS[1].name, head)), weights=(0.8, 0.2))
    res.fitted = fit_candidate(task, res.features, cand, images=np.arange(task.n_images),
                               vote_rows=np.arange(task.size))
    weighted = res.unit_scores()
    for fm in res.fitted:
        fm.weight = 1.0
    assert np.abs(res.unit_scores() - weighted).max() > 0.05  # the weights matter
    res.fitted[0].weight, res.fitted[1].weight = 0.8, 0.2
    save_personal(res, tmp_path / "stack", {s.name: s for s in FAST_SETS}, PreprocessConfig(size=64, resize="squash"))
    out = tmp_path / "scores.csv"  # what `tastelab score` computes from pixels with the saved folder
    assert main(["score", str(root / "images"), "--model", str(tmp_path / "stack"), "--out", str(out)]) == 0
    header, *lines = out.read_text().splitlines()
    col = header.split(",").index("score")
    got = {Path(r.split(",")[0]).name: float(r.split(",")[col]) for r in lines}
    want = {Path(p).name: s for p, s in zip(res.images, weighted)}
    assert got.keys() == want.keys()
    np.testing.assert_allclose([got[k] for k in want], list(want.values()), atol=2e-4)


def _pairs_of(votes: Path, images: list[str]) -> tuple[np.ndarray, ...]:
    index = {Path(p).name: i for i, p in enumerate(images)}
    rows = [line.split(",") for line in votes.read_text().splitlines()[1:]]
    return (np.array([index[r[0]] for r in rows]), np.array([index[r[1]] for r in rows]),
            np.array([float(r[2]) for r in rows]), np.array([float(r[3]) for r in rows]))


def test_a_stack_is_preferred_over_the_choice_by_cross_fitted_values_not_the_best_mean() -> None:
    """The best mean over many candidates is optimistic; the choice's cross-fitted value (per fold, the
    candidate best on the other folds, scored here) is what a stack's cross-fitted value is compared with."""
    from tastelab.personal.stack import prefer_stack, selection_folds

    lucky = Scored(Candidate((Member("a", HeadSpec((), 1.0)),)), [0.9, 0.5, 0.5, 0.5, 0.5])  # mean 0.58
    steady = Scored(Candidate((Member("b", HeadSpec((), 1.0)),)), [0.55] * 5)
    assert selection_folds([lucky, steady]) == [0.55, 0.5, 0.5, 0.5, 0.5]
    stack = Scored(Candidate(lucky.candidate.members + steady.candidate.members, weights=(0.5, 0.5)), [0.53] * 5)
    assert prefer_stack([lucky, steady], [stack]) is stack  # 0.53 > 0.51, though below the best mean 0.58
    worse = Scored(stack.candidate, [0.505] * 5)
    assert prefer_stack([lucky, steady], [worse]) is None and prefer_stack([lucky, steady], []) is None


def test_with_stacks_on_the_rule_carrying_search_still_chooses_only_the_informative_set() -> None:
    """tests/test_personal.py's rule-carrying search with stage 4b on: a pure-noise set once entered the chosen
    stack at 7% of the weight (share floor 1%); :data:`MIN_SHARE` drops such a member."""
    from test_personal import _features

    rng = np.random.default_rng(1)
    feats, hidden = _features(60, rng)
    task = Task("votes", 60, pairs=_bt_votes(hidden, 400, rng, noise=0.1))
    res = search(task, feats, make_folds(task, 4, 0), **SMALL_GRID, stack_pools=STACK_POOLS)
    assert {m.feature for m in res.chosen.candidate.members} == {"good"}, res.chosen.candidate.label
    assert res.chosen.mean > 0.75


def test_stacks_default_on_for_scores_and_off_for_votes() -> None:
    """The default (``stack_pools=None``) follows DEFAULT_STACK_POOLS: development CV gained on ratings only."""
    from tastelab.personal.stack import DEFAULT_STACK_POOLS

    assert DEFAULT_STACK_POOLS == {"scores": STACK_POOLS, "votes": ()}
    rng = np.random.default_rng(4)
    n = 90
    a, b = rng.normal(size=(n, 6)), rng.normal(size=(n, 6))
    wa, wb = rng.normal(size=6), rng.normal(size=6)
    latent = a @ wa / np.linalg.norm(wa) + b @ wb / np.linalg.norm(wb)  # each set carries half: a stack helps
    feats = {k: torch.tensor(v, dtype=torch.float32) for k, v in (("a", a), ("b", b))}
    grid = {**SMALL_GRID, "mlp_feature_sets": 0, "view_sets": ()}
    scores = Task("scores", n, targets=latent + 0.1 * rng.normal(size=n))
    on = search(scores, feats, make_folds(scores, 5, 0), **grid)
    assert [s for s in on.scored if s.candidate.stage == "stack"]
    off = search(scores, feats, make_folds(scores, 5, 0), **grid, stack_pools=())
    assert not [s for s in off.scored if s.candidate.stage == "stack"]
    votes = Task("votes", n, pairs=_bt_votes(latent, 600, rng, noise=0.05))
    assert not [s for s in search(votes, feats, make_folds(votes, 5, 0), **grid).scored
                if s.candidate.stage == "stack"]
