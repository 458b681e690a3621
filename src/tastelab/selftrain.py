"""ELTA self-training: the round driver over the trainer (``tastelab self-train``).

Round 0 trains on the labels; every later round predicts on a pool of unlabelled images, sharpens each
prediction adaptively (:mod:`tastelab.training.elta`), keeps the confident ones as pseudo-labels and
retrains with them. It sits above :mod:`tastelab.training` (it drives whole training runs), beside
:mod:`tastelab.ensembles` and :mod:`tastelab.tuning`.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from tastelab.core.atomic import write_text_atomic
from tastelab.core.device import resolve_device
from tastelab.features.cache import default_cache_dir
from tastelab.features.extract import extract
from tastelab.io.records import expand_inputs
from tastelab.io.splits import split_records
from tastelab.models.artifact import load_model_folder
from tastelab.models.model import TasteModel
from tastelab.training import elta
from tastelab.training.config import TrainConfig, recipe_remote_code
from tastelab.training.data import load_dataset_records
from tastelab.training.elta import PSEUDO_FILE, PseudoLabels, pseudo_labels, write_pseudo_labels
from tastelab.training.trainer import Trainer

logger = logging.getLogger(__name__)

SUMMARY_FILE = "self_train.json"

@contextmanager
def _fork_seed(seed: int) -> Iterator[None]:
    """Seeded global RNG for MC dropout, restored afterwards (the caller's stream is untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def pooled_features(model: TasteModel, paths: Sequence[str], cfg: TrainConfig,
                    device: torch.device) -> tuple[list[str], torch.Tensor]:
    """Pooled features of ``paths`` (frozen: through the feature cache, so nothing is recomputed)."""
    t = cfg.train
    cache = None
    if t.mode == "frozen":
        cache = Path(t.cache_dir) if t.cache_dir else default_cache_dir()
    fs = extract(model, paths, level="pooled", cache_dir=cache, batch_size=t.feature_batch_size,
                 workers=t.workers, device=device)
    return fs.paths, fs.features["orig"]


@torch.no_grad()
def predict_for_pseudo(model: TasteModel, features: torch.Tensor, mc_samples: int, seed: int = 0
                       ) -> dict[str, torch.Tensor | None]:
    """Head outputs on pooled features: score, logits (distribution), var (gaussian; MC-dropout for score).

    A scalar head has no spread of its own, so its variance is the MC-dropout variance over
    ``mc_samples`` stochastic passes (dropout on, seeded); without any dropout that is zero, which
    :func:`self_train` refuses up front.
    """
    head = model.head
    head.eval()
    device = next(head.parameters()).device
    outs = [head(features[i:i + 4096].to(device)) for i in range(0, len(features), 4096)]
    score = torch.cat([o.score.float().cpu() for o in outs])
    logits = torch.cat([o.logits.float().cpu() for o in outs]) if outs and outs[0].logits is not None else None
    var = torch.cat([o.var.float().cpu() for o in outs]) if outs and outs[0].var is not None else None
    if head.cfg.kind == "score":
        head.train()
        try:
            with _fork_seed(seed):
                draws = torch.stack([torch.cat([head(features[i:i + 4096].to(device)).score.float().cpu()
                                                for i in range(0, len(features), 4096)])
                                     for _ in range(mc_samples)])
        finally:
            head.eval()
        var = draws.var(dim=0, unbiased=True)
    return {"score": score, "logits": logits, "var": var}


def _head_has_dropout(cfg: TrainConfig) -> bool:
    h = cfg.model.head
    return bool(h.dropout_input or (h.dropout_hidden and h.hidden) or h.dropout_output)


def _dataset_view(cfg: TrainConfig, split_file: Path) -> tuple[tuple[float, float], dict[str, set[str]], float]:
    """(score range, paths per split, mean training label) of the labelled data under ``split_file``."""
    rs = load_dataset_records(cfg)
    splits = split_records(rs, split_file, fractions=cfg.data.split, seed=cfg.seed)
    train = [r.score for r in splits.get("train", []) if r.score is not None]
    if not train:
        raise ValueError("the split has no labelled training records")
    return rs.score_range, {k: {r.path for r in v} for k, v in splits.items()}, float(sum(train) / len(train))


def _round_config(cfg: TrainConfig, r: int, out: Path, split_file: Path) -> TrainConfig:
    if r == 0:
        return cfg
    rcfg = cfg.model_copy(deep=True)
    rcfg.data.split_file = str(split_file)
    rcfg.train.elta.pseudo_labels = str(out / f"round-{r - 1}" / PSEUDO_FILE)
    return rcfg


def _test_metrics(run: Path) -> dict[str, Any]:
    s = json.loads((run / "summary.json").read_text())
    keep = ("srcc", "plcc", "mae", "mae_p0_20", "mae_p80_100", "emd")
    return {"val_best": s.get("best", {}).get("value"),
            "test": {k: v for k, v in s.get("test", {}).get("best", {}).items() if k in keep},
            "elta": s.get("elta")}


def self_train(cfg: TrainConfig, unlabelled: str | os.PathLike | Sequence[str], out_dir: str | os.PathLike,
               rounds: int | None = None, *, base_run: str | os.PathLike | None = None,
               recursive: bool = True, trust_remote_code: bool = False,
               recipe_path: str | os.PathLike | None = None) -> dict[str, Any]:
    """ELTA self-training: round 0 trains on the labels (or reuses ``base_run``); every later round
    retrains from scratch with the previous round's sharpened, confident pseudo-labels appended to the
    TRAIN split (val/test untouched). Each round is a normal run folder ``OUT/round-N`` (resumable: a
    finished round is reused, an interrupted one continues); ``OUT/self_train.json`` compares rounds.

    ``unlabelled``: a folder, a ``.txt``/``.parquet`` path list, a glob, or a list of those. Images of the
    labelled data set's splits are left out of the pool (they are labelled or held out).
    ``trust_remote_code``: the user's permission for a recipe (``recipe_path``, named in errors) that asks to
    run its backbone's own code (:func:`~tastelab.training.config.recipe_remote_code`: refused before any
    work without it); it also covers reloading each round's best/ to pseudo-label.
    """
    trust = recipe_remote_code(cfg, trust_remote_code=trust_remote_code, recipe=recipe_path)
    e = cfg.train.elta
    rounds = e.rounds if rounds is None else rounds
    if rounds < 1:
        raise ValueError("self-training needs at least one round")
    if cfg.data.format == "pairs":
        raise ValueError("ELTA self-training needs per-image scores; data.format 'pairs' is not supported")
    if cfg.model.head.kind == "score" and not _head_has_dropout(cfg):
        raise ValueError("self-training a scalar score head estimates confidence by MC dropout: give the head "
                         "dropout (model.head.dropout_input / dropout_hidden > 0), or use a gaussian or "
                         "distribution head")
    device = resolve_device(cfg.train.device, option="train.device")  # before any work: one-line error
    items = [os.fspath(unlabelled)] if isinstance(unlabelled, (str, os.PathLike)) else [os.fspath(u) for u in
                                                                                       unlabelled]
    pool = expand_inputs(items, recursive)
    if not pool:
        raise ValueError(f"no unlabelled images in {items}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    first = Path(base_run) if base_run is not None else out / "round-0"
    history: list[dict[str, Any]] = []
    split_file = first / "split.json"
    for r in range(rounds + 1):
        run = first if r == 0 else out / f"round-{r}"
        rcfg = _round_config(cfg, r, out, split_file)
        if (run / "summary.json").exists():
            done = json.loads((run / "summary.json").read_text())["config"]
            if done != rcfg.model_dump(mode="json"):
                if r > 0 or base_run is None:
                    raise ValueError(f"{run} was trained with another config; use a new --out folder")
                logger.warning("--base-run %s was trained with another recipe than the one given", run)
            logger.info("self-train round %d: reusing finished run %s", r, run)
        elif r == 0 and base_run is not None:
            raise FileNotFoundError(f"--base-run {base_run}: no finished run (summary.json) there")
        else:
            logger.info("self-train round %d -> %s", r, run)
            Trainer(rcfg, run, trust_remote_code=trust_remote_code).fit()
        row: dict[str, Any] = {"round": r, "run_dir": str(run), **_test_metrics(run)}
        if r < rounds:
            pseudo_file = out / f"round-{r}" / PSEUDO_FILE
            stats_file = pseudo_file.with_suffix(".json")
            if not (pseudo_file.exists() and stats_file.exists()):
                score_range, split_paths, label_mean = _dataset_view(cfg, split_file)
                taken = set().union(*(split_paths.get(k, set()) for k in ("train", "val", "test")))
                candidates = [p for p in pool if os.path.abspath(p) not in taken]
                if len(candidates) < len(pool):
                    logger.info("self-train: %d pool images belong to the labelled splits and are left out",
                                len(pool) - len(candidates))
                # This run's own folder: what the user allowed for the recipe applies to it too.
                model = load_model_folder(run / "best", trust_remote_code=trust, allow_external_weights=True)
                assert isinstance(model, TasteModel)  # a training run's folder, never an ensemble
                ok, feats = pooled_features(model, candidates, rcfg, device)
                pred = predict_for_pseudo(model, feats, e.mc_samples, seed=cfg.seed)
                labels = pseudo_labels(ok, model.config.head.kind, score=pred["score"],  # type: ignore[arg-type]
                                       logits=pred["logits"], var=pred["var"], label_mean=label_mean,
                                       score_range=tuple(model.config.score_range),  # type: ignore[arg-type]
                                       beta=e.sharpen_beta, threshold=e.pseudo_threshold,
                                       num_bins=model.config.head.num_bins)
                n = write_pseudo_labels(pseudo_file, labels, e.pseudo_weight)
                stats = _pseudo_stats(labels, label_mean, score_range)
                write_text_atomic(stats_file, json.dumps(stats, indent=2))
                logger.info("self-train round %d: %d of %d unlabelled images kept as pseudo-labels "
                            "(confidence >= %g)", r, n, len(ok), e.pseudo_threshold)
            row["pseudo"] = json.loads(stats_file.read_text())
        history.append(row)
        write_text_atomic(out / SUMMARY_FILE, json.dumps({"rounds": history, "pool": len(pool),
                                                           "elta": e.model_dump(mode="json")}, indent=2))
    return {"rounds": history, "pool": len(pool)}


def _pseudo_stats(labels: PseudoLabels, label_mean: float, score_range: tuple[float, float]) -> dict[str, Any]:
    """How many candidates were kept, overall and in the tails (far from the label mean)."""
    far = (labels.score - label_mean).abs() / elta.score_width(score_range) > 0.25
    conf = labels.confidence

    def frac(mask: torch.Tensor) -> float:
        return float(labels.keep[mask].float().mean()) if bool(mask.any()) else math.nan

    return {"candidates": len(labels.paths), "kept": int(labels.keep.sum()),
            "kept_fraction": frac(torch.ones_like(labels.keep)),
            "kept_fraction_far_from_mean": frac(far), "kept_fraction_near_mean": frac(~far),
            "confidence_mean": float(conf.mean()) if len(conf) else math.nan,
            "label_mean": label_mean}
