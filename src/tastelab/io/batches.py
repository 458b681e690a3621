"""Image batches as NumPy arrays, without torch: the decode step of ONNX Runtime scoring.

:mod:`tastelab.io.loader` streams batches through a torch DataLoader (uint8 tensors across processes).
A model that runs in ONNX Runtime needs no tensor at all, and importing torch costs seconds at start-up,
so this module decodes the same way (one file -> :func:`decode_to_array`, which the DataLoader's dataset
also uses) and batches with NumPy: inline when there are no workers or a single batch, else in a process
pool with a bounded number of batches in flight (memory stays flat over millions of files).
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from tastelab.io.images import MAX_IMAGE_PIXELS, ImageDecodeError, PreprocessConfig, load_image, preprocess_to_array
from tastelab.io.urls import DEFAULT_URL_TIMEOUT, is_url, read_url


def default_workers(device: str = "cuda") -> int:
    """Decode worker processes for a run on ``device``.

    With an accelerator the CPU only decodes, so use every core but one. On a CPU the model's own
    threads already use every core and a decode worker competes with them: measured on 2 cores with the
    default model, inline decoding scores 9.2 img/s and one worker 8.0 img/s. So CPUs get no workers up
    to 2 cores and a quarter of the cores beyond.
    """
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if device == "cpu":
        return 0 if n <= 2 else max(1, n // 4)
    return max(1, n - 1)


def decode_to_array(path: str | bytes, preprocess: PreprocessConfig, *, max_pixels: int | None = MAX_IMAGE_PIXELS,
                    allow_urls: bool = False, url_timeout: float = DEFAULT_URL_TIMEOUT) -> np.ndarray:
    """One file, an allowed URL or encoded bytes -> ``(3, S, S)`` uint8; ImageDecodeError says why not."""
    source = read_url(path, allow_urls=allow_urls, timeout=url_timeout) if isinstance(path, str) and is_url(path) \
        else path
    img = load_image(source, max_pixels=max_pixels, draft_size=preprocess.size)
    return preprocess_to_array(img, preprocess)


def failure_reason(exc: BaseException) -> str:
    """The error text a file that failed to decode gets (ImageDecodeError's reason, else type: message)."""
    if isinstance(exc, ImageDecodeError):
        return exc.reason
    return f"{type(exc).__name__}: {exc}"


@dataclass
class ArrayBatch:
    """Decoded images of one batch: ``pixels[k]`` is input position ``index[k]``; failures in ``errors``."""

    index: list[int]
    pixels: np.ndarray | None  # (B, 3, S, S) uint8, or None when no image of the batch decoded
    errors: list[tuple[int, str]] = field(default_factory=list)  # (position, reason)


def _decode_batch(start: int, paths: Sequence[str], preprocess: PreprocessConfig, max_pixels: int | None,
                  allow_urls: bool, url_timeout: float) -> ArrayBatch:
    index, arrays, errors = [], [], []
    for k, path in enumerate(paths):
        try:
            arrays.append(decode_to_array(path, preprocess, max_pixels=max_pixels, allow_urls=allow_urls,
                                          url_timeout=url_timeout))
            index.append(start + k)
        except Exception as exc:  # one odd file must not kill a ten-million-image run
            errors.append((start + k, failure_reason(exc)))
    return ArrayBatch(index=index, pixels=np.stack(arrays) if arrays else None, errors=errors)


def iter_array_batches(paths: Sequence[str], preprocess: PreprocessConfig, *, batch_size: int = 32,
                       workers: int = 0, max_pixels: int | None = MAX_IMAGE_PIXELS, allow_urls: bool = False,
                       url_timeout: float = DEFAULT_URL_TIMEOUT, prefetch: int = 2) -> Iterator[ArrayBatch]:
    """Yield :class:`ArrayBatch` es in input order (``batch_size`` inputs each, errors included).

    With ``workers`` > 0 and more than one batch, batches are decoded in that many processes (started
    with ``forkserver``/``spawn``: forking a process that runs ONNX Runtime threads is unsafe), at most
    ``workers * prefetch`` batches ahead of the consumer. With no workers, one thread of this process
    decodes the next batches while the consumer runs the model: ONNX Runtime releases the GIL and never
    keeps every core busy, and Pillow decodes and resizes without the GIL, so decoding fills the gaps
    instead of adding to each batch's time (the default on machines with 2 cores or fewer).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, not {batch_size}")
    starts = range(0, len(paths), batch_size)
    args = (preprocess, max_pixels, allow_urls, url_timeout)
    if len(starts) <= 1:
        for s in starts:
            yield _decode_batch(s, paths[s:s + batch_size], *args)
        return
    if workers <= 0:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tastelab-decode") as threads:
            yield from _in_order(threads, starts, paths, batch_size, args, prefetch)
        return
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        yield from _in_order(pool, starts, paths, batch_size, args, workers * prefetch)


def _in_order(pool: Executor, starts: range, paths: Sequence[str], batch_size: int, args: tuple,
              ahead: int) -> Iterator[ArrayBatch]:
    """Batches from ``pool`` in input order, at most ``ahead`` submitted beyond the one being consumed."""
    pending: deque[Future[ArrayBatch]] = deque()
    todo = iter(starts)
    try:
        for s in todo:
            pending.append(pool.submit(_decode_batch, s, list(paths[s:s + batch_size]), *args))
            if len(pending) >= max(1, ahead):
                break
        while pending:
            batch = pending.popleft().result()
            nxt = next(todo, None)
            if nxt is not None:
                pending.append(pool.submit(_decode_batch, nxt, list(paths[nxt:nxt + batch_size]), *args))
            yield batch
    finally:  # the consumer stopped early (an error, a break): decoded-ahead batches are not wanted
        for f in pending:
            f.cancel()
