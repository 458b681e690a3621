"""Name -> implementation registries (timm's ``register_model``, pyiqa's lazy entries), one small class.

Configs name their parts by strings (``backbone.kind: hf``, ``train.loss: emd``, ``optim.name: lion``).
A :class:`Registry` maps those names to factories so that adding a backbone, head, loss, optimizer or label
format is one registration instead of edits to if/elif chains in two or three files, and so that configs
can validate a name against what is registered before any work starts.

Entries are either eager (``@REG.register("name")`` on the object) or lazy (``REG.register_lazy("name",
"package.module:attr")``): a lazy entry's name and metadata are known at once, its module is imported on
the first :meth:`Registry.get`, so optional or heavy dependencies (torch, transformers, lion-pytorch) load
only when that entry is used. Metadata is free-form data per entry (a head's default loss, an optimizer's
pip extra, later a judge metric's family/direction/licence) readable without importing anything.

Unknown names raise :class:`UnknownNameError` (a ``ValueError``, so pydantic validators report it as the
field's error) naming the bad value, the closest registered name and every valid name.
"""

from __future__ import annotations

import difflib
import importlib
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Generic, TypeVar

__all__ = ["Registry", "UnknownNameError"]

T = TypeVar("T")


class UnknownNameError(ValueError):
    """A name that is not registered; the message lists the valid names and the closest match."""


@dataclass
class _Entry:
    name: str
    target: str | None  # "module:attr" for lazy entries, resolved on first use
    obj: Any = None
    loaded: bool = False
    metadata: Mapping[str, Any] = field(default_factory=dict)


class Registry(Generic[T]):
    """Registered names of one kind of thing (``"loss"``, ``"backbone kind"``...) -> objects.

    ``kind`` only words error messages: ``unknown loss 'msee' (did you mean 'mse'?); valid names: ...``.
    Iterating, ``in`` and ``len`` see canonical names (not aliases), sorted.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, _Entry] = {}
        self._aliases: dict[str, str] = {}
        self._lock = threading.Lock()  # one import per lazy entry even when threads race to get() it

    # ------------------------------------------------------------------------------ registration
    def register(self, name: str, /, *, aliases: Iterable[str] = (), **metadata: Any) -> Callable[[T], T]:
        """Decorator: register the decorated object (class, function, instance) under ``name``.

        Returns the object unchanged, so ``@REG.register("x")`` leaves the definition usable directly.
        ``name`` is positional-only so that any word (even ``name`` or ``target``) can be a metadata key.
        """

        def decorator(obj: T) -> T:
            self._add(_Entry(name, None, obj, True, MappingProxyType(dict(metadata))), aliases)
            return obj

        return decorator

    def register_lazy(self, name: str, target: str, /, *, aliases: Iterable[str] = (), **metadata: Any) -> None:
        """Register ``"package.module:attr"`` under ``name`` without importing it (imported on first get)."""
        module, sep, attr = target.partition(":")
        if not sep or not module or not attr:
            raise ValueError(f"{self.kind} {name!r}: lazy target must look like 'package.module:attr', got {target!r}")
        self._add(_Entry(name, target, metadata=MappingProxyType(dict(metadata))), aliases)

    def unregister(self, name: str) -> None:
        """Remove ``name`` and its aliases (plugins' tests; a later registration may reuse the names)."""
        canonical = self.canonical(name)
        del self._entries[canonical]
        self._aliases = {a: n for a, n in self._aliases.items() if n != canonical}

    def _add(self, entry: _Entry, aliases: Iterable[str]) -> None:
        names = [entry.name, *aliases]
        for n in names:
            if not isinstance(n, str) or not n:
                raise ValueError(f"{self.kind} names must be non-empty strings, got {n!r}")
            if n in self._entries or n in self._aliases:
                raise ValueError(f"{self.kind} {n!r} is already registered")
        if len(set(names)) != len(names):
            raise ValueError(f"{self.kind} {entry.name!r}: duplicate aliases {names}")
        self._entries[entry.name] = entry
        for alias in names[1:]:
            self._aliases[alias] = entry.name

    # ------------------------------------------------------------------------------ look-up
    def canonical(self, name: str) -> str:
        """The registered name ``name`` stands for (itself or the entry it aliases).

        Raises :class:`UnknownNameError` with a close-match suggestion and the valid names.
        """
        if name in self._entries:
            return name
        if name in self._aliases:
            return self._aliases[name]
        raise UnknownNameError(self._unknown_message(name))

    def check(self, name: str) -> str:
        """Validate ``name`` and return it unchanged (a pydantic ``AfterValidator`` for config fields).

        Aliases are accepted and kept as written, so a config round-trips byte for byte.
        """
        self.canonical(name)
        return name

    def checker(self, *extra: str, **where: Any) -> Callable[[str], str]:
        """A validator like :meth:`check` that also accepts the pseudo-names ``extra`` (``"auto"``) and
        only entries whose metadata matches ``where`` (``LABEL_FORMATS.checker("auto", labelled=True)``)."""

        def check(name: str) -> str:
            if name in extra:
                return name
            allowed = self.names(**where)
            if name in self and self.canonical(name) in allowed:
                return name
            raise UnknownNameError(self._unknown_message(name, [*extra, *allowed]))

        return check

    def get(self, name: str) -> T:
        """The object registered under ``name`` (or an alias); imports a lazy entry's module on first use."""
        entry = self._entries[self.canonical(name)]
        if not entry.loaded:
            with self._lock:
                if not entry.loaded:
                    assert entry.target is not None
                    module, _, attr = entry.target.partition(":")
                    obj: Any = importlib.import_module(module)
                    for part in attr.split("."):
                        obj = getattr(obj, part)
                    entry.obj, entry.loaded = obj, True
        return entry.obj

    def metadata(self, name: str) -> Mapping[str, Any]:
        """An entry's metadata (read-only); never imports a lazy entry."""
        return self._entries[self.canonical(name)].metadata

    def names(self, **where: Any) -> list[str]:
        """Canonical names, sorted; ``where`` keeps entries whose metadata has those values
        (``LOSSES.names(pairwise=True)``)."""
        return sorted(n for n, e in self._entries.items()
                      if all(k in e.metadata and e.metadata[k] == v for k, v in where.items()))

    def is_loaded(self, name: str) -> bool:
        """Whether ``name``'s object is imported already (eager entries always are)."""
        return self._entries[self.canonical(name)].loaded

    def _unknown_message(self, name: object, valid: list[str] | None = None) -> str:
        valid = self.names() if valid is None else valid
        if name in self:  # registered, but filtered out by a checker's `where`
            return f"{self.kind} {name!r} does not apply here; valid names: {', '.join(valid)}"
        msg = f"unknown {self.kind} {name!r}"
        if isinstance(name, str):
            close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
            if not close:  # case / separator slips ('Bradley-Terry') that difflib scores low
                folded = name.lower().replace("-", "_")
                close = [n for n in valid if n.lower().replace("-", "_") == folded][:1]
            if close:
                msg += f" (did you mean {close[0]!r}?)"
        return f"{msg}; valid names: {', '.join(valid) if valid else '(none registered)'}"

    # ------------------------------------------------------------------------------ container protocol
    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and (name in self._entries or name in self._aliases)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, names={self.names()})"
