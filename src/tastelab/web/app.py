"""The FastAPI app: two static pages (label, browse), a small JSON API, and images from the folder only.

API (all JSON; errors are ``{"detail": "..."}``):

* ``GET /api/pair[?skip=PAIR_ID]`` -> ``{"pair": {pair_id, a, b, url_a, url_b}, "stats": {...}}``; ``skip`` names
  a pair passed over without a vote (it is not proposed again soon).
* ``POST /api/vote {pair_id, a, b, choice: "a"|"b"|"tie"[, seconds]}`` -> ``{recorded, duplicate, stats, next}``;
  the vote is on disk (fsynced) before the answer. Unknown images or a pair id that showed other images: 400;
  a pair id this server never issued (or long forgotten): 409.
* ``POST /api/undo {[pair_id]}`` -> ``{undone, stats, pair}`` (the undone pair, to judge again); nothing to undo,
  or the last vote is not ``pair_id``'s: 409.
* Every POST passes :class:`tastelab.web.guard.RequestGuard` first: at most 64 KiB, ``Origin`` (and
  ``Sec-Fetch-Site``) of the app itself, the page's ``X-Tastelab-Token``, a JSON body (413/403/415 otherwise).
  A malformed body is 422 with a short message that never repeats the request.
* ``GET /api/stats``, ``GET /api/browse[?sort=score|prediction|disagreement]``.
* ``GET /img/{relpath}`` (the file itself; TIFFs as PNG for browsers), ``GET /thumb/{relpath}`` (JPEG, 320 px):
  404 for anything that is not an indexed image inside the folder.
* The live model (:mod:`tastelab.web.live`; 409 when the session has none): ``GET /api/model`` (its status, also
  under ``model`` in ``/api/stats``); ``POST /api/model/save {}`` -> ``{saved_to}`` (a tastelab model folder);
  ``POST /api/score-folder {path}`` (an absolute path of an existing local folder; 400 otherwise, or when it
  holds no image or too many; 409 before the first model) -> a job; ``GET /api/jobs/{id}`` -> its state,
  progress, the JSONL score file it wrote and the ranked items; ``GET /scored/{job_id}/{relpath}`` -> a JPEG
  thumbnail of an image of that folder, confined exactly like ``/img/`` (404 otherwise).

Handlers are plain ``def`` functions: Starlette runs them in its thread pool, and the session's lock makes a
vote (append, fsync, ranking, score file) atomic with respect to every other request.
"""

from __future__ import annotations

import functools
import html
import io
import logging
import mimetypes
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi import Path as FastApiPath
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from starlette.middleware.trustedhost import TrustedHostMiddleware

from tastelab.web.guard import RequestGuard, new_token
from tastelab.web.session import BadRequest, Conflict, LabelSession, image_url

if TYPE_CHECKING:
    from tastelab.web.live import LiveModel

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).with_name("static")
#: Formats every current browser displays; others (TIFF) are converted to PNG on the way out.
BROWSER_FORMATS = {".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp"}
THUMB_SIZE = 320
#: The tab icon (two frames side by side), served at /favicon.ico so no browser request ends in a 404.
FAVICON_SVG = ('<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16">'
               '<rect x="1" y="3" width="6" height="10" rx="1" fill="#4a8"/>'
               '<rect x="9" y="3" width="6" height="10" rx="1" fill="#888"/></svg>')
#: Hosts a loopback-bound server answers to: refusing other Host headers defeats DNS-rebinding pages.
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")
_PAIR_ID = r"^[A-Za-z0-9_-]{1,64}$"
_FIELD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,31}|[0-9]{1,6}")
_SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; object-src 'none'; frame-ancestors 'none'",
}


class VoteIn(BaseModel):
    """One judgement: the pair it answers and the images it showed (left = ``a``, right = ``b``)."""

    model_config = ConfigDict(extra="forbid")
    pair_id: str = Field(pattern=_PAIR_ID)
    a: str = Field(min_length=1, max_length=4096)
    b: str = Field(min_length=1, max_length=4096)
    choice: Literal["a", "b", "tie"]
    seconds: float | None = Field(default=None, ge=0, le=86_400, allow_inf_nan=False)


class UndoIn(BaseModel):
    """Optional: the pair id of the vote the page believes is the last one (see ``LabelSession.undo``)."""

    model_config = ConfigDict(extra="forbid")
    pair_id: str | None = Field(default=None, pattern=_PAIR_ID)


class ScoreFolderIn(BaseModel):
    """A folder of new photos to rank with the live model: an absolute local path."""

    model_config = ConfigDict(extra="forbid")
    path: str = Field(min_length=1, max_length=4096)


class SaveIn(BaseModel):
    """Nothing to choose: the model goes to ``tastelab_model`` beside the votes file."""

    model_config = ConfigDict(extra="forbid")


@functools.lru_cache(maxsize=2048)
def _thumbnail(real: str, mtime_ns: int, size: int) -> bytes:
    """JPEG thumbnail of one image; cached per (file, mtime) so re-sorting the browse page costs nothing."""
    del mtime_ns  # cache key only
    from tastelab.io.images import load_image  # torch comes with it: only import when a thumbnail is asked for

    img = load_image(real, draft_size=size)
    img.thumbnail((size, size))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=85)
    return buf.getvalue()


def _as_png(real: str) -> bytes:
    from tastelab.io.images import load_image  # torch: see above

    buf = io.BytesIO()
    load_image(real).save(buf, "PNG")
    return buf.getvalue()


def _loc_part(part: object) -> str:
    """A field name or index as it is; anything else (a long or odd key the client invented) as ``?``."""
    text = str(part)
    return text if _FIELD_NAME.fullmatch(text) else "?"


def _validation_message(exc: RequestValidationError) -> str:
    """``field: problem`` for each error, bounded: never the input itself (it may be megabytes, or NaN)."""
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(_loc_part(part) for part in err.get("loc", ()) if part != "body") or "body"
        parts.append(f"{loc}: {str(err.get('msg', 'invalid'))[:120]}")
    return "invalid request: " + "; ".join(parts)


def _label_page(session: LabelSession, token: str) -> str:
    """label.html with the session token and the question filled in (both HTML-escaped)."""
    text = (STATIC_DIR / "label.html").read_text(encoding="utf-8")
    return (text.replace("{{TOKEN}}", html.escape(token, quote=True))
                .replace("{{QUESTION}}", html.escape(session.question, quote=True)))


def create_app(session: LabelSession, *, allowed_hosts: Sequence[str] | None = None,
               origins: Sequence[str] | None = None, token: str | None = None) -> FastAPI:
    """The app for one session.

    ``allowed_hosts`` (Host header names) is None to accept any (tests). ``origins``: the app's own origins, the
    only ones allowed to change anything (None: the request's own Host). ``token`` (default: a fresh one) is
    what the labelling page must send back in ``X-Tastelab-Token``; it is on ``app.state.token``.
    """
    app = FastAPI(title="tastelab label", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.session = session
    app.state.token = token = token or new_token()
    app.add_middleware(RequestGuard, token=token, origins=origins)
    if allowed_hosts is not None:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts))

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        response = await call_next(request)
        for key, value in _SECURITY_HEADERS.items():
            response.headers.setdefault(key, value)
        if request.url.path.startswith("/api/"):
            response.headers["Cache-Control"] = "no-store"
        return response

    @app.exception_handler(BadRequest)
    def _bad_request(request: Request, exc: BadRequest) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=400)

    @app.exception_handler(RequestValidationError)
    def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": _validation_message(exc)}, status_code=422)

    @app.exception_handler(Conflict)
    def _conflict(request: Request, exc: Conflict) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=409)

    def _live() -> LiveModel:
        if session.live is None:
            raise HTTPException(409, "the live model is off in this session")
        return session.live

    @app.get("/", include_in_schema=False)
    def label_page() -> HTMLResponse:
        # no-store: the page carries this process's token; a cached copy after a restart would hold a stale one
        return HTMLResponse(_label_page(session, token), headers={"Cache-Control": "no-store"})

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon() -> Response:
        return Response(FAVICON_SVG, media_type="image/svg+xml", headers={"Cache-Control": "public, max-age=86400"})

    @app.get("/browse", include_in_schema=False)
    def browse_page() -> FileResponse:
        return FileResponse(STATIC_DIR / "browse.html", headers={"Cache-Control": "no-cache"})

    @app.get("/api/pair")
    def get_pair(skip: str | None = Query(default=None, pattern=_PAIR_ID)) -> dict:
        return {"pair": session.new_pair(skip=skip), "stats": session.stats()}

    @app.post("/api/vote")
    def post_vote(vote: VoteIn) -> dict:
        try:
            return session.vote(vote.pair_id, vote.a, vote.b, vote.choice, vote.seconds)
        except OSError as exc:  # the votes file could not be written: the vote was NOT recorded
            logger.error("vote not recorded: %s", exc)
            raise HTTPException(503, f"vote not recorded: could not write the votes file ({exc})") from exc

    @app.post("/api/undo")
    def post_undo(body: UndoIn) -> dict:
        try:
            return session.undo(body.pair_id)
        except OSError as exc:
            logger.error("undo failed: %s", exc)
            raise HTTPException(503, f"undo failed: could not rewrite the votes file ({exc})") from exc

    @app.get("/api/stats")
    def get_stats() -> dict:
        return session.stats()

    @app.get("/api/browse")
    def get_browse(sort: str | None = None) -> dict:
        return session.browse(sort)

    @app.get("/api/model")
    def get_model() -> dict:
        return session.live.status() if session.live is not None else {"enabled": False}

    @app.post("/api/model/save")
    def post_model_save(body: SaveIn) -> dict:
        return {"saved_to": _live().save()}

    @app.post("/api/score-folder")
    def post_score_folder(body: ScoreFolderIn) -> dict:
        return _live().score_folder(body.path).public()

    @app.get("/api/jobs")
    def get_jobs() -> dict:
        return {"jobs": _live().jobs()}

    @app.get("/api/jobs/{job_id}")
    def get_job(job_id: str = FastApiPath(pattern=_PAIR_ID)) -> dict:
        job = _live().job(job_id)
        if job is None:
            raise HTTPException(404, "no such job")
        out = job.public()
        for it in out.get("items", []):
            it["thumb"] = image_url(it["path"], f"/scored/{job.id}/")
        return out

    @app.get("/scored/{job_id}/{relpath:path}", include_in_schema=False)
    def get_scored_thumb(job_id: str, relpath: str) -> Response:
        real = session.live.scored_file(job_id, relpath) if session.live is not None else None
        if real is None:
            raise HTTPException(404, "not found")
        try:
            data = _thumbnail(real, os.stat(real).st_mtime_ns, THUMB_SIZE)
        except Exception as exc:
            raise HTTPException(404, f"cannot decode image: {exc}") from exc
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    def _real(relpath: str) -> str:
        real = session.image_file(relpath)
        if real is None:
            raise HTTPException(404, "not found")
        return real

    @app.get("/img/{relpath:path}", include_in_schema=False)
    def get_image(relpath: str) -> Response:
        real = _real(relpath)
        suffix = os.path.splitext(real)[1].lower()
        if suffix in BROWSER_FORMATS:
            media = mimetypes.guess_type(real)[0] or "application/octet-stream"
            return FileResponse(real, media_type=media)
        try:
            return Response(_as_png(real), media_type="image/png")
        except Exception as exc:  # ImageDecodeError and friends: a broken file is not a server error
            raise HTTPException(404, f"cannot decode image: {exc}") from exc

    @app.get("/thumb/{relpath:path}", include_in_schema=False)
    def get_thumb(relpath: str) -> Response:
        real = _real(relpath)
        try:
            data = _thumbnail(real, os.stat(real).st_mtime_ns, THUMB_SIZE)
        except Exception as exc:
            raise HTTPException(404, f"cannot decode image: {exc}") from exc
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app
