"""Reproducible train/val/test splits that survive restarts.

A split is decided once and then persisted: resuming training (or comparing two runs) with a
silently different split would leak test images into training, so a saved split file always wins
and disagreements with it are errors, not warnings.

Split files store *portable keys*: each record path relative to the common folder of all record
paths (with ``/`` separators), so a dataset moved to another disk or machine still matches.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

import numpy as np

from tastelab.core.atomic import write_text_atomic
from tastelab.io.records import Record, RecordError, RecordSet
from tastelab.io.votes import Vote

logger = logging.getLogger(__name__)

DEFAULT_FRACTIONS: Mapping[str, float] = {"train": 0.8, "val": 0.1, "test": 0.1}
SPLIT_FILE_VERSION = 1
_TOLERANCE = 1e-6


def validate_fractions(fractions: Mapping[str, float]) -> dict[str, float]:
    """Fractions as a plain dict after checking they are finite, non-negative and sum to 1."""
    if not fractions:
        raise ValueError("fractions must name at least one split")
    checked = {}
    for name, value in fractions.items():
        value = float(value)
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"fraction for split {name!r} must be a finite number >= 0, got {value}")
        checked[str(name)] = value
    total = sum(checked.values())
    if abs(total - 1.0) > _TOLERANCE:
        raise ValueError(f"split fractions must sum to 1, got {total:g} from {checked}")
    return checked


def _split_sizes(n: int, fractions: Mapping[str, float]) -> dict[str, int]:
    """Integer sizes summing to ``n`` (largest remainder).

    Every split with a positive fraction gets at least one item when there are enough items,
    because an empty validation set breaks early stopping far from where the split was made.
    """
    exact = {name: frac * n for name, frac in fractions.items()}
    sizes = {name: math.floor(value) for name, value in exact.items()}
    by_remainder = sorted(exact, key=lambda name: exact[name] - sizes[name], reverse=True)
    for name in by_remainder[: n - sum(sizes.values())]:
        sizes[name] += 1
    positive = [name for name, frac in fractions.items() if frac > 0]
    if n >= len(positive):
        for name in positive:
            if sizes[name] == 0:
                donor = max(sizes, key=lambda k: sizes[k])
                sizes[donor] -= 1
                sizes[name] += 1
    return sizes


def make_split(
    keys: Sequence[str], fractions: Mapping[str, float] = DEFAULT_FRACTIONS, seed: int = 0
) -> dict[str, list[str]]:
    """Assign every (distinct) key to exactly one split, reproducibly.

    Keys are sorted before shuffling so the result depends only on the key set, the fractions
    (in their given order) and the seed, never on the order records were loaded in.
    """
    checked = validate_fractions(fractions)
    unique = sorted(set(keys))
    order = np.random.default_rng(seed).permutation(len(unique))
    shuffled = [unique[i] for i in order]
    result: dict[str, list[str]] = {}
    start = 0
    for name, size in _split_sizes(len(unique), checked).items():
        result[name] = sorted(shuffled[start : start + size])
        start += size
    return result


def save_split(
    path: str | Path, split: Mapping[str, Sequence[str]], meta: Mapping[str, Any] | None = None
) -> None:
    """Write a split file atomically (temp file + ``os.replace``) so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"version": SPLIT_FILE_VERSION, **(meta or {})}
    payload["splits"] = {name: sorted(keys) for name, keys in split.items()}
    write_text_atomic(path, json.dumps(payload, indent=1, ensure_ascii=False) + "\n")
    logger.info("saved split to %s", path)  # sizes: the trainer logs them once, with units


def _check_split_payload(payload: Any, path: Path) -> dict[str, list[str]]:
    if not isinstance(payload, dict) or not isinstance(payload.get("splits"), dict):
        raise RecordError(
            'expected a JSON object with a "splits" object mapping split names to key lists', path
        )
    owner: dict[str, str] = {}
    splits: dict[str, list[str]] = {}
    for name, keys in payload["splits"].items():
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise RecordError(f"split {name!r} must be a list of strings", path)
        for key in keys:
            if key in owner:
                raise RecordError(f"key {key!r} appears in both split {owner[key]!r} and {name!r}", path)
            owner[key] = name
        splits[name] = list(keys)
    return splits


def load_split(path: str | Path) -> tuple[dict[str, list[str]], dict[str, Any]]:
    """Read a split file written by :func:`save_split`; returns (splits, metadata)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"split file not found: {path}")
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise RecordError(
            f"invalid JSON in split file: {exc.msg} (column {exc.colno})", path, exc.lineno
        ) from exc
    splits = _check_split_payload(payload, path)
    meta = {k: v for k, v in payload.items() if k != "splits"}
    return splits, meta


def portable_keys(paths: Sequence[str]) -> list[str]:
    """Paths relative to their common folder, with ``/`` separators, for split files that travel.

    Falls back to the paths themselves when they share no folder (mixed drives, relative with
    absolute).
    """
    if not paths:
        return []
    try:
        root = os.path.commonpath([os.path.dirname(p) for p in paths])
    except ValueError:
        return [PurePath(p).as_posix() for p in paths]
    return [PurePath(os.path.relpath(p, root)).as_posix() if root else PurePath(p).as_posix() for p in paths]


def _group(
    records: Sequence[Record], assignment: Sequence[str], names: Sequence[str]
) -> dict[str, list[Record]]:
    out: dict[str, list[Record]] = {name: [] for name in names}
    for record, name in zip(records, assignment, strict=True):
        out.setdefault(name, []).append(record)
    return out


def _from_own_splits(
    records: Sequence[Record], keys: Sequence[str], fractions: Mapping[str, float], seed: int
) -> list[str]:
    """Honour label-file splits; unlabelled records train, and val is carved from train if asked."""
    assignment = [r.split or "train" for r in records]
    unlabelled = sum(1 for r in records if r.split is None)
    if unlabelled:
        logger.info("%d records carry no split; they go to train", unlabelled)
    val_fraction = fractions.get("val", 0.0)
    if val_fraction <= 0 or "val" in assignment:
        return assignment
    train_keys = [k for k, name in zip(keys, assignment, strict=True) if name == "train"]
    carved = make_split(train_keys, {"train": 1.0 - val_fraction, "val": val_fraction}, seed)
    val_keys = set(carved["val"])
    logger.info(
        "carved %d val records out of %d train records (seed %d)", len(val_keys), len(train_keys), seed
    )
    return [
        "val" if name == "train" and key in val_keys else name
        for key, name in zip(keys, assignment, strict=True)
    ]


def _from_split_file(
    split_file: Path, keys: Sequence[str], fractions: Mapping[str, float], seed: int
) -> list[str]:
    """Assignment read from an existing split file; records it does not know are an error."""
    splits, meta = load_split(split_file)
    owner = {key: name for name, names in splits.items() for key in names}
    unknown = sorted({k for k in keys if k not in owner})
    if unknown:
        raise RecordError(
            f"{len(unknown)} records are not in the split file (e.g. {unknown[:5]}); resuming with a "
            "different split would mix train and test images. Delete the file to re-split, or pass the "
            "records the split was made for",
            split_file,
        )
    orphans = len(set(owner) - set(keys))
    if orphans:
        logger.warning("%s: %d keys in the split file have no record (images removed?)", split_file, orphans)
    if meta.get("seed", seed) != seed or meta.get("fractions", dict(fractions)) != dict(fractions):
        logger.warning(
            "%s: saved seed/fractions (%s, %s) differ from the requested ones; the saved split wins",
            split_file,
            meta.get("seed"),
            meta.get("fractions"),
        )
    return [owner[k] for k in keys]


def split_records(
    records: RecordSet | Sequence[Record],
    split_file: str | Path | None = None,
    fractions: Mapping[str, float] = DEFAULT_FRACTIONS,
    seed: int = 0,
) -> dict[str, list[Record]]:
    """Split records, preferring (1) the label file's own splits, (2) a saved split file, (3) a new one.

    A new split is saved to ``split_file`` (when given) so the next run reuses it.  Records keep
    their input order inside each split.
    """
    checked = validate_fractions(fractions)
    recs = list(records)
    keys = portable_keys([r.path for r in recs])
    if any(r.split is not None for r in recs):
        assignment = _from_own_splits(recs, keys, checked, seed)
    elif split_file is not None and Path(split_file).exists():
        assignment = _from_split_file(Path(split_file), keys, checked, seed)
    else:
        split = make_split(keys, checked, seed)
        owner = {key: name for name, names in split.items() for key in names}
        assignment = [owner[k] for k in keys]
        if split_file is not None:
            save_split(split_file, split, {"seed": seed, "fractions": checked})
    result = _group(recs, assignment, list(checked))
    logger.debug("split sizes: %s", {name: len(items) for name, items in result.items()})
    return result


#: How A/B votes are split: ``image`` holds out whole images (every vote touching a held-out image goes
#: to that image's split), ``pair`` holds out whole pairs (images recur across splits).
PAIR_SPLITS = ("image", "pair")
#: Split of the held-out votes among TRAIN images under ``pair_split: image`` ("new pairs among seen images").
SEEN_SPLIT = "test_seen"
DEFAULT_SEEN_FRACTION = 0.1
#: How held out a split is; a vote touching images of two splits goes to the more held-out one.
#: Names other than these rank between val and test (ties: alphabetical, so the rule stays deterministic).
_HELD_OUT_RANK = {"train": 0, "val": 1, "test": 3}


def held_out_rank(name: str) -> tuple[int, str]:
    """Sort key of a split name by how held out it is (train < val < other names < test)."""
    return (_HELD_OUT_RANK.get(name, 2), name)


@dataclass(frozen=True)
class VoteSplit:
    """Votes per split plus, for an image split, each split's own images (absolute paths as in the votes).

    ``images`` is None for a per-pair split (an image may then sit in several splits)."""

    votes: dict[str, list[Vote]]
    pair_split: str
    images: dict[str, list[str]] | None = None


def _vote_pair_key(comparison: Vote, rel: Mapping[str, str]) -> str:
    """Portable, order-free key of a vote's image pair: ``a<TAB>b`` with both portable keys sorted."""
    return "\t".join(sorted((rel[comparison.image_a], rel[comparison.image_b])))


def split_votes_by_image(
    comparisons: Sequence[Vote],
    fractions: Mapping[str, float] = DEFAULT_FRACTIONS,
    seed: int = 0,
    seen_fraction: float = DEFAULT_SEEN_FRACTION,
) -> VoteSplit:
    """Split votes by IMAGE, so held-out metrics say how the model does on images it never trained on.

    Images (not votes) are split with :func:`make_split`; a vote goes to the most held-out split of its
    two images (:func:`held_out_rank`: a train/val vote is val, a val/test vote is test). Of the votes
    between two TRAIN images, a ``seen_fraction`` share of the pairs (whole pairs, seeded) is held out as
    ``test_seen``: new pairs among seen images, the number a per-pair split reports. Train votes are thus
    only those between two train images: with 70/15/15 of the images about half the votes train.
    """
    if not math.isfinite(seen_fraction) or not 0 <= seen_fraction < 1:
        raise ValueError(f"the seen-pairs fraction must lie in [0, 1), got {seen_fraction}")
    checked = validate_fractions(fractions)
    images = sorted({c.image_a for c in comparisons} | {c.image_b for c in comparisons})
    rel = dict(zip(images, portable_keys(images)))
    by_key = make_split([rel[p] for p in images], checked, seed)
    owner_key = {key: name for name, keys in by_key.items() for key in keys}
    owner = {p: owner_key[rel[p]] for p in images}
    votes: dict[str, list[Vote]] = {name: [] for name in checked}
    for c in comparisons:
        votes[max(owner[c.image_a], owner[c.image_b], key=held_out_rank)].append(c)
    if seen_fraction > 0 and votes.get("train"):
        keys = [_vote_pair_key(c, rel) for c in votes["train"]]
        seen = set(make_split(keys, {"train": 1.0 - seen_fraction, SEEN_SPLIT: seen_fraction}, seed)[SEEN_SPLIT])
        votes[SEEN_SPLIT] = [c for c, k in zip(votes["train"], keys, strict=True) if k in seen]
        votes["train"] = [c for c, k in zip(votes["train"], keys, strict=True) if k not in seen]
    split_images = {name: sorted(p for p in images if owner[p] == name) for name in checked}
    return VoteSplit(votes, "image", split_images)


def split_votes(
    comparisons: Sequence[Vote],
    split_file: str | Path | None = None,
    *,
    pair_split: str = "image",
    fractions: Mapping[str, float] = DEFAULT_FRACTIONS,
    seed: int = 0,
    seen_fraction: float = DEFAULT_SEEN_FRACTION,
) -> VoteSplit:
    """Split A/B votes by image or by pair, reusing ``split_file`` when it exists and saving a new split there.

    The file lists every split's pairs as portable ``a<TAB>b`` keys (``kind: pairs``, readable by
    ``tastelab analyze --split-file``) and records ``pair_split``; an image split also lists each split's
    images. Files from before ``pair_split`` existed are per-pair splits. A file whose kind differs from
    ``pair_split``, or that misses a vote's pair, is an error naming it: resuming with another split would
    mix train and test.
    """
    if pair_split not in PAIR_SPLITS:
        raise ValueError(f"pair_split must be one of {PAIR_SPLITS}, got {pair_split!r}")
    images = sorted({c.image_a for c in comparisons} | {c.image_b for c in comparisons})
    rel = dict(zip(images, portable_keys(images)))
    if split_file is not None and Path(split_file).exists():
        return _votes_from_split_file(Path(split_file), comparisons, rel, pair_split)
    if pair_split == "image":
        result = split_votes_by_image(comparisons, fractions, seed, seen_fraction)
    else:
        result = VoteSplit(split_comparisons(comparisons, fractions, seed), "pair")
    if split_file is not None:
        meta: dict[str, Any] = {"seed": seed, "fractions": dict(fractions), "kind": "pairs", "pair_split": pair_split}
        if result.images is not None:
            meta["seen_fraction"] = seen_fraction
            meta["images"] = {name: sorted(rel[p] for p in ps) for name, ps in result.images.items()}
        pairs = {name: sorted({_vote_pair_key(c, rel) for c in cs}) for name, cs in result.votes.items()}
        save_split(split_file, pairs, meta)
    return result


def _votes_from_split_file(
    split_file: Path, comparisons: Sequence[Vote], rel: Mapping[str, str], pair_split: str
) -> VoteSplit:
    """The votes' split as a saved pairs split file says; checks its kind and, for an image split, that no
    train pair touches a held-out image (an edited file must not leak)."""
    saved, meta = load_split(split_file)
    saved_kind = meta.get("pair_split", "pair")  # files written before pair_split existed split by pair
    if saved_kind != pair_split:
        raise RecordError(
            f"this split file holds out {'images' if saved_kind == 'image' else 'pairs'} (pair_split "
            f"{saved_kind!r}) but the config asks for data.pair_split {pair_split!r}; set data.pair_split: "
            f"{saved_kind} to reuse it, or delete the file to re-split", split_file)
    owner = {k: name for name, keys in saved.items() for k in keys}
    missing = [_vote_pair_key(c, rel) for c in comparisons if _vote_pair_key(c, rel) not in owner]
    if missing:
        raise RecordError(f"{len(missing)} vote pairs are not in the saved split (e.g. {missing[0]!r}); resuming "
                          "with a different split would mix train and test. Delete the file to re-split", split_file)
    votes: dict[str, list[Vote]] = {name: [] for name in saved}
    for c in comparisons:
        votes[owner[_vote_pair_key(c, rel)]].append(c)
    if saved_kind == "pair":
        return VoteSplit(votes, "pair")
    raw_images = meta.get("images")
    if not isinstance(raw_images, dict) or not all(
            isinstance(v, list) and all(isinstance(k, str) for k in v) for v in raw_images.values()):
        raise RecordError('an image split file needs an "images" object mapping split names to image keys',
                          split_file)
    image_owner = {k: name for name, keys in raw_images.items() for k in keys}
    back = {key: path for path, key in rel.items()}
    for name, cs in votes.items():
        for c in cs:
            sides = [image_owner.get(rel[c.image_a]), image_owner.get(rel[c.image_b])]
            expect = max(sides, key=lambda s: held_out_rank(s or "train"))
            if None in sides or (expect != name and not (name == SEEN_SPLIT and expect == "train")):
                raise RecordError(f"pair {_vote_pair_key(c, rel)!r} is in split {name!r} but its images are in "
                                  f"{sides} (an edited file?); delete the file to re-split", split_file)
    images = {name: sorted(back[k] for k in keys if k in back) for name, keys in raw_images.items()}
    return VoteSplit(votes, "image", images)


def _pair_key(comparison: Vote) -> str:
    first, second = sorted((comparison.image_a, comparison.image_b))
    return f"{first}\t{second}"


def split_comparisons(
    comparisons: Sequence[Vote], fractions: Mapping[str, float] = DEFAULT_FRACTIONS, seed: int = 0
) -> dict[str, list[Vote]]:
    """Split comparisons by unordered image pair, so repeated votes on a pair share one split.

    Images themselves may still appear in several splits (through different pairs); that is the
    usual protocol for pairwise preference data.
    """
    split = make_split([_pair_key(c) for c in comparisons], fractions, seed)
    owner = {key: name for name, keys in split.items() for key in keys}
    out: dict[str, list[Vote]] = {name: [] for name in split}
    for comparison in comparisons:
        out[owner[_pair_key(comparison)]].append(comparison)
    return out


# -------------------------------------------------------------------------------------------------- k-fold by image


@dataclass(frozen=True)
class ImageFold:
    """One fold of :func:`image_folds`: held-out images and which votes train / validate.

    ``train_votes`` and ``val_votes`` are positions in the ``votes`` given to :func:`image_folds` (empty when
    none were given, e.g. for per-image score files).
    """

    train_images: list[str]
    val_images: list[str]
    train_votes: list[int]
    val_votes: list[int]


def image_folds(images: Sequence[str], k: int = 5, seed: int = 0,
                votes: Sequence[Vote] | None = None) -> list[ImageFold]:
    """Seeded k-fold cross-validation over IMAGES, not pairs.

    The distinct ``images`` are shuffled (seeded) and dealt into ``k`` near-equal folds. The rule for votes:
    a vote touching a held-out image belongs to that fold's validation set (a vote between two folds'
    images validates in both folds and so trains in neither); only votes between two training images
    train. So no validation image is ever seen in training: the fold measures how a model ranks photos it
    has not been trained on, which is what a person's model is for (new pairs among seen images say little).
    Votes naming an image outside ``images`` are an error (they would leak silently otherwise).
    """
    unique = sorted(set(images))
    known = set(unique)
    if not 2 <= k <= len(unique):
        raise ValueError(f"image_folds: k={k} folds need 2 <= k <= {len(unique)} distinct images")
    for j, v in enumerate(votes or ()):
        for name in (v.image_a, v.image_b):
            if name not in known:
                raise ValueError(f"image_folds: vote {j} names {name!r}, which is not among the images")
    order = np.random.default_rng(seed).permutation(len(unique))
    folds = []
    for part in np.array_split(order, k):
        held = {unique[i] for i in part}
        train_votes: list[int] = []
        val_votes: list[int] = []
        for j, v in enumerate(votes or ()):
            (val_votes if v.image_a in held or v.image_b in held else train_votes).append(j)
        folds.append(ImageFold(train_images=[u for u in unique if u not in held], val_images=sorted(held),
                               train_votes=train_votes, val_votes=val_votes))
    return folds
