"""Choosing the personal recipe's settings without looking at test pages: nested CV inside the TRAINING part.

    PYTHONPATH=src OPENBLAS_NUM_THREADS=1 python bench/personal_dev_cv.py [--seeds 0,1,2] [--sizes 100,400,all]
        [--part curve|ratings|all] [--configs probe_old,probe,new_noviews,new] [--json ...]

Same splits as bench/personal_learning_curve.py (same seeds, the same 30 unseen test pages / 30% test images,
the same train-vote subsamples for the same --sizes list), but the test part is dropped before anything
else: each config's number is a nested image-fold CV estimate on the training part only (outer image folds;
the config's whole search repeated on each outer fold's training images; the winner scored on the outer
fold's held-out images). Development decisions (grid, view sets) are made from these numbers; the test
measurement is bench/personal_learning_curve.py, run once when the method is fixed.

Configs (keyword arguments of tastelab.personal.select.search):

- ``probe_old``: the probe feature set, linear heads, the former grid (1e-4..10), no grid extension;
- ``probe``: the probe with the current grid (what the learning-curve bench's probe does);
- ``new_noviews``: the full search without multi-view candidates;
- ``new``: the full default search (view sets of tastelab.personal.select.VIEW_SETS);
- ``new_crop65``: the full search with a wider view set (adds central 65% crops).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "web-aesthetics"
PROBE = "mobilenet_v2[6,13,17,18]/meanstd"
ALL_VIEWS = ("orig", "hflip", "crop80", "crop80_hflip", "crop65", "crop65_hflip")


def configs() -> dict[str, tuple[bool, dict[str, Any]]]:
    """name -> (probe features only, search keywords)."""
    from tastelab.personal.select import VIEW_SETS

    wide = (*VIEW_SETS, ("orig", "hflip", "crop80", "crop80_hflip", "crop65", "crop65_hflip"))
    probe = {"mlp_feature_sets": 0, "max_ensemble": 1, "view_sets": ()}
    return {"probe_old": (True, {**probe, "linear_lams": (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0), "max_grid_extend": 0}),
            "probe": (True, probe),
            "new_noviews": (False, {"view_sets": ()}),
            "new": (False, {}),
            "new_crop65": (False, {"view_sets": wide})}


def estimate(task: Any, feats: dict[str, Any], names: list[str], seed: int, log: Any, tag: str) -> list[dict[str, Any]]:
    from tastelab.personal.select import make_folds, nested_estimate

    rows = []
    k = max(2, min(5, task.n_images // 2))
    outer = make_folds(task, k, seed)
    table = configs()
    for name in names:
        probe_only, kw = table[name]
        f = {PROBE: feats[PROBE]} if probe_only else feats
        t = time.perf_counter()
        mean, per, chosen = nested_estimate(task, f, outer, inner_k=k, seed=seed, **kw)
        rows.append({"config": name, "nested": mean, "folds": per, "chosen": chosen,
                     "seconds": time.perf_counter() - t})
        log(f"{tag} {name:12s} nested {task.metric} {mean:.4f}  ({time.perf_counter() - t:.0f}s) {chosen[:2]}")
    return rows


def curve(args: argparse.Namespace, log: Any) -> list[dict[str, Any]]:
    from tastelab.features.cache import default_cache_dir
    from tastelab.io.images import PreprocessConfig
    from tastelab.io.votes import load_votes
    from tastelab.personal.features import DEFAULT_FEATURE_SETS, extract_feature_sets
    from tastelab.personal.fit import Pairs
    from tastelab.personal.select import Task

    votes, _ = load_votes(DATA / "comparisons" / "votes.csv")
    images = sorted({v.image_a for v in votes} | {v.image_b for v in votes})
    index = {p: i for i, p in enumerate(images)}
    feats, _ = extract_feature_sets(DEFAULT_FEATURE_SETS, images, preprocess=PreprocessConfig(size=320),
                                    cache_dir=default_cache_dir(), workers=0, views=ALL_VIEWS)
    out = []
    for seed in args.seeds:
        rng = np.random.default_rng(seed)  # the learning-curve bench's draws, in its order
        order = rng.permutation(len(images))
        train_set = set(np.sort(order[30:]).tolist())
        train_votes = [v for v in votes if index[v.image_a] in train_set and index[v.image_b] in train_set]
        for size in args.sizes:
            n = len(train_votes) if size == "all" else min(int(size), len(train_votes))
            sub = [train_votes[i] for i in np.sort(rng.permutation(len(train_votes))[:n])]
            names = sorted({v.image_a for v in sub} | {v.image_b for v in sub})
            loc = {p: i for i, p in enumerate(names)}
            pairs = Pairs(np.array([loc[v.image_a] for v in sub]), np.array([loc[v.image_b] for v in sub]),
                          np.array([v.votes_a for v in sub], dtype=np.float64),
                          np.array([v.votes_b for v in sub], dtype=np.float64))
            rows_i = np.array([index[p] for p in names])
            task = Task("votes", len(names), pairs=pairs)
            for r in estimate(task, {k: x[rows_i] for k, x in feats.items()}, args.configs, seed, log,
                              f"votes seed {seed} size {size}"):
                out.append({"seed": seed, "size": size, "votes": n, **r})
    return out


def ratings(args: argparse.Namespace, log: Any) -> list[dict[str, Any]]:
    from tastelab.features.cache import default_cache_dir
    from tastelab.io.images import PreprocessConfig
    from tastelab.io.records import load_records
    from tastelab.personal.features import DEFAULT_FEATURE_SETS, extract_feature_sets
    from tastelab.personal.select import Task

    rs = load_records(DATA / "ratings" / "labels.csv")
    paths = [r.path for r in rs.records]
    y = np.array([r.score for r in rs.records], dtype=np.float64)
    feats, _ = extract_feature_sets(DEFAULT_FEATURE_SETS, paths, preprocess=PreprocessConfig(size=256),
                                    cache_dir=default_cache_dir(), workers=0, views=ALL_VIEWS)
    out = []
    for seed in args.seeds:
        order = np.random.default_rng(seed).permutation(len(paths))
        train_i = np.sort(order[int(round(0.3 * len(paths))):])
        task = Task("scores", len(train_i), targets=y[train_i])
        for r in estimate(task, {k: x[train_i] for k, x in feats.items()}, args.configs, seed, log,
                          f"ratings seed {seed}"):
            out.append({"seed": seed, **r})
    return out


def summary(rows: list[dict[str, Any]], by: str | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in dict.fromkeys(r.get(by, "-") if by else "-" for r in rows):
        sel = [r for r in rows if (r.get(by, "-") if by else "-") == key]
        base = {(r["seed"]): r["nested"] for r in sel if r["config"] == "probe"}
        entry = {}
        for c in dict.fromkeys(r["config"] for r in sel):
            vals = [r for r in sel if r["config"] == c]
            entry[c] = {"mean": float(np.mean([r["nested"] for r in vals])),
                        "minus_probe": [r["nested"] - base[r["seed"]] for r in vals if r["seed"] in base]}
        out[str(key)] = entry
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--sizes", default="100,400,all")
    ap.add_argument("--part", choices=("curve", "ratings", "all"), default="all")
    ap.add_argument("--configs", default="probe_old,probe,new_noviews,new")
    ap.add_argument("--json", default=str(ROOT / "bench" / "results" / "personal_dev_cv.json"))
    args = ap.parse_args()
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.sizes = args.sizes.split(",")
    args.configs = args.configs.split(",")
    unknown = set(args.configs) - set(configs())
    if unknown:
        print(f"--configs: unknown {sorted(unknown)}; known: {sorted(configs())}", file=sys.stderr)
        return 2
    import torch

    torch.set_num_threads(1)
    if not DATA.is_dir():
        print(f"shared data not found: {DATA}", file=sys.stderr)
        return 2
    out: dict[str, Any] = {"seeds": args.seeds, "configs": args.configs, "note": "nested CV on training parts only"}
    if args.part in ("curve", "all"):
        out["curve"] = curve(args, print)
        out["curve_summary"] = summary(out["curve"], "size")
    if args.part in ("ratings", "all"):
        out["ratings"] = ratings(args, print)
        out["ratings_summary"] = summary(out["ratings"], None)
    for part in ("curve_summary", "ratings_summary"):
        for key, entry in out.get(part, {}).items():
            print(part, key, {c: round(e["mean"], 4) for c, e in entry.items()})
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
