"""Choose a trainer recipe's settings on the TRAINING part of the learning-curve bench's splits only (issue 14).

    PYTHONPATH=src OPENBLAS_NUM_THREADS=1 python bench/recipe_inner_cv.py --part votes|ratings
        [--seeds 0,1] [--folds 3] [--set KEY=VALUE ...] [--tag NAME] [--json bench/results/recipe_inner_cv.json]

Per seed, bench/personal_learning_curve.py's 70/30 split by image is made and its 30% test part is dropped
unseen. The 70% training part is cut into ``--folds`` folds BY IMAGE; per fold the recipe
(configs/personal_pairs_trainer.yaml or configs/web_aesthetics_trainer.yaml, with ``--set`` overrides) trains
through the Trainer on the other folds (exactly as the bench trains it: ``_old_scores``) and the linear probe is
fitted on the same images; both are scored on the held-out fold (votes: pair accuracy on the votes between two held-out
pages; ratings: SRCC). Prints and appends the paired difference recipe - probe per fold, so settings are
compared without ever touching a test page. ``--test`` (once a recipe is fixed): the same recipe-vs-probe
measurement on the bench's own train/test split per seed (the bench's ``old`` and ``probe`` rows, without its
costlier ``new`` selection).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from personal_learning_curve import DATA, ROOT, SIZE, _cache, _old_scores, _spearman


def _folds(n: int, k: int, seed: int) -> list[np.ndarray]:
    order = np.random.default_rng(1000 + seed).permutation(n)
    return [np.sort(order[i::k]) for i in range(k)]


def _splits(n_images: int, n_test: int, seed: int, args: argparse.Namespace) -> list[tuple[np.ndarray, np.ndarray]]:
    """(fit images, held-out images) per fold: inner folds of the bench split's training part, or with
    ``--test`` the bench split itself (train part, test part), exactly as bench/personal_learning_curve.py."""
    order = np.random.default_rng(seed).permutation(n_images)
    test_i, train_i = np.sort(order[:n_test]), np.sort(order[n_test:])
    if args.test:
        return [(train_i, test_i)]
    return [(np.setdiff1d(train_i, train_i[held]), train_i[held]) for held in _folds(len(train_i), args.folds, seed)]


def paired_summary(d: np.ndarray, n_boot: int = 10000) -> dict[str, Any]:
    """The team's "clearly" test for paired gains (recipe - probe, one per seed): mean, how many are positive,
    and a 95% percentile bootstrap CI of the mean over seeds (seeded, so reruns print the same interval)."""
    means = np.random.default_rng(0).choice(d, size=(n_boot, len(d)), replace=True).mean(1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return {"mean": float(d.mean()), "positive": int((d > 0).sum()), "n": len(d), "ci95": [float(lo), float(hi)],
            "clearly": bool((d > 0).sum() >= len(d) - 1 and lo > 0)}


def votes_part(args: argparse.Namespace, log: Any) -> list[dict[str, Any]]:
    from tastelab.io.images import PreprocessConfig
    from tastelab.io.votes import load_votes
    from tastelab.personal.api import select_and_fit
    from tastelab.personal.data import Labels
    from tastelab.personal.features import extract_feature_sets, parse_feature_set
    from tastelab.personal.fit import Pairs
    from tastelab.personal.select import Task, pair_accuracy, predict_fitted

    votes, _ = load_votes(DATA / "comparisons" / "votes.csv")
    images = sorted({v.image_a for v in votes} | {v.image_b for v in votes})
    index = {p: i for i, p in enumerate(images)}
    probe_set = parse_feature_set("mobilenet_v2[6,13,17,18]/meanstd")
    feats, _ = extract_feature_sets([probe_set], images, preprocess=PreprocessConfig(size=SIZE),
                                    cache_dir=_cache(), workers=0)
    x = feats[probe_set.name]
    rows = []
    for seed in args.seeds:
        for f, (fit_i, held_i) in enumerate(_splits(len(images), 30, seed, args)):
            val_set, fit_set = set(held_i.tolist()), set(fit_i.tolist())
            vv = [v for v in votes if index[v.image_a] in val_set and index[v.image_b] in val_set]
            tv = [v for v in votes if index[v.image_a] in fit_set and index[v.image_b] in fit_set]
            val_names = sorted({images[i] for i in val_set})
            vloc = {p: j for j, p in enumerate(val_names)}
            vpairs = Pairs(np.array([vloc[v.image_a] for v in vv]), np.array([vloc[v.image_b] for v in vv]),
                           np.array([v.votes_a for v in vv]), np.array([v.votes_b for v in vv]))
            names = sorted({v.image_a for v in tv} | {v.image_b for v in tv})
            loc = {p: i for i, p in enumerate(names)}
            pairs = Pairs(np.array([loc[v.image_a] for v in tv]), np.array([loc[v.image_b] for v in tv]),
                          np.array([v.votes_a for v in tv]), np.array([v.votes_b for v in tv]))
            data = Labels(Path("votes.csv"), "votes", names, Task("votes", len(names), pairs=pairs), None)
            probe = select_and_fit(data, {probe_set.name: x[[index[p] for p in names]]}, nested=False, seed=seed,
                                   mlp_feature_sets=0, max_ensemble=1)
            p_probe = predict_fitted(probe.fitted, {probe_set.name: x[[index[p] for p in val_names]]})
            t = time.perf_counter()
            with tempfile.TemporaryDirectory() as tmp:
                lab = Path(tmp) / "votes.csv"
                with lab.open("w", newline="") as fh:
                    w = csv.writer(fh)
                    w.writerow(["image_a", "image_b", "votes_a", "votes_b"])
                    for v in tv:
                        w.writerow([v.image_a, v.image_b, v.votes_a, v.votes_b])
                p_rec = _old_scores(ROOT / "configs" / "personal_pairs_trainer.yaml", lab, Path("/"), val_names,
                                    Path(tmp) / "run", [f"seed={seed}", *args.set])
            row = {"seed": seed, "fold": f, "recipe": pair_accuracy(p_rec, vpairs),
                   "probe": pair_accuracy(p_probe, vpairs), "seconds": time.perf_counter() - t}
            rows.append(row)
            log(f"votes seed {seed} fold {f}: recipe {row['recipe']:.3f} probe {row['probe']:.3f} "
                f"diff {row['recipe'] - row['probe']:+.3f} ({row['seconds']:.0f}s)")
    return rows


def ratings_part(args: argparse.Namespace, log: Any) -> list[dict[str, Any]]:
    from tastelab.io.images import PreprocessConfig
    from tastelab.io.records import load_records
    from tastelab.personal.api import select_and_fit
    from tastelab.personal.data import Labels
    from tastelab.personal.features import extract_feature_sets, parse_feature_set
    from tastelab.personal.select import Task, predict_fitted

    labels = DATA / "ratings" / "labels.csv"
    rs = load_records(labels)
    paths = [r.path for r in rs.records]
    y = np.array([r.score for r in rs.records], dtype=np.float64)
    probe_set = parse_feature_set("mobilenet_v2[6,13,17,18]/meanstd")
    feats, _ = extract_feature_sets([probe_set], paths, preprocess=PreprocessConfig(size=256),
                                    cache_dir=_cache(), workers=0)
    x = feats[probe_set.name]
    rows = []
    for seed in args.seeds:
        for f, (fit_i, val_i) in enumerate(_splits(len(paths), int(round(0.3 * len(paths))), seed, args)):
            data = Labels(labels, "scores", [paths[i] for i in fit_i], Task("scores", len(fit_i), targets=y[fit_i]),
                          tuple(rs.score_range))  # type: ignore[arg-type]
            probe = select_and_fit(data, {probe_set.name: x[fit_i]}, nested=False, seed=seed,
                                   mlp_feature_sets=0, max_ensemble=1)
            p_probe = predict_fitted(probe.fitted, {probe_set.name: x[val_i]})
            t = time.perf_counter()
            with tempfile.TemporaryDirectory() as tmp:
                lab = Path(tmp) / "labels.csv"
                lab.write_text("image,mean_rating\n" + "".join(f"{paths[i]},{float(y[i])!r}\n" for i in fit_i))
                p_rec = _old_scores(ROOT / "configs" / "web_aesthetics_trainer.yaml", lab, Path("/"),
                                    [paths[i] for i in val_i], Path(tmp) / "run",
                                    [f"seed={seed}", "data.score_range=[1, 9]", *args.set])
            row = {"seed": seed, "fold": f, "recipe": _spearman(p_rec, y[val_i]),
                   "probe": _spearman(p_probe, y[val_i]), "seconds": time.perf_counter() - t}
            rows.append(row)
            log(f"ratings seed {seed} fold {f}: recipe {row['recipe']:.3f} probe {row['probe']:.3f} "
                f"diff {row['recipe'] - row['probe']:+.3f} ({row['seconds']:.0f}s)")
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("votes", "ratings"), required=True)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--folds", type=int, default=3)
    ap.add_argument("--set", action="append", default=[], help="recipe override KEY=VALUE (repeatable)")
    ap.add_argument("--tag", default="")
    ap.add_argument("--test", action="store_true",
                    help="measure on the bench's TEST part (train on its whole training part): run once, when fixed")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=str(ROOT / "bench" / "results" / "recipe_inner_cv.json"))
    args = ap.parse_args()
    args.seeds = [int(s) for s in args.seeds.split(",")]
    import logging

    import torch

    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    rows = (votes_part if args.part == "votes" else ratings_part)(args, print)
    d = np.array([r["recipe"] - r["probe"] for r in rows])
    summary = {"part": args.part, "tag": args.tag, "test": args.test, "set": args.set, "seeds": args.seeds,
               "folds": 1 if args.test else args.folds,
               "recipe": float(np.mean([r["recipe"] for r in rows])),
               "probe": float(np.mean([r["probe"] for r in rows])), "diff": float(d.mean()),
               "diff_se": float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan"), "rows": rows}
    print(f"{args.part} {args.tag or args.set}: recipe {summary['recipe']:.3f} probe {summary['probe']:.3f} "
          f"diff {summary['diff']:+.3f} +- {summary['diff_se']:.3f}")
    if args.test:
        summary["paired"] = paired_summary(d)
        p = summary["paired"]
        print(f"paired gains per seed {np.round(d, 3).tolist()}: mean {p['mean']:+.3f}, {p['positive']}/{p['n']} "
              f"positive, 95% bootstrap CI [{p['ci95'][0]:+.3f}, {p['ci95'][1]:+.3f}], clearly: {p['clearly']}")
    path = Path(args.json)
    runs = json.loads(path.read_text()) if path.is_file() else []
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([*runs, summary], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
