"""A model's predictions (``tastelab score --out`` files) matched to the labelling folder's images.

``tastelab score`` records paths as it was given them: relative to wherever it ran, or absolute. To put
predictions beside votes, each recorded path is matched to an image of the folder by, in order: its real
path, the path taken relative to the folder, and the longest trailing run of path segments that names an
indexed image (``/data/photos/cats/a.jpg`` -> ``cats/a.jpg``). Error rows and unmatched paths are counted and
logged, never guessed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path

from tastelab.io.writers import read_results
from tastelab.web.paths import inside

logger = logging.getLogger(__name__)


def match_predictions(rows: Iterable[dict], root: str | os.PathLike, images: Iterable[str]) -> dict[str, float]:
    """``{relative image path: predicted score}`` for the rows that name an image of ``root``."""
    root_real = os.path.realpath(root)
    known = set(images)
    out: dict[str, float] = {}
    unmatched = errors = 0
    for row in rows:
        path, score = row.get("path"), row.get("score")
        if row.get("error") or score is None or not isinstance(path, str):
            errors += 1
            continue
        rel = _match(path, root, root_real, known)
        if rel is None:
            unmatched += 1
        elif rel not in out:
            out[rel] = float(score)
    if unmatched or errors:
        logger.warning("predictions: %d matched, %d name no image of %s, %d are error rows", len(out), unmatched,
                       root, errors)
    else:
        logger.info("predictions: %d matched", len(out))
    return out


def _match(path: str, root: str | os.PathLike, root_real: str, known: set[str]) -> str | None:
    path = path.replace("\\", "/")
    candidates = [os.path.realpath(path)]
    if not os.path.isabs(path):
        candidates.append(os.path.realpath(os.path.join(root, path)))
    for real in candidates:
        if inside(root_real, real):
            rel = Path(os.path.relpath(real, root_real)).as_posix()
            if rel in known:
                return rel
    parts = [p for p in path.split("/") if p not in ("", ".")]
    for start in range(len(parts)):
        rel = "/".join(parts[start:])
        if rel in known:
            return rel
    return None


def load_predictions(path: str | os.PathLike, root: str | os.PathLike, images: Iterable[str]) -> dict[str, float]:
    """Read a ``tastelab score --out`` file (.jsonl / .csv / .parquet) and match it to the folder's images."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--predictions file not found: {path}")
    return match_predictions(read_results(path), root, images)
