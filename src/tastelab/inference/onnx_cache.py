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

- The cache is bounded: after each new export, the least recently used entries are evicted until all
  entries together fit ``$TASTELAB_ONNX_CACHE_MAX_BYTES`` (default 2 GiB; ``none`` for no bound). The
  entry just made is always kept. An entry is never evicted while a process loads it: loaders hold a
  shared lock on ``<model hash>.use`` (:func:`load_cached_onnx`), eviction takes it exclusively without
  waiting and skips the entry when it cannot. Eviction renames the entry away first (atomic: a reader
  sees a whole entry or none), then deletes it; a reader that finds its entry gone exports it again.
- Lock files (``<model hash>.use``, ``<model hash>.lock``, ``gc.lock``) are ``flock`` locks, which die
  with their process, and exist only while in use: the last holder removes its file, and each
  collection removes files nobody holds (left by killed processes). See :func:`_locked` for why removal
  cannot let two processes believe they hold the same lock on different files.

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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from tastelab import __version__
from tastelab.core.atomic import swap_in, write_text_atomic
from tastelab.core.errors import UserError
from tastelab.inference.onnx_runtime import ONNX_FILE
from tastelab.models.identity import folder_hash

logger = logging.getLogger(__name__)

CACHE_ENV = "TASTELAB_CACHE"
AUTO_ENV = "TASTELAB_AUTO_ONNX"
MAX_BYTES_ENV = "TASTELAB_ONNX_CACHE_MAX_BYTES"
#: The bound on all entries together when ``$TASTELAB_ONNX_CACHE_MAX_BYTES`` is unset (the default model's
#: export is about 10 MB; a ViT-L head's is over 1 GB).
DEFAULT_MAX_BYTES = 2 << 30
_UNBOUNDED = frozenset({"none", "unlimited", "inf", "off"})
T = TypeVar("T")
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
def _locked(path: Path, *, shared: bool = False, wait: bool = True) -> Iterator[bool]:
    """A lock file (POSIX ``flock``; without fcntl, no lock: entries are still atomic), removed by its last user.

    Yields whether the lock is held: False only with ``wait=False`` when another process holds it.

    Why flock and removal this way: the kernel drops a crashed process's lock with its file descriptors,
    so no stale marker ever blocks anyone; and the file is unlinked only while held exclusively (a shared
    holder first tries to take it exclusively without waiting, which fails while others share it). A
    process that opened the file before it was unlinked then holds a lock on a name nobody else can open
    any more, so after locking it checks that ``path`` still names the locked file, and starts over on the
    current one when it does not: two holders of one marker name never hold different files.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield True
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if wait else fcntl.LOCK_NB)
    while True:
        with path.open("a") as f:
            try:
                fcntl.flock(f, mode)
            except BlockingIOError:
                yield False
                return
            if not _names(path, f.fileno()):
                continue  # its last user removed it while we waited: lock the current file instead
            try:
                yield True
            finally:
                _remove_if_last(path, f.fileno(), fcntl, shared=shared)
                fcntl.flock(f, fcntl.LOCK_UN)
            return


def _names(path: Path, fd: int) -> bool:
    """Whether ``path`` still names the open file ``fd`` (not unlinked or replaced since it was opened)."""
    try:
        here, there = os.stat(path), os.fstat(fd)
    except OSError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _remove_if_last(path: Path, fd: int, fcntl: Any, *, shared: bool) -> None:
    """Unlink the lock file ``path`` (locked through ``fd``) unless another process shares the lock."""
    if shared:
        try:  # not atomic (the shared lock may be dropped first), but nothing runs under it any more
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return  # others load the entry now: the last of them removes the file
    if _names(path, fd):
        with contextlib.suppress(OSError):  # a read-only cache keeps its markers; they do no harm
            path.unlink()


def _use_lock(root: Path, model_hash: str) -> Path:
    return root / f"{model_hash}.use"


def cache_max_bytes() -> int | None:
    """The bound on the cache's entries in bytes (``$TASTELAB_ONNX_CACHE_MAX_BYTES``); None: unbounded."""
    value = os.environ.get(MAX_BYTES_ENV, "").strip()
    if not value:
        return DEFAULT_MAX_BYTES
    if value.lower() in _UNBOUNDED:
        return None
    try:
        limit = int(value.replace("_", ""))
    except ValueError:
        limit = -1
    if limit < 0:
        raise UserError(f"{MAX_BYTES_ENV}={value!r}: not a byte count; give a whole number of bytes "
                        f"(e.g. {DEFAULT_MAX_BYTES}) or 'none' for no bound")
    return limit


def _entry_size(entry: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(entry):
        for name in files:
            with contextlib.suppress(OSError):  # a file removed meanwhile weighs nothing
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def _last_used(entry: Path) -> float:
    """When the entry was last loaded (its manifest's mtime, touched on each use); a broken entry: oldest."""
    try:
        return (entry / MANIFEST).stat().st_mtime
    except OSError:
        return 0.0


def _touch(entry: Path) -> None:
    with contextlib.suppress(OSError):  # a read-only cache still works; it just forgets the use order
        os.utime(entry / MANIFEST)


def evict(root: Path, model_hash: str) -> bool:
    """Remove one entry unless a process is loading it: rename it away (atomic), then delete it.

    Returns whether it was evicted (False: in use, or already gone)."""
    entry = root / model_hash
    with _locked(_use_lock(root, model_hash), wait=False) as held:
        if not held:
            return False
        doomed = root / f".{model_hash}.evict-{uuid.uuid4().hex[:8]}"
        try:
            os.replace(entry, doomed)
        except FileNotFoundError:
            return False
    shutil.rmtree(doomed, ignore_errors=True)
    return True


def collect_garbage(root: Path | None = None, *, keep: str | None = None,
                    max_bytes: int | str | None = "env") -> list[str]:
    """Evict least recently used entries until the cache fits ``max_bytes`` (default: the env bound).

    ``keep`` (a model hash) is never evicted: the entry this process just made or uses. Entries in use
    by other processes are skipped. Leftovers of an interrupted eviction are removed. Returns the
    evicted model hashes, oldest first.
    """
    root = onnx_cache_dir() if root is None else root
    limit = cache_max_bytes() if isinstance(max_bytes, str) else max_bytes  # "env": the environment's
    if not root.is_dir():
        return []
    for leftover in root.glob(".*.evict-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    _sweep_markers(root)
    if limit is None:
        return []
    evicted: list[str] = []
    with _locked(root / "gc.lock"):  # not hidden: hidden names are temporary entries
        entries = [e for e in root.iterdir() if e.is_dir() and not e.name.startswith(".")]
        sizes = {e.name: _entry_size(e) for e in entries}
        total = sum(sizes.values())
        for entry in sorted(entries, key=_last_used):
            if total <= limit:
                break
            if entry.name == keep:
                continue
            if evict(root, entry.name):
                total -= sizes[entry.name]
                evicted.append(entry.name)
                logger.info("ONNX cache over %d bytes: evicted %s (least recently used)", limit, entry)
    return evicted


def _sweep_markers(root: Path) -> None:
    """Remove lock files nobody holds: those of processes killed before they could remove their own."""
    for marker in [*root.glob("*.use"), *root.glob("*.lock")]:
        with _locked(marker, wait=False):  # held: in use, left alone; free: removed on leaving
            pass


def load_cached_onnx(source: str | os.PathLike, model_hash: str, load: Callable[[Path], T], *,
                     name: str = "") -> tuple[Path, T]:
    """``(entry, load(entry))`` for the cached export of ``source``, exported first when needed.

    ``load`` runs under the entry's shared use lock, so no eviction removes the entry while it is read;
    an entry evicted between :func:`cached_onnx` and taking that lock is exported again. Marks the entry
    as just used (the eviction order). Raises :class:`CachedExportError` like :func:`cached_onnx`.
    """
    root = onnx_cache_dir()
    for _ in range(3):
        entry = cached_onnx(source, model_hash, name=name)
        try:
            with _locked(_use_lock(root, model_hash), shared=True):
                if (entry / ONNX_FILE).is_file() and (entry / MANIFEST).is_file():
                    loaded = load(entry)
                    _touch(entry)
                    return entry, loaded
        except OSError as exc:
            raise CachedExportError(f"cannot use the ONNX cache {root}: {_one_line(exc)}",
                                    remembered=False) from exc
        logger.info("ONNX cache entry %s was evicted before it could be loaded; exporting it again", entry)
    raise CachedExportError(f"the ONNX cache entry {root / model_hash} keeps being evicted (is "
                            f"{MAX_BYTES_ENV} too small for the models in use?)", remembered=False)


def cached_onnx(source: str | os.PathLike, model_hash: str, *, name: str = "") -> Path:
    """A verified ONNX model folder for the PyTorch model folder ``source`` (content hash ``model_hash``).

    Returns the cached entry, exporting it first when there is none (or a stale one); raises
    :class:`CachedExportError` when the export fails (and remembers that) or failed before.
    """
    root = onnx_cache_dir()
    entry = root / model_hash
    limit = cache_max_bytes()  # a bad bound is one line now, not after a minute of exporting
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
    try:
        collect_garbage(root, keep=model_hash, max_bytes=limit)
    except OSError as exc:  # a full or read-only cache: the export is there, scoring goes on
        logger.warning("ONNX cache %s: could not evict old entries (%s)", root, _one_line(exc))
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
