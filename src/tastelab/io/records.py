"""One internal record model for every label format tastelab reads.

Every loader turns its native format (AVA.txt, MOS tables, the A/B tool's personal score files,
plain folders) into a :class:`RecordSet`, so training, evaluation and scoring never need to know
where labels came from.  Loaders never silently keep bad rows: unparsable rows raise
:class:`RecordError` (or become :class:`Problem` entries with ``strict=False``), and rows that parse
but cannot be used (zero votes, missing image, duplicate) are dropped and reported as problems.
"""

from __future__ import annotations

import csv
import functools
import glob
import io
import json
import logging
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tastelab.io.registries import LABEL_FORMATS
from tastelab.io.textfiles import read_text_file
from tastelab.io.urls import is_url

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")

# Rating scales seen in the field, narrowest first, so inference picks the tightest plausible one.
KNOWN_SCALES: tuple[tuple[float, float], ...] = (
    (0.0, 1.0),
    (1.0, 5.0),
    (0.0, 5.0),
    (1.0, 7.0),
    (1.0, 9.0),
    (1.0, 10.0),
    (0.0, 10.0),
    (0.0, 100.0),
)

PATH_COLUMNS: tuple[str, ...] = (
    "image",
    "image_name",
    "path",
    "filename",
    "file",
    "relative_path",
    "image_path",
    "img",
)
SCORE_COLUMNS: tuple[str, ...] = ("mos", "score", "mean_rating", "rating", "dmos", "mean_score", "label")
SPLIT_ALIASES: Mapping[str, str] = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "dev": "val",
    "test": "test",
    "testing": "test",
}
AVA_COLUMNS = 15
_DELIMITERS: tuple[str, ...] = (",", "\t", ";")


class RecordError(ValueError):
    """A label file could not be read; the message always says where and what was expected."""

    def __init__(self, message: str, file: str | Path | None = None, line: int | None = None):
        self.detail = message
        self.file = None if file is None else str(file)
        self.line = line
        where = ""
        if self.file is not None:
            where = f"{self.file}:{line}: " if line is not None else f"{self.file}: "
        super().__init__(where + message)


@dataclass(frozen=True)
class Problem:
    """A row or image that was dropped, kept so callers can report it instead of losing it."""

    file: str
    line: int | None
    message: str

    def __str__(self) -> str:
        return (
            f"{self.file}:{self.line}: {self.message}"
            if self.line is not None
            else f"{self.file}: {self.message}"
        )


@dataclass(frozen=True)
class Record:
    """One labelled (or unlabelled) image, whatever format it came from."""

    path: str
    score: float | None = None
    distribution: tuple[float, ...] | None = None
    weight: float = 1.0
    split: str | None = None
    source: str | None = None
    # Not hashed so records stay usable in sets/dict keys despite the mutable mapping.
    extra: Mapping[str, Any] = field(default_factory=dict, hash=False)


@dataclass
class RecordSet:
    """Records of one label file plus what is needed to interpret them (scale, kind, problems)."""

    records: list[Record]
    score_range: tuple[float, float]
    kind: str
    problems: list[Problem] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[Record]:
        return iter(self.records)


# --------------------------------------------------------------------------------------------------
# Image files


@functools.lru_cache(maxsize=512)
def _dir_index(directory: str, mtime_ns: int) -> Mapping[str, tuple[str, ...]]:
    """Lower-cased name -> real names of one directory.

    Cached per (directory, mtime) because case-insensitive lookups for 10k labels would otherwise
    list the same directory 10k times; the mtime key keeps the cache honest when files are added.
    """
    del mtime_ns  # only part of the cache key
    index: dict[str, list[str]] = {}
    try:
        names = os.listdir(directory)
    except OSError:
        return {}
    for name in names:
        index.setdefault(name.lower(), []).append(name)
    return {key: tuple(sorted(value)) for key, value in index.items()}


def _case_insensitive_child(directory: Path, name: str) -> Path | None:
    """Find ``name`` inside ``directory`` ignoring case; None when absent."""
    try:
        mtime = directory.stat().st_mtime_ns
    except OSError:
        return None
    matches = _dir_index(str(directory), mtime).get(name.lower(), ())
    if not matches:
        return None
    if len(matches) > 1:
        logger.warning(
            "%s: several files match %r ignoring case %s; using %r", directory, name, matches, matches[0]
        )
    return directory / matches[0]


def _resolve_dir(path: Path) -> Path | None:
    """Resolve a directory path, fixing the case of components that do not exist as written."""
    if path.is_dir():
        return path
    if path.parent == path:
        return None
    parent = _resolve_dir(path.parent)
    if parent is None:
        return None
    found = _case_insensitive_child(parent, path.name)
    return found if found is not None and found.is_dir() else None


def resolve_image_path(root: str | Path | None, name: str | Path) -> Path | None:
    """Locate a labelled image: exact path first, then a case-insensitive match.

    Label files written on Windows/macOS often disagree with the disk on case (``.JPG`` vs
    ``.jpg``); on Linux that would silently lose images, so we fall back and log a warning.
    """
    candidate = Path(name) if root is None else Path(root) / name
    if candidate.is_file():
        return candidate
    parent = _resolve_dir(candidate.parent)
    if parent is None:
        return None
    found = _case_insensitive_child(parent, candidate.name)
    if found is None or not found.is_file():
        return None
    logger.warning("image %r not found as written; using case-insensitive match %s", str(name), found)
    return found


def _is_image_name(name: str, extensions: Sequence[str]) -> bool:
    return os.path.splitext(name)[1].lower() in extensions


def list_images(
    root: str | os.PathLike, recursive: bool = True, extensions: Sequence[str] = IMAGE_EXTENSIONS
) -> list[str]:
    """Sorted image files under ``root``; hidden files and folders are skipped (.DS_Store, .git…)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    exts = tuple(ext.lower() for ext in extensions)
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")] if recursive else []
        found.extend(
            os.path.join(dirpath, f) for f in filenames if not f.startswith(".") and _is_image_name(f, exts)
        )
    return sorted(found)


def _read_path_list(list_file: Path) -> list[str]:
    """Lines of a ``.txt`` path list; relative entries are taken relative to the list's folder."""
    entries = []
    for raw in read_text_file(list_file, error=RecordError).splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        entries.append(_list_entry_path(list_file, line))
    return entries


#: Column of a Parquet path list that holds the paths, unless told otherwise.
DEFAULT_PATH_COLUMN = "path"


def _read_parquet_paths(list_file: Path, column: str = DEFAULT_PATH_COLUMN) -> list[str]:
    """One string column of a Parquet table as a path list (empty and null entries skipped).

    Large jobs keep their inputs in Parquet (a previous run's output, a data-lake export); only the
    named column is read, relative entries work like a ``.txt`` list's.
    """
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(list_file).names
    except Exception as exc:  # pyarrow raises ArrowInvalid / OSError variants for non-Parquet bytes
        raise RecordError(f"not a readable Parquet file ({exc})", list_file) from exc
    if column not in names:
        raise RecordError(f"no path column {column!r}; columns are {names} (pass --path-column)", list_file)
    values = pq.read_table(list_file, columns=[column]).column(column).to_pylist()
    bad = next((v for v in values if v is not None and not isinstance(v, str)), None)
    if bad is not None:
        raise RecordError(f"column {column!r} must hold strings, found {type(bad).__name__} {bad!r}", list_file)
    return [_list_entry_path(list_file, v.strip()) for v in values if v is not None and v.strip()]


def _list_entry_path(list_file: Path, entry: str) -> str:
    """Relative entries mean 'beside the list', unless only the working directory has them."""
    if os.path.isabs(entry) or is_url(entry):
        return entry
    beside = list_file.parent / entry
    if not beside.exists() and os.path.exists(entry):
        return entry
    return str(beside)


def _expand_one(item: str, recursive: bool, allow_lists: bool, path_column: str = DEFAULT_PATH_COLUMN) -> list[str]:
    if is_url(item):  # kept verbatim: fetched (or refused) by the scorer's decode workers
        return [item]
    path = Path(item)
    if path.is_dir():
        return list_images(path, recursive=recursive)
    if path.is_file():
        suffix = path.suffix.lower()
        if allow_lists and suffix == ".txt":
            return [p for entry in _read_path_list(path) for p in _expand_one(entry, recursive, False)]
        if allow_lists and suffix == ".parquet":
            return [p for entry in _read_parquet_paths(path, path_column)
                    for p in _expand_one(entry, recursive, False)]
        return [item]
    if glob.has_magic(item):
        matches = sorted(glob.glob(item, recursive=True))
        if not matches:
            logger.warning("pattern %r matched nothing", item)
        out: list[str] = []
        for match in matches:
            if os.path.isdir(match):
                out.extend(list_images(match, recursive=recursive))
            elif _is_image_name(match, IMAGE_EXTENSIONS):
                out.append(match)
        return out
    if path.exists():  # a FIFO, socket or device: never opened, reported as an error row by the scorer
        logger.warning("input %r is not a regular file or folder; keeping it so it is reported as an error", item)
    else:
        logger.warning("input %r does not exist; keeping it so it is reported as an error", item)
    return [item]


def expand_inputs(inputs: Sequence[str], recursive: bool, *, path_column: str = DEFAULT_PATH_COLUMN) -> list[str]:
    """Turn CLI-style inputs (files, folders, globs, ``.txt`` / ``.parquet`` path lists, URLs) into a
    de-duplicated path list.

    Missing plain paths are kept on purpose: the scorer turns them into error rows, so a typo shows
    up in the output instead of vanishing. ``path_column`` names the column of Parquet path lists.
    URLs are kept verbatim (``normpath`` would turn ``https://`` into ``https:/``).
    """
    seen: set[str] = set()
    out: list[str] = []
    for item in inputs:
        for path in _expand_one(str(item), recursive, allow_lists=True, path_column=path_column):
            norm = path if is_url(path) else os.path.normpath(path)
            if norm not in seen:
                seen.add(norm)
                out.append(norm)
    return out


# --------------------------------------------------------------------------------------------------
# Shared loader machinery


class _Collector:
    """Records and problems of one label file, so every loader reports drops the same way."""

    def __init__(self, label_file: Path, strict: bool, image_root: Path | None, check_files: bool):
        self.label_file = str(label_file)
        self.strict = strict
        self.image_root = image_root
        self.check_files = check_files
        self.records: list[Record] = []
        self.problems: list[Problem] = []
        self.missing = 0
        self.missing_examples: list[str] = []
        self._seen: dict[str, str] = {}

    def source(self, line: int | str | None) -> str:
        return f"{self.label_file}:{line}" if line is not None else self.label_file

    def bad_row(self, message: str, line: int | None) -> None:
        """A row that cannot be parsed: fatal in strict mode, reported otherwise."""
        if self.strict:
            raise RecordError(message, self.label_file, line)
        self.problem(message, line)

    def problem(self, message: str, line: int | None) -> None:
        self.problems.append(Problem(self.label_file, line, message))

    def locate(self, name: str, line: int | None) -> str | None:
        """Absolute path of a labelled image, or None (and a problem) when it is missing."""
        if not name:
            self.bad_row("empty image path", line)
            return None
        if not self.check_files:
            joined = Path(_native_separators(name))
            return os.path.abspath(joined if self.image_root is None else self.image_root / joined)
        found = resolve_image_path(self.image_root, name)
        if found is None and _native_separators(name) != name:
            found = resolve_image_path(self.image_root, _native_separators(name))
        if found is None:
            self.missing += 1
            if len(self.missing_examples) < 3:
                self.missing_examples.append(name)
            where = f" (looked in {self.image_root})" if self.image_root is not None else ""
            self.problem(f"image not found: {name}{where}", line)
            return None
        return os.path.abspath(found)

    def add(self, record: Record, line: int | None) -> None:
        """Keep a record unless its image was already labelled (duplicates would leak across splits)."""
        first = self._seen.get(record.path)
        if first is not None:
            self.problem(f"duplicate label for {record.path} (first at {first}); keeping the first", line)
            return
        self._seen[record.path] = record.source or self.label_file
        self.records.append(record)

    def dropped(self) -> str:
        """``N rows (M missing images, e.g. x.jpg, y.jpg in ROOT)``: rows, not problems (a row can miss two)."""
        rows = len({(p.line if p.line is not None else -i) for i, p in enumerate(self.problems)})
        text = f"{rows} rows ({self.missing} missing images"
        if self.missing_examples:
            where = f" in {self.image_root}" if self.image_root is not None else ""
            text += f", e.g. {', '.join(self.missing_examples)}{where}"
        return text + ")"

    def finish(self, kind: str, score_range: tuple[float, float]) -> RecordSet:
        if self.problems:
            logger.warning("%s: kept %d records, dropped %s", self.label_file, len(self.records), self.dropped())
        else:
            logger.info("%s: loaded %d %s records", self.label_file, len(self.records), kind)
        return RecordSet(self.records, score_range, kind, self.problems)


def _native_separators(name: str) -> str:
    """Treat ``\\`` as a separator on POSIX: score files written on Windows store ``cats\\a.jpg``."""
    return name.replace("\\", "/") if os.sep == "/" else name


def _parse_float(text: Any) -> float | None:
    """Finite float from a number or numeric string; None for anything else."""
    if isinstance(text, bool):
        return None
    try:
        value = float(text.strip() if isinstance(text, str) else text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def infer_score_range(scores: Sequence[float], label: str = "") -> tuple[float, float]:
    """Narrowest known rating scale holding every score, else the data's own (min, max).

    Predictions are mapped back to this scale, so guessing (1, 10) for data that is really 0..1
    would be badly wrong; picking the tightest standard scale is the least surprising choice.
    """
    if not scores:
        logger.warning("%s: no scores to infer a range from; assuming (0, 1)", label)
        return (0.0, 1.0)
    lo, hi = min(scores), max(scores)
    for scale in KNOWN_SCALES:
        if scale[0] <= lo and hi <= scale[1]:
            logger.info("%s: inferred score range %s from data in [%g, %g]", label, scale, lo, hi)
            return scale
    if lo == hi:
        logger.warning("%s: all scores equal %g; using (%g, %g)", label, lo, lo - 0.5, hi + 0.5)
        return (lo - 0.5, hi + 0.5)
    logger.info("%s: scores in [%g, %g] fit no standard scale; using the data range", label, lo, hi)
    return (lo, hi)


def _check_range(score_range: Sequence[float], scores: Sequence[float], label: str) -> tuple[float, float]:
    lo, hi = float(score_range[0]), float(score_range[1])
    if not lo < hi:
        raise ValueError(f"score_range must be (low, high) with low < high, got {tuple(score_range)}")
    outside = sum(1 for s in scores if not lo <= s <= hi)
    if outside:
        logger.warning("%s: %d scores lie outside the given score_range (%g, %g)", label, outside, lo, hi)
    return (lo, hi)


def _score_range(given: Sequence[float] | None, records: Sequence[Record], label: str) -> tuple[float, float]:
    scores = [r.score for r in records if r.score is not None]
    return _check_range(given, scores, label) if given is not None else infer_score_range(scores, label)


def _default_image_root(label_file: Path, sample: Sequence[str]) -> Path:
    """Folder holding the labelled images when none is given: beside the labels or in ``images/``.

    Both layouts are common (biq2021 and the web-aesthetics sets use ``images/``); we probe a few
    names rather than guess so the choice is right and logged.
    """
    base = label_file.parent
    candidates = [base, base / "images"]
    probe = [name for name in sample if name][:20]
    best, best_hits = base, -1
    for candidate in candidates:
        if not candidate.is_dir():
            continue
        hits = sum(resolve_image_path(candidate, name) is not None for name in probe)
        if hits > best_hits:
            best, best_hits = candidate, hits
    logger.info("%s: no image_root given; using %s", label_file, best)
    return best


def _pick_root(label_file: Path, image_root: str | os.PathLike | None, sample: Sequence[str]) -> Path:
    return Path(image_root) if image_root is not None else _default_image_root(label_file, sample)


def _normalise_split(value: str) -> str | None:
    text = value.strip().lower()
    return SPLIT_ALIASES.get(text, text) if text else None


# --------------------------------------------------------------------------------------------------
# AVA


def _read_id_list(path: str | Path) -> set[str]:
    """Image ids of an AVA split list (``*.jpgl``); tolerates ``123.jpg`` as well as ``123``."""
    ids = set()
    for raw in read_text_file(path, error=RecordError).splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            stem, ext = os.path.splitext(line)
            ids.add(stem if ext.lower() in IMAGE_EXTENSIONS else line)
    return ids


def _parse_ava_row(fields: list[str]) -> tuple[str, list[int], tuple[int, int], int, int] | str:
    """(image_id, counts, tags, challenge, index) or an error message."""
    if len(fields) != AVA_COLUMNS:
        return (
            f"expected {AVA_COLUMNS} space-separated columns "
            f"(index id c1..c10 tag1 tag2 challenge), got {len(fields)}"
        )
    try:
        numbers = [int(x) for x in fields[2:]]
        index = int(fields[0])
    except ValueError:
        return f"expected integers in every column but the image id, got {' '.join(fields)!r}"
    counts = numbers[:10]
    if any(c < 0 for c in counts):
        return f"negative vote count in {counts}"
    return fields[1], counts, (numbers[10], numbers[11]), numbers[12], index


def _ava_split(image_id: str, train: set[str] | None, test: set[str] | None) -> str | None:
    """Official split of an id; '' when the lists exclude it, None when no list was given."""
    if train is None and test is None:
        return None
    in_train = image_id in train if train is not None else image_id not in (test or set())
    in_test = image_id in test if test is not None else image_id not in (train or set())
    if in_train and in_test:
        return "both"
    return "train" if in_train else "test" if in_test else ""


def load_ava(
    path: str | Path,
    image_root: str | Path | None = None,
    *,
    image_ext: str = ".jpg",
    train_list: str | Path | None = None,
    test_list: str | Path | None = None,
    check_files: bool = True,
    strict: bool = True,
) -> RecordSet:
    """Read the original ``AVA.txt`` (vote histograms over 1..10).

    The distribution keeps the full vote shape (EMD training needs it) and the score is its mean.
    With only one of ``train_list``/``test_list`` the other split is its complement; with both,
    ids in neither list are dropped (and counted in the log), as the official protocol does.
    """
    path = Path(path)
    train = _read_id_list(train_list) if train_list is not None else None
    test = _read_id_list(test_list) if test_list is not None else None
    lines = read_text_file(path, error=RecordError).splitlines()
    root = _pick_root(
        path, image_root, [f"{ln.split()[1]}{image_ext}" for ln in lines[:20] if len(ln.split()) > 1]
    )
    out = _Collector(path, strict, root, check_files)
    excluded = 0
    for lineno, raw in enumerate(lines, start=1):
        fields = raw.split()
        if not fields:
            continue
        parsed = _parse_ava_row(fields)
        if isinstance(parsed, str):
            out.bad_row(parsed, lineno)
            continue
        image_id, counts, tags, challenge, index = parsed
        total = sum(counts)
        if total == 0:
            out.problem(f"image {image_id} has zero votes", lineno)
            continue
        split = _ava_split(image_id, train, test)
        if split == "":
            excluded += 1
            continue
        if split == "both":
            out.problem(f"image {image_id} is in both the train and the test list", lineno)
            continue
        located = out.locate(f"{image_id}{image_ext}", lineno)
        if located is None:
            continue
        distribution = tuple(c / total for c in counts)
        score = sum((i + 1) * p for i, p in enumerate(distribution))
        extra = {"image_id": image_id, "index": index, "votes": total, "tags": tags, "challenge": challenge}
        record = Record(located, score, distribution, 1.0, split, out.source(lineno), extra)
        out.add(record, lineno)
    if excluded:
        logger.info("%s: %d images are in neither split list and were dropped", path, excluded)
    return out.finish("ava", (1.0, 10.0))


# --------------------------------------------------------------------------------------------------
# MOS / CSV tables


def _sniff_delimiter(header_line: str, path: Path) -> str:
    counts = {d: header_line.count(d) for d in _DELIMITERS}
    if path.suffix.lower() == ".tsv" and counts["\t"]:
        return "\t"
    best = max(_DELIMITERS, key=lambda d: counts[d])
    if counts[best] == 0:
        raise RecordError(
            f"cannot tell the delimiter: the header {header_line!r} has a single column "
            "(expected comma, tab or semicolon separated columns)",
            path,
            1,
        )
    return best


def _read_table(path: Path, delimiter: str | None) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """Header and (line number, stripped cells) rows of a delimited text file."""
    with io.StringIO(read_text_file(path, error=RecordError), newline="") as handle:
        first = handle.readline()
        if not first.strip():
            raise RecordError("empty file or empty header line; a header row is required", path, 1)
        delim = delimiter or _sniff_delimiter(first, path)
        handle.seek(0)
        reader = csv.reader(handle, delimiter=delim)
        header = [cell.strip() for cell in next(reader)]
        rows = [(reader.line_num, [cell.strip() for cell in row]) for row in reader if row]
    return header, rows


def _find_column(
    header: Sequence[str], wanted: str | int | None, candidates: Sequence[str], role: str, path: Path
) -> int:
    """Index of a column chosen explicitly (name or index) or auto-detected from common names."""
    lowered = [h.lower() for h in header]
    if isinstance(wanted, int):
        if 0 <= wanted < len(header):
            return wanted
        raise RecordError(f"{role} column index {wanted} out of range for header {list(header)}", path, 1)
    names = [wanted.lower()] if wanted is not None else [c.lower() for c in candidates]
    for name in names:
        if name in lowered:
            return lowered.index(name)
    hint = f"{wanted!r}" if wanted is not None else f"one of {list(candidates)}"
    raise RecordError(
        f"no {role} column: expected {hint}, header is {list(header)}; pass the column name explicitly",
        path,
        1,
    )


def _optional_column(header: Sequence[str], wanted: str | int | None, role: str, path: Path) -> int | None:
    return None if wanted is None else _find_column(header, wanted, (), role, path)


@dataclass(frozen=True)
class _Columns:
    path: int
    score: int
    split: int | None
    weight: int | None


def _table_record(row: list[str], cols: _Columns, header: list[str], lineno: int, out: _Collector) -> None:
    """Validate one table row and add it as a record (or report why not)."""
    if len(row) != len(header):
        out.bad_row(f"expected {len(header)} columns like the header {header}, got {len(row)}: {row}", lineno)
        return
    score = _parse_float(row[cols.score])
    if score is None:
        out.bad_row(
            f"column {header[cols.score]!r}: expected a finite number, got {row[cols.score]!r}", lineno
        )
        return
    weight = 1.0
    if cols.weight is not None:
        parsed = _parse_float(row[cols.weight])
        if parsed is None or parsed < 0:
            out.bad_row(
                f"column {header[cols.weight]!r}: expected a weight >= 0, got {row[cols.weight]!r}", lineno
            )
            return
        weight = parsed
    split = None if cols.split is None else _normalise_split(row[cols.split])
    located = out.locate(row[cols.path], lineno)
    if located is None:
        return
    used = {cols.path, cols.score, cols.split, cols.weight}
    extra = {name: value for i, (name, value) in enumerate(zip(header, row, strict=True)) if i not in used}
    out.add(Record(located, score, None, weight, split, out.source(lineno), extra), lineno)


def _load_table(
    path: Path,
    image_root: str | Path | None,
    columns: Mapping[str, str | int | None],
    delimiter: str | None,
    check_files: bool,
    strict: bool,
) -> _Collector:
    header, rows = _read_table(path, delimiter)
    path_col = _find_column(header, columns.get("path"), PATH_COLUMNS, "image path", path)
    score_col = _find_column(header, columns.get("score"), SCORE_COLUMNS, "score", path)
    if path_col == score_col:
        raise RecordError(f"image path and score resolve to the same column {header[path_col]!r}", path, 1)
    cols = _Columns(
        path_col,
        score_col,
        _optional_column(header, columns.get("split"), "split", path),
        _optional_column(header, columns.get("weight"), "weight", path),
    )
    logger.info("%s: image column %r, score column %r", path, header[path_col], header[score_col])
    if header[score_col].lower() == "dmos":
        logger.warning("%s: column 'dmos' is a difference score: lower means better quality", path)
    sample = [row[path_col] for _, row in rows[:20] if len(row) > path_col]
    out = _Collector(path, strict, _pick_root(path, image_root, sample), check_files)
    for lineno, row in rows:
        _table_record(row, cols, header, lineno, out)
    return out


def load_mos_table(
    path: str | Path,
    image_root: str | Path | None = None,
    *,
    path_column: str | int | None = None,
    score_column: str | int | None = None,
    delimiter: str | None = None,
    score_range: Sequence[float] | None = None,
    split_column: str | int | None = None,
    weight_column: str | int | None = None,
    check_files: bool = True,
    strict: bool = True,
) -> RecordSet:
    """Read a CSV/TSV/semicolon table of per-image mean opinion scores (header row required).

    Columns not used for path/score/split/weight are kept as strings in ``Record.extra``
    (std, rating counts…).  Without ``image_root`` images are looked for beside the table, then
    in an ``images/`` folder next to it.
    """
    path = Path(path)
    columns = {"path": path_column, "score": score_column, "split": split_column, "weight": weight_column}
    out = _load_table(path, image_root, columns, delimiter, check_files, strict)
    return out.finish("mos", _score_range(score_range, out.records, str(path)))


# --------------------------------------------------------------------------------------------------
# Personal A/B scores


def _personal_entries(data: Any, path: Path) -> list[tuple[str, Any, Any, Any]]:
    """(key, relative path, score, comparisons) from any of the image_comparison JSON layouts."""
    if not isinstance(data, dict):
        raise RecordError(f"expected a JSON object, got {type(data).__name__}", path)
    if "ImageRecords" in data:
        records = data["ImageRecords"]
        if not isinstance(records, dict):
            raise RecordError("'ImageRecords' must be an object mapping paths to entries", path)
        entries = []
        for key, entry in records.items():
            if not isinstance(entry, dict):
                raise RecordError(f"ImageRecords[{key!r}]: expected an object, got {entry!r}", path)
            rel = entry.get("relative_path") or entry.get("relative_filepath") or key
            entries.append((key, rel, entry.get("score"), entry.get("comparisons")))
        return entries
    entries = []
    for key, value in data.items():
        if isinstance(value, list):  # legacy {"path": [score, comparisons]}
            score = value[0] if value else None
            entries.append((key, key, score, value[1] if len(value) > 1 else None))
        else:  # legacy {"path": score}
            entries.append((key, key, value, None))
    return entries


def _parse_comparisons(raw: Any) -> int | None:
    value = _parse_float(raw)
    return int(value) if value is not None and value >= 0 and value == int(value) else None


def _load_personal_json(
    path: Path, image_root: str | Path | None, check_files: bool, strict: bool
) -> _Collector:
    try:
        data = json.loads(read_text_file(path, error=RecordError))
    except json.JSONDecodeError as exc:
        raise RecordError(f"invalid JSON: {exc.msg} (column {exc.colno})", path, exc.lineno) from exc
    entries = _personal_entries(data, path)
    root = Path(image_root) if image_root is not None else path.parent
    out = _Collector(path, strict, root, check_files)
    for key, rel, raw_score, raw_comparisons in entries:
        score = _parse_float(raw_score)
        if score is None:
            out.bad_row(f"entry {key!r}: score must be a number, got {raw_score!r}", None)
            continue
        comparisons = None if raw_comparisons is None else _parse_comparisons(raw_comparisons)
        if raw_comparisons is not None and comparisons is None:
            out.bad_row(
                f"entry {key!r}: comparisons must be a non-negative integer, got {raw_comparisons!r}", None
            )
            continue
        located = out.locate(str(rel), None)
        if located is None:
            continue
        extra = {"key": key} if comparisons is None else {"key": key, "comparisons": comparisons}
        out.add(Record(located, score, source=f"{path}#{key}", extra=extra), None)
    return out


def _load_personal_csv(
    path: Path, image_root: str | Path | None, check_files: bool, strict: bool
) -> _Collector:
    header, _ = _read_table(path, None)
    lowered = {h.lower() for h in header}
    columns = {
        "path": "relative_path",
        "score": "score",
        "split": "split" if "split" in lowered else None,
        "weight": "weight" if "weight" in lowered else None,
    }
    root = Path(image_root) if image_root is not None else path.parent
    out = _load_table(path, root, columns, None, check_files, strict)
    out.records = [_with_int_comparisons(r) for r in out.records]
    return out


def _with_int_comparisons(record: Record) -> Record:
    """CSV extras are strings; make ``comparisons`` an int like the JSON loader does."""
    raw = record.extra.get("comparisons")
    parsed = _parse_comparisons(raw) if raw is not None else None
    if parsed is None:
        return record
    return Record(
        record.path,
        record.score,
        record.distribution,
        record.weight,
        record.split,
        record.source,
        {**record.extra, "comparisons": parsed},
    )


def load_personal_scores(
    path: str | Path,
    image_root: str | Path | None = None,
    *,
    check_files: bool = True,
    score_range: Sequence[float] | None = None,
    strict: bool = True,
) -> RecordSet:
    """Read scores saved by the ``image_comparison`` A/B tool (JSON, legacy JSON or CSV).

    The tool stores numbers as strings; they are parsed and garbage is reported by key.  Image
    paths are relative to ``image_root``, which defaults to the score file's folder.  Scores are
    Elo-like, so the range is the data's own unless they happen to fit a standard scale.
    """
    path = Path(path)
    if path.suffix.lower() == ".json":
        out = _load_personal_json(path, image_root, check_files, strict)
    else:
        out = _load_personal_csv(path, image_root, check_files, strict)
    return out.finish("personal", _score_range(score_range, out.records, str(path)))


# --------------------------------------------------------------------------------------------------
# Folders and dispatch


def load_folder(root: str | Path, *, recursive: bool = True) -> RecordSet:
    """Unlabelled records for every image under ``root`` (scoring, or feature caching)."""
    records = [Record(os.path.abspath(p), source=p) for p in list_images(root, recursive=recursive)]
    return RecordSet(records, (0.0, 1.0), "folder", [])


def _looks_like_ava(path: Path) -> bool:
    for raw in read_text_file(path, error=RecordError).splitlines():
        fields = raw.split()
        if fields:
            return len(fields) == AVA_COLUMNS and all(_parse_float(f) is not None for f in fields)
    return False


def _header_starts_with_relative_path(path: Path) -> bool:
    text = read_text_file(path, error=RecordError)
    return text.split("\n", 1)[0].strip().lower().startswith("relative_path")


def detect_format(path: str | Path) -> str:
    """Label format of ``path``: 'ava', 'mos', 'personal' or 'folder'."""
    path = Path(path)
    suffix = path.suffix.lower()
    if path.is_dir():
        return "folder"
    if not path.is_file():
        raise RecordError("label file not found", path)
    if suffix == ".json":
        return "personal"
    if suffix in (".csv", ".tsv"):
        return "personal" if _header_starts_with_relative_path(path) else "mos"
    if suffix == ".txt" and _looks_like_ava(path):
        return "ava"
    raise RecordError(
        "cannot detect the label format: expected AVA .txt (15 numeric columns), .json (personal scores), "
        ".csv/.tsv (MOS or personal) or a folder; pass format= explicitly",
        path,
    )


def load_records(path: str | Path, format: str = "auto", **kwargs: Any) -> RecordSet:
    """Load any label source that gives records (:data:`~tastelab.io.registries.LABEL_FORMATS` entries
    with ``reads="records"``); ``format='auto'`` decides from extension and content."""
    fmt = detect_format(path) if format == "auto" else format
    try:
        LABEL_FORMATS.checker(reads="records")(fmt)
    except ValueError as exc:
        raise ValueError(f"{exc} (or 'auto')") from None
    logger.debug("loading %s as %s", path, fmt)
    rs: RecordSet = LABEL_FORMATS.get(fmt)(path, **kwargs)
    return rs
