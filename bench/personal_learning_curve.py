"""Learning curves on unseen photos: the old personal recipe vs the new cross-validated selection (issue 14).

    PYTHONPATH=src OPENBLAS_NUM_THREADS=1 python bench/personal_learning_curve.py [--seeds 0,1,2]
        [--sizes 100,200,400,all] [--part curve|ratings|all] [--json bench/results/personal_learning_curve.json]

Part ``curve`` (votes): ../shared/data/web-aesthetics/comparisons (3,465 A/B records over 100 web pages). Per
seed, the pages are split BY IMAGE into 70 train pages and 30 unseen test pages; test votes are the votes
between two test pages; train votes are the votes between two train pages (votes across the split are unused),
subsampled (seeded) to each size. Measured on the unseen pages: pairwise accuracy on the test votes and
Spearman against Bradley-Terry ratings of the test pages from all their test votes.

- ``old``: configs/personal_pairs.yaml through the existing Trainer (its own split of the train votes into
  train/val pairs picks the epoch; its test fraction is moved to val), best/ scored on the test pages
  through the trainer's feature cache.
- ``probe``: a linear Bradley-Terry head on the old recipe's features (mobilenet_v2[6,13,17,18]/meanstd at
  320 px), L2 strength chosen by cross-validation over the train images.
- ``new``: tastelab.personal's selection (feature sets of MobileNetV2 and EfficientNet-Lite0 x view sets
  (multi-view training, test-time averaging) x heads x L2 x small ensembles, CV over train images).

Part ``ratings``: ../shared/data/web-aesthetics/ratings (300 pages, 1-9 means). Per seed a 70/30 split by
image: selection only on the 70% (the old recipe splits it again into train/val), test SRCC/PLCC once on the
30%. ``old`` = configs/web_aesthetics.yaml; ``probe`` = ridge on its features with L2 chosen by CV; ``new``
= the selection on scores.

No timing is asserted; wall times are printed. Model selection never sees a test page.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "web-aesthetics"
SIZE = 320  # the personal_pairs recipe's input size: old, probe and new read the same cached features


def _old_scores(recipe: Path, labels: Path, image_root: Path, test_paths: list[str], run: Path,
                extra: list[str]) -> np.ndarray:
    """Train the recipe on ``labels`` with the existing Trainer; scores of ``test_paths`` from best/."""
    import torch

    from tastelab.features.extract import extract
    from tastelab.models.artifact import load_model_folder
    from tastelab.training.config import load_train_config
    from tastelab.training.trainer import Trainer

    cfg = load_train_config(recipe, [f"data.path={labels}", f"data.image_root={image_root}",
                                     "data.split={train: 0.85, val: 0.15}", *extra])
    Trainer(cfg, run, resume="none", recipe_path=str(recipe)).fit()
    folder = run / "best" if (run / "best" / "config.json").is_file() else run / "final"
    model = load_model_folder(folder)
    fs = extract(model, test_paths, level="layers", cache_dir=cfg.train.cache_dir or _cache(), workers=0)
    with torch.no_grad():
        return model.head_on_cached(fs.features["orig"]).score.double().numpy()


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


def curve(args: argparse.Namespace, log: Any, save: Any = None) -> dict[str, Any]:
    from tastelab.io.images import PreprocessConfig
    from tastelab.io.votes import load_votes
    from tastelab.pairwise.ratings import fit_ratings
    from tastelab.personal.api import select_and_fit
    from tastelab.personal.data import Labels
    from tastelab.personal.features import DEFAULT_FEATURE_SETS, extract_feature_sets, parse_feature_set
    from tastelab.personal.fit import Pairs
    from tastelab.personal.select import Task, pair_accuracy, predict_fitted

    votes, _ = load_votes(DATA / "comparisons" / "votes.csv")
    images = sorted({v.image_a for v in votes} | {v.image_b for v in votes})
    index = {p: i for i, p in enumerate(images)}
    probe_set = parse_feature_set("mobilenet_v2[6,13,17,18]/meanstd")
    t = time.perf_counter()
    feats, _ = extract_feature_sets(DEFAULT_FEATURE_SETS, images, preprocess=PreprocessConfig(size=SIZE),
                                    cache_dir=_cache(), workers=0, views=_views())
    log(f"features of {len(images)} pages, {len(feats)} sets: {time.perf_counter() - t:.1f}s")
    rows = []
    for seed in args.seeds:
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(images))
        test_i, train_i = np.sort(order[:30]), np.sort(order[30:])
        test_set, train_set = set(test_i.tolist()), set(train_i.tolist())
        test_votes = [v for v in votes if index[v.image_a] in test_set and index[v.image_b] in test_set]
        train_votes = [v for v in votes if index[v.image_a] in train_set and index[v.image_b] in train_set]
        truth = fit_ratings(test_votes, "bt")
        test_names = [images[i] for i in test_i]
        truth_scores = np.array([truth.scores[n] for n in test_names])
        tloc = {images[i]: j for j, i in enumerate(test_i)}
        tpairs = Pairs(np.array([tloc[v.image_a] for v in test_votes]), np.array([tloc[v.image_b] for v in test_votes]),
                       np.array([v.votes_a for v in test_votes]), np.array([v.votes_b for v in test_votes]))
        for size in args.sizes:
            n = len(train_votes) if size == "all" else min(int(size), len(train_votes))
            sub = [train_votes[i] for i in np.sort(rng.permutation(len(train_votes))[:n])]
            names = sorted({v.image_a for v in sub} | {v.image_b for v in sub})
            loc = {p: i for i, p in enumerate(names)}
            pairs = Pairs(np.array([loc[v.image_a] for v in sub]), np.array([loc[v.image_b] for v in sub]),
                          np.array([v.votes_a for v in sub]), np.array([v.votes_b for v in sub]))
            rows_i = np.array([index[p] for p in names])
            train_feats = {k: x[rows_i] for k, x in feats.items()}
            test_feats = {k: x[test_i] for k, x in feats.items()}
            data = Labels(Path("votes.csv"), "votes", names, Task("votes", len(names), pairs=pairs), None)
            result: dict[str, np.ndarray] = {}
            t = time.perf_counter()
            res = select_and_fit(data, train_feats, nested=False, seed=seed)
            result["new"] = predict_fitted(res.fitted, test_feats)
            t_new = time.perf_counter() - t
            probe = select_and_fit(data, {probe_set.name: train_feats[probe_set.name]}, nested=False, seed=seed,
                                   mlp_feature_sets=0, max_ensemble=1)
            result["probe"] = predict_fitted(probe.fitted, {probe_set.name: test_feats[probe_set.name]})
            t = time.perf_counter()
            with tempfile.TemporaryDirectory() as tmp:
                lab = Path(tmp) / "votes.csv"
                with lab.open("w", newline="") as fh:
                    w = csv.writer(fh)
                    w.writerow(["image_a", "image_b", "votes_a", "votes_b"])
                    for v in sub:
                        w.writerow([v.image_a, v.image_b, v.votes_a, v.votes_b])
                result["old"] = _old_scores(ROOT / "configs" / "personal_pairs.yaml", lab, Path("/"),
                                            test_names, Path(tmp) / "run", [f"seed={seed}"])
            t_old = time.perf_counter() - t
            for recipe, pred in result.items():
                row = {"seed": seed, "votes": n, "size": str(size), "recipe": recipe,
                       "pair_acc": pair_accuracy(pred, tpairs), "srcc": _spearman(pred, truth_scores)}
                if recipe == "new":
                    row.update(chosen=res.chosen, cv=res.cv, seconds=t_new)
                if recipe == "old":
                    row["seconds"] = t_old
                rows.append(row)
                log(f"seed {seed} votes {n:5d} {recipe:5s} pair_acc {row['pair_acc']:.3f} srcc {row['srcc']:.3f}"
                    + (f"  ({res.chosen})" if recipe == "new" else ""))
            if save is not None:  # partial results survive an interrupted run
                save({"rows": rows, "partial": True})
    return {"rows": rows, "summary": _summary(rows, ("pair_acc", "srcc"), "size"),
            "test_votes_note": "votes between two unseen test pages; truth = BT ratings from all of them"}


def _summary(rows: list[dict[str, Any]], metrics: tuple[str, ...], by: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in dict.fromkeys(r[by] for r in rows):
        entry: dict[str, Any] = {}
        for recipe in ("old", "probe", "new"):
            sel = [r for r in rows if r[by] == key and r["recipe"] == recipe]
            entry[recipe] = {m: float(np.mean([r[m] for r in sel])) for m in metrics}
        for m in metrics:
            entry[f"new_minus_old_{m}"] = entry["new"][m] - entry["old"][m]
            entry[f"new_minus_probe_{m}"] = entry["new"][m] - entry["probe"][m]
        out[str(key)] = entry
    return out


def ratings(args: argparse.Namespace, log: Any) -> dict[str, Any]:
    from scipy.stats import pearsonr

    from tastelab.io.images import PreprocessConfig
    from tastelab.io.records import load_records
    from tastelab.personal.api import select_and_fit
    from tastelab.personal.data import Labels
    from tastelab.personal.features import DEFAULT_FEATURE_SETS, extract_feature_sets, parse_feature_set
    from tastelab.personal.select import Task, predict_fitted

    labels = DATA / "ratings" / "labels.csv"
    rs = load_records(labels)
    paths = [r.path for r in rs.records]
    y = np.array([r.score for r in rs.records], dtype=np.float64)
    size = 256  # the web_aesthetics recipe's input size
    feats, _ = extract_feature_sets(DEFAULT_FEATURE_SETS, paths, preprocess=PreprocessConfig(size=size),
                                    cache_dir=_cache(), workers=0, views=_views())
    probe_set = parse_feature_set("mobilenet_v2[6,13,17,18]/meanstd")
    rows = []
    for seed in args.seeds:
        order = np.random.default_rng(seed).permutation(len(paths))
        n_test = int(round(0.3 * len(paths)))
        test_i, train_i = np.sort(order[:n_test]), np.sort(order[n_test:])
        data = Labels(labels, "scores", [paths[i] for i in train_i], Task("scores", len(train_i), targets=y[train_i]),
                      tuple(rs.score_range))  # type: ignore[arg-type]
        tr = {k: x[train_i] for k, x in feats.items()}
        te = {k: x[test_i] for k, x in feats.items()}
        res = select_and_fit(data, tr, nested=False, seed=seed)
        probe = select_and_fit(data, {probe_set.name: tr[probe_set.name]}, nested=False, seed=seed,
                               mlp_feature_sets=0, max_ensemble=1)
        preds = {"new": predict_fitted(res.fitted, te),
                 "probe": predict_fitted(probe.fitted, {probe_set.name: te[probe_set.name]})}
        with tempfile.TemporaryDirectory() as tmp:
            lab = Path(tmp) / "labels.csv"
            lab.write_text("image,mean_rating\n" + "".join(f"{paths[i]},{float(y[i])!r}\n" for i in train_i))
            preds["old"] = _old_scores(ROOT / "configs" / "web_aesthetics.yaml", lab, Path("/"),
                                       [paths[i] for i in test_i], Path(tmp) / "run",
                                       [f"seed={seed}", "data.score_range=[1, 9]"])
        for recipe, pred in preds.items():
            row = {"seed": seed, "split": "70/30", "recipe": recipe, "srcc": _spearman(pred, y[test_i]),
                   "plcc": float(pearsonr(pred, y[test_i]).statistic)}
            if recipe == "new":
                row.update(chosen=res.chosen, cv=res.cv)
            rows.append(row)
            log(f"ratings seed {seed} {recipe:5s} srcc {row['srcc']:.3f} plcc {row['plcc']:.3f}"
                + (f"  ({res.chosen})" if recipe == "new" else ""))
    return {"rows": rows, "summary": _summary(rows, ("srcc", "plcc"), "split")}


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The curve as a Markdown table (mean over the seeds present per vote count), for README and docs."""
    lines = ["| train votes | seeds | old pair acc / SRCC | probe | new | new − old | new − probe |",
             "|---|---|---|---|---|---|---|"]
    for size in dict.fromkeys(r["size"] for r in rows):
        cell = {}
        for recipe in ("old", "probe", "new"):
            sel = [r for r in rows if r["size"] == size and r["recipe"] == recipe]
            cell[recipe] = (float(np.mean([r["pair_acc"] for r in sel])), float(np.mean([r["srcc"] for r in sel])),
                            len(sel))
        if min(c[2] for c in cell.values()) == 0:
            continue
        votes = int(np.mean([r["votes"] for r in rows if r["size"] == size]))
        fmt = {k: f"{v[0]:.3f} / {v[1]:.3f}" for k, v in cell.items()}
        lines.append(f"| {size} ({votes}) | {cell['new'][2]} | {fmt['old']} | {fmt['probe']} | {fmt['new']} | "
                     f"{cell['new'][0] - cell['old'][0]:+.3f} / {cell['new'][1] - cell['old'][1]:+.3f} | "
                     f"{cell['new'][0] - cell['probe'][0]:+.3f} / {cell['new'][1] - cell['probe'][1]:+.3f} |")
    return "\n".join(lines)


def _write(path: str, payload: dict[str, Any]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(payload, indent=2))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--sizes", default="100,200,400,all")
    ap.add_argument("--part", choices=("curve", "ratings", "all"), default="all")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--table", action="store_true", help="only print the Markdown table of an existing --json")
    ap.add_argument("--json", default=str(ROOT / "bench" / "results" / "personal_learning_curve.json"))
    args = ap.parse_args()
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.sizes = args.sizes.split(",")
    if args.table:
        print(markdown_table(json.loads(Path(args.json).read_text())["curve"]["rows"]))
        return 0
    import torch

    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    if not DATA.is_dir():
        print(f"shared data not found: {DATA}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    out: dict[str, Any] = {"machine": platform.platform(), "python": platform.python_version(),
                           "torch_threads": args.threads, "seeds": args.seeds}
    if args.part in ("curve", "all"):
        out["curve"] = curve(args, print, lambda part: _write(args.json, {**out, "curve": part}))
        print("\nunseen pages (mean over seeds): votes | old pair_acc/srcc | probe | new | new-old")
        for size, e in out["curve"]["summary"].items():
            print(f"{size:>5} | {e['old']['pair_acc']:.3f}/{e['old']['srcc']:.3f} | {e['probe']['pair_acc']:.3f}/"
                  f"{e['probe']['srcc']:.3f} | {e['new']['pair_acc']:.3f}/{e['new']['srcc']:.3f} | "
                  f"{e['new_minus_old_pair_acc']:+.3f}/{e['new_minus_old_srcc']:+.3f}")
    if args.part in ("ratings", "all"):
        out["ratings"] = ratings(args, print)
        for split, e in out["ratings"]["summary"].items():
            print(f"ratings {split}: old srcc {e['old']['srcc']:.3f}, probe {e['probe']['srcc']:.3f}, "
                  f"new {e['new']['srcc']:.3f} (new-old {e['new_minus_old_srcc']:+.3f}, "
                  f"new-probe {e['new_minus_probe_srcc']:+.3f})")
    out["seconds"] = time.perf_counter() - t0
    _write(args.json, out)
    print(f"wrote {args.json} ({out['seconds']:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
