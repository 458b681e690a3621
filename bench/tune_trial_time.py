"""Tuning trial time with the frozen-feature cache vs without, and a mini-study on the cache.

Real photos (BIQ2021 subset), MobileNetV2 ImageNet weights, frozen mode, all through ``tastelab.tuning.tune``:

    python bench/tune_trial_time.py --out bench/results/tune_trial_time.json

- cold:  one fixed head-search trial with a fresh, empty feature cache (backbone extraction + head training):
         what every trial would cost without the cache
- warm:  the same trial with the cache filled (head only): what every trial after the first costs
- study: ``--study-trials`` trials of configs/tune/biq2021_head_space.yaml (TPE + median pruner) on the warm
         cache, with an explicitly labelled linear extrapolation to 100 trials
- full_size_head_trial: the warm trial extrapolated (labelled) to the recipe's full data size, from the
         measured seconds per optimizer step: head training time grows with images x epochs

Trial times are Optuna's own trial durations (start to finish of the objective); ``tune_wall_s`` adds the
per-command overhead (study creation, summary, best-run copy).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger("bench")

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"

# One point of the head space: the "same trial" timed cold and warm.
FIXED_TRIAL = {"params": {
    "optim.lr": {"type": "categorical", "choices": [1.0e-3]},
    "model.head.hidden": {"type": "categorical", "choices": [[512, 128]]},
    "train.epochs": 20,
}}


def _subset(data: Path, n: int, folder: Path) -> Path:
    """The first ``n`` rows of the labels (the images stay in shared/, read-only)."""
    with open(data / "labels.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    out = folder / "labels.csv"
    with open(out, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows[: n + 1])
    return out


def _one_trial(recipe: Path, overrides: list[str], out: Path, space: Any, **kw: Any) -> dict[str, Any]:
    from tastelab.tuning import tune

    t0 = time.perf_counter()
    res = tune(recipe, space, out, trials=1, overrides=overrides, pruner="none", **kw)
    wall = time.perf_counter() - t0
    trial = res.summary["trials"][-1]
    assert trial["state"] == "COMPLETE", trial
    rows = [json.loads(line) for line in (out / "trials" / "trial-0000" / "metrics.jsonl").read_text().splitlines()]
    # Head-training speed from the run's own log: seconds per epoch (train + val) and optimizer steps per epoch.
    epoch_s = (rows[-1]["time"] - rows[0]["time"]) / (len(rows) - 1)
    steps = rows[1]["step"] - rows[0]["step"]
    return {"trial_s": trial["duration_s"], "tune_wall_s": round(wall, 2), "val/srcc": trial["values"]["val/srcc"],
            "epochs": len(rows), "epoch_s": round(epoch_s, 4), "steps_per_epoch": steps,
            "s_per_step": round(epoch_s / steps, 5)}


def head_step_seconds(model_dir: Path, batch: int, steps: int = 30) -> float:
    """Seconds per AdamW step of the trained head alone on random features of its input width (batch ``batch``):
    what the trainer's optimizer step costs, without its per-epoch work (evaluation, checkpoint)."""
    from tastelab import load_model

    head = load_model(model_dir).head.train()
    x = torch.randn(batch, head.in_dim)
    y = torch.rand(batch)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-4)
    for i in range(steps + 3):
        if i == 3:  # warm-up steps excluded
            t0 = time.perf_counter()
        loss = torch.nn.functional.mse_loss(head(x).score, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return (time.perf_counter() - t0) / steps


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=SHARED / "data" / "biq2021")
    ap.add_argument("--weights", type=Path, default=SHARED / "models" / "mobilenet_v2-b0353104.pth")
    ap.add_argument("--recipe", type=Path, default=ROOT / "configs" / "biq2021_quality.yaml")
    ap.add_argument("--space", type=Path, default=ROOT / "configs" / "tune" / "biq2021_head_space.yaml")
    ap.add_argument("--n", type=int, default=200, help="photos (first N rows of labels.csv)")
    ap.add_argument("--size", type=int, default=224, help="input size (the recipe uses 512)")
    ap.add_argument("--cold", type=int, default=2, help="cold trials (each with a fresh empty cache)")
    ap.add_argument("--warm", type=int, default=3, help="warm trials")
    ap.add_argument("--study-trials", type=int, default=20)
    ap.add_argument("--full-images", type=int, default=5000, help="extrapolate a warm trial to this many photos")
    ap.add_argument("--full-batch", type=int, default=64, help="... with the recipe's batch size")
    ap.add_argument("--full-epochs", type=int, default=40, help="... and the recipe's epochs")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (default 1: on a shared 2-core machine a second thread made the "
                    "head's optimizer step 2.5x slower)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in ("tastelab", "optuna", "accelerate"):
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    for p in (args.data / "labels.csv", args.weights, args.recipe, args.space):
        if not p.exists():
            raise SystemExit(f"missing {p}")

    result: dict[str, Any] = {
        "images": args.n, "input_size": args.size, "recipe": str(args.recipe.relative_to(ROOT)),
        "space": str(args.space.relative_to(ROOT)), "fixed_trial": FIXED_TRIAL["params"],
        "torch_threads": torch.get_num_threads(),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__, "loadavg_start": os.getloadavg()},
    }
    with tempfile.TemporaryDirectory(prefix="tune-bench-") as tmp_name:
        tmp = Path(tmp_name)
        labels = _subset(args.data, args.n, tmp)
        base = [f"data.path={labels}", f"data.image_root={args.data / 'images'}", f"model.preprocess.size={args.size}",
                f"model.backbone.weights={args.weights}"]
        warm_cache = tmp / "cache"

        cold = []
        for i in range(args.cold):
            # The first cold trial fills the cache the warm trials then read; the others get their own.
            cache = warm_cache if i == 0 else tmp / f"cache-cold-{i}"
            r = _one_trial(args.recipe, [*base, f"train.cache_dir={cache}"], tmp / f"cold-{i}", FIXED_TRIAL)
            logger.info("cold trial %d: %.1f s (tune() %.1f s)", i, r["trial_s"], r["tune_wall_s"])
            cold.append(r)
        warm = []
        for i in range(args.warm):
            r = _one_trial(args.recipe, [*base, f"train.cache_dir={warm_cache}"], tmp / f"warm-{i}", FIXED_TRIAL)
            logger.info("warm trial %d: %.1f s (tune() %.1f s)", i, r["trial_s"], r["tune_wall_s"])
            warm.append(r)
        cold_s = statistics.median(r["trial_s"] for r in cold)
        warm_s = statistics.median(r["trial_s"] for r in warm)
        result.update(cold=cold, warm=warm, cold_trial_s_median=cold_s, warm_trial_s_median=warm_s,
                      speedup_cold_over_warm=round(cold_s / warm_s, 2))
        # Labelled extrapolation of the warm (head-only) trial to the recipe at full size: the trial's fixed
        # cost (model build, loading features, saving, plots) + per-epoch work + the recipe's optimizer steps.
        step_s = head_step_seconds(tmp / "warm-0" / "best-run" / "best", args.full_batch)
        w = warm[0]
        per_epoch_s = max(0.0, w["epoch_s"] - w["steps_per_epoch"] * step_s)  # evaluation, checkpoint, best/
        fixed_s = max(0.0, w["trial_s"] - w["epochs"] * w["epoch_s"])
        train_n = round(args.full_images * 0.8)
        steps_per_epoch = -(-train_n // args.full_batch)
        result["full_size_head_trial"] = {
            "images": args.full_images, "train_images": train_n, "batch_size": args.full_batch,
            "epochs": args.full_epochs, "optimizer_steps": steps_per_epoch * args.full_epochs,
            "measured_head_step_s": round(step_s, 4), "measured_per_epoch_overhead_s": round(per_epoch_s, 3),
            "measured_fixed_s": round(fixed_s, 2),
            "extrapolated_trial_s": round(fixed_s + args.full_epochs * (per_epoch_s + steps_per_epoch * step_s), 1),
            "note": "NOT measured end to end: warm trial's fixed + per-epoch cost, plus the recipe's optimizer steps "
                    "x the measured step time of the head [512, 128] at this feature width",
        }

        from tastelab.tuning import tune

        t0 = time.perf_counter()
        res = tune(args.recipe, args.space, tmp / "study", trials=args.study_trials, sampler="tpe", pruner="median",
                   overrides=[*base, f"train.cache_dir={warm_cache}"])
        wall = time.perf_counter() - t0
        done = [t for t in res.summary["trials"] if t["state"] in ("COMPLETE", "PRUNED")]
        durations = [t["duration_s"] for t in done]
        mean_s = statistics.mean(durations)
        result["study"] = {
            "trials": len(done), "counts": {k: v for k, v in res.counts.items() if v},
            "wall_s": round(wall, 1), "trial_s_mean": round(mean_s, 2), "trial_s_median": statistics.median(durations),
            "trial_s_max": max(durations), "best_val_srcc": res.best_values.get("val/srcc"),
            "best_params": res.best_params,
            "extrapolated_100_trials_min": round((wall / len(done)) * 100 / 60, 1),
            "extrapolation_note": "NOT measured: 100 x (this study's wall time per finished trial), same data size; "
                                  "head-training time grows with training images x epochs",
        }
    result["machine"]["loadavg_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str))
    print(json.dumps({k: v for k, v in result.items() if k not in ("machine", "cold", "warm", "fixed_trial")},
                     indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
