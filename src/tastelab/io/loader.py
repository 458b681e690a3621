"""Streaming image batches: decode + resize in DataLoader workers, uint8 across processes.

Shared by scoring and feature extraction so both get the same parallel pipeline: workers read the
file once (optionally hashing its bytes for the feature cache), decode with JPEG draft mode, resize,
and hand back ``(3, S, S)`` uint8 tensors; a file that fails becomes an error entry with its reason.
URL inputs are fetched in the same workers (only with ``allow_urls``), so network latency overlaps
with the model exactly like disk latency does.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from tastelab.io.batches import decode_to_array, default_workers, failure_reason
from tastelab.io.images import MAX_IMAGE_PIXELS, PreprocessConfig, read_regular_file
from tastelab.io.urls import DEFAULT_URL_TIMEOUT, is_url, read_url

__all__ = ["Batch", "ImageFileDataset", "collate", "content_hash", "default_workers", "iter_batches"]


def content_hash(data: bytes) -> str:
    """Identity of an image's bytes (blake2b-128): a changed file never matches a stale cache entry."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


@dataclass
class Batch:
    """Decoded images of one batch; ``index`` are positions in the input list.

    With ``encoded_jpeg`` loading, JPEGs arrive still encoded in ``encoded`` (position, 1-D uint8 bytes,
    EXIF orientation) for :mod:`tastelab.io.device_decode`; other files are decoded in ``pixels``.
    """

    index: list[int]
    pixels: torch.Tensor | None  # (B, 3, S, S) uint8, or None when no item was decoded here
    errors: list[tuple[int, str]] = field(default_factory=list)  # (position, reason)
    encoded: list[tuple[int, torch.Tensor, int]] = field(default_factory=list)


# (position, pixels | encoded bytes | None, error | None, EXIF orientation when the tensor is encoded)
Item = tuple[int, "torch.Tensor | None", "str | None", "int | None"]


class ImageFileDataset(Dataset):
    """One item = one file: ``(index, uint8 tensor | None, error | None, orientation | None)``.

    ``encoded_jpeg``: JPEGs the device decoder handles are read (not decoded) and returned as their
    bytes with the EXIF orientation; everything else is decoded here as usual.
    """

    def __init__(self, paths: Sequence[str], preprocess: PreprocessConfig, *,
                 max_pixels: int | None = MAX_IMAGE_PIXELS, hflip: bool = False, allow_urls: bool = False,
                 url_timeout: float = DEFAULT_URL_TIMEOUT, encoded_jpeg: bool = False) -> None:
        self.paths = paths
        self.preprocess = preprocess
        self.max_pixels = max_pixels
        self.hflip = hflip
        self.allow_urls = allow_urls
        self.url_timeout = url_timeout
        self.encoded_jpeg = encoded_jpeg

    def __len__(self) -> int:
        return len(self.paths)

    def _read(self, path: str) -> bytes:
        if is_url(path):
            return read_url(path, allow_urls=self.allow_urls, timeout=self.url_timeout)
        return read_regular_file(path)  # regular files only: a FIFO or device never blocks a worker

    def __getitem__(self, i: int) -> Item:
        path = self.paths[i]
        try:
            if self.encoded_jpeg:
                from tastelab.io.device_decode import probe_jpeg  # optional heavy: torchvision / torchcodec

                data = self._read(path)
                orientation = probe_jpeg(data, path, self.max_pixels)
                if orientation is not None:
                    return i, torch.frombuffer(bytearray(data), dtype=torch.uint8), None, orientation
                source: Any = data
            else:
                source = path
            t = torch.from_numpy(decode_to_array(source, self.preprocess, max_pixels=self.max_pixels,
                                                 allow_urls=self.allow_urls, url_timeout=self.url_timeout))
            if self.hflip:
                t = t.flip(-1).contiguous()
            return i, t, None, None
        except Exception as exc:  # one odd file must not kill a ten-million-image run
            return i, None, failure_reason(exc), None


def collate(items: list[Item]) -> Batch:
    decoded = [it for it in items if it[1] is not None and it[3] is None]
    return Batch(
        index=[it[0] for it in decoded],
        pixels=torch.stack([it[1] for it in decoded]) if decoded else None,  # type: ignore[misc]
        errors=[(it[0], it[2] or "unknown error") for it in items if it[1] is None],
        encoded=[(it[0], it[1], it[3]) for it in items if it[1] is not None and it[3] is not None],
    )


def iter_batches(paths: Sequence[str], preprocess: PreprocessConfig, *, batch_size: int = 32,
                 workers: int | None = None, pin_memory: bool = False, hflip: bool = False,
                 max_pixels: int | None = MAX_IMAGE_PIXELS,
                 prefetch_factor: int = 4, allow_urls: bool = False,
                 url_timeout: float = DEFAULT_URL_TIMEOUT, encoded_jpeg: bool = False) -> Iterator[Batch]:
    """Yield decoded batches in input order; memory stays bounded by the prefetch depth.

    ``http(s)://`` and ``file://`` entries are fetched in the workers when ``allow_urls`` is set; otherwise
    they become error entries saying so (a scoring run never reaches the network unasked).
    """
    if not paths:
        return
    if encoded_jpeg and hflip:
        raise ValueError("hflip applies to decoded pixels; it cannot be combined with encoded_jpeg")
    workers = default_workers() if workers is None else workers
    dataset = ImageFileDataset(paths, preprocess, max_pixels=max_pixels, hflip=hflip, allow_urls=allow_urls,
                               url_timeout=url_timeout, encoded_jpeg=encoded_jpeg)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate,
                        pin_memory=pin_memory, prefetch_factor=prefetch_factor if workers else None)
    yield from loader
