"""JPEG decoding on the scoring device (nvJPEG on CUDA), with resizing there too.

On a GPU box the CPU is the bottleneck of scoring: decoding a 12-megapixel JPEG costs more than the
model's forward pass for it. With ``decode="device"`` the DataLoader workers only *read* the file and
its header (format, size, EXIF orientation: cheap), ship the encoded bytes, and the main process
decodes the whole batch in one batched nvJPEG call, applies the orientation and resizes on the device.

Anything that is not a plain 8-bit RGB / greyscale JPEG (PNG, CMYK JPEG, ...) and any file the device
decoder rejects falls back to the Pillow path, so results never depend on which files happen to be
JPEGs, and a bad file still becomes an error record. The decode call comes from TorchCodec when it is
installed (torchvision's image decoders are deprecated since 0.29 in its favour) and from
``torchvision.io.decode_jpeg`` otherwise; both do batched nvJPEG on CUDA and libjpeg on CPU, which is
how this path is tested on machines without a GPU.
"""

from __future__ import annotations

import functools
import io
import logging
import warnings
from collections.abc import Callable, Sequence

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as tvf

from tastelab.io.images import (
    ImageDecodeError,
    PreprocessConfig,
    _check_pixels,
    _mean_colour,
    _open,
    load_image,
    preprocess_to_uint8,
)

logger = logging.getLogger(__name__)

_EXIF_ORIENTATION = 0x0112
_INTERPOLATION = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC,
                  # torchvision has no Lanczos for tensors; bicubic with antialias is the closest.
                  "lanczos": InterpolationMode.BICUBIC}


def probe_jpeg(data: bytes, label: str, max_pixels: int | None) -> int | None:
    """EXIF orientation (1..8) when ``data`` is a JPEG the device decoder handles, else ``None``.

    Reads the header only. Applies the same per-call pixel limit as :func:`load_image`, so an
    oversized file is refused before any decoder sees it (raises :class:`ImageDecodeError`).
    """
    if not data.startswith(b"\xff\xd8"):
        return None
    img = _open(io.BytesIO(data), label, max_pixels)
    _check_pixels(img.size, max_pixels, label)
    if img.format != "JPEG" or img.mode not in ("RGB", "L"):
        return None  # CMYK / YCCK and friends: Pillow's colour conversion is the reference
    try:
        orientation = int(img.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # a broken EXIF block must not lose the image; Pillow's path ignores it too
        orientation = 1
    return orientation if 1 <= orientation <= 8 else 1


@functools.lru_cache(maxsize=1)
def _decoder() -> tuple[Callable[[list[torch.Tensor], torch.device], list[torch.Tensor]], bool]:
    """The batched JPEG decode call and whether it applies EXIF orientation itself.

    TorchCodec applies the orientation on CPU and CUDA; torchvision's CUDA decoder cannot, so on that
    path the orientation read by :func:`probe_jpeg` is applied afterwards.
    """
    try:
        from torchcodec.decoders import decode_jpeg as codec_decode

        def decode_codec(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
            out = codec_decode(data, mode="RGB", device=device)  # a list in, a list out
            return out if isinstance(out, list) else [out]

        return decode_codec, True
    except Exception as exc:  # not installed, or its compiled ops do not match this torch
        logger.debug("TorchCodec unavailable (%s); using torchvision's JPEG decoder", exc)
        from torchvision.io import ImageReadMode
        from torchvision.io import decode_jpeg as tv_decode

        def decode(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                return tv_decode(data, mode=ImageReadMode.RGB, device=device)

        return decode, False


def decode_jpegs(encoded: Sequence[torch.Tensor], orientations: Sequence[int],
                 device: torch.device) -> list[torch.Tensor | None]:
    """Decode 1-D uint8 byte tensors to upright ``(3, H, W)`` uint8 on ``device``; ``None`` where it fails.

    One batched call first (what makes nvJPEG fast); the batch call returns nothing when any image
    fails, so on failure each image is retried alone to find the culprit.
    """
    if not encoded:
        return []
    decode, oriented = _decoder()
    try:
        out: list[torch.Tensor | None] = list(decode(list(encoded), device))
    except Exception as exc:
        logger.debug("batched device decode failed (%s); decoding one by one", exc)
        out = []
        for data in encoded:
            try:
                out.append(decode([data], device)[0])
            except Exception:
                out.append(None)
    if not oriented:
        out = [apply_orientation(t, o) if t is not None else None for t, o in zip(out, orientations)]
    return out


def apply_orientation(img: torch.Tensor, orientation: int) -> torch.Tensor:
    """Apply an EXIF orientation (1..8) to a ``(C, H, W)`` tensor, exactly as Pillow's ``exif_transpose``."""
    if orientation == 2:  # mirror
        return img.flip(-1)
    if orientation == 3:  # rotate 180
        return img.flip(-1).flip(-2)
    if orientation == 4:  # flip vertically
        return img.flip(-2)
    if orientation == 5:  # transpose
        return img.transpose(-1, -2)
    if orientation == 6:  # rotate 90 clockwise
        return torch.rot90(img, k=-1, dims=(-2, -1))
    if orientation == 7:  # transverse
        return img.transpose(-1, -2).flip(-1).flip(-2)
    if orientation == 8:  # rotate 90 counter-clockwise
        return torch.rot90(img, k=1, dims=(-2, -1))
    return img


def resize_to_input(img: torch.Tensor, cfg: PreprocessConfig) -> torch.Tensor:
    """``(3, H, W)`` uint8 -> ``(3, S, S)`` uint8 per ``cfg.resize``, on the tensor's device.

    Same geometry as the Pillow path (:func:`preprocess_to_uint8`); antialiased resampling keeps
    downscaled photos close to Pillow's output (differences are a few grey levels).
    """
    size, interp = cfg.size, _INTERPOLATION[cfg.interpolation]
    _, h, w = img.shape
    x = img.float()
    if cfg.resize == "squash":
        x = tvf.resize(x, [size, size], interpolation=interp, antialias=True)
    elif cfg.resize == "center_crop":
        side = min(h, w)
        x = tvf.center_crop(x, [side, side])
        x = tvf.resize(x, [size, size], interpolation=interp, antialias=True)
    else:  # pad: longer side to size, letterbox with the mean colour
        scale = size / max(h, w)
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        x = tvf.resize(x, [nh, nw], interpolation=interp, antialias=True)
        canvas = torch.tensor(_mean_colour(cfg.mean), dtype=x.dtype, device=x.device)[:, None, None]
        canvas = canvas.expand(3, size, size).clone()
        top, left = (size - nh) // 2, (size - nw) // 2
        canvas[:, top:top + nh, left:left + nw] = x
        x = canvas
    return x.round_().clamp_(0, 255).to(torch.uint8)


def decode_batch_on_device(encoded: Sequence[tuple[torch.Tensor, int]], cfg: PreprocessConfig,
                           device: torch.device, max_pixels: int | None) -> list[torch.Tensor | str]:
    """Encoded JPEGs (bytes, orientation) -> per item a ``(3, S, S)`` uint8 tensor on ``device``, or the
    error reason. Files the device decoder rejects are decoded by Pillow before giving up."""
    decoded = decode_jpegs([e[0] for e in encoded], [e[1] for e in encoded], device)
    out: list[torch.Tensor | str] = []
    for (data, _), img in zip(encoded, decoded):
        if img is not None:
            out.append(resize_to_input(img, cfg))
            continue
        try:  # libjpeg via Pillow is more forgiving (e.g. truncated files) and gives a clear reason
            pil = load_image(data.numpy().tobytes(), max_pixels=max_pixels, draft_size=cfg.size)
            out.append(preprocess_to_uint8(pil, cfg).to(device))
        except ImageDecodeError as exc:
            out.append(exc.reason)
    return out
