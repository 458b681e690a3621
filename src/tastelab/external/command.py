"""The user's trainer command: a template with ``{placeholders}`` filled per trial.

Why per token: the template is split once with :func:`shlex.split` (POSIX rules, the way a shell would split
it), then each placeholder is replaced *inside its token*. A value is therefore always exactly one argument
(or part of one), whatever it contains -- a space, a quote or a ``;`` in a categorical choice can never
become shell syntax. No shell runs unless the user asks for one (``shell=True``: pipes, ``&&``, ``cd``,
environment assignments), and then every value is :func:`shlex.quote`-d before it is put into the line.

Placeholders are ``{name}`` where ``name`` is a key of the search space (dots allowed: ``{optim.lr}``) or one
the tuner provides: ``{trial_dir}`` (a fresh folder per trial), ``{trial_number}`` and ``{seed}``. ``{{`` and
``}}`` are literal braces. An unknown name is an error before any trial runs.
"""

from __future__ import annotations

import json
import math
import re
import shlex
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from tastelab.core.errors import UserError

__all__ = ["BUILTIN_PLACEHOLDERS", "CommandTemplate", "format_value"]

#: Placeholders the tuner fills itself (in addition to the space's keys).
BUILTIN_PLACEHOLDERS = ("trial_dir", "trial_number", "seed")
_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([^{}]*)\}")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*$")


def format_value(value: Any) -> str:
    """A parameter value as command-line text: floats in full precision (``repr``: ``0.0001``, ``1e-05``),
    booleans as ``true``/``false`` (YAML's spelling), lists and mappings as JSON, everything else ``str``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if not math.isfinite(value):
            raise UserError(f"non-finite parameter value {value!r} cannot be passed to the trainer")
        return repr(value)
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value)
    if value is None:
        return ""
    return str(value)


@dataclass(frozen=True)
class CommandTemplate:
    """A parsed trainer command. ``shell``: run the filled line with ``/bin/sh -c`` (values quoted)."""

    template: str
    tokens: tuple[str, ...]
    names: frozenset[str]
    shell: bool = False

    @classmethod
    def parse(cls, template: str, *, shell: bool = False) -> CommandTemplate:
        """Split and scan ``template``; raises a one-line :class:`UserError` for an empty or malformed one."""
        if not template or not template.strip():
            raise UserError("--external: the trainer command is empty")
        try:
            tokens = tuple(shlex.split(template))
        except ValueError as exc:  # an unclosed quote
            raise UserError(f"--external: cannot split the command ({exc}): {template!r}") from None
        names: set[str] = set()
        for token in (template,) if shell else tokens:
            for m in _PLACEHOLDER.finditer(token):
                name = m.group(1)
                if name is None:
                    continue
                if not _NAME.match(name.strip()):
                    raise UserError(f"--external: {{{name}}} is not a placeholder name (write {{{{ and }}}} "
                                    "for literal braces)")
                names.add(name.strip())
            stray = _PLACEHOLDER.sub("", token)
            if "{" in stray or "}" in stray:
                raise UserError(f"--external: unbalanced brace in {token!r} (write {{{{ and }}}} for literal braces)")
        return cls(template=template, tokens=tokens, names=frozenset(names), shell=shell)

    def check(self, known: Iterable[str]) -> None:
        """Every placeholder must be a space key or a built-in one: checked before any trial runs."""
        allowed = set(known) | set(BUILTIN_PLACEHOLDERS)
        unknown = sorted(self.names - allowed)
        if unknown:
            raise UserError(f"--external: unknown placeholder(s) {', '.join('{' + n + '}' for n in unknown)}; "
                            f"the space defines {', '.join(sorted(set(known))) or 'nothing'} and the tuner "
                            f"fills {', '.join(BUILTIN_PLACEHOLDERS)}")

    def fill(self, values: Mapping[str, Any]) -> list[str]:
        """The argv for one trial (``/bin/sh -c LINE`` when ``shell``). ``values`` must hold every placeholder
        used; a space parameter inactive in this trial (a ``when`` condition) fills as empty text."""

        def sub(text: str, quote: bool) -> str:
            def one(m: re.Match[str]) -> str:
                if m.group(0) == "{{":
                    return "{"
                if m.group(0) == "}}":
                    return "}"
                name = m.group(1).strip()
                if name not in values:
                    raise UserError(f"--external: no value for {{{name}}} in this trial")
                text = format_value(values[name])
                return shlex.quote(text) if quote else text

            return _PLACEHOLDER.sub(one, text)

        if self.shell:
            return ["/bin/sh", "-c", sub(self.template, quote=True)]
        return [sub(token, quote=False) for token in self.tokens]

    @staticmethod
    def display(argv: list[str]) -> str:
        """The argv as one line a user could paste into a shell (for the trial log)."""
        return shlex.join(argv)
