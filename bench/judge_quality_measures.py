"""Calibrate the judge's model-free quality measures on real photos with human scores (BIQ2021).

    python bench/judge_quality_measures.py [--limit N]

For every photo of ``../shared/data/biq2021`` (5,000 photos, MOS 0..1 from 30 observers): sharpness,
exposure clipping and Immerkaer's noise sigma, exactly as the ``sharpness`` / ``exposure`` / ``noise``
metrics compute them. Prints and writes (``bench/results/judge_quality_measures.json``) the Spearman
correlation of each measure with the MOS and its 5th / 50th / 95th percentiles: the percentiles are the
metrics' default normalisation ranges (src/tastelab/judge/metrics/__init__.py), the correlations are
quoted in the metrics' docstring and docs/judge.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np
from scipy import stats

from tastelab.io.images import load_image
from tastelab.judge.metrics.quality import exposure_clipping, grey_at_measure_size, immerkaer_sigma, laplacian_sharpness

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "biq2021"
OUT = ROOT / "bench" / "results" / "judge_quality_measures.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=None, help="first N photos only (default: all)")
    args = parser.parse_args()
    files = {p.name.lower(): p for p in (DATA / "images").iterdir()}  # one label's extension case differs
    with (DATA / "labels.csv").open(newline="") as f:
        rows = [(files[r["image"].lower()], float(r["mos"])) for r in csv.DictReader(f)
                if r["image"].lower() in files]
    rows = rows[: args.limit] if args.limit else rows
    start = time.perf_counter()
    values: dict[str, list[float]] = {"sharpness": [], "exposure": [], "noise": []}
    mos = []
    for path, score in rows:
        grey = grey_at_measure_size(load_image(path))
        values["sharpness"].append(laplacian_sharpness(grey))
        values["exposure"].append(exposure_clipping(grey))
        values["noise"].append(immerkaer_sigma(grey) or 0.0)
        mos.append(score)
    seconds = time.perf_counter() - start
    result = {"images": len(mos), "seconds": round(seconds, 1), "measures": {}}
    for name, vals in values.items():
        arr = np.asarray(vals)
        srcc = float(stats.spearmanr(arr, mos).statistic)
        p5, p50, p90, p95 = (float(np.percentile(arr, q)) for q in (5, 50, 90, 95))
        result["measures"][name] = {"srcc_with_mos": round(srcc, 4), "p5": round(p5, 4), "p50": round(p50, 4),
                                    "p90": round(p90, 4), "p95": round(p95, 4)}
        print(f"{name:10s} SRCC {srcc:+.3f}  p5 {p5:.4g}  median {p50:.4g}  p90 {p90:.4g}  p95 {p95:.4g}")
    print(f"{len(mos)} photos in {seconds:.0f}s ({len(mos) / seconds:.0f} img/s)")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
