"""Reading a small text file from a stranger (label table, votes, recipe, prompt file, manifest): one rule.

Why a module of its own: ``Path.read_text`` / ``open`` on a FIFO block until some other process writes to it
(forever, in a training run or a labelling server's start-up), and a file with one non-UTF-8 byte raises a
bare ``UnicodeDecodeError`` that names neither the file nor the line. Every text reader goes through
:func:`read_text_file`, which opens regular files only (:func:`tastelab.io.images.read_regular_file`: ``stat``
first, a non-blocking open, ``fstat`` again) and turns both failures into the caller's own one-line error
naming the file (and, for bad bytes, the line).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from tastelab.core.errors import UserError
from tastelab.io.images import ImageDecodeError, read_regular_file


class TextFileError(UserError):
    """A text file that cannot be read; the message starts with ``file:`` or ``file:line:``."""

    def __init__(self, message: str, file: str | Path, line: int | None = None) -> None:
        self.file, self.line, self.detail = str(file), line, message
        where = f"{file}:{line}" if line is not None else f"{file}"
        super().__init__(f"{where}: {message}")


#: Builds the error a reader raises: ``error(message, file, line)`` (RecordError, PromptFileError, ... share it).
ErrorFactory = Callable[[str, Path, "int | None"], Exception]


def read_text_file(path: str | os.PathLike[str], *, encoding: str = "utf-8-sig", errors: str = "strict",
                   error: ErrorFactory = TextFileError) -> str:
    """The text of a regular file. A missing file raises ``FileNotFoundError`` (as ``open`` does: callers word
    it their way); anything else that is not a regular file (a FIFO, a folder, a device), an unreadable one, or
    bytes that are not ``encoding`` raise ``error(reason, path, line)`` (``line``: where the first bad byte is).
    """
    path = Path(path)
    try:
        data = read_regular_file(path)
    except ImageDecodeError as exc:
        if isinstance(exc.__cause__, FileNotFoundError):
            raise FileNotFoundError(errno.ENOENT, "no such file", str(path)) from None
        raise error(exc.reason, path, None) from None
    try:
        return data.decode(encoding, errors)
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        name = "UTF-8" if encoding.lower().replace("_", "-").startswith("utf-8") else encoding
        raise error(f"not {name} text (byte 0x{data[exc.start]:02x})", path, line) from None


#: Values a YAML document may hold once its aliases are expanded (a recipe has a few hundred).
MAX_YAML_VALUES = 1_000_000


def load_yaml(text: str) -> Any:
    """``yaml.safe_load`` (data only) of a stranger's YAML, refusing an alias bomb ("billion laughs").

    Why: PyYAML builds ``&a [*b, *b, ...]`` as shared references, so a few lines parse at once into a value
    that stands for 10^9 items; the first code that walks it (validation, a JSON dump, a content hash) then
    runs out of memory. Counting the values with the aliases expanded, up to :data:`MAX_YAML_VALUES`, costs at
    most that many steps. Raises ``yaml.YAMLError`` (callers already report those in one line)."""
    data = yaml.safe_load(text)
    budget = MAX_YAML_VALUES
    stack = [data]
    while stack:
        value = stack.pop()
        budget -= 1
        if budget < 0:
            raise yaml.YAMLError(f"its aliases expand to more than {MAX_YAML_VALUES:,} values (a YAML bomb?)")
        if isinstance(value, dict):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
    return data
