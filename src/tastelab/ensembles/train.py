"""Training and evaluating ensembles: ``tastelab ensemble train`` / ``tastelab ensemble eval``.

Kept apart from :mod:`tastelab.models.ensemble` so that loading and scoring an ensemble never imports the
training stack.

Evaluation predicts the split's images with every model at once: models whose backbone is identical run
it once (:func:`~tastelab.models.ensemble.backbone_groups`), frozen backbones read the trainer's feature
cache (same fingerprint, so a trained ensemble is evaluated without touching an image), and each head
then runs on the shared per-layer features. Records whose image cannot be decoded are left out exactly as
the trainer leaves them out, so the test numbers are on the very records of the members' own
``summary.json`` test metrics. Each model is scored on its own ``config.views`` (one ``orig`` for trainer-built
models; several for multi-view personal folders), averaged by :meth:`TasteModel.head_on_views`, the rule its
forward applies to pixels: the numbers are what ``tastelab score`` produces with these folders. A
shared-backbone group extracts (through the cache) the union of its members' views once.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tastelab.core.atomic import write_text_atomic
from tastelab.core.device import resolve_device
from tastelab.evaluation.metrics import compute_metrics
from tastelab.features.cache import default_cache_dir
from tastelab.features.extract import extract, frozen_backbone
from tastelab.io.splits import split_records
from tastelab.models.artifact import load_model_folder
from tastelab.models.ensemble import (
    EnsembleError,
    EnsembleModel,
    average_weights,
    backbone_groups,
    build_ensemble,
    check_same_preprocess,
    resolve_model_folder,
    update_metrics,
)
from tastelab.models.heads import HeadOutput
from tastelab.models.model import TasteModel, unit_scale
from tastelab.training.config import load_train_config, recipe_remote_code
from tastelab.training.data import Targets, load_dataset_records
from tastelab.training.trainer import train

logger = logging.getLogger(__name__)

SUMMARY_FILE = "ensemble_summary.json"
EVAL_SPLITS = ("val", "test")
HEAD_CHUNK = 1024  # rows per head call, as the trainer's evaluation


# --------------------------------------------------------------------------------------------------
# Predictions on a list of images, backbones shared


def _flat_features(leader: TasteModel, paths: Sequence[str], views: Sequence[str], *, cache_root: Path | None,
                   batch_size: int, workers: int | None,
                   device: torch.device) -> tuple[list[int], dict[str, torch.Tensor]]:
    """Per-layer features of ``paths`` for each of ``views`` (positions that decoded, view -> feature rows)."""
    fs = extract(leader, paths, level="layers", views=views, cache_dir=cache_root, batch_size=batch_size,
                 workers=workers, device=device)
    return fs.index, fs.features


@torch.inference_mode()
def _heads(model: TasteModel, flat: dict[str, torch.Tensor], device: torch.device) -> HeadOutput:
    """``model``'s output on cached rows of its views (view -> rows), in chunks: the mean over its views."""
    model.eval().to(device)
    n = len(next(iter(flat.values())))
    parts = [model.head_on_views({v: rows[s:s + HEAD_CHUNK].to(device) for v, rows in flat.items()})
             for s in range(0, n, HEAD_CHUNK)]

    def cat(name: str) -> torch.Tensor | None:
        vals = [getattr(o, name) for o in parts]
        return torch.cat([v.float().cpu() for v in vals]) if parts and vals[0] is not None else None

    score = cat("score")
    return HeadOutput(score=score if score is not None else torch.empty(0), probs=cat("probs"), var=cat("var"))


def predict_outputs(models: Mapping[str, TasteModel | EnsembleModel], paths: Sequence[str], *,
                    cache_root: str | os.PathLike | None, batch_size: int = 32, workers: int | None = None,
                    device: str | torch.device = "auto") -> tuple[list[int], dict[str, HeadOutput]]:
    """Outputs of every model on ``paths`` (positions kept: images every backbone decoded).

    Ensembles are expanded into their members, all models are grouped by backbone, and an ensemble's
    output is its :meth:`~EnsembleModel.combine` of its members' outputs: the same math as its forward.
    ``cache_root=None`` never reads or writes the feature cache.
    """
    dev = resolve_device(device)
    units: list[TasteModel] = []
    owners: dict[str, list[int]] = {}
    for name, model in models.items():
        members = list(model.members) if isinstance(model, EnsembleModel) else [model]
        owners[name] = list(range(len(units), len(units) + len(members)))
        units += members  # type: ignore[arg-type]
    groups = backbone_groups(units)
    per_group: list[tuple[list[int], dict[str, torch.Tensor]]] = []
    for g in groups:
        leader = units[g[0]]
        views = list(dict.fromkeys(v for i in g for v in units[i].config.views))  # the group's members' views
        root = Path(cache_root) if cache_root is not None and all(frozen_backbone(units[i]) for i in g) else None
        per_group.append(_flat_features(leader, paths, views, cache_root=root, batch_size=batch_size,
                                        workers=workers, device=dev))
    keep = sorted(set.intersection(*(set(ok) for ok, _ in per_group))) if per_group else []
    outs: list[HeadOutput | None] = [None] * len(units)
    for g, (ok, flat) in zip(groups, per_group):
        row = {p: r for r, p in enumerate(ok)}
        take = torch.tensor([row[p] for p in keep], dtype=torch.long)
        sel = {v: rows[take] for v, rows in flat.items()}
        for i in g:
            outs[i] = _heads(units[i], {v: sel[v] for v in units[i].config.views}, dev)
    result: dict[str, HeadOutput] = {}
    for name, model in models.items():
        mine: list[HeadOutput] = []
        for i in owners[name]:
            out = outs[i]
            assert out is not None  # every unit belongs to one group, and every group ran
            mine.append(out)
        result[name] = model.combine(mine) if isinstance(model, EnsembleModel) else mine[0]
    return keep, result


def _model_range(model: TasteModel | EnsembleModel) -> tuple[float, float]:
    return model.score_range if isinstance(model, EnsembleModel) else model.config.score_range


def output_metrics(out: HeadOutput, model_range: tuple[float, float], label_range: tuple[float, float],
                   records: Sequence[Any]) -> dict[str, float]:
    """The trainer's metrics (:func:`compute_metrics`) of one model's output against records' labels,
    on the labels' scale (an ensemble of members with other score ranges predicts on 1..10)."""
    targets = Targets.from_records(list(records))
    pred = out.score.float()
    if tuple(model_range) != tuple(label_range):
        lo, hi = label_range
        pred = lo + (unit_scale(pred, model_range) - 1.0) * (hi - lo) / 9.0
    use_dist = (out.probs is not None and targets.dist is not None
                and out.probs.shape[1] == targets.dist.shape[1])
    return compute_metrics(pred.numpy(), targets.score.numpy(),
                           pred_dist=out.probs.numpy() if use_dist else None,  # type: ignore[union-attr]
                           true_dist=targets.dist.numpy() if use_dist else None)  # type: ignore[union-attr]


def evaluate_models(models: Mapping[str, TasteModel | EnsembleModel], cfg: Any, split_file: str | os.PathLike, *,
                    splits: Sequence[str] = EVAL_SPLITS, device: str = "auto") -> dict[str, Any]:
    """Metrics of every model on the recipe's ``splits`` as saved in ``split_file`` (must exist: a new
    split would mix the members' training images into the evaluation).

    Returns ``{"n": {split: records}, "models": {name: {split: metrics}}}``.
    """
    split_file = Path(split_file)
    if not split_file.is_file():
        raise FileNotFoundError(f"split file {split_file} does not exist (pass the members' run split.json)")
    if cfg.data.format == "pairs":
        raise EnsembleError("ensemble evaluation scores rated images; pairwise-vote recipes are not supported")
    rs = load_dataset_records(cfg)
    by_split = split_records(rs, split_file, fractions=cfg.data.split, seed=cfg.seed)
    cache_root = Path(cfg.train.cache_dir) if cfg.train.cache_dir else default_cache_dir()
    result: dict[str, Any] = {"n": {}, "models": {name: {} for name in models}}
    for split in splits:
        records = by_split.get(split) or []
        if not records:
            continue
        keep, outs = predict_outputs(models, [r.path for r in records], cache_root=cache_root,
                                     batch_size=cfg.train.feature_batch_size, workers=cfg.train.workers,
                                     device=device)
        kept = [records[i] for i in keep]
        result["n"][split] = len(kept)
        for name, model in models.items():
            result["models"][name][split] = output_metrics(outs[name], _model_range(model), rs.score_range, kept)
    return result


def evaluate_folders(folders: Sequence[str | os.PathLike], config: str | os.PathLike, *,
                     split_file: str | os.PathLike | None = None, overrides: Sequence[str] = (),
                     device: str = "auto", trust_remote_code: bool = False,
                     allow_external_weights: bool = False) -> dict[str, Any]:
    """:func:`evaluate_models` for model / ensemble / run folders on a recipe's split (``tastelab ensemble
    eval``): by default the recipe's ``data.split_file``."""
    cfg = load_train_config(config, list(overrides))
    split = split_file or cfg.data.split_file
    if split is None:
        raise ValueError("pass --split-file (a run's split.json): evaluating on a new split would mix "
                         "training images into the test set")
    models = {str(f): load_model_folder(resolve_model_folder(f), trust_remote_code=trust_remote_code,
                                        allow_external_weights=allow_external_weights) for f in folders}
    return evaluate_models(models, cfg, split, device=device)


# --------------------------------------------------------------------------------------------------
# Training


@dataclass
class MemberPlan:
    """One member to train: recipe, seed and its run folder under ``OUT/members``."""

    name: str
    config: Path
    seed: int
    run_dir: Path


def plan_members(configs: Sequence[str | os.PathLike], seeds: Sequence[int], out: Path) -> list[MemberPlan]:
    """Every (config, seed) in order, named ``<recipe stem>-seed<k>`` (prefixed by the recipe's position
    when two recipes share a file name)."""
    if not configs:
        raise ValueError("ensemble train needs at least one recipe")
    if not seeds:
        raise ValueError("ensemble train needs at least one seed")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds {list(seeds)} repeat: identical members add nothing")
    stems = [Path(c).stem for c in configs]
    plans = []
    for i, (cfg, stem) in enumerate(zip(configs, stems)):
        base = stem if stems.count(stem) == 1 else f"{i}-{stem}"
        for s in seeds:
            name = f"{base}-seed{s}"
            plans.append(MemberPlan(name=name, config=Path(cfg), seed=int(s), run_dir=out / "members" / name))
    return plans


def _mean_std(rows: Sequence[dict[str, float]]) -> tuple[dict[str, float], dict[str, float]]:
    keys = [k for k in rows[0] if all(k in r for r in rows)] if rows else []
    mean = {k: statistics.fmean(r[k] for r in rows) for k in keys}
    std = {k: statistics.stdev([r[k] for r in rows]) if len(rows) > 1 else 0.0 for k in keys}
    return mean, std


def train_ensemble(configs: Sequence[str | os.PathLike], seeds: Sequence[int], out: str | os.PathLike, *,
                   overrides: Sequence[str] = (), soup: bool = False, device: str = "auto",
                   trust_remote_code: bool = False) -> dict[str, Any]:
    """Train every (config, seed) member into ``out/members/<name>`` on ONE split, then build and evaluate.

    The first member makes the split; every other member trains with it as ``data.split_file``, so all
    val/test numbers are on the same images. Members whose ``summary.json`` exists are skipped (an
    interrupted member resumes from its checkpoint), so re-running the command continues where it stopped.
    Then: ``out/model`` (ensemble of every member's best/), ``out/soup`` with ``soup`` (weight average, only
    when the members are compatible), metrics of members / ensemble / soup on val and test, written to
    ``out/ensemble_summary.json`` (also returned). ``trust_remote_code``: the user's permission for recipes
    that ask to run their backbone's own code (:func:`~tastelab.training.config.recipe_remote_code`; refused
    before any member trains without it); it also covers reloading the members to build and evaluate.
    """
    out = Path(out)
    plans = plan_members(configs, seeds, out)
    overrides = list(overrides)
    # Validate every recipe before hours of training, and that their members can form one ensemble.
    cfgs = [load_train_config(p.config, [*overrides, f"seed={p.seed}"]) for p in plans]
    check_same_preprocess([c.model.preprocess for c in cfgs], [p.name for p in plans])
    trust = any([recipe_remote_code(c, trust_remote_code=trust_remote_code, recipe=p.config)  # every one checked
                 for p, c in zip(plans, cfgs)])
    split_file = plans[0].run_dir / "split.json"
    for i, (plan, cfg) in enumerate(zip(plans, cfgs)):
        if (plan.run_dir / "summary.json").is_file():
            logger.info("member %d/%d %s: already trained (%s), skipped", i + 1, len(plans), plan.name,
                        plan.run_dir / "summary.json")
            continue
        if i > 0:
            if not split_file.is_file():
                raise FileNotFoundError(f"{split_file}: the first member's split is missing; re-run to recreate it")
            # JSON quoting is valid YAML: the override survives spaces and colons in the path.
            cfg = load_train_config(plan.config, [*overrides, f"seed={plan.seed}",
                                                  f"data.split_file={json.dumps(str(split_file.resolve()))}"])
        logger.info("member %d/%d %s: training (%s, seed %d)", i + 1, len(plans), plan.name, plan.config, plan.seed)
        train(cfg, plan.run_dir, trust_remote_code=trust_remote_code)

    best = [resolve_model_folder(p.run_dir) for p in plans]
    provenance = {"configs": [str(c) for c in configs], "seeds": [int(s) for s in seeds], "overrides": overrides,
                  "split_file": str(split_file), "members": [p.name for p in plans]}
    # The members are this run's own folders: what the user allowed for the recipes applies to them too.
    own: dict[str, Any] = {"trust_remote_code": trust, "allow_external_weights": True}
    model_dir = build_ensemble(best, out / "model", name=f"{cfgs[0].model.name}-ensemble", training=provenance,
                               **own)
    soup_dir: Path | None = None
    soup_error: str | None = None
    if soup:
        try:
            soup_dir = average_weights(best, out / "soup", **own)
        except EnsembleError as exc:
            soup_error = str(exc)
            logger.warning("no weight average: %s", exc)
            if (out / "soup").exists():  # a stale soup from an earlier, different run must not be mistaken
                shutil.rmtree(out / "soup")

    summary: dict[str, Any] = {**provenance, "out": str(out), "model": str(model_dir),
                               "members": [], "ensemble": {"folder": str(model_dir)},
                               "soup": None if not soup else ({"folder": str(soup_dir)} if soup_dir else
                                                              {"error": soup_error})}
    member_runs = []
    for p, b in zip(plans, best):
        run_summary = json.loads((p.run_dir / "summary.json").read_text())
        member_runs.append({"name": p.name, "config": str(p.config), "seed": p.seed, "run_dir": str(p.run_dir),
                            "model": str(b), "trainer_test": run_summary.get("test", {}).get(b.name, {}),
                            "train_seconds": run_summary.get("train_seconds")})
    summary["members"] = member_runs
    if any(c.data.format == "pairs" for c in cfgs):
        logger.warning("pairwise-vote recipes: ensemble built, evaluation skipped (it scores rated images)")
        summary["evaluation"] = "skipped: pairwise-vote data"
    else:
        ens = load_model_folder(model_dir, **own)
        assert isinstance(ens, EnsembleModel)
        models: dict[str, TasteModel | EnsembleModel] = {p.name: m for p, m in zip(plans, ens.members)}  # type: ignore[misc]
        models["ensemble"] = ens
        if soup_dir is not None:
            models["soup"] = load_model_folder(soup_dir, **own)
        ev = evaluate_models(models, cfgs[0], split_file, device=device)
        summary["n"] = ev["n"]
        summary["evaluation"] = ("each model's own views (config.views) averaged, as tastelab score does; frozen "
                                 "backbones from the feature cache; the records of the members' own summary.json "
                                 "test metrics")
        for row in member_runs:
            row.update(ev["models"][row["name"]])
            ref, got = row["trainer_test"].get("srcc"), row.get("test", {}).get("srcc")
            if ref is not None and got is not None and abs(ref - got) > 1e-5:
                logger.warning("%s: test SRCC %.5f here vs %.5f in its summary.json (eval_tta in the recipe?)",
                               row["name"], got, ref)
        summary["ensemble"].update(ev["models"]["ensemble"])
        if soup_dir is not None:
            summary["soup"].update(ev["models"]["soup"])
        for split in ev["n"]:
            mean, std = _mean_std([r[split] for r in member_runs])
            summary.setdefault("members_mean", {})[split] = mean
            summary.setdefault("members_std", {})[split] = std
        if "val" in ev["n"]:
            update_metrics(model_dir, ev["models"]["ensemble"]["val"])
            if soup_dir is not None:
                update_metrics(soup_dir, ev["models"]["soup"]["val"])
    write_text_atomic(out / SUMMARY_FILE, json.dumps(summary, indent=2))
    return summary
