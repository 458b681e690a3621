"""LoRA vs full (or any task runs) side by side, from their ``summary.json`` files: ``tastelab compare``."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tastelab.core.errors import UserError

__all__ = ["compare_runs"]


def _summary(run: Path) -> dict[str, Any]:
    path = run / "summary.json"
    if not path.is_file():
        raise UserError(f"{run}: no summary.json (not a finished training run)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise UserError(f"{path}: unreadable ({exc})") from exc
    if not isinstance(data, dict) or "best" not in data:
        raise UserError(f"{path}: not a training summary")
    return data


def _finite(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def compare_runs(runs: Sequence[str | Path]) -> list[dict[str, Any]]:
    """One row per run: task, mode, size of ``best/`` on disk, parameters (trainable, total, share), the
    selection metric at the best epoch on val (and on test when measured), train time."""
    rows = []
    for run in map(Path, runs):
        s = _summary(run)
        best = s.get("best") or {}
        metric = best.get("metric")
        params = s.get("parameters") or {}
        sizes = s.get("size_bytes") or {}
        size = sizes.get("best", s.get("model_size_bytes"))
        test = (s.get("test") or {}).get("best") or {}
        total, trainable = params.get("total"), params.get("trainable")
        rows.append({
            "run": str(run),
            "task": s.get("task", "quality"),
            "mode": s.get("mode"),
            "size_bytes": size,
            "full_fp32_bytes": sizes.get("full_fp32_estimate"),
            "trainable_params": trainable,
            "total_params": total,
            "trainable_share": trainable / total if total and trainable is not None else None,
            "metric": metric,
            "val": _finite(best.get("value")),
            "best_epoch": best.get("epoch"),
            "test": _finite(test.get(metric)) if metric else None,
            "val_metrics": {k[4:]: v for k, v in (best.get("val") or {}).items() if k.startswith("val/")},
            "train_seconds": _finite(s.get("train_seconds")),
        })
    return rows
