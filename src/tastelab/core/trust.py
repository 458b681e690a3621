"""The one rule of files that ask to run code: a file may *request* it, only the user may *allow* it.

Recipes, search spaces and judge configs are shared files; a file never switches on code execution (a
Hugging Face checkpoint's own Python code, ``trust_remote_code``). Every command that reads such a file asks
:func:`remote_code` whether the file's request may run: it may only when the user also allowed it for that
command (``--trust-remote-code`` on the command line, ``trust_remote_code=True`` in Python). A request without
that permission is an error naming the file, raised before anything downloads or loads.
"""

from __future__ import annotations

from tastelab.core.errors import UserError

__all__ = ["TRUST_HINT", "remote_code"]

#: What the user does to allow a request, as every refusal says it.
TRUST_HINT = "pass --trust-remote-code (trust_remote_code=True in Python)"


def remote_code(requested: bool, *, allowed: bool, source: str, request: str, code_of: str, kind: str,
                error: type[UserError] = UserError) -> bool:
    """Whether the code a file requests may run: the file's ``requested`` granted by the user's ``allowed``.

    ``source`` names the file (its path), ``request`` says which key asks (``"model.backbone.trust_remote_code
    is true"``), ``code_of`` whose code would run, ``kind`` what the file is (``"recipe"``, ``"judge config"``).
    A request the user did not allow raises ``error`` (one line naming ``source``). Returns ``requested``:
    the user's permission without a request runs no code."""
    if requested and not allowed:
        raise error(f"{source}: {request}, but a {kind} cannot switch on running code; if you trust the Python "
                    f"code shipped with {code_of}, {TRUST_HINT}")
    return requested
