"""``judge()``: score every checkpoint's sample images with every enabled metric and rank the checkpoints.

The run, in order (why each step is where it is):

1. **Inputs.** Samples are discovered (:func:`tastelab.judge.samples.discover_samples`, any layout), the
   prompt file attached; references and training images are listed. Every image file is read once and
   content-hashed: the hash keys the metric cache and every embedding memo, so renamed files are found and
   changed files are recomputed. A metric that reads the prompt keys its values by (hash, prompt text
   digest) instead (:func:`_item_id`), so an edited prompt recomputes it for that prompt's images only.
   References that are also training images (same hash) raise a warning -- consistency against training
   images overstates how well the LoRA generalises.
2. **Metrics.** Each enabled metric of the config is built from the registry and ``prepare()``-d with one
   shared :class:`~tastelab.judge.context.JudgeContext` (one load per encoder, one embedding per image per
   encoder). A metric that raises :class:`~tastelab.judge.metrics.base.MetricUnavailable` is reported in
   one warning naming it and what to do; the composite re-weights its family.
3. **Chunks.** Samples are processed in chunks of whole (checkpoint, prompt) groups. In each chunk the
   cache is asked first; only images some metric still needs are decoded -- once, handed to every metric,
   released after the chunk. Per-image metrics get the chunk's uncached images; set metrics (diversity)
   the chunk's uncached groups. Each chunk's new values are committed in one transaction.
4. **Leaderboard.** :func:`tastelab.judge.composite.build_leaderboard` normalises, weights, bootstraps and
   flags (``copies_references`` from the copy metric's thresholds). A metric's calibrated range follows
   what it resolved to (``Metric.normalisation()``: an offline stand-in encoder has other typical values)
   unless the config sets one.
5. **Outputs** (when ``out`` is given, all atomic; :mod:`tastelab.judge.outputs`): ``scores.parquet``,
   ``leaderboard.csv``, ``leaderboard.json`` and ``report.html`` (:mod:`tastelab.judge.report`).
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tastelab.core.errors import UserError
from tastelab.io import images as images_io
from tastelab.io.prompts import Prompt, load_prompts
from tastelab.judge.cache import CACHE_NAME, MetricCache, prompted_id, set_id
from tastelab.judge.composite import ImageMetrics, Leaderboard, SetMetrics, build_leaderboard
from tastelab.judge.config import (
    FAMILIES,
    JudgeConfig,
    Normalisation,
    config_label,
    config_remote_code,
    load_judge_config,
)
from tastelab.judge.context import JudgeContext, JudgeImage
from tastelab.judge.metrics import METRICS, Metric, MetricUnavailable, metric_info
from tastelab.judge.metrics.base import GroupKey
from tastelab.judge.outputs import ensure_thumbnail, thumbnail, write_outputs
from tastelab.judge.samples import Sample, SampleList, attach_prompts, discover_samples

__all__ = ["SCORE_COLUMNS", "CopyMatch", "EncoderRun", "JudgeResult", "MetricRun", "judge", "write_outputs"]

logger = logging.getLogger(__name__)

#: Columns of ``scores.parquet`` (long format; set metrics' rows have no image and no seed).
SCORE_COLUMNS = ("checkpoint", "epoch", "step", "image", "prompt_idx", "prompt", "seed", "metric", "value")


@dataclass
class MetricRun:
    """How one enabled metric ran: ``status`` ``"ran"`` or ``"unavailable"`` (``reason`` says why and what to
    do); ``computed`` / ``cached`` count values computed in this run and read from the cache. ``inputs``: what
    it reads (``MetricInfo.inputs``), which says how its values are keyed (:func:`_item_id`)."""

    name: str
    family: str
    per: str
    inputs: tuple[str, ...] = ()
    status: str = "ran"
    reason: str = ""
    resolved: dict[str, Any] = field(default_factory=dict)
    normalisation: tuple[float, float] | None = None
    normalisation_source: str = "config"
    computed: int = 0
    cached: int = 0


@dataclass(frozen=True)
class EncoderRun:
    """An encoder the run loaded: its spec, what it really is, and whether it stands in for another."""

    spec: str
    label: str
    stand_in: bool


@dataclass(frozen=True)
class CopyMatch:
    """A generated image at or above the copy threshold, and the reference / training image nearest to it."""

    image: JudgeImage
    similarity: float
    nearest: JudgeImage | None
    nearest_by: str  # how ``nearest`` was found (the copy metric's own encoder, or pixels for display)


@dataclass
class JudgeResult:
    """Everything a judge run found. ``scores`` is the long per-image table (rows like ``scores.parquet``);
    ``checkpoints`` the per-checkpoint table in training order; ``leaderboard`` the ranking."""

    samples: list[Sample]
    images: list[JudgeImage]
    references: list[JudgeImage]
    train_images: list[JudgeImage]
    scores: list[dict[str, Any]]
    leaderboard: Leaderboard
    checkpoints: list[dict[str, Any]]
    metrics: list[MetricRun]
    encoders: list[EncoderRun]
    config: JudgeConfig
    copies: list[CopyMatch] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    layout: str = ""
    out: Path | None = None
    thumbnails: dict[str, bytes] = field(default_factory=dict)  # sha -> small JPEG (for the report)

    @property
    def missing_families(self) -> list[str]:
        """Weighted families no metric measured in this run (the composite is re-weighted without them)."""
        weights = self.config.weights.as_dict()
        measured = {m.family for m in self.metrics if m.status == "ran"}
        return [f for f in FAMILIES if weights[f] > 0 and f not in measured]

    @property
    def recommended(self) -> str | None:
        """The checkpoint the judge picks: the best-ranked one with no disqualifying flag (the config's
        ``recommend.disqualifying_flags``), or None when every checkpoint is disqualified."""
        row = self.leaderboard.recommended
        return None if row is None else row.checkpoint

    def scores_table(self) -> Any:
        """``scores`` as a :class:`pyarrow.Table` (the ``scores.parquet`` schema)."""
        import pyarrow as pa

        schema = pa.schema([("checkpoint", pa.string()), ("epoch", pa.int64()), ("step", pa.int64()),
                            ("image", pa.string()), ("prompt_idx", pa.int64()), ("prompt", pa.string()),
                            ("seed", pa.int64()), ("metric", pa.string()), ("value", pa.float64())])
        return pa.Table.from_pylist(self.scores, schema=schema)


# --------------------------------------------------------------------------------------------- inputs
def _config(config: JudgeConfig | str | os.PathLike | Mapping[str, Any] | None) -> JudgeConfig:
    if isinstance(config, JudgeConfig):
        return config
    if isinstance(config, Mapping):
        return load_judge_config(raw=dict(config))
    return load_judge_config(config)


def _image_files(source: str | os.PathLike | Sequence[str | os.PathLike] | None, what: str) -> list[Path]:
    """Image files of a folder (recursive, sorted) or an explicit list; UserError naming the input."""
    from tastelab.io.records import IMAGE_EXTENSIONS, list_images

    if source is None:
        return []
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        if path.is_dir():
            files = [Path(p) for p in list_images(path)]
            if not files:
                raise UserError(f"{what} {path}: no images ({', '.join(IMAGE_EXTENSIONS)}) in the folder")
            return files
        if not path.exists():
            raise UserError(f"{what} {path}: no such folder")
        return [path]
    files = [Path(p) for p in source]
    for p in files:
        if not p.is_file():
            raise UserError(f"{what} {p}: no such image file")
    return files


def _number_prompts(samples: Sequence[Sample]) -> list[Sample]:
    """Samples that name a prompt by text only (a manifest without ``prompt_idx``) get an index per distinct
    text, after the indices in use, so their checkpoints are compared prompt by prompt."""
    used = [s.prompt_idx for s in samples if s.prompt_idx is not None]
    nxt = (max(used) + 1) if used else 0
    by_text: dict[str, int] = {}
    out = []
    for s in samples:
        if s.prompt_idx is None and s.prompt:
            if s.prompt not in by_text:
                by_text[s.prompt] = nxt
                nxt += 1
            s = replace(s, prompt_idx=by_text[s.prompt])
        out.append(s)
    return out


def _hash_files(paths: Sequence[Path], advance: Callable[[int], None]
                ) -> tuple[dict[Path, str], list[tuple[Path, str]]]:
    """Content hash of each file (read once); unreadable files are returned with the reason."""
    from tastelab.io.loader import content_hash

    hashes: dict[Path, str] = {}
    bad: list[tuple[Path, str]] = []
    for path in paths:
        if path not in hashes:
            try:
                hashes[path] = content_hash(images_io.read_regular_file(path))
            except images_io.ImageDecodeError as exc:
                bad.append((path, exc.reason))
        advance(1)
    return hashes, bad


def _chunks(images: Sequence[JudgeImage], size: int) -> Iterator[list[JudgeImage]]:
    """Consecutive chunks of whole (checkpoint, prompt) groups, about ``size`` images each (a set metric
    sees all of a group's seeds in one chunk, decoded once)."""
    chunk: list[JudgeImage] = []
    last: GroupKey | None = None
    for im in images:
        key = _group(im)
        if chunk and key != last and len(chunk) >= size:
            yield chunk
            chunk = []
        chunk.append(im)
        last = key
    if chunk:
        yield chunk


def _group(im: JudgeImage) -> GroupKey:
    assert im.sample is not None
    return (im.sample.checkpoint, im.sample.prompt_idx)


# --------------------------------------------------------------------------------------------- metrics
def _build_metrics(config: JudgeConfig, remote_code: Mapping[str, bool] | None = None
                   ) -> tuple[list[tuple[Metric, MetricRun]], list[MetricRun]]:
    """Each enabled metric, built from the registry with its options; ``remote_code`` (from
    :func:`~tastelab.judge.config.config_remote_code`) is the run's permission each one receives as
    ``Metric.trust_remote_code`` (None: no metric may run code): a metric never reads it from the config alone."""
    built: list[tuple[Metric, MetricRun]] = []
    failed: list[MetricRun] = []
    for name, settings in config.enabled_metrics().items():
        run = MetricRun(name=name, family=settings.family, per=settings.level)
        if name not in METRICS:
            raise UserError(f"judge config: metric {name!r} has no plugin registered under that name (register it "
                            "with tastelab.judge.metrics.METRICS.register before judging, or disable it)")
        options = dict(settings.options)
        if settings.model is not None:
            options.setdefault("model", settings.model)
        try:
            cls = METRICS.get(name)
        except ImportError as exc:
            extra = metric_info(name).extra
            run.status, run.reason = "unavailable", (
                f"{name}: its module cannot be imported ({exc}); "
                + (f"install it with pip install 'tastelab[{extra}]'" if extra else "update tastelab"))
            failed.append(run)
            continue
        declared = getattr(cls, "info", None) or metric_info(name)
        run.inputs = tuple(declared.inputs)
        if declared.per != settings.level:
            raise UserError(f"judge config: metrics.{name}.level is {settings.level!r} but {name} is measured per "
                            f"{declared.per}")
        metric = cls(options)
        metric.trust_remote_code = bool((remote_code or {}).get(name, False))
        built.append((metric, run))
    return built, failed


def _unavailable(run: MetricRun, exc: BaseException, warnings: list[str]) -> None:
    run.status, run.reason = "unavailable", " ".join(str(exc).split()) or type(exc).__name__
    message = f"metric {run.name} ({run.family}) is unavailable and was skipped: {run.reason}"
    warnings.append(message)
    logger.warning(message)


def _check_values(name: str, values: Any, items: Sequence[Any], what: str) -> list[float | None]:
    """A metric's output: one float or None per item; anything else is a bug of the metric, named."""
    values = list(values)
    if len(values) != len(items):
        raise RuntimeError(f"metric {name} returned {len(values)} values for {len(items)} {what}")
    out: list[float | None] = []
    for item, v in zip(items, values, strict=True):
        if v is not None:
            v = float(v)
            if not math.isfinite(v):
                raise RuntimeError(f"metric {name} returned {v} for {item}; a metric returns a finite value or "
                                   "None (missing), never NaN or infinity")
        out.append(v)
    return out


def _copy_threshold(config: JudgeConfig, ran: list[tuple[Metric, MetricRun]]) -> float:
    """The per-image copy threshold in force: the config's ``copying.similarity_threshold`` when set, else the
    copy metric's own (``threshold``: calibrated for the encoder it resolved to -- the offline stand-in's
    differs from DINO's), else its configured one."""
    if config.copying.similarity_threshold is not None:
        return config.copying.similarity_threshold
    from tastelab.judge.metrics.copying import configured_threshold

    for metric, run in ran:
        if run.name == config.copying.metric and isinstance(getattr(metric, "threshold", None), float | int):
            return float(metric.threshold)  # type: ignore[attr-defined]
    settings = config.metrics[config.copying.metric]
    return configured_threshold({**({"model": settings.model} if settings.model else {}), **settings.options})


def _effective_config(config: JudgeConfig, ran: list[tuple[Metric, MetricRun]]) -> JudgeConfig:
    """The config with each metric's resolved calibrated range where the config kept the registry's default
    (an offline stand-in encoder has other typical values than the model the default was measured on), and
    the copy threshold in force (:func:`_copy_threshold`)."""
    effective = config.model_copy(deep=True)
    effective.copying.similarity_threshold = _copy_threshold(config, ran)
    for _metric, run in ran:
        if run.name == config.copying.metric and "threshold" in run.resolved:
            run.resolved["threshold"] = effective.copying.similarity_threshold  # what flagged, not what was unused
    for metric, run in ran:
        settings = effective.metrics[run.name]
        norm = settings.normalisation
        if norm is None:
            continue
        run.normalisation = (norm.lo, norm.hi)
        if run.name not in METRICS:
            continue
        default = tuple(metric_info(run.name).normalisation)
        lo, hi = (float(x) for x in metric.normalisation())
        own = (lo, hi)
        if (norm.lo, norm.hi) == default and own != default:
            settings.normalisation = Normalisation(kind="calibrated", lo=own[0], hi=own[1], direction=norm.direction)
            run.normalisation, run.normalisation_source = own, "metric (resolved)"
    return effective


# --------------------------------------------------------------------------------------------- progress
class _Progress:
    """Rich progress bars on stderr (or nothing): one task per stage."""

    def __init__(self, enabled: bool) -> None:
        self._bar = None
        if enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(),
                                 TimeRemainingColumn(), console=Console(stderr=True), transient=False)

    @contextmanager
    def stage(self, description: str, total: int) -> Iterator[Callable[[int], None]]:
        if self._bar is None:
            yield lambda n: None
            return
        task = self._bar.add_task(description, total=total)
        yield lambda n: self._bar.advance(task, n)  # type: ignore[union-attr]

    def __enter__(self) -> _Progress:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()


# --------------------------------------------------------------------------------------------- judge
def judge(samples: str | os.PathLike | Sequence[Sample], references: str | os.PathLike | Sequence[str | os.PathLike]
          | None = None, prompts: str | os.PathLike | Sequence[Prompt] | None = None,
          config: JudgeConfig | str | os.PathLike | Mapping[str, Any] | None = None,
          train_images: str | os.PathLike | Sequence[str | os.PathLike] | None = None, layout: str = "auto",
          out: str | os.PathLike | None = None, cache: str | os.PathLike | None = None, device: str = "auto",
          batch_size: int = 16, chunk_size: int = 64, progress: bool = True,
          encoder_loader: Callable[..., Any] | None = None, trust_remote_code: bool = False) -> JudgeResult:
    """Judge the samples of every checkpoint against ``references`` and rank the checkpoints.

    ``samples``: a samples folder or manifest (any layout of :mod:`tastelab.judge.samples`; ``layout``
    chooses one) or already discovered samples. ``references`` / ``train_images``: a folder or a list of
    image files. ``config``: a :class:`JudgeConfig`, a YAML path or a mapping (None: the defaults).
    ``out``: where the outputs are written (none when None). ``cache``: the metric cache file (default
    ``OUT/.judge_cache.sqlite``; in memory without ``out``). ``trust_remote_code``: the user's permission for
    a config whose metrics ask to run their checkpoint's own code (``trust_remote_code: true`` in a metric's
    options); without it such a config is a :class:`~tastelab.judge.config.JudgeConfigError` naming the config
    and the metrics, before any file is read or model loaded. See the module docstring for the steps.
    """
    if batch_size < 1 or chunk_size < 1:
        raise UserError(f"batch_size and chunk_size must be >= 1, got {batch_size} and {chunk_size}")
    cfg = _config(config)
    remote_code = config_remote_code(cfg, trust_remote_code=trust_remote_code,  # before anything loads
                                     source=config_label(config))
    from tastelab.inference.scoring import resolve_device

    dev = str(resolve_device(device))
    warnings: list[str] = []

    if isinstance(samples, str | os.PathLike):
        found = discover_samples(samples, layout=layout, prompts=prompts)
        layout_name = found.layout
        warnings += [f"not a sample: {u}" for u in found.unmatched]
    else:
        found = SampleList(samples)
        layout_name = getattr(samples, "layout", "") or "given"
        if prompts is not None:  # discovered samples get their prompt text the way discover_samples gives it
            loaded = load_prompts(prompts) if isinstance(prompts, str | os.PathLike) else list(prompts)
            found = SampleList(attach_prompts(list(found), loaded, str(prompts) if isinstance(
                prompts, str | os.PathLike) else "the prompts"))
    if not found:
        raise UserError("no sample images to judge")
    sample_list = _number_prompts(found)
    ref_paths = _image_files(references, "references")
    train_paths = _image_files(train_images, "training images")

    out_dir = None if out is None else Path(out)
    cache_path = Path(cache) if cache is not None else (out_dir / CACHE_NAME if out_dir is not None else None)
    with _Progress(progress) as bars, MetricCache(cache_path) as store:
        # 1. hash every file once
        all_paths = [s.path for s in sample_list] + ref_paths + train_paths
        with bars.stage("hashing images", len(all_paths)) as advance:
            hashes, unreadable = _hash_files(all_paths, advance)
        skipped: list[tuple[Path, str]] = []
        for path, reason in unreadable:
            message = f"{path}: cannot be read ({reason}); left out"
            warnings.append(message)
            logger.warning(message)
            skipped.append((path, reason))
        gen = [JudgeImage(path=s.path, sha=hashes[s.path], sample=s) for s in sample_list if s.path in hashes]
        first_seen: dict[GroupKey, int] = {}
        for im in gen:
            first_seen.setdefault(_group(im), len(first_seen))
        gen.sort(key=lambda im: first_seen[_group(im)])  # each group contiguous, so chunks never split one
        refs = [JudgeImage(path=p, sha=hashes[p]) for p in ref_paths if p in hashes]
        trains = [JudgeImage(path=p, sha=hashes[p]) for p in train_paths if p in hashes]
        overlap = sorted({r.sha for r in refs} & {t.sha for t in trains})
        if overlap:
            names = [r.path.name for r in refs if r.sha in overlap]
            message = (f"{len(names)} reference image(s) are also training images ({', '.join(names[:5])}"
                       f"{', ...' if len(names) > 5 else ''}): consistency scores against training images "
                       "overstate how well the LoRA generalises; use held-out references")
            warnings.append(message)
            logger.warning(message)

        # 2. metrics
        ctx = JudgeContext(references=refs, train_images=trains, device=dev, batch_size=batch_size,
                           encoder_loader=encoder_loader)
        built, runs_failed = _build_metrics(cfg, remote_code)
        for run in runs_failed:
            warnings.append(f"metric {run.name} ({run.family}) is unavailable and was skipped: {run.reason}")
            logger.warning(warnings[-1])
        inputs = _inputs_identity(refs, trains)
        ran: list[tuple[Metric, MetricRun]] = []
        keys: dict[str, str] = {}
        prepared: set[str] = set()
        for metric, run in built:
            try:  # the cache key, from what the metric resolves to without loading weights when it can say
                identity = metric.identify(ctx)
                if identity is None:  # only loading can tell (a plugin's default): prepare now, as always
                    metric.prepare(ctx)
                    prepared.add(run.name)
                    identity = _identity_after_prepare(metric, ctx)
            except MetricUnavailable as exc:
                _unavailable(run, exc, warnings)
                runs_failed.append(run)
                continue
            keys[run.name] = _cache_key(metric, identity, inputs)
            ran.append((metric, run))

        if not ran:
            failed = ", ".join(r.name for r in runs_failed) or "none enabled"
            raise UserError(f"no judge metric can run here ({failed}); the warnings above say what each needs")

        # 3. the cache for every image first; load (prepare) only the metrics that miss a value
        # metric -> item id (_item_id: the sha, with the prompt's digest for a prompt metric) -> value
        image_values: dict[str, dict[str, float | None]] = {run.name: {} for _, run in ran}
        set_values: dict[str, dict[GroupKey, float | None]] = {run.name: {} for _, run in ran}
        groups = _groups(gen)
        for metric, run in ran:
            missing = _look_up(run, keys[run.name], store, gen, groups, image_values, set_values)
            if not missing or run.name in prepared:
                continue
            try:
                metric.prepare(ctx)
            except MetricUnavailable as exc:
                _unavailable(run, exc, warnings)
                continue
            prepared.add(run.name)
            key = _cache_key(metric, _identity_after_prepare(metric, ctx), inputs)
            if key != keys[run.name]:  # loading found another model than the probe said: its own values only
                logger.info("metric %s resolved to another model when loaded than without loading; keyed by "
                            "what was loaded", run.name)
                keys[run.name] = key
                image_values[run.name].clear()
                set_values[run.name].clear()
                run.cached = 0
                _look_up(run, key, store, gen, groups, image_values, set_values)
        ran = [(m, r) for m, r in ran if r.status == "ran"]

        # 4. chunks: decode once what some metric still needs, compute, commit
        thumbs: dict[str, bytes] = {}
        grid = {id(im) for im in {_group(im): im for im in reversed(gen)}.values()}  # first image of each group
        copy_name, threshold = cfg.copying.metric, _copy_threshold(cfg, ran)
        copy_run = next((r for _, r in ran if r.name == copy_name), None)

        def shown(im: JudgeImage) -> bool:
            """Whether the report shows the image: the grid's first seeds and the flagged copies."""
            value = None if copy_run is None else image_values[copy_name].get(_item_id(copy_run, im))
            return id(im) in grid or (value is not None and value >= threshold)

        with bars.stage("judging images", len(gen)) as advance:
            for chunk in _chunks(gen, chunk_size):
                _judge_chunk(chunk, ctx, ran, keys, store, image_values, set_values, thumbs, skipped, warnings,
                             shown=shown if out_dir is not None else None)
                advance(len(chunk))
        for metric, run in ran:
            run.resolved = dict(metric.resolved())
        ran = [(m, r) for m, r in ran if r.status == "ran"]
        runs_failed += [r for m, r in built if r.status != "ran" and r not in runs_failed]
        broken = {str(p) for p, _ in skipped}
        gen = [im for im in gen if str(im.path) not in broken]
        copies = _copies(gen, ran, image_values, _copy_threshold(cfg, ran), copy_name, ctx, thumbs, store,
                         keys.get(copy_name))

    scores = _score_rows(gen, ran, image_values, set_values)
    effective = _effective_config(cfg, ran)
    board = _leaderboard(gen, ran, image_values, set_values, effective)
    warnings += [w for w in board.warnings if w not in warnings]
    by_name = {run.name: run for run in [*(r for _, r in ran), *runs_failed]}
    metric_runs = [by_name[n] for n in cfg.enabled_metrics() if n in by_name]
    stands_for: dict[str, list[str]] = {}  # an encoder loaded as the offline fallback of hub models is a stand-in
    for requested, fallback in ctx.notes.get("encoder_fallbacks", {}).items():
        stands_for.setdefault(fallback, []).append(requested)
    loaded_now = ctx.loaded_encoders()
    encoders = [EncoderRun(spec, label + (
                    f" (offline stand-in for {', '.join(stands_for[spec])})" if spec in stands_for else ""),
                    bool(getattr(loaded_now.get(spec), "stand_in", False)) or spec in stands_for)
                for spec, label in ctx.used_encoders(
                    str(r.resolved["encoder"]) for _, r in ran if r.resolved.get("encoder")).items()]
    result = JudgeResult(samples=[im.sample for im in gen if im.sample is not None], images=gen, references=refs,
                         train_images=trains, scores=scores, leaderboard=board,
                         checkpoints=_checkpoint_rows(gen, board), metrics=metric_runs, encoders=encoders,
                         config=effective, copies=copies, warnings=warnings, skipped=skipped, layout=layout_name,
                         out=out_dir, thumbnails=thumbs)
    if out_dir is not None:
        write_outputs(result, out_dir)
    for im in [*refs, *trains]:  # metrics may have kept them decoded for the run; the run is over
        im.release()
    return result


def _groups(images: Sequence[JudgeImage]) -> dict[GroupKey, list[JudgeImage]]:
    groups: dict[GroupKey, list[JudgeImage]] = {}
    for im in images:
        groups.setdefault(_group(im), []).append(im)
    return groups


def _item_id(run: MetricRun, im: JudgeImage) -> str:
    """The identity of ``im``'s value of the metric ``run``, in the cache and in ``image_values``: the image's
    content hash, plus the digest of its prompt text when the metric reads the prompt (``"prompt"`` in
    ``MetricInfo.inputs``: :func:`~tastelab.judge.cache.prompted_id`). Why: a prompt metric's value depends on
    the text, so an edited prompt (same images) must be recomputed and two samples with the same bytes under
    other prompts must get a value each; an image-only metric's value does not, so it stays reusable."""
    return prompted_id(im.sha, im.prompt) if "prompt" in run.inputs else im.sha


def _group_id(run: MetricRun, members: Sequence[JudgeImage]) -> str:
    """A set metric's cache id of one group: the set id of its members' :func:`_item_id` (their content
    hashes, with the prompt when the metric reads it)."""
    return set_id(_item_id(run, im) for im in members)


def _inputs_identity(refs: Sequence[JudgeImage], trains: Sequence[JudgeImage]) -> dict[str, str]:
    """The reference and training images, by content: a metric comparing with them gives other values when
    they change, so they are part of its cache key (:func:`_cache_key`)."""
    return {"references": set_id(r.sha for r in refs), "train_images": set_id(t.sha for t in trains)}


def _cache_key(metric: Metric, identity: Mapping[str, Any], inputs: Mapping[str, str]) -> str:
    """The metric's cache key (:meth:`Metric.cache_key` with its identity), plus the content of the reference /
    training images when the metric reads them (``MetricInfo.inputs``)."""
    info = getattr(type(metric), "info", None)
    reads = set(getattr(info, "inputs", ()) or ()) & set(inputs)
    key = metric.cache_key(identity)
    if not reads:
        return key
    return json.dumps({"metric": key, "inputs": {k: inputs[k] for k in sorted(reads)}}, sort_keys=True)


def _identity_after_prepare(metric: Metric, ctx: JudgeContext) -> Mapping[str, Any]:
    """What a prepared metric really runs with: its :meth:`~Metric.identify` answer, else :meth:`~Metric.resolved`."""
    identity = metric.identify(ctx)
    return metric.resolved() if identity is None else identity


def _look_up(run: MetricRun, key: str, store: MetricCache, gen: Sequence[JudgeImage],
             groups: Mapping[GroupKey, Sequence[JudgeImage]], image_values: dict[str, dict[str, float | None]],
             set_values: dict[str, dict[GroupKey, float | None]]) -> bool:
    """Read the metric's cached values of the whole run (one query per 500 ids); True when some are missing."""
    if run.per == "image":
        ids = list(dict.fromkeys(_item_id(run, im) for im in gen))
        cached = store.get_images(key, ids)
        image_values[run.name].update(cached)
        run.cached += len(cached)
        return len(cached) < len(ids)
    group_ids = {g: _group_id(run, members) for g, members in groups.items()}
    found = store.get_sets(key, list(group_ids.values()))
    for g, gid in group_ids.items():
        if gid in found:
            set_values[run.name][g] = found[gid]
    run.cached += sum(1 for gid in group_ids.values() if gid in found)
    return any(gid not in found for gid in group_ids.values())


def _judge_chunk(chunk: list[JudgeImage], ctx: JudgeContext, ran: list[tuple[Metric, MetricRun]],
                 keys: dict[str, str], store: MetricCache, image_values: dict[str, dict[str, float | None]],
                 set_values: dict[str, dict[GroupKey, float | None]], thumbs: dict[str, bytes],
                 skipped: list[tuple[Path, str]], warnings: list[str], *,
                 shown: Callable[[JudgeImage], bool] | None) -> None:
    """One chunk: decode once what some metric still needs (the cache was read for every image before the
    chunks), compute, commit (see the module docstring).
    Before the pixels are released, the images the report shows (``shown``) get their thumbnail."""
    groups = _groups(chunk)
    todo_images: dict[str, list[JudgeImage]] = {}
    todo_sets: dict[str, dict[GroupKey, list[JudgeImage]]] = {}
    for _metric, run in ran:
        if run.status != "ran":
            continue
        if run.per == "image":
            first: dict[str, JudgeImage] = {}
            for im in chunk:
                item = _item_id(run, im)
                if item not in image_values[run.name]:
                    first.setdefault(item, im)
            todo_images[run.name] = list(first.values())
        else:
            todo_sets[run.name] = {g: m for g, m in groups.items() if g not in set_values[run.name]}

    need: dict[int, JudgeImage] = {}
    for ims in todo_images.values():
        need.update({id(im): im for im in ims})
    for sets in todo_sets.values():
        for members in sets.values():
            need.update({id(im): im for im in members})
    broken: set[int] = set()
    for im in need.values():  # decode each image once; every metric of the chunk reads the same pixels
        try:
            im.image = images_io.load_image(im.path)
        except images_io.ImageDecodeError as exc:
            broken.add(id(im))
            skipped.append((im.path, exc.reason))
            message = f"{im.path}: cannot be decoded ({exc.reason}); left out"
            warnings.append(message)
            logger.warning(message)
            continue
    try:
        for metric, run in ran:
            if run.status != "ran":
                continue
            try:
                if run.per == "image":
                    todo = [im for im in todo_images[run.name] if id(im) not in broken]
                    if todo:
                        values = _check_values(run.name, metric.compute_images(ctx, todo), todo, "images")
                        new = {_item_id(run, im): v for im, v in zip(todo, values, strict=True)}
                        store.put_images(keys[run.name], new)
                        image_values[run.name].update(new)
                        run.computed += len(new)
                else:
                    todo_groups = {g: [im for im in members if id(im) not in broken]
                                   for g, members in todo_sets[run.name].items()}
                    todo_groups = {g: m for g, m in todo_groups.items() if m}
                    if todo_groups:
                        out = metric.compute_sets(ctx, todo_groups)
                        order = list(todo_groups)
                        values = _check_values(run.name, [out.get(g) for g in order], order, "groups")
                        missing = [g for g in order if g not in out]
                        if missing:
                            raise RuntimeError(f"metric {run.name} returned no value for group {missing[0]}")
                        new_sets = dict(zip(order, values, strict=True))
                        store.put_sets(keys[run.name], {_group_id(run, todo_groups[g]): v
                                                        for g, v in new_sets.items()})
                        set_values[run.name].update(new_sets)
                        run.computed += len(new_sets)
            except MetricUnavailable as exc:  # found out only while computing (a lazily loaded model)
                _unavailable(run, exc, warnings)
    finally:
        for im in need.values():  # release the pixels: memory stays one chunk, whatever the run's size
            if shown is not None and im.image is not None and im.sha not in thumbs and shown(im):
                thumbs[im.sha] = thumbnail(im.image)
            im.release()


# --------------------------------------------------------------------------------------------- tables
def _score_rows(gen: list[JudgeImage], ran: list[tuple[Metric, MetricRun]],
                image_values: dict[str, dict[str, float | None]],
                set_values: dict[str, dict[GroupKey, float | None]]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for im in gen:
        s = im.sample
        assert s is not None
        base = {"checkpoint": s.checkpoint, "epoch": s.epoch, "step": s.step, "image": str(im.path),
                "prompt_idx": s.prompt_idx, "prompt": s.prompt, "seed": s.seed}
        for _, run in ran:
            if run.per == "image" and (item := _item_id(run, im)) in image_values[run.name]:
                rows.append({**base, "metric": run.name, "value": image_values[run.name][item]})
    firsts: dict[GroupKey, Sample] = {}
    for im in gen:
        assert im.sample is not None
        firsts.setdefault(_group(im), im.sample)
    for _, run in ran:
        if run.per != "set":
            continue
        for g, s in firsts.items():
            if g in set_values[run.name]:
                rows.append({"checkpoint": s.checkpoint, "epoch": s.epoch, "step": s.step, "image": None,
                             "prompt_idx": s.prompt_idx, "prompt": s.prompt, "seed": None, "metric": run.name,
                             "value": set_values[run.name][g]})
    return rows


def _leaderboard(gen: list[JudgeImage], ran: list[tuple[Metric, MetricRun]],
                 image_values: dict[str, dict[str, float | None]],
                 set_values: dict[str, dict[GroupKey, float | None]], config: JudgeConfig) -> Leaderboard:
    img_rows = []
    for im in gen:
        s = im.sample
        assert s is not None
        pidx = -1 if s.prompt_idx is None else s.prompt_idx  # no prompt known: one group of all the images
        for _, run in ran:
            if run.per == "image" and (item := _item_id(run, im)) in image_values[run.name]:
                img_rows.append({"checkpoint": s.checkpoint, "image": str(im.path), "prompt_idx": pidx,
                                 "seed": s.seed, "metric": run.name, "value": image_values[run.name][item]})
    set_rows = [{"checkpoint": g[0], "prompt_idx": -1 if g[1] is None else g[1], "metric": run.name, "value": v}
                for _, run in ran if run.per == "set" for g, v in set_values[run.name].items()]
    return build_leaderboard(ImageMetrics.from_rows(img_rows), config, SetMetrics.from_rows(set_rows))


def _checkpoint_rows(gen: list[JudgeImage], board: Leaderboard) -> list[dict[str, Any]]:
    """The leaderboard's records in training order, with each checkpoint's epoch and step."""
    meta: dict[str, Sample] = {}
    for im in gen:
        assert im.sample is not None
        meta.setdefault(im.sample.checkpoint, im.sample)
    records = {r["checkpoint"]: r for r in board.to_records()}
    return [{**records[c], "epoch": s.epoch, "step": s.step} for c, s in meta.items() if c in records]


def _copies(gen: list[JudgeImage], ran: list[tuple[Metric, MetricRun]],
            image_values: dict[str, dict[str, float | None]], threshold: float, name: str, ctx: JudgeContext,
            thumbs: dict[str, bytes], store: MetricCache, key: str | None) -> list[CopyMatch]:
    """Images whose copy metric reaches the threshold, each with its nearest reference / training image:
    from the copy metric's ``nearest(ctx, images)`` when it has one, else by pixels (for display only).

    The nearest image found by the metric is cached with its values (as its index among the anchors sorted by
    content hash; the metric's key holds the anchors' content), so a cached re-run does not load the encoder
    to show which reference a copy resembles."""
    found_metric = next(((m, r) for m, r in ran if r.name == name), None)
    if found_metric is None:
        return []
    metric, run = found_metric
    flagged = [(im, v) for im in gen
               if (v := image_values[name].get(_item_id(run, im))) is not None and v >= threshold]
    if not flagged:
        return []
    pool = [*ctx.references, *ctx.train_images]
    nearest_fn = getattr(metric, "nearest", None)
    if not callable(nearest_fn):
        found = _nearest_by_pixels([im for im, _ in flagged], pool, thumbs)
        return [CopyMatch(image=im, similarity=float(v), nearest=n, nearest_by="pixels (16x16 grey; for display)")
                for (im, v), n in zip(flagged, found, strict=True)]
    anchors = list({im.sha: im for im in sorted(pool, key=lambda im: im.sha)}.values())
    index = {im.sha: i for i, im in enumerate(anchors)}
    nearest_key = json.dumps({"nearest_anchor_of": key}, sort_keys=True)
    firsts: dict[str, JudgeImage] = {}  # item id -> its first flagged image
    for im, _ in flagged:
        firsts.setdefault(_item_id(run, im), im)
    cached = store.get_images(nearest_key, list(firsts)) if key is not None else {}
    known = {item: anchors[int(i)] for item, i in cached.items() if i is not None and 0 <= int(i) < len(anchors)}
    todo = {item: im for item, im in firsts.items() if item not in known}
    if todo:
        new = dict(zip(todo, nearest_fn(ctx, list(todo.values())), strict=True))
        known.update(new)
        if key is not None:
            store.put_images(nearest_key, {item: float(index[n.sha]) for item, n in new.items()})
    return [CopyMatch(image=im, similarity=float(v), nearest=known[_item_id(run, im)],
                      nearest_by=f"{name}'s encoder") for im, v in flagged]


def _nearest_by_pixels(images: list[JudgeImage], pool: list[JudgeImage], thumbs: dict[str, bytes]
                       ) -> list[JudgeImage | None]:
    """Nearest pool image by the cosine of 16x16 grey thumbnails (centred): only to show the user which
    reference a flagged copy resembles when the copy metric cannot say."""
    import numpy as np
    from PIL import Image

    if not pool:
        return [None] * len(images)

    def vec(im: JudgeImage) -> np.ndarray:
        thumb = Image.open(io.BytesIO(ensure_thumbnail(im, thumbs)))
        v = np.asarray(thumb.convert("L").resize((16, 16)), dtype=np.float64).ravel()
        v = v - v.mean()
        return v / (np.linalg.norm(v) or 1.0)

    refs = np.stack([vec(p) for p in pool])
    return [pool[int(np.argmax(refs @ vec(im)))] for im in images]
