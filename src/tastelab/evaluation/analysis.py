"""Compare two sets of per-image scores: labels vs predictions, two labellers, or two models.

Why: after training, the question is "where does the model disagree with me, and by how much?" —
on the test split, on one folder, for the worst images. This module matches two score files image by
image and reports agreement the way the IQA/IAA literature does (SRCC/PLCC with p-values), the way a
curation tool experiences it (A/B agreement, "better half" agreement), and lists the images with the
largest rank disagreement. Nothing is assumed about scales: the two sides may be MOS 0..1 and 1..10
model scores, Elo ratings and a model, and so on. The comparison is symmetric.

Inputs (:func:`load_score_table`)
    - ``tastelab score --out`` files (``.jsonl``, ``.parquet``, or a ``.csv`` with the score-output
      header): one column for the whole file, so every value is on one scale: ``raw_score`` (the model's
      native scale) when every scored row has it, else ``score`` (``ScoreTable.column`` says which);
      error rows are counted and skipped. A ``.jsonl`` line that is not a JSON object is an error naming
      the file and line.
    - every label file :func:`tastelab.io.records.load_records` reads (personal JSON/CSV score files,
      MOS tables, AVA), without needing the images on disk; the records' ``split`` is kept.
    - an A/B vote table (``image_a,image_b,votes_a,votes_b``) as the truth: :func:`analyze_votes`
      reports how many votes the predictions agree with; ``split`` / ``split_file`` select held-out pairs
      from a pairs run's ``split.json``.

Splits
    Asking for a split that no input knows (no split column, no split file, a pairs split file with
    image scores) is an error, never an empty table.

Matching (:func:`match_paths`)
    Paths rarely agree verbatim (absolute vs relative, another machine's folder, ``\\`` separators,
    case). Two paths match on their longest common tail of path components (case-insensitive) that
    identifies exactly one image on each side, longest tails first; the shortest tail is the file
    name. ``/data/shoot/cats/a.jpg`` matches ``cats/a.jpg`` and ``photos/cats/a.jpg``; two ``a.jpg`` in
    different folders on one side only match through their folders. Unmatched images are counted and
    reported, never silently dropped.

Report (:func:`analyze`)
    For all matched images and per split (``train``/``val``/``test``/...; taken from ``split_file``,
    else the truth's records, else the prediction's): count, mean ± std (n−1) of each side, Spearman
    and Pearson with p-values (scipy), pairwise A/B agreement
    (:func:`tastelab.evaluation.metrics.pairwise_accuracy_from_scores`: the fraction of image pairs both
    sides order the same way), and threshold agreement: each side split at its own median ("better
    half" on both, since scales differ), or at a given truth-scale ``threshold`` applied to both when
    they share a scale. Per-image rows carry ranks (1 = best) and the rank disagreement, largest first.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tastelab.core.atomic import write_text_atomic
from tastelab.evaluation import metrics
from tastelab.evaluation.metrics import pairwise_accuracy
from tastelab.io.records import SPLIT_ALIASES, load_records
from tastelab.io.splits import load_split, portable_keys
from tastelab.io.textfiles import read_text_file
from tastelab.io.votes import load_votes
from tastelab.io.writers import read_results

__all__ = [
    "Analysis",
    "GroupStats",
    "ImageRow",
    "Matching",
    "ScoreTable",
    "VoteAnalysis",
    "analyze",
    "analyze_votes",
    "detect_kind",
    "group_stats",
    "load_score_table",
    "match_paths",
    "write_errors",
    "write_json",
]

logger = logging.getLogger(__name__)

SPLIT_ORDER: tuple[str, ...] = ("train", "val", "eval", "test")
"""Display order of known split names; others follow alphabetically."""
NO_SPLIT = "(none)"
SCORE_OUTPUT_SUFFIXES = (".jsonl", ".parquet")
EXAMPLES = 5


# --------------------------------------------------------------------------------------------------
# Loading


@dataclass
class ScoreTable:
    """Per-image values of one file, whatever its format.

    ``errors``: rows without a usable value (score-output error rows); ``problems``: rows the label
    loader dropped; ``duplicates``: repeated paths (the first is kept).
    """

    file: str
    kind: str
    paths: list[str]
    values: np.ndarray
    splits: list[str | None]
    errors: int = 0
    problems: int = 0
    duplicates: int = 0
    #: the score-output column the values came from (``raw_score`` or ``score``); None for label files
    column: str | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def summary(self) -> dict[str, Any]:
        return {"file": self.file, "kind": self.kind, "images": len(self.paths), "errors": self.errors,
                "problems": self.problems, "duplicates": self.duplicates, "column": self.column}


def _csv_header(path: Path) -> list[str]:
    first = read_text_file(path, errors="replace").split("\n", 1)[0]
    delimiter = max((",", "\t", ";"), key=first.count)
    return [cell.strip().lower() for cell in next(csv.reader([first], delimiter=delimiter), [])]


def detect_kind(path: str | Path) -> str:
    """``"score-output"``, ``"votes"`` or ``"labels"`` (anything :func:`load_records` reads)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"score file not found: {path}")
    suffix = path.suffix.lower()
    if suffix in SCORE_OUTPUT_SUFFIXES:
        return "score-output"
    if suffix in (".csv", ".tsv") and path.is_file():
        header = _csv_header(path)
        if {"image_a", "image_b", "votes_a", "votes_b"} <= set(header):
            return "votes"
        if "path" in header and ("raw_score" in header or "band" in header):
            return "score-output"
    return "labels"


def _to_float(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _dedupe(table: ScoreTable) -> ScoreTable:
    """Keep the first entry per path (normalised), counting the rest as duplicates."""
    seen: set[str] = set()
    keep: list[int] = []
    for i, path in enumerate(table.paths):
        key = "/".join(_parts(path))
        if key in seen:
            continue
        seen.add(key)
        keep.append(i)
    dropped = len(table.paths) - len(keep)
    if dropped:
        logger.warning("%s: %d duplicate paths; keeping the first of each", table.file, dropped)
    return ScoreTable(table.file, table.kind, [table.paths[i] for i in keep], table.values[keep],
                      [table.splits[i] for i in keep], table.errors, table.problems, table.duplicates + dropped,
                      table.column)


def _read_score_output(path: Path) -> list[dict[str, Any]]:
    """Rows of a score output; a ``.jsonl`` line that is not a JSON object is a ValueError naming file:line."""
    if path.suffix.lower() != ".jsonl":
        return read_results(path)
    rows: list[dict[str, Any]] = []
    for lineno, line in enumerate(read_text_file(path, encoding="utf-8", errors="replace").split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise ValueError(f"{path}:{lineno}: not a JSON line ({exc})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object per line, got {type(row).__name__}")
        rows.append(row)
    return rows


def compile_filter(filter: str | None) -> re.Pattern[str] | None:
    """The ``--filter`` regular expression; a bad one is a ValueError naming it."""
    if not filter:
        return None
    try:
        return re.compile(filter)
    except re.error as exc:
        raise ValueError(f"--filter {filter!r} is not a valid regular expression: {exc}") from None


def load_score_table(path: str | Path, **record_kwargs: Any) -> ScoreTable:
    """Per-image values from a score output or any label file (images need not exist).

    Score outputs give ``raw_score`` when present (the model's native scale, comparable with labels),
    else ``score``. ``record_kwargs`` go to :func:`tastelab.io.records.load_records` (e.g.
    ``score_column``).
    """
    path = Path(path)
    kind = detect_kind(path)
    if kind == "votes":
        raise ValueError(f"{path}: an A/B vote table has no per-image scores; use it as the truth "
                         "(analyze_votes) or turn it into scores with `tastelab ratings`")
    if kind == "score-output":
        rows = _read_score_output(path)
        candidates = [row for row in rows if row.get("path") and not row.get("error")]
        with_raw = sum(_to_float(row.get("raw_score")) is not None for row in candidates)
        column = "raw_score" if candidates and with_raw == len(candidates) else "score"
        if 0 < with_raw < len(candidates):
            logger.warning("%s: %d of %d rows have no raw_score; using `score` for every row (one scale)", path,
                           len(candidates) - with_raw, len(candidates))
        else:
            logger.info("%s: values from the `%s` column", path, column)
        paths, values, splits, errors = [], [], [], 0
        for row in rows:
            value = _to_float(row.get(column))
            if value is None or not row.get("path") or row.get("error"):
                errors += 1
                continue
            paths.append(str(row["path"]))
            values.append(value)
            splits.append(row.get("split") or None)
        if errors:
            logger.info("%s: %d rows without a %s (errors) skipped", path, errors, column)
        table = ScoreTable(str(path), kind, paths, np.asarray(values, dtype=np.float64), splits, errors=errors,
                           column=column)
        return _dedupe(table)

    kwargs = {"check_files": False, "strict": False, **record_kwargs}
    records = load_records(path, **kwargs)
    if records.kind == "folder":
        raise ValueError(f"{path}: a folder has no scores; pass a score or label file")
    kept = [r for r in records if r.score is not None]
    if records.problems:
        logger.warning("%s: %d rows dropped while reading (first: %s)", path, len(records.problems),
                       records.problems[0])
    table = ScoreTable(str(path), records.kind, [r.path for r in kept],
                       np.asarray([r.score for r in kept], dtype=np.float64), [r.split for r in kept],
                       errors=len(records) - len(kept), problems=len(records.problems))
    return _dedupe(table)


# --------------------------------------------------------------------------------------------------
# Matching


def _split_path(path: str) -> list[str]:
    """Path components as written, with ``\\`` as a separator and no drive, root, ``.`` or ``..``."""
    parts = [p for p in str(path).replace("\\", "/").split("/") if p not in ("", ".", "..")]
    return parts[1:] if parts and re.fullmatch(r"[A-Za-z]:", parts[0]) else parts


def _parts(path: str) -> tuple[str, ...]:
    """Lower-cased components: what matching compares (case differs between OSes and label files)."""
    return tuple(p.lower() for p in _split_path(path))


def _original_tail(path: str, m: int) -> str:
    return "/".join(_split_path(path)[-m:])


@dataclass
class Matching:
    """Index pairs ``(left, right)`` of matched paths, their shared tail, and what stayed unmatched."""

    pairs: list[tuple[int, int]]
    keys: list[str]
    unmatched_left: list[int]
    unmatched_right: list[int]


def match_paths(left: Sequence[str], right: Sequence[str]) -> Matching:
    """Match two path lists on their longest common unambiguous tail (see the module docstring)."""
    lp, rp = [_parts(p) for p in left], [_parts(p) for p in right]
    free_l, free_r = set(range(len(left))), set(range(len(right)))
    depth = max((len(p) for p in [*lp, *rp]), default=0)
    pairs: list[tuple[int, int]] = []
    keys: list[str] = []
    for m in range(depth, 0, -1):
        index_l: dict[tuple[str, ...], list[int]] = {}
        index_r: dict[tuple[str, ...], list[int]] = {}
        for i in free_l:
            if len(lp[i]) >= m:
                index_l.setdefault(lp[i][-m:], []).append(i)
        for j in free_r:
            if len(rp[j]) >= m:
                index_r.setdefault(rp[j][-m:], []).append(j)
        for tail, ls in index_l.items():
            rs = index_r.get(tail)
            if rs is not None and len(ls) == 1 and len(rs) == 1:
                pairs.append((ls[0], rs[0]))
                keys.append(_original_tail(left[ls[0]], m))
                free_l.discard(ls[0])
                free_r.discard(rs[0])
    order = sorted(range(len(pairs)), key=lambda k: pairs[k][0])
    return Matching([pairs[k] for k in order], [keys[k] for k in order], sorted(free_l), sorted(free_r))


# --------------------------------------------------------------------------------------------------
# Statistics


@dataclass
class GroupStats:
    """Agreement of the two sides on one group of images (a split, or all)."""

    name: str
    n: int
    truth_mean: float
    truth_std: float
    pred_mean: float
    pred_std: float
    srcc: float
    srcc_p: float
    plcc: float
    plcc_p: float
    pair_acc: float
    thr_acc: float


def _mean_std(x: np.ndarray) -> tuple[float, float]:
    if x.size == 0:
        return float("nan"), float("nan")
    return float(x.mean()), float(x.std(ddof=1)) if x.size > 1 else float("nan")


def _p_value(fn: Any, pred: np.ndarray, truth: np.ndarray) -> float:
    """scipy's two-sided p-value; nan where the correlation is undefined (n < 3, constant input)."""
    import warnings

    if pred.size < 3 or np.ptp(pred) == 0 or np.ptp(truth) == 0:
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(fn(pred, truth).pvalue)


def group_stats(name: str, truth: np.ndarray, pred: np.ndarray, threshold: float | None = None) -> GroupStats:
    """Every agreement number for one group; nan (never an exception) where one is undefined."""
    from scipy import stats

    tm, ts = _mean_std(truth)
    pm, ps = _mean_std(pred)
    n = int(truth.size)
    if n >= 2:
        srcc, plcc = metrics.srcc(pred, truth), metrics.plcc(pred, truth)
        pair = metrics.pairwise_accuracy_from_scores(pred, truth)
    else:
        srcc = plcc = pair = float("nan")
    if n == 0:
        thr = float("nan")
    elif threshold is not None:
        thr = metrics.threshold_accuracy(pred, truth, threshold)
    else:  # own medians: the sides may use different scales
        thr = float(np.mean((pred >= np.median(pred)) == (truth >= np.median(truth))))
    return GroupStats(name, n, tm, ts, pm, ps, srcc, _p_value(stats.spearmanr, pred, truth), plcc,
                      _p_value(stats.pearsonr, pred, truth), pair, thr)


def _split_sort_key(name: str) -> tuple[int, str]:
    if name in SPLIT_ORDER:
        return (SPLIT_ORDER.index(name), name)
    return (len(SPLIT_ORDER) + (name == NO_SPLIT), name)


# --------------------------------------------------------------------------------------------------
# Analysis


@dataclass
class ImageRow:
    """One matched image: both values, ranks (1 = best, ties share the average) and their gap.

    ``key`` is the truth path without the folders every analysed image shares (short, unambiguous).
    """

    key: str
    truth_path: str
    pred_path: str
    split: str | None
    truth: float
    pred: float
    truth_rank: float = 0.0
    pred_rank: float = 0.0

    @property
    def rank_diff(self) -> float:
        """Prediction rank minus truth rank: positive means the prediction ranks the image worse."""
        return self.pred_rank - self.truth_rank


@dataclass
class Analysis:
    """The result of :func:`analyze`; ``groups[0]`` is ``"all"``, then one per split."""

    truth: dict[str, Any]
    pred: dict[str, Any]
    matched: int
    unmatched_truth: int
    unmatched_pred: int
    filtered_out: int
    excluded_by_split: int
    unmatched_truth_examples: list[str]
    unmatched_pred_examples: list[str]
    groups: list[GroupStats]
    rows: list[ImageRow] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    def group(self, name: str) -> GroupStats:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(f"no group {name!r}; groups are {[g.name for g in self.groups]}")

    def to_dict(self, rows: bool = False) -> dict[str, Any]:
        """JSON-ready dict (nan becomes None); per-image rows only when asked (they can be large)."""
        out = {key: value for key, value in asdict(self).items() if key != "rows"}
        if rows:
            out["rows"] = [_row_dict(r) for r in self.rows]
        return _clean(out)


def _row_dict(row: ImageRow) -> dict[str, Any]:
    return {**asdict(row), "rank_diff": row.rank_diff, "abs_rank_diff": abs(row.rank_diff)}


def _clean(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def _is_pairs_split(splits: Mapping[str, Sequence[str]], meta: Mapping[str, Any]) -> bool:
    """A pairs run's split file (``kind: pairs``; keys ``a<TAB>b``) assigns A/B pairs, not images."""
    return meta.get("kind") == "pairs" or any("\t" in key for keys in splits.values() for key in keys[:20])


def _split_assignment(split_file: str | Path, paths: Sequence[str]) -> list[str | None]:
    """Split of each path from a ``split.json`` (portable keys), matched like the score files are."""
    splits, meta = load_split(split_file)
    if _is_pairs_split(splits, meta):
        raise ValueError(f"{split_file}: a pairs split (held-out A/B pairs of a `data.format: pairs` run) assigns "
                         "pairs, not images; use it with the votes as --truth, or pass an image split file")
    keys = [key for keys in splits.values() for key in keys]
    owner = [name for name, keys in splits.items() for _ in keys]
    matching = match_paths(paths, keys)
    out: list[str | None] = [None] * len(paths)
    for i, j in matching.pairs:
        out[i] = owner[j]
    if matching.unmatched_left:
        logger.warning("%s: %d of %d images are in no split", split_file, len(matching.unmatched_left), len(paths))
    return out


def analyze(
    truth: str | Path | ScoreTable,
    pred: str | Path | ScoreTable,
    *,
    split: str | Sequence[str] | None = None,
    split_file: str | Path | None = None,
    filter: str | None = None,
    threshold: float | None = None,
) -> Analysis:
    """Match ``pred`` to ``truth`` and report agreement overall and per split (module docstring).

    ``split`` keeps only those splits (a name, a comma-separated string, or a list); ``filter`` keeps
    images whose truth or prediction path contains a match of the regular expression (unmatched
    images are filtered the same way before being counted); ``threshold`` (truth scale) switches
    threshold agreement from own-median splits to one shared threshold.
    """
    pattern = compile_filter(filter)
    wanted = _wanted_splits(split)
    t = truth if isinstance(truth, ScoreTable) else load_score_table(truth)
    p = pred if isinstance(pred, ScoreTable) else load_score_table(pred)

    def keep(path: str) -> bool:
        return pattern is None or pattern.search(str(path).replace("\\", "/")) is not None

    if wanted is not None and split_file is None and not any(t.splits) and not any(p.splits):
        raise ValueError(f"--split {','.join(sorted(wanted))}: neither {t.file} nor {p.file} says which split an "
                         "image is in (no split column); pass --split-file RUN/split.json from the training run")
    matching = match_paths(t.paths, p.paths)
    split_of = _split_assignment(split_file, t.paths) if split_file is not None else None
    rows: list[ImageRow] = []
    filtered = excluded = 0
    for (i, j), key in zip(matching.pairs, matching.keys):
        if not (keep(t.paths[i]) or keep(p.paths[j])):
            filtered += 1
            continue
        name = split_of[i] if split_of is not None else (t.splits[i] or p.splits[j])
        if wanted is not None and (name or NO_SPLIT) not in wanted:
            excluded += 1
            continue
        rows.append(ImageRow(key, t.paths[i], p.paths[j], name, float(t.values[i]), float(p.values[j])))
    if wanted is not None and not rows and excluded:
        present = sorted({(split_of[i] if split_of is not None else (t.splits[i] or p.splits[j])) or NO_SPLIT
                          for i, j in matching.pairs}, key=_split_sort_key)
        raise ValueError(f"--split {','.join(sorted(wanted))}: none of the {excluded} matched images is in that split "
                         f"(splits present: {', '.join(present)})")
    lost_t = [t.paths[i] for i in matching.unmatched_left if keep(t.paths[i])]
    lost_p = [p.paths[j] for j in matching.unmatched_right if keep(p.paths[j])]
    filtered += len(matching.unmatched_left) - len(lost_t) + len(matching.unmatched_right) - len(lost_p)
    if lost_t or lost_p:
        logger.warning("%d truth images have no prediction, %d predictions have no truth (e.g. %s)",
                       len(lost_t), len(lost_p), (lost_t or lost_p)[0])
    for row, key in zip(rows, _display_keys([r.truth_path for r in rows])):
        row.key = key
    _rank(rows)
    rows.sort(key=lambda r: (-abs(r.rank_diff), r.key))
    groups = [group_stats("all", _values(rows, "truth"), _values(rows, "pred"), threshold)]
    names = sorted({r.split or NO_SPLIT for r in rows}, key=_split_sort_key)
    if names and names != [NO_SPLIT]:
        for name in names:
            members = [r for r in rows if (r.split or NO_SPLIT) == name]
            groups.append(group_stats(name, _values(members, "truth"), _values(members, "pred"), threshold))
    settings = {"split": sorted(wanted) if wanted else None, "split_file": None if split_file is None
                else str(split_file), "filter": filter, "threshold": threshold}
    return Analysis(t.summary(), p.summary(), len(rows), len(lost_t), len(lost_p), filtered, excluded,
                    lost_t[:EXAMPLES], lost_p[:EXAMPLES], groups, rows, settings)


def _display_keys(paths: Sequence[str]) -> list[str]:
    """Paths without the folders they all share (short, unambiguous names for tables and CSVs)."""
    split = [_split_path(p) for p in paths]
    if len(split) < 2:
        return [parts[-1] if parts else str(p) for parts, p in zip(split, paths)]
    common = 0
    shortest = min(len(parts) for parts in split)
    while common < shortest - 1 and len({parts[common] for parts in split}) == 1:
        common += 1
    return ["/".join(parts[common:]) for parts in split]


def _wanted_splits(split: str | Sequence[str] | None) -> set[str] | None:
    if split is None:
        return None

    items = split.split(",") if isinstance(split, str) else list(split)
    names = {SPLIT_ALIASES.get(s.strip().lower(), s.strip().lower()) for s in items if s.strip()}
    return names or None


def _values(rows: Sequence[ImageRow], side: str) -> np.ndarray:
    return np.asarray([getattr(r, side) for r in rows], dtype=np.float64)


def _rank(rows: Sequence[ImageRow]) -> None:
    """Ranks within the analysed images, 1 = highest value, ties averaged."""
    from scipy.stats import rankdata

    if not rows:
        return
    for side in ("truth", "pred"):
        ranks = rankdata(-_values(rows, side), method="average")
        for row, rank in zip(rows, ranks):
            setattr(row, f"{side}_rank", float(rank))


ERROR_COLUMNS = ["key", "split", "truth", "pred", "truth_rank", "pred_rank", "rank_diff", "abs_rank_diff",
                 "truth_path", "pred_path"]


def write_errors(path: str | Path, analysis: Analysis) -> Path:
    """Per-image CSV, largest absolute rank disagreement first (atomic)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=ERROR_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in analysis.rows:
        d = _row_dict(row)
        d["split"] = d["split"] or ""
        for k in ("truth", "pred"):
            d[k] = f"{d[k]:.6g}"
        for k in ("truth_rank", "pred_rank", "rank_diff", "abs_rank_diff"):
            d[k] = f"{d[k]:g}"
        writer.writerow({k: d[k] for k in ERROR_COLUMNS})
    write_text_atomic(path, buf.getvalue())
    return Path(path)


def write_json(path: str | Path, payload: Mapping[str, Any]) -> Path:
    """JSON report (atomic; nan written as null so every JSON reader accepts it)."""
    write_text_atomic(path, json.dumps(_clean(payload), indent=2, allow_nan=False) + "\n")
    return Path(path)


# --------------------------------------------------------------------------------------------------
# Votes as the truth


@dataclass
class VoteAnalysis:
    """How well per-image predictions agree with A/B votes (``pair_acc``: vote-weighted)."""

    truth: dict[str, Any]
    pred: dict[str, Any]
    rows: int
    used_rows: int
    ties: int
    images: int
    unmatched_images: int
    unmatched_pred: int
    filtered_out: int
    pair_acc: float
    pair_acc_unweighted: float
    unmatched_examples: list[str]

    def to_dict(self) -> dict[str, Any]:
        return _clean(asdict(self))


def _votes_in_splits(comparisons: Sequence[Any], split_file: str | Path, wanted: set[str] | None) -> list[Any]:
    """The vote rows whose pair the pairs split file puts in ``wanted`` (every split: all listed pairs).

    Pair keys are rebuilt the way the trainer writes them: both images' portable keys (relative to the
    images' common folder), sorted, joined by a tab.
    """
    splits, meta = load_split(split_file)
    if not _is_pairs_split(splits, meta):
        raise ValueError(f"{split_file}: an image split file; with votes as --truth pass the split.json of a "
                         "pairs run (`data.format: pairs`), which lists held-out pairs")
    owner = {key: name for name, keys in splits.items() for key in keys}
    images = sorted({c.image_a for c in comparisons} | {c.image_b for c in comparisons})
    rel = dict(zip(images, portable_keys(images)))
    kept, known = [], 0
    for c in comparisons:
        name = owner.get("\t".join(sorted((rel[c.image_a], rel[c.image_b]))))
        known += name is not None
        if name is not None and (wanted is None or name in wanted):
            kept.append(c)
    if not known:
        raise ValueError(f"{split_file}: none of the vote pairs is in this split file (another vote table?)")
    if wanted is not None and not kept:
        raise ValueError(f"--split {','.join(sorted(wanted))}: no vote pair is in that split "
                         f"(splits in {split_file}: {', '.join(sorted(splits))})")
    return kept


def analyze_votes(
    votes: str | Path,
    pred: str | Path | ScoreTable,
    *,
    filter: str | None = None,
    image_root: str | Path | None = None,
    split: str | Sequence[str] | None = None,
    split_file: str | Path | None = None,
) -> VoteAnalysis:
    """Agreement of per-image predictions with an A/B vote table.

    Vote images are matched to ``pred`` like score files are; a vote row counts when both images
    matched (and, with ``filter``, both paths match the regular expression). Vote ties state no
    preference and are skipped by the metric. ``split`` keeps the vote rows whose pair a pairs run's
    ``split_file`` puts in those splits (held-out pairs: ``split="test"``); it needs that file.
    """
    pattern = compile_filter(filter)
    wanted = _wanted_splits(split)
    if wanted is not None and split_file is None:
        raise ValueError(f"--split {','.join(sorted(wanted))}: a vote table has no split column; pass --split-file "
                         "RUN/split.json from the pairs training run (it lists the held-out pairs)")
    comparisons, problems = load_votes(votes, image_root, check_files=False, strict=False)
    if split_file is not None:
        comparisons = _votes_in_splits(comparisons, split_file, wanted)
    p = pred if isinstance(pred, ScoreTable) else load_score_table(pred)
    images = list(dict.fromkeys(x for c in comparisons for x in (c.image_a, c.image_b)))
    matching = match_paths(images, p.paths)
    value = {images[i]: float(p.values[j]) for i, j in matching.pairs}

    def keep(path: str) -> bool:
        return pattern is None or pattern.search(path.replace("\\", "/")) is not None

    used = [c for c in comparisons if c.image_a in value and c.image_b in value]
    kept = [c for c in used if keep(c.image_a) and keep(c.image_b)]
    args = ([value[c.image_a] for c in kept], [value[c.image_b] for c in kept],
            [c.votes_a for c in kept], [c.votes_b for c in kept])
    weighted = pairwise_accuracy(*args) if kept else float("nan")
    unweighted = pairwise_accuracy(*args, weighted=False) if kept else float("nan")
    lost = [images[i] for i in matching.unmatched_left]
    truth_summary: dict[str, Any] = {"file": str(votes), "kind": "votes", "rows": len(comparisons),
                                     "problems": len(problems)}
    if split_file is not None:  # which held-out pairs these are: unseen images, or new pairs among seen ones
        truth_summary["pair_split"] = load_split(split_file)[1].get("pair_split", "pair")
    return VoteAnalysis(truth_summary, p.summary(), len(comparisons), len(kept),
                        sum(1 for c in kept if c.votes_a == c.votes_b), len(images), len(lost),
                        len(matching.unmatched_right), len(used) - len(kept), weighted, unweighted,
                        lost[:EXAMPLES])
