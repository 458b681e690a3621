"""The learning-curve bench's "does recipe X clearly beat the probe" statistics (no shared data needed).

The bench is a script, not a package, so it is loaded from its path; only its pure-NumPy helpers run here."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "personal_learning_curve.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("personal_learning_curve_under_test", BENCH)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve their module
    spec.loader.exec_module(mod)
    return mod


def _rows(values: dict[str, list[float]], metric: str = "pair_acc") -> list[dict]:
    return [{"seed": s, "size": "100", "recipe": name, metric: v, "srcc": v}
            for name, vs in values.items() for s, v in enumerate(vs)]


def test_bootstrap_ci_is_seeded_and_brackets_the_mean(bench) -> None:
    gains = [0.02, 0.01, 0.03, -0.005, 0.015, 0.02]
    lo, hi = bench.bootstrap_ci(gains)
    assert (lo, hi) == bench.bootstrap_ci(gains)  # same gains, same interval
    assert lo < np.mean(gains) < hi
    assert lo > min(gains) and hi < max(gains)
    assert bench.bootstrap_ci([0.5]) == (0.5, 0.5)
    assert all(np.isnan(bench.bootstrap_ci([0.1, float("nan")])))


def test_gains_are_paired_by_seed_not_by_row_order(bench) -> None:
    rows = _rows({"probe": [0.60, 0.70, 0.50], "new": [0.61, 0.72, 0.53]})
    rows.reverse()  # recipe rows in another order must still pair seed with seed
    g = bench.paired_gains(rows, ("pair_acc",), "size")["100"]["new"]["gain_pair_acc"]
    assert g["gains"] == pytest.approx([0.03, 0.02, 0.01])  # seeds 2, 1, 0 as they came
    assert sorted(g["seeds"]) == [0, 1, 2]
    assert g["mean"] == pytest.approx(0.02)
    assert (g["wins"], g["ties"], g["losses"]) == (3, 0, 0)


def test_a_seed_missing_for_the_probe_is_left_out(bench) -> None:
    rows = _rows({"new": [0.6, 0.7, 0.8]}) + _rows({"probe": [0.5, 0.6]})
    g = bench.paired_gains(rows, ("pair_acc",), "size")["100"]["new"]["gain_pair_acc"]
    assert g["n"] == 2 and g["mean"] == pytest.approx(0.1)


@pytest.mark.parametrize(("gains", "clear"), [
    ([0.02, 0.01, 0.03, -0.005, 0.015, 0.02], True),   # 5 of 6 positive, CI above 0
    ([0.02, 0.01, 0.03, -0.005, -0.015, 0.02], False),  # 4 of 6
    ([0.02, 0.01, 0.03, 0.005, 0.015], False),  # fewer than 6 seeds
    ([0.001, 0.001, 0.001, 0.001, 0.001, -0.2], False),  # 5 of 6 but the CI reaches below 0
])
def test_clear_win_rule(bench, gains: list[float], clear: bool) -> None:
    assert bench.gain_summary(gains, list(range(len(gains))))["clear"] is clear


def test_markdown_table_marks_clear_wins(bench) -> None:
    probe = [0.60, 0.62, 0.58, 0.61, 0.59, 0.60]
    rows = _rows({"probe": probe, "new": [p + d for p, d in zip(probe, [0.02, 0.01, 0.03, -0.005, 0.015, 0.02])],
                  "old": [p - 0.01 for p in probe]})
    part = {"summary": bench.paired_gains(rows, ("pair_acc", "srcc"), "size")}
    table = bench.markdown_table(part, ("pair_acc", "srcc"), "train votes")
    new_line = next(line for line in table.splitlines() if "| new |" in line)
    old_line = next(line for line in table.splitlines() if "| old |" in line)
    assert "**+0.015" in new_line and "5/6" in new_line
    assert "**" not in old_line and "-0.010" in old_line and "0/6" in old_line
    assert "(baseline)" in next(line for line in table.splitlines() if "| probe |" in line)


def test_dev_folds_stay_inside_the_training_part(bench) -> None:
    import torch

    from tastelab.io.votes import Vote

    rng = np.random.default_rng(0)
    names = [f"/photos/p{i:02d}.jpg" for i in range(12)]
    votes = [Vote(names[a], names[b], 1, 0) for a, b in rng.integers(0, 12, size=(60, 2)) if a != b]
    split = bench.Split("votes", 3, "all", names, {"f": torch.arange(12.0)[:, None]}, ["/test/t.jpg"],
                        {"f": torch.zeros(1, 1)}, fit_votes=votes)
    folds = bench.dev_folds(split, 3)
    assert len(folds) == 3
    held_all: list[str] = []
    for fit, target in folds:
        held = set(names) - set(fit.fit_names)
        held_all += sorted(held)
        assert fit.dev and fit.eval_names == names  # scores the training part only, never the test page
        assert fit.fit_feats["f"][:, 0].tolist() == [float(names.index(p)) for p in fit.fit_names]
        assert all(v.image_a not in held and v.image_b not in held for v in fit.fit_votes)
        touched = {names[i] for i in np.concatenate([target.pairs.a, target.pairs.b])}
        assert all(names[a] in held or names[b] in held for a, b in zip(target.pairs.a, target.pairs.b))
        assert touched <= set(names)
    assert sorted(held_all) == sorted(names)  # every training image is held out exactly once


def test_merge_pairs_seeds_across_runs_against_any_baseline(bench, tmp_path: Path) -> None:
    import json

    rows = _rows({"probe": [0.6, 0.6, 0.6, 0.6], "probe_all": [0.62, 0.58, 0.62, 0.62], "x": [0.7, 0.7, 0.5, 0.7]})
    files = []
    for part in (0, 1):  # seeds 0,1 in one run, 2,3 in another
        f = tmp_path / f"r{part}.json"
        f.write_text(json.dumps({"baseline": "probe", "dev": False, "seconds": 1.0,
                                 "curve": {"rows": [r for r in rows if r["seed"] // 2 == part]}}))
        files.append(str(f))
    out = bench.merge(files, "probe_all")
    g = out["curve"]["summary"]["100"]["x"]["gain_pair_acc"]
    assert g["gains"] == pytest.approx([0.08, 0.12, -0.12, 0.08]) and out["baseline"] == "probe_all"
    vs_probe = out["curve"]["summary_vs_probe"]["100"]["x"]["gain_pair_acc"]["gains"]
    assert vs_probe == pytest.approx([0.1, 0.1, -0.1, 0.1])
    assert "| 100 | x | 4 |" in bench.tables(out) and "gain vs probe_all" in bench.tables(out)
    with pytest.raises(ValueError, match="twice"):
        bench.merge([files[0], files[0]])
