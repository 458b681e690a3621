"""Stage 4b of the search: weighted combinations (stacking) of candidates, weights chosen by cross-fitting.

Why: the equal-weight averages of stage 4 take the best 2-3 candidates, which on votes are usually feature sets
of one backbone; a weaker but complementary set (the other backbone) never enters, or enters with a weight
it has not earned. Here a small pool of candidates (the best one of each feature set, or of each backbone)
gets non-negative weights over its members' out-of-fold predictions (z-scored by each fold's training images
for votes, the label scale for scores, as :func:`~tastelab.personal.select.combine` does), fitted by a
smooth constrained fit: Bradley-Terry log-likelihood of the weighted score differences for votes,
non-negative least squares (each fold centred) for scores. No new head is fitted: the search's out-of-fold
predictions are reused, so a stack costs milliseconds.

Honesty: weights fitted on every fold and scored on the same folds would always "win" the CV. So a stack's CV
value is **cross-fitted**: for each fold, weights are fitted on the OTHER folds' held-out predictions and
scored on this fold's; only the weights the saved model uses are fitted on all folds (the usual CV of a
procedure: the reported folds measure "fit weights on the rest, apply here"). The candidate then competes
with every other candidate on that value, so a stack is chosen only where it earns its place.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import minimize, nnls
from scipy.special import expit, log_expit

from tastelab.personal.fit import Pairs

#: What :func:`stack_stage` returns per stack: members, their weights, the cross-fitted fold values.
StackResult = tuple[tuple[Any, ...], tuple[float, ...], list[float]]

#: Pools a stack is built from (:func:`pools`): the best candidate of each feature set, of each backbone.
STACK_POOLS: tuple[str, ...] = ("sets", "backbones")
#: Stage 4b's default by task kind, the one place it is set (``search(stack_pools=None)``): on for per-image
#: scores (development CV on web-aesthetics ratings: a clear SRCC gain over the search without stacks), off
#: for votes (development CV: level with the search). docs/personal-taste.md has the numbers.
DEFAULT_STACK_POOLS: dict[str, tuple[str, ...]] = {"scores": STACK_POOLS, "votes": ()}
#: A member whose share of the weights is below this is dropped (and the rest renormalised), in every fit. 10%,
#: not 1%: at 1% a pure-noise feature set kept 7% of a chosen stack (tests/test_personal_stack.py).
MIN_SHARE = 0.1
#: A small L2 penalty on the Bradley-Terry stack's weights (mean loss per vote): keeps a separable fold finite.
VOTE_RIDGE = 1e-4


@dataclass(frozen=True)
class FoldPreds:
    """One fold's held-out material for a stack: the members' prediction columns (all images, aligned), the
    held-out votes (votes) or held-out image indices and their targets (scores)."""

    columns: np.ndarray  # (n_images, k)
    pairs: Pairs | None = None
    images: np.ndarray | None = None
    targets: np.ndarray | None = None

    def usable(self) -> bool:
        if self.pairs is not None:
            return len(self.pairs) > 0
        return self.images is not None and len(self.images) > 1


def backbone_of(feature: str) -> str:
    """``mobilenet_v2[6,13]/meanstd`` -> ``mobilenet_v2``: a feature set's backbone (the pool key)."""
    return feature.split("[", 1)[0]


def _normalise(w: np.ndarray) -> np.ndarray:
    """Weights -> shares summing to 1, shares under :data:`MIN_SHARE` zeroed (all zero: equal shares)."""
    w = np.clip(np.asarray(w, dtype=np.float64), 0.0, None)
    if not np.isfinite(w).all() or w.sum() <= 0:
        return np.full(len(w), 1.0 / len(w))
    w = w / w.sum()
    w[w < MIN_SHARE] = 0.0
    return w / w.sum()


def _fit_votes(parts: Sequence[FoldPreds]) -> np.ndarray:
    """Non-negative w maximising the Bradley-Terry likelihood of sum_k w_k (z_k[a] - z_k[b]) over the parts'
    votes (plus :data:`VOTE_RIDGE` |w|^2); the scale it finds is dropped by :func:`_normalise`."""
    d = np.concatenate([p.columns[p.pairs.a] - p.columns[p.pairs.b] for p in parts if p.pairs is not None])
    wa = np.concatenate([p.pairs.wa for p in parts if p.pairs is not None]).astype(np.float64)
    wb = np.concatenate([p.pairs.wb for p in parts if p.pairs is not None]).astype(np.float64)
    total = float((wa + wb).sum())
    k = d.shape[1]

    def objective(w: np.ndarray) -> tuple[float, np.ndarray]:
        m = d @ w
        loss = -(wa * log_expit(m) + wb * log_expit(-m)).sum() / total + VOTE_RIDGE * float(w @ w)
        p = expit(m)
        coef = (-(wa * (1 - p)) + wb * p) / total
        return float(loss), d.T @ coef + 2 * VOTE_RIDGE * w

    fit = minimize(objective, np.full(k, 1.0 / k), jac=True, method="L-BFGS-B", bounds=[(0.0, None)] * k)
    return _normalise(fit.x)


def _fit_scores(parts: Sequence[FoldPreds]) -> np.ndarray:
    """Non-negative least squares of the targets on the members' predictions, each fold centred (its own
    intercept), over the parts' held-out images."""
    xs, ys = [], []
    for p in parts:
        assert p.images is not None and p.targets is not None
        x = p.columns[p.images]
        xs.append(x - x.mean(axis=0))
        ys.append(p.targets - p.targets.mean())
    w, _ = nnls(np.concatenate(xs), np.concatenate(ys))
    return _normalise(w)


def fit_weights(kind: str, parts: Sequence[FoldPreds]) -> np.ndarray:
    """Stack weights (non-negative, summing to 1) from the usable ``parts``: equal shares when none is."""
    use = [p for p in parts if p.usable()]
    if not use:
        return _normalise(np.ones(parts[0].columns.shape[1]))
    return _fit_votes(use) if kind == "votes" else _fit_scores(use)


def cross_fit(kind: str, folds: Sequence[FoldPreds]) -> tuple[list[np.ndarray], np.ndarray]:
    """Per fold, the weights fitted on the other folds (what that fold's CV value is scored with), and the
    weights fitted on all folds (what the fitted model uses)."""
    per = [fit_weights(kind, [p for j, p in enumerate(folds) if j != i]) for i in range(len(folds))]
    return per, fit_weights(kind, folds)


def _leave_out_best(cands: Sequence[Any], i: int) -> Any:
    """The candidate with the best mean over every fold but ``i`` (ties: the earlier)."""
    best, best_v = cands[0], -np.inf
    for s in cands:
        vals = [v for j, v in enumerate(s.folds) if j != i and np.isfinite(v)]
        v = float(np.mean(vals)) if vals else -np.inf
        if v > best_v + 1e-12:
            best, best_v = s, v
    return best


def selection_folds(cands: Sequence[Any]) -> list[float]:
    """The cross-fitted value of choosing among ``cands`` by CV: per fold, the value there of the candidate
    best on the other folds. It measures the choice as a stack's folds measure the stack (chosen elsewhere,
    scored here), unlike the best mean, which is the maximum of many noisy estimates and so optimistic."""
    return [_leave_out_best(cands, i).folds[i] for i in range(len(cands[0].folds))]


def prefer_stack(scored: Sequence[Any], stacks: Sequence[Any]) -> Any:
    """The best stack when its cross-fitted value beats :func:`selection_folds` of the other candidates
    (``scored``, no stacks): both are "decided on the other folds, scored on this one", so neither side
    carries the best-of-many optimism the other lacks. None: keep the ordinary choice."""
    if not stacks:
        return None
    top = max(stacks, key=lambda s: s.mean if np.isfinite(s.mean) else -np.inf)
    base = [v for v in selection_folds(list(scored)) if np.isfinite(v)]
    return top if base and np.isfinite(top.mean) and top.mean > float(np.mean(base)) + 1e-12 else None


def stack_stage(task: Any, folds: Sequence[Any], singles: Sequence[Any], columns: Callable[[Any], list[np.ndarray]],
                metric: Callable[[np.ndarray, Any], float], pools: Sequence[str] = STACK_POOLS) -> list[StackResult]:
    """Stage 4b of :func:`~tastelab.personal.select.search` (which wraps the results as candidates; this
    module does not import it, so the package stays acyclic). ``singles``: the scored single-member
    candidates better than chance (``.candidate.members[0]``, ``.mean``, ``.folds``); ``columns(member)``:
    its out-of-fold predictions per fold, normalised as ensembles normalise them; ``metric(scores, fold)``:
    the fold's CV metric. Per pool, the best candidate of each group (``sets``: feature set; ``backbones``:
    backbone) with weights from :func:`fit_weights`.

    A stack's fold values are those of the whole procedure, cross-fitted: for fold i, each group's member is
    the one best on the other folds, its weights are fitted on the other folds' held-out predictions, and the
    result is scored on fold i. The returned members and weights (what is fitted and saved) are the members
    best over all folds and weights fitted on all of them. A pool with fewer than two groups, or whose final
    weights keep fewer than two members (that is a single candidate, already scored), adds nothing; nor does
    a stack another pool already gave."""
    out: list[StackResult] = []
    seen: set[tuple[Hashable, ...]] = set()

    def parts(members: Sequence[Any]) -> list[FoldPreds]:
        res = []
        for i, f in enumerate(folds):
            x = np.stack([columns(m)[i] for m in members], axis=1)
            if task.kind == "votes":
                res.append(FoldPreds(x, pairs=task.pairs.take(f.val_votes)))
            else:
                res.append(FoldPreds(x, images=f.val_images, targets=task.targets[f.val_images]))
        return res

    for pool in pools:
        if pool not in ("sets", "backbones"):
            raise ValueError(f"unknown stack pool {pool!r} (known: sets, backbones)")
        groups: dict[str, list[Any]] = {}
        for s in singles:
            f = s.candidate.members[0].feature
            groups.setdefault(f if pool == "sets" else backbone_of(f), []).append(s)
        if len(groups) < 2:
            continue
        members = [m.candidate.members[0] for m in sorted((max(g, key=lambda s: s.mean) for g in groups.values()),
                                                          key=lambda s: -s.mean)]
        final = fit_weights(task.kind, parts(members))
        keep = tuple(m for m, w in zip(members, final) if w > 0)
        if len(keep) < 2 or keep in seen:
            continue
        seen.add(keep)
        vals = []
        for i, f in enumerate(folds):
            here = [_leave_out_best(g, i).candidate.members[0] for g in groups.values()]
            ps = parts(here)
            w = fit_weights(task.kind, [p for j, p in enumerate(ps) if j != i])
            vals.append(metric(ps[i].columns @ w, f))
        out.append((keep, tuple(float(w) for w in final if w > 0), vals))
    return out
