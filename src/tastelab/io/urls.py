"""URL inputs: recognised everywhere paths are, fetched only when the caller opts in.

Path lists at scale often mix local files and web addresses. Input expansion keeps URLs verbatim (no
``normpath``, no "beside the list" rewriting) and the scorer turns each one into image bytes inside the
decode worker, so slow servers overlap with the model like slow disks do. Fetching is off by default:
a scoring run never reaches the network unless asked to, and a URL then becomes an error record that
says how to enable it. Imports stay light (no torch at import): :mod:`tastelab.io.records` uses it too.
"""

from __future__ import annotations

import urllib.error
import urllib.parse
import urllib.request

from tastelab.core.version import __version__

#: Schemes treated as URLs; anything else (``s3://`` included) is a path and fails as a missing file.
URL_SCHEMES: tuple[str, ...] = ("http://", "https://", "file://")
#: Why a URL has no score when fetching is off.
URLS_DISABLED_REASON = "URL input: fetching is off (pass --allow-urls, or allow_urls=True to Scorer)"
DEFAULT_URL_TIMEOUT = 30.0
#: Refuse bodies larger than this: a wrong link to a video or an archive must not fill the memory.
MAX_URL_BYTES = 128 * 1024 * 1024


def is_url(item: object) -> bool:
    """True for ``http://``, ``https://`` and ``file://`` strings (case-insensitive scheme)."""
    return isinstance(item, str) and item[:8].lower().startswith(URL_SCHEMES)


def fetch_url(url: str, *, timeout: float = DEFAULT_URL_TIMEOUT, max_bytes: int = MAX_URL_BYTES) -> bytes:
    """Download ``url`` with ``urllib`` (timeout per socket operation); failures raise ImageDecodeError.

    The reason is short and specific (``HTTP 404 Not Found``, ``timed out after 30s``...) because it
    ends up in the ``error`` column of the output, one row per image.
    """
    from tastelab.io.images import ImageDecodeError  # optional heavy dependency: images imports torch

    if url[:7].lower() == "file://":
        return _read_file_url(url, max_bytes)
    request = urllib.request.Request(url, headers={"User-Agent": f"tastelab/{__version__}"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            data = response.read(max_bytes + 1)
    except urllib.error.HTTPError as exc:
        raise ImageDecodeError(url, f"HTTP {exc.code} {exc.reason}") from exc
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, TimeoutError):
            raise ImageDecodeError(url, f"URL fetch timed out after {timeout:g}s") from exc
        text = reason.strerror if isinstance(reason, OSError) and reason.strerror else str(reason)
        raise ImageDecodeError(url, f"cannot fetch URL: {text}") from exc
    except TimeoutError as exc:
        raise ImageDecodeError(url, f"URL fetch timed out after {timeout:g}s") from exc
    except (OSError, ValueError) as exc:  # malformed URL, connection reset mid-body, ...
        raise ImageDecodeError(url, f"cannot fetch URL: {exc}") from exc
    if len(data) > max_bytes:
        raise ImageDecodeError(url, f"URL body larger than {max_bytes} bytes")
    return data


def _read_file_url(url: str, max_bytes: int) -> bytes:
    """A ``file://`` URL's bytes, read as every local image is (:func:`~tastelab.io.images.open_regular_file`):
    ``urlopen`` would open a FIFO and wait for a writer forever, or read a device."""
    from tastelab.io.images import ImageDecodeError, open_regular_file  # see fetch_url

    parts = urllib.parse.urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise ImageDecodeError(url, f"cannot fetch URL: file:// names a file of another host ({parts.netloc})")
    try:
        with open_regular_file(urllib.request.url2pathname(parts.path)) as f:
            data = f.read(max_bytes + 1)
    except ImageDecodeError as exc:
        raise ImageDecodeError(url, f"cannot fetch URL: {exc.reason}") from exc
    except OSError as exc:
        raise ImageDecodeError(url, f"cannot fetch URL: {exc.strerror or exc}") from exc
    if len(data) > max_bytes:
        raise ImageDecodeError(url, f"URL body larger than {max_bytes} bytes")
    return data


def read_url(url: str, *, allow_urls: bool, timeout: float = DEFAULT_URL_TIMEOUT) -> bytes:
    """A URL input's bytes, or ImageDecodeError saying that fetching is off (the default)."""
    if not allow_urls:
        from tastelab.io.images import ImageDecodeError  # torch: see fetch_url

        raise ImageDecodeError(url, URLS_DISABLED_REASON)
    return fetch_url(url, timeout=timeout)
