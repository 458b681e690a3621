"""The quality / aesthetic tasks on :class:`~tastelab.models.model.TasteModel`: regression on MOS, AVA vote
histograms or personal scores (``quality``) and Bradley-Terry / margin training on A/B votes (``pairwise``).

They are :class:`~tastelab.training.tasks.base.Task` s trained by the one loop,
:class:`~tastelab.training.tasks.loop.TaskTrainer`; what is theirs: the three training modes (``frozen``: the
head on cached frozen features, ``lora``, ``full``), ELTA (mixup, similarity alignment, pseudo-labels), the
LoRA-rank and resolution schedules by epoch, image-level vote splits with held-out ``srcc_derived``, and
the output: ``tastelab score`` model folders (``config.json`` + weights, not ``task.json``), a held-out
report and the quality ``summary.json``. The run folder::

    config.yaml  split.json  metrics.jsonl  checkpoints/latest/  [checkpoints/epoch-N/]
    best/  final/  (model folders `tastelab score --model` loads)  curves.png  summary.json

Recipes are the quality recipes (:class:`~tastelab.training.config.TrainConfig`, no ``task:`` key):
``data.format: pairs`` is the pairwise task, every other format the quality task
(:func:`task_for_config`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from tastelab.core.atomic import write_text_atomic
from tastelab.core.errors import UserError
from tastelab.core.jsonutil import json_default
from tastelab.evaluation.heldout import heldout_lines, heldout_report
from tastelab.evaluation.metrics import (
    METRIC_DIRECTIONS,
    compute_metrics,
    metric_direction,
    pairwise_accuracy,
    srcc,
)
from tastelab.features.cache import default_cache_dir
from tastelab.features.extract import extract
from tastelab.io.images import normalize_batch
from tastelab.io.loader import default_workers
from tastelab.io.records import Record
from tastelab.io.splits import DEFAULT_SEEN_FRACTION, SEEN_SPLIT, VoteSplit, split_records, split_votes
from tastelab.io.votes import Vote, load_training_votes
from tastelab.models.artifact import load_model_folder
from tastelab.models.artifact import save_model as save_model_folder
from tastelab.models.heads import HeadOutput
from tastelab.models.model import TasteModel
from tastelab.models.registries import HEADS
from tastelab.pairwise.ratings import fit_bradley_terry
from tastelab.training import elta, losses
from tastelab.training.checkpoint import TrainState
from tastelab.training.config import TrainConfig
from tastelab.training.data import (
    FeatureDataset,
    ImageDataset,
    PairFeatureDataset,
    PairImageDataset,
    PairTargets,
    Targets,
    load_dataset_records,
)
from tastelab.training.plots import plot_history
from tastelab.training.provenance import record_test_metrics, run_record, utc_now
from tastelab.training.rank_schedule import grow_to, rank_at_checkpoint, rank_for_epoch
from tastelab.training.runtime import write_history
from tastelab.training.tasks.base import Evaluation, Predictor, RunContext, Task, TaskData, batched

logger = logging.getLogger(__name__)


class NonFiniteLossError(UserError):
    """Training diverged: the loss became NaN or infinite (the message names the epoch and step)."""


def _split_sizes(splits: dict[str, list[Any]], pairs: bool, vote_split: VoteSplit | None = None) -> str:
    """``train 80 images / 120 pairs, val ...``: one line, with units (pairs count vote rows' pairs). Under an
    image split a split's images are its own (unseen) images, not the training images its votes also touch."""
    parts = []
    order = {"train": 0, "val": 1, "test": 2}
    for name, items in sorted(splits.items(), key=lambda kv: (order.get(kv[0], 3), kv[0])):
        own = _own_images(vote_split, name) if vote_split is not None else None
        if pairs:
            n_img = len({c.image_a for c in items} | {c.image_b for c in items}) if own is None else len(own)
            parts.append(f"{name} {n_img} images / {len(items)} pairs")
        else:
            parts.append(f"{name} {len(items)} images")
    return ", ".join(parts)


#: Loggers whose warnings about a split are collected and re-logged once, naming the split.
_SPLIT_WARNING_SOURCES = ("tastelab.evaluation.metrics", "tastelab.pairwise.ratings")


class _Collect(logging.Handler):
    """Holds log messages back (to re-log them once, naming the split they are about)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@dataclass
class EvalSplit:
    """One evaluation split of a quality task: its name (split-specific metrics and warnings), the data
    predictions come from (cached views or an ImageDataset; for pairs: every image of the votes) and the
    targets (scores, or the split's vote pairs as indices into that data)."""

    name: str
    data: Any
    targets: Targets | PairTargets


class QualityTask(Task):
    """Regression of per-image quality / aesthetic scores (MOS, AVA histograms, personal scores)."""

    name: ClassVar[str] = "quality"
    #: Trained on A/B votes (``data.format: pairs``) rather than per-image labels.
    pairs: ClassVar[bool] = False
    main_metric: ClassVar[str] = "srcc"
    metric_directions: ClassVar[dict[str, str]] = dict(METRIC_DIRECTIONS)

    # Set up by build_data() (_make_datasets / _make_pair_datasets), by data format and training mode.
    train_ds: FeatureDataset | ImageDataset | PairFeatureDataset | PairImageDataset
    eval_sets: dict[str, tuple[Any, Targets | PairTargets]]
    _image_data: dict[str, torch.Tensor] | ImageDataset
    _elta_summary: dict[str, Any]

    cfg: TrainConfig  # type: ignore[assignment]  # a quality recipe, not a task recipe
    mode: str  # type: ignore[assignment]  # frozen | lora | full
    ctx: RunContext  # the loop's, from build_data on

    def __init__(self, cfg: TrainConfig, *, trust_remote_code: bool = False) -> None:
        """``trust_remote_code``: whether the backbone (and this run's own best/ and final/ reloaded for the
        test) may run its checkpoint's code; the trainer passes the recipe's request once the user allowed it
        (:func:`~tastelab.training.config.recipe_remote_code`), never the recipe's field alone."""
        if cfg.train.mode == "select":  # no gradient training: tastelab.personal.recipe runs it (above training)
            raise UserError("train.mode select is not a gradient-training mode: run it with `tastelab train "
                            "RECIPE` or tastelab.personal.recipe.run_select_recipe")
        self.cfg = cfg
        self.trust_remote_code = trust_remote_code
        self.mode = cfg.train.mode
        self.metric = cfg.train.metric if cfg.train.metric != "auto" else self.main_metric

    @property
    def accelerator(self) -> Any:
        return self.ctx.accelerator

    @property
    def run_dir(self) -> Path:
        return self.ctx.run_dir

    def _build_model(self, score_range: tuple[float, float]) -> TasteModel:
        model = TasteModel.build(self.cfg.to_model_config(score_range),  # injects LoRA when configured
                                 trust_remote_code=self.trust_remote_code)
        for name, p in model.backbone.named_parameters():
            if self.mode == "frozen":
                p.requires_grad = name.startswith("combiner.")
            elif self.mode == "lora":
                p.requires_grad = "lora_" in name or name.startswith("combiner.")
            else:
                p.requires_grad = True
        return model

    def _loss_name(self, model: TasteModel) -> str:
        name = self.cfg.train.loss
        kind = model.config.head.kind
        if name == "auto" and self.pairs:
            name = "bradley_terry"
        elif name == "auto":
            name = HEADS.metadata(kind)["default_loss"]
        needs = losses.LOSSES.metadata(name).get("head")
        if needs is not None and needs != kind:
            raise ValueError(f"loss {name!r} needs a {needs} head, the model has a {kind!r} head")
        return str(name)

    def _loss(self, out: HeadOutput | tuple[HeadOutput, HeadOutput], batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return losses.compute_loss(self.loss_name, out, batch, self.cfg.train)

    # ------------------------------------------------------------------ data
    def _features_for(self, model: TasteModel, records: list[Record], views: list[str]) -> dict[str, Any]:
        cache = Path(self.cfg.train.cache_dir) if self.cfg.train.cache_dir else default_cache_dir()
        fs = extract(model, [r.path for r in records], level="layers", views=views, cache_dir=cache,
                     batch_size=self.cfg.train.feature_batch_size, workers=self.cfg.train.workers,
                     device=self.accelerator.device)
        keep = set(fs.paths)
        return {"records": [r for r in records if r.path in keep], "views": fs.features, "errors": fs.errors}

    def _make_datasets(self, model: TasteModel, splits: dict[str, list[Record]]) -> None:
        t = self.cfg.train
        self.eval_sets = {}
        if self.mode == "frozen":
            train_views = ["orig", "hflip"] if t.hflip else ["orig"]
            eval_views = train_views if t.eval_tta else ["orig"]
            tr = self._features_for(model, splits["train"], train_views)
            self.train_records = tr["records"]
            targets = Targets.from_records(self.train_records)
            self.train_ds = FeatureDataset(tr["views"], targets, seed=self.cfg.seed)
            self._feature_stats = tr["views"]["orig"]
            for name in ("val", "test"):
                if splits.get(name):
                    ev = self._features_for(model, splits[name], eval_views)
                    self.eval_sets[name] = (ev["views"], Targets.from_records(ev["records"]))
            return
        self.train_records = splits["train"]
        pre = model.config.preprocess
        size0 = self._size_for_epoch(0)
        self.train_ds = ImageDataset([r.path for r in self.train_records], Targets.from_records(self.train_records),
                                     pre.model_copy(update={"size": size0}), seed=self.cfg.seed, hflip=t.hflip)
        for name in ("val", "test"):
            if splits.get(name):
                recs = splits[name]
                self.eval_sets[name] = (
                    ImageDataset([r.path for r in recs], Targets.from_records(recs), pre, train=False),
                    Targets.from_records(recs),
                )
        self._feature_stats = None

    def _size_for_epoch(self, epoch: int) -> int:
        sched = self.cfg.train.resolution_schedule
        if not sched:
            return self.cfg.model.preprocess.size
        return sched[max(e for e in sched if e <= epoch)]

    def _decode_workers(self) -> int:
        """Image decode processes: the recipe's ``train.workers``, else the device-aware default."""
        w = self.cfg.train.workers
        return default_workers(self.accelerator.device.type) if w is None else w

    @torch.no_grad()
    def _image_feature_stats(self, model: TasteModel, n: int = 256) -> torch.Tensor:
        """Feature statistics for the head's input standardisation in image modes."""
        ds = self.train_ds
        idx = list(range(min(n, len(ds))))
        model.eval()
        feats = []
        pre = model.config.preprocess
        for start in range(0, len(idx), 32):
            items = [ds[i] for i in idx[start:start + 32]]
            px = torch.stack([it["pixels"] for it in items]).to(self.accelerator.device)
            feats.append(model.features(normalize_batch(px, pre.mean, pre.std)).float().cpu())
        return torch.cat(feats)

    def _pair_splits(self, split_file: Path) -> dict[str, list[Vote]]:
        """Votes split by image (default: val/test are unseen images, plus test_seen pairs among train
        images) or by pair (``data.pair_split``); persisted in ``split_file`` (io/splits.split_votes)."""
        d = self.cfg.data
        comps = load_training_votes(d.path, d.image_root, d.limit)
        self._vote_split = split_votes(
            comps, split_file, pair_split=d.pair_split, fractions=d.split, seed=self.cfg.seed,
            seen_fraction=DEFAULT_SEEN_FRACTION if d.seen_pairs is None else d.seen_pairs)
        return self._vote_split.votes

    def _make_pair_datasets(self, model: TasteModel, splits: dict[str, list[Vote]]) -> None:
        t = self.cfg.train
        images = sorted({c.image_a for cs in splits.values() for c in cs} |
                        {c.image_b for cs in splits.values() for c in cs})
        index = {p: i for i, p in enumerate(images)}

        def targets(cs: list[Vote]) -> PairTargets:
            return PairTargets(idx_a=torch.tensor([index[c.image_a] for c in cs], dtype=torch.long),
                               idx_b=torch.tensor([index[c.image_b] for c in cs], dtype=torch.long),
                               votes_a=torch.tensor([float(c.votes_a) for c in cs]),
                               votes_b=torch.tensor([float(c.votes_b) for c in cs]))

        records = [Record(path=p) for p in images]
        train_images = sorted({index[c.image_a] for c in splits["train"]} | {index[c.image_b] for c in splits["train"]})
        if self.mode == "frozen":
            views = ["orig", "hflip"] if t.hflip else ["orig"]
            fs = self._features_for(model, records, views)
            if fs["errors"]:
                raise ValueError(f"{len(fs['errors'])} images of the pairs cannot be decoded, e.g. "
                                 f"{next(iter(fs['errors'].items()))}")
            self.train_ds = PairFeatureDataset(fs["views"], targets(splits["train"]), seed=self.cfg.seed)
            self._image_data = {"orig": fs["views"]["orig"]}
            self._feature_stats = fs["views"]["orig"][train_images]
        else:
            pre = model.config.preprocess
            self.train_ds = PairImageDataset(images, targets(splits["train"]),
                                             pre.model_copy(update={"size": self._size_for_epoch(0)}),
                                             seed=self.cfg.seed, hflip=t.hflip)
            dummy = Targets(score=torch.zeros(len(images)), weight=torch.ones(len(images)))
            self._image_data = ImageDataset(images, dummy, pre, train=False)
            self._feature_stats = None
        self._train_image_index = torch.tensor(train_images, dtype=torch.long)
        self.eval_sets = {name: (self._image_data, targets(splits[name])) for name in ("val", "test", SEEN_SPLIT)
                          if splits.get(name)}
        # Held-out "truth" per image for SRCC: Bradley-Terry scores fitted on that split's votes alone.

        self._derived: dict[str, tuple[torch.Tensor, np.ndarray]] = {}
        for name in ("val", "test"):  # test_seen reports pair accuracy only: its images are the training images
            if name not in self.eval_sets:
                continue
            with self._split_warnings(name):
                fitted = fit_bradley_terry(splits[name], stderr=False).scores
            names = sorted(fitted)
            own = _own_images(self._vote_split, name)
            if own is not None:  # image split: rank the split's own (unseen) images, not the train images they met
                names = [n for n in names if n in own]
            self._derived[name] = (torch.tensor([index[n] for n in names], dtype=torch.long),
                                   np.array([fitted[n] for n in names]))

    # ------------------------------------------------------------------ steps
    def _forward(self, module: nn.Module, batch: dict[str, torch.Tensor]
                 ) -> HeadOutput | tuple[HeadOutput, HeadOutput]:
        """``module`` is the head (cached features) or the whole model (images); a batch of pairs gives the
        outputs of both sides."""
        if "features_a" in batch or "pixels_a" in batch:
            # Both sides of every pair in one forward pass, then split.
            key = "features" if "features_a" in batch else "pixels"
            both = {key: torch.cat([batch[f"{key}_a"], batch[f"{key}_b"]])}
            out = self._forward(module, both)
            assert isinstance(out, HeadOutput)  # one side's key only: not a pair batch
            n = batch[f"{key}_a"].shape[0]
            return (HeadOutput(score=out.score[:n]), HeadOutput(score=out.score[n:]))
        if "features" in batch:
            return module(batch["features"])
        pre = self.cfg.model.preprocess
        x = normalize_batch(batch["pixels"], pre.mean, pre.std)
        return module(x)

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.accelerator.device, non_blocking=True) for k, v in batch.items()}

    def _elta_loss(self, module: nn.Module, batch: dict[str, torch.Tensor], epoch: int, b: int) -> torch.Tensor:
        """ELTA step (training/elta.py): pooled features -> [tail mixup] -> head, + similarity alignment.

        The mixup draw is a pure function of (seed, epoch, batch index, process), so resume stays exact.
        """
        e = self.cfg.train.elta
        mix = None
        if e.mixup:
            n_mix = elta.resolve_mix_count(e.mix_count, batch["score"].shape[0])
            gen = elta.mix_generator(self.cfg.seed, epoch, b, self.accelerator.process_index)
            mix = elta.mix_plan(batch["score"], n_mix, self._score_range, e.tau1, e.tau2, gen)
            if mix is not None:
                mix = tuple(t.to(self.accelerator.device) for t in mix)  # type: ignore[assignment]
        embed = e.similarity_features if e.similarity_weight > 0 else None
        if "features" in batch:
            x = batch["features"]
        else:
            pre = self.cfg.model.preprocess
            x = normalize_batch(batch["pixels"], pre.mean, pre.std)
        with self.accelerator.autocast():
            res = module(x, mix=mix, embed=embed)
        out, emb = res if isinstance(res, tuple) else (res, None)  # nothing to mix in a batch of one
        loss = self._loss(out, elta.mix_targets(batch, mix, e.mix_weight) if mix is not None else batch)
        if emb is not None:
            loss = loss + e.similarity_weight * elta.similarity_loss(emb, batch["score"], self._score_range,
                                                                     batch["weight"])
        return loss

    def _with_pseudo_labels(self, splits: dict[str, list[Record]], score_range: tuple[float, float]
                            ) -> list[Record]:
        """ELTA self-training: the TRAIN split plus the pseudo-label file's records (val/test untouched).

        Pseudo-labelled images that are labelled or held out in this data set are dropped (a held-out image
        must never train); distributions are dropped unless every training record has one.
        """
        path = Path(self.cfg.train.elta.pseudo_labels)  # type: ignore[arg-type]
        pseudo = elta.load_pseudo_labels(path, score_range)
        taken = {r.path for name in ("train", "val", "test") for r in splits.get(name, [])}
        kept = [r for r in pseudo if r.path not in taken]
        if len(kept) < len(pseudo):
            logger.warning("%s: %d pseudo-labelled images are labelled or held out here; left out", path,
                           len(pseudo) - len(kept))
        train = splits["train"]
        if kept and not all(r.distribution is not None for r in train):
            kept = [Record(r.path, r.score, None, r.weight, None, r.source, r.extra) for r in kept]
        logger.info("ELTA: %d pseudo-labelled images appended to %d training records", len(kept), len(train))
        self._elta_summary = {"pseudo_labels": len(kept), "pseudo_file": str(path), "labelled_train": len(train)}
        return train + kept

    @torch.no_grad()
    def _predict(self, model: TasteModel, data: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Native-scale predictions (and distributions) for cached views (averaged: TTA) or images.

        Images go through :func:`~tastelab.features.extract.extract` (the one image -> features loop; no
        cache: in image modes the encoder is being trained), then the head, in the run's precision."""
        model.eval()
        if isinstance(data, dict):
            outs = [self._head_chunks(model.head_on_cached, data[view]) for view in sorted(data)]
            pred = torch.stack([o[0] for o in outs]).mean(0)
            view_dists = [o[1] for o in outs if o[1] is not None]
            dist = torch.stack(view_dists).mean(0) if len(view_dists) == len(outs) else None
            return pred, dist

        amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(str(self.accelerator.mixed_precision),
                                                                  torch.float32)
        fs = extract(model, data.paths, level="pooled", cache_dir=None, batch_size=self.cfg.train.batch_size,
                     workers=self._decode_workers(), device=self.accelerator.device, dtype=amp,
                     preprocess=data.preprocess)
        if fs.errors:
            path, reason = next(iter(fs.errors.items()))
            raise UserError(f"{path}: cannot be decoded for evaluation ({reason})")
        return self._head_chunks(model.head, fs.features["orig"], autocast=True)

    def _head_chunks(self, head: Callable[[torch.Tensor], HeadOutput], feats: torch.Tensor, *,
                     autocast: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``head`` over feature rows in chunks on the run's device: native-scale scores, distributions.
        ``autocast``: in the run's mixed precision (image modes, as in training; cached heads run fp32)."""
        scores, probs = [], []
        for start in range(0, len(feats), 1024):
            with self.accelerator.autocast() if autocast else contextlib.nullcontext():
                out = head(feats[start:start + 1024].to(self.accelerator.device))
            scores.append(out.score.float().cpu())
            if out.probs is not None:
                probs.append(out.probs.float().cpu())
        return torch.cat(scores), (torch.cat(probs) if probs else None)

    def _derived_srcc(self, pred: torch.Tensor, name: str) -> dict[str, float]:
        """Spearman of predictions against scores derived (Bradley-Terry) from the split's own votes."""
        if name not in getattr(self, "_derived", {}):
            return {}
        idx, derived = self._derived[name]
        return {"srcc_derived": srcc(pred[idx].numpy(), derived)}

    @contextlib.contextmanager
    def _split_warnings(self, name: str) -> Any:
        """Warnings about one split (metrics, the held-out votes' Bradley-Terry fit), logged once per run
        and naming the split: the same warning from pair_acc and pair_acc_unweighted, from val and test,
        or from every epoch would otherwise repeat without saying which split it is about."""
        sources = [logging.getLogger(n) for n in _SPLIT_WARNING_SOURCES]
        handler, propagate = _Collect(), [s.propagate for s in sources]
        for source in sources:
            source.addHandler(handler)
            source.propagate = False
        try:
            yield
        finally:
            for source, prop in zip(sources, propagate):
                source.removeHandler(handler)
                source.propagate = prop
            seen = self.__dict__.setdefault("_warned", set())
            for msg in dict.fromkeys(handler.messages):
                if (name, msg) not in seen:
                    seen.add((name, msg))
                    logger.warning("%s split: %s", name, msg)

    def evaluate(self, model: nn.Module, dataset: Any, ctx: RunContext) -> Evaluation:
        """``dataset``: an :class:`EvalSplit` of :meth:`build_data` (the split's name picks its metrics)."""
        assert isinstance(model, TasteModel) and isinstance(dataset, EvalSplit)
        return Evaluation(self.evaluate_split(model, dataset.name))

    @torch.no_grad()
    def evaluate_split(self, model: TasteModel, name: str) -> dict[str, float]:
        """Metrics of one split by name (val, test, test_seen); warnings about it are logged once, naming it."""
        with self._split_warnings(name):
            return self._evaluate(model, name)

    def _evaluate(self, model: TasteModel, name: str) -> dict[str, float]:
        data, targets = self.eval_sets[name]
        pred, dist = self._predict(model, data)
        if isinstance(targets, PairTargets):
            pa, pb = pred[targets.idx_a], pred[targets.idx_b]
            return {"pair_acc": pairwise_accuracy(pa.numpy(), pb.numpy(), targets.votes_a.numpy(),
                                                  targets.votes_b.numpy()),
                    "pair_acc_unweighted": pairwise_accuracy(pa.numpy(), pb.numpy(), targets.votes_a.numpy(),
                                                             targets.votes_b.numpy(), weighted=False),
                    **self._derived_srcc(pred, name)}
        use_dist = dist is not None and targets.dist is not None
        return compute_metrics(pred.numpy(), targets.score.numpy(),
                               pred_dist=dist.numpy() if dist is not None and use_dist else None,
                               true_dist=targets.dist.numpy() if targets.dist is not None and use_dist else None)

    # ------------------------------------------------------------------ data + model (one stage: caching
    # frozen features needs the model's backbone, and the head's input statistics need the data)
    def build_data(self, ctx: RunContext) -> TaskData:
        self.ctx = ctx
        cfg, t = self.cfg, self.cfg.train
        split_file = Path(cfg.data.split_file) if cfg.data.split_file else self.run_dir / "split.json"
        if cfg.data.split_file and not split_file.exists():
            raise FileNotFoundError(f"data.split_file {split_file} does not exist")
        if self.pairs:
            splits: dict[str, list[Any]] = self._pair_splits(split_file)
            score_range = (0.0, 1.0)  # latent scale: replaced from training-image predictions when saving
        else:
            rs = load_dataset_records(cfg)
            splits = split_records(rs, split_file, fractions=cfg.data.split, seed=cfg.seed)
            score_range = rs.score_range
        if cfg.data.split_file:
            shutil.copyfile(split_file, self.run_dir / "split.json")
        self._elta_summary = {}
        if t.elta.pseudo_labels:
            splits["train"] = self._with_pseudo_labels(splits, score_range)
        if not splits.get("train"):
            raise ValueError("the split has no training records")
        self._sizes_line = "{}{}".format(
            _split_sizes(splits, self.pairs, getattr(self, "_vote_split", None)),
            " (split by image: val/test pairs are the votes touching those unseen images)"
            if self.pairs and cfg.data.pair_split == "image" else "")
        self._provenance = run_record(cfg, recipe_path=ctx.recipe_path, split_file=self.run_dir / "split.json",
                                      sizes={k: len(v) for k, v in splits.items()}, started_at=utc_now())
        if not self.pairs:
            _check_labels(splits, cfg.data.path)

        model = self._build_model(score_range)
        self.loss_name = self._loss_name(model)
        model.to(self.accelerator.device)
        if self.pairs:
            self._make_pair_datasets(model, splits)
        else:
            self._make_datasets(model, splits)
        if self._feature_stats is not None:
            with torch.no_grad():
                stats = model.backbone.combine_flat(self._feature_stats.to(self.accelerator.device)).cpu()
        else:
            stats = self._image_feature_stats(model)
        model.head.set_input_stats(stats)
        if not self.pairs:
            model.head.init_output_bias(float(Targets.from_records(self.train_records).score.mean()))
        self._model = model
        self._score_range = score_range
        return TaskData(train=self.train_ds,
                        eval={name: EvalSplit(name, d, ts) for name, (d, ts) in self.eval_sets.items()},  # type: ignore[misc]
                        sizes={k: len(v) for k, v in splits.items()})

    def describe_data(self, data: TaskData) -> str:
        return self._sizes_line

    def build_model(self, data: TaskData) -> nn.Module:
        return self._model  # built with the data (build_data)

    def is_head_parameter(self, name: str) -> bool:
        return name.startswith("head.")

    def loader_workers(self, dataset: Any, workers: int) -> int:
        # Cached features are in memory: worker processes would only add start-up and copying.
        return 0 if isinstance(dataset, (FeatureDataset, PairFeatureDataset)) else workers

    def train_module(self, model: nn.Module) -> nn.Module:
        # Only what trains is wrapped (DDP would flag the unused frozen backbone otherwise).
        assert isinstance(model, TasteModel)
        return _CachedHead(model) if self.mode == "frozen" else (
            _EltaModel(model) if self.cfg.train.elta.active else model)

    # ------------------------------------------------------------------ schedules by epoch
    def after_prepare(self, model: nn.Module, optimizer: Any, resume_from: Path | None) -> None:
        assert isinstance(model, TasteModel)
        rank_schedule = self.cfg.train.lora_rank_schedule
        if rank_schedule and self.accelerator.num_processes > 1:
            raise ValueError("train.lora_rank_schedule runs in a single process (growing replaces parameters "
                             "that DDP has already registered)")
        if rank_schedule and resume_from is not None:
            # The checkpoint's adapter has the rank in effect when it was written: grow to it before loading.
            saved = json.loads((resume_from / "state.json").read_text())
            grow_to(model, rank_at_checkpoint(rank_schedule, int(saved["epoch"]), int(saved["batches_done"])),
                    optimizer=optimizer)

    def start_epoch(self, model: nn.Module, optimizer: Any, epoch: int) -> bool:
        assert isinstance(model, TasteModel)
        rank_schedule = self.cfg.train.lora_rank_schedule
        grown = bool(rank_schedule) and grow_to(model, rank_for_epoch(rank_schedule, epoch),  # type: ignore[arg-type]
                                                optimizer=optimizer, seed=self.cfg.seed * 100_003 + epoch)
        if isinstance(self.train_ds, ImageDataset):
            self.train_ds.set_size(self._size_for_epoch(epoch))
        return grown

    def train_mode(self, model: nn.Module) -> None:
        assert isinstance(model, TasteModel)
        model.train()
        if self.mode != "full":
            model.backbone.eval()  # frozen BatchNorm statistics and no backbone dropout

    # ------------------------------------------------------------------ step
    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self._loss(self._forward(model, batch), batch)

    def step_loss(self, module: nn.Module, batch: dict[str, torch.Tensor], *, epoch: int, index: int,
                  accelerator: Any) -> torch.Tensor:
        if self.cfg.train.elta.active:
            return self._elta_loss(module, batch, epoch, index)
        with accelerator.autocast():
            out = self._forward(module, batch)
        return self._loss(out, batch)  # the loss in fp32, outside autocast

    def divergence_error(self, message: str) -> UserError:
        return NonFiniteLossError(f"{message} in {self.cfg.data.path} for huge or non-finite values")

    def checkpoint_weights(self, model: nn.Module) -> dict[str, torch.Tensor]:
        assert isinstance(model, TasteModel)
        return self._trainable_state(model)

    def selection_metric(self) -> str:
        return self.metric

    def metric_direction(self, metric: str) -> str:
        return metric_direction(metric)

    def model_info(self, row: dict[str, Any], data: TaskData, ctx: RunContext) -> dict[str, Any]:
        return {"row": row}

    def describe_epoch(self, row: dict[str, Any], metric: str, state: TrainState, has_val: bool) -> str:
        shown = [metric, *(k for k in ("srcc", "plcc", "mae", "emd") if k != metric)]
        return "{}{}".format("  ".join(f"val {k}={row[f'val/{k}']:.4f}" for k in shown if f"val/{k}" in row),
                             f"  (best {metric} {state.best_metric:.4f} at epoch {state.best_epoch})"
                             if has_val and state.best_epoch else "")

    # ------------------------------------------------------------------ saved folders
    @classmethod
    def load_model(cls, folder: Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
        """A saved quality model folder (``config.json`` + weights) -> (TasteModel in eval mode, its config)."""
        model = _load_taste_model(Path(folder), device)
        return model, model.config.model_dump(mode="json")

    @classmethod
    def predictor(cls, folder: Path, device: str | torch.device = "cpu", **options: Any) -> Predictor:
        return _ScorePredictor(_load_taste_model(Path(folder), device), device)

    # ------------------------------------------------------------------ outputs
    def _heldout_sizes(self) -> dict[str, dict[str, int]]:
        """Per split: votes and the split's own images (image split), votes (pair split) or images."""
        if not self.pairs:
            return {name: {"images": len(ts.score)} for name, (_, ts) in self.eval_sets.items()
                    if isinstance(ts, Targets)}
        vs = self._vote_split
        return {name: {"votes": len(votes)} | ({"images": len(_own_images(vs, name) or ())} if vs.images else {})
                for name, votes in vs.votes.items()}

    def _trainable_state(self, model: TasteModel) -> dict[str, torch.Tensor]:
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        state = model.state_dict()
        return {k: v for k, v in state.items()
                if self.mode == "full" or not k.startswith("backbone.model.") or k in trainable}

    def save_model(self, model: nn.Module, folder: Path, info: dict[str, Any], *, merged: bool = False) -> None:
        """A ``tastelab score`` model folder (:func:`tastelab.models.artifact.save_model`); ``info["row"]``:
        the epoch's metrics row (validation metrics and provenance go into its ``config.json``)."""
        assert isinstance(model, TasteModel)
        if not self.accelerator.is_main_process:
            return
        metrics = info["row"]
        val = {k[4:]: float(v) for k, v in metrics.items() if k.startswith("val/")}
        update: dict[str, Any] = {}
        if self.pairs:
            # Pairwise scores are latent (only differences matter): map the training images' 1st..99th
            # percentile onto 1..10 so scores and bands mean "relative to what you labelled".
            pred, _ = self._predict(model, self._image_data)
            lo, hi = torch.quantile(pred[self._train_image_index], torch.tensor([0.01, 0.99])).tolist()
            update["score_range"] = (lo, hi if hi > lo else lo + 1e-6)
        model.config = model.config.model_copy(update={
            **update,
            "metrics": val,
            "training": {"run_dir": str(self.run_dir), "epoch": metrics.get("epoch"),
                         "data": self.cfg.data.path, "mode": self.mode, **self._provenance,
                         "saved_at": utc_now(), "test_metrics": None},
        })
        save_model_folder(model, folder)

    def finish(self, model: nn.Module, state: TrainState, ctx: RunContext) -> dict[str, Any]:
        """RUN/final, test (and test_seen) metrics of best and final, the held-out report, curves, summary."""
        assert isinstance(model, TasteModel)
        last = state.history[-1] if state.history else {"epoch": state.epoch}
        self.save_model(model, self.run_dir / "final", {"row": last})
        if not self.accelerator.is_main_process:
            return {}
        write_history(self.run_dir, state.history)
        test_metrics: dict[str, dict[str, float]] = {}
        seen_metrics: dict[str, dict[str, float]] = {}  # pair_split image: new pairs among training images
        if "test" in self.eval_sets or SEEN_SPLIT in self.eval_sets:
            for name in ("best", "final"):
                if (self.run_dir / name).exists():
                    # This run's own folders: what the user allowed for the recipe applies to them too.
                    m = load_model_folder(self.run_dir / name, allow_external_weights=True,
                                          trust_remote_code=self.trust_remote_code)
                    assert isinstance(m, TasteModel)  # a training run's folders are never ensembles
                    m = m.to(self.accelerator.device)
                    if "test" in self.eval_sets:
                        test_metrics[name] = self.evaluate_split(m, "test")
                        record_test_metrics(self.run_dir / name, test_metrics[name])
                    if SEEN_SPLIT in self.eval_sets:
                        seen_metrics[name] = self.evaluate_split(m, SEEN_SPLIT)
        best_row = next((r for r in state.history if r["epoch"] == state.best_epoch), {})
        evaluation = heldout_report(self.cfg.data.pair_split if self.pairs else None,
                                    {k[4:]: v for k, v in best_row.items() if k.startswith("val/")},
                                    {"test": test_metrics, SEEN_SPLIT: seen_metrics}, self._heldout_sizes())
        for line in heldout_lines(evaluation):
            logger.info("test %s", line)
        plot_history(state.history, self.run_dir / "curves.png", metric=self.metric)
        n_total = sum(p.numel() for p in model.parameters())
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        size = sum(f.stat().st_size for f in (self.run_dir / "best").rglob("*") if f.is_file()) \
            if (self.run_dir / "best").exists() else 0
        summary = {
            "config": self.cfg.model_dump(mode="json"),
            "lora": self.cfg.model.lora.model_dump() if self.cfg.model.lora else None,
            "mode": self.mode,
            "loss": self.loss_name,
            "parameters": {"total": n_total, "trainable": n_train},
            "model_size_bytes": size,
            "best": {"epoch": state.best_epoch, "metric": self.metric, "value": state.best_metric,
                     "val": next((r for r in state.history if r["epoch"] == state.best_epoch), {})},
            "final": last,
            "test": test_metrics,
            **({SEEN_SPLIT: seen_metrics} if seen_metrics else {}),
            "evaluation": evaluation,
            **({"elta": self._elta_summary} if self._elta_summary else {}),
            "train_seconds": round(state.elapsed, 2),
            "history": state.history,
            "state": asdict(state) | {"history": None},
        }
        write_text_atomic(self.run_dir / "summary.json", json.dumps(summary, indent=2, default=json_default))
        return summary


def _own_images(vote_split: VoteSplit, name: str) -> set[str] | None:
    """A split's own images under an image split (test_seen: the training images), ranked by srcc_derived and
    counted in the report; None for a per-pair split, where every image of the split's votes counts."""
    if vote_split.images is None:
        return None
    return set(vote_split.images.get("train" if name == SEEN_SPLIT else name, []))


def _check_labels(splits: dict[str, list[Record]], source: str) -> None:
    """Labels must be finite numbers whose squares are too (MSE/NLL of 1e308 overflows to inf)."""
    for name, records in splits.items():
        for r in records:
            if r.score is not None and not (math.isfinite(r.score) and abs(r.score) < 1e150):
                raise UserError(f"{source}: label {r.score!r} of {r.path} ({name} split) is not a usable finite "
                                "number")


def _check_loss(loss: torch.Tensor, epoch: int, epochs: int, batch: int, n_batches: int, step: int,
                cfg: TrainConfig) -> None:
    """Stop a diverged run at once, naming where: nothing trained on NaN is worth saving or scoring.

    One host sync per batch; the models trained here are small enough that it does not show."""
    value = float(loss.detach())
    if not math.isfinite(value):
        raise NonFiniteLossError(
            f"training stopped: the loss became {value} at epoch {epoch + 1}/{epochs}, batch {batch + 1}/"
            f"{n_batches} (optimizer step {step + 1}); check optim.lr ({cfg.optim.lr}) and the labels in "
            f"{cfg.data.path} for huge or non-finite values")


class _CachedHead(nn.Module):
    """Frozen mode trains this: layer combination (learnable when 'learned') + head, on cached features."""

    def __init__(self, model: TasteModel) -> None:
        super().__init__()
        self.combiner = model.backbone.combiner
        self.head = model.head
        self._combine = model.backbone.combine_flat

    def forward(self, flat_layers: torch.Tensor, mix: elta.Mix | None = None, embed: str | None = None
                ) -> HeadOutput | tuple[HeadOutput, torch.Tensor | None]:
        if mix is None and embed is None:
            return self.head(self._combine(flat_layers))
        return elta.head_forward(self.head, self._combine(flat_layers), mix, embed)  # type: ignore[arg-type]


class _EltaModel(nn.Module):
    """Image modes with ELTA: backbone -> pooled features -> [mixup] -> head inside one wrapped forward."""

    def __init__(self, model: TasteModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor, mix: elta.Mix | None = None, embed: str | None = None
                ) -> HeadOutput | tuple[HeadOutput, torch.Tensor | None]:
        if mix is None and embed is None:
            return self.model(pixel_values)
        return elta.head_forward(self.model.head, self.model.features(pixel_values), mix, embed)  # type: ignore[arg-type]


class _ScorePredictor(Predictor):
    """``tastelab predict`` on a quality / pairwise model folder: ``{"path", "score"}`` per image (native
    scale), ``{"path", "error"}`` for an image that cannot be decoded."""

    def __init__(self, model: TasteModel, device: str | torch.device) -> None:
        self.model, self.device = model, torch.device(device)

    @torch.no_grad()
    def predict(self, paths: Sequence[str], batch_size: int = 16) -> Iterator[dict[str, Any]]:
        for chunk in batched(list(paths), 256):
            fs = extract(self.model, list(chunk), level="pooled", cache_dir=None, batch_size=batch_size,
                         device=self.device)
            rows = {p: i for i, p in enumerate(fs.paths)}
            feats = fs.features["orig"]
            scores = self.model.head(feats.to(self.device)).score.float().cpu().tolist() if len(feats) else []
            for path in chunk:
                if path in rows:
                    yield {"path": path, "score": scores[rows[path]]}
                else:
                    yield {"path": path, "error": str(fs.errors.get(path, "cannot be decoded"))}


def _load_taste_model(folder: Path, device: str | torch.device) -> TasteModel:
    # A user's folder: untrusted (no remote code, weights inside it only).
    model = load_model_folder(folder)
    if not isinstance(model, TasteModel):
        raise UserError(f"{folder}: an ensemble folder, not a trained quality model")
    return model.to(device).eval()


class PairwiseTask(QualityTask):
    """Per-image scores learnt from A/B votes (Bradley-Terry or margin ranking); image-level vote splits."""

    name: ClassVar[str] = "pairwise"
    pairs: ClassVar[bool] = True
    main_metric: ClassVar[str] = "pair_acc"


def task_for_config(cfg: TrainConfig, *, trust_remote_code: bool = False) -> QualityTask:
    """The task a quality recipe trains: ``pairwise`` for ``data.format: pairs``, else ``quality``
    (``trust_remote_code``: as :class:`QualityTask` takes it)."""
    task = PairwiseTask if cfg.data.format == "pairs" else QualityTask
    return task(cfg, trust_remote_code=trust_remote_code)
