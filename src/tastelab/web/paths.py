"""Image paths that are safe to serve: inside the image folder, and nothing else.

Every image request names a path relative to the folder. It is served only if it is one of the images
indexed at start-up *and* its real path (symlinks resolved) still lies inside the folder's real path; the
real path is what gets opened, so a symlink swapped after the check cannot redirect the read. Anything
suspicious (``..`` or ``.`` segments, absolute paths, backslashes, NUL bytes, empty segments) is refused
before the file system is touched. Callers answer 404 for every refusal, so probing learns nothing.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

from tastelab.io.records import list_images

logger = logging.getLogger(__name__)


def is_clean_relpath(rel: str) -> bool:
    """True for a plain relative POSIX path: no traversal, no absolute or Windows forms, no control bytes."""
    if not rel or len(rel) > 4096 or rel.startswith("/") or "\\" in rel or "\x00" in rel:
        return False
    if any(ord(ch) < 32 for ch in rel):
        return False
    parts = rel.split("/")
    return all(part not in ("", ".", "..") for part in parts) and not PurePosixPath(rel).is_absolute()


def inside(root_real: str, candidate: str) -> bool:
    """``candidate`` (a real path) is ``root_real`` or below it."""
    try:
        return os.path.commonpath([root_real, candidate]) == root_real
    except ValueError:  # different drives (Windows) or mixed absolute/relative
        return False


def index_images(root: str | os.PathLike) -> list[str]:
    """Relative POSIX paths of the images under ``root`` whose real location is inside ``root``.

    Symlinked files or folders that lead outside the folder are left out (and logged): the app must not
    become a way to read other files, even ones a user linked in by accident. So are entries that are not
    regular files (a FIFO, socket or device named like an image): no request may read them, so no pair may
    show them.
    """
    root_real = os.path.realpath(root)
    out: list[str] = []
    escaped = not_files = 0
    for path in list_images(root, recursive=True):
        if not os.path.isfile(path):  # follows symlinks: a link to a FIFO is not an image either
            not_files += 1
            continue
        rel = Path(os.path.relpath(path, root)).as_posix()
        if not is_clean_relpath(rel):
            escaped += 1
            continue
        if not inside(root_real, os.path.realpath(path)):
            escaped += 1
            continue
        out.append(rel)
    if not_files:
        logger.warning("%s: %d image entries are not regular files (FIFO, socket, device); ignored", root, not_files)
    if escaped:
        logger.warning("%s: %d image entries point outside the folder (symlinks) or have odd names; ignored",
                       root, escaped)
    return sorted(out)


class ImageIndex:
    """The servable images of one folder and the lookup from a requested relative path to a real file."""

    def __init__(self, root: str | os.PathLike, images: Iterable[str] | None = None) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.root}")
        self.root_real = os.path.realpath(self.root)
        self.images: list[str] = sorted(images) if images is not None else index_images(self.root)
        self._set = set(self.images)
        self._lower: dict[str, str] = {}
        for rel in self.images:
            self._lower.setdefault(rel.lower(), rel)

    def __contains__(self, rel: object) -> bool:
        return rel in self._set

    def __len__(self) -> int:
        return len(self.images)

    def canonical(self, name: str) -> str | None:
        """The indexed spelling of ``name`` (exact, Windows separators, or case-insensitive), else None.

        Votes files written on Windows or edited by hand spell paths loosely; matching them here keeps
        their votes instead of silently dropping them.
        """
        if name in self._set:
            return name
        name = name.replace("\\", "/")
        if name in self._set:
            return name
        return self._lower.get(name.lower())

    def resolve(self, rel: str) -> str | None:
        """Real path of an indexed image that is still inside the folder, else None."""
        if not is_clean_relpath(rel) or rel not in self._set:
            return None
        real = os.path.realpath(os.path.join(self.root_real, *rel.split("/")))
        if not inside(self.root_real, real) or not os.path.isfile(real):
            return None
        return real
