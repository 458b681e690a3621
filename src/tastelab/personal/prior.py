"""Priors: generic aesthetic models whose scores the personal search may add to (or use instead of) the
person's own model, as in personalised aesthetics (a generic model + a personal part).

Any folder ``tastelab score`` loads (a single model or an ensemble) can be a prior. It is untrusted input: it
loads through :func:`tastelab.models.load_model` with its defaults (no remote code, no weights outside the
folder), and any problem with it is a :class:`~tastelab.core.errors.UserError` naming the folder.

Each prior scores the labelled images once, through the normal inference API (:class:`~tastelab.inference.
scoring.Scorer`), on the product's 1..10 scale before clamping (``unit_scale(raw_score)``), cached on disk per
(model content hash, image files). The search (:mod:`tastelab.personal.select`, stage 5) only reads these
numbers; :func:`prior_members` turns a chosen prior back into ensemble members for the saved folder.

Two ways to use a prior (stage 5 tries both, CV chooses): late fusion (the best personal candidate's
z-score + c x the prior's) and a residual fit (:func:`offset_terms`: a linear head fitted with c x the prior's
z-score as a fixed offset, so its L2 pulls the model towards the prior rather than towards zero). Both save
as an ensemble folder of the personal member(s) and the prior's members.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tastelab.core.errors import UserError

if TYPE_CHECKING:
    from tastelab.io.images import PreprocessConfig
    from tastelab.models.ensemble import EnsembleModel
    from tastelab.models.model import TasteModel
    from tastelab.personal.select import Task

logger = logging.getLogger(__name__)

#: Sub-folder of the feature cache holding priors' scores.
CACHE_SUBDIR = "prior_scores"


@dataclass(frozen=True)
class Prior:
    """A prior model folder: its name in candidate labels, content hash and preprocessing."""

    folder: Path
    name: str
    hash: str
    preprocess: PreprocessConfig


def load_prior_model(folder: str | os.PathLike) -> TasteModel | EnsembleModel:
    """The prior's model, loaded by the safe loader; any failure is one UserError naming the folder."""
    from tastelab.models import load_model

    path = Path(folder)
    if not path.is_dir():
        raise UserError(f"{path}: prior model folder not found")
    try:
        return load_model(path)
    except Exception as exc:  # untrusted input: whatever the loader rejects is the folder's fault
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"{path}: not a usable prior model folder ({why})") from None


def open_priors(folders: Sequence[str | os.PathLike]) -> list[Prior]:
    """Check every prior folder loads, and that they all preprocess alike (the saved ensemble runs one input
    for all its members); names are the folder names, made unique."""
    from tastelab.models.identity import folder_hash

    out: list[Prior] = []
    seen: set[str] = set()
    for f in folders:
        model = load_prior_model(f)
        path = Path(f)
        name = path.resolve().name or "prior"
        base, k = name, 2
        while name in seen:
            name, k = f"{base}-{k}", k + 1
        seen.add(name)
        out.append(Prior(path, name, folder_hash(path), model.preprocess))
    for p in out[1:]:
        if p.preprocess != out[0].preprocess:
            raise UserError(f"{p.folder}: prior preprocesses images differently from {out[0].folder}; priors must "
                            "share their preprocessing (size, resize, normalisation)")
    return out


def _cache_file(cache_dir: Path, prior: Prior, paths: Sequence[str]) -> Path:
    h = hashlib.blake2b(digest_size=16)
    for p in paths:
        st = os.stat(p)
        h.update(f"{os.path.realpath(p)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
    return cache_dir / CACHE_SUBDIR / f"{prior.hash}-{h.hexdigest()}.json"


def prior_scores(prior: Prior, paths: Sequence[str], *, cache_dir: str | os.PathLike | None = None,
                 device: str = "auto", batch_size: int = 32, workers: int | None = 0,
                 progress: Callable[[int], None] | None = None) -> tuple[np.ndarray, dict[str, str]]:
    """The prior's unclamped 1..10 score of every path (NaN where unreadable) and the unreadable paths (path ->
    why), read from / written to the cache under ``cache_dir`` when given."""
    from tastelab.core.atomic import write_text_atomic

    target = _cache_file(Path(cache_dir), prior, paths) if cache_dir is not None else None
    if target is not None and target.is_file():
        try:
            cached = np.asarray(json.loads(target.read_text(encoding="utf-8")), dtype=np.float64)
            if cached.shape == (len(paths),) and np.isfinite(cached).all():
                if progress:
                    progress(len(paths))
                return cached.astype(np.float64), {}
        except (OSError, ValueError, TypeError) as exc:
            logger.warning("%s: unreadable prior score cache (%s); scoring again", target, exc)
    from tastelab.inference.scoring import Scorer
    from tastelab.models.folder import unit_scale

    scorer = Scorer(load_prior_model(prior.folder), backend="torch", device=device, batch_size=batch_size,
                    workers=workers)
    rng = scorer.config.score_range
    out = np.full(len(paths), np.nan)
    errors: dict[str, str] = {}
    where = {p: i for i, p in enumerate(paths)}
    for r in scorer.score_files(list(paths)):
        assert r.path is not None
        if r.error is not None or r.raw_score is None:
            errors[r.path] = r.error or "no score"
        else:
            out[where[r.path]] = float(unit_scale(r.raw_score, rng))
        if progress:
            progress(1)
    if target is not None and not errors and np.isfinite(out).all():
        write_text_atomic(target, json.dumps(out.tolist()))
    return out, errors


def prior_members(prior: Prior) -> tuple[list[TasteModel], list[float]]:
    """The prior's models as ensemble members and their normalised weights (an ensemble prior's own members
    and weights: nested ensembles are flattened, which computes the same average)."""
    from tastelab.models.ensemble import EnsembleModel
    from tastelab.models.identity import folder_hash

    if folder_hash(prior.folder) != prior.hash:
        raise UserError(f"{prior.folder}: the prior model folder changed during training")
    model = load_prior_model(prior.folder)
    if isinstance(model, EnsembleModel):
        return list(model._member_models), [float(w) for w in model.weights]
    return [model], [1.0]


def offset_terms(task: Task, scores: dict[str, np.ndarray], group: Sequence[tuple[str, float]],
                 images: np.ndarray) -> tuple[tuple[str, float, float, float], ...]:
    """A residual fit's offset as ``(name, c', mu, sd)`` per prior: offset = sum c' (p - mu) / sd, with mu, sd
    the prior's mean and SD over ``images`` (the fitting images: held-out images never set it) and c' = c
    for votes (logits per prior SD) or c x the labels' SD over ``images`` for scores (the offset then
    lives on the labels' scale, so the ridge residual and its L2 mean the same for any label range).
    The same form as :class:`~tastelab.personal.select.PriorFit`'s terms, which the saved folder uses."""
    idx = np.asarray(images, dtype=np.int64)
    scale = 1.0
    if task.kind == "scores":
        assert task.targets is not None
        sd_y = float(np.asarray(task.targets, dtype=np.float64)[idx].std())
        scale = sd_y if sd_y > 0 else 1.0
    out = []
    for name, c in group:
        ref = np.asarray(scores[name], dtype=np.float64)[idx]
        sd = float(ref.std())
        out.append((name, float(c) * scale, float(ref.mean()), sd if sd > 0 else 1.0))
    return tuple(out)


def offset_values(terms: Sequence[tuple[str, float, float, float]], scores: dict[str, np.ndarray]) -> np.ndarray:
    """The offset of every image: sum c' (p - mu) / sd over :func:`offset_terms`."""
    return np.sum([c * (np.asarray(scores[n], dtype=np.float64) - mu) / sd for n, c, mu, sd in terms], axis=0)


def describe(priors: Sequence[Prior]) -> list[dict[str, Any]]:
    return [{"name": p.name, "folder": str(p.folder), "hash": p.hash} for p in priors]
