"""Does a recipe clearly beat the linear probe on unseen photos? Paired learning curves (issue 14).

    PYTHONPATH=src OPENBLAS_NUM_THREADS=1 python bench/personal_learning_curve.py [--seeds 0,1,2,3,4,5]
        [--sizes 100,200,400,all] [--part curve|ratings|all] [--recipes old,probe,new]
        [--dev [--dev-folds 3]] [--json PATH] [--table]

Part ``curve`` (votes): ../shared/data/web-aesthetics/comparisons (3,465 A/B records over 100 web pages). Per
seed, the pages are split BY IMAGE into 70 train pages and 30 unseen test pages; test votes are the votes
between two test pages; train votes are the votes between two train pages (votes across the split are unused),
subsampled (seeded) to each size. Measured on the unseen pages: pairwise accuracy on the test votes and
Spearman against Bradley-Terry ratings of the test pages from all their test votes.

Part ``ratings``: ../shared/data/web-aesthetics/ratings (300 pages, 1-9 means). Per seed a 70/30 split by
image; test SRCC/PLCC on the 30%.

Recipes (a registry, :data:`RECIPES`: name -> function(:class:`Split`) -> :class:`Prediction`). A recipe sees
only the split's training part (``fit_*``) plus the features / paths of the images it must score
(``eval_*``); the truth it is measured on stays in the bench (:class:`Target`), so no recipe can select on it.
To add one (another helper, another module): ``@recipe("views")`` on ``def views(split: Split) -> Prediction``
in this file, or ``RECIPES["views"] = fn`` from a module imported with ``--plugin module_name``; run it with
``--recipes probe,views``.

- ``old``: configs/personal_pairs_trainer.yaml (votes) / configs/web_aesthetics_trainer.yaml (ratings) through
  the existing Trainer (its own train/val split of the training part picks the epoch), best/ scored on the eval images.
- ``probe``: a linear head (Bradley-Terry / ridge) on mobilenet_v2[6,13,17,18]/meanstd (the old recipe's
  features), L2 by CV over the training images. THE BASELINE every other recipe is paired against.
- ``new``: tastelab.personal's selection (feature sets of MobileNetV2 and EfficientNet-Lite0 x heads x L2 x
  small ensembles, CV over the training images).

- ``prior`` / ``prior_only``: a generic model as a prior (tastelab.personal stage 5: the prior alone, or the
  chosen candidate + c x the prior, c by CV) / the prior's own scores. The prior is fitted (the personal
  search) on ALL pages of the OTHER web-aesthetics set, pages whose 32x32 grey thumbnail correlates > 0.95
  with a page of this set excluded: votes curve <- ratings, ratings part <- comparison votes. The ratings are
  CC BY-NC-SA: bench only. The prior's scores are cached on disk (under the feature cache, keyed by the label
  files and :data:`PRIOR_VERSION`): its fit costs ~10 minutes on one thread.
- ``prior_offset`` / ``prior_both``: stage 5 with the prior as an OFFSET (a linear head fitted on c x the
  prior's z-score as a fixed score: residual learning, L2 towards the prior; c and L2 by CV) instead of / beside
  late fusion. All three prior variants and ``new`` come from ONE search per split (stages 1-4 are unchanged
  by a prior; each variant chooses among its own stage-5 candidates), so run them before ``new``:
  ``--recipes prior,prior_offset,prior_both,prior_only,new``.

``--baseline`` (default ``probe``): the recipe ``summary`` pairs against; ``probe``, ``probe_all`` and ``new``,
when run and not the baseline, get their own pairings too (``summary_vs_probe_all``, ...).

Statistics ("clearly beats the probe", issue 14): per split (seed) the PAIRED gain recipe minus probe, its mean,
a 95% percentile bootstrap CI over seeds (seeded, :func:`paired_gains`), and wins out of seeds. ``clear``: at
least 6 seeds, at most one non-positive gain, and the CI's lower end above 0.

``--dev``: no test page is touched. Per split, k image folds over the TRAINING part (the rule of
tastelab.io.splits.image_folds: a vote touching a held-out image validates); every recipe runs on each fold's
training images (its own selection nested inside) and is scored on the held-out ones. Use these numbers to
choose settings; run the test measurement once when a recipe is fixed. Written to ``*_dev.json``.

Run-to-run variance (investigated in session 5): same code + same feature cache gives bit-identical results
(probe, new and old); re-extracting features on another thread count changes them by ~1e-6 and no metric;
the personal code of 1ba6d01, e0929ba and today reproduces today's probe on these features exactly (88c4f34's
L-BFGS solver differs on one split by 0.044), and none reproduces the session-4 rows that differ: those came
from code no commit holds (a long run keeps the code it imported at its start). What makes them fragile: the
probe's L2 is chosen from a flat CV curve (seeds 0-5 x 4 sizes: median gap best - runner-up 0.006, well
under the fold SD of 0.02-0.10), and flipping to the runner-up moves one split's test pair accuracy by a
median 0.016 (max 0.045). Any change to the procedure (solver, folds, grid) can flip it: read gains only
paired and over many seeds.

No timing is asserted; wall times are printed and recorded. Model selection never sees a test page.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import json
import logging
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "web-aesthetics"
VOTES_SIZE = 320  # the personal_pairs recipe's input size: old, probe and new read the same cached features
RATINGS_SIZE = 256  # the web_aesthetics recipe's input size
PROBE_SET = "mobilenet_v2[6,13,17,18]/meanstd"
BASELINE = "probe"
DEFAULT_RECIPES = ("old", "probe", "new")
METRICS = {"votes": ("pair_acc", "srcc"), "scores": ("srcc", "plcc")}
#: --dev on votes: pair accuracy on the inner folds' held-out votes only (few votes among held-out pages).
DEV_METRICS = {"votes": ("pair_acc",), "scores": ("srcc", "plcc")}
N_BOOT = 10_000


# ------------------------------------------------------------------------------------------------------------
# Statistics (pure NumPy: unit-tested in tests/test_bench_paired_stats.py)


def bootstrap_ci(values: Sequence[float], *, level: float = 0.95, n_boot: int = N_BOOT, seed: int = 0
                 ) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean over ``values`` (seeds resampled with replacement; seeded, so the
    same gains always give the same interval). One value: a zero-width interval at it."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) == 0 or not np.isfinite(x).all():
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(n_boot, len(x)))].mean(axis=1)
    alpha = (1.0 - level) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1.0 - alpha))


def gain_summary(gains: Sequence[float], seeds: Sequence[int]) -> dict[str, Any]:
    """Mean paired gain, its bootstrap CI, wins / ties / losses and whether it is a clear win (team rule: at
    least 6 seeds, positive in all but at most one, CI excluding 0)."""
    g = np.asarray(gains, dtype=np.float64)
    lo, hi = bootstrap_ci(g)
    n = len(g)
    wins, losses = int((g > 0).sum()), int((g < 0).sum())
    return {"seeds": list(seeds), "gains": g.tolist(), "n": n, "mean": float(g.mean()) if n else float("nan"),
            "ci95": [lo, hi], "wins": wins, "ties": n - wins - losses, "losses": losses,
            "clear": bool(n >= 6 and wins >= n - 1 and lo > 0)}


def paired_gains(rows: Sequence[dict[str, Any]], metrics: Sequence[str], by: str,
                 baseline: str = BASELINE) -> dict[str, Any]:
    """Per ``by`` value (vote count / split) and recipe: mean metric, and the paired gain over ``baseline`` on
    the seeds where both ran (a seed missing either is left out, never imputed)."""
    out: dict[str, Any] = {}
    for key in dict.fromkeys(r[by] for r in rows):
        at = [r for r in rows if r[by] == key]
        base = {r["seed"]: r for r in at if r["recipe"] == baseline}
        entry: dict[str, Any] = {}
        for name in dict.fromkeys(r["recipe"] for r in at):
            mine = {r["seed"]: r for r in at if r["recipe"] == name}
            e: dict[str, Any] = {"seeds": len(mine)}
            for m in metrics:
                e[m] = float(np.mean([r[m] for r in mine.values()]))
                if name != baseline:
                    both = [s for s in mine if s in base]
                    e[f"gain_{m}"] = gain_summary([mine[s][m] - base[s][m] for s in both], both)
            entry[name] = e
        out[str(key)] = entry
    return out


def markdown_table(part: dict[str, Any], metrics: Sequence[str], by_label: str, baseline: str = BASELINE,
                   summary: str = "summary") -> str:
    """Per size/split and recipe: mean metrics, and gain over ``baseline`` as ``mean [CI] wins/n`` (bold:
    clear), from ``part[summary]``."""
    head = " / ".join(metrics)
    lines = [f"| {by_label} | recipe | seeds | {head} | "
             + " | ".join(f"{m} gain vs {baseline} [95% CI] wins" for m in metrics) + " |",
             "|---|---|---|---|" + "---|" * len(metrics)]
    for key, entry in part[summary].items():
        for name, e in entry.items():
            cells = []
            for m in metrics:
                g = e.get(f"gain_{m}")
                if g is None or not g["n"]:
                    cells.append("(baseline)" if name == baseline else "")
                    continue
                text = f"{g['mean']:+.3f} [{g['ci95'][0]:+.3f}, {g['ci95'][1]:+.3f}] {g['wins']}/{g['n']}"
                cells.append(f"**{text}**" if g["clear"] else text)
            means = " / ".join(f"{e[m]:.3f}" for m in metrics)
            lines.append(f"| {key} | {name} | {e['seeds']} | {means} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------
# Splits and the recipe registry


@dataclass
class Split:
    """What a recipe may see: the training part (names, features, votes or targets) and the images to score.

    ``fit_feats`` / ``eval_feats``: every candidate feature set's rows for ``fit_names`` / ``eval_names``. For
    votes ``fit_votes`` are the training votes (image paths as in ``fit_names``); for scores ``fit_targets``.
    ``dev``: True when ``eval_names`` are (or include) training-part images of an inner fold, not test pages."""

    kind: Literal["votes", "scores"]
    seed: int
    size: str
    fit_names: list[str]
    fit_feats: dict[str, Any]
    eval_names: list[str]
    eval_feats: dict[str, Any]
    fit_votes: list[Any] | None = None
    fit_targets: np.ndarray | None = None
    score_range: tuple[float, float] | None = None
    dev: bool = False

    def labels(self) -> Any:
        """The training part as tastelab.personal's :class:`Labels` (indices into ``fit_names``)."""
        from tastelab.personal.data import Labels
        from tastelab.personal.fit import Pairs
        from tastelab.personal.select import Task

        if self.kind == "votes":
            assert self.fit_votes is not None
            loc = {p: i for i, p in enumerate(self.fit_names)}
            v = self.fit_votes
            pairs = Pairs(np.array([loc[x.image_a] for x in v]), np.array([loc[x.image_b] for x in v]),
                          np.array([x.votes_a for x in v]), np.array([x.votes_b for x in v]))
            return Labels(Path("votes.csv"), "votes", list(self.fit_names),
                          Task("votes", len(self.fit_names), pairs=pairs), None)
        assert self.fit_targets is not None
        return Labels(Path("labels.csv"), "scores", list(self.fit_names),
                      Task("scores", len(self.fit_names), targets=self.fit_targets), self.score_range)


@dataclass
class Target:
    """The truth a split's eval predictions are measured on (kept from recipes): vote rows as index pairs into
    ``eval_names`` (+ counts), Bradley-Terry ratings of the scored images, or per-image scores."""

    pairs: Any = None
    truth_index: np.ndarray | None = None  # eval rows the srcc truth refers to
    truth: np.ndarray | None = None


@dataclass
class Prediction:
    """One score per eval image (higher = better) and anything worth recording (choice, CV value)."""

    scores: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)


RecipeFn = Callable[[Split], Prediction]
#: name -> recipe. Add with :func:`recipe` or ``RECIPES[name] = fn`` (from a ``--plugin`` module).
RECIPES: dict[str, RecipeFn] = {}


def recipe(name: str) -> Callable[[RecipeFn], RecipeFn]:
    def register(fn: RecipeFn) -> RecipeFn:
        RECIPES[name] = fn
        return fn
    return register


def _selection(split: Split, feature_sets: Sequence[str] | None, **search_kw: Any) -> Prediction:
    from tastelab.personal.api import select_and_fit
    from tastelab.personal.select import predict_fitted

    names = list(split.fit_feats) if feature_sets is None else list(feature_sets)
    res = select_and_fit(split.labels(), {k: split.fit_feats[k] for k in names}, nested=False, seed=split.seed,
                         **search_kw)
    return Prediction(predict_fitted(res.fitted, {k: split.eval_feats[k] for k in names}),
                      {"chosen": res.chosen, "cv": res.cv})


@recipe("probe")
def probe(split: Split) -> Prediction:
    """Linear head on the old recipe's features, L2 by CV over the training images."""
    return _selection(split, [PROBE_SET], mlp_feature_sets=0, max_ensemble=1, stack_pools=())


@recipe("probe_all")
def probe_all(split: Split) -> Prediction:
    """Linear probes on EVERY candidate feature set (MobileNetV2 and EfficientNet-Lite0), the set and its L2
    chosen by CV: the probe on the same backbones' features the search draws from (no view sets, no MLP,
    no ensembles), so a gain of ``new`` over it is what the search adds beyond picking features."""
    return _selection(split, [k for k in split.fit_feats if "@" not in k], mlp_feature_sets=0, max_ensemble=1,
                      view_sets=(), stack_pools=())  # a probe: no stacks whatever the task kind's default


@recipe("new")
def new(split: Split) -> Prediction:
    """tastelab.personal's whole search over every loaded feature set (read from the ``prior`` recipe's run on
    the same split when it ran first: its stages 1-4 are this search, unchanged)."""
    hit = _FROM_PRIOR.pop(("new", *_split_key(split)), None)
    return hit if hit is not None else _selection(split, None)


# Stage 4b (stacks) on and off from ONE search per split: ``new_nostack`` is the search without stacks (the
# search before stage 4b; ``new`` on votes, whose default has no stacks; on scores ``new`` is ``new_stack``),
# ``new_stack_sets`` / ``new_stack_backbones`` add only that pool's stack,
# ``new_stack`` both. Every variant chooses the best of its candidates by the same CV values, then fits and
# predicts as select_and_fit does. Run them together (``--recipes probe_all,new_nostack,new_stack,...``):
# the search runs once per split (kept for the run: dev mode runs each recipe over every inner fold in turn).
_VARIANTS: dict[tuple[Any, ...], tuple[Any, list[Any], dict[Any, str]]] = {}


def _stack_search(split: Split) -> tuple[Any, list[Any], dict[Any, str]]:
    """The search with every stack pool, and which pool gave each stack (by its members and weights)."""
    key = _split_key(split)
    if key not in _VARIANTS:
        from tastelab.personal import select as sel
        from tastelab.personal import stack as stk
        from tastelab.personal.select import make_folds, search, search_plan

        data = split.labels()
        task = data.task
        plan = search_plan(task.n_images)
        k = max(2, min(int(plan.pop("folds")), task.n_images // 2))
        pools: dict[Any, str] = {}

        def per_pool(*args: Any) -> list[Any]:
            out = []
            for pool in args[-1]:
                for s in stk.stack_stage(*args[:-1], (pool,)):
                    pools.setdefault(s[:2], pool)
                    out.append(s)
            return out

        real = sel.stack_stage
        sel.stack_stage = per_pool  # type: ignore[assignment]
        try:
            res = search(task, dict(split.fit_feats), make_folds(task, k, split.seed), seed=split.seed,
                         stack_pools=stk.STACK_POOLS, **plan)
        finally:
            sel.stack_stage = real
        _VARIANTS[key] = (data, res.scored, pools)
    return _VARIANTS[key]


def _variant(split: Split, allowed: Sequence[str]) -> Prediction:
    """The search's choice among the non-stacks and the stacks of the ``allowed`` pools, fitted and predicted."""
    from tastelab.personal.select import _best, fit_candidate, predict_fitted
    from tastelab.personal.stack import prefer_stack

    data, scored, pools = _stack_search(split)
    task = data.task
    plain = [s for s in scored if not s.candidate.weights]
    stacks = [s for s in scored if s.candidate.weights
              and pools.get((s.candidate.members, s.candidate.weights)) in allowed]
    best = prefer_stack(plain, stacks) or _best(plain + stacks)  # the search's rule (select.search)
    fitted = fit_candidate(task, dict(split.fit_feats), best.candidate, images=np.arange(task.n_images),
                           vote_rows=np.arange(task.size) if task.kind == "votes" else None, seed=split.seed)
    return Prediction(predict_fitted(fitted, split.eval_feats), {"chosen": best.candidate.label, "cv": best.mean})


@recipe("new_nostack")
def new_nostack(split: Split) -> Prediction:
    """The search without stage 4b (stacks): the search as it was before it."""
    return _variant(split, ())


@recipe("new_stack_sets")
def new_stack_sets(split: Split) -> Prediction:
    """The search with the stack of the best candidate per feature set only."""
    return _variant(split, ("sets",))


@recipe("new_stack_backbones")
def new_stack_backbones(split: Split) -> Prediction:
    """The search with the stack of the best candidate per backbone only."""
    return _variant(split, ("backbones",))


@recipe("new_stack")
def new_stack(split: Split) -> Prediction:
    """The search with both stacks (per feature set and per backbone)."""
    return _variant(split, ("sets", "backbones"))


# ------------------------------------------------------------------------------------------------------------
# Priors (a generic model + a personal part): the other web-aesthetics set trains the prior. The ratings are
# CC BY-NC-SA: a prior trained on them is for this bench only, never a shipped default.

#: Thumbnail correlation above which a ratings page and a comparisons page count as the same page.
NEAR_DUP = 0.95
#: Prior weights ``c`` the prior recipe searches (tastelab.personal.select.PRIOR_WEIGHTS unless --prior-weights).
PRIOR_GRID: list[float] | None = None
_PRIOR_SCORES: dict[str, dict[str, float]] = {}
PRIOR_INFO: dict[str, Any] = {}


def _split_key(split: Split) -> tuple[Any, ...]:
    n = len(split.fit_votes) if split.fit_votes is not None else len(split.fit_names)
    return (split.kind, split.seed, split.size, split.dev, tuple(split.fit_names), tuple(split.eval_names), n)


def _thumb(path: str) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        x = np.asarray(im.convert("L").resize((32, 32)), dtype=np.float64).ravel()
    return (x - x.mean()) / (x.std() or 1.0)


def near_duplicates(a: Sequence[str], b: Sequence[str], threshold: float = NEAR_DUP) -> list[tuple[str, str, float]]:
    """Pairs (a, b) whose 32x32 grey thumbnails correlate above ``threshold`` (Pearson)."""
    ta, tb = np.stack([_thumb(p) for p in a]), np.stack([_thumb(p) for p in b])
    corr = ta @ tb.T / ta.shape[1]
    return [(a[i], b[j], float(corr[i, j])) for i, j in zip(*np.nonzero(corr > threshold))]


#: Bump when the prior's recipe (the search without priors, :func:`_prior_scores`) changes: the disk cache key.
PRIOR_VERSION = 1


def _prior_cache_file(kind: str) -> Path:
    """Where the bench keeps a prior's scores between runs (the fit costs ~10 minutes on 1 thread): under the
    feature cache, keyed by the label files' bytes, the near-duplicate threshold and :data:`PRIOR_VERSION`."""
    import hashlib

    h = hashlib.blake2b(digest_size=12)
    h.update(f"{kind}\0{NEAR_DUP}\0{PRIOR_VERSION}\0{VOTES_SIZE}\0{RATINGS_SIZE}\0".encode())
    for f in (DATA / "ratings" / "labels.csv", DATA / "comparisons" / "votes.csv"):
        h.update(f.read_bytes())
    return _cache() / "bench_prior_scores" / f"{kind}-{h.hexdigest()}.json"


def _prior_scores(kind: str) -> dict[str, float]:
    """The prior's score of every page of the set ``kind`` is measured on, from a model fitted (tastelab.personal's
    selection, no nested CV) on ALL pages of the OTHER set, near-duplicates of this set's pages excluded:
    votes curve <- all ratings pages; ratings part <- all comparison votes. Computed once per kind."""
    if kind in _PRIOR_SCORES:
        return _PRIOR_SCORES[kind]
    disk = _prior_cache_file(kind)
    if disk.is_file():
        saved = json.loads(disk.read_text())
        _PRIOR_SCORES[kind], PRIOR_INFO[kind] = saved["scores"], {**saved["info"], "cached": str(disk)}
        print(f"prior for {kind}: read from {disk}")
        return _PRIOR_SCORES[kind]
    from tastelab.io.images import PreprocessConfig
    from tastelab.io.records import load_records
    from tastelab.io.votes import load_votes
    from tastelab.personal.api import select_and_fit
    from tastelab.personal.data import Labels
    from tastelab.personal.features import DEFAULT_FEATURE_SETS, extract_feature_sets
    from tastelab.personal.fit import Pairs
    from tastelab.personal.select import Task, predict_fitted

    t = time.perf_counter()
    rs = load_records(DATA / "ratings" / "labels.csv")
    r_paths = [r.path for r in rs.records]
    y = np.array([r.score for r in rs.records], dtype=np.float64)
    votes, _ = load_votes(DATA / "comparisons" / "votes.csv")
    c_paths = sorted({v.image_a for v in votes} | {v.image_b for v in votes})
    dups = near_duplicates(r_paths, c_paths)
    dup_r, dup_c = {a for a, _, _ in dups}, {b for _, b, _ in dups}
    size = VOTES_SIZE if kind == "votes" else RATINGS_SIZE
    if kind == "votes":  # train on ratings pages, score comparison pages
        train = [p for p in r_paths if p not in dup_r]
        ty = np.array([y[r_paths.index(p)] for p in train])
        feats, _ = extract_feature_sets(DEFAULT_FEATURE_SETS, train + c_paths, preprocess=PreprocessConfig(size=size),
                                        cache_dir=_cache(), workers=0, views=_views())
        n = len(train)
        labels = Labels(Path("labels.csv"), "scores", train, Task("scores", n, targets=ty), tuple(rs.score_range))  # type: ignore[arg-type]
        targets = c_paths
    else:  # train on comparison votes between pages that are no ratings page's near-duplicate
        keep = [v for v in votes if v.image_a not in dup_c and v.image_b not in dup_c]
        train = sorted({v.image_a for v in keep} | {v.image_b for v in keep})
        loc = {p: i for i, p in enumerate(train)}
        pairs = Pairs(np.array([loc[v.image_a] for v in keep]), np.array([loc[v.image_b] for v in keep]),
                      np.array([v.votes_a for v in keep], dtype=np.float64),
                      np.array([v.votes_b for v in keep], dtype=np.float64))
        feats, _ = extract_feature_sets(DEFAULT_FEATURE_SETS, train + r_paths, preprocess=PreprocessConfig(size=size),
                                        cache_dir=_cache(), workers=0, views=_views())
        n = len(train)
        labels = Labels(Path("votes.csv"), "votes", train, Task("votes", n, pairs=pairs), None)
        targets = r_paths
    res = select_and_fit(labels, {k: v[:n] for k, v in feats.items()}, nested=False, seed=0)
    pred = predict_fitted(res.fitted, {k: v[n:] for k, v in feats.items()})
    _PRIOR_SCORES[kind] = dict(zip(targets, pred.tolist()))
    PRIOR_INFO[kind] = {"trained_on": "ratings" if kind == "votes" else "comparisons", "train_pages": n,
                        "near_duplicates": [[a, b, c] for a, b, c in dups], "chosen": res.chosen, "cv": res.cv,
                        "seconds": time.perf_counter() - t}
    _write(str(disk), {"scores": _PRIOR_SCORES[kind], "info": PRIOR_INFO[kind]})
    print(f"prior for {kind}: {PRIOR_INFO[kind]['trained_on']} ({n} pages; {len(dups)} near-duplicate pairs "
          f"excluded) chose {res.chosen}, CV {res.cv:.3f}, {time.perf_counter() - t:.0f}s")
    return _PRIOR_SCORES[kind]


#: Stage-5 variants measured from ONE search per split (stages 1-4 are the same search; each variant chooses
#: among its own stage-5 candidates plus stages 1-4, ties to the earlier candidate, as the search does):
#: recipe -> which prior candidates it may choose (the prior alone is in all three).
PRIOR_VARIANTS: dict[str, tuple[str, ...]] = {"prior": ("fusion",), "prior_offset": ("offset",),
                                              "prior_both": ("fusion", "offset")}
#: Predictions of the variants (and ``new``) already computed on a split, popped by the recipe that wants them.
_FROM_PRIOR: dict[tuple[Any, ...], Prediction] = {}


def _prior_search(split: Split) -> None:
    """One search with every stage-5 candidate (prior_mode both); each variant's and ``new``'s choice fitted
    on the training part and predicted on the eval images, kept in :data:`_FROM_PRIOR`."""
    from tastelab.personal.select import fit_candidate, fit_priors, make_folds, predict_combined, search

    ps = _prior_scores(split.kind)
    kw: dict[str, Any] = {} if PRIOR_GRID is None else {"prior_weights": tuple(PRIOR_GRID)}
    data = split.labels()
    task, feats = data.task, dict(split.fit_feats)
    fit_p = {"web": np.array([ps[n] for n in split.fit_names])}
    eval_p = {"web": np.array([ps[n] for n in split.eval_names])}
    # select_and_fit's steps (no nested CV): the same folds and search it runs.
    res = search(task, feats, make_folds(task, max(2, min(5, task.n_images // 2)), split.seed), seed=split.seed,
                 priors=fit_p, prior_mode="both", **kw)
    images = np.arange(task.n_images)
    rows = np.arange(task.size) if task.kind == "votes" else None

    def kind_of(c: Any) -> str:
        return "none" if not c.priors else "alone" if not c.members else "offset" if c.offset else "fusion"

    allowed = {"new": ("none",), **{r: ("none", "alone", *v) for r, v in PRIOR_VARIANTS.items()}}
    key = _split_key(split)
    for name, kinds in allowed.items():
        pool = [s for s in res.scored if kind_of(s.candidate) in kinds]
        best = pool[0]
        for s in pool[1:]:
            if np.isfinite(s.mean) and (not np.isfinite(best.mean) or s.mean > best.mean + 1e-12):
                best = s
        cand = best.candidate
        fitted = fit_candidate(task, feats, cand, images=images, vote_rows=rows, seed=split.seed, priors=fit_p)
        pf = fit_priors(task, fitted, cand, feats, fit_p, images)
        pred = predict_combined(fitted, pf, split.eval_feats, eval_p)
        _FROM_PRIOR[(name, *key)] = Prediction(pred, {"chosen": cand.label, "cv": best.mean})


def _prior_variant(name: str, split: Split) -> Prediction:
    key = (name, *_split_key(split))
    if key not in _FROM_PRIOR:
        _prior_search(split)
    return _FROM_PRIOR.pop(key)


@recipe("prior")
def prior(split: Split) -> Prediction:
    """tastelab.personal's whole search plus the prior by late fusion (stage 5: the prior alone, or the chosen
    candidate + c x the prior), chosen by CV over the training images."""
    return _prior_variant("prior", split)


@recipe("prior_offset")
def prior_offset(split: Split) -> Prediction:
    """The search plus the prior as an OFFSET (stage 5: the prior alone, or a linear head fitted on c x the
    prior as a fixed score, c and L2 by CV): residual learning, L2 towards the prior."""
    return _prior_variant("prior_offset", split)


@recipe("prior_both")
def prior_both(split: Split) -> Prediction:
    """The search with both kinds of stage-5 candidates (late fusion and offset fits), CV chooses."""
    return _prior_variant("prior_both", split)


@recipe("prior_only")
def prior_only(split: Split) -> Prediction:
    """The prior's own scores: what the generic model knows without any of the person's labels."""
    ps = _prior_scores(split.kind)
    return Prediction(np.array([ps[n] for n in split.eval_names]), {"chosen": "prior alone"})


@recipe("old")
def old(split: Split) -> Prediction:
    """The shipped YAML recipe through the Trainer; scores of the eval images from best/ (final/ if none)."""
    import torch

    from tastelab.features.extract import extract
    from tastelab.models.artifact import load_model_folder
    from tastelab.training.config import load_train_config
    from tastelab.training.trainer import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        if split.kind == "votes":
            assert split.fit_votes is not None
            cfg_path, extra = ROOT / "configs" / "personal_pairs_trainer.yaml", []
            labels = Path(tmp) / "votes.csv"
            with labels.open("w", newline="") as fh:
                w = csv.writer(fh)
                w.writerow(["image_a", "image_b", "votes_a", "votes_b"])
                for v in split.fit_votes:
                    w.writerow([v.image_a, v.image_b, v.votes_a, v.votes_b])
        else:
            assert split.fit_targets is not None
            cfg_path, extra = ROOT / "configs" / "web_aesthetics_trainer.yaml", ["data.score_range=[1, 9]"]
            labels = Path(tmp) / "labels.csv"
            labels.write_text("image,mean_rating\n" + "".join(
                f"{p},{float(y)!r}\n" for p, y in zip(split.fit_names, split.fit_targets, strict=True)))
        run = Path(tmp) / "run"
        cfg = load_train_config(cfg_path, [f"data.path={labels}", "data.image_root=/",
                                           "data.split={train: 0.85, val: 0.15}", f"seed={split.seed}", *extra])
        Trainer(cfg, run, resume="none", recipe_path=str(cfg_path)).fit()
        folder = run / "best" if (run / "best" / "config.json").is_file() else run / "final"
        model = load_model_folder(folder)
        fs = extract(model, list(split.eval_names), level="layers", cache_dir=cfg.train.cache_dir or _cache(),
                     workers=0)
        with torch.no_grad():
            return Prediction(model.head_on_cached(fs.features["orig"]).score.double().numpy())


# ------------------------------------------------------------------------------------------------------------
# Measuring


def _cache() -> Path:
    from tastelab.features.cache import default_cache_dir

    return default_cache_dir()


def _views() -> tuple[str, ...]:
    """Every view the personal search's view sets use (the probe reads the ``orig`` rows only)."""
    from tastelab.personal.select import VIEW_SETS

    return tuple(dict.fromkeys(v for vs in VIEW_SETS for v in vs))


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def measure(kind: str, pred: np.ndarray, target: Target) -> dict[str, float]:
    """The split's metrics for ``pred`` (one score per eval image); non-finite predictions are an error."""
    from scipy.stats import pearsonr

    from tastelab.personal.select import pair_accuracy

    if not np.isfinite(pred).all():
        raise FloatingPointError("a recipe returned non-finite scores")
    if kind == "votes":
        out = {"pair_acc": pair_accuracy(pred, target.pairs)}
        if target.truth is not None:
            out["srcc"] = _spearman(pred[target.truth_index], target.truth)
        return out
    assert target.truth is not None
    p = pred[target.truth_index]
    return {"srcc": _spearman(p, target.truth), "plcc": float(pearsonr(p, target.truth).statistic)}


def _vote_pairs(votes: Sequence[Any], names: Sequence[str]) -> Any:
    from tastelab.personal.fit import Pairs

    loc = {p: i for i, p in enumerate(names)}
    return Pairs(np.array([loc[v.image_a] for v in votes], dtype=np.int64),
                 np.array([loc[v.image_b] for v in votes], dtype=np.int64),
                 np.array([v.votes_a for v in votes]), np.array([v.votes_b for v in votes]))


def dev_folds(split: Split, k: int) -> list[tuple[Split, Target]]:
    """k inner folds over the split's TRAINING images (image_folds' vote rule). Each fold's recipe input holds
    only the fold's training images and votes; it scores every training-part image, measured on the votes
    touching a held-out image (votes) or the held-out images' scores (scores). No test page appears."""
    from tastelab.io.splits import image_folds

    names = split.fit_names
    folds = image_folds(names, k=k, seed=10_000 + split.seed, votes=split.fit_votes)
    out = []
    for f in folds:
        keep = set(f.train_images)
        rows = np.array([i for i, p in enumerate(names) if p in keep])
        fit = Split(split.kind, split.seed, split.size, [names[i] for i in rows],
                    {k2: x[rows] for k2, x in split.fit_feats.items()}, list(names), split.fit_feats,
                    score_range=split.score_range, dev=True)
        if split.kind == "votes":
            assert split.fit_votes is not None
            fit.fit_votes = [split.fit_votes[j] for j in f.train_votes]
            target = Target(pairs=_vote_pairs([split.fit_votes[j] for j in f.val_votes], names))
        else:
            assert split.fit_targets is not None
            fit.fit_targets = split.fit_targets[rows]
            held = np.array([i for i, p in enumerate(names) if p not in keep])
            target = Target(truth_index=held, truth=split.fit_targets[held])
        out.append((fit, target))
    return out


def run_split(split: Split, target: Target, names: Sequence[str], args: argparse.Namespace, log: Any,
              base: dict[str, Any]) -> list[dict[str, Any]]:
    """Every requested recipe on one split: test metrics, or (``--dev``) the mean over inner folds."""
    rows = []
    for name in names:
        t = time.perf_counter()
        row = {**base, "recipe": name}
        if args.dev:
            per = []
            for fold, ftarget in dev_folds(split, args.dev_folds):
                if split.kind == "votes" and not len(ftarget.pairs):
                    continue
                per.append(measure(split.kind, RECIPES[name](fold).scores, ftarget))
            for m in per[0] if per else ():
                vals = [p[m] for p in per if np.isfinite(p[m])]
                row[m] = float(np.mean(vals)) if vals else float("nan")
            row["dev_folds"] = len(per)
        else:
            pred = RECIPES[name](split)
            row.update(measure(split.kind, pred.scores, target))
            row.update(pred.info)
        row["seconds"] = time.perf_counter() - t
        rows.append(row)
        shown = " ".join(f"{m} {row[m]:.3f}" for m in _metrics(args, split.kind))
        log(f"{'dev ' if args.dev else ''}{split.kind} seed {split.seed} size {split.size:>5} {name:6s} {shown}"
            f"  {row['seconds']:.0f}s" + (f"  ({row['chosen']})" if "chosen" in row else ""))
    return rows


def curve(args: argparse.Namespace, log: Any, save: Any = None) -> dict[str, Any]:
    from tastelab.io.images import PreprocessConfig
    from tastelab.io.votes import load_votes
    from tastelab.pairwise.ratings import fit_ratings
    from tastelab.personal.features import DEFAULT_FEATURE_SETS, extract_feature_sets

    votes, _ = load_votes(DATA / "comparisons" / "votes.csv")
    images = sorted({v.image_a for v in votes} | {v.image_b for v in votes})
    index = {p: i for i, p in enumerate(images)}
    t = time.perf_counter()
    feats, _ = extract_feature_sets(DEFAULT_FEATURE_SETS, images, preprocess=PreprocessConfig(size=VOTES_SIZE),
                                    cache_dir=_cache(), workers=0, views=_views())
    log(f"features of {len(images)} pages, {len(feats)} sets: {time.perf_counter() - t:.1f}s")
    rows: list[dict[str, Any]] = []
    for seed in args.seeds:
        rng = np.random.default_rng(seed)  # split, then each size's subsample: same draws as sessions 4-5
        order = rng.permutation(len(images))
        test_i = np.sort(order[:30])
        test_set, train_set = set(test_i.tolist()), set(order[30:].tolist())
        test_votes = [v for v in votes if index[v.image_a] in test_set and index[v.image_b] in test_set]
        train_votes = [v for v in votes if index[v.image_a] in train_set and index[v.image_b] in train_set]
        test_names = [images[i] for i in test_i]
        truth = fit_ratings(test_votes, "bt")
        target = Target(pairs=_vote_pairs(test_votes, test_names), truth_index=np.arange(len(test_names)),
                        truth=np.array([truth.scores[n] for n in test_names]))
        for size in args.sizes:
            n = len(train_votes) if size == "all" else min(int(size), len(train_votes))
            sub = [train_votes[i] for i in np.sort(rng.permutation(len(train_votes))[:n])]
            names = sorted({v.image_a for v in sub} | {v.image_b for v in sub})
            rows_i = np.array([index[p] for p in names])
            split = Split("votes", seed, str(size), names, {k: x[rows_i] for k, x in feats.items()},
                          test_names, {k: x[test_i] for k, x in feats.items()}, fit_votes=sub)
            rows += run_split(split, target, args.recipes, args, log, {"seed": seed, "votes": n, "size": str(size)})
            if save is not None:  # partial results survive an interrupted run
                save({"rows": rows, "partial": True})
    return {"rows": rows, "summary": paired_gains(rows, _metrics(args, "votes"), "size", args.baseline),
            "test_votes_note": "votes between two unseen test pages; truth = BT ratings from all of them"}


def ratings(args: argparse.Namespace, log: Any, save: Any = None) -> dict[str, Any]:
    from tastelab.io.images import PreprocessConfig
    from tastelab.io.records import load_records
    from tastelab.personal.features import DEFAULT_FEATURE_SETS, extract_feature_sets

    rs = load_records(DATA / "ratings" / "labels.csv")
    paths = [r.path for r in rs.records]
    y = np.array([r.score for r in rs.records], dtype=np.float64)
    feats, _ = extract_feature_sets(DEFAULT_FEATURE_SETS, paths, preprocess=PreprocessConfig(size=RATINGS_SIZE),
                                    cache_dir=_cache(), workers=0, views=_views())
    rows: list[dict[str, Any]] = []
    for seed in args.seeds:
        order = np.random.default_rng(seed).permutation(len(paths))
        n_test = int(round(0.3 * len(paths)))
        test_i, train_i = np.sort(order[:n_test]), np.sort(order[n_test:])
        split = Split("scores", seed, "70/30", [paths[i] for i in train_i], {k: x[train_i] for k, x in feats.items()},
                      [paths[i] for i in test_i], {k: x[test_i] for k, x in feats.items()}, fit_targets=y[train_i],
                      score_range=tuple(rs.score_range))  # type: ignore[arg-type]
        target = Target(truth_index=np.arange(len(test_i)), truth=y[test_i])
        rows += run_split(split, target, args.recipes, args, log, {"seed": seed, "split": "70/30", "size": "70/30"})
        if save is not None:
            save({"rows": rows, "partial": True})
    return {"rows": rows, "summary": paired_gains(rows, _metrics(args, "scores"), "split", args.baseline)}


def _metrics(args: Any, kind: str) -> tuple[str, ...]:
    return (DEV_METRICS if args.dev else METRICS)[kind]


def print_summary(out: dict[str, Any], baseline: str | None = None) -> None:
    for part, kind in (("curve", "votes"), ("ratings", "scores")):
        if part not in out:
            continue
        metrics = (DEV_METRICS if out.get("dev") else METRICS)[kind]
        print(f"\n{part}{' (dev: inner CV on the training part, no test pages)' if out.get('dev') else ''}: "
              f"mean over seeds; gain = recipe - {baseline or out.get('baseline', BASELINE)} on the same split, "
              "95% bootstrap CI, wins/seeds")
        for key, entry in out[part]["summary"].items():
            for name, e in entry.items():
                text = " | ".join(f"{m} {e[m]:.3f}" for m in metrics)
                for m in metrics:
                    g = e.get(f"gain_{m}")
                    if g and g["n"]:
                        text += (f" | {m} gain {g['mean']:+.3f} [{g['ci95'][0]:+.3f}, {g['ci95'][1]:+.3f}] "
                                 f"{g['wins']}/{g['n']}{' CLEAR' if g['clear'] else ''}")
                print(f"{key:>5} {name:6s} {text}")


def _write(path: str, payload: dict[str, Any]) -> None:
    """Atomic JSON write (temp file + rename): an interrupted run never leaves half a file."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, p)


def tables(out: dict[str, Any]) -> str:
    parts = []
    table = DEV_METRICS if out.get("dev") else METRICS
    for part, kind, label in (("curve", "votes", "train votes"), ("ratings", "scores", "ratings split")):
        if part not in out:
            continue
        parts.append(markdown_table(out[part], table[kind], label, out.get("baseline", BASELINE)))
        for key in out[part]:  # the secondary pairings (summary_vs_probe_all, summary_vs_new)
            if key.startswith("summary_vs_"):
                parts.append(markdown_table(out[part], table[kind], label, key[len("summary_vs_"):], key))
    return "\n\n".join(parts)


def merge(paths: Sequence[str], baseline: str | None = None) -> dict[str, Any]:
    """Runs of the same protocol (e.g. seeds split over processes) as one result: rows concatenated per part
    (a (seed, size, recipe) row twice is an error), summaries recomputed with ``baseline`` (default: the
    runs' own, which must agree), the commands kept."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    base = baseline or runs[0].get("baseline", BASELINE)
    dev = bool(runs[0].get("dev"))
    if any(bool(r.get("dev")) != dev for r in runs):
        raise ValueError("--merge: dev and test runs cannot be merged")
    out: dict[str, Any] = {"merged_from": list(paths), "commands": [r.get("command") for r in runs],
                           "baseline": base, "dev": dev, "machine": runs[0].get("machine"),
                           "seconds": sum(float(r.get("seconds", 0.0)) for r in runs)}
    if any("priors" in r for r in runs):
        out["priors"] = next(r["priors"] for r in runs if "priors" in r)
    for part, kind, by in (("curve", "votes", "size"), ("ratings", "scores", "split")):
        rows = [row for r in runs if part in r for row in r[part]["rows"]]
        if not rows:
            continue
        keys = [(row["seed"], row[by], row["recipe"]) for row in rows]
        if len(set(keys)) != len(keys):
            raise ValueError(f"--merge: {part} has the same (seed, {by}, recipe) row twice")
        metrics = (DEV_METRICS if dev else METRICS)[kind]
        out[part] = {"rows": rows, "summary": paired_gains(rows, metrics, by, base)}
        names = {row["recipe"] for row in rows}
        for other in ("probe", "probe_all", "new"):
            if other in names and other != base:
                out[part][f"summary_vs_{other}"] = paired_gains(rows, metrics, by, baseline=other)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2,3,4,5")
    ap.add_argument("--sizes", default="100,200,400,all")
    ap.add_argument("--part", choices=("curve", "ratings", "all"), default="all")
    ap.add_argument("--recipes", default=",".join(DEFAULT_RECIPES),
                    help="comma list of registered recipes; the --baseline recipe is always added")
    ap.add_argument("--baseline", default=BASELINE,
                    help=f"the recipe every other is paired against in 'summary' (default {BASELINE}); probe_all "
                         "and new, when run, also get their own pairing (summary_vs_probe_all, summary_vs_new)")
    ap.add_argument("--plugin", action="append", default=[],
                    help="import this module first (it may add to RECIPES); repeatable")
    ap.add_argument("--dev", action="store_true",
                    help="only inner-CV estimates on each split's training part (no test numbers)")
    ap.add_argument("--dev-folds", type=int, default=3)
    ap.add_argument("--prior-weights", default=None,
                    help="comma list of prior weights c for the prior recipe (default: the personal package's)")
    ap.add_argument("--vs", default="",
                    help="comma list of recipes to pair against as well (JSON summary_vs_NAME, printed)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--table", action="store_true", help="only print the Markdown tables of an existing --json")
    ap.add_argument("--merge", default=None, help="comma list of result JSONs of one protocol (e.g. seeds run in "
                    "separate processes): merged into --json, summaries recomputed (with --baseline), tables printed")
    ap.add_argument("--json", default=None, help="default bench/results/personal_learning_curve[_dev].json")
    args = ap.parse_args()
    if args.json is None:
        args.json = str(ROOT / "bench" / "results" / f"personal_learning_curve{'_dev' if args.dev else ''}.json")
    if args.table:
        print(tables(json.loads(Path(args.json).read_text())))
        return 0
    if args.merge:
        merged = merge([p for p in args.merge.split(",") if p], args.baseline)
        _write(args.json, merged)
        print(tables(merged))
        return 0
    sys.modules.setdefault("personal_learning_curve", sys.modules[__name__])  # plugins import this registry
    for mod in args.plugin:
        importlib.import_module(mod)
    global PRIOR_GRID
    PRIOR_GRID = [float(c) for c in args.prior_weights.split(",")] if args.prior_weights else None
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.sizes = args.sizes.split(",")
    wanted = [r for r in args.recipes.split(",") if r]
    args.recipes = list(dict.fromkeys([args.baseline, *wanted]))
    unknown = [r for r in args.recipes if r not in RECIPES]
    if unknown:
        print(f"--recipes: unknown {unknown}; registered: {sorted(RECIPES)}", file=sys.stderr)
        return 2
    if args.dev_folds < 2:
        print("--dev-folds: need at least 2", file=sys.stderr)
        return 2
    import torch

    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    if not DATA.is_dir():
        print(f"shared data not found: {DATA}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    out: dict[str, Any] = {"machine": platform.platform(), "python": platform.python_version(),
                           "torch_threads": args.threads, "seeds": args.seeds, "recipes": args.recipes,
                           "baseline": args.baseline, "dev": args.dev,
                           "command": "PYTHONPATH=src OPENBLAS_NUM_THREADS=1 python bench/personal_learning_curve.py "
                                      + " ".join(sys.argv[1:])}
    if args.dev:
        out["dev_folds"] = args.dev_folds
    if args.part in ("curve", "all"):
        out["curve"] = curve(args, print, lambda part: _write(args.json, {**out, "curve": part}))
    if args.part in ("ratings", "all"):
        out["ratings"] = ratings(args, print, lambda part: _write(args.json, {**out, "ratings": part}))
    for part, kind in (("curve", "votes"), ("ratings", "scores")):
        extra = [r for r in args.vs.split(",") if r]
        for other in dict.fromkeys(("probe", "probe_all", "new", *extra)):
            if part in out and other in args.recipes and other != args.baseline:
                by = "size" if part == "curve" else "split"
                out[part][f"summary_vs_{other}"] = paired_gains(out[part]["rows"], _metrics(args, kind), by,
                                                                baseline=other)
    if PRIOR_INFO:
        out["priors"] = {**PRIOR_INFO, "grid": PRIOR_GRID, "licence": "ratings CC BY-NC-SA: bench only"}
    out["seconds"] = time.perf_counter() - t0
    _write(args.json, out)
    print_summary(out)
    for part in ("curve", "ratings"):
        for key in [k for k in out.get(part, {}) if k.startswith("summary_vs_")]:
            print_summary({part: {"summary": out[part][key]}, "dev": out.get("dev")}, key[len("summary_vs_"):])
    print(f"wrote {args.json} ({out['seconds']:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
