"""Names a package exports but imports on first use (PEP 562), one implementation for every package.

Why: ``tastelab --help`` and the torch-free ONNX scoring path must not import torch, scipy or numpy through a
package's ``__init__``; packages therefore list their public names with the module that defines each, and
:func:`lazy_exports` gives them the module-level ``__getattr__`` that imports it when the name is first used
(then caches it as a plain attribute, so later look-ups cost nothing).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(package: str, names: Mapping[str, str], namespace: dict[str, Any]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package``: ``names`` maps a public name to its defining module;
    ``namespace`` is the package's ``globals()`` (where a loaded name is cached)."""

    def __getattr__(name: str) -> Any:
        module = names.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value  # once loaded, a plain attribute: later look-ups skip this function
        return value

    return __getattr__
