"""The votes file: the labelling session's source of truth.

Format: a CSV with the header ``image_a,image_b,votes_a,votes_b,seconds`` (paths relative to the image folder,
``/`` separated), one judgement per row: ``1,0`` a wins, ``0,1`` b wins, ``0.5,0.5`` a tie; ``seconds`` is how
long the rater looked before answering (empty when unknown). It is what
:func:`tastelab.io.records.load_comparisons` reads (extra columns are ignored there) and what
:func:`tastelab.pairwise.ratings.load_votes` reads with the times (speed weighting), so the labels feed
pairwise training as they are. An existing file keeps its own columns: a plain four-column file stays one.

Durability: a vote is one ``write`` of one complete line to the file opened for appending, then flush and
``fsync`` before the caller answers the HTTP request, so an acknowledged vote survives a crash or power
loss. Undo removes the last row by rewriting the whole file to a temp file (fsynced) and ``os.replace``-ing
it over the original: at every instant the file on disk is either the old or the new version, never a mix.
Between undos the file only ever grows.

One vote is one line: the app's image names never contain a line break (the index refuses control
characters) and cells are quoted by :mod:`csv` where needed, so no vote spans two lines. Reading relies on it:
each physical line is parsed on its own, so a damaged line (an unterminated quote from a hand edit) is one
unusable row, reported as ``file:line``, and can never swallow the votes after it.

Replay: on start the rows are read back in order. A last line without its newline can only be a write torn
by a power cut (every write ends with one), so it is cut off with a warning. Rows naming images that are not
in the folder any more, or with unusable numbers, or damaged lines, stay in the file as they are (nothing is
thrown away) but are not applied to the ranking.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

COLUMNS: tuple[str, str, str, str] = ("image_a", "image_b", "votes_a", "votes_b")
#: Header of a new votes file: the required columns plus the answer time.
NEW_HEADER: tuple[str, ...] = (*COLUMNS, "seconds")
_DELIMITERS = (",", "\t", ";")


@dataclass(frozen=True)
class VoteRow:
    """One row of the votes file; ``fields`` are the row's cells in the file's column order."""

    image_a: str
    image_b: str
    votes_a: float | None
    votes_b: float | None
    fields: tuple[str, ...]
    #: 1-based line in the file (0: appended by this process); ``raw``: the line itself when it is not valid CSV
    line: int = 0
    raw: str | None = None


def format_votes(value: float) -> str:
    """``1``, ``0``, ``0.5``: short and exact for the values the app writes."""
    return f"{value:g}"


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


def _parse_number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if value >= 0 and value != float("inf") else None


class VotesLog:
    """Append-only votes CSV with atomic undo; holds the parsed rows in memory, in file order."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.rows: list[VoteRow] = []
        self.header: list[str] = list(NEW_HEADER)
        self.delimiter = ","
        self._index: tuple[int, int, int, int] = (0, 1, 2, 3)
        self._seconds: int | None = 4
        self._open()

    # ---------------------------------------------------------------------------------------------- reading

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists() or self.path.stat().st_size == 0:
            self._rewrite([])
            logger.info("%s: new votes file", self.path)
            return
        self._cut_torn_tail()
        text = self.path.read_text(encoding="utf-8-sig")
        lines = text.split("\n")
        if lines and lines[-1] == "":
            lines.pop()  # the newline ending the last row
        first = lines[0].rstrip("\r") if lines else ""
        counts = {d: first.count(d) for d in _DELIMITERS}
        self.delimiter = max(_DELIMITERS, key=lambda d: counts[d])
        header = [cell.strip() for cell in (self._split(first) or [])]
        lowered = [h.lower() for h in header]
        missing = [c for c in COLUMNS if c not in lowered]
        if missing:
            raise ValueError(
                f"{self.path}: not a votes file: header {header} lacks {missing} "
                f"(expected {','.join(COLUMNS)}); pass another --votes"
            )
        self.header = header
        self._index = tuple(lowered.index(c) for c in COLUMNS)  # type: ignore[assignment]
        self._seconds = lowered.index("seconds") if "seconds" in lowered else None
        bad: list[int] = []
        for lineno, line in enumerate(lines[1:], start=2):
            line = line.rstrip("\r")
            row = self._split(line)
            if row is None:  # not valid CSV on its own (an unterminated quote): one bad row, nothing swallowed
                logger.warning("%s:%d: not a valid CSV line (%r); kept in the file, not applied", self.path, lineno,
                               line[:200])
                self.rows.append(VoteRow("", "", None, None, (), lineno, line))
                bad.append(lineno)
                continue
            if not row or all(not cell.strip() for cell in row):
                continue
            parsed = self._parse(row, lineno)
            if parsed.votes_a is None:
                bad.append(lineno)
            self.rows.append(parsed)
        if bad:
            shown = ", ".join(f"{self.path}:{n}" for n in bad[:5]) + (" …" if len(bad) > 5 else "")
            logger.warning("%s: %d rows are not usable votes (%s); they stay in the file but are not applied",
                           self.path, len(bad), shown)
        logger.info("%s: %d votes read", self.path, len(self.rows))

    def _split(self, line: str) -> list[str] | None:
        """The cells of one physical line, or None when the line is not valid CSV by itself."""
        try:
            rows = list(csv.reader([line], delimiter=self.delimiter, strict=True))
        except csv.Error:
            return None
        return rows[0] if len(rows) == 1 else [] if not rows else None

    def _parse(self, row: list[str], lineno: int = 0) -> VoteRow:
        fields = tuple(row)
        if len(row) != len(self.header):
            return VoteRow("", "", None, None, fields, lineno)
        ia, ib, iva, ivb = self._index
        va, vb = _parse_number(row[iva].strip()), _parse_number(row[ivb].strip())
        if va is None or vb is None or va + vb <= 0:
            va = vb = None
        return VoteRow(row[ia].strip(), row[ib].strip(), va, vb, fields, lineno)

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
                f.write(self._encode([list(self.header)]))
                f.flush()
                os.fsync(f.fileno())
                return
            logger.warning("%s: dropped an incomplete last line left by an interrupted write: %r", self.path,
                           data[keep:][:200].decode("utf-8", "replace"))
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())

    # ---------------------------------------------------------------------------------------------- writing

    def _encode(self, rows: list[list[str] | str]) -> bytes:
        """CSV lines for ``rows``; a ``str`` is a damaged line kept verbatim (it is never re-interpreted)."""
        buf = io.StringIO()
        writer = csv.writer(buf, delimiter=self.delimiter, lineterminator="\n")
        for row in rows:
            if isinstance(row, str):
                buf.write(row + "\n")
            else:
                writer.writerow(row)
        return buf.getvalue().encode("utf-8")

    def _cells(self, a: str, b: str, votes_a: float, votes_b: float, seconds: float | None) -> list[str]:
        cells = [""] * len(self.header)  # extra columns of a user's file stay empty
        for i, value in zip(self._index, (a, b, format_votes(votes_a), format_votes(votes_b))):
            cells[i] = value
        if self._seconds is not None and seconds is not None:
            cells[self._seconds] = f"{seconds:.3f}"
        return cells

    def append(self, a: str, b: str, votes_a: float, votes_b: float, seconds: float | None = None) -> VoteRow:
        """Append one vote durably (one write, flush, fsync); on failure the file is left as it was."""
        cells = self._cells(a, b, votes_a, votes_b, seconds)
        data = self._encode([cells])
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
        row = VoteRow(a, b, votes_a, votes_b, tuple(cells))
        self.rows.append(row)
        return row

    def pop(self) -> VoteRow:
        """Remove the last row: the whole file is rewritten atomically without it."""
        if not self.rows:
            raise IndexError("no vote to undo")
        self._rewrite([r.raw if r.raw is not None else list(r.fields) for r in self.rows[:-1]])
        return self.rows.pop()

    def _rewrite(self, rows: list[list[str] | str]) -> None:
        tmp = self.path.with_name(f".{self.path.name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            with tmp.open("wb") as f:
                f.write(self._encode([list(self.header), *rows]))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)
        _fsync_dir(self.path.parent)
