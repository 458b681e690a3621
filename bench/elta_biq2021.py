"""ELTA on BIQ2021: baseline vs each part vs all parts, several seeds, mean ± std on the test split.

    python bench/elta_biq2021.py --phase tune       # pick ELTA knobs on VAL (seed 0)
    python bench/elta_biq2021.py --phase main       # full train split: baseline / +mixup / +sim / +both
    python bench/elta_biq2021.py --phase tune-self  # pick sharpening beta / threshold on VAL (seed 0)
    python bench/elta_biq2021.py --phase selftrain  # 50% labelled + 50% unlabelled pool
    python bench/elta_biq2021.py --phase table      # JSON + markdown table from the finished runs

Recipe: configs/biq2021_quality.yaml (frozen MobileNetV2 features from the cache, MLP score head, MSE).
The data split is fixed (the shipped preset's split.json); seeds change only the head's initialisation,
dropout and batch order. Metrics are the trainer's own test metrics of each run's best-on-val checkpoint:
SRCC, PLCC, MAE and the tail MAEs (true-score percentiles 0-20 and 80-100). Every run is a normal run
folder under --runs, reused when finished, so the script can be stopped and re-run.

Self-training protocol: the preset's train split is halved with a fixed seed; one half keeps its labels,
the other half is the unlabelled pool (its labels are never read: the pool is a path list). val/test are
the preset's. Round 0 = the baseline on 50%, round 1 = retrained with the pseudo-labels.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PRESET_SPLIT = ROOT / "src" / "tastelab" / "presets" / "biq2021_mobilenetv2" / "split.json"
METRICS = ("srcc", "plcc", "mae", "mae_p0_20", "mae_p80_100")
logger = logging.getLogger("elta_bench")

# Chosen on VAL in the tune phase (see TUNE and docs/elta.md); the test split is never looked at.
MIXUP = ["train.elta.mixup=true", "train.elta.tau1=0.3", "train.elta.tau2=0.05", "train.elta.mix_count=0.5"]
SIM = ["train.elta.similarity_weight=1.0"]
SELF_NAME, SELF_BETA0_NAME = "beta2_thr0.9", "beta0_thr0.9"  # their seed-0 runs are shared with tune-self
SELF = ["train.elta.pseudo_weight=0.5", "train.elta.sharpen_beta=2.0", "train.elta.pseudo_threshold=0.9"]

TUNE_SELF: dict[str, list[str]] = {
    "beta2_thr0.9": ["train.elta.sharpen_beta=2.0", "train.elta.pseudo_threshold=0.9"],
    "beta2_thr0.95": ["train.elta.sharpen_beta=2.0", "train.elta.pseudo_threshold=0.95"],
    "beta4_thr0.95": ["train.elta.sharpen_beta=4.0", "train.elta.pseudo_threshold=0.95"],
    "beta0_thr0.9": ["train.elta.sharpen_beta=0.0", "train.elta.pseudo_threshold=0.9"],
}

VARIANTS: dict[str, list[str]] = {
    "baseline": [],
    "mixup": MIXUP,
    "similarity": SIM,
    "mixup+similarity": MIXUP + SIM,
}

TUNE: dict[str, list[str]] = {
    "baseline": [],
    "mixup_t0.1_m0.25": ["train.elta.mixup=true", "train.elta.tau1=0.1", "train.elta.tau2=0.05",
                         "train.elta.mix_count=0.25"],
    "mixup_t0.3_m0.5": MIXUP,
    "mixup_t0.05_m0.5": ["train.elta.mixup=true", "train.elta.tau1=0.05", "train.elta.tau2=0.02",
                         "train.elta.mix_count=0.5"],
    "sim_w0.1": ["train.elta.similarity_weight=0.1"],
    "sim_w1": ["train.elta.similarity_weight=1.0"],
    "sim_w3": ["train.elta.similarity_weight=3.0"],
}


def _config(args: argparse.Namespace, overrides: list[str], seed: int, split_file: Path) -> Any:
    from tastelab.training.config import load_train_config

    base = [f"seed={seed}", f"data.split_file={split_file}", f"train.epochs={args.epochs}"]
    return load_train_config(args.config, base + overrides)


def _metrics(run: Path) -> dict[str, Any]:
    s = json.loads((run / "summary.json").read_text())
    val = s["best"]["val"]
    return {"test": {k: s["test"]["best"][k] for k in METRICS},
            "val": {k: val.get(f"val/{k}") for k in METRICS},
            "best_epoch": s["best"]["epoch"], "seconds": s["train_seconds"], "elta": s.get("elta")}


def _train(args: argparse.Namespace, name: str, overrides: list[str], seed: int, split_file: Path,
           only_finished: bool = False) -> dict | None:
    """Metrics of a run, training it first unless it is finished (or None with ``only_finished``)."""
    from tastelab.training.trainer import Trainer

    run = args.runs / name / f"seed-{seed}"
    if only_finished and not (run / "summary.json").exists():
        return None
    if not (run / "summary.json").exists():
        logger.info("training %s seed %d -> %s", name, seed, run)
        Trainer(_config(args, overrides, seed, split_file), run).fit()
    return _metrics(run)


def _half_split(args: argparse.Namespace) -> tuple[Path, Path]:
    """Split file with half of the preset's train split relabelled 'unlabelled', and the pool list."""
    from tastelab.io.splits import save_split
    from tastelab.training.config import load_train_config

    payload = json.loads(PRESET_SPLIT.read_text())
    splits = payload["splits"]
    train = sorted(splits["train"])
    order = np.random.default_rng(1234).permutation(len(train))
    keep = sorted(train[i] for i in order[: len(train) // 2])
    pool = sorted(train[i] for i in order[len(train) // 2:])
    split_file = args.runs / "split_half.json"
    save_split(split_file, {"train": keep, "val": splits["val"], "test": splits["test"], "unlabelled": pool},
               {"seed": payload.get("seed", 0), "fractions": payload.get("fractions"), "kind": "elta-half"})
    cfg = load_train_config(args.config)
    root = Path(cfg.data.path).parent / "images"
    pool_file = args.runs / "unlabelled.txt"
    pool_file.write_text("".join(f"{root / k}\n" for k in pool))
    return split_file, pool_file


def _self_train(args: argparse.Namespace, name: str, overrides: list[str], seed: int, split_file: Path,
                pool_file: Path, base_run: Path | None = None) -> dict[str, Any]:
    from tastelab.selftrain import self_train

    out = args.runs / name / f"seed-{seed}"
    self_train(_config(args, overrides, seed, split_file), str(pool_file), out, rounds=1, base_run=base_run)
    st = json.loads((out / "self_train.json").read_text())
    return {"round0": _metrics(Path(st["rounds"][0]["run_dir"])), "round1": _metrics(out / "round-1"),
            "pseudo": st["rounds"][0].get("pseudo")}


def _agg(values: list[float]) -> dict[str, float]:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
            "n": len(vals)}


def _summarise(rows: dict[str, dict[int, dict[str, Any]]], split: str = "test") -> dict[str, Any]:
    return {name: {k: _agg([r[split][k] for r in per_seed.values()]) for k in METRICS}
            for name, per_seed in rows.items() if per_seed}


def _table(summary: dict[str, Any], baseline: str) -> str:
    head = "| variant | SRCC ↑ | PLCC ↑ | MAE ↓ | MAE lowest 20% ↓ | MAE highest 20% ↓ |\n|---|---|---|---|---|---|\n"
    lines = []
    for name, m in summary.items():
        cells = []
        for k in METRICS:
            cell = f"{m[k]['mean']:.4f} ± {m[k]['std']:.4f}"
            if name != baseline and baseline in summary:
                cell += f" ({m[k]['mean'] - summary[baseline][k]['mean']:+.4f})"
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--phase", choices=["tune", "tune-self", "main", "selftrain", "table"], required=True)
    p.add_argument("--config", default=str(ROOT / "configs" / "biq2021_quality.yaml"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--runs", type=Path, default=Path("/tmp/elta_bench"), help="run folders (reused)")
    p.add_argument("--results", type=Path, default=ROOT / "bench" / "results" / "elta_biq2021.json")
    p.add_argument("--variants", nargs="*", default=None, help="subset of the phase's variants")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: on a shared 2-core machine a second thread mostly waits)")
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args.runs.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = json.loads(args.results.read_text()) if args.results.exists() else {}
    results.setdefault("protocol", {
        "config": "configs/biq2021_quality.yaml", "epochs": args.epochs,
        "split": "src/tastelab/presets/biq2021_mobilenetv2/split.json (fixed)",
        "checkpoint": "best on val SRCC", "metrics": "test split; tail MAE = true-score percentiles 0-20 / 80-100",
        "settings": {"mixup": MIXUP, "similarity": SIM, "self_training": SELF}})

    if args.phase == "tune":
        rows: dict[str, dict[int, dict]] = {}
        for name, ov in TUNE.items():  # unselected variants are reported when already finished
            skip = bool(args.variants) and name not in args.variants
            got = {s: _train(args, f"tune-e{args.epochs}/{name}", ov, s, PRESET_SPLIT, only_finished=skip)
                   for s in args.seeds}
            rows[name] = {s: m for s, m in got.items() if m is not None}
        results["tune"] = {"epochs": args.epochs, "seeds": args.seeds, "overrides": TUNE,
                           "val": _summarise(rows, "val")}
        print(_table(results["tune"]["val"], "baseline"))
    elif args.phase == "tune-self":
        split_file, pool_file = _half_split(args)
        base = f"half-e{args.epochs}"
        rows = {}
        for s in args.seeds:
            rows.setdefault("baseline (50% labels)", {})[s] = _train(args, f"{base}/r0", [], s, split_file)
            r0 = args.runs / base / "r0" / f"seed-{s}"
            for name, ov in TUNE_SELF.items():
                done = (args.runs / base / "tune-self" / name / f"seed-{s}" / "round-1" / "summary.json").exists()
                if args.variants and name not in args.variants and not done:
                    continue
                out = _self_train(args, f"{base}/tune-self/{name}", ["train.elta.pseudo_weight=0.5", *ov], s,
                                  split_file, pool_file, base_run=r0)
                rows.setdefault(name, {})[s] = out["round1"] | {"pseudo": out["pseudo"]}
        results["tune_self"] = {"epochs": args.epochs, "seeds": args.seeds, "overrides": TUNE_SELF,
                                "val": _summarise(rows, "val"),
                                "pseudo": {n: {s: r.get("pseudo") for s, r in per.items()} for n, per in rows.items()}}
        print(_table(results["tune_self"]["val"], "baseline (50% labels)"))
    elif args.phase == "main":
        rows = {}
        for name, ov in VARIANTS.items():
            skip = bool(args.variants) and name not in args.variants
            got = {s: _train(args, f"main-e{args.epochs}/{name}", ov, s, PRESET_SPLIT, only_finished=skip)
                   for s in args.seeds}
            rows[name] = {s: m for s, m in got.items() if m is not None}
        results["main"] = {"seeds": args.seeds, "epochs": args.epochs, "runs": rows, "test": _summarise(rows)}
        print(_table(results["main"]["test"], "baseline"))
    elif args.phase == "selftrain":
        split_file, pool_file = _half_split(args)
        st: dict[str, dict[int, dict]] = {"self-train": {}, "self-train beta=0": {}, "all (mixup+sim+self-train)": {}}
        for s in args.seeds:
            # Round 0 of both self-training variants is the plain baseline run on the labelled half.
            base = f"half-e{args.epochs}"
            _train(args, f"{base}/r0", [], s, split_file)
            r0 = args.runs / base / "r0" / f"seed-{s}"
            st["self-train"][s] = _self_train(args, f"{base}/tune-self/{SELF_NAME}", SELF, s, split_file,
                                              pool_file, base_run=r0)
            if not args.variants or "beta0" in args.variants:
                st["self-train beta=0"][s] = _self_train(
                    args, f"{base}/tune-self/{SELF_BETA0_NAME}", [*SELF, "train.elta.sharpen_beta=0.0"], s,
                    split_file, pool_file, base_run=r0)
            if not args.variants or "all" in args.variants:
                st["all (mixup+sim+self-train)"][s] = _self_train(
                    args, f"{base}/all", MIXUP + SIM + SELF, s, split_file, pool_file)
        rows = {"baseline (50% labels)": {s: r["round0"] for s, r in st["self-train"].items()},
                "+self-train (beta=0, no sharpening)": {s: r["round1"] for s, r in st["self-train beta=0"].items()},
                "+self-train (ELTA sharpening)": {s: r["round1"] for s, r in st["self-train"].items()},
                "mixup+similarity (50% labels)": {s: r["round0"] for s, r in st["all (mixup+sim+self-train)"].items()},
                "all: mixup+similarity+self-train": {s: r["round1"]
                                                     for s, r in st["all (mixup+sim+self-train)"].items()}}
        results["selftrain"] = {"seeds": args.seeds, "epochs": args.epochs, "runs": st, "test": _summarise(rows),
                                "pseudo": {name: {s: r.get("pseudo") for s, r in per.items()}
                                           for name, per in st.items()}}
        print(_table(results["selftrain"]["test"], "baseline (50% labels)"))
    else:
        for key, base in (("main", "baseline"), ("selftrain", "baseline (50% labels)")):
            if key in results:
                print(f"## {key}\n\n" + _table(results[key]["test"], base))
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(results, indent=2, default=float))
    md = ""
    for key, base in (("main", "baseline"), ("selftrain", "baseline (50% labels)")):
        if key in results:
            md += f"## {key}\n\n" + _table(results[key]["test"], base) + "\n"
    if "tune_self" in results:
        md += "## tune-self (VAL, seed(s) " + str(results["tune_self"]["seeds"]) + ")\n\n" + _table(
            results["tune_self"]["val"], "baseline (50% labels)") + "\n"
    if "tune" in results:
        md += "## tune (VAL, seed(s) " + str(results["tune"]["seeds"]) + ")\n\n" + _table(results["tune"]["val"],
                                                                                         "baseline")
    args.results.with_suffix(".md").write_text(md)


if __name__ == "__main__":
    main()
