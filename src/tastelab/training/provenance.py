"""Provenance a training run writes into every model folder it saves (``config.json``'s ``training``).

A model folder must say, by itself, how it was made and how good it measured: which recipe (path, the full
resolved settings and their hash), which code (tastelab version, git commit when run from a checkout),
which data split (seed, the split file's hash, split sizes), when, and its metrics on the held-out test
split. Nothing in it is typed by hand: the slow test of the shipped default model re-scores the held-out
photos and compares with the recorded ``test_metrics``.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any

from tastelab.core.atomic import write_text_atomic
from tastelab.core.jsonutil import json_default
from tastelab.core.version import __version__
from tastelab.training.config import TrainConfig

#: Bumped when the keys below change meaning (readers can tell old records from new).
PROVENANCE_VERSION = 1


def utc_now() -> str:
    """An ISO-8601 UTC timestamp to the second (what a human compares runs by)."""
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def recipe_record(cfg: TrainConfig, path: str | None) -> dict[str, Any]:
    """The recipe as training used it (after overrides and path resolution), with a hash of its canonical
    JSON so two folders can be compared without diffing the whole copy."""
    resolved = cfg.model_dump(mode="json")
    canonical = json.dumps(resolved, sort_keys=True, separators=(",", ":"), default=json_default)
    return {"path": str(path) if path is not None else None, "name": cfg.model.name,
            "sha256": hashlib.sha256(canonical.encode()).hexdigest(), "resolved": resolved}


@lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The commit of the tastelab checkout this code runs from (None when installed, or without git);
    a ``+dirty`` suffix when tracked files differ from it."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}+dirty" if dirty and head else (head or None)


def tastelab_version() -> str:
    return __version__


def run_record(cfg: TrainConfig, *, recipe_path: str | None, split_file: Path, sizes: dict[str, int],
               started_at: str) -> dict[str, Any]:
    """What stays the same for every folder one run saves (computed once per ``fit``)."""
    return {
        "provenance_version": PROVENANCE_VERSION,
        "recipe": recipe_record(cfg, recipe_path),
        "tastelab_version": tastelab_version(),
        "git_commit": git_commit(),
        "seed": cfg.seed,
        "split": {"file": str(split_file), "sha256": sha256_file(split_file) if split_file.is_file() else None,
                  "sizes": dict(sizes)},
        "started_at": started_at,
    }


def record_test_metrics(folder: Path, metrics: dict[str, float]) -> None:
    """Add the held-out test metrics measured after training to a saved folder's ``config.json``
    (atomically: the folder stays loadable whatever happens)."""
    path = folder / "config.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    data.setdefault("training", {})["test_metrics"] = {k: float(v) for k, v in metrics.items()}
    data["training"]["test_measured_at"] = utc_now()
    write_text_atomic(path, json.dumps(data, indent=2, default=json_default))
