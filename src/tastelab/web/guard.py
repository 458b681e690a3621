"""What stops another web page (or a stray script) from changing a labelling session: :class:`RequestGuard`.

A browser lets any page it shows send a POST to ``http://127.0.0.1:8765`` (a form, ``fetch`` with
``mode: "no-cors"``, an image beacon). The page cannot read the answer, but a vote or an undo would already have
happened. So every state-changing request (any method but GET, HEAD, OPTIONS) must pass, in this order:

1. **Size**: a body above :data:`MAX_BODY` bytes is refused with 413: at once when ``Content-Length`` says so,
   otherwise as soon as the bytes received pass the limit (the rest is never read or buffered).
2. **Origin**: the ``Origin`` header must be present and name the app itself (one of the origins it serves on:
   ``http://127.0.0.1:PORT``, ``http://localhost:PORT``, ``http://[::1]:PORT``; without a configured list, the
   request's own ``Host``, which :class:`~starlette.middleware.trustedhost.TrustedHostMiddleware` has already
   limited to loopback names). When the browser sends ``Sec-Fetch-Site`` it must be ``same-origin``. 403 otherwise.
3. **Token**: the ``X-Tastelab-Token`` header must carry the token of this server process, which only the
   labelling page receives (embedded in its HTML; a cross-origin page cannot read it). 403 otherwise.
4. **JSON**: ``Content-Type: application/json``, so no HTML form can produce an acceptable request. 415 otherwise.

Refusals are short JSON ``{"detail": ...}`` replies that never repeat the request.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

#: Largest request body accepted (a vote is ~200 bytes).
MAX_BODY = 64 * 1024
#: Header the labelling page sends its token in.
TOKEN_HEADER = "X-Tastelab-Token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def new_token() -> str:
    """A fresh per-process secret (256 bits): valid until the server stops."""
    return secrets.token_urlsafe(32)


def loopback_origins(port: int, host: str | None = None) -> list[str]:
    """Every spelling of a loopback server's own origin: 127.0.0.1, localhost, [::1] (and ``host`` itself)."""
    hosts = ["127.0.0.1", "localhost", "[::1]"]
    if host:
        shown = f"[{host.strip('[]')}]" if ":" in host else host
        if shown not in hosts:
            hosts.append(shown)
    return [f"http://{h}:{port}" for h in hosts]


class _TooLarge(Exception):
    pass


class _Disconnected(Exception):
    pass


class RequestGuard:
    """Pure ASGI middleware applying the four checks above to every state-changing request."""

    def __init__(self, app: ASGIApp, *, token: str, origins: Sequence[str] | None = None,
                 max_body: int = MAX_BODY) -> None:
        self.app = app
        self.token = token
        self.origins = None if origins is None else {o.lower().rstrip("/") for o in origins}
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in SAFE_METHODS:
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        refusal = self._refusal(scope, headers)
        if refusal is not None:
            await JSONResponse({"detail": refusal[1]}, status_code=refusal[0])(scope, receive, send)
            return
        try:
            body = await self._read_body(receive)
        except _TooLarge:
            await JSONResponse({"detail": f"request body larger than {self.max_body} bytes"},
                               status_code=413)(scope, receive, send)
            return
        except _Disconnected:  # the client went away mid-body: nothing to answer, nothing to run
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def _refusal(self, scope: Scope, headers: Headers) -> tuple[int, str] | None:
        length = headers.get("content-length")
        if length is not None:
            try:
                if int(length) > self.max_body:
                    return 413, f"request body larger than {self.max_body} bytes"
            except ValueError:
                return 400, "bad Content-Length"
        origin = headers.get("origin")
        if origin is None:
            return 403, "refused: no Origin header (state-changing requests come from the labelling page only)"
        if origin.lower().rstrip("/") not in self._own_origins(scope, headers):
            return 403, "refused: request from another origin"
        fetch_site = headers.get("sec-fetch-site")
        if fetch_site is not None and fetch_site.lower() != "same-origin":
            return 403, "refused: not a same-origin request"
        if not secrets.compare_digest(headers.get(TOKEN_HEADER, "").encode(), self.token.encode()):
            return 403, "refused: missing or wrong session token (reload the page)"
        content_type = headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if content_type != "application/json":
            return 415, "requests that change anything must be JSON (Content-Type: application/json)"
        return None

    def _own_origins(self, scope: Scope, headers: Headers) -> set[str]:
        if self.origins is not None:
            return self.origins
        host = headers.get("host", "")
        return {f"{scope.get('scheme', 'http')}://{host}".lower()} if host else set()

    async def _read_body(self, receive: Receive) -> bytes:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Disconnected
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                raise _TooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)
