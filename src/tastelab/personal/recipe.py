"""``train.mode: select`` recipes: the personal search (:func:`~tastelab.personal.api.fit_personal`) run on a
training recipe's data, with the trainer's split and the trainer's held-out report.

Why here and not in tastelab.training: the search is the personal package's, which sits above training in
the layers (docs/ARCHITECTURE.md); the CLI dispatches ``tastelab train RECIPE`` here when the recipe says
``train.mode: select``.

Protocol (honest by construction): the IMAGES are split exactly as the trainer splits them
(:func:`~tastelab.io.splits.split_records` for per-image scores, :func:`~tastelab.io.splits.split_votes`
with ``pair_split: image`` for votes; same ``data.split``, ``seed`` and ``RUN/split.json`` file). Every
split but ``test`` (and ``test_seen``, the held-out new pairs among training images) is the search's data:
cross-validation over those images chooses the recipe, which is then fit on all of them. The test images
reach no selection step (feature statistics included); the saved model is scored on them once, from
pixels, through the same :class:`~tastelab.inference.scoring.Scorer` that ``tastelab score`` uses.

Run folder::

    split.json  best/ (a model or ensemble folder, with selection.json)  summary.json

``summary.json`` is written last (atomically) and marks a finished run: ``resume="auto"`` returns a
finished run's summary without redoing it; an unfinished folder (no summary) is redone from its split
file; ``resume="none"`` on a finished folder is refused (choose another ``--out`` or delete it).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tastelab.core.atomic import write_text_atomic
from tastelab.core.errors import UserError
from tastelab.core.jsonutil import json_default
from tastelab.evaluation.heldout import heldout_report
from tastelab.evaluation.metrics import compute_metrics, pairwise_accuracy, srcc
from tastelab.io.records import Record
from tastelab.io.splits import DEFAULT_SEEN_FRACTION, SEEN_SPLIT, split_records, split_votes
from tastelab.io.votes import Vote, load_training_votes
from tastelab.pairwise.ratings import fit_bradley_terry
from tastelab.personal.api import fit_personal
from tastelab.personal.data import Labels, score_labels, votes_labels
from tastelab.personal.features import parse_feature_set
from tastelab.training.config import TrainConfig
from tastelab.training.data import load_dataset_records

logger = logging.getLogger(__name__)

SUMMARY = "summary.json"
BEST = "best"
#: Splits never given to the search: the held-out test images and the new pairs among training images.
HELD_OUT = ("test", SEEN_SPLIT)


def run_select_recipe(cfg: TrainConfig, out: str | Path, *, resume: str = "auto",
                      recipe_path: str | Path | None = None,
                      log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run a ``train.mode: select`` recipe into ``out`` (see the module docstring); returns the summary."""
    if cfg.train.mode != "select" or cfg.select is None:
        raise UserError(f"{recipe_path or 'recipe'}: train.mode is {cfg.train.mode!r}, not select")
    say = log or logger.info
    out = Path(out)
    summary_path = out / SUMMARY
    if resume not in ("auto", "none"):
        raise UserError(f"--resume {resume}: a select run has no checkpoints; use auto (a finished run is "
                        "returned as it is) or none")
    if summary_path.is_file():
        if resume == "none":
            raise UserError(f"{out}: already holds a finished select run ({SUMMARY}); choose another --out or "
                            "delete the folder")
        say(f"{out}: finished run found ({SUMMARY}); not redone")
        return dict(json.loads(summary_path.read_text(encoding="utf-8")))
    sel = cfg.select
    specs = [parse_feature_set(f) for f in sel.feature_sets] if sel.feature_sets else None
    out.mkdir(parents=True, exist_ok=True)
    d = cfg.data
    split_file = Path(d.split_file) if d.split_file else out / "split.json"
    if d.split_file and not split_file.exists():
        raise UserError(f"data.split_file {split_file} does not exist")
    t0 = time.perf_counter()
    if d.format == "pairs":
        fit_labels, held, sizes = _vote_parts(cfg, split_file)
    else:
        fit_labels, held, sizes = _score_parts(cfg, split_file)
    if d.split_file:
        shutil.copyfile(split_file, out / "split.json")
    say(f"{fit_labels.task.size} {fit_labels.kind} over {fit_labels.task.n_images} train+val images for the "
        f"search; held out: {sizes}")
    tmp = out / f".{BEST}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    result = fit_personal(fit_labels, out=tmp, feature_sets=specs, folds=sel.folds, seed=cfg.seed,
                          nested=sel.nested, size=sel.size, device=cfg.train.device,
                          batch_size=cfg.train.feature_batch_size, workers=cfg.train.workers,
                          cache_dir=cfg.train.cache_dir or "default", statistics=sel.statistics,
                          priors=sel.priors, name=cfg.model.name, log=say)
    best = out / BEST
    if best.exists():  # an unfinished earlier attempt (no summary): replaced whole
        shutil.rmtree(best)
    tmp.rename(best)
    test = score_held_out(best, held, device=cfg.train.device)
    pair_split = "image" if d.format == "pairs" else None
    evaluation = heldout_report(pair_split, {}, {name: {BEST: m} for name, m in test.items()}, sizes)
    evaluation["picked_on"] = f"{result.plan.get('folds')}-fold cross-validation over the train+val images"
    summary = {
        "config": cfg.model_dump(mode="json"),
        "mode": "select",
        "recipe": str(recipe_path) if recipe_path is not None else None,
        "best": {"metric": result.metric, "value": result.cv, "cv_std": result.cv_std,
                 "nested_cv": result.nested, "chosen": result.chosen},
        "selection": {k: v for k, v in result.selection().items() if k != "candidates"}
        | {"n_candidates": len(result.candidates)},
        "test": {BEST: test.get("test", {})},
        **({SEEN_SPLIT: {BEST: test[SEEN_SPLIT]}} if SEEN_SPLIT in test else {}),
        "evaluation": evaluation,
        "train_seconds": round(time.perf_counter() - t0, 2),
    }
    write_text_atomic(summary_path, json.dumps(summary, indent=2, default=json_default))
    return summary


def _score_parts(cfg: TrainConfig, split_file: Path) -> tuple[Labels, dict[str, Any], dict[str, dict[str, int]]]:
    """Per-image scores: the trainer's record split; every split but test is the search's."""
    try:
        rs = load_dataset_records(cfg)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    splits = split_records(rs, split_file, fractions=cfg.data.split, seed=cfg.seed)
    fit: list[Record] = [r for name, recs in splits.items() if name not in HELD_OUT for r in recs]
    test = [r for r in splits.get("test", []) if r.score is not None]
    if not test:
        raise UserError(f"{cfg.data.path}: the test split is empty; nothing to measure the chosen model on")
    labels = score_labels(Path(cfg.data.path), fit, rs.score_range)
    held = {"test": ("scores", test)}
    return labels, held, {"train": {"images": labels.task.n_images}, "test": {"images": len(test)}}


def _vote_parts(cfg: TrainConfig, split_file: Path) -> tuple[Labels, dict[str, Any], dict[str, dict[str, int]]]:
    """A/B votes: the trainer's image split (val/test votes touch unseen images, test_seen are new pairs among
    train images); the votes of every split but test and test_seen are the search's."""
    d = cfg.data
    comps = load_training_votes(d.path, d.image_root, d.limit)
    vs = split_votes(comps, split_file, pair_split="image", fractions=d.split, seed=cfg.seed,
                     seen_fraction=DEFAULT_SEEN_FRACTION if d.seen_pairs is None else d.seen_pairs)
    assert vs.images is not None  # an image split
    fit: list[Vote] = [v for name, votes in vs.votes.items() if name not in HELD_OUT for v in votes]
    if not vs.votes.get("test"):
        raise UserError(f"{d.path}: no vote touches a test image; nothing to measure the chosen model on")
    labels = votes_labels(Path(d.path), fit)
    held = {name: ("votes", vs.votes[name], sorted(vs.images.get("train" if name == SEEN_SPLIT else name, [])))
            for name in HELD_OUT if vs.votes.get(name)}
    sizes = {"train": {"votes": len(fit), "images": labels.task.n_images}}
    sizes |= {name: {"votes": len(h[1]), "images": len(h[2])} for name, h in held.items()}
    return labels, held, sizes


def score_paths(folder: Path, paths: Sequence[str], device: str = "auto") -> dict[str, float]:
    """``tastelab score``'s predictions (native scale, PyTorch backend) of a model folder for ``paths``;
    an image it cannot score is an error naming it (a test image must not silently drop out)."""
    from tastelab.inference.scoring import Scorer

    scorer = Scorer(folder, backend="torch", device=device, workers=0)
    out: dict[str, float] = {}
    for r in scorer.score_files(list(paths)):
        if r.error is not None or r.raw_score is None:
            raise UserError(f"{r.path}: cannot score this held-out image ({r.error})")
        out[str(r.path)] = float(r.raw_score)
    return out


def score_held_out(folder: Path, held: dict[str, Any], device: str = "auto") -> dict[str, dict[str, float]]:
    """Test metrics of the saved model, named as the trainer names them: per-image ``srcc``, ``plcc``, ...
    (:func:`~tastelab.evaluation.metrics.compute_metrics`); votes ``pair_acc``, ``pair_acc_unweighted`` and,
    on the test split, ``srcc_derived`` (Spearman against Bradley-Terry scores fitted on that split's own
    votes, over its own unseen images)."""
    needed: set[str] = set()
    for kind, items, *_ in held.values():
        if kind == "scores":
            needed |= {r.path for r in items}
        else:
            needed |= {p for v in items for p in (v.image_a, v.image_b)}
    pred = score_paths(folder, sorted(needed), device)
    metrics: dict[str, dict[str, float]] = {}
    for name, (kind, items, *rest) in held.items():
        if kind == "scores":
            metrics[name] = compute_metrics(np.array([pred[r.path] for r in items]),
                                            np.array([float(r.score) for r in items]))
            continue
        pa = np.array([pred[v.image_a] for v in items])
        pb = np.array([pred[v.image_b] for v in items])
        va = np.array([float(v.votes_a) for v in items])
        vb = np.array([float(v.votes_b) for v in items])
        m = {"pair_acc": pairwise_accuracy(pa, pb, va, vb),
             "pair_acc_unweighted": pairwise_accuracy(pa, pb, va, vb, weighted=False)}
        if name == "test":
            fitted = fit_bradley_terry(items, stderr=False).scores
            own = [n for n in sorted(fitted) if n in set(rest[0])]
            m["srcc_derived"] = srcc(np.array([pred[n] for n in own]), np.array([fitted[n] for n in own]))
        metrics[name] = m
    return metrics
