"""Choosing a recipe by cross-validation over images: feature set, head, L2 strength, small ensembles.

Pure arrays in, no files: the API (:mod:`tastelab.personal.api`) extracts features and saves folders.

The search is staged so it stays cheap and adapts to the data without hand-fixed settings:

1. every feature set with a linear head over a log grid of L2 strengths;
2. multi-view training on the feature sets that did best in stage 1: each candidate view set (e.g. the
   image and its mirror; plus central crops) trains on every view of each training image (a view inherits
   its image's votes or score) and predicts the mean of the views' scores (test-time augmentation), with
   linear heads over the same grid;
3. MLP heads (over their own grid) on the feature sets that did best so far, with their best view set;
4. averages of the best 2 and 3 distinct candidates better than chance (z-scored predictions for votes,
   plain averages for scores), scored from the out-of-fold predictions already made (no new fits); then
   (``stack_pools``; by default on for scores, off for votes:
   :data:`~tastelab.personal.stack.DEFAULT_STACK_POOLS`) weighted stacks of the best candidate per feature
   set / per backbone, weights cross-fitted on the same out-of-fold predictions (:mod:`tastelab.personal.stack`);
5. with priors (generic models' scores of every image, :mod:`tastelab.personal.prior`): each prior alone,
   and the best candidate so far plus ``c`` x the prior for ``c`` in :data:`PRIOR_WEIGHTS`, as z-scores by
   each fold's training images, again from the out-of-fold predictions (no new fits). So cross-validation
   decides how far to trust a generic model against the person's own labels: with few labels the prior
   dominates, with many the personal part does.

Every L2 grid grows at its ends: while the best strength of a (feature set, head, views) line is the
largest (smallest) tried, the next decade beyond is tried too (up to :data:`MAX_GRID_EXTEND` decades), so a
grid edge never silently caps the regularisation.

The highest mean fold metric wins; ties go to the earlier (simpler) candidate. That maximum is optimistic
(it is the best of many noisy estimates), so :func:`nested_estimate` can repeat the whole search inside each
outer fold's training images and score only what it chose on the outer fold's held-out images.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from scipy.stats import spearmanr

from tastelab.io.splits import image_folds
from tastelab.io.votes import Vote
from tastelab.models.heads import Head
from tastelab.personal.features import view_key
from tastelab.personal.fit import HeadSpec, Pairs, fit_head, predict
from tastelab.personal.prior import offset_terms, offset_values
from tastelab.personal.stack import DEFAULT_STACK_POOLS, prefer_stack, stack_stage

#: L2 strengths tried for linear heads (weights of standardised inputs; the data term is a mean per vote).
LINEAR_LAMS: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0)
#: MLP heads: hidden widths and their L2 strengths.
MLP_WIDTHS: tuple[tuple[int, ...], ...] = ((64,),)
MLP_LAMS: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0)
#: How many decades a grid may grow beyond either end while its best value sits there.
MAX_GRID_EXTEND = 3
#: How many stage-1 feature sets also get MLP heads; the largest ensemble tried.
MLP_FEATURE_SETS = 2
MAX_ENSEMBLE = 3
#: Candidate view sets of stage 2 (``("orig",)``, the single view, is stage 1) and on how many stage-1
#: feature sets they are tried. A view set is tried only when the features dict holds all its views.
VIEW_SETS: tuple[tuple[str, ...], ...] = (("orig", "hflip"), ("orig", "hflip", "crop80", "crop80_hflip"))
VIEW_FEATURE_SETS = 3

#: Weights ``c`` of a prior's z-score added to the chosen candidate's z-score (stage 5); the same grid scales
#: the prior's offset of residual fits (logits per prior SD for votes, label SDs per prior SD for scores).
PRIOR_WEIGHTS: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)
#: Stage 5's ways of using a prior beside the prior alone: late fusion of z-scores, residual (offset) fits, both.
PRIOR_MODES = ("fusion", "offset", "both")
PRIOR_MODE = "both"
#: The size rule (:func:`search_plan`): above this many labelled images the search adapts to its cost
#: (:data:`LARGE_FOLDS` image folds, L2 lines walked from the grid's middle, views and MLP heads on the best
#: feature set only). Images, not votes: a fit's systems grow with images x views (votes cost O(votes)).
LARGE_IMAGES = 1000
LARGE_FOLDS = 3
DEFAULT_FOLDS = 5

Kind = Literal["votes", "scores"]
#: A candidate's CV value at chance: only better ones become ensemble members (averaging in a member that
#: orders held-out images no better than a coin only adds noise, however a noisy CV value rewards it).
CHANCE = {"pair_acc": 0.5, "srcc": 0.0}


@dataclass(frozen=True)
class Task:
    """Labelled data as indices into the image list: votes (``pairs``) or one score per image (``targets``)."""

    kind: Kind
    n_images: int
    pairs: Pairs | None = None
    targets: np.ndarray | None = None

    @property
    def metric(self) -> str:
        return "pair_acc" if self.kind == "votes" else "srcc"

    @property
    def size(self) -> int:
        return len(self.pairs) if self.pairs is not None else self.n_images


@dataclass(frozen=True)
class Fold:
    """Image indices and vote rows (votes only) that train and validate one fold."""

    train_images: np.ndarray
    val_images: np.ndarray
    train_votes: np.ndarray
    val_votes: np.ndarray


@dataclass(frozen=True)
class Member:
    """A feature set, a head, and the views it trains on and averages at prediction (``orig`` alone: none)."""

    feature: str
    head: HeadSpec
    views: tuple[str, ...] = ("orig",)

    @property
    def label(self) -> str:
        tta = "" if self.views == ("orig",) else f" views={'+'.join(self.views)}"
        return f"{self.feature} {self.head.label}{tta}"


@dataclass(frozen=True)
class Candidate:
    """Members averaged (see :func:`combine`; ``weights``: a stack's shares, empty = equal), plus priors
    ``(name, c)``: z(members) + sum c z(prior) (late fusion), or with ``offset`` (one linear member) the member
    fitted on top of sum c z(prior) as a fixed offset (:func:`tastelab.personal.prior.offset_terms`): the model
    is offset + head."""

    members: tuple[Member, ...]
    priors: tuple[tuple[str, float], ...] = ()
    weights: tuple[float, ...] = ()
    offset: bool = False

    @property
    def label(self) -> str:
        if self.offset:
            on = " + ".join(f"{c:g} x prior {name}" for name, c in self.priors)
            return f"{' + '.join(m.label for m in self.members)} fitted on offset {on}"
        parts = [" + ".join(m.label if not self.weights else f"{w:.2f} x {m.label}"
                            for m, w in zip(self.members, self.weights or [1.0] * len(self.members)))
                 ] if self.members else []
        parts += [f"{c:g} x prior {name}" for name, c in self.priors]
        return " + ".join(parts)

    @property
    def stage(self) -> str:
        if self.offset:
            return "prior_offset"
        if self.priors:
            return "prior"
        if self.weights:
            return "stack"
        if len(self.members) > 1:
            return "ensemble"
        return "linear" if not self.members[0].head.hidden else "mlp"


@dataclass
class Scored:
    candidate: Candidate
    folds: list[float]

    @property
    def mean(self) -> float:
        vals = [v for v in self.folds if np.isfinite(v)]
        return float(np.mean(vals)) if vals else float("nan")

    @property
    def std(self) -> float:
        vals = [v for v in self.folds if np.isfinite(v)]
        return float(np.std(vals)) if vals else float("nan")


@dataclass
class Search:
    """All candidates scored (search order), the chosen one and how long it took."""

    scored: list[Scored]
    chosen: Scored
    seconds: float
    fits: int = 0
    stages: dict[str, float] = field(default_factory=dict)


def make_folds(task: Task, k: int, seed: int, images: np.ndarray | None = None,
               votes: np.ndarray | None = None) -> list[Fold]:
    """k folds over ``images`` (default all) with :func:`tastelab.io.splits.image_folds`'s vote rule; ``votes``
    (rows of ``task.pairs``, default all) must only touch those images."""
    imgs = np.arange(task.n_images) if images is None else np.asarray(images)
    rows = np.arange(task.size if task.pairs is not None else 0) if votes is None else np.asarray(votes)
    vote_list = []
    if task.pairs is not None:
        vote_list = [Vote(str(task.pairs.a[r]), str(task.pairs.b[r])) for r in rows]
    folds = []
    for f in image_folds([str(i) for i in imgs], k=min(k, len(imgs)), seed=seed, votes=vote_list or None):
        train_i = np.array(sorted(int(i) for i in f.train_images))
        folds.append(Fold(train_i, np.array(sorted(int(i) for i in f.val_images)),
                          rows[np.asarray(f.train_votes, dtype=np.int64)] if vote_list else np.empty(0, np.int64),
                          rows[np.asarray(f.val_votes, dtype=np.int64)] if vote_list else np.empty(0, np.int64)))
    return folds


def pair_accuracy(scores: np.ndarray, pairs: Pairs) -> float:
    """Vote-weighted share of votes the scores order right (a tie in scores counts half)."""
    if not len(pairs):
        return float("nan")
    d = scores[pairs.a] - scores[pairs.b]
    right = pairs.wa * (d > 0) + pairs.wb * (d < 0) + 0.5 * (pairs.wa + pairs.wb) * (d == 0)
    return float(right.sum() / (pairs.wa + pairs.wb).sum())


def srcc(pred: np.ndarray, truth: np.ndarray) -> float:
    if len(pred) < 3 or np.ptp(pred) == 0 or np.ptp(truth) == 0:
        return float("nan")
    return float(spearmanr(pred, truth).statistic)


def fold_metric(task: Task, scores: np.ndarray, fold: Fold) -> float:
    if task.kind == "votes":
        assert task.pairs is not None
        return pair_accuracy(scores, task.pairs.take(fold.val_votes))
    assert task.targets is not None
    return srcc(scores[fold.val_images], task.targets[fold.val_images])


def member_views(feats: dict[str, torch.Tensor], m: Member) -> list[torch.Tensor]:
    """``m``'s feature rows for each of its views (all images, aligned)."""
    return [feats[view_key(m.feature, v)] for v in m.views]


def has_views(feats: dict[str, torch.Tensor], feature: str, views: Sequence[str]) -> bool:
    return all(view_key(feature, v) in feats for v in views)


_STACKS: OrderedDict[tuple[int, ...], tuple[list[torch.Tensor], torch.Tensor]] = OrderedDict()


def _stacked(views: Sequence[torch.Tensor]) -> torch.Tensor:
    """The views' rows stacked, the same tensor for the same views (so a fit's memoised Gram matrix serves
    every L2 strength and fold); entries hold their inputs, so a key's identities stay theirs."""
    key = tuple(id(v) for v in views)
    hit = _STACKS.get(key)
    if hit is not None and all(a is b for a, b in zip(hit[0], views)):
        _STACKS.move_to_end(key)
        return hit[1]
    out = torch.cat(list(views))
    _STACKS[key] = (list(views), out)
    while len(_STACKS) > 4:
        _STACKS.popitem(last=False)
    return out


def fit_member(task: Task, views: Sequence[torch.Tensor], head: HeadSpec, fit_images: np.ndarray,
               vote_rows: np.ndarray | None, seed: int, offset: np.ndarray | None = None) -> Head:
    """One member fitted on the given training images (and, for votes, training vote rows), on every view:
    the views' rows are stacked (view v of image i is row v * N + i) and each view inherits its image's
    votes (a vote between two images becomes one vote per view, between the same view of both) or score.
    The data term stays a mean per (view of a) vote, so one L2 grid fits any number of views. ``offset``
    (one value per image, linear heads): a fixed score every view of the image inherits (:func:`fit_head`)."""
    n, k = len(views[0]), len(views)
    features = views[0] if k == 1 else _stacked(views)
    off = None if offset is None else np.tile(np.asarray(offset, dtype=np.float64), k)
    fit_all = np.concatenate([np.asarray(fit_images) + v * n for v in range(k)])
    if task.kind == "votes":
        assert task.pairs is not None and vote_rows is not None
        p = task.pairs.take(vote_rows)
        if k > 1:
            p = Pairs(np.concatenate([p.a + v * n for v in range(k)]), np.concatenate([p.b + v * n for v in range(k)]),
                      np.tile(p.wa, k), np.tile(p.wb, k))
        return fit_head(features, head, fit_images=fit_all, pairs=p, seed=seed, offset=off)
    assert task.targets is not None
    return fit_head(features, head, fit_images=fit_all, targets=np.tile(task.targets[fit_images], k), seed=seed,
                    offset=off)


def predict_views(head: Head, views: Sequence[torch.Tensor]) -> np.ndarray:
    """The mean of the head's scores over the views (test-time augmentation), per image."""
    return np.mean([predict(head, x) for x in views], axis=0)


def normalise(task: Task, scores: np.ndarray, train_images: np.ndarray) -> tuple[float, float]:
    """The affine map that makes members of an ensemble comparable: votes' latent scales are arbitrary, so
    z-score by the training images' predictions; scores share the label scale, so none."""
    if task.kind == "scores":
        return 0.0, 1.0
    ref = scores[train_images]
    sd = float(ref.std())
    return float(ref.mean()), sd if sd > 0 else 1.0


def combine(task: Task, member_scores: Sequence[np.ndarray], train_images: np.ndarray,
            weights: Sequence[float] = ()) -> np.ndarray:
    parts = []
    for s in member_scores:
        mu, sd = normalise(task, s, train_images)
        parts.append((s - mu) / sd)
    return np.average(parts, axis=0, weights=list(weights) or None)


def zstats(scores: np.ndarray, train_images: np.ndarray) -> tuple[float, float]:
    """Mean and standard deviation over the training images (sd 1 when constant): every kind of score is
    z-scored before a prior is added, since a prior's scale has nothing to do with the labels'."""
    ref = np.asarray(scores)[train_images]
    sd = float(ref.std())
    return float(ref.mean()), sd if sd > 0 else 1.0


def add_priors(base: np.ndarray | None, priors: Sequence[tuple[np.ndarray, float]],
               train_images: np.ndarray) -> np.ndarray:
    """z(base) + sum c z(prior), z by ``train_images`` (``base`` None: the priors alone)."""
    out = np.zeros(len(priors[0][0]) if base is None else len(base))
    if base is not None:
        mu, sd = zstats(base, train_images)
        out += (base - mu) / sd
    for p, c in priors:
        mu, sd = zstats(p, train_images)
        out += c * (p - mu) / sd
    return out


class _Evaluator:
    """Out-of-fold predictions per (feature set, head), computed once and shared by ensembles."""

    def __init__(self, task: Task, feats: dict[str, torch.Tensor], folds: list[Fold], seed: int,
                 priors: dict[str, np.ndarray] | None = None) -> None:
        self.task, self.feats, self.folds, self.seed = task, feats, folds, seed
        self.priors = priors or {}
        self.preds: dict[Member, list[np.ndarray]] = {}
        self.offset_preds: dict[tuple[Member, tuple[tuple[str, float], ...]], list[np.ndarray]] = {}
        self.fits = 0

    def member(self, m: Member) -> list[np.ndarray]:
        if m not in self.preds:
            out = []
            views = member_views(self.feats, m)
            for f in self.folds:
                head = fit_member(self.task, views, m.head, f.train_images, f.train_votes, self.seed)
                out.append(predict_views(head, views))
                self.fits += 1
            self.preds[m] = out
        return self.preds[m]

    def offset_member(self, m: Member, group: tuple[tuple[str, float], ...]) -> list[np.ndarray]:
        """Out-of-fold predictions of ``m`` fitted on the priors' offset (z by each fold's training images):
        the head's scores plus the offset, i.e. the whole fitted function."""
        key = (m, group)
        if key not in self.offset_preds:
            out = []
            views = member_views(self.feats, m)
            for f in self.folds:
                off = offset_values(offset_terms(self.task, self.priors, group, f.train_images), self.priors)
                head = fit_member(self.task, views, m.head, f.train_images, f.train_votes, self.seed, offset=off)
                out.append(predict_views(head, views) + off)
                self.fits += 1
            self.offset_preds[key] = out
        return self.offset_preds[key]

    def columns(self, m: Member) -> list[np.ndarray]:
        """``m``'s out-of-fold predictions normalised as :func:`combine` normalises them (a stack's inputs)."""
        out = []
        for p, f in zip(self.member(m), self.folds):
            mu, sd = normalise(self.task, p, f.train_images)
            out.append((p - mu) / sd)
        return out

    def score(self, c: Candidate) -> Scored:
        if c.offset:
            preds = self.offset_member(c.members[0], c.priors)
            return Scored(c, [fold_metric(self.task, p, f) for p, f in zip(preds, self.folds)])
        per = [self.member(m) for m in c.members]
        vals = []
        for i, f in enumerate(self.folds):
            s = None if not per else per[0][i] if len(per) == 1 else combine(self.task, [p[i] for p in per],
                                                                             f.train_images, c.weights)
            if c.priors:
                s = add_priors(s, [(self.priors[n], w) for n, w in c.priors], f.train_images)
            assert s is not None
            vals.append(fold_metric(self.task, s, f))
        return Scored(c, vals)


def _best(scored: Sequence[Scored]) -> Scored:
    best = scored[0]
    for s in scored[1:]:
        if np.isfinite(s.mean) and (not np.isfinite(best.mean) or s.mean > best.mean + 1e-12):
            best = s
    return best


def grid_search(score: Callable[[float], Scored], lams: Sequence[float], *,
                max_extend: int = MAX_GRID_EXTEND, walk: bool = False) -> list[Scored]:
    """Score ``score(lam)`` over ``lams`` (strongest first: ties keep the most regularised), then, while the
    best is at the strongest (weakest) end, one decade beyond it, at most ``max_extend`` times per end.

    ``walk`` (large data, where a fit costs seconds and the CV curve over L2 is smooth): score the grid's
    middle strength and its two neighbours, then step towards the better side while each step improves,
    beyond the grid's ends by the same ``max_extend`` decades; about half the fits of the full grid."""
    grid = sorted(set(float(x) for x in lams), reverse=True)
    if walk:
        return _walk(score, grid, max_extend)
    out = {lam: score(lam) for lam in grid}
    for _ in range(max_extend):
        best = _best([out[lam] for lam in sorted(out, reverse=True)])
        lam = best.candidate.members[0].head.lam
        hi, lo = max(out), min(out)
        if lam == hi:
            nxt = hi * 10.0
        elif lam == lo:
            nxt = lo / 10.0
        else:
            break
        out[nxt] = score(nxt)
    return [out[lam] for lam in sorted(out, reverse=True)]


def _walk(score: Callable[[float], Scored], grid: list[float], max_extend: int) -> list[Scored]:
    """:func:`grid_search`'s walk over ``grid`` (strongest first)."""
    out: dict[float, Scored] = {}
    top, bottom = grid[0] * 10.0 ** max_extend, grid[-1] / 10.0 ** max_extend

    def neighbour(lam: float, stronger: bool) -> float | None:
        """The next strength towards stronger (weaker) L2: the grid's, then decades beyond its ends."""
        if lam in grid:
            j = grid.index(lam) + (-1 if stronger else 1)
            if 0 <= j < len(grid):
                return grid[j]
        nxt = lam * 10.0 if stronger else lam / 10.0
        return nxt if bottom * 0.999 <= nxt <= top * 1.001 else None

    def best_lam() -> float:
        return _best([out[lam] for lam in sorted(out, reverse=True)]).candidate.members[0].head.lam

    cur = grid[len(grid) // 2]
    for lam in (cur, neighbour(cur, True), neighbour(cur, False)):
        if lam is not None:
            out[lam] = score(lam)
    best = best_lam()
    if best != cur:
        stronger = best > cur
        cur = best
        while (nxt := neighbour(cur, stronger)) is not None:
            out[nxt] = score(nxt)
            if best_lam() != nxt:
                break
            cur = nxt
    return [out[lam] for lam in sorted(out, reverse=True)]


def search_plan(n_images: int, folds: int | None = None) -> dict[str, Any]:
    """The search's size rule: up to :data:`LARGE_IMAGES` labelled images the full search (``folds`` image
    folds, default :data:`DEFAULT_FOLDS`; every grid strength; views and MLPs on the best few feature sets).

    Above it a fit costs seconds (a fold's linear system has up to images x views rows, or D when that is
    smaller; see :func:`~tastelab.personal.fit.use_primal`) and the search is folds x candidates fits (about
    300 at the full plan), so it adapts: :data:`LARGE_FOLDS` folds unless ``folds`` is given (every vote
    inside a fold is still validated once, so the CV value is about as precise, from fewer, larger fits),
    L2 lines are walked (:func:`grid_search`), and view sets and MLP heads are tried on the best feature set
    only. Returns ``folds`` plus :func:`search` keyword arguments; a caller's own arguments override them."""
    if n_images <= LARGE_IMAGES:
        return {"folds": DEFAULT_FOLDS if folds is None else folds}
    return {"folds": LARGE_FOLDS if folds is None else folds, "walk": True, "view_feature_sets": 1,
            "mlp_feature_sets": 1}


def search(task: Task, feats: dict[str, torch.Tensor], folds: list[Fold], *, seed: int = 0,
           linear_lams: Sequence[float] = LINEAR_LAMS, mlp_widths: Sequence[tuple[int, ...]] = MLP_WIDTHS,
           mlp_lams: Sequence[float] = MLP_LAMS, mlp_feature_sets: int = MLP_FEATURE_SETS,
           max_ensemble: int = MAX_ENSEMBLE, view_sets: Sequence[Sequence[str]] = VIEW_SETS,
           view_feature_sets: int = VIEW_FEATURE_SETS, max_grid_extend: int = MAX_GRID_EXTEND,
           priors: dict[str, np.ndarray] | None = None, prior_weights: Sequence[float] = PRIOR_WEIGHTS,
           prior_mode: str = PRIOR_MODE, walk: bool = False, stack_pools: Sequence[str] | None = None,
           log: Callable[[str], None] | None = None) -> Search:
    """Score the staged candidates on ``folds`` and choose the best (see the module docstring). ``feats``
    holds each feature set's ``orig`` rows under its name and other views under :func:`view_key`;
    ``priors``: name -> a generic model's score of every image (stage 5). ``walk``: L2 lines walk their grid
    (:func:`grid_search`; :func:`search_plan` turns it on for large data). ``prior_mode``: which stage-5
    candidates beside each prior alone: "fusion" (the best candidate + c x prior, no new fits), "offset" (a
    linear head fitted on c x prior as offset, :data:`PRIOR_MODES`) or "both". ``stack_pools``: stage 4b's
    pools (:func:`~tastelab.personal.stack.stack_stage`, e.g. :data:`~tastelab.personal.stack.STACK_POOLS`;
    empty: no stacks); None, the default: the task kind's :data:`~tastelab.personal.stack.DEFAULT_STACK_POOLS`
    (on for scores, off for votes, as development CV found: docs/personal-taste.md)."""
    if prior_mode not in PRIOR_MODES:
        raise ValueError(f"prior_mode must be one of {PRIOR_MODES}, got {prior_mode!r}")
    pools = DEFAULT_STACK_POOLS[task.kind] if stack_pools is None else tuple(stack_pools)
    t0 = time.perf_counter()
    ev = _Evaluator(task, feats, folds, seed, priors)
    scored: list[Scored] = []
    stages: dict[str, float] = {}
    names = [k for k in feats if "@" not in k]

    def line(name: str, hidden: tuple[int, ...], views: tuple[str, ...], lams: Sequence[float]) -> list[Scored]:
        return grid_search(lambda lam: ev.score(Candidate((Member(name, HeadSpec(hidden, lam), views),))), lams,
                           max_extend=max_grid_extend, walk=walk)

    def ranked(pool: Sequence[Scored]) -> list[str]:
        by_feature: dict[str, float] = {}
        for s in pool:
            f = s.candidate.members[0].feature
            by_feature[f] = max(by_feature.get(f, -np.inf), s.mean if np.isfinite(s.mean) else -np.inf)
        return sorted(by_feature, key=lambda f: -by_feature[f])

    for name in names:
        scored += line(name, (), ("orig",), linear_lams)
    stages["linear"] = time.perf_counter() - t0
    if log:
        log(f"linear heads: {len(scored)} candidates, best {_best(scored).candidate.label} "
            f"{task.metric} {_best(scored).mean:.4f}")
    t1 = time.perf_counter()
    sets = [tuple(v) for v in view_sets if tuple(v) != ("orig",)]
    for name in ranked(scored)[:view_feature_sets]:
        for views in sets:
            if has_views(feats, name, views):
                scored += line(name, (), views, linear_lams)
    stages["views"] = time.perf_counter() - t1
    if log and sets:
        log(f"views: best so far {_best(scored).candidate.label} {task.metric} {_best(scored).mean:.4f}")
    t1 = time.perf_counter()
    linear_pool = list(scored)
    for name in ranked(linear_pool)[:mlp_feature_sets]:
        own = [s for s in linear_pool if s.candidate.members[0].feature == name]
        best_views = _best(own).candidate.members[0].views
        for width in mlp_widths:
            scored += line(name, tuple(width), best_views, mlp_lams)
    stages["mlp"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    distinct: list[Scored] = []
    seen: set[tuple[str, tuple[int, ...]]] = set()
    for s in sorted(scored, key=lambda s: -s.mean if np.isfinite(s.mean) else np.inf):
        m = s.candidate.members[0]
        if not s.mean > CHANCE[task.metric]:  # a member that orders held-out images no better than chance
            break
        if (m.feature, m.head.hidden) not in seen:
            seen.add((m.feature, m.head.hidden))
            distinct.append(s)
    for size in range(2, min(max_ensemble, len(distinct)) + 1):
        members = tuple(s.candidate.members[0] for s in distinct[:size])
        scored.append(ev.score(Candidate(members)))
    singles = [s for s in scored if s.candidate.stage in ("linear", "mlp") and s.mean > CHANCE[task.metric]]
    stacks = [Scored(Candidate(m, weights=w), v) for m, w, v in stack_stage(
        task, folds, singles, ev.columns, lambda x, f: fold_metric(task, x, f), pools)]
    lead = prefer_stack(scored, stacks)  # a stack beating the choice's own cross-fitted value
    scored += stacks
    top = lead if lead is not None else _best(scored)
    stages["ensemble"] = time.perf_counter() - t2
    tail: list[Scored] = []
    if priors:
        t3 = time.perf_counter()
        base, base_w = top.candidate.members, top.candidate.weights
        names_p = list(priors)
        for name in names_p:
            tail.append(ev.score(Candidate((), ((name, 1.0),))))
        groups = [[n] for n in names_p] + ([names_p] if len(names_p) > 1 else [])
        if prior_mode in ("fusion", "both"):
            for group in groups:
                for c in prior_weights:
                    tail.append(ev.score(Candidate(base, tuple((n, float(c)) for n in group), base_w)))
        if prior_mode in ("offset", "both"):
            tail += offset_candidates(ev, scored, groups, prior_weights, linear_lams, max_grid_extend, walk)
        scored += tail
        stages["prior"] = time.perf_counter() - t3
    chosen = _best([top, *tail])
    if log:
        log(f"chosen: {chosen.candidate.label} ({task.metric} {chosen.mean:.4f} over {len(folds)} image folds)")
    return Search(scored, chosen, time.perf_counter() - t0, ev.fits, stages)


def offset_candidates(ev: _Evaluator, scored: Sequence[Scored], groups: Sequence[Sequence[str]],
                      weights: Sequence[float], lams: Sequence[float], max_extend: int, walk: bool) -> list[Scored]:
    """Stage 5's residual candidates: the best single linear member so far (its feature set and views) refitted
    with ``c`` x the priors' z-scores as a fixed offset, for each ``c`` over the L2 grid (grown at its ends as
    every line is): strong L2 leaves the prior alone, weak L2 a mostly personal model, and CV chooses
    between them with the prior as the starting point, not as a separately fitted vote."""
    linear = [s for s in scored if len(s.candidate.members) == 1 and not s.candidate.priors
              and not s.candidate.weights and not s.candidate.members[0].head.hidden]
    if not linear:
        return []
    m = _best(linear).candidate.members[0]
    out: list[Scored] = []

    def line(pri: tuple[tuple[str, float], ...]) -> Callable[[float], Scored]:
        return lambda lam: ev.score(Candidate((Member(m.feature, HeadSpec((), lam), m.views),), pri, offset=True))

    for group in groups:
        for c in weights:
            out += grid_search(line(tuple((n, float(c)) for n in group)), lams, max_extend=max_extend, walk=walk)
    return out


@dataclass(frozen=True)
class PriorFit:
    """How a fitted candidate adds its priors: z(base) by ``base_mu``/``base_sd`` and, per prior, ``(name, c,
    mu, sd)``; all statistics of the images the candidate was fitted on."""

    base_mu: float
    base_sd: float
    priors: tuple[tuple[str, float, float, float], ...]


def fit_priors(task: Task, fitted: Sequence[FittedMember], candidate: Candidate, feats: dict[str, torch.Tensor],
               priors: dict[str, np.ndarray], images: np.ndarray) -> PriorFit | None:
    """The normalisation of ``candidate``'s prior part on ``images`` (None: it has none). An offset fit is
    written in the same form: its head's raw score (z times sd plus mu, so ``base_mu = -mu / sd``,
    ``base_sd = 1 / sd``) plus the offset's terms, which is exactly the function it was fitted as."""
    if not candidate.priors:
        return None
    if candidate.offset:
        fm = fitted[0]
        return PriorFit(-fm.mu / fm.sd, 1.0 / fm.sd, offset_terms(task, priors, candidate.priors, images))
    base_mu, base_sd = zstats(predict_fitted(fitted, feats), images) if fitted else (0.0, 1.0)
    return PriorFit(base_mu, base_sd, tuple((n, c, *zstats(priors[n], images)) for n, c in candidate.priors))


def predict_combined(fitted: Sequence[FittedMember], prior_fit: PriorFit | None, feats: dict[str, torch.Tensor],
                     priors: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """A fitted candidate's prediction: :func:`predict_fitted`, plus its priors' z-scores when it has any."""
    if prior_fit is None:
        return predict_fitted(fitted, feats)
    assert priors is not None
    out = (predict_fitted(fitted, feats) - prior_fit.base_mu) / prior_fit.base_sd if fitted else 0.0
    for name, c, mu, sd in prior_fit.priors:
        out = out + c * (np.asarray(priors[name], dtype=np.float64) - mu) / sd
    return np.asarray(out, dtype=np.float64)


@dataclass
class FittedMember:
    """A member fitted on all the data, with the affine normalisation its ensemble uses and its weight there
    (a stack's share; 1 in an equal average)."""

    member: Member
    head: Head
    mu: float
    sd: float
    weight: float = 1.0


def fit_candidate(task: Task, feats: dict[str, torch.Tensor], candidate: Candidate, *, images: np.ndarray,
                  vote_rows: np.ndarray | None, seed: int = 0, priors: dict[str, np.ndarray] | None = None
                  ) -> list[FittedMember]:
    """Fit ``candidate``'s members on ``images`` (and vote rows) and record each member's normalisation. An
    offset candidate's member is fitted on the priors' offset (``priors``: name -> scores of every image,
    z by ``images``), and its normalisation is that of the residual head alone."""
    off = None
    if candidate.offset:
        if not priors:
            raise ValueError("fit_candidate: an offset candidate needs the priors' scores")
        off = offset_values(offset_terms(task, priors, candidate.priors, images), priors)
    out = []
    for m, w in zip(candidate.members, candidate.weights or [1.0] * len(candidate.members)):
        views = member_views(feats, m)
        head = fit_member(task, views, m.head, images, vote_rows, seed, offset=off)
        mu, sd = normalise(task, predict_views(head, views), images)
        out.append(FittedMember(m, head, mu, sd, float(w)))
    return out


def predict_fitted(fitted: Sequence[FittedMember], feats: dict[str, torch.Tensor]) -> np.ndarray:
    """The combined prediction (the weighted mean of normalised member scores)."""
    return np.average([(predict_views(f.head, member_views(feats, f.member)) - f.mu) / f.sd for f in fitted],
                      axis=0, weights=[f.weight for f in fitted])


def nested_estimate(task: Task, feats: dict[str, torch.Tensor], outer: list[Fold], *, inner_k: int, seed: int = 0,
                    **search_kw: object) -> tuple[float, list[float], list[str]]:
    """Leak-free estimate of the whole procedure: search on each outer fold's training part (inner image
    folds), fit the winner there, score it on the outer fold's held-out images. Returns the mean, the
    per-fold values and what each outer fold chose."""
    vals, chosen = [], []
    for i, f in enumerate(outer):
        inner = make_folds(task, inner_k, seed + 1 + i, images=f.train_images,
                           votes=f.train_votes if task.kind == "votes" else None)
        res = search(task, feats, inner, seed=seed, **search_kw)  # type: ignore[arg-type]
        priors: dict[str, np.ndarray] = search_kw.get("priors") or {}  # type: ignore[assignment]
        fitted = fit_candidate(task, feats, res.chosen.candidate, images=f.train_images,
                               vote_rows=f.train_votes if task.kind == "votes" else None, seed=seed, priors=priors)
        pf = fit_priors(task, fitted, res.chosen.candidate, feats, priors, f.train_images)
        vals.append(fold_metric(task, predict_combined(fitted, pf, feats, priors), f))
        chosen.append(res.chosen.candidate.label)
    finite = [v for v in vals if np.isfinite(v)]
    return (float(np.mean(finite)) if finite else float("nan")), vals, chosen
