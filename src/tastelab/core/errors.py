"""The one exception type for mistakes a user can make (bad input file, config, flag, model folder).

The CLI maps it (and ``ValueError`` / ``FileNotFoundError`` / pydantic ``ValidationError``, which the
library raises as well) to one line naming the input and exit code 2; a traceback means a bug in
tastelab, never a user mistake. It subclasses ``ValueError`` so that callers catching ``ValueError``
keep working.
"""

from __future__ import annotations

from typing import Any


class UserError(ValueError):
    """A user-caused error; the message names the input (file, key, flag) and what to do about it."""


def validation_summary(exc: Any) -> str:
    """One line for a pydantic ``ValidationError``: every ``dotted.key: message``, joined by ``; ``."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"])
        parts.append(f"{loc}: {err['msg']}" if loc else str(err["msg"]))
    return "; ".join(parts)


def one_line(message: str) -> str:
    """Collapse a multi-line message into one line (sections joined by ``; ``)."""
    lines = [ln.strip() for ln in str(message).splitlines() if ln.strip()]
    if not lines:
        return ""
    head, rest = lines[0], lines[1:]
    if not rest:
        return head
    sep = " " if head.endswith(":") else "; "
    return head + sep + "; ".join(rest)
