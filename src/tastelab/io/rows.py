"""How one score record becomes a row any writer can store, and back: paths, numbers, models.

Why a module of its own: every output format (JSONL, CSV, Parquet) and every reader (resume, merge,
``read_results``) must agree on three things, and getting any of them wrong loses or mixes results:

* **File names that are not valid UTF-8** (real on Linux: ``os.listdir`` gives them back with lone
  surrogates, see :func:`os.fsdecode`) cannot be written as UTF-8 text. The ``path`` column then holds
  a readable form (the undecodable bytes as ``\\xNN`` escapes) and ``path_bytes`` the raw name in
  base64, so the original path is recovered exactly (:func:`decode_path`). Valid names have no
  ``path_bytes``.
* **Numbers**: a score, raw score, uncertainty or distribution entry that is not a finite number is
  not a result; the row becomes an error row (strict JSON never sees ``NaN``).
* **Resume keys**: the same image given relative and then absolute (or through a symlink) is the
  same file; :func:`resume_key` resolves the path so it is scored once.
"""

from __future__ import annotations

import base64
import binascii
import math
import os
from collections.abc import Mapping
from typing import Any

from tastelab.io.urls import is_url

#: The fields of a :class:`~tastelab.inference.scoring.ScoreResult`, in output order.
FIELDS = ["path", "score", "raw_score", "band", "distribution", "uncertainty", "error"]
#: Which model made a row: its name and a content hash of its folder (see :mod:`tastelab.models.identity`).
PROVENANCE = ["model", "model_hash"]
#: Every column an output file holds: the result, the raw bytes of a non-UTF-8 path, the model.
COLUMNS = [*FIELDS, "path_bytes", *PROVENANCE]

_NUMBERS = ("score", "raw_score", "uncertainty")


class UnrecordableError(ValueError):
    """A record that cannot be stored as is (non-finite number, wrong type); it becomes an error row."""


def resume_key(path: str) -> str:
    """The identity of an input for resume: URLs as written, files by their resolved real path."""
    if is_url(path):
        return path
    try:
        return os.path.realpath(path)
    except (ValueError, OSError):  # an embedded NUL or a path too long to resolve names no file: as written
        return path


def encode_path(path: str | None) -> tuple[str | None, str | None]:
    """``(readable valid-UTF-8 text, base64 of the raw bytes or None)`` for a path string.

    Raises :class:`UnrecordableError` for a string that is no file name at all (a lone surrogate
    that no byte sequence decodes to).
    """
    if path is None:
        return None, None
    try:
        path.encode("utf-8")
        return path, None
    except UnicodeEncodeError:
        pass
    try:
        raw = path.encode("utf-8", "surrogateescape")  # what os.fsencode gives on POSIX
    except UnicodeEncodeError as exc:
        raise UnrecordableError(f"path is not a file name ({exc.reason})") from exc
    return raw.decode("utf-8", "backslashreplace"), base64.b64encode(raw).decode("ascii")


def decode_path(text: Any, raw_b64: Any) -> Any:
    """The original path string of a stored row (inverse of :func:`encode_path`)."""
    if not raw_b64:
        return text
    try:
        raw = base64.b64decode(str(raw_b64), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise UnrecordableError(f"path_bytes is not base64 ({exc})") from exc
    return raw.decode("utf-8", "surrogateescape")


def clean_text(text: Any) -> str | None:
    """A string field (band, error, model) as valid UTF-8: undecodable bytes become ``\\xNN``."""
    if text is None:
        return None
    text = str(text)
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _finite(name: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            value = float(value)
        except (TypeError, ValueError) as exc:
            raise UnrecordableError(f"{name} is not a number ({value!r})") from exc
    value = float(value)
    if not math.isfinite(value):
        raise UnrecordableError(f"non-finite prediction ({name}={value})")
    return value


def to_row(record: Mapping[str, Any], model: str | None = None, model_hash: str | None = None) -> dict[str, Any]:
    """A result dict -> a storable row with every column of :data:`COLUMNS`.

    ``model`` / ``model_hash`` fill the provenance columns unless the record carries its own (a merge
    keeps each row's model). Raises :class:`UnrecordableError`; see :func:`safe_row`.
    """
    text, raw = encode_path(record.get("path"))
    distribution = record.get("distribution")
    if distribution is not None:
        if isinstance(distribution, (str, bytes)) or not hasattr(distribution, "__iter__"):
            raise UnrecordableError(f"distribution is not a list ({distribution!r})")
        distribution = [_finite("distribution", v) for v in distribution]
    return {
        "path": text,
        "score": _finite("score", record.get("score")),
        "raw_score": _finite("raw_score", record.get("raw_score")),
        "band": clean_text(record.get("band")),
        "distribution": distribution,
        "uncertainty": _finite("uncertainty", record.get("uncertainty")),
        "error": clean_text(record.get("error")),
        "path_bytes": raw,
        "model": clean_text(record.get("model") or model),
        "model_hash": clean_text(record.get("model_hash") or model_hash),
    }


def error_row(record: Mapping[str, Any], reason: str, model: str | None = None,
              model_hash: str | None = None) -> dict[str, Any]:
    """The error row that replaces a record which cannot be stored: same path, no score, the reason."""
    try:
        text, raw = encode_path(record.get("path"))
    except UnrecordableError:
        text, raw = clean_text(record.get("path")), None
    row = dict.fromkeys(COLUMNS)
    row.update(path=text, path_bytes=raw, error=clean_text(reason),
               model=clean_text(record.get("model") or model),
               model_hash=clean_text(record.get("model_hash") or model_hash))
    return row


def safe_row(record: Mapping[str, Any], model: str | None = None, model_hash: str | None = None) -> dict[str, Any]:
    """:func:`to_row`, or the error row saying why the record could not be stored: never raises."""
    try:
        return to_row(record, model, model_hash)
    except Exception as exc:
        return error_row(record, f"cannot record this result: {exc}", model, model_hash)


def from_row(row: Mapping[str, Any], *, provenance: bool = False) -> dict[str, Any]:
    """A stored row -> the result dict (original path restored); ``provenance`` adds model columns.

    A stored file may come from anyone (a part to merge, ``--predictions``, a hand-edited output): a row whose
    score, raw score, uncertainty or distribution is not a finite number comes back as the error row the writer
    would have made of it, so no reader (merge, resume, analysis, the labelling app) takes it for a score."""
    out = {k: row.get(k) for k in FIELDS}
    out["path"] = decode_path(row.get("path"), row.get("path_bytes"))
    if provenance:
        out.update({k: row.get(k) or None for k in PROVENANCE})
    try:
        for name in _NUMBERS:
            _finite(name, out[name])
        if out["distribution"] is not None:
            for v in out["distribution"]:
                _finite("distribution", v)
    except (UnrecordableError, TypeError) as exc:
        reason = out["error"] or f"cannot record this result: {exc}"
        out.update(dict.fromkeys(("score", "raw_score", "band", "distribution", "uncertainty")), error=reason)
    return out
