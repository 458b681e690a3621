"""Do global image statistics help the personal-taste selection? (issue 14, helper s14c)

    PYTHONPATH=src OPENBLAS_NUM_THREADS=1 python bench/personal_statistics_features.py --part dev-ratings \
        [--seeds 0,1] [--json bench/results/personal_statistics_dev.json]
    ... --part test --seeds 0,1,2,3,4,5 --json bench/results/personal_statistics_test.json

Same data and splits as bench/personal_learning_curve.py (votes: 100 web pages, 70 train / 30 unseen test pages,
all train votes; ratings: 300 pages, 70/30), features of the same sizes (320 px votes, 256 px ratings).

- ``dev-ratings`` / ``dev-votes``: development only. On each split's TRAIN part, the nested-CV estimate
  (:func:`tastelab.personal.select.nested_estimate`: the whole search repeated inside each outer fold's training
  images) of the selection over the default candidates (MobileNetV2 + EfficientNet-Lite0), with the statistics
  sets added, and over the statistics sets alone (``--concat``: instead the default candidates plus the two
  richest CNN sets with the statistics columns appended). No test page is read.
- ``test``: the measurement, run once with the method fixed. Per seed: ``probe`` (linear head on
  mobilenet_v2[6,13,17,18]/meanstd, L2 by CV), ``new`` (default candidates) and ``new_stats`` (default + the
  statistics sets), fitted on the train part and scored on the unseen part; paired gains per seed, their mean,
  a 95% bootstrap CI over seeds and how many seeds are positive.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "web-aesthetics"
VOTES_SIZE, RATINGS_SIZE = 320, 256  # the personal_pairs and web_aesthetics recipes' input sizes
PROBE = "mobilenet_v2[6,13,17,18]/meanstd"


def _cache() -> Path:
    from tastelab.features.cache import default_cache_dir

    return default_cache_dir()


def _feature_sets() -> tuple[Any, Any]:
    from tastelab.personal.features import DEFAULT_FEATURE_SETS, STATISTICS_FEATURE_SETS

    return DEFAULT_FEATURE_SETS, STATISTICS_FEATURE_SETS


def load_votes_data() -> tuple[list[str], list[Any], Any]:
    from tastelab.io.images import PreprocessConfig
    from tastelab.io.votes import load_votes
    from tastelab.personal.features import extract_feature_sets

    votes, _ = load_votes(DATA / "comparisons" / "votes.csv")
    images = sorted({v.image_a for v in votes} | {v.image_b for v in votes})
    default, stats = _feature_sets()
    feats, errors = extract_feature_sets(default + stats, images, preprocess=PreprocessConfig(size=VOTES_SIZE),
                                         cache_dir=_cache(), workers=0)
    assert not errors, errors
    return images, votes, feats


def votes_split(images: list[str], votes: list[Any], feats: dict[str, Any], seed: int) -> dict[str, Any]:
    """The learning-curve bench's split: 30 test pages first in a seeded permutation; train votes = votes
    between two train pages, test votes = votes between two test pages."""
    from tastelab.pairwise.ratings import fit_ratings
    from tastelab.personal.data import Labels
    from tastelab.personal.fit import Pairs
    from tastelab.personal.select import Task

    index = {p: i for i, p in enumerate(images)}
    order = np.random.default_rng(seed).permutation(len(images))
    test_i, train_i = np.sort(order[:30]), np.sort(order[30:])
    test_set, train_set = set(test_i.tolist()), set(train_i.tolist())
    test_votes = [v for v in votes if index[v.image_a] in test_set and index[v.image_b] in test_set]
    train_votes = [v for v in votes if index[v.image_a] in train_set and index[v.image_b] in train_set]
    names = sorted({v.image_a for v in train_votes} | {v.image_b for v in train_votes})
    loc = {p: i for i, p in enumerate(names)}
    pairs = Pairs(np.array([loc[v.image_a] for v in train_votes]), np.array([loc[v.image_b] for v in train_votes]),
                  np.array([v.votes_a for v in train_votes]), np.array([v.votes_b for v in train_votes]))
    rows_i = np.array([index[p] for p in names])
    tloc = {images[i]: j for j, i in enumerate(test_i)}
    tpairs = Pairs(np.array([tloc[v.image_a] for v in test_votes]), np.array([tloc[v.image_b] for v in test_votes]),
                   np.array([v.votes_a for v in test_votes]), np.array([v.votes_b for v in test_votes]))
    truth = fit_ratings(test_votes, "bt")
    return {"data": Labels(Path("votes.csv"), "votes", names, Task("votes", len(names), pairs=pairs), None),
            "train": {k: x[rows_i] for k, x in feats.items()}, "test": {k: x[test_i] for k, x in feats.items()},
            "test_pairs": tpairs, "truth": np.array([truth.scores[images[i]] for i in test_i])}


def load_ratings_data() -> tuple[list[str], np.ndarray, dict[str, Any], Any]:
    from tastelab.io.images import PreprocessConfig
    from tastelab.io.records import load_records
    from tastelab.personal.features import extract_feature_sets

    labels = DATA / "ratings" / "labels.csv"
    rs = load_records(labels)
    paths = [r.path for r in rs.records]
    y = np.array([r.score for r in rs.records], dtype=np.float64)
    default, stats = _feature_sets()
    feats, errors = extract_feature_sets(default + stats, paths, preprocess=PreprocessConfig(size=RATINGS_SIZE),
                                         cache_dir=_cache(), workers=0)
    assert not errors, errors
    return paths, y, feats, rs


def ratings_split(paths: list[str], y: np.ndarray, feats: dict[str, Any], rs: Any, seed: int) -> dict[str, Any]:
    from tastelab.personal.data import Labels
    from tastelab.personal.select import Task

    order = np.random.default_rng(seed).permutation(len(paths))
    n_test = int(round(0.3 * len(paths)))
    test_i, train_i = np.sort(order[:n_test]), np.sort(order[n_test:])
    data = Labels(DATA / "ratings" / "labels.csv", "scores", [paths[i] for i in train_i],
                  Task("scores", len(train_i), targets=y[train_i]), tuple(rs.score_range))
    return {"data": data, "train": {k: x[train_i] for k, x in feats.items()},
            "test": {k: x[test_i] for k, x in feats.items()}, "y_test": y[test_i]}


#: ``--concat``: CNN sets with the statistics columns appended (a development probe of whether the statistics
#: add to the CNN features when one head weighs them together; not a saveable candidate: no backbone computes it).
CONCAT = ("mobilenet_v2[3,6,10,13,16,17,18]/meanstd", "efficientnet_lite0[3,5,8,11,15,16,17]/meanstd")


def _add_concat(feats: dict[str, Any]) -> list[str]:
    import torch

    names = []
    for base in CONCAT:
        name = f"{base}+statistics[0,1,2]/meanstd"
        feats[name] = torch.cat([feats[base], feats["statistics[0,1,2]/meanstd"]], dim=1)
        names.append(name)
    return names


def dev(kind: str, seeds: list[int], inner_k: int, log: Any, concat: bool = False) -> dict[str, Any]:
    """Nested-CV estimates on the training parts only (see the module docstring)."""
    from tastelab.personal.select import make_folds, nested_estimate

    default, stats = _feature_sets()
    conditions = {"default": [s.name for s in default], "default+statistics": [s.name for s in default + stats],
                  "statistics": [s.name for s in stats]}
    if kind == "votes":
        images, votes, feats = load_votes_data()
    else:
        paths, y, feats, rs = load_ratings_data()
    if concat:
        conditions = {"default+concatenated": [s.name for s in default] + _add_concat(feats)}
    rows = []
    for seed in seeds:
        sp = votes_split(images, votes, feats, seed) if kind == "votes" else ratings_split(paths, y, feats, rs, seed)
        task = sp["data"].task
        outer = make_folds(task, 5, seed)
        for cond, names in conditions.items():
            t = time.perf_counter()
            value, per, chosen = nested_estimate(task, {n: sp["train"][n] for n in names}, outer, inner_k=inner_k,
                                                 seed=seed)
            rows.append({"seed": seed, "condition": cond, task.metric: value, "folds": per, "chosen": chosen,
                         "seconds": time.perf_counter() - t})
            log(f"dev {kind} seed {seed} {cond:20s} nested {task.metric} {value:.4f} ({time.perf_counter() - t:.0f}s)"
                f"  chose {chosen}")
    return {"rows": rows, "inner_k": inner_k, "outer_k": 5}


def _bootstrap_ci(values: np.ndarray, n: int = 10000, seed: int = 0) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(n, len(values)))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def _gains(rows: list[dict[str, Any]], metric: str, recipe: str, base: str) -> dict[str, Any]:
    by = {(r["seed"], r["recipe"]): r[metric] for r in rows}
    seeds = sorted({r["seed"] for r in rows})
    g = np.array([by[(s, recipe)] - by[(s, base)] for s in seeds])
    lo, hi = _bootstrap_ci(g)
    return {"per_seed": dict(zip(map(str, seeds), g.tolist())), "mean": float(g.mean()), "ci95": [lo, hi],
            "positive": int((g > 0).sum()), "seeds": len(seeds)}


def test(seeds: list[int], log: Any, save: Any) -> dict[str, Any]:
    """The once-run measurement on unseen pages (see the module docstring)."""
    from scipy.stats import pearsonr, spearmanr

    from tastelab.personal.api import select_and_fit
    from tastelab.personal.select import pair_accuracy, predict_fitted

    default, stats = _feature_sets()
    recipes = {"new": [s.name for s in default], "new_stats": [s.name for s in default + stats]}
    out: dict[str, Any] = {}
    for kind in ("ratings", "votes"):
        if kind == "votes":
            images, votes, feats = load_votes_data()
        else:
            paths, y, feats, rs = load_ratings_data()
        rows = []
        for seed in seeds:
            sp = votes_split(images, votes, feats, seed) if kind == "votes" else ratings_split(paths, y, feats, rs,
                                                                                              seed)
            preds, chosen = {}, {}
            probe = select_and_fit(sp["data"], {PROBE: sp["train"][PROBE]}, nested=False, seed=seed,
                                   mlp_feature_sets=0, max_ensemble=1)
            preds["probe"] = predict_fitted(probe.fitted, {PROBE: sp["test"][PROBE]})
            chosen["probe"] = probe.chosen
            for recipe, names in recipes.items():
                res = select_and_fit(sp["data"], {n: sp["train"][n] for n in names}, nested=False, seed=seed)
                preds[recipe], chosen[recipe] = predict_fitted(res.fitted, sp["test"]), res.chosen
            for recipe, pred in preds.items():
                row: dict[str, Any] = {"seed": seed, "recipe": recipe, "chosen": chosen[recipe]}
                if kind == "votes":
                    row.update(pair_acc=pair_accuracy(pred, sp["test_pairs"]),
                               srcc=float(spearmanr(pred, sp["truth"]).statistic))
                else:
                    row.update(srcc=float(spearmanr(pred, sp["y_test"]).statistic),
                               plcc=float(pearsonr(pred, sp["y_test"]).statistic))
                rows.append(row)
                log(f"test {kind} seed {seed} {recipe:9s} " + " ".join(
                    f"{m} {row[m]:.3f}" for m in ("pair_acc", "srcc", "plcc") if m in row) + f"  ({chosen[recipe]})")
            out[kind] = {"rows": rows}
            save(out)
        metrics = ("pair_acc", "srcc") if kind == "votes" else ("srcc", "plcc")
        out[kind]["gains"] = {f"{a}_minus_{b}_{m}": _gains(rows, m, a, b) for m in metrics
                              for a, b in (("new_stats", "probe"), ("new", "probe"), ("new_stats", "new"))}
        save(out)
    return out


def _write(path: str, payload: dict[str, Any]) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    tmp.replace(p)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("dev-ratings", "dev-votes", "test"), required=True)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--inner-k", type=int, default=5, help="inner folds of the nested estimate (dev parts)")
    ap.add_argument("--concat", action="store_true", help="dev parts: only the default + CNN-with-statistics "
                    "concatenated sets (see CONCAT)")
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    import torch

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    if not DATA.is_dir():
        print(f"shared data not found: {DATA}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    head = {"machine": platform.platform(), "python": platform.python_version(), "torch_threads": 1, "seeds": seeds,
            "part": args.part}
    if args.part == "test":
        result = test(seeds, print, lambda part: _write(args.json, {**head, "partial": True, **part}))
        for kind, part in result.items():
            for name, g in part["gains"].items():
                print(f"{kind} {name}: mean {g['mean']:+.4f} CI95 [{g['ci95'][0]:+.4f}, {g['ci95'][1]:+.4f}] "
                      f"positive {g['positive']}/{g['seeds']}  per seed "
                      + " ".join(f"{v:+.3f}" for v in g["per_seed"].values()))
    else:
        result = dev(args.part.removeprefix("dev-"), seeds, args.inner_k, print, args.concat)
    _write(args.json, {**head, **result, "seconds": time.perf_counter() - t0})
    print(f"wrote {args.json} ({time.perf_counter() - t0:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
