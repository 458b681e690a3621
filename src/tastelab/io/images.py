"""Robust image decoding and model-input preprocessing for large (10M+) image collections.

Scraped collections contain every kind of broken or unusual file: HTML error pages saved as
``.jpg``, truncated downloads, 16-bit PNGs, CMYK JPEGs, palette images with transparency,
decompression bombs.  This module turns all of them into one of two outcomes — a fully
loaded RGB :class:`PIL.Image.Image` or an :class:`ImageDecodeError` with a short reason — so
that data loaders can skip and count bad files instead of crashing a multi-hour job.

The split of work is deliberate:

* DataLoader workers call :func:`load_and_preprocess`, which decodes (using JPEG draft mode
  so that no more pixels than needed are decoded), resizes with Pillow and returns a small
  ``uint8`` tensor that is cheap to pass between processes (4x smaller than float32).
* The training / inference loop calls :func:`normalize_batch` on the collated batch *after*
  moving it to the accelerator, so that the float conversion runs on the GPU.
* ONNX Runtime takes host arrays: :func:`preprocess_to_array` and :func:`normalize_array` are the
  same steps on NumPy arrays, so scoring through an ONNX model never imports torch (seconds of
  start-up); torch is imported only by the functions that return tensors.

Nothing here touches Pillow's process-global knobs (``Image.MAX_IMAGE_PIXELS``,
``ImageFile.LOAD_TRUNCATED_IMAGES``): limits are passed per call so that threads and
libraries sharing the process cannot change each other's behaviour.
"""

from __future__ import annotations

import io
import logging
import os
import stat
import struct
from collections.abc import Sequence
from typing import IO, TYPE_CHECKING, Literal

import numpy as np
from PIL import ExifTags, Image, ImageFile, ImageOps, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat

if TYPE_CHECKING:
    import torch

__all__ = [
    "ALPHA_BACKGROUND",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MAX_IMAGE_PIXELS",
    "ImageDecodeError",
    "PreprocessConfig",
    "load_and_preprocess",
    "load_image",
    "normalize_array",
    "normalize_batch",
    "open_regular_file",
    "preprocess_to_array",
    "preprocess_to_uint8",
    "read_regular_file",
]

logger = logging.getLogger(__name__)

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

#: Default per-call pixel limit: twice Pillow's default warning threshold, which is exactly the
#: point where Pillow itself raises ``DecompressionBombError``.  Large enough for 100+ MP
#: camera images, small enough that a single image cannot exhaust a worker's memory.
MAX_IMAGE_PIXELS: int = 178_956_970

#: Colour that transparent pixels are composited over.  White, because that is how the vast
#: majority of transparent images (logos, product shots, stickers) are displayed on the web,
#: which is the context in which humans rated them.  Black would turn dark-on-transparent
#: artwork into a black square; dropping alpha would expose arbitrary hidden colours.
ALPHA_BACKGROUND: tuple[int, int, int] = (255, 255, 255)

#: ``Image.resize(reducing_gap=...)``: first shrink by an integer factor with a cheap box
#: filter, then resample the last <= 3x with the real filter.  Pillow documents 3.0 as
#: practically indistinguishable from full resampling, and it is several times faster when
#: downscaling large photos.
REDUCING_GAP: float = 3.0

_RESAMPLING: dict[str, Image.Resampling] = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_TIFF_BITS_PER_SAMPLE = 258

ImageSource = str | os.PathLike | bytes | bytearray | memoryview | Image.Image


class ImageDecodeError(Exception):
    """A file that cannot be turned into an RGB image.

    Carries the offending ``path`` and a short, human-readable ``reason`` so that loaders can
    log/skip/count failures by cause (``"truncated image data"``, ``"too many pixels ..."``)
    without parsing Pillow's varied messages.  ``reason`` has a default so the exception can be
    re-created from a single message string, which is what PyTorch's DataLoader does when it
    re-raises a worker exception in the main process; ``args`` holds both fields so it pickles.
    """

    def __init__(self, path: str, reason: str = "cannot decode image") -> None:
        super().__init__(path, reason)
        self.path = path
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


#: Largest model input side a config may ask for (pixels); 4096 x 4096 RGB is 200 MB per float32 image.
MAX_INPUT_SIZE = 4096


class PreprocessConfig(BaseModel):
    """How a decoded image becomes a square model input.

    ``resize`` modes:

    * ``squash``: resize to ``size x size`` ignoring aspect ratio (what most aesthetic
      predictors, e.g. the LAION/CLIP-MLP family, were trained with: no content is cut off).
    * ``center_crop``: shorter side to ``size``, then crop the centre square (torchvision's
      ``Resize(size) + CenterCrop(size)``).
    * ``pad``: longer side to ``size``, letterbox with the mean colour (which normalises to 0).
    """

    # Non-finite numbers are errors; the size is bounded because a config is data a model folder brings
    # along: size 100000 would make every image a ~30 GB tensor.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    size: int = Field(224, gt=0, le=MAX_INPUT_SIZE)
    resize: Literal["squash", "center_crop", "pad"] = "squash"
    interpolation: Literal["bilinear", "bicubic", "lanczos"] = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[PositiveFloat, PositiveFloat, PositiveFloat] = IMAGENET_STD


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------


def load_image(
    source: ImageSource,
    *,
    max_pixels: int | None = MAX_IMAGE_PIXELS,
    draft_size: int | None = None,
    background: tuple[int, int, int] = ALPHA_BACKGROUND,
) -> Image.Image:
    """Decode ``source`` into a fully loaded RGB image, or raise :class:`ImageDecodeError`.

    Args:
        source: a file path (``str``/``os.PathLike``), the encoded file contents (``bytes``-like;
            bytes are always *data*, never a path) or an existing PIL image.  A PIL image is
            never modified; if it is already a loaded RGB image without EXIF rotation it is
            returned as is, so treat the result as read-only.
        max_pixels: reject images whose declared ``width * height`` exceeds this, *before*
            any pixel is decoded.  ``None`` disables the check (trusted data only).
        draft_size: the square side the caller will resize to.  For JPEGs, decoding is done at
            the smallest power-of-two DCT scale (1/2, 1/4, 1/8) that still leaves both sides
            ``>= draft_size``; much faster and lighter for large photos.  Other formats and PIL
            inputs are decoded at full size.
        background: colour that transparent pixels are composited over.

    EXIF orientation is applied, the first frame of animated images is used, and every Pillow
    mode is mapped to 8-bit RGB (see :func:`_to_rgb`).  Colour profiles (ICC) are not applied.
    """
    if isinstance(source, Image.Image):
        label = str(getattr(source, "filename", "") or "<PIL.Image>")
        _check_pixels(source.size, max_pixels, label)
        _load_pixels(source, label)  # a no-op unless the caller passed a lazily opened file
        return _finish(source, label, background, owned=False)

    if isinstance(source, (bytes, bytearray, memoryview)):
        return _decode_stream(io.BytesIO(source), "<bytes>", max_pixels, draft_size, background)

    label = os.fsdecode(source)
    with open_regular_file(source) as stream:
        return _decode_stream(stream, label, max_pixels, draft_size, background)


# --------------------------------------------------------------------------------------------
# Opening files: regular files only, never a blocking open
# --------------------------------------------------------------------------------------------

#: ``O_NONBLOCK``: opening a FIFO for reading with it returns at once instead of waiting for a
#: writer (and a FIFO swapped in after the ``stat`` is then caught by ``fstat``). Regular files
#: ignore the flag. ``O_NOCTTY``: a terminal device can never become our controlling terminal.
_OPEN_FLAGS = (os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
               | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0))

_FILE_KINDS: tuple[tuple[object, str], ...] = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def _not_regular_reason(mode: int) -> str | None:
    """Why a file of this ``st_mode`` is not read as an image (``None`` for a regular file)."""
    if stat.S_ISREG(mode):
        return None
    kind = next((name for test, name in _FILE_KINDS if test(mode)), "not a regular file")  # type: ignore[operator]
    return f"not a regular file ({kind}); only regular files are read"


def open_regular_file(path: str | os.PathLike | bytes) -> IO[bytes]:
    """Open ``path`` for binary reading when, and only when, it is a regular file.

    Why: ``open()`` on a FIFO blocks until some other process writes to it (forever, in a scoring
    run), and reading a character device such as ``/dev/zero`` never ends. The kind is decided by
    ``stat`` (following symlinks) *before* any open; the open itself is non-blocking and the
    descriptor is checked again with ``fstat``, so a file swapped for a FIFO in between is refused
    too. Raises :class:`ImageDecodeError` with a short reason for anything else.
    """
    label = os.fsdecode(path)
    try:
        reason = _not_regular_reason(os.stat(path).st_mode)
    except OSError as exc:
        raise ImageDecodeError(label, _os_error_reason(exc)) from exc
    if reason is not None:
        raise ImageDecodeError(label, reason)
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as exc:
        raise ImageDecodeError(label, _os_error_reason(exc)) from exc
    try:
        reason = _not_regular_reason(os.fstat(fd).st_mode)
        if reason is not None:
            raise ImageDecodeError(label, reason)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular_file(path: str | os.PathLike | bytes) -> bytes:
    """All bytes of a regular file (see :func:`open_regular_file`); ImageDecodeError otherwise."""
    with open_regular_file(path) as f:
        try:
            return f.read()
        except OSError as exc:
            raise ImageDecodeError(os.fsdecode(path), _os_error_reason(exc)) from exc


def _decode_stream(
    stream: IO[bytes],
    label: str,
    max_pixels: int | None,
    draft_size: int | None,
    background: tuple[int, int, int],
) -> Image.Image:
    """Open, size-check, (draft), load and convert one encoded image held in ``stream``."""
    img = _open(stream, label, max_pixels)
    _check_pixels(img.size, max_pixels, label)
    if draft_size:
        _apply_draft(img, draft_size)
    _load_pixels(img, label)
    return _finish(img, label, background, owned=True)


def _open(stream: IO[bytes], label: str, max_pixels: int | None) -> ImageFile.ImageFile:
    """Identify the format and read the header (no pixel data) with clean errors.

    ``Image.open`` applies the *process-global* ``Image.MAX_IMAGE_PIXELS`` (raising above 2x,
    warning above 1x).  Our limit is per call, so when Pillow's global check fires we re-open
    without it and let :func:`_check_pixels` decide with the caller's limit instead.
    """
    try:
        return Image.open(stream)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        logger.debug("%s: Pillow's global pixel limit fired (%s); applying per-call limit", label, exc)
    except UnidentifiedImageError as exc:
        raise ImageDecodeError(label, _unidentified_reason(stream)) from exc
    except Exception as exc:  # any decoder failure on untrusted bytes == undecodable file
        raise ImageDecodeError(label, _exception_reason(exc)) from exc
    return _open_without_global_limit(stream, label, max_pixels)


def _open_without_global_limit(stream: IO[bytes], label: str, max_pixels: int | None) -> ImageFile.ImageFile:
    """Re-implementation of ``Image.open``'s format probe minus its global bomb check.

    Only reached in the rare case above, so leaning on Pillow's plugin registry (``Image.ID``,
    ``Image.OPEN``; the public hooks plugins register through) is acceptable.  If those ever
    change shape we fail closed with a "too many pixels" error rather than decode unchecked.
    """
    try:
        Image.init()
        plugins = [Image.OPEN[fmt] for fmt in Image.ID]
    except (AttributeError, KeyError) as exc:
        limit = "unlimited" if max_pixels is None else f"{max_pixels:,}"
        reason = f"too many pixels (over Pillow's global limit; max_pixels={limit})"
        raise ImageDecodeError(label, reason) from exc
    stream.seek(0)
    prefix = stream.read(16)
    for factory, accept in plugins:
        verdict = accept(prefix) if accept else True
        if not verdict or isinstance(verdict, str):  # a str is Pillow's "almost, but no"
            continue
        stream.seek(0)
        try:
            return factory(stream, "")
        except (SyntaxError, IndexError, TypeError, struct.error):
            continue  # same "not this format" exceptions Image.open skips over
        except Exception as exc:
            raise ImageDecodeError(label, _exception_reason(exc)) from exc
    raise ImageDecodeError(label, _unidentified_reason(stream))


def _check_pixels(size: tuple[int, int], max_pixels: int | None, label: str) -> None:
    """Reject oversized images from the header alone, before any allocation for pixels."""
    if max_pixels is None:
        return
    width, height = size
    pixels = width * height
    if pixels > max_pixels:
        raise ImageDecodeError(
            label,
            f"too many pixels ({width}x{height} = {pixels:,} > max_pixels={max_pixels:,}); "
            "possible decompression bomb",
        )


def _apply_draft(img: ImageFile.ImageFile, draft_size: int) -> None:
    """Ask the JPEG decoder to decode at a reduced DCT scale; a no-op for other formats.

    Pillow's JPEG ``draft`` picks the largest scale in {1, 2, 4, 8} with
    ``scale <= min(w // size, h // size)``, so both decoded sides stay ``>= draft_size``:
    enough for squash (each side), center_crop (shorter side) and pad (longer side).  A square
    request keeps this true after an EXIF 90-degree rotation.
    """
    original = img.size
    try:
        img.draft("RGB", (draft_size, draft_size))
    except Exception as exc:  # draft is an optimisation only; never fail an image over it
        logger.debug("draft mode failed for %s: %s", getattr(img, "format", "?"), exc)
        return
    if img.size != original:
        logger.debug("draft decode %s -> %s", original, img.size)


def _load_pixels(img: Image.Image, label: str) -> None:
    """Decode the pixel data, mapping Pillow's many failure types to one error with a reason."""
    try:
        img.load()
    except ImageDecodeError:
        raise
    except Exception as exc:
        raise ImageDecodeError(label, _exception_reason(exc)) from exc


def _finish(img: Image.Image, label: str, background: tuple[int, int, int], *, owned: bool) -> Image.Image:
    """Apply EXIF orientation and convert to RGB; all failures become ImageDecodeError."""
    try:
        img = _exif_transpose(img, label, owned=owned)
        return _to_rgb(img, background)
    except ImageDecodeError:
        raise
    except Exception as exc:
        raise ImageDecodeError(label, _exception_reason(exc)) from exc


def _exif_transpose(img: Image.Image, label: str, *, owned: bool) -> Image.Image:
    """Rotate/flip according to the EXIF Orientation tag.

    The tag is checked first because ``ImageOps.exif_transpose`` returns a full *copy* when
    there is nothing to do, a needless allocation for the ~95% of images without rotation.
    Broken EXIF blocks are common in the wild and must not cost us an otherwise fine image.
    """
    try:
        orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception as exc:
        logger.debug("%s: unreadable EXIF ignored (%s)", label, exc)
        return img
    if orientation not in range(2, 9):
        return img
    if owned:
        ImageOps.exif_transpose(img, in_place=True)
        return img
    return ImageOps.exif_transpose(img)


def _to_rgb(img: Image.Image, background: tuple[int, int, int] = ALPHA_BACKGROUND) -> Image.Image:
    """Map any Pillow mode to 8-bit RGB with sensible semantics.

    * RGB: returned as is (no copy).
    * Alpha (RGBA, LA, PA, premultiplied) and palette/L/RGB with a ``transparency`` entry:
      composited over ``background``.
    * 16-bit integer (``I;16*``) and ``I``: scaled by the bit depth (see :func:`_int_to_l`),
      because Pillow's own ``convert`` clips to 0..255, turning most 16-bit images white.
    * ``F`` (float): see :func:`_float_to_l`.
    * CMYK (incl. Adobe-inverted JPEG CMYK, which Pillow un-inverts), L, 1, P, YCbCr, ...:
      Pillow's ``convert("RGB")`` (naive CMYK formula, no ICC).
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in _ALPHA_MODES or "transparency" in img.info:
        return _composite(img.convert("RGBA"), background)
    if mode in _SIXTEEN_BIT_MODES or mode == "I":
        return _int_to_l(img).convert("RGB")
    if mode == "F":
        return _float_to_l(img).convert("RGB")
    return img.convert("RGB")


def _composite(rgba: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Alpha-blend an RGBA image over a solid colour (one paste, no extra RGBA canvas)."""
    canvas = Image.new("RGB", rgba.size, background)
    canvas.paste(rgba, mask=rgba.getchannel("A"))
    return canvas


def _int_to_l(img: Image.Image) -> Image.Image:
    """Scale integer samples to 8 bits by the image's real bit depth (not by its min/max).

    Using the bit depth keeps a dark 16-bit photo dark.  ``I;16*`` are 16-bit unless a TIFF
    declares fewer bits (e.g. 12-bit scientific/medical data).  Mode ``I`` is a 32-bit
    container with no depth of its own; it is almost always 16-bit data (older Pillow decoded
    16-bit PNGs to ``I``), so values in 0..65535 are treated as 16-bit and anything else
    (negative or wider data) is min-max stretched as the only sensible fallback.
    """
    arr = np.asarray(img)
    if img.mode == "I":
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > 0xFFFF:
            return _stretch_to_l(arr.astype(np.float64))
        bits = 16
    else:
        bits = _declared_bits(img) or 16
    max_value = (1 << bits) - 1
    scaled = (np.minimum(arr, max_value).astype(np.uint32) * 255 + max_value // 2) // max_value
    return Image.fromarray(scaled.astype(np.uint8))


def _declared_bits(img: Image.Image) -> int | None:
    """BitsPerSample from a TIFF header when it is a sensible sub-16-bit depth, else None."""
    tags = getattr(img, "tag_v2", None)
    if tags is None:
        return None
    bits = tags.get(_TIFF_BITS_PER_SAMPLE)
    if isinstance(bits, tuple):
        bits = bits[0] if bits else None
    return int(bits) if isinstance(bits, int) and 1 <= bits <= 16 else None


def _float_to_l(img: Image.Image) -> Image.Image:
    """Map float samples to 8 bits.  Floats carry no declared range, so infer the common ones.

    Values within [0, 1] are treated as normalised intensities (x255), values within
    [0, 255] as 8-bit intensities, anything else (HDR, depth maps) is min-max stretched.
    NaN/inf become 0.
    """
    arr = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = float(arr.min()), float(arr.max())
    if lo >= 0.0 and hi <= 1.0:
        return Image.fromarray(np.rint(arr * 255.0).astype(np.uint8))
    if lo >= 0.0 and hi <= 255.0:
        return Image.fromarray(np.rint(arr).astype(np.uint8))
    return _stretch_to_l(arr)


def _stretch_to_l(arr: np.ndarray) -> Image.Image:
    """Linearly map [min, max] to [0, 255]; a constant image becomes black."""
    lo, hi = float(arr.min()), float(arr.max())
    span = hi - lo
    scaled = np.zeros(arr.shape, dtype=np.float64) if span <= 0 else (arr - lo) * (255.0 / span)
    return Image.fromarray(np.rint(scaled).astype(np.uint8))


# --------------------------------------------------------------------------------------------
# Error reasons
# --------------------------------------------------------------------------------------------


def _os_error_reason(exc: OSError) -> str:
    """Short reason for a failure to open the file itself."""
    if isinstance(exc, FileNotFoundError):
        return "file not found"
    if isinstance(exc, IsADirectoryError):
        return "is a directory, not a file"
    if isinstance(exc, PermissionError):
        return "permission denied"
    return f"cannot read file ({exc.strerror or exc})"


def _unidentified_reason(stream: IO[bytes]) -> str:
    """Explain why no image format matched, by sniffing the first bytes (error path only).

    Scraped datasets are full of HTML error pages and empty downloads saved with image
    extensions; saying so directly saves a lot of debugging.
    """
    try:
        stream.seek(0)
        head = stream.read(512)
    except Exception:
        return "unrecognised image format"
    if not head:
        return "empty file (0 bytes)"
    stripped = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if stripped.startswith((b"<!doctype html", b"<html", b"<?xml", b"<head", b"<body", b"{", b"[")):
        return "not an image: looks like an HTML/XML/JSON document"
    if _looks_like_text(head):
        return "not an image: looks like a text file"
    return f"unrecognised image format (starts with {head[:8].hex()})"


def _looks_like_text(head: bytes) -> bool:
    """True for UTF-8 content without control characters other than whitespace."""
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(ch.isprintable() or ch in "\t\r\n" for ch in text)


def _exception_reason(exc: BaseException) -> str:
    """Normalise Pillow's decoder exceptions into a short, greppable reason."""
    message = str(exc) or type(exc).__name__
    lowered = message.lower()
    if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return f"too many pixels ({message})"
    if "truncated" in lowered or isinstance(exc, EOFError):
        return f"truncated image data (file ends early: {message})"
    if isinstance(exc, MemoryError):
        return "out of memory while decoding"
    return f"corrupt image data ({type(exc).__name__}: {message})"


# --------------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------------


def preprocess_to_uint8(img: Image.Image, cfg: PreprocessConfig) -> torch.Tensor:
    """Resize ``img`` per ``cfg`` and return a contiguous ``(3, size, size)`` uint8 tensor.

    Runs in DataLoader workers: resizing with Pillow there keeps the GPU free, and a uint8
    tensor is 4x cheaper than float32 to ship through the worker -> main process queue.
    Non-RGB input is converted with the same rules as :func:`load_image`.
    """
    import torch

    # preprocess_to_array's array is contiguous *and* writable: torch.from_numpy shares it, no copy.
    return torch.from_numpy(preprocess_to_array(img, cfg))


def preprocess_to_array(img: Image.Image, cfg: PreprocessConfig) -> np.ndarray:
    """:func:`preprocess_to_uint8` as a NumPy ``(3, size, size)`` uint8 array (the torch-free path)."""
    if img.mode != "RGB":
        img = _to_rgb(img)
    resample = _RESAMPLING[cfg.interpolation]
    if cfg.resize == "squash":
        out = _resize(img, (cfg.size, cfg.size), resample)
    elif cfg.resize == "center_crop":
        out = _center_crop(img, cfg.size, resample)
    else:
        out = _letterbox(img, cfg.size, resample, _mean_colour(cfg.mean))
    return _to_chw_array(out)


def _resize(
    img: Image.Image,
    size: tuple[int, int],
    resample: Image.Resampling,
    box: tuple[float, float, float, float] | None = None,
) -> Image.Image:
    """Pillow resize with ``reducing_gap``; skips the call (and its copy) when nothing changes."""
    if box is None and img.size == size:
        return img
    return img.resize(size, resample, box=box, reducing_gap=REDUCING_GAP)


def _center_crop(img: Image.Image, size: int, resample: Image.Resampling) -> Image.Image:
    """Shorter side to ``size`` + centre crop, done as one resize of the central source square.

    Resizing only the (float) source box is equivalent to resize-then-crop but never
    materialises the discarded borders.
    """
    width, height = img.size
    side = min(width, height)
    left = (width - side) / 2.0
    top = (height - side) / 2.0
    box = (left, top, left + side, top + side)
    if box == (0.0, 0.0, float(width), float(height)):
        return _resize(img, (size, size), resample)
    return _resize(img, (size, size), resample, box=box)


def _letterbox(
    img: Image.Image, size: int, resample: Image.Resampling, fill: tuple[int, int, int]
) -> Image.Image:
    """Longer side to ``size``, centred on a ``fill``-coloured square canvas."""
    width, height = img.size
    scale = size / max(width, height)
    new_w = min(size, max(1, round(width * scale)))
    new_h = min(size, max(1, round(height * scale)))
    resized = _resize(img, (new_w, new_h), resample)
    if resized.size == (size, size):
        return resized
    canvas = Image.new("RGB", (size, size), fill)
    canvas.paste(resized, ((size - new_w) // 2, (size - new_h) // 2))
    return canvas


def _mean_colour(mean: Sequence[float]) -> tuple[int, int, int]:
    """The 8-bit colour that normalises to ~0, so padding carries no signal."""
    r, g, b = (min(255, max(0, round(m * 255.0))) for m in mean)
    return r, g, b


def _to_chw_array(img: Image.Image) -> np.ndarray:
    """HWC RGB image -> contiguous, writable CHW uint8 array with a single copy beyond Pillow's.

    ``np.asarray`` wraps Pillow's byte export read-only; the transpose copy makes it
    contiguous *and* writable, so ``torch.from_numpy`` shares it without a warning or copy.
    """
    hwc = np.asarray(img)
    return np.ascontiguousarray(hwc.transpose(2, 0, 1))


def load_and_preprocess(
    path: ImageSource,
    cfg: PreprocessConfig,
    max_pixels: int | None = MAX_IMAGE_PIXELS,
) -> torch.Tensor:
    """Decode + preprocess in one go, the DataLoader-worker entry point.

    Passes ``cfg.size`` as the JPEG draft size, so a 12 MP photo destined for 224x224 is
    decoded at 1/8 scale instead of in full.  Raises :class:`ImageDecodeError` for bad files.
    """
    img = load_image(path, max_pixels=max_pixels, draft_size=cfg.size)
    return preprocess_to_uint8(img, cfg)


# --------------------------------------------------------------------------------------------
# Normalisation (on the accelerator)
# --------------------------------------------------------------------------------------------


def normalize_batch(
    batch_uint8: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``(B, 3, H, W)`` (or ``(3, H, W)``) uint8 -> ``(x / 255 - mean) / std`` in ``dtype`` (default float32).

    Computed on whatever device the batch lives on: move the uint8 batch to the GPU first
    (4x less PCIe traffic than float32) and the arithmetic runs there.  The arithmetic is the
    same sequence of operations as ``torchvision.transforms.functional.normalize(x / 255)``,
    so results are bit-identical in float32; half/bfloat16 outputs are computed in float32 and
    rounded once at the end instead of accumulating low-precision error.
    """
    import torch

    dtype = torch.float32 if dtype is None else dtype
    if batch_uint8.dtype != torch.uint8:
        raise TypeError(f"normalize_batch expects a uint8 tensor, got {batch_uint8.dtype}")
    _check_layout(tuple(batch_uint8.shape), mean, std)
    if not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating point type, got {dtype}")

    work_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    device = batch_uint8.device
    mean_t = torch.as_tensor(mean, dtype=work_dtype, device=device).view(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=work_dtype, device=device).view(-1, 1, 1)
    out = batch_uint8.to(work_dtype).div_(255.0).sub_(mean_t).div_(std_t)
    return out if out.dtype == dtype else out.to(dtype)


def normalize_array(batch_uint8: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """:func:`normalize_batch` for NumPy (float32 out): the input of an ONNX graph, without torch.

    The same float32 operations in the same order (``/ 255``, ``- mean``, ``/ std``), so the pixels an
    ONNX model sees match what :func:`normalize_batch` gives the PyTorch model.
    """
    if batch_uint8.dtype != np.uint8:
        raise TypeError(f"normalize_array expects a uint8 array, got {batch_uint8.dtype}")
    _check_layout(batch_uint8.shape, mean, std)
    mean_a = np.asarray(mean, dtype=np.float32).reshape(-1, 1, 1)
    std_a = np.asarray(std, dtype=np.float32).reshape(-1, 1, 1)
    out = batch_uint8.astype(np.float32)
    out /= np.float32(255.0)
    out -= mean_a
    out /= std_a
    return out


def _check_layout(shape: tuple[int, ...], mean: Sequence[float], std: Sequence[float]) -> None:
    if len(shape) not in (3, 4) or shape[-3] != len(mean):
        raise ValueError(f"expected (B, {len(mean)}, H, W) or ({len(mean)}, H, W), got {shape}")
    if len(mean) != len(std):
        raise ValueError(f"mean and std differ in length: {len(mean)} vs {len(std)}")
