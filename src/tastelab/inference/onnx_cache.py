"""ONNX exports of PyTorch model folders, made on first use and cached per model content hash.

Why: on CPUs ONNX Runtime runs the default model about twice as fast as PyTorch eager (bench/), and a
process that scores through ONNX Runtime need not import torch at all. So the Scorer's ``auto`` backend
exports a model folder once (``torch.onnx``, checked with ``onnx.checker`` and verified against PyTorch
by :func:`~tastelab.inference.onnx.export_onnx`) and reuses the export for as long as the folder's content
hash (:mod:`tastelab.models.identity`) is the same. An entry lives in ``<cache>/onnx/<model hash>/``:

- ``config.json`` + ``model.onnx`` (an ONNX model folder) and ``.tastelab-export.json``, a manifest with
  the cache format, the model hash and the content hash of the entry's files. An entry whose manifest is
  missing or unreadable, from another format, for another model, or whose files no longer hash to the
  recorded value (a truncated or edited ``model.onnx``) is stale and rebuilt.
- Entries appear atomically (built in a temporary sibling, then renamed); concurrent first runs (the
  ranks of a launch) take a lock file, so one process exports and the others reuse its result.
- A failed export is remembered in ``<model hash>.failed.json`` next to the entries, so every later run
  falls back to PyTorch at once instead of trying again; a new tastelab version retries, and deleting the
  file retries now.

``<cache>`` is ``$TASTELAB_CACHE``, else ``$XDG_CACHE_HOME/tastelab``, else ``~/.cache/tastelab``.
``TASTELAB_AUTO_ONNX=0`` turns the automatic use off (``--backend torch`` does so for one run).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tastelab import __version__
from tastelab.core.atomic import swap_in, write_text_atomic
from tastelab.inference.onnx_runtime import ONNX_FILE
from tastelab.models.identity import folder_hash

logger = logging.getLogger(__name__)

CACHE_ENV = "TASTELAB_CACHE"
AUTO_ENV = "TASTELAB_AUTO_ONNX"
#: Bumped when what an entry holds changes: older entries are then rebuilt.
CACHE_FORMAT = 1
MANIFEST = ".tastelab-export.json"  # hidden: not part of the entry's content hash
_OFF = frozenset({"0", "false", "no", "off"})


class CachedExportError(RuntimeError):
    """No ONNX export for this model: the export failed now, or failed before (``remembered``)."""

    def __init__(self, message: str, *, remembered: bool) -> None:
        super().__init__(message)
        self.remembered = remembered


def cache_root() -> Path:
    """tastelab's cache folder: ``$TASTELAB_CACHE``, ``$XDG_CACHE_HOME/tastelab`` or ``~/.cache/tastelab``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "tastelab"


def onnx_cache_dir() -> Path:
    return cache_root() / "onnx"


def auto_onnx_available() -> tuple[bool, str]:
    """Whether ``auto`` may use a cached ONNX export, and why not (for the log) when it may not."""
    if os.environ.get(AUTO_ENV, "").strip().lower() in _OFF:
        return False, f"{AUTO_ENV}={os.environ[AUTO_ENV]}"
    if importlib.util.find_spec("onnxruntime") is None:
        return False, "onnxruntime is not installed"
    return True, ""


def entry_problem(entry: Path, model_hash: str) -> str | None:
    """Why ``entry`` cannot be used for ``model_hash`` (None: it can): checks manifest and content hash."""
    manifest = entry / MANIFEST
    if not entry.is_dir():
        return "missing"
    try:
        meta = json.loads(manifest.read_text())
    except (OSError, ValueError) as exc:
        return f"unreadable manifest ({type(exc).__name__})"
    if not isinstance(meta, dict) or meta.get("format") != CACHE_FORMAT:
        return f"cache format {meta.get('format') if isinstance(meta, dict) else None!r} != {CACHE_FORMAT}"
    if meta.get("model_hash") != model_hash:
        return f"made for model {meta.get('model_hash')!r}"
    if not (entry / ONNX_FILE).is_file():
        return f"{ONNX_FILE} missing"
    if folder_hash(entry) != meta.get("content_hash"):
        return "files changed since the export (content hash differs)"
    return None


def _failure_file(root: Path, model_hash: str) -> Path:
    return root / f"{model_hash}.failed.json"


def remembered_failure(model_hash: str) -> str | None:
    """The recorded reason a previous export of this model failed (same tastelab version), if any."""
    path = _failure_file(onnx_cache_dir(), model_hash)
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("tastelab") != __version__:
        return None  # another version may export what this one could not: retry
    return f"{meta.get('error', 'unknown error')} (remembered in {path}; delete it to retry)"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock file (POSIX ``flock``; without fcntl, no lock: entries are still atomic)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def cached_onnx(source: str | os.PathLike, model_hash: str, *, name: str = "") -> Path:
    """A verified ONNX model folder for the PyTorch model folder ``source`` (content hash ``model_hash``).

    Returns the cached entry, exporting it first when there is none (or a stale one); raises
    :class:`CachedExportError` when the export fails (and remembers that) or failed before.
    """
    root = onnx_cache_dir()
    entry = root / model_hash
    if entry_problem(entry, model_hash) is None:
        return entry
    failed = remembered_failure(model_hash)
    if failed:
        raise CachedExportError(failed, remembered=True)
    try:
        with _locked(root / f"{model_hash}.lock"):
            problem = entry_problem(entry, model_hash)  # another process may have made it while we waited
            if problem is None:
                return entry
            if problem != "missing":
                logger.warning("ONNX cache entry %s is stale (%s); exporting again", entry, problem)
            logger.info("exporting %s to ONNX once for faster CPU scoring (cached in %s)", name or source, entry)
            try:
                _export(Path(source), entry, model_hash)
            except OSError:
                raise  # the cache's file system (read-only, full): not the model's fault, so not remembered
            except Exception as exc:
                reason = _one_line(exc)
                record = {"format": CACHE_FORMAT, "tastelab": __version__, "model_hash": model_hash,
                          "error": reason}
                write_text_atomic(_failure_file(root, model_hash), json.dumps(record, indent=2))
                raise CachedExportError(f"{reason} (remembered in {_failure_file(root, model_hash)})",
                                        remembered=False) from exc
    except OSError as exc:
        raise CachedExportError(f"cannot use the ONNX cache {root}: {_one_line(exc)}", remembered=False) from exc
    return entry


def _one_line(exc: BaseException) -> str:
    first = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _export(source: Path, entry: Path, model_hash: str) -> None:
    from tastelab.inference.onnx import export_onnx  # imports torch: only when an export is due

    tmp = entry.with_name(f".{entry.name}.export-{uuid.uuid4().hex[:8]}")
    try:
        report = export_onnx(source, tmp)  # checked + verified against PyTorch; atomic itself
        meta: dict[str, Any] = {
            "format": CACHE_FORMAT, "model_hash": model_hash, "source": str(source), "tastelab": __version__,
            "exporter": report.exporter, "opset": report.opset, "max_abs_diff": report.max_abs_diff,
            "content_hash": folder_hash(tmp)}
        (tmp / MANIFEST).write_text(json.dumps(meta, indent=2))
        swap_in(tmp, entry)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
