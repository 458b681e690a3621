"""From metric values to a leaderboard: normalisation, family scores, the weighted composite, bootstrap
confidence intervals, ties with the best and flags.

Inputs are two long tables: :class:`ImageMetrics` (one value per checkpoint x image x metric, with the
image's prompt index and seed) and :class:`SetMetrics` (one value per checkpoint x prompt x metric for
metrics measured on the set of a prompt's seeds, such as diversity). A missing value ("no face found") is
NaN (or ``None`` in rows) and stays missing: it is left out of every mean, never counted as 0. Infinite
values are errors: a non-finite number is never a score.

Per checkpoint (the rules are written up in docs/judge.md, "Composite, normalisation and confidence
intervals"):

1. each metric's **mean** is the mean over prompts of the mean over that prompt's images (each prompt counts
   once, whatever its number of seeds; a set metric is the mean over prompts of its per-prompt values);
2. the mean is **normalised** to 0..1 with the metric's own documented range (``(x - lo) / (hi - lo)``,
   clipped, inverted for lower-is-better metrics) -- never with the min/max of the checkpoints being
   compared, so a checkpoint's score does not depend on which other checkpoints are judged with it;
3. a **family score** is the mean of its metrics' normalised values, and the **composite** the weighted
   mean of the family scores; a family with no value is left out and the remaining weights are re-scaled
   (with a warning; ``families`` says which families counted);
4. a percentile **bootstrap** resamples prompts with replacement and, within each drawn prompt, its images
   (seeds) with replacement, and recomputes 1-3; set metrics follow the drawn prompts (their seeds cannot
   be resampled without recomputing them). Each checkpoint's resampling is seeded by the config's seed and
   the checkpoint's name, so results are reproducible and independent of the other checkpoints;
5. checkpoints whose interval overlaps the best one's are ``tied_with_best``; a checkpoint whose share of
   copies (copy metric >= ``copying.similarity_threshold``; when that is null, the copy metric's threshold
   for its configured encoder -- a judge run fills in the one calibrated for the encoder it really used)
   exceeds ``copying.share_threshold`` gets the flag ``copies_references``;
6. the **recommended** checkpoint is the best-ranked one with none of ``recommend.disqualifying_flags``
   (default: ``copies_references``) and a composite; the ranks are not changed. Rows whose interval
   overlaps the recommended one's are ``tied_with_recommended``. When every checkpoint is disqualified none
   is recommended and a warning says why.

The bootstrap is vectorised: one gather of shape (metrics, resamples, prompts, seeds) per checkpoint.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tastelab.judge.config import COPYING, FAMILIES, JudgeConfig, MetricSettings, RecommendSettings

__all__ = ["CheckpointScore", "ImageMetrics", "Leaderboard", "SetMetrics", "build_leaderboard", "normalise"]

logger = logging.getLogger(__name__)

COPIES_FLAG = "copies_references"  # one of config.FLAGS


def _column(values: Iterable[Any]) -> np.ndarray:
    """Raw values as an object array: each stays the Python object it was (None, bool, int, str) until the
    dataclass's ``__post_init__`` validates and types the column."""
    return np.asarray(list(values), dtype=object)


def _str_column(values: Iterable[Any], name: str) -> np.ndarray:
    out = np.asarray([str(v) for v in values], dtype=object)
    if any(v == "" for v in out):
        raise ValueError(f"column {name!r} holds an empty value")
    return out


def _int_column(values: Iterable[Any], name: str, missing: int | None = None) -> np.ndarray:
    """Whole numbers (``None`` -> ``missing`` where a default exists); anything else names the column."""
    out = []
    for i, v in enumerate(values):
        if v is None and missing is not None:
            v = missing
        if isinstance(v, bool) or not isinstance(v, int | np.integer):
            raise ValueError(f"row {i}: {name} must be a whole number, got {v!r}")
        out.append(int(v))
    return np.asarray(out, dtype=np.int64)


def _value_column(values: Iterable[Any], where: Sequence[str]) -> np.ndarray:
    """Floats with ``None`` -> NaN (missing); infinite values are errors naming the row."""
    out = np.asarray([math.nan if v is None else v for v in values], dtype=np.float64)
    bad = np.flatnonzero(np.isinf(out))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"row {i} ({where[i]}): value {out[i]} is not finite; a missing value is NaN or None")
    return out


def _check_unique(keys: list[tuple[Any, ...]], what: str) -> None:
    seen: set[tuple[Any, ...]] = set()
    for key in keys:
        if key in seen:
            raise ValueError(f"duplicate {what} row: {key}")
        seen.add(key)


@dataclass(frozen=True)
class ImageMetrics:
    """Per-image metric values as equal-length columns (the long ``scores.parquet`` layout).

    ``seed`` is informative (-1 when unknown): an image is identified by ``(checkpoint, image)``, and the
    bootstrap resamples images within a prompt, which are the prompt's seeds.
    """

    checkpoint: np.ndarray
    image: np.ndarray
    prompt_idx: np.ndarray
    seed: np.ndarray
    metric: np.ndarray
    value: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.value)
        for name in ("checkpoint", "image", "prompt_idx", "seed", "metric"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"column {name!r} has {len(getattr(self, name))} rows, value has {n}")
        set_ = object.__setattr__
        set_(self, "checkpoint", _str_column(self.checkpoint, "checkpoint"))
        set_(self, "image", _str_column(self.image, "image"))
        set_(self, "metric", _str_column(self.metric, "metric"))
        set_(self, "prompt_idx", _int_column(self.prompt_idx, "prompt_idx"))
        set_(self, "seed", _int_column(self.seed, "seed", missing=-1))
        where = [f"{c} {i} {m}" for c, i, m in zip(self.checkpoint, self.image, self.metric, strict=True)]
        set_(self, "value", _value_column(self.value, where))
        _check_unique(list(zip(self.checkpoint, self.image, self.metric, strict=True)), "(checkpoint, image, metric)")

    @classmethod
    def from_rows(cls, rows: Iterable[Mapping[str, Any]]) -> ImageMetrics:
        """Rows with keys checkpoint, image, prompt_idx, seed (optional), metric, value (None = missing)."""
        rows = list(rows)
        return cls(checkpoint=_column(r["checkpoint"] for r in rows), image=_column(r["image"] for r in rows),
                   prompt_idx=_column(r["prompt_idx"] for r in rows), seed=_column(r.get("seed") for r in rows),
                   metric=_column(r["metric"] for r in rows), value=_column(r["value"] for r in rows))

    @classmethod
    def empty(cls) -> ImageMetrics:
        return cls(*(_column(()) for _ in range(6)))


@dataclass(frozen=True)
class SetMetrics:
    """Metric values of a set of images: one per checkpoint x prompt (across the prompt's seeds)."""

    checkpoint: np.ndarray
    prompt_idx: np.ndarray
    metric: np.ndarray
    value: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.value)
        for name in ("checkpoint", "prompt_idx", "metric"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"column {name!r} has {len(getattr(self, name))} rows, value has {n}")
        set_ = object.__setattr__
        set_(self, "checkpoint", _str_column(self.checkpoint, "checkpoint"))
        set_(self, "metric", _str_column(self.metric, "metric"))
        set_(self, "prompt_idx", _int_column(self.prompt_idx, "prompt_idx"))
        where = [f"{c} prompt {p} {m}" for c, p, m in zip(self.checkpoint, self.prompt_idx, self.metric, strict=True)]
        set_(self, "value", _value_column(self.value, where))
        _check_unique(list(zip(self.checkpoint, self.prompt_idx.tolist(), self.metric, strict=True)),
                      "(checkpoint, prompt_idx, metric)")

    @classmethod
    def from_rows(cls, rows: Iterable[Mapping[str, Any]]) -> SetMetrics:
        """Rows with keys checkpoint, prompt_idx, metric, value (None = missing)."""
        rows = list(rows)
        return cls(checkpoint=_column(r["checkpoint"] for r in rows), prompt_idx=_column(r["prompt_idx"] for r in rows),
                   metric=_column(r["metric"] for r in rows), value=_column(r["value"] for r in rows))

    @classmethod
    def empty(cls) -> SetMetrics:
        return cls(*(_column(()) for _ in range(4)))


@dataclass
class CheckpointScore:
    """One leaderboard row. Family and metric dicts hold NaN where nothing was measured."""

    checkpoint: str
    rank: int
    composite: float
    composite_low: float
    composite_high: float
    tied_with_best: bool
    flags: list[str]
    families: list[str]  # the families that counted in the composite
    family_scores: dict[str, float]  # normalised 0..1, one per family
    metric_means: dict[str, float]  # raw means (prompt-balanced)
    metric_scores: dict[str, float]  # normalised 0..1
    copy_share: float
    n_images: int
    n_prompts: int
    recommended: bool = False  # the best-ranked row without a disqualifying flag
    tied_with_recommended: bool = False  # interval overlaps the recommended row's

    def to_record(self) -> dict[str, Any]:
        """A flat row for leaderboard.csv / .json: the fixed columns, one normalised column per family, one
        raw column per metric; NaN becomes None (missing, and valid JSON)."""

        def clean(x: float) -> float | None:
            return None if math.isnan(x) else float(x)

        rec: dict[str, Any] = {
            "checkpoint": self.checkpoint, "rank": self.rank, "composite": clean(self.composite),
            "composite_low": clean(self.composite_low), "composite_high": clean(self.composite_high),
            "tied_with_best": self.tied_with_best, "flags": list(self.flags), "families": list(self.families),
            "recommended": self.recommended, "tied_with_recommended": self.tied_with_recommended,
        }
        rec.update({f: clean(v) for f, v in self.family_scores.items()})
        rec.update({m: clean(v) for m, v in self.metric_means.items()})
        rec.update({"copy_share": clean(self.copy_share), "n_images": self.n_images, "n_prompts": self.n_prompts})
        return rec


@dataclass
class Leaderboard:
    """Rows in rank order, the metrics that were scored, and the warnings raised on the way."""

    rows: list[CheckpointScore]
    metrics: tuple[str, ...]
    warnings: list[str] = field(default_factory=list)

    def to_records(self) -> list[dict[str, Any]]:
        return [r.to_record() for r in self.rows]

    @property
    def recommended(self) -> CheckpointScore | None:
        """The recommended row, or None when every checkpoint is disqualified (or has no composite)."""
        return next((r for r in self.rows if r.recommended), None)

    def passed_over(self) -> list[CheckpointScore]:
        """The rows ranked above the recommended one (every row with a composite when none is recommended):
        the ones the recommendation passed over because of their flags."""
        out: list[CheckpointScore] = []
        for r in self.rows:
            if r.recommended:
                return out
            if not math.isnan(r.composite):
                out.append(r)
        return out

    def row(self, checkpoint: str) -> CheckpointScore:
        for r in self.rows:
            if r.checkpoint == checkpoint:
                return r
        raise KeyError(checkpoint)


def normalise(values: np.ndarray, settings: MetricSettings) -> np.ndarray:
    """Values of one metric mapped onto 0..1 by its normalisation (NaN stays NaN)."""
    norm = settings.normalisation
    if norm is None:
        raise ValueError(f"a {settings.family} metric has no normalisation")
    out = np.clip((np.asarray(values, dtype=np.float64) - norm.lo) / (norm.hi - norm.lo), 0.0, 1.0)
    return 1.0 - out if norm.direction == "lower" else out


def _nanmean(x: np.ndarray, axis: int) -> np.ndarray:
    """Mean over ``axis`` ignoring NaN; NaN (not a warning, not 0) where every value is missing."""
    present = ~np.isnan(x)
    count = present.sum(axis=axis)
    total = np.where(present, x, 0.0).sum(axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _checkpoint_seed(seed: int, checkpoint: str) -> np.random.Generator:
    digest = hashlib.blake2b(checkpoint.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return np.random.default_rng([seed, int.from_bytes(digest, "little")])


@dataclass
class _Scorer:
    """Vectorised metric means -> normalised -> families -> composite, for any number of resamples."""

    lo: np.ndarray  # (M,)
    span: np.ndarray
    lower: np.ndarray  # (M,) bool
    membership: np.ndarray  # (M, F) float 0/1
    weights: np.ndarray  # (F,)

    @classmethod
    def for_metrics(cls, metrics: list[MetricSettings], weights: dict[str, float]) -> _Scorer:
        norms = [m.normalisation for m in metrics]
        if any(n is None for n in norms):
            raise ValueError("every scored metric needs a normalisation")
        return cls(lo=np.asarray([n.lo for n in norms]),  # type: ignore[union-attr]
                   span=np.asarray([n.hi - n.lo for n in norms]),  # type: ignore[union-attr]
                   lower=np.asarray([n.direction == "lower" for n in norms], dtype=bool),  # type: ignore[union-attr]
                   membership=np.asarray([[float(m.family == f) for f in FAMILIES] for m in metrics]).reshape(
                       len(metrics), len(FAMILIES)),
                   weights=np.asarray([weights[f] for f in FAMILIES]))

    def scores(self, means: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """means (B, M) -> normalised (B, M), family scores (B, F), composite (B,)."""
        norm = np.clip((means - self.lo) / self.span, 0.0, 1.0)
        norm = np.where(self.lower, 1.0 - norm, norm)
        present = ~np.isnan(norm)
        count = present.astype(np.float64) @ self.membership
        total = np.where(present, norm, 0.0) @ self.membership
        with np.errstate(invalid="ignore", divide="ignore"):
            family = np.where(count > 0, total / np.maximum(count, 1), np.nan)
        counted = ~np.isnan(family) & (self.weights > 0)
        wsum = (counted * self.weights).sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            composite = np.where(wsum > 0, (np.where(counted, family, 0.0) * self.weights).sum(axis=1) / wsum,
                                 np.nan)
        return norm, family, composite


def _checkpoint_arrays(images: ImageMetrics, sets: SetMetrics, checkpoint: str, img_metrics: list[str],
                       set_metrics: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Dense arrays of one checkpoint: image values (Mi, P, S) NaN-padded, the number of images of each
    prompt (P,), set values (Ms, P), and the number of images."""
    im = images.checkpoint == checkpoint
    st = sets.checkpoint == checkpoint
    prompts = sorted(set(images.prompt_idx[im].tolist()) | set(sets.prompt_idx[st].tolist()))
    p_of = {p: i for i, p in enumerate(prompts)}
    slots: list[dict[str, int]] = [{} for _ in prompts]  # image name -> seed slot, per prompt
    for img, p in zip(images.image[im], images.prompt_idx[im].tolist(), strict=True):
        slots[p_of[p]].setdefault(img, len(slots[p_of[p]]))
    n_slots = np.asarray([len(s) for s in slots], dtype=np.int64)
    n_seeds = max(1, int(n_slots.max(initial=0)))
    m_of = {m: i for i, m in enumerate(img_metrics)}
    vi = np.full((len(img_metrics), len(prompts), n_seeds), np.nan)
    for img, p, m, v in zip(images.image[im], images.prompt_idx[im].tolist(), images.metric[im], images.value[im],
                            strict=True):
        if m in m_of:
            pi = p_of[p]
            vi[m_of[m], pi, slots[pi][img]] = v
    s_of = {m: i for i, m in enumerate(set_metrics)}
    vs = np.full((len(set_metrics), len(prompts)), np.nan)
    for p, m, v in zip(sets.prompt_idx[st].tolist(), sets.metric[st], sets.value[st], strict=True):
        if m in s_of:
            vs[s_of[m], p_of[p]] = v
    return vi, n_slots, vs, int(n_slots.sum())


def _means(vi: np.ndarray, vs: np.ndarray, pidx: np.ndarray, sidx: np.ndarray, smask: np.ndarray) -> np.ndarray:
    """Prompt-balanced metric means for B resamples: pidx (B, P) drawn prompts, sidx (B, P, S) drawn seed
    slots within each, smask (B, P, S) which draws exist. Returns (B, Mi + Ms)."""
    gathered = vi[:, pidx[:, :, None], sidx]  # (Mi, B, P, S)
    gathered = np.where(smask[None], gathered, np.nan)
    img = _nanmean(_nanmean(gathered, axis=3), axis=2)  # (Mi, B)
    st = _nanmean(vs[:, pidx], axis=2)  # (Ms, B)
    return np.concatenate([img, st], axis=0).T


def _overlaps(row: CheckpointScore, ref: CheckpointScore) -> bool:
    """Whether two rows' intervals overlap (equal composites when either has no interval)."""
    if math.isnan(ref.composite_low) or math.isnan(row.composite_low):
        return row.composite == ref.composite
    return row.composite_low <= ref.composite_high and row.composite_high >= ref.composite_low


def _recommend(ranked: list[CheckpointScore], settings: RecommendSettings) -> str | None:
    """Mark the best-ranked row with a composite and no disqualifying flag as ``recommended`` and the rows
    tied with it; returns a warning when no row qualifies."""
    scored = [r for r in ranked if not math.isnan(r.composite)]
    pick = next((r for r in scored if not settings.disqualifies(r.flags)), None)
    if pick is None:
        if not scored:
            return None  # nothing has a composite; build_leaderboard already warns per checkpoint
        return (f"no checkpoint is recommended: every checkpoint carries a disqualifying flag "
                f"({', '.join(settings.disqualifying_flags)}; recommend.disqualifying_flags)")
    pick.recommended = True
    for row in scored:
        row.tied_with_recommended = _overlaps(row, pick)
    return None


def _rank(rows: list[CheckpointScore]) -> list[CheckpointScore]:
    """Rows best first (no composite last; equal composites keep their input order), ranks 1..n, and
    ``tied_with_best`` where a row's interval overlaps the best row's."""

    def order(i: int) -> tuple[int, float, int]:
        c = rows[i].composite
        return (1, 0.0, i) if math.isnan(c) else (0, -c, i)

    ranked = [rows[i] for i in sorted(range(len(rows)), key=order)]
    for rank, row in enumerate(ranked, start=1):
        row.rank = rank
    if not ranked or math.isnan(ranked[0].composite):
        return ranked
    best = ranked[0]
    for row in ranked:
        if not math.isnan(row.composite):
            row.tied_with_best = _overlaps(row, best)
    return ranked


def build_leaderboard(images: ImageMetrics | None, config: JudgeConfig, sets: SetMetrics | None = None
                      ) -> Leaderboard:
    """Score, rank and flag every checkpoint found in ``images`` / ``sets`` (in order of first appearance,
    which breaks ties of equal composites)."""
    images = images if images is not None else ImageMetrics.empty()
    sets = sets if sets is not None else SetMetrics.empty()
    settings = config.metrics
    for table, level in ((images, "image"), (sets, "set")):
        for name in dict.fromkeys(table.metric.tolist()):
            if name not in settings:
                raise ValueError(f"metric {name!r} is not in the judge config (known: {', '.join(settings)})")
            if settings[name].enabled and settings[name].level != level:
                raise ValueError(f"metric {name!r} is a {settings[name].level}-level metric but was given as "
                                 f"{level}-level values")
    enabled = config.enabled_metrics()
    present_img = set(images.metric.tolist())
    present_set = set(sets.metric.tolist())
    img_metrics = [m for m, s in enabled.items() if s.level == "image" and s.family != COPYING and m in present_img]
    set_metrics = [m for m, s in enabled.items() if s.level == "set" and m in present_set]
    scored = img_metrics + set_metrics
    copy_metric = config.copying.metric if config.copying.metric in enabled else None
    raw_only = [m for m, s in enabled.items() if s.family == COPYING and m in present_img]
    copy_threshold = config.copying.similarity_threshold
    if copy_threshold is None and copy_metric is not None:  # a judge run resolves it; a bare config: its options
        from tastelab.judge.metrics.copying import configured_threshold

        cs = settings[copy_metric]
        copy_threshold = configured_threshold({**({"model": cs.model} if cs.model else {}), **cs.options})

    weights = config.weights.as_dict()
    scorer = _Scorer.for_metrics([settings[m] for m in scored], weights)

    warnings: list[str] = []
    weighted = [f for f in FAMILIES if weights[f] > 0]
    measured_anywhere = {settings[m].family for m in scored}
    for f in weighted:
        if f not in measured_anywhere:
            warnings.append(f"family {f!r}: no metric of it was measured; the composite is re-weighted over the "
                            f"other families")

    checkpoints = list(dict.fromkeys([*images.checkpoint.tolist(), *sets.checkpoint.tolist()]))
    boot = config.bootstrap
    tail = (1.0 - boot.confidence) / 2.0
    rows: list[CheckpointScore] = []
    point_means: dict[str, np.ndarray] = {}
    for ckpt in checkpoints:
        vi, n_slots, vs, n_images = _checkpoint_arrays(images, sets, ckpt, img_metrics, set_metrics)
        n_prompts, n_seeds = vi.shape[1], vi.shape[2]
        # the observed data: every prompt once, every image once
        pidx0 = np.arange(n_prompts)[None]
        sidx0 = np.broadcast_to(np.arange(n_seeds), (1, n_prompts, n_seeds))
        mask0 = sidx0 < n_slots[None, :, None]
        means = _means(vi, vs, pidx0, sidx0, mask0)
        norm, family, composite = scorer.scores(means)
        point_means[ckpt] = means[0]
        # the bootstrap: prompts with replacement, then images (seeds) with replacement within each drawn prompt
        low = high = math.nan
        if n_prompts:
            rng = _checkpoint_seed(boot.seed, ckpt)
            pidx = rng.integers(0, n_prompts, size=(boot.n_boot, n_prompts))
            drawn_n = n_slots[pidx][:, :, None]  # (B, P, 1)
            sidx = np.minimum((rng.random((boot.n_boot, n_prompts, n_seeds)) * drawn_n).astype(np.int64),
                              np.maximum(drawn_n - 1, 0))
            smask = np.arange(n_seeds)[None, None, :] < drawn_n
            comps = scorer.scores(_means(vi, vs, pidx, sidx, smask))[2]
            comps = comps[~np.isnan(comps)]
            if comps.size:
                low, high = (float(x) for x in np.quantile(comps, [tail, 1.0 - tail]))
        counted = [f for f, s in zip(FAMILIES, family[0], strict=True) if weights[f] > 0 and not math.isnan(s)]
        copy_share = math.nan
        if copy_metric is not None and copy_threshold is not None:
            cv = images.value[(images.checkpoint == ckpt) & (images.metric == copy_metric)]
            cv = cv[~np.isnan(cv)]
            if cv.size:
                copy_share = float(np.mean(cv >= copy_threshold))
        raw = {m: float(v) for m, v in zip(scored, means[0], strict=True)}
        for m in raw_only:
            raw[m] = float(_nanmean(images.value[(images.checkpoint == ckpt) & (images.metric == m)], axis=0))
        rows.append(CheckpointScore(
            checkpoint=ckpt, rank=0, composite=float(composite[0]), composite_low=low, composite_high=high,
            tied_with_best=False, flags=[], families=counted,
            family_scores={f: float(s) for f, s in zip(FAMILIES, family[0], strict=True)}, metric_means=raw,
            metric_scores={m: float(v) for m, v in zip(scored, norm[0], strict=True)}, copy_share=copy_share,
            n_images=n_images, n_prompts=n_prompts))

    for row in rows:
        if not math.isnan(row.copy_share) and row.copy_share > config.copying.share_threshold:
            row.flags.append(COPIES_FLAG)
        missing_families = [f for f in weighted if f in measured_anywhere and f not in row.families]
        for f in missing_families:
            row.flags.append(f"missing_family:{f}")
        for m in scored:
            if math.isnan(row.metric_means[m]):
                row.flags.append(f"missing_metric:{m}")
        if math.isnan(row.composite):
            warnings.append(f"checkpoint {row.checkpoint!r}: no metric value at all; it has no composite")
        elif missing_families:
            warnings.append(f"checkpoint {row.checkpoint!r}: no value for {', '.join(missing_families)}; its "
                            f"composite is re-weighted over {', '.join(row.families)} and is not directly "
                            "comparable with checkpoints measured on every family")

    ranked = _rank(rows)
    no_pick = _recommend(ranked, config.recommend)
    if no_pick is not None:
        warnings.append(no_pick)
    for w in warnings:
        logger.warning(w)
    return Leaderboard(rows=ranked, metrics=(*scored, *raw_only), warnings=warnings)
