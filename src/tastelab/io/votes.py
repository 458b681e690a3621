"""A/B votes: the one vote record (:class:`Vote`), its one reader and its one writer.

Format: a CSV (or tab / semicolon separated) table with the header ``image_a,image_b,votes_a,votes_b`` and
optionally ``seconds`` (extra columns are allowed and kept), one judgement per line: ``1,0`` a wins, ``0,1``
b wins, ``0.5,0.5`` a tie, ``2,1`` three raters who split; ``seconds`` is how long the rater looked before
answering (empty when unknown). Image names are relative to the table's folder (or an ``images/`` folder
beside it, or a given ``image_root``), ``/`` separated.

One vote is one line. The writer refuses names with a line break, so no vote spans two lines, and the reader
relies on it: each physical line is parsed on its own (:func:`read_vote_table`), so a damaged line (an
unterminated quote from a hand edit) is one unusable row reported as ``file:line`` and can never swallow the
votes after it.

Reading (:func:`load_votes`): rows are validated (unparsable rows raise :class:`~tastelab.io.records.RecordError`,
or become :class:`~tastelab.io.records.Problem` entries with ``strict=False``; self-pairs, negative or all-zero
votes and missing images are always dropped and reported) and image names are resolved to absolute paths.

Writing: :class:`VotesLog` is the labelling app's append-only file. A vote is one ``write`` of one complete
line to the file opened for appending, then ``fsync`` before the caller answers, so an acknowledged vote
survives a crash or power loss. Undo removes the last row by rewriting the whole file to a temp file (fsynced)
and ``os.replace``-ing it over the original: at every instant the file on disk is the old or the new version,
never a mix. :func:`write_votes` writes a whole table the same way (same encoding, same atomic replace).

Replay: :class:`VotesLog` reads its rows back in order. A last line without its newline can only be a write
torn by a power cut (every write ends with one), so it is cut off with a warning. Rows that are not usable
votes stay in the file as they are (nothing is thrown away) but carry no :attr:`VoteLine.vote`.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath

from tastelab.core.errors import UserError
from tastelab.io.records import Problem, RecordError, _Collector, _pick_root
from tastelab.io.textfiles import read_text_file

logger = logging.getLogger(__name__)

#: The columns every votes table has (any order, any case).
COLUMNS: tuple[str, str, str, str] = ("image_a", "image_b", "votes_a", "votes_b")
#: Header of a new votes file: the required columns plus the answer time.
NEW_HEADER: tuple[str, ...] = (*COLUMNS, "seconds")
_DELIMITERS = (",", "\t", ";")


@dataclass(frozen=True)
class Vote:
    """One A/B judgement between two images.

    ``votes_a`` / ``votes_b`` are counts and may be fractional (``0.5, 0.5`` is a tie); ``seconds`` is the
    answer time (speed weighting; None when unknown); ``source`` says where the vote was read (``file:line``).
    """

    image_a: str
    image_b: str
    votes_a: float = 1.0
    votes_b: float = 0.0
    seconds: float | None = None
    source: str | None = None


@dataclass(frozen=True)
class VoteLine:
    """One data line of a votes table as read: where it is, its cells as written, and the vote it holds.

    ``vote`` is None when the line is not a usable vote; ``problem`` then says why, and ``malformed`` tells a
    line that cannot be parsed (wrong column count, not numbers, not valid CSV) from one that parses but cannot
    count (self-pair, negative or zero votes). ``raw`` is the line itself when it is not valid CSV on its own
    (kept verbatim on rewrite); ``line`` is 1-based (0: appended by this process).
    """

    line: int
    cells: tuple[str, ...]
    vote: Vote | None
    problem: str | None = None
    malformed: bool = False
    raw: str | None = None


@dataclass
class VoteTable:
    """A votes table as read: header, delimiter, where the columns are, and its data lines in file order."""

    path: Path
    header: list[str]
    delimiter: str
    index: tuple[int, int, int, int]
    seconds: int | None
    lines: list[VoteLine]


# -------------------------------------------------------------------------------------------------- reading


def _number(text: str) -> float | None:
    """A finite float, or None (``nan``, ``inf`` and words are not vote counts)."""
    try:
        value = float(text.strip())
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _split(line: str, delimiter: str) -> list[str] | None:
    """The cells of one physical line, or None when the line is not valid CSV by itself."""
    try:
        rows = list(csv.reader([line], delimiter=delimiter, strict=True))
    except csv.Error:
        return None
    return rows[0] if len(rows) == 1 else [] if not rows else None


def _not_utf8(line: str) -> bool:
    """Whether a line read with ``surrogateescape`` held bytes that are not UTF-8."""
    return any("\udc80" <= ch <= "\udcff" for ch in line)


def _delimiter(first: str, path: Path) -> str:
    counts = {d: first.count(d) for d in _DELIMITERS}
    if path.suffix.lower() == ".tsv" and counts["\t"]:
        return "\t"
    return max(_DELIMITERS, key=lambda d: counts[d])


def _parse_line(cells: list[str], table: VoteTable, lineno: int) -> VoteLine:
    fields = tuple(cells)
    header = table.header
    if len(cells) != len(header):
        return VoteLine(lineno, fields, None, f"expected {len(header)} columns like the header {header}, "
                        f"got {len(cells)}: {cells}", malformed=True)
    ia, ib, iva, ivb = table.index
    name_a, name_b = cells[ia].strip(), cells[ib].strip()
    raw_a, raw_b = cells[iva].strip(), cells[ivb].strip()
    votes_a, votes_b = _number(raw_a), _number(raw_b)
    if votes_a is None or votes_b is None:
        return VoteLine(lineno, fields, None, f"votes must be numbers, got votes_a={raw_a!r} votes_b={raw_b!r}",
                        malformed=True)
    if not name_a or not name_b:
        return VoteLine(lineno, fields, None, "empty image path", malformed=True)
    if votes_a < 0 or votes_b < 0:
        return VoteLine(lineno, fields, None, f"negative votes ({votes_a:g}, {votes_b:g}) for {name_a} vs {name_b}")
    if votes_a + votes_b == 0:
        return VoteLine(lineno, fields, None, f"no votes for {name_a} vs {name_b}")
    if name_a == name_b:
        return VoteLine(lineno, fields, None, f"image compared with itself: {name_a}")
    seconds = None
    if table.seconds is not None:
        parsed = _number(cells[table.seconds])
        seconds = parsed if parsed is not None and parsed > 0 else None
    vote = Vote(name_a, name_b, votes_a, votes_b, seconds, f"{table.path}:{lineno}")
    return VoteLine(lineno, fields, vote)


def read_vote_table(path: str | os.PathLike) -> VoteTable:
    """Read a votes table line by line (see the module docstring); every data line becomes a :class:`VoteLine`.

    Raises :class:`~tastelab.io.records.RecordError` (naming the file) when the header is empty or lacks a
    required column. Blank lines are skipped. Image names are returned as written (stripped), not resolved.
    """
    path = Path(path)
    # Regular files only (a FIFO would block); bytes that are not UTF-8 stay as lone surrogates, so they damage
    # only their own line (below) and survive a rewrite verbatim (_encode).
    text = read_text_file(path, errors="surrogateescape", error=RecordError)
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the newline ending the last row
    first = lines[0].rstrip("\r") if lines else ""
    if _not_utf8(first):
        raise RecordError("not UTF-8 text in the header line", path, 1)
    if not first.strip():
        raise RecordError("empty file or empty header line; a header row is required", path, 1)
    delimiter = _delimiter(first, path)
    header = [cell.strip() for cell in (_split(first, delimiter) or [])]
    lowered = [h.lower() for h in header]
    missing = [c for c in COLUMNS if c not in lowered]
    if missing:
        raise RecordError(f"not a votes table: the header {header} lacks {missing} (expected "
                          f"{','.join(COLUMNS)}[,seconds])", path, 1)
    table = VoteTable(path, header, delimiter, tuple(lowered.index(c) for c in COLUMNS),  # type: ignore[arg-type]
                      lowered.index("seconds") if "seconds" in lowered else None, [])
    for lineno, line in enumerate(lines[1:], start=2):
        line = line.rstrip("\r")
        if _not_utf8(line):  # one damaged line: one bad row, kept verbatim
            table.lines.append(VoteLine(lineno, (), None, "not UTF-8 text", malformed=True, raw=line))
            continue
        cells = _split(line, delimiter)
        if cells is None:  # not valid CSV on its own (an unterminated quote): one bad row, nothing swallowed
            table.lines.append(VoteLine(lineno, (), None, f"not a valid CSV line: {line[:200]!r}", malformed=True,
                                        raw=line))
            continue
        if not cells or all(not cell.strip() for cell in cells):
            continue
        table.lines.append(_parse_line(cells, table, lineno))
    return table


def votes_image_root(path: str | os.PathLike, image_root: str | os.PathLike | None = None) -> Path:
    """The folder :func:`load_votes` resolves the table's image names against (given, or found as it finds it)."""
    return _image_root(read_vote_table(path), image_root)


def _image_root(table: VoteTable, image_root: str | os.PathLike | None) -> Path:
    ia, ib = table.index[:2]
    sample = [line.cells[i].strip() for line in table.lines[:10] if len(line.cells) == len(table.header)
              for i in (ia, ib)]
    return _pick_root(table.path, image_root, sample)


def load_votes(
    path: str | os.PathLike,
    image_root: str | os.PathLike | None = None,
    *,
    check_files: bool = True,
    strict: bool = True,
) -> tuple[list[Vote], list[Problem]]:
    """Read an ``image_a,image_b,votes_a,votes_b[,seconds]`` table of A/B judgements, in file order.

    Unparsable rows raise :class:`~tastelab.io.records.RecordError` as ``file:line: why`` (``strict``) or
    become problems; self-pairs, negative or all-zero votes and missing images are always dropped and
    reported. Image names become absolute paths, resolved against ``image_root`` (default: the table's folder
    or an ``images/`` folder beside it); ``check_files=False`` joins them without looking at the disk.
    An empty or unparsable answer time means "unknown" (full weight in speed weighting).
    """
    table = read_vote_table(path)
    out = _Collector(table.path, strict, _image_root(table, image_root), check_files)
    votes: list[Vote] = []
    for line in table.lines:
        if line.vote is None:
            if line.malformed:
                out.bad_row(line.problem or "not a vote", line.line)
            else:
                out.problem(line.problem or "not a vote", line.line)
            continue
        v = line.vote
        path_a, path_b = out.locate(v.image_a, line.line), out.locate(v.image_b, line.line)
        if path_a is None or path_b is None:
            continue
        if path_a == path_b:
            out.problem(f"image compared with itself: {v.image_a} and {v.image_b} are the same file", line.line)
            continue
        votes.append(Vote(path_a, path_b, v.votes_a, v.votes_b, v.seconds, v.source))
    if out.problems:
        logger.warning("%s: kept %d votes, dropped %s", table.path, len(votes), out.dropped())
    else:
        logger.info("%s: loaded %d votes", table.path, len(votes))
    return votes, out.problems


# -------------------------------------------------------------------------------------------------- writing


def format_votes(value: float) -> str:
    """``1``, ``0``, ``0.5``: short and exact for the values the app writes."""
    return f"{value:g}"


def _encode(rows: Iterable[Sequence[str] | str], delimiter: str = ",") -> bytes:
    """CSV lines for ``rows``, one per row; a ``str`` is a damaged line kept verbatim (never re-interpreted).

    A cell with a line break is refused: it would make one vote span two lines, which the reader (one line at
    a time) would then see as two damaged rows.
    """
    buf = io.StringIO()
    writer = csv.writer(buf, delimiter=delimiter, lineterminator="\n")
    for row in rows:
        if isinstance(row, str):
            buf.write(row + "\n")
            continue
        bad = next((cell for cell in row if "\n" in cell or "\r" in cell), None)
        if bad is not None:
            raise ValueError(f"a votes file holds one vote per line; {bad!r} contains a line break")
        writer.writerow(row)
    return buf.getvalue().encode("utf-8", "surrogateescape")  # a damaged line's own bytes, back as they were


def _fsync_dir(path: Path) -> None:
    """Make a created or replaced directory entry durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _replace(path: Path, data: bytes) -> None:
    """Write ``data`` to a temp file beside ``path``, fsync it, ``os.replace`` it over ``path``, fsync the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with tmp.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def portable_relative(image: str, root: Path) -> str:
    """``image`` relative to ``root`` with ``/`` separators; non-absolute names are taken as relative."""
    if not os.path.isabs(image):
        return PurePath(image).as_posix()
    try:
        return PurePath(os.path.relpath(image, os.path.abspath(root))).as_posix()
    except ValueError:  # another drive (Windows): keep it absolute
        return PurePath(image).as_posix()


def vote_cells(vote: Vote, header: Sequence[str] = NEW_HEADER) -> list[str]:
    """The cells of one vote in ``header``'s column order (columns it does not know stay empty)."""
    lowered = [h.lower() for h in header]
    cells = [""] * len(header)
    values = (vote.image_a, vote.image_b, format_votes(vote.votes_a), format_votes(vote.votes_b))
    for column, value in zip(COLUMNS, values):
        cells[lowered.index(column)] = value
    if "seconds" in lowered and vote.seconds is not None:
        cells[lowered.index("seconds")] = f"{vote.seconds:.3f}"
    return cells


def write_votes(path: str | os.PathLike, votes: Iterable[Vote], *, relative_to: str | os.PathLike | None = None,
                ) -> None:
    """Write votes as a new ``image_a,image_b,votes_a,votes_b,seconds`` table (atomic; :func:`load_votes` reads it).

    Paths are written relative to ``relative_to`` (default: the file's folder), like score files.
    """
    path = Path(path)
    root = Path(relative_to) if relative_to is not None else path.parent
    rows = [vote_cells(Vote(portable_relative(v.image_a, root), portable_relative(v.image_b, root),
                            v.votes_a, v.votes_b, v.seconds)) for v in votes]
    _replace(path, _encode([list(NEW_HEADER), *rows]))


class VotesLog:
    """The labelling app's append-only votes file with atomic undo; its lines are held in memory, in file order.

    An existing file keeps its own columns and delimiter (a plain four-column file stays one).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.rows: list[VoteLine] = []
        self.header: list[str] = list(NEW_HEADER)
        self.delimiter = ","
        self._open()

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists() or self.path.stat().st_size == 0:
            self._rewrite([])
            logger.info("%s: new votes file", self.path)
            return
        self._cut_torn_tail()
        try:
            table = read_vote_table(self.path)
        except RecordError as exc:
            raise ValueError(f"{exc}; pass another --votes") from exc
        self.header, self.delimiter, self.rows = table.header, table.delimiter, table.lines
        bad = [row for row in self.rows if row.vote is None]
        for row in bad[:5]:
            logger.warning("%s:%d: %s; kept in the file, not applied", self.path, row.line, row.problem)
        if bad:
            shown = ", ".join(f"{self.path}:{row.line}" for row in bad[:5]) + (" …" if len(bad) > 5 else "")
            logger.warning("%s: %d rows are not usable votes (%s); they stay in the file but are not applied",
                           self.path, len(bad), shown)
        logger.info("%s: %d votes read", self.path, len(self.rows))

    def _cut_torn_tail(self) -> None:
        """Drop a last line without a newline: the remains of a write interrupted by a crash."""
        with self.path.open("rb+") as f:
            data = f.read()
            if data.endswith(b"\n"):
                return
            keep = data.rfind(b"\n") + 1
            if keep == 0:  # not even a complete header: start over
                logger.warning("%s: no complete header line (%r); starting a new votes file", self.path, data[:200])
                f.seek(0)
                f.truncate(0)
                f.write(_encode([list(self.header)], self.delimiter))
                f.flush()
                os.fsync(f.fileno())
                return
            logger.warning("%s: dropped an incomplete last line left by an interrupted write: %r", self.path,
                           data[keep:][:200].decode("utf-8", "replace"))
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())

    def append(self, a: str, b: str, votes_a: float, votes_b: float, seconds: float | None = None) -> VoteLine:
        """Append one vote durably (one write, fsync); on failure the file is left as it was."""
        vote = Vote(a, b, votes_a, votes_b, seconds)
        cells = vote_cells(vote, self.header)
        data = _encode([cells], self.delimiter)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            try:
                written = os.write(fd, data)
                if written != len(data):  # a short write (disk full): never leave half a row behind
                    raise OSError(f"short write to {self.path} ({written} of {len(data)} bytes)")
                os.fsync(fd)
            except OSError:
                try:
                    os.ftruncate(fd, size)
                except OSError:
                    logger.exception("%s: could not cut a partly written vote; it is dropped on restart", self.path)
                raise
        finally:
            os.close(fd)
        row = VoteLine(0, tuple(cells), vote)
        self.rows.append(row)
        return row

    def pop(self) -> VoteLine:
        """Remove the last row: the whole file is rewritten atomically without it."""
        if not self.rows:
            raise IndexError("no vote to undo")
        self._rewrite([r.raw if r.raw is not None else list(r.cells) for r in self.rows[:-1]])
        return self.rows.pop()

    def _rewrite(self, rows: list[list[str] | str]) -> None:
        _replace(self.path, _encode([list(self.header), *rows], self.delimiter))


def load_training_votes(path: str | os.PathLike, image_root: str | os.PathLike | None = None,
                        limit: int | None = None) -> list[Vote]:
    """The votes a recipe trains on: :func:`load_votes`, dropped rows logged (a warning naming the first),
    the first ``limit`` kept; none left is a one-line :class:`UserError`. One rule for the quality trainer's
    pairwise data and the select recipe (personal/recipe.py)."""
    comps, problems = load_votes(path, image_root)
    if problems:
        logger.warning("%s: %d vote rows skipped (first: %s)", path, len(problems), problems[0])
    if limit is not None:
        comps = comps[:limit]
    if not comps:
        raise UserError(f"{path}: no usable comparisons")
    return comps
