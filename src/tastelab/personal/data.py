"""A person's labels -> a :class:`~tastelab.personal.select.Task`: A/B votes or per-image scores, detected.

Every problem a user can cause (a missing folder, a vote naming a photo that is not there, too few votes)
is a :class:`~tastelab.core.errors.UserError` naming the input, so the CLI prints one line and exits 2.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tastelab.core.errors import UserError
from tastelab.io.records import Record, RecordError, load_records
from tastelab.io.votes import Vote, load_votes, read_vote_table
from tastelab.personal.fit import Pairs
from tastelab.personal.select import Kind, Task

#: Below these a cross-validated choice means nothing: refuse rather than pretend.
MIN_VOTES = 20
MIN_IMAGES = 8


@dataclass
class Labels:
    """What was read: image paths (task indices point into them), the task, and the native score range."""

    path: Path
    kind: Kind
    images: list[str]
    task: Task
    score_range: tuple[float, float] | None


def detect_kind(path: Path) -> Kind:
    """Votes when the file is a table with image_a, image_b, votes_a, votes_b columns; scores otherwise."""
    if path.suffix.lower() == ".json":
        return "scores"
    try:
        read_vote_table(path)
    except RecordError as exc:
        if "not a votes table" in str(exc):
            return "scores"
        raise
    return "votes"


def load_labels(labels: str | os.PathLike, images: str | os.PathLike | None = None) -> Labels:
    """Read votes (any table :func:`~tastelab.io.votes.load_votes` reads) or a score file (personal JSON/CSV,
    MOS table) against the ``images`` folder (default: found as the readers find it)."""
    path = Path(labels)
    if not path.is_file():
        raise UserError(f"{path}: labels file not found")
    if images is not None and not Path(images).is_dir():
        raise UserError(f"{images}: images folder not found")
    kind = detect_kind(path)
    if kind == "votes":
        votes, problems = load_votes(path, image_root=images)
        missing = [p for p in problems if "image not found" in p.message]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise UserError(f"{missing[0]}{more}")
        return votes_labels(path, votes)
    rs = load_records(path, image_root=images)
    missing_rec = [p for p in rs.problems if "image not found" in p.message]
    if missing_rec:
        raise UserError(str(missing_rec[0]))
    return score_labels(path, rs.records, tuple(rs.score_range))  # type: ignore[arg-type]


def votes_labels(path: Path, votes: Sequence[Vote]) -> Labels:
    """Votes already read (e.g. a recipe's train+val votes) -> Labels; too few is a UserError naming ``path``."""
    names = sorted({v.image_a for v in votes} | {v.image_b for v in votes})
    if len(votes) < MIN_VOTES or len(names) < MIN_IMAGES:
        raise UserError(f"{path}: {len(votes)} usable votes over {len(names)} images; training a personal "
                        f"model needs at least {MIN_VOTES} votes over {MIN_IMAGES} images")
    index = {n: i for i, n in enumerate(names)}
    pairs = Pairs(np.array([index[v.image_a] for v in votes]), np.array([index[v.image_b] for v in votes]),
                  np.array([v.votes_a for v in votes], dtype=np.float64),
                  np.array([v.votes_b for v in votes], dtype=np.float64))
    return Labels(path, "votes", names, Task("votes", len(names), pairs=pairs), None)


def score_labels(path: Path, records: Sequence[Record], score_range: tuple[float, float]) -> Labels:
    """Scored records already read (e.g. a recipe's train+val images) -> Labels (unscored ones are skipped)."""
    recs = [r for r in records if r.score is not None]
    if len(recs) < MIN_IMAGES:
        raise UserError(f"{path}: {len(recs)} scored images; training a personal model needs at least {MIN_IMAGES}")
    targets = np.array([float(r.score) for r in recs], dtype=np.float64)  # type: ignore[arg-type]
    if not np.isfinite(targets).all():
        raise UserError(f"{path}: non-finite scores")
    return Labels(path, "scores", [r.path for r in recs], Task("scores", len(recs), targets=targets),
                  (float(score_range[0]), float(score_range[1])))
