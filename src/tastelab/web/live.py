"""The live personal model of a labelling session: trained in the background as votes come in, measured on votes
it never saw, asked for the pairs it is least sure about, and used to score folders of new photos.

Rules (why the code looks the way it does):

* **Never in a request's way.** One worker thread does all the slow work (feature extraction, fits, scoring
  folders); request handlers only read a published snapshot under a short lock. A vote handler calls
  :meth:`LiveModel.notify`, which stores the vote list and wakes the worker: O(1) apart from copying a list.
* **One training at a time, newest wins.** Only the latest vote list is kept as the pending job: a job still
  waiting when newer votes arrive is dropped (counted in ``superseded``). A finished fit whose votes are no
  longer a prefix of the session's votes (an undo happened meanwhile) is discarded, not shown.
* **Features once.** Every image of the folder goes through the extractor once (the default one reads and
  fills the on-disk feature cache, so a restart is instant); unreadable images are left out of training.
* **Honest numbers.** ``heldout_accuracy`` is the share of votes the recipe predicts on images its fold's model
  never saw (image-fold cross-validation of the chosen recipe, or the nested estimate when the search settings
  ask for it; the label says which). ``next_votes_accuracy``
  is the previous model's accuracy on the votes cast after it was trained: votes it could not have seen
  (mostly among photos it did see, and chosen by the active-learning policy, so usually harder). Each retrain
  appends both to the learning curve, a JSON file beside the votes file, rewritten atomically.
* **Active learning** (:meth:`LiveModel.propose`): of the pairs not taken from the ranking's own proposal (the
  exploration share, ``explore``), half look for the pair the model is least sure about (the smallest score
  difference relative to the spread of its scores, among :attr:`LiveConfig.candidates` random pairs) and half
  for the strongest disagreement between the model and the person's current ranking (both images judged, the
  two orders opposite, the product of the two normalised differences most negative); with no disagreement
  the uncertain pair is used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from tastelab.core.atomic import write_text_atomic
from tastelab.io.rows import safe_row
from tastelab.web.paths import ImageIndex
from tastelab.web.personal_fit import Extractor, ExtractorSpec, Features, LiveFit, VoteRow, fit_votes
from tastelab.web.session import BadRequest, Conflict

logger = logging.getLogger(__name__)

#: Score files of scored folders go to this folder beside the votes file.
SCORED_DIR = "tastelab_scored"
#: The live model is saved here (beside the votes file) by ``POST /api/model/save``.
MODEL_DIR = "tastelab_model"
#: Jobs remembered for ``GET /api/jobs/{id}``.
_MAX_JOBS = 64
#: Learning-curve points sent with every stats answer (the file keeps them all).
_CURVE_SHOWN = 200

FitFn = Callable[..., LiveFit]
LIVE_SEARCH: dict[str, Any] = {"linear_lams": (1e-1, 1.0, 10.0), "mlp_widths": (), "max_ensemble": 2,
                               "nested_max_votes": 0}


class _Stopped(Exception):
    """Raised from a progress callback to end a background extraction when the session closes."""


class LiveError(BadRequest):
    """A request the live model cannot honour as sent (not a folder, too many images): HTTP 400."""


class LiveConflict(Conflict):
    """Valid, but not now (no model yet, training disabled): HTTP 409."""


@dataclass
class LiveConfig:
    """How the live loop behaves (``tastelab label --live-min-votes/--explore/...``)."""

    min_votes: int = 30
    #: Retrain after this many new votes, or this share of the votes, whichever is more.
    retrain_every: int = 10
    retrain_growth: float = 0.15
    #: Share of pairs still taken from the ranking's own proposal (exploration).
    explore: float = 0.5
    #: Random pairs examined per model-driven proposal.
    candidates: int = 256
    max_score_images: int = 2000
    folds: int = 4
    seed: int = 0
    #: The recipe search of a live fit (keyword arguments of :func:`tastelab.personal.select.search`, plus
    #: ``nested_max_votes``): linear heads over the extractor's feature sets and three L2 strengths, ensembles
    #: of two, 4 image folds, no nested estimate (its cost is folds x the search). Smaller than ``tastelab train
    #: personal``'s so a retrain stays in seconds; fixed before the simulated-person bench ran, not tuned on it.
    search: dict[str, Any] = field(default_factory=lambda: dict(LIVE_SEARCH))

    def __post_init__(self) -> None:
        if self.min_votes < 1 or self.retrain_every < 1 or self.candidates < 1 or self.max_score_images < 1:
            raise ValueError("live model settings must be positive")
        if not 0.0 <= self.explore <= 1.0 or not math.isfinite(self.explore):
            raise ValueError(f"--explore must be between 0 and 1, got {self.explore}")


@dataclass
class Job:
    """A background job the page can poll: scoring a folder."""

    id: str
    kind: str
    folder: str
    state: str = "queued"
    done: int = 0
    total: int = 0
    out: str | None = None
    error: str | None = None
    model_votes: int | None = None
    items: list[dict[str, Any]] = field(default_factory=list)
    index: ImageIndex | None = field(default=None, repr=False)
    created: float = field(default_factory=time.time)

    def public(self, with_items: bool = True) -> dict[str, Any]:
        out = {"id": self.id, "kind": self.kind, "folder": self.folder, "state": self.state, "done": self.done,
               "total": self.total, "out": self.out, "error": self.error, "model_votes": self.model_votes}
        if with_items and self.state == "done":
            out["items"] = self.items
        return out


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def pair_accuracy(scores: Mapping[str, float], votes: Sequence[VoteRow]) -> float | None:
    """Vote-weighted share of ``votes`` the scores order right (equal scores count half); None without votes."""
    right = total = 0.0
    for a, b, va, vb in votes:
        if a not in scores or b not in scores:
            continue
        d = scores[a] - scores[b]
        right += va * (d > 0) + vb * (d < 0) + 0.5 * (va + vb) * (d == 0)
        total += va + vb
    return right / total if total else None


def _finite_or_none(x: float | None) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


class LiveModel:
    """The background model of one session (see the module docstring). Thread-safe."""

    def __init__(self, names: Sequence[str], root: str | os.PathLike, votes_path: str | os.PathLike,
                 extractor: Extractor, *, saveable: ExtractorSpec | None = None, config: LiveConfig | None = None,
                 fit: FitFn = fit_votes) -> None:
        self.names = list(names)
        self.root_real = os.path.realpath(root)
        self.votes_path = Path(votes_path)
        self.curve_path = self.votes_path.with_name(self.votes_path.stem + ".live.json")
        self.extractor = extractor
        self.saveable = saveable
        self.config = config or LiveConfig()
        self._fit_fn = fit
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._stop = False
        self._thread: threading.Thread | None = None
        # features
        self._feat_state = "pending"
        self._feat_done = 0
        self._feat_error: str | None = None
        self._features: Features | None = None
        self._feat_names: list[str] = []
        # training
        self._latest: tuple[VoteRow, ...] = ()
        self._pending: tuple[VoteRow, ...] | None = None
        self._requested = 0
        self._training_on: int | None = None
        self._superseded = 0
        self._discarded = 0
        self._fits = 0
        self._train_error: str | None = None
        self._fit: LiveFit | None = None
        self._fit_votes: tuple[VoteRow, ...] = ()
        self._trained_at: str | None = None
        self._train_seconds: float | None = None
        self._scores: dict[str, float] = {}
        self._arr: tuple[list[str], np.ndarray, float, dict[str, int]] | None = None
        self._saved_to: str | None = None
        self.curve: list[dict[str, Any]] = self._read_curve()
        # jobs
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._queue: list[Job] = []
        #: A folder to score as soon as the first model is trained (``--score-folder``), and the one the page shows.
        self.auto_score: str | None = None
        self.default_folder: str | None = None

    # ------------------------------------------------------------------------------------------- life cycle

    def start(self) -> LiveModel:
        """Start the worker; it extracts the folder's features at once (cached), then waits for votes."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="tastelab-live", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float | None = 5.0) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def _read_curve(self) -> list[dict[str, Any]]:
        try:
            data = json.loads(self.curve_path.read_text(encoding="utf-8"))
            curve = data.get("curve") if isinstance(data, dict) else None
            return [p for p in curve if isinstance(p, dict)] if isinstance(curve, list) else []
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            logger.warning("%s: unreadable learning curve (%s); starting a new one", self.curve_path, exc)
            return []

    # ------------------------------------------------------------------------------------------- votes in

    def notify(self, votes: Sequence[VoteRow]) -> None:
        """The session's votes changed (a vote or an undo): queue a retrain when due. Never blocks for long."""
        n = len(votes)
        with self._wake:
            self._latest = tuple(votes)
            if n < self.config.min_votes:
                self._pending = None
                return
            last = self._requested
            due = max(last + self.config.retrain_every, math.ceil(last * (1 + self.config.retrain_growth)))
            if self._fit is not None and n < last:  # an undo went below the model's votes: refit on what is left
                due = n
            if last and n < due and n >= last:
                return
            if self._pending is not None:
                self._superseded += 1  # a job still waiting: the newer votes replace it
            self._pending = self._latest
            self._requested = n
            self._wake.notify_all()

    # ------------------------------------------------------------------------------------------- the worker

    def _work(self) -> None:
        self._extract()
        while True:
            with self._wake:
                while not self._stop and self._pending is None and not self._queue:
                    self._wake.wait()
                if self._stop:
                    return
                if self._pending is not None and self._features is not None:
                    votes, self._pending = self._pending, None
                    self._training_on = len(votes)
                    job = None
                else:
                    if not self._queue:
                        self._pending = None
                        continue
                    job, votes = self._queue.pop(0), ()
            if job is None:
                self._train(votes)
            else:
                self._score(job)

    def _extract(self) -> None:
        paths = [os.path.join(self.root_real, *n.split("/")) for n in self.names]
        with self._lock:
            self._feat_state = "extracting"
        t = time.perf_counter()

        def progress(k: int) -> None:
            with self._lock:
                self._feat_done += k
                if self._stop:  # the session closed: abandon the extraction at the next batch
                    raise _Stopped

        try:
            feats, errors = self.extractor(paths, progress)
        except _Stopped:
            return
        except Exception as exc:  # the page shows why; votes keep working without a model
            logger.exception("live model: feature extraction failed")
            with self._lock:
                self._feat_state, self._feat_error = "failed", f"{type(exc).__name__}: {exc}"
            return
        bad = {os.path.realpath(p) for p in errors}
        keep = [i for i, p in enumerate(paths) if os.path.realpath(p) not in bad and p not in errors]
        if errors:
            logger.warning("live model: %d images could not be read and are left out of training", len(errors))
        import torch  # heavy: the features are torch tensors

        idx = torch.as_tensor(keep, dtype=torch.long)
        with self._lock:
            self._features = {k: v[idx] for k, v in feats.items()}
            self._feat_names = [self.names[i] for i in keep]
            self._feat_state = "ready"
            self._feat_done = len(paths)
        logger.info("live model: features of %d images in %.1fs", len(keep), time.perf_counter() - t)

    def _train(self, votes: tuple[VoteRow, ...]) -> None:
        with self._lock:
            feats, names = self._features, self._feat_names
        assert feats is not None
        known = set(names)
        usable = [v for v in votes if v[0] in known and v[1] in known]
        t = time.perf_counter()
        try:
            fitted = self._fit_fn(names, feats, usable, seed=self.config.seed, folds=self.config.folds,
                                  **self.config.search)
            error = None
        except Exception as exc:  # too few usable votes, a degenerate fold...: shown, never fatal
            logger.warning("live model: training on %d votes failed: %s", len(usable), exc)
            fitted, error = None, f"{type(exc).__name__}: {exc}"
        seconds = time.perf_counter() - t
        scores: dict[str, float] = {}
        if fitted is not None:
            pred = fitted.predict(feats)
            if not np.isfinite(pred).all():
                fitted, error = None, "the fit produced non-finite scores; not used"
            else:
                scores = {n: float(s) for n, s in zip(names, pred)}
        with self._wake:
            self._training_on = None
            self._fits += 1
            if fitted is None:
                self._train_error = error
                return
            if self._latest[:len(votes)] != votes:  # an undo removed a vote this model learnt from
                self._discarded += 1
                if self._pending is None and len(self._latest) >= self.config.min_votes:
                    self._pending, self._requested = self._latest, len(self._latest)
                return
            prev_votes = len(self._fit_votes)
            next_acc = (pair_accuracy(self._scores, votes[prev_votes:])
                        if self._fit is not None and len(votes) > prev_votes and self._fit_votes == votes[:prev_votes]
                        else None)
            self._fit, self._fit_votes, self._scores = fitted, votes, scores
            self._train_error = None
            self._trained_at, self._train_seconds = _now(), seconds
            order = list(scores)
            arr = np.array([scores[n] for n in order], dtype=np.float64)
            spread = float(arr.std()) or 1.0
            self._arr = (order, arr, spread, {n: i for i, n in enumerate(order)})
            point = {"votes": len(votes), "votes_used": len(usable), "images": fitted.n_images,
                     "heldout_accuracy": _finite_or_none(fitted.heldout), "heldout_kind": fitted.heldout_kind,
                     "cv": _finite_or_none(fitted.cv), "chosen": fitted.chosen,
                     "next_votes_accuracy": _finite_or_none(next_acc),
                     "next_votes": len(votes) - prev_votes if next_acc is not None else 0,
                     "trained_at": self._trained_at, "seconds": round(seconds, 3)}
            self.curve.append(point)
            curve = list(self.curve)
            auto = self.auto_score
            self.auto_score = None
        try:
            write_text_atomic(self.curve_path, json.dumps({"votes_file": str(self.votes_path), "curve": curve},
                                                          indent=1, allow_nan=False))
        except OSError as exc:
            logger.error("could not write the learning curve %s: %s", self.curve_path, exc)
        logger.info("live model: %d votes -> held-out accuracy %s (%s) in %.1fs", len(votes), point["heldout_accuracy"],
                    fitted.heldout_kind, seconds)
        if auto:
            try:
                self.score_folder(auto)
            except (LiveError, LiveConflict) as exc:
                logger.warning("--score-folder %s: %s", auto, exc)

    # ------------------------------------------------------------------------------------------- reading

    def scores(self) -> dict[str, float]:
        """The current model's score (1..10) per image of the folder; empty before the first model."""
        with self._lock:
            return dict(self._scores)

    def status(self) -> dict[str, Any]:
        """What ``GET /api/stats`` carries under ``model`` (and ``GET /api/model`` returns)."""
        with self._lock:
            fit = self._fit
            n = len(self._latest)
            last = self.curve[-1] if self.curve and fit is not None else None
            return {
                "enabled": True,
                "min_votes": self.config.min_votes,
                "votes_needed": max(0, self.config.min_votes - n),
                "features": self._feat_state,
                "features_done": self._feat_done,
                "features_total": len(self.names),
                "features_error": self._feat_error,
                "ready": fit is not None,
                "training": self._training_on is not None,
                "training_on_votes": self._training_on,
                "votes_used": len(self._fit_votes) if fit is not None else None,
                "images_used": fit.n_images if fit is not None else None,
                "heldout_accuracy": _finite_or_none(fit.heldout) if fit is not None else None,
                "heldout_kind": fit.heldout_kind if fit is not None else None,
                "cv": _finite_or_none(fit.cv) if fit is not None else None,
                "chosen": fit.chosen if fit is not None else None,
                "next_votes_accuracy": last["next_votes_accuracy"] if last else None,
                "trained_at": self._trained_at,
                "train_seconds": self._train_seconds,
                "fits": self._fits,
                "superseded": self._superseded,
                "discarded": self._discarded,
                "error": self._train_error,
                "explore": self.config.explore,
                "saveable": self.saveable is not None,
                "saved_to": self._saved_to,
                "curve_file": str(self.curve_path),
                "score_folder": self.default_folder,
                "last_job": next(reversed(self._jobs)) if self._jobs else None,
                "curve": [{"votes": p.get("votes"), "heldout_accuracy": p.get("heldout_accuracy"),
                           "next_votes_accuracy": p.get("next_votes_accuracy")} for p in self.curve[-_CURVE_SHOWN:]],
            }

    # ------------------------------------------------------------------------------------------- active learning

    def propose(self, rng: np.random.Generator, exclude: Collection[Collection[str]] = (),
                ranking: Mapping[str, float] | None = None, counts: Mapping[str, float] | None = None
                ) -> tuple[str, str, str] | None:
        """A pair the model is unsure about or disagrees with the ranking on: ``(a, b, why)``; None before the
        first model. Costs O(images + candidates): one pass to read the ranking, vectorised over candidates."""
        with self._lock:
            arr = self._arr
        if arr is None:
            return None
        names, s, spread, _pos = arr
        n = len(names)
        if n < 2:
            return None
        m = min(self.config.candidates, n * (n - 1) // 2)
        i = rng.integers(0, n, m)
        j = (i + rng.integers(1, n, m)) % n
        dm = (s[i] - s[j]) / spread
        why = "uncertain"
        key = np.abs(dm)
        if ranking is not None and counts is not None and rng.random() < 0.5:
            r = np.fromiter((float(ranking.get(x, 0.0)) for x in names), np.float64, n)
            c = np.fromiter((float(counts.get(x, 0.0)) for x in names), np.float64, n)
            judged = (c[i] > 0) & (c[j] > 0)
            rs = float(r[c > 0].std()) if (c > 0).sum() > 2 else 0.0
            if rs > 0:
                agree = dm * (r[i] - r[j]) / rs
                clash = judged & (agree < 0)
                if clash.any():
                    key, why = np.where(clash, agree, np.inf), "disagrees with your votes"
        blocked = {frozenset(p) for p in exclude if len(set(p)) == 2}
        for k in np.argsort(key, kind="stable"):
            if not np.isfinite(key[k]):
                break
            a, b = names[int(i[k])], names[int(j[k])]
            if frozenset((a, b)) not in blocked:
                return (a, b, why) if rng.random() < 0.5 else (b, a, why)
        return None

    # ------------------------------------------------------------------------------------------- new folders

    def score_folder(self, folder: object) -> Job:
        """Queue scoring every image of ``folder`` (an existing local directory, absolute path) with the current
        model; the results go to a JSONL score file beside the votes file (see :attr:`Job.out`)."""
        if not isinstance(folder, str) or not folder.strip() or "\x00" in folder:
            raise LiveError("path: give the absolute path of a local folder")
        shown = folder[:300] if folder.isprintable() else ascii(folder[:300])  # one line, whatever was sent
        path = Path(folder).expanduser()
        if not path.is_absolute():
            raise LiveError(f"{shown}: give an absolute path (the server does not guess its working folder)")
        if not path.is_dir():
            raise LiveError(f"{shown}: not an existing folder")
        index = ImageIndex(path)  # images whose real path stays inside the folder (symlinks out are left out)
        if not len(index):
            raise LiveError(f"{shown}: no images found")
        if len(index) > self.config.max_score_images:
            raise LiveError(f"{shown}: {len(index)} images; the page scores at most {self.config.max_score_images} "
                            "(use `tastelab score` with a saved model for more)")
        with self._wake:
            if self._fit is None:
                raise LiveConflict(f"no model yet: it trains after {self.config.min_votes} votes")
            real = os.path.realpath(path)
            digest = hashlib.sha256(real.encode("utf-8", "surrogateescape")).hexdigest()[:8]
            stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", path.name or "folder")[:60]
            job = Job(secrets.token_hex(8), "score-folder", real, total=len(index), index=index,
                      out=str(self.votes_path.parent / SCORED_DIR / f"{stem}-{digest}.jsonl"))
            self._jobs[job.id] = job
            while len(self._jobs) > _MAX_JOBS:
                self._jobs.popitem(last=False)
            self._queue.append(job)
            self._wake.notify_all()
        return job

    def job(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def jobs(self) -> list[dict[str, Any]]:
        with self._lock:
            return [j.public(with_items=False) for j in self._jobs.values()]

    def _score(self, job: Job) -> None:
        with self._lock:
            fit, votes = self._fit, len(self._fit_votes)
            job.state, job.model_votes = "running", votes
        assert fit is not None and job.index is not None and job.out is not None
        index = job.index
        paths = [r for r in (index.resolve(n) for n in index.images) if r is not None]
        names = [n for n in index.images if index.resolve(n) is not None]

        def progress(k: int) -> None:
            with self._lock:
                job.done += k

        try:
            feats, errors = self.extractor(paths, progress)
            bad = set(errors)
            keep = [k for k, p in enumerate(paths) if p not in bad]
            import torch  # heavy: the features are torch tensors

            idx = torch.as_tensor(keep, dtype=torch.long)
            pred = fit.predict({k: v[idx] for k, v in feats.items()}) if keep else np.empty(0)
            rows, items = [], []
            model = f"personal-live@{votes}votes"
            model_hash = hashlib.sha256(f"{self.votes_path}:{votes}:{fit.chosen}".encode()).hexdigest()[:16]
            for k, raw in zip(keep, pred):  # score: 1..10 clamped, as every tastelab model reports it
                rows.append(safe_row({"path": paths[k], "score": min(10.0, max(1.0, float(raw))),
                                      "raw_score": float(raw)}, model, model_hash))
            for p, why in errors.items():
                rows.append(safe_row({"path": p, "error": why}, model, model_hash))
            for k, raw in sorted(zip(keep, pred), key=lambda t: -t[1]):  # ranked by the unclamped value
                if math.isfinite(float(raw)):
                    items.append({"path": names[k], "score": round(min(10.0, max(1.0, float(raw))), 4),
                                  "raw_score": round(float(raw), 4)})
            text = "".join(json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n" for r in rows)
            out = Path(job.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(out, text)
        except Exception as exc:
            logger.exception("scoring %s failed", job.folder)
            with self._lock:
                job.state, job.error = "failed", f"{type(exc).__name__}: {exc}"
            return
        with self._lock:
            for rank, it in enumerate(items, 1):
                it["rank"] = rank
            job.items, job.state, job.done = items, "done", job.total

    def scored_file(self, job_id: str, rel: str) -> str | None:
        """Real path of an image of a scored folder (confined like ``/img/``), or None."""
        job = self.job(job_id)
        return job.index.resolve(rel) if job is not None and job.index is not None else None

    # ------------------------------------------------------------------------------------------- saving

    def save(self, out: str | os.PathLike | None = None) -> str:
        """Save the current model as a tastelab model folder (default: ``tastelab_model`` beside the votes)."""
        with self._lock:
            fit, votes = self._fit, len(self._fit_votes)
        if self.saveable is None:
            raise LiveConflict("this session's feature extractor cannot be saved as a model folder")
        if fit is None:
            raise LiveConflict(f"no model yet: it trains after {self.config.min_votes} votes")
        target = Path(out) if out is not None else self.votes_path.parent / MODEL_DIR
        fit.save(target, self.saveable, training={"labels": str(self.votes_path), "votes": votes,
                                                   "source": "tastelab label (live model)"})
        with self._lock:
            self._saved_to = str(target)
        return str(target)
