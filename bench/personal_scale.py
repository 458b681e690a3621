"""How ``fit_personal`` scales from 100 to 10,000 votes: real photos, a simulated person, unseen-photo Spearman.

A person whose hidden taste is the photos' MOS quality label (``../shared/data/biq2021``): a seeded sample of
``--photos`` photos is split by image into 70% to vote on and 30% UNSEEN photos (never in a vote, never in any
selection step, feature statistics included). For each vote count, pairs are drawn uniformly at random among
the voting photos; the higher-MOS photo wins, flipped with probability ``--noise``. Each vote count runs
:func:`tastelab.personal.fit_personal` (the public API, as ``tastelab train personal`` does) in a FRESH
process, so the peak memory (``resource.getrusage`` max RSS) is that size's own. Reported per size: the
search and final-fit wall times, the search's folds / grid (it adapts to size), peak memory, what was chosen,
its CV value, and Spearman vs MOS on the unseen photos.

Feature extraction dominates on a small CPU machine and goes through the shared feature cache (content-keyed),
so the photos are extracted once up front (timed separately) and every size reads them back. By default only
MobileNetV2's feature sets and the plain view (``--views orig``); ``--views orig,hflip`` adds a view set.

    OPENBLAS_NUM_THREADS=1 python bench/personal_scale.py --photos 2000 --votes 100,1000,10000

``--full-search --folds 5`` runs the small-data search (5 folds, every L2 strength, MLPs on two sets) at
every size, to show what the size rule saves (``--json`` elsewhere to keep both).

Writes ``bench/results/personal_scale.json`` (``--json``).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "biq2021"
OUT = ROOT / "bench" / "results" / "personal_scale.json"


def _setup(args: argparse.Namespace) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """The sampled photo names, their MOS, and the voting / unseen index split (seeded)."""
    with open(DATA / "labels.csv", newline="") as f:
        rows = [(r["image"], float(r["mos"])) for r in csv.DictReader(f)]
    rng = np.random.default_rng(args.seed)
    pick = rng.choice(len(rows), size=min(args.photos, len(rows)), replace=False)
    names = [rows[i][0] for i in pick]
    mos = np.array([rows[i][1] for i in pick])
    order = rng.permutation(len(names))
    n_test = int(round(args.test_frac * len(names)))
    return names, mos, np.sort(order[n_test:]), np.sort(order[:n_test])


def _specs() -> Any:
    from tastelab.personal.features import MOBILENET_FEATURE_SETS

    return MOBILENET_FEATURE_SETS


def _extract(paths: list[str], views: tuple[str, ...]) -> dict[str, Any]:
    from tastelab.features.cache import default_cache_dir
    from tastelab.io.images import PreprocessConfig
    from tastelab.personal.features import extract_feature_sets

    feats, errors = extract_feature_sets(_specs(), paths, preprocess=PreprocessConfig(size=320, resize="squash"),
                                         cache_dir=default_cache_dir(), device="cpu", views=views)
    if errors:
        raise SystemExit(f"unreadable photos: {list(errors.items())[:3]}")
    return feats


def _votes(n: int, train: np.ndarray, mos: np.ndarray, names: list[str], noise: float, seed: int,
           path: Path) -> None:
    """``n`` random pairs among ``train`` photos, the higher MOS wins, flipped with probability ``noise``."""
    rng = np.random.default_rng(1000 + seed + n)
    a = rng.choice(train, size=n)
    b = rng.choice(train, size=n)
    same = a == b
    while same.any():
        b[same] = rng.choice(train, size=int(same.sum()))
        same = a == b
    a_wins = (mos[a] > mos[b]) ^ (rng.random(n) < noise)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_a", "image_b", "votes_a", "votes_b"])
        for i, j, win in zip(a, b, a_wins):
            w.writerow([names[i], names[j], int(win), int(not win)])


def _live(res: Any, votes_csv: Path) -> dict[str, Any]:
    """One retrain of ``tastelab label``'s live model on the same votes (its worker thread's call: the app's
    feature sets and search, :data:`~tastelab.web.live.LIVE_SEARCH`, 4 folds), on the features already read."""
    from tastelab.io.votes import load_votes
    from tastelab.web.live import LIVE_SEARCH, LiveConfig
    from tastelab.web.personal_fit import LIVE_FEATURE_SETS, fit_votes

    votes, _ = load_votes(votes_csv, DATA / "images")
    rows = [(v.image_a, v.image_b, float(v.votes_a), float(v.votes_b)) for v in votes]
    feats = {s.name: res.features[s.name] for s in LIVE_FEATURE_SETS}
    t = time.perf_counter()
    fitted = fit_votes(res.images, feats, rows, seed=0, folds=LiveConfig().folds, **LIVE_SEARCH)
    return {"retrain_s": time.perf_counter() - t, "chosen": fitted.chosen, "heldout": fitted.heldout,
            "heldout_kind": fitted.heldout_kind, "plan": fitted.result.plan}


def run_one(args: argparse.Namespace, n_votes: int) -> dict[str, Any]:
    """One vote count, in this (fresh) process."""
    import torch
    from scipy.stats import spearmanr

    from tastelab.personal import fit_personal

    torch.set_num_threads(1)
    names, mos, train, test = _setup(args)
    views = tuple(args.views.split(","))
    view_sets = [views] if len(views) > 1 else []
    with tempfile.TemporaryDirectory() as tmp:
        votes = Path(tmp) / "votes.csv"
        _votes(n_votes, train, mos, names, args.noise, args.seed, votes)
        t = time.perf_counter()
        full = {"walk": False, "view_feature_sets": 3, "mlp_feature_sets": 2} if args.full_search else {}
        res = fit_personal(votes, DATA / "images", feature_sets=_specs(), folds=args.folds, seed=args.seed,
                           nested=False, device="cpu", view_sets=view_sets, log=lambda s: print("  " + s, flush=True),
                           **full)
        total = time.perf_counter() - t
        live = _live(res, votes)
    test_paths = [str(DATA / "images" / names[i]) for i in test]
    feats = _extract(test_paths, views)
    pred = res.unit_scores(feats)
    rho = float(spearmanr(pred, mos[test]).statistic)
    chosen = next(c for c in res.candidates if c["chosen"])
    return {"votes": n_votes, "labelled_images": res.n_images, "unseen_images": len(test),
            "chosen": res.chosen, "cv_pair_acc": res.cv, "candidates": len(res.candidates),
            "chosen_l2": [m["l2"] for m in chosen["members"]],
            "search_s": res.seconds["search"], "fit_s": res.seconds["fit"], "extract_s": res.seconds["extract"],
            "fit_personal_s": total, "search_plan": res.plan,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "unseen_srcc_vs_mos": rho, "live": live}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--photos", type=int, default=2000)
    ap.add_argument("--votes", default="100,1000,10000")
    ap.add_argument("--noise", type=float, default=0.1)
    ap.add_argument("--test-frac", type=float, default=0.3)
    ap.add_argument("--views", default="orig")
    ap.add_argument("--folds", type=int, default=None, help="image folds (default: fit_personal's size rule)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--full-search", action="store_true",
                    help="the small-data search at every size (with --folds 5): what the size rule saves")
    ap.add_argument("--json", type=Path, default=OUT)
    ap.add_argument("--only", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--extract-only", action="store_true", help="fill the feature cache and stop")
    args = ap.parse_args()
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    if args.only is not None:
        print("RESULT " + json.dumps(run_one(args, args.only)), flush=True)
        return
    import torch

    torch.set_num_threads(1)
    names, _mos, train, test = _setup(args)
    t = time.perf_counter()
    _extract([str(DATA / "images" / n) for n in names], tuple(args.views.split(",")))
    extract_s = time.perf_counter() - t
    print(f"features of {len(names)} photos x views {args.views}: {extract_s:.1f}s (cache)", flush=True)
    if args.extract_only:
        return
    rows = []
    for n in [int(x) for x in args.votes.split(",")]:
        print(f"{n} votes:", flush=True)
        cmd = [sys.executable, __file__, "--only", str(n), "--photos", str(args.photos), "--noise", str(args.noise),
               "--test-frac", str(args.test_frac), "--views", args.views, "--seed", str(args.seed)]
        cmd += ["--folds", str(args.folds)] if args.folds is not None else []
        cmd += ["--full-search"] if args.full_search else []
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OPENBLAS_NUM_THREADS": "1"})
        sys.stdout.write(proc.stdout)
        if proc.returncode:
            sys.stderr.write(proc.stderr)
            raise SystemExit(f"{n} votes failed")
        row = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
        print(f"  search {row['search_s']:.1f}s  fit {row['fit_s']:.1f}s  peak {row['peak_rss_mb']:.0f} MB  "
              f"unseen SRCC {row['unseen_srcc_vs_mos']:.3f}  chosen {row['chosen']}  "
              f"live retrain {row['live']['retrain_s']:.1f}s", flush=True)
        rows.append(row)
    out = {"command": "OPENBLAS_NUM_THREADS=1 python " + " ".join(["bench/personal_scale.py", *sys.argv[1:]]),
           "full_search": args.full_search,
           "photos": len(names), "voting_photos": len(train), "unseen_photos": len(test), "views": args.views,
           "feature_sets": "MobileNetV2 (5 sets)", "noise": args.noise, "seed": args.seed,
           "extract_s_all_photos": extract_s, "cpu": f"{os.cpu_count()} cores (shared)", "rows": rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.json.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out, indent=2))
    tmp.replace(args.json)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
