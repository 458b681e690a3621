"""One labelling session: images, votes file, ranking, score file, and the rules that keep them consistent.

Consistency rules (why the code looks the way it does):

* **One lock around every change.** A vote is validate -> append + fsync -> update ranking -> rewrite score
  file, all under one process-wide lock, so two tabs (or two threads of the server) can never interleave
  half-votes, and the in-memory state always equals a replay of the votes file.
* **Pair ids.** Every proposed pair gets a random id. A vote names the pair id *and* the two images it
  shows: the vote is recorded against those images even if the ranking has moved on since the pair was
  proposed (a stale tab's judgement is still a valid judgement). A pair id is answered at most once (a
  double click or a retried request records nothing new), and an id known to show other images is refused.
  An id this process never issued (a forged request, a tab left open across a restart, an id pushed out of the
  bounded memory) is refused with 409: the page then asks for a new pair.
* **Undo** removes the last row of the votes file (atomic rewrite), reverts the ranking exactly and hands
  the undone pair back for a new judgement. A tab may pass the pair id of its own last vote so it never
  undoes a vote another tab cast after it (409 instead).
* **The question** the rater answers (``--question``) is shown on the page and stored in the score file's
  ``Metadata.question``; a restart without ``--question`` keeps the stored one.
* **Settledness** ("order stability" on the page) is Spearman's rho between the ranking now and the ranking
  :data:`SETTLE_WINDOW` votes ago, over the images judged so far: how little the last votes reorder the
  ranking, not whether it is right. A second :class:`~tastelab.pairwise.ratings.RatingState` trails the first by
  that many votes so this costs O(1) per vote.
* **One process per votes file**: an advisory lock on a hidden ``.<votes>.lock`` beside it stops a second
  ``tastelab label`` from interleaving its appends with ours.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import threading
from collections import OrderedDict, deque
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import quote

import numpy as np

from tastelab.io.textfiles import read_text_file
from tastelab.io.votes import Vote, VotesLog
from tastelab.pairwise.defaults import DEFAULT_K
from tastelab.pairwise.ratings import RatingState
from tastelab.web.paths import ImageIndex
from tastelab.web.state import rank_correlation, settledness

if TYPE_CHECKING:
    from tastelab.web.live import LiveModel

logger = logging.getLogger(__name__)

#: Settledness compares the ranking now with the ranking this many votes ago.
SETTLE_WINDOW = 20
#: ``Metadata.generator`` of the score files this app writes; other files are never overwritten.
GENERATOR = "tastelab label"
#: Default file names inside the image folder (where load_votes / load_personal_scores look by default).
DEFAULT_VOTES_NAME = "tastelab_votes.csv"
DEFAULT_SCORES_NAME = "tastelab_scores.json"
#: What the page asks when the user names no question: "better" is the rater's own preference.
DEFAULT_QUESTION = "Which of the two images do you like more?"
#: Longest question accepted (it is shown in the page header).
MAX_QUESTION = 300
#: Remembered pair ids (issued, answered): bounded so a week-long session cannot grow without limit.
_MAX_ISSUED = 4096
_MAX_ANSWERED = 100_000
_RECENT_SKIPS = 32

Choice = Literal["a", "b", "tie"]
CHOICE_VOTES: Mapping[str, tuple[float, float]] = {"a": (1.0, 0.0), "b": (0.0, 1.0), "tie": (0.5, 0.5)}
SORTS = ("score", "prediction", "disagreement")


class BadRequest(ValueError):
    """The request cannot be honoured as sent (unknown image, mismatched pair): HTTP 400."""


class Conflict(RuntimeError):
    """The request is valid but the state disagrees (nothing to undo, someone else's vote): HTTP 409."""


def image_url(rel: str, prefix: str = "/img/") -> str:
    """URL of an image path: every segment percent-encoded (spaces, ``#``, ``?``, non-ASCII)."""
    return prefix + quote(rel, safe="/")


class _ProcessLock:
    """Advisory exclusive lock on a hidden file beside the votes file (POSIX ``flock``; a no-op elsewhere)."""

    def __init__(self, votes_path: Path) -> None:
        self.path = votes_path.with_name(f".{votes_path.name}.lock")
        self._fd: int | None = None
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            raise ValueError(f"{votes_path} is in use by another `tastelab label` (lock {self.path})") from exc
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


def _check_score_file(path: Path) -> dict[str, Any]:
    """Refuse to overwrite a score file this app did not write (an image_comparison file holds real labels).

    Returns the file's ``Metadata`` (empty when there is no file yet) so a restart can keep its question.
    """
    if not path.exists():
        return {}
    try:
        data = json.loads(read_text_file(path))  # regular files only: a FIFO never blocks start-up
    except (OSError, ValueError) as exc:  # TextFileError is a ValueError
        raise ValueError(f"{path}: exists and is not a readable score file ({exc}); refusing to overwrite it "
                         "(pass another --scores)") from exc
    meta = data.get("Metadata") if isinstance(data, dict) else None
    records = data.get("ImageRecords") if isinstance(data, dict) else None
    if isinstance(meta, dict) and meta.get("generator") == GENERATOR:
        return meta
    if isinstance(records, dict) and not records:
        return {}
    raise ValueError(f"{path}: exists and was not written by `{GENERATOR}`; refusing to overwrite it "
                     "(pass another --scores, or move the file away)")


def _clean_question(text: object) -> str | None:
    """One line of at most :data:`MAX_QUESTION` characters, or None when empty / not text."""
    if not isinstance(text, str):
        return None
    line = " ".join(text.split())
    if len(line) > MAX_QUESTION:
        raise ValueError(f"--question is {len(line)} characters long; at most {MAX_QUESTION}")
    return line or None


class LabelSession:
    """State of one ``tastelab label`` run; thread-safe, every public method takes the session lock."""

    def __init__(
        self,
        image_dir: str | os.PathLike,
        votes_path: str | os.PathLike | None = None,
        scores_path: str | os.PathLike | None = None,
        *,
        predictions: Mapping[str, float] | None = None,
        k: float | None = None,
        seed: int | None = None,
        question: str | None = None,
    ) -> None:
        self.index = ImageIndex(image_dir)
        self.image_dir = self.index.root
        if len(self.index) < 2:
            raise ValueError(f"{self.image_dir}: found {len(self.index)} images; A/B labelling needs at least 2")
        self.votes_path = Path(votes_path) if votes_path is not None else self.image_dir / DEFAULT_VOTES_NAME
        self.scores_path = Path(scores_path) if scores_path is not None else self.image_dir / DEFAULT_SCORES_NAME
        self.predictions: dict[str, float] = dict(predictions or {})
        self.rng = np.random.default_rng(seed)
        #: The live personal model (``attach_live``): trained in the background, asked for uncertain pairs.
        self.live: LiveModel | None = None
        self._lock = threading.RLock()
        self._closed = False
        stored = _check_score_file(self.scores_path).get("question")
        self.question = _clean_question(question if question is not None else stored) or DEFAULT_QUESTION
        if question is not None and isinstance(stored, str) and stored and stored != self.question:
            logger.warning("the question changed from %r to %r; earlier votes answered the old one", stored,
                           self.question)
        self.votes_path.parent.mkdir(parents=True, exist_ok=True)
        self._process_lock = _ProcessLock(self.votes_path)
        try:
            self.votes = VotesLog(self.votes_path)
            self.k: float = DEFAULT_K if k is None else k
            self.ranker = RatingState(self.index.images, k=self.k)
            self._lagged = RatingState(self.index.images, k=self.k)
            # Per votes-file row: applied to the ranking? which pair id cast it (None: replayed)?
            self._applied: list[bool] = []
            self._row_ids: list[str | None] = []
            self._applied_votes: list[tuple[str, str, float, float]] = []
            self._issued: OrderedDict[str, frozenset[str]] = OrderedDict()
            self._answered: OrderedDict[str, None] = OrderedDict()
            self._skipped: deque[frozenset[str]] = deque(maxlen=_RECENT_SKIPS)
            self._replay()
            warning = self._write_scores()
            if warning:  # an unwritable --scores location: better to say so now than after an hour of votes
                raise ValueError(f"{self.scores_path}: {warning}")
        except BaseException:
            self._process_lock.release()
            raise
        logger.info("labelling %d images in %s; votes -> %s, scores -> %s (%s)", len(self.index), self.image_dir,
                    self.votes_path, self.scores_path, f"Elo, k={self.k:g}")

    # ---------------------------------------------------------------------------------------------- life cycle

    def close(self) -> None:
        """Release the votes-file lock (every vote is already on disk; nothing else to flush) and stop the live
        model's worker (a running fit finishes in the background; its result is no longer used)."""
        with self._lock:
            self._closed = True
            self._process_lock.release()
            live = self.live
        if live is not None:
            live.stop(timeout=2.0)

    def __enter__(self) -> LabelSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _replay(self) -> None:
        skipped = 0
        for row in self.votes.rows:
            vote, pair = row.vote, self._pair_of(row.vote)
            if vote is not None and pair is not None:
                self._apply(*pair, vote.votes_a, vote.votes_b)
            else:
                skipped += 1
            self._applied.append(pair is not None)
            self._row_ids.append(None)
        if skipped:
            logger.warning("%s: %d rows not applied (images not in %s, self-pairs or bad numbers)", self.votes_path,
                           skipped, self.image_dir)
        if self.votes.rows:
            logger.info("replayed %d votes from %s", len(self._applied_votes), self.votes_path)

    def attach_live(self, live: LiveModel) -> None:
        """Use ``live`` for active-learning proposals and tell it about every change of the votes (it may train
        at once when the votes file already holds enough)."""
        with self._lock:
            self.live = live
            live.notify(self._applied_votes)

    def _notify_live(self) -> None:
        if self.live is not None:
            self.live.notify(self._applied_votes)

    # ---------------------------------------------------------------------------------------------- ranking

    def _pair_of(self, vote: Vote | None) -> tuple[str, str] | None:
        """The vote's two images as indexed names, or None (not a vote, an image gone, or one image twice)."""
        if vote is None:
            return None
        a, b = self.index.canonical(vote.image_a), self.index.canonical(vote.image_b)
        return (a, b) if a is not None and b is not None and a != b else None

    def _apply(self, a: str, b: str, votes_a: float, votes_b: float) -> None:
        self.ranker.vote(a, b, votes_a=votes_a, votes_b=votes_b)
        self._applied_votes.append((a, b, votes_a, votes_b))
        n = len(self._applied_votes)
        if n > SETTLE_WINDOW:  # the trailing ranker holds exactly the votes up to SETTLE_WINDOW ago
            la, lb, lva, lvb = self._applied_votes[n - 1 - SETTLE_WINDOW]
            self._lagged.vote(la, lb, votes_a=lva, votes_b=lvb)

    def _unapply(self) -> None:
        if len(self._applied_votes) > SETTLE_WINDOW:
            self._lagged.undo()
        self._applied_votes.pop()
        self.ranker.undo()

    def _write_scores(self) -> str | None:
        """Rewrite the score file; a failure is logged and reported, never fatal (the votes file is the truth)."""
        meta = {"generator": GENERATOR, "created_by": GENERATOR, "votes_file": str(self.votes_path),
                "votes": len(self._applied_votes), "k": self.k, "question": self.question}
        try:  # atomic (temp file + fsync + os.replace): readers never see half a file
            # names are relative to the image folder, wherever the score file is (Metadata.paths says so)
            self.ranker.save(self.scores_path, metadata=meta, relative_to=self.image_dir)
        except OSError as exc:
            logger.error("could not write the score file %s: %s (votes are safe in %s)", self.scores_path, exc,
                         self.votes_path)
            return f"score file not written: {exc}"
        return None

    # ---------------------------------------------------------------------------------------------- pairs

    def _issue(self, pair: tuple[str, str] | None = None) -> dict[str, Any]:
        if pair is None:
            exclude = set(self._skipped)
            if self._applied_votes:
                exclude.add(frozenset(self._applied_votes[-1][:2]))
            if self.live is not None and self.rng.random() >= self.live.config.explore:
                picked = self.live.propose(self.rng, exclude, self.ranker.scores, self.ranker.counts)
                if picked is not None:
                    a, b, why = picked
                    return self._issued_pair(a, b, "model: " + why)
            pair = self.ranker.propose(self.rng, exclude=exclude)
            return self._issued_pair(*pair, "ranking")
        return self._issued_pair(*pair, "undo")

    def _issued_pair(self, a: str, b: str, why: str) -> dict[str, Any]:
        pair_id = secrets.token_hex(8)
        self._issued[pair_id] = frozenset((a, b))
        while len(self._issued) > _MAX_ISSUED:
            self._issued.popitem(last=False)
        return {"pair_id": pair_id, "a": a, "b": b, "url_a": image_url(a), "url_b": image_url(b), "proposed_by": why}

    def new_pair(self, skip: str | None = None) -> dict[str, Any]:
        """A fresh pair; ``skip`` names a pair id the user passed over (it is not proposed again soon)."""
        with self._lock:
            if skip is not None and skip in self._issued:
                self._skipped.append(self._issued[skip])
            return self._issue()

    # ---------------------------------------------------------------------------------------------- votes

    def _known(self, rel: str) -> str:
        if rel not in self.index:
            raise BadRequest(f"unknown image {rel!r}")
        return rel

    def vote(self, pair_id: str, a: str, b: str, choice: Choice, seconds: float | None = None) -> dict[str, Any]:
        """Record one judgement durably, update the ranking and the score file, and propose the next pair.

        ``seconds``: how long the pair was on screen before the answer (kept in the votes file for speed
        weighting in later fits; the live ranking counts every vote fully).
        """
        if choice not in CHOICE_VOTES:
            raise BadRequest(f"choice must be one of {sorted(CHOICE_VOTES)}, got {choice!r}")
        with self._lock:
            if self._closed:
                raise Conflict("the session is closed")
            a, b = self._known(a), self._known(b)
            if a == b:
                raise BadRequest("an image cannot be compared with itself")
            issued = self._issued.get(pair_id)
            if issued is None and pair_id not in self._answered:
                raise Conflict(f"pair {pair_id} was not issued by this server (restarted, or an old page); "
                               "not recorded: judge a new pair")
            if issued is not None and issued != frozenset((a, b)):
                raise BadRequest(f"pair {pair_id} showed {sorted(issued)}, not {sorted((a, b))}")
            if pair_id in self._answered:
                return {"recorded": False, "duplicate": True, "stats": self._stats(), "next": self._issue()}
            votes_a, votes_b = CHOICE_VOTES[choice]
            self.votes.append(a, b, votes_a, votes_b, seconds)  # durable before anything else changes
            self._apply(a, b, votes_a, votes_b)
            self._applied.append(True)
            self._row_ids.append(pair_id)
            self._answered[pair_id] = None
            while len(self._answered) > _MAX_ANSWERED:
                self._answered.popitem(last=False)
            self._notify_live()
            warning = self._write_scores()
            out: dict[str, Any] = {"recorded": True, "duplicate": False, "stats": self._stats(),
                                   "next": self._issue()}
            if warning:
                out["warning"] = warning
            return out

    def undo(self, pair_id: str | None = None) -> dict[str, Any]:
        """Remove the last vote from the votes file and the ranking; the undone pair comes back to be judged.

        With ``pair_id`` the undo only happens if the last vote is the one cast for that pair (a tab undoing
        its own vote, not one another tab cast since).
        """
        with self._lock:
            if self._closed:
                raise Conflict("the session is closed")
            if not self.votes.rows:
                raise Conflict("nothing to undo")
            last_id = self._row_ids[-1]
            if pair_id is not None and last_id != pair_id:
                raise Conflict("the last vote is not the one this page cast (another tab voted since); not undone")
            row = self.votes.pop()
            applied = self._applied.pop()
            self._row_ids.pop()
            if applied:
                self._unapply()
            if last_id is not None:
                self._answered.pop(last_id, None)
            self._notify_live()
            warning = self._write_scores()
            vote = row.vote
            pair = self._issue(self._pair_of(vote))  # the undone pair, to judge again (else a fresh one)
            undone = ({"a": vote.image_a, "b": vote.image_b, "votes_a": vote.votes_a, "votes_b": vote.votes_b}
                      if vote is not None else {"a": None, "b": None, "votes_a": None, "votes_b": None})
            out: dict[str, Any] = {
                "undone": undone,
                "stats": self._stats(),
                "pair": pair,
            }
            if warning:
                out["warning"] = warning
            return out

    # ---------------------------------------------------------------------------------------------- reading

    def _stats(self) -> dict[str, Any]:
        counts = self.ranker.counts
        n_images = len(self.index)
        votes = len(self._applied_votes)
        settled = settledness(self.ranker, self._lagged) if votes > SETTLE_WINDOW else None
        return {
            "votes": votes,
            "ties": sum(1 for v in self._applied_votes if v[2] == v[3]),
            "rows": len(self.votes.rows),
            "images": n_images,
            "images_seen": sum(1 for c in counts.values() if c > 0),
            "mean_comparisons": 2 * votes / n_images,
            "settledness": settled,
            "settle_window": SETTLE_WINDOW,
            "question": self.question,
            "model": self.live.status() if self.live is not None else {"enabled": False},
        }

    def stats(self) -> dict[str, Any]:
        """Counters for the page: votes, images seen, mean comparisons per image, settledness."""
        with self._lock:
            return self._stats()

    def browse(self, sort: str | None = None) -> dict[str, Any]:
        """Every image with its vote score and rank, beside the model's prediction and rank when there is one.

        Ranks are 1 = best. The rank difference (prediction rank minus vote rank) is computed among the
        images that have both a prediction and at least one vote, so the two rankings cover the same set;
        ``disagreement`` sorts by its absolute value, largest first.
        """
        has_pred = bool(self.predictions)
        sort = sort or ("disagreement" if has_pred else "score")
        if sort not in SORTS:
            raise BadRequest(f"sort must be one of {SORTS}, got {sort!r}")
        with self._lock:
            scores = dict(self.ranker.scores)
            counts = dict(self.ranker.counts)
            votes = len(self._applied_votes)
        names = self.index.images
        by_truth = sorted(names, key=lambda n: (-scores[n], -counts[n], n))
        truth_rank = {n: i + 1 for i, n in enumerate(by_truth)}
        pred = self.predictions
        pred_rank = {n: i + 1 for i, n in enumerate(sorted(pred, key=lambda n: (-pred[n], n)))}
        both = [n for n in by_truth if n in pred and counts[n] > 0]
        sub_truth = {n: i + 1 for i, n in enumerate(both)}
        sub_pred = {n: i + 1 for i, n in enumerate(sorted(both, key=lambda n: (-pred[n], n)))}
        items: list[dict[str, Any]] = []
        for n in names:
            diff = sub_pred[n] - sub_truth[n] if n in sub_truth else None
            items.append({
                "path": n, "url": image_url(n), "thumb": image_url(n, "/thumb/"),
                "score": scores[n], "comparisons": int(round(counts[n])), "rank": truth_rank[n],
                "prediction": pred.get(n), "pred_rank": pred_rank.get(n), "rank_diff": diff,
            })
        if sort == "score":
            items.sort(key=lambda it: it["rank"])
        elif sort == "prediction":
            items.sort(key=lambda it: (it["pred_rank"] is None, it["pred_rank"] or 0, it["rank"]))
        else:
            items.sort(key=lambda it: (it["rank_diff"] is None, -abs(it["rank_diff"] or 0), it["rank"]))
        rho = rank_correlation([scores[n] for n in both], [pred[n] for n in both])
        return {"sort": sort, "has_predictions": has_pred, "votes": votes, "images": len(names),
                "compared_with_prediction": len(both), "spearman": rho, "items": items}

    def image_file(self, rel: str) -> str | None:
        """Real path of a servable image, or None (the caller answers 404)."""
        return self.index.resolve(rel)
